//! Your first kiln kernel: a fused RMSNorm written with `#[kiln::kernel]`, autotuned on
//! the default device and checked against an f64 CPU reference.
//!
//! `cargo run --example rms_norm` (see docs/first-kernel.md for the walk-through).

// `#[cube]` generates undocumented items (the kernel's expansion module).
#![allow(missing_docs)]

use kiln::dsl::{cube_sum, linear_cube};
use kiln::runtime::cubecl; // `#[cube]` code refers to `cubecl::...`
use kiln::{Client, DType, Device, HostTensor, Tensor};

use cubecl::prelude::*;

/// RMSNorm over the last dimension: `out = x * w / sqrt(mean(x^2) + eps)`, in f32.
#[kiln::kernel(
    tune(UNITS = [32, 64, 128, 256]),
    require(UNITS <= cols.next_power_of_two().max(32)),
    key(rows = pow2, cols = pow2, dtype),
    grid = (rows),
    cube = UNITS,
)]
pub fn rms_norm<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    eps: f32,
) {
    let row = linear_cube();
    if row < rows as usize {
        let base = row * cols as usize;
        let mut smem = SharedMemory::<f32>::new(UNITS as usize);
        // Each unit sums the squares of its strided slice of the row, in f32.
        let mut sq = 0.0f32;
        let mut j = UNIT_POS as usize;
        while j < cols as usize {
            let v = f32::cast_from(x[base + j]);
            sq += v * v;
            j += UNITS as usize;
        }
        let total = cube_sum(&mut smem, sq, UNITS);
        let inv = 1.0 / f32::sqrt(total / f32::cast_from(cols) + eps);
        let mut j = UNIT_POS as usize;
        while j < cols as usize {
            let v = f32::cast_from(x[base + j]) * inv * f32::cast_from(w[j]);
            out[base + j] = F::cast_from(v);
            j += UNITS as usize;
        }
    }
}

/// The f64 reference, written from the formula.
pub fn reference(x: &[f64], w: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| v * inv * w)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn main() -> kiln::Result<()> {
    let client = Client::open(&Device::from_env()?)?;
    println!("{}\n", client.report());
    let (rows, cols, eps) = (300usize, 1000usize, 1e-6f32);
    let mut rng = kiln::check::Rng::new(7);
    let xh = HostTensor::from_f64(DType::F32, vec![rows, cols], &rng.normals(rows * cols, 2.0))?;
    let wh = HostTensor::from_f64(DType::F32, vec![cols], &rng.normals(cols, 1.0))?;
    let (x, w) = (Tensor::upload(&client, &xh)?, Tensor::upload(&client, &wh)?);
    let out = Tensor::empty(&client, DType::F32, &[rows, cols])?;

    println!(
        "candidates: {:?}",
        RmsNorm::space(
            &client,
            &RmsNormProblem {
                rows: rows as u32,
                cols: cols as u32,
                eps
            }
        )
        .iter()
        .map(RmsNorm::label)
        .collect::<Vec<_>>()
    );
    let cfg = RmsNorm::tuned(
        &client,
        1e-5,
        &RmsNormArgs {
            x: &x,
            w: &w,
            out: &out,
            rows: rows as u32,
            cols: cols as u32,
            eps,
        },
    )?;
    println!(
        "autotuned: {} (cache {})",
        RmsNorm::label(&cfg),
        kiln::runtime::tune::Autotuner::global().path().display()
    );

    let want = reference(&xh.to_f64(), &wh.to_f64(), cols, eps as f64);
    let err = kiln::check::max_rel_error(&out.download()?.to_f64(), &want, 1e-6);
    println!("max relative error vs f64 reference: {err:.2e}");
    assert!(err < 1e-5, "rms_norm disagrees with its reference");
    Ok(())
}
