//! Quantized GEMMs against dequantize-then-multiply in f64 (the spec's reference), on
//! the checkpoint formats written by the tests' own Python-free packer and by
//! PyTorch's (the conformance vectors); bad input.
//!
//! Bars (Marlin's measure, mean|Y - Y_ref| / mean|Y_ref|): 1e-3 in f16, 1e-5 in f32.
//!
//! One binary for the family (each test binary links all of kiln): the checkpoint
//! packers and fixtures are here, the cases in one module per kernel family.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod bad_input;
#[path = "../common/mod.rs"]
mod common;
mod direct;
mod flexround;
mod int8;
mod w4a16;

use common::data;
use kiln::check::Rng;
use kiln::kernels::qgemm::{
    self, reference as qr, reference::W4Codes, FlexRoundInputs, W4Format, W4Weights,
};
use kiln::{load_safetensors, DType, Error, HostTensor, Tensor};
use std::collections::BTreeMap;

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
    common::client()
}

fn up(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::upload(
        client(),
        &HostTensor::from_f64(dtype, shape.to_vec(), v).unwrap(),
    )
    .unwrap()
}

fn up_i32(shape: &[usize], v: &[i32]) -> Tensor {
    let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    up(DType::I32, shape, &f)
}

fn rounded(dtype: DType, v: &[f64]) -> Vec<f64> {
    HostTensor::from_f64(dtype, vec![v.len()], v)
        .unwrap()
        .to_f64()
}

/// Marlin's error measure.
fn mean_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).abs()).sum();
    let den: f64 = want.iter().map(|w| w.abs()).sum();
    num / den
}

fn bar(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-3
    }
}

/// A random [K, N] weight quantized per group; scales rounded to `dtype` as stored.
fn codes(rng: &mut Rng, k: usize, n: usize, group: usize, dtype: DType) -> W4Codes {
    let w = rng.normals(k * n, 0.05);
    let mut c = W4Codes::quantize(&w, k, n, group);
    c.s = rounded(dtype, &c.s);
    c
}

/// The checkpoint tensors of `c` in `format`.
struct Ckpt {
    qweight: Tensor,
    scales: Tensor,
    qzeros: Option<Tensor>,
}

fn checkpoint(c: &W4Codes, format: W4Format, dtype: DType, zeros: bool) -> Ckpt {
    let groups = c.k / c.group_size;
    let (qweight, qzeros) = match format {
        W4Format::Awq => (
            up_i32(&[c.k, c.n / 8], &c.awq_qweight()),
            zeros.then(|| up_i32(&[groups, c.n / 8], &c.qzeros("awq", 0))),
        ),
        W4Format::Gptq { version } => (
            up_i32(&[c.k / 8, c.n], &c.gptq_qweight()),
            zeros.then(|| up_i32(&[groups, c.n / 8], &c.qzeros("gptq", version))),
        ),
        W4Format::Kiln => (
            up_i32(&[c.k / 8, c.n], &c.gptq_qweight()),
            zeros.then(|| {
                up(
                    DType::F32,
                    &[groups, c.n],
                    &c.z.iter().map(|&z| z as f64).collect::<Vec<_>>(),
                )
            }),
        ),
    };
    let sdt = if format == W4Format::Kiln {
        DType::F32
    } else {
        dtype
    };
    Ckpt {
        qweight,
        scales: up(sdt, &[groups, c.n], &c.s),
        qzeros,
    }
}

fn weights<'a>(
    ck: &'a Ckpt,
    format: W4Format,
    group: i64,
    g_idx: Option<&'a Tensor>,
) -> W4Weights<'a> {
    W4Weights {
        format,
        qweight: &ck.qweight,
        scales: &ck.scales,
        qzeros: ck.qzeros.as_ref(),
        g_idx,
        group_size: group,
    }
}

