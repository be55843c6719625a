//! Seeded perturbation for zeroth-order training (MeZO; "Just One Byte"):
//! `θ += Σᵢ cᵢ z(seedᵢ)` in one pass, with `z ~ N(0, I)` drawn in the kernel from
//! Philox4x32-10 keyed by (seed, tensor, index) and never stored.
//!
//! - [`perturb`]: `θ += eps · z(seed)` (MeZO's `+ε`, `−2ε`, `+ε` walk).
//! - [`zo_update`]: `θ −= lr · Σᵢ pᵢ z(seedᵢ)` (MeZO's update from the projected
//!   gradients `pᵢ` of one or many steps) in one read and one write of θ.
//! - `z` is bit-identical on every backend and on the host ([`crate::random::normal`]):
//!   integer Philox, then a normal value by integer table interpolation
//!   (`kiln_dsl::gaussian_from_bits`). Element `i` of tensor `j` of a list (its
//!   `stream`) is lane `i % 4` of the block at counter `(i / 4, j, 0, 0)`.
//! - The update is computed in f32: `acc = Σᵢ cᵢ zᵢ` (in seed order), then one rounding
//!   of `θ + acc` into θ's dtype. With one seed that is `θ + round(c·z)`, the same bits
//!   on every backend that does not fuse that add into an FMA (lavapipe does not: the
//!   tests compare bits); a backend that fused it would differ in the last bit of θ only.

use crate::launch::check_input;
use crate::random::{gaussian_table, seed_key};
use cubecl::prelude::*;
use kiln_dsl::{gaussian_from_bits, philox4x32_10};
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};

/// Elements each unit updates: one Philox block gives four words.
const PER_UNIT: usize = 4;
/// Units per cube (the kernel's one configuration, `UNITS = [256]`).
const CUBE_UNITS: usize = 256;

/// `θ_j += eps · z(seed, stream = j)` for every tensor `j` of `params`, in place (any
/// shape, f32/f16/bf16). One launch per tensor.
pub fn perturb(params: &[&Tensor], seed: u64, eps: f64) -> Result<()> {
    check_eps(eps)?;
    perturb_sum(params, &[seed], &[eps])
}

/// `perturb`'s `eps`: finite, also as the f32 the kernel multiplies by.
pub(super) fn check_eps(eps: f64) -> Result<()> {
    if eps.is_finite() && (eps as f32).is_finite() {
        return Ok(());
    }
    Err(Error::Param {
        param: "eps".into(),
        expected: "a number finite in f32 (|eps| < 3.4e38)".into(),
        found: kiln_runtime::number_str(eps),
    })
}

/// MeZO's update `θ_j −= lr · Σᵢ projected_grads[i] · z(seeds[i], stream = j)` for
/// every tensor `j` of `params`, in place, in one pass over each tensor.
pub fn zo_update(
    params: &[&Tensor],
    seeds: &[u64],
    projected_grads: &[f64],
    lr: f64,
) -> Result<()> {
    perturb_sum(params, seeds, &zo_coeffs(projected_grads, lr)?)
}

/// MeZO's coefficients `−lr · pᵢ`, each finite in f32 (the kernel's multiplier). An
/// error names `lr` unless it is finite and >= 0, `projected_grads` (with the index)
/// where one is not finite or there are none, and both where a product overflows f32.
pub(super) fn zo_coeffs(projected_grads: &[f64], lr: f64) -> Result<Vec<f64>> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::Param {
            param: "lr".into(),
            expected: "a finite number >= 0".into(),
            found: kiln_runtime::number_str(lr),
        });
    }
    if projected_grads.is_empty() {
        return Err(Error::Param {
            param: "projected_grads".into(),
            expected: "at least one projected gradient (one per seed)".into(),
            found: "none".into(),
        });
    }
    if let Some(i) = projected_grads.iter().position(|p| !p.is_finite()) {
        return Err(Error::Param {
            param: "projected_grads".into(),
            expected: "finite numbers".into(),
            found: format!(
                "{} at index {i}",
                kiln_runtime::number_str(projected_grads[i])
            ),
        });
    }
    let coeffs: Vec<f64> = projected_grads.iter().map(|p| -lr * p).collect();
    if let Some(i) = coeffs.iter().position(|c| !(*c as f32).is_finite()) {
        return Err(Error::Param {
            param: "lr".into(),
            expected: "lr x projected_grads[i] finite in f32 (< 3.4e38) for every i".into(),
            found: format!(
                "{} x {} at index {i}",
                kiln_runtime::number_str(lr),
                kiln_runtime::number_str(projected_grads[i])
            ),
        });
    }
    Ok(coeffs)
}

/// `θ_j += Σᵢ coeffs[i] · z(seeds[i], stream = j)` for every tensor `j`, in place.
pub fn perturb_sum(params: &[&Tensor], seeds: &[u64], coeffs: &[f64]) -> Result<()> {
    for (j, p) in params.iter().enumerate() {
        perturb_stream(p, j as u32, seeds, coeffs)?;
    }
    Ok(())
}

