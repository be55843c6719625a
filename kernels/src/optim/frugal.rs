//! FRUGAL (Zmushko et al., 2024), random-coordinate variant: Adam state only on a
//! seeded subset of `k = ceil(density · n)` coordinates, signSGD on the rest, the
//! subset redrawn every `update_gap` steps (and its state reset to zero):
//!
//! ```text
//! p *= 1 - lr wd                                   (decoupled, every coordinate)
//! active:   m, v as Adam;  p -= lr m̂ / (sqrt(v̂) + eps)   (t counts from the redraw)
//! inactive: p -= lr_free sign(g)                   (sign(0) = 0)
//! ```
//!
//! Subspace `j` (steps `j·gap + 1 ..= (j+1)·gap`) is the `k` coordinates with the
//! largest Philox words of `(seed, stream j)`, by the exact device selection of the
//! compressors (`super::topk`): a uniformly random subset, the same on every backend.
//! A redraw also builds a bitmask of the subset (one u32 per 32 coordinates); a step is
//! one launch over every coordinate (active ones find their state slot by binary
//! search in the sorted subset) and one to advance the device step counter. State:
//! `8k` bytes of moments, `n/8` of mask, `4k` of indices — at density 0.25, 40% of
//! Adam's `8n`.

use super::multi::{adam_constants, adam_direction, adam_moments};
use super::topk::{select_top_k, KeySource};
use super::{Hyper, Rule};
use crate::launch::{check_input, expect_shape, upload_u32};
use cubecl::prelude::*;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};

/// Units per cube of the FRUGAL kernels (their one configuration, `UNITS = [256]`).
const CUBE: usize = 256;

/// FRUGAL's hyper-parameters beyond Adam's ([`Hyper`]: `lr`, `beta1`, `beta2`, `eps`,
/// `weight_decay`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrugalConfig {
    /// Fraction of coordinates with Adam state, in (0, 1].
    pub density: f64,
    /// Steps between redraws of the subset (FRUGAL's `update_gap`), >= 1.
    pub update_gap: u64,
    /// Step size of the state-free signSGD part.
    pub lr_free: f64,
    /// Seed of the subsets.
    pub seed: u64,
}

impl Default for FrugalConfig {
    /// Density 0.25, a redraw every 200 steps (the paper's defaults), `lr_free` 1e-3,
    /// seed 0.
    fn default() -> Self {
        FrugalConfig {
            density: 0.25,
            update_gap: 200,
            lr_free: 1e-3,
            seed: 0,
        }
    }
}

impl FrugalConfig {
    /// Errors name the parameter out of range.
    pub fn check(&self) -> Result<()> {
        let bad = |param: &str, expected: &str, found: String| Error::Param {
            param: param.into(),
            expected: expected.into(),
            found,
        };
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(bad("density", "0 < density <= 1", self.density.to_string()));
        }
        if self.update_gap == 0 {
            return Err(bad("update_gap", ">= 1", "0".into()));
        }
        if !(self.lr_free.is_finite() && self.lr_free >= 0.0) {
            return Err(bad(
                "lr_free",
                "a finite number >= 0",
                self.lr_free.to_string(),
            ));
        }
        Ok(())
    }

    /// Coordinates with state for a tensor of `n`: `ceil(density · n)`, at least 1.
    pub fn active(&self, n: usize) -> usize {
        ((self.density * n as f64).ceil() as usize).clamp(1, n.max(1))
    }
}

/// A FRUGAL optimizer for one f32 tensor: its subset, its state and its device step
/// counter; [`Frugal::step`] updates the tensor in place.
pub struct Frugal {
    /// Adam's part (`lr`, `beta1`, `beta2`, `eps`, `weight_decay`).
    pub hyper: Hyper,
    /// FRUGAL's part.
    pub config: FrugalConfig,
    n: usize,
    indices: Tensor,
    mask: Tensor,
    state: Tensor,
    counter: Tensor,
    steps: u64,
}

impl Frugal {
    /// Zero state for `param` (f32, any shape; the first subset is drawn at the first
    /// step).
    pub fn new(param: &Tensor, hyper: Hyper, config: FrugalConfig) -> Result<Self> {
        Self::resume(param, hyper, config, 0, None)
    }