/// One W4A16 case against f64: returns the error.
#[allow(clippy::too_many_arguments)]
fn w4_case(
    format: W4Format,
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    group: i64,
    zeros: bool,
    seed: u64,
) -> f64 {
    let mut rng = Rng::new(seed);
    let g = if group < 0 { k } else { group as usize };
    let mut c = codes(&mut rng, k, n, g, dtype);
    if !zeros {
        c.z.fill(8);
    }
    let x = rounded(dtype, &rng.normals(m * k, 1.0));
    let want = qr::matmul(&x, &c.dequantize(None), m, k, n);
    let ck = checkpoint(&c, format, dtype, zeros);
    let y = qgemm::w4a16(&up(dtype, &[m, k], &x), &weights(&ck, format, group, None)).unwrap();
    assert_eq!(y.dtype(), dtype);
    assert_eq!(y.shape(), &[m, n]);
    mean_rel(&y.download().unwrap().to_f64(), &want)
}

fn ints(rng: &mut Rng, n: usize, lo: i32, hi: i32) -> Vec<f64> {
    (0..n)
        .map(|_| (lo + (rng.uniform() * (hi - lo + 1) as f64) as i32).min(hi) as f64)
        .collect()
}

fn flex_case(rng: &mut Rng, rows: usize, cols: usize, dtype: DType) -> qr::FlexRound {
    let r = |rng: &mut Rng, n: usize, lo: f64, hi: f64| {
        rounded(
            dtype,
            &(0..n)
                .map(|_| lo + (hi - lo) * rng.uniform())
                .collect::<Vec<_>>(),
        )
    };
    qr::FlexRound {
        rows,
        cols,
        w: rounded(dtype, &rng.normals(rows * cols, 1.0)),
        s1: rounded(dtype, &[0.17])[0],
        s2: r(rng, rows * cols, 0.7, 1.3),
        s3: r(rng, rows, 0.8, 1.2),
        s4: r(rng, cols, 0.8, 1.2),
        qmin: -8.0,
        qmax: 7.0,
    }
}

fn expect_err<T: std::fmt::Debug>(r: kiln::Result<T>, needle: &str) {
    let e = r.expect_err("must fail").to_string();
    assert!(e.contains(needle), "`{e}` should mention `{needle}`");
}

/// A W8A8 problem's operands on the device and its f64 reference: codes over the whole
/// range -128..=127 (exact i32 sums), scales in [0.01, 0.03) and a bias, all rounded to
/// what the device holds.
pub(crate) struct W8a8Operands {
    dims: (usize, usize, usize),
    host: [Vec<f64>; 5],
    xq: Tensor,
    sx: Tensor,
    wq: Tensor,
    sw: Tensor,
    bias: Tensor,
}

impl W8a8Operands {
    pub(crate) fn new(rng: &mut Rng, m: usize, n: usize, k: usize) -> Self {
        let xq = ints(rng, m * k, -128, 127);
        let wq = ints(rng, n * k, -128, 127);
        let mut scales = |len: usize| -> Vec<f64> {
            let v: Vec<f64> = (0..len).map(|_| 0.01 + rng.uniform() * 0.02).collect();
            rounded(DType::F32, &v)
        };
        let (sx, sw) = (scales(m), scales(n));
        let bias = rounded(DType::F32, &rng.normals(n, 1.0));
        W8a8Operands {
            dims: (m, n, k),
            xq: up(DType::I8, &[m, k], &xq),
            sx: up(DType::F32, &[m], &sx),
            wq: up(DType::I8, &[n, k], &wq),
            sw: up(DType::F32, &[n], &sw),
            bias: up(DType::F32, &[n], &bias),
            host: [xq, sx, wq, sw, bias],
        }
    }

    /// The f64 `y`, with the bias or without.
    pub(crate) fn want(&self, has_bias: bool) -> Vec<f64> {
        let (m, n, k) = self.dims;
        let [xq, sx, wq, sw, bias] = &self.host;
        qr::w8a8(xq, sx, wq, sw, has_bias.then_some(&bias[..]), m, n, k)
    }
}
