//! AdamW on the trainable blocks only, in place inside the full weights: the fused
//! multi-tensor step of the optimizer module ([`crate::optim::MultiTensorStep`]) with
//! S²FT's blocks as its slots.
//!
//! PyTorch's AdamW (decoupled decay first, then the bias-corrected step), per element
//! of each block, in f32. State lives for the blocks only (per block `m`, `v`, and for a
//! half-precision weight an f32 master copy of the block, which is what is updated and
//! then rounded into the weight). One launch updates up to [`BLOCKS_PER_LAUNCH`] blocks of
//! different weights: an S²FT layer's `W_v`, `W_o`, `W_up`, `W_gate` and `W_down`
//! blocks take one launch (and one more advances the device step counter).

use super::grads::Block;
use crate::optim::{GivenState, Hyper, MultiTensorStep, Rule, SLOTS};
use kiln_runtime::{Result, Tensor};

/// Blocks one launch updates.
pub const BLOCKS_PER_LAUNCH: usize = SLOTS;

/// AdamW's hyper-parameters (PyTorch's defaults).
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// First-moment decay (default 0.9).
    pub beta1: f64,
    /// Second-moment decay (default 0.999).
    pub beta2: f64,
    /// Denominator floor (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay: `p *= 1 - lr wd` (default 1e-2).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        let h = Hyper::defaults(Rule::AdamW);
        Self {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
        }
    }
}

impl AdamWConfig {
    fn hyper(&self) -> Hyper {
        Hyper {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            ..Hyper::defaults(Rule::AdamW)
        }
    }
}

/// AdamW over a list of weight blocks: the optimizer state of the blocks only, updated
/// with [`S2ftAdamW::step`] (weights in place).
pub struct S2ftAdamW {
    inner: MultiTensorStep,
}

impl S2ftAdamW {
    /// Zero moments for each `(weight, block)`, and the f32 master copy of each
    /// half-precision block (read from the weight now).
    pub fn new(weights: &[(&Tensor, Block)], config: AdamWConfig) -> Result<Self> {
        Ok(Self {
            inner: MultiTensorStep::new(Rule::AdamW, config.hyper(), weights)?,
        })
    }

    /// Resumes from given state: per block `Some((m, v, master))` (f32, the block's
    /// shape; `master` for half-precision weights, `None` to read it from the weight)
    /// or `None` for zeros, after `step` steps.
    #[allow(clippy::type_complexity)]
    pub fn with_state(
        weights: &[(&Tensor, Block)],
        config: AdamWConfig,
        state: &[Option<(&Tensor, &Tensor, Option<&Tensor>)>],
        step: u64,
    ) -> Result<Self> {
        let given: Vec<Option<GivenState<'_>>> = state
            .iter()
            .map(|s| {
                s.map(|(m, v, master)| GivenState {
                    tensors: vec![m, v],
                    master,
                })
            })
            .collect();
        Ok(Self {
            inner: MultiTensorStep::with_state(Rule::AdamW, config.hyper(), weights, &given, step)?,
        })
    }

    /// Bytes of state: f32 `m` and `v` of every block, and master copies of half ones.
    pub fn state_bytes(&self) -> usize {
        self.inner.state_bytes()
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.inner.steps()
    }

    /// One AdamW step: `weights[i]`'s block updated in place from `grads[i]` (the
    /// block's shape, the weight's dtype). Weights and grads in the order given to `new`;
    /// the same `&Tensor` twice (two blocks of one weight) goes to separate launches.
    pub fn step(&mut self, weights: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        self.inner.step(weights, grads)
    }

    /// Block `i`'s state as f32 tensors of the block's shape: `(m, v, master)`
    /// (`master` for half-precision weights).
    pub fn state_of(&self, i: usize) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (mut t, master) = self.inner.state_of(i)?;
        let v = t.pop().expect("AdamW has two states");
        let m = t.pop().expect("AdamW has two states");
        Ok((m, v, master))
    }
}