/// `θ += Σᵢ coeffs[i] · z(seeds[i], stream)` on one tensor, in place.
pub fn perturb_stream(param: &Tensor, stream: u32, seeds: &[u64], coeffs: &[f64]) -> Result<()> {
    let client = param.client();
    check_input("param", param, client)?;
    if seeds.is_empty() || seeds.len() != coeffs.len() {
        return Err(Error::Param {
            param: "seeds".into(),
            expected: format!(
                "at least one seed, one per coefficient ({} given)",
                coeffs.len()
            ),
            found: format!("{} seeds", seeds.len()),
        });
    }
    // Finite also as the f32 the kernel multiplies by.
    if let Some(c) = coeffs
        .iter()
        .find(|c| !(c.is_finite() && (**c as f32).is_finite()))
    {
        return Err(Error::Param {
            param: "coeffs".into(),
            expected: "numbers finite in f32 (the kernel's multipliers)".into(),
            found: kiln_runtime::number_str(*c),
        });
    }
    let len = param.numel();
    if len == 0 {
        return Ok(());
    }
    let keys: Vec<f64> = seeds
        .iter()
        .flat_map(|&s| seed_key(s).map(f64::from))
        .collect();
    let keys = Tensor::upload(
        client,
        &HostTensor::from_f64(DType::U32, vec![keys.len()], &keys)?,
    )?;
    // The quantile table as pairs of neighbouring entries (kiln_dsl::gaussian_from_bits).
    let table = gaussian_table();
    let pairs: Vec<f64> = table
        .windows(2)
        .flat_map(|w| [f64::from(w[0]), f64::from(w[1])])
        .collect();
    let pairs = Tensor::upload(
        client,
        &HostTensor::from_f64(DType::I32, vec![pairs.len()], &pairs)?,
    )?;
    let coeffs = Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, vec![coeffs.len()], coeffs)?,
    )?;
    let cubes = len.div_ceil(PER_UNIT * CUBE_UNITS);
    PerturbNormal::tuned(
        client,
        0.0,
        &PerturbNormalArgs {
            param,
            pairs: &pairs,
            keys: &keys,
            coeffs: &coeffs,
            len: len as u32,
            cubes: cubes as u32,
            seeds: seeds.len() as u32,
            stream,
        },
    )?;
    Ok(())
}

/// `param[e] += Σᵢ coeffs[i] z(keys[i], stream, e)`: each unit draws one Philox block
/// per seed and updates its four elements. In place: one configuration.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(len = pow2, dtype),
    grid = cubes(cubes),
    cube = UNITS
)]
pub fn perturb_normal<F: Float, N: Size>(
    param: &mut Array<Vector<F, N>>,
    pairs: &Array<Vector<i32, Const<2>>>,
    keys: &Array<u32>,
    coeffs: &Array<f32>,
    len: u32,
    cubes: u32,
    seeds: u32,
    stream: u32,
) {
    let nw = N::value().comptime() as u32;
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let q = cube * UNITS + UNIT_POS;
    let e = q * 4u32;
    if cube < cubes && e < len {
        let mut acc = Vector::<f32, Const<4>>::new(0.0f32);
        for i in 0..seeds {
            let r = philox4x32_10(
                q,
                stream,
                0u32,
                0u32,
                keys[(2 * i) as usize],
                keys[(2 * i + 1) as usize],
            );
            let c = coeffs[i as usize];
            acc[0] += c * gaussian_from_bits(pairs, r.x0);
            acc[1] += c * gaussian_from_bits(pairs, r.x1);
            acc[2] += c * gaussian_from_bits(pairs, r.x2);
            acc[3] += c * gaussian_from_bits(pairs, r.x3);
        }
        // The unit's four elements: one 4-wide access where `len % 4 == 0`, else four.
        #[unroll]
        for s in 0..comptime!(4 / nw) {
            let first = e + s * nw;
            if first < len {
                let at = (first / nw) as usize;
                let mut v = param[at];
                #[unroll]
                for l in 0..nw {
                    v[l as usize] =
                        F::cast_from(f32::cast_from(v[l as usize]) + acc[(s * nw + l) as usize]);
                }
                param[at] = v;
            }
        }
    }
}

/// The host mirror of [`perturb_stream`] on f32 values (the same f32 operations in the
/// same order): what the kernel writes, bit for bit, on a backend that does not fuse
/// the final add.
pub fn perturb_host(values: &mut [f32], stream: u32, seeds: &[u64], coeffs: &[f64]) {
    for (e, v) in values.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (&s, &c) in seeds.iter().zip(coeffs) {
            acc += c as f32 * crate::random::normal(s, stream, e as u64);
        }
        *v += acc;
    }
}