    /// Resumes after `steps` steps with the current subspace's moments `(m, v)` (`[k]`
    /// f32 each, in the order of the subset's increasing indices; `None`: zeros).
    pub fn resume(
        param: &Tensor,
        hyper: Hyper,
        config: FrugalConfig,
        steps: u64,
        moments: Option<(&Tensor, &Tensor)>,
    ) -> Result<Self> {
        hyper.check(Rule::AdamW)?;
        config.check()?;
        check_input("param", param, param.client())?;
        param.expect_dtype("param", &[DType::F32])?;
        let client = param.client();
        let n = param.numel();
        let k = config.active(n);
        let state = match moments {
            Some((m, v)) => {
                for (t, name) in [(m, "m"), (v, "v")] {
                    t.expect_dtype(name, &[DType::F32])?;
                    expect_shape(name, t, &[k], "ceil(density * n): the subset's size")?;
                }
                let mut host = m.download()?.to_f64();
                host.extend(v.download()?.to_f64());
                Tensor::upload(
                    client,
                    &HostTensor::from_f64(DType::F32, vec![2 * k], &host)?,
                )?
            }
            None => zeros(client, 2 * k)?,
        };
        let local = steps % config.update_gap;
        let mut f = Frugal {
            hyper,
            config,
            n,
            indices: upload_u32(client, "indices", &[0])?,
            mask: upload_u32(client, "mask", &[0])?,
            state,
            counter: upload_u32(client, "step", &[local as u32])?,
            steps,
        };
        if n > 0 && local != 0 {
            // Mid-subspace: the current subset, keeping the given state. (At a redraw
            // the next step resets the state anyway.)
            f.draw(param, steps / config.update_gap)?;
        }
        Ok(f)
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The current subset (`[k]` i32, increasing) and moments `(m, v)` (`[k]` f32).
    pub fn state(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let k = self.config.active(self.n);
        let flat = self.state.reshape(&[2 * k, 1])?;
        let part = |at: usize| -> Result<Tensor> {
            crate::rows::slice_rows(&flat, 0, at, k, DType::F32)?.reshape(&[k])
        };
        Ok((self.indices.clone(), part(0)?, part(k)?))
    }

    /// Draws subspace `j`'s subset and its mask.
    fn draw(&mut self, param: &Tensor, j: u64) -> Result<()> {
        let client = param.client();
        let k = self.config.active(self.n);
        let stream = u32::try_from(j).map_err(|_| Error::Param {
            param: "step".into(),
            expected: format!(
                "fewer than 2^32 subspaces of {} steps",
                self.config.update_gap
            ),
            found: self.steps.to_string(),
        })?;
        let picked = select_top_k(
            param,
            None,
            k,
            KeySource::Random,
            (self.config.seed, stream),
            1.0,
        )?;
        self.indices = picked.indices;
        let words = self.n.div_ceil(32);
        self.mask = Tensor::empty(client, DType::U32, &[words])?;
        FrugalMask::tuned(
            client,
            0.0,
            &FrugalMaskArgs {
                indices: &self.indices,
                mask: &self.mask,
                k: k as u32,
                words: words as u32,
            },
        )?;
        Ok(())
    }

    /// One step of `param` (as created) by `grad` (f32, param's shape), in place. At the
    /// first step of a subspace the subset is redrawn and the moments reset.
    pub fn step(&mut self, param: &Tensor, grad: &Tensor) -> Result<()> {
        check_input("param", param, self.state.client())?;
        param.expect_dtype("param", &[DType::F32])?;
        if param.numel() != self.n {
            return Err(Error::Shape {
                tensor: "param".into(),
                expected: format!("{} elements (as created)", self.n),
                found: format!("{:?}", param.shape()),
            });
        }
        check_input("grad", grad, self.state.client())?;
        grad.expect_dtype("grad", &[DType::F32])?;
        expect_shape("grad", grad, param.shape(), "param's shape")?;
        self.hyper.check(Rule::AdamW)?;
        self.config.check()?;
        if self.n == 0 {
            self.steps += 1;
            return Ok(());
        }
        let client = param.client().clone();
        if self.steps % self.config.update_gap == 0 {
            self.draw(param, self.steps / self.config.update_gap)?;
            let k = self.config.active(self.n);
            self.state = zeros(&client, 2 * k)?;
            self.counter = upload_u32(&client, "step", &[0])?;
        }
        let h = &self.hyper;
        let cubes = self.n.div_ceil(CUBE);
        FrugalStep::tuned(
            &client,
            0.0,
            &FrugalStepArgs {
                param,
                grad,
                mask: &self.mask,
                indices: &self.indices,
                state: &self.state,
                counter: &self.counter,
                n: self.n as u32,
                k: self.config.active(self.n) as u32,
                cubes: cubes as u32,
                lr: h.lr as f32,
                lr_free: self.config.lr_free as f32,
                beta1: h.beta1 as f32,
                beta2: h.beta2 as f32,
                one_minus_beta1: (1.0 - h.beta1) as f32,
                one_minus_beta2: (1.0 - h.beta2) as f32,
                ln_beta1: h.beta1.ln() as f32,
                ln_beta2: h.beta2.ln() as f32,
                eps: h.eps as f32,
                decay: (1.0 - h.lr * h.weight_decay) as f32,
            },
        )?;
        super::OptimAdvanceStep::tuned(
            &client,
            0.0,
            &super::OptimAdvanceStepArgs {
                counter: &self.counter,
            },
        )?;
        self.steps += 1;
        Ok(())
    }
}

fn zeros(client: &kiln_runtime::Client, n: usize) -> Result<Tensor> {
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, vec![n], &vec![0.0; n])?,
    )
}

/// Position of the first `indices[..k]` (increasing) that is >= `e`.
#[cube]
fn lower_bound(indices: &Array<i32>, k: u32, e: u32) -> u32 {
    let mut lo = 0u32;
    let mut hi = k;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if u32::cast_from(indices[mid as usize]) < e {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The subset's bitmask: unit `w` sets bit `b` of `mask[w]` where `32 w + b` is in
/// `indices` (sorted), found by binary search: one writer per word, no atomics.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(words.div_ceil(UNITS)), cube = UNITS)]
pub fn frugal_mask(indices: &Array<i32>, mask: &mut Array<u32>, k: u32, words: u32) {
    let w = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if w < words {
        let mut j = lower_bound(indices, k, w * 32);
        let mut bits = 0u32;
        while j < k {
            let i = u32::cast_from(indices[j as usize]);
            if i >= w * 32 + 32 {
                break;
            }
            bits |= 1u32 << (i - w * 32);
            j += 1;
        }
        mask[w as usize] = bits;
    }
}

/// One FRUGAL step, one unit per coordinate: Adam (state slot by binary search) where
/// the mask is set, signSGD elsewhere; `t = counter[0] + 1` counts from the redraw.
/// In place: one configuration.
#[kiln_macros::kernel(tune(UNITS = [256]), key(n = pow2), grid = cubes(cubes), cube = UNITS)]
pub fn frugal_step(
    param: &mut Array<f32>,
    grad: &Array<f32>,
    mask: &Array<u32>,
    indices: &Array<i32>,
    state: &mut Array<f32>,
    counter: &Array<u32>,
    n: u32,
    k: u32,
    cubes: u32,
    lr: f32,
    lr_free: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    eps: f32,
    decay: f32,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let e = cube * UNITS + UNIT_POS;
    if cube < cubes && e < n {
        let g = grad[e as usize];
        let mut p = param[e as usize] * decay;
        if ((mask[(e / 32) as usize] >> (e % 32)) & 1u32) == 1u32 {
            let j = lower_bound(indices, k, e);
            let t = f32::cast_from(counter[0] + 1);
            let moments = adam_constants(
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                ln_beta1,
                ln_beta2,
                eps,
                t,
            );
            adam_moments(state, j, k, g, moments, false);
            p -= lr * adam_direction(state, j, k, moments);
        } else {
            // sign(0) = 0: a zero gradient leaves the coordinate alone.
            let s = select(g > 0.0, 1.0f32, select(g < 0.0, -1.0f32, 0.0f32));
            p -= lr_free * s;
        }
        param[e as usize] = p;
    }
}
