//! AdamW on the trainable blocks only, in place inside the full weights.
//!
//! PyTorch's AdamW (decoupled decay first, then the bias-corrected step), per element
//! of each block: `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -=
//! (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, in f32. State lives for the
//! blocks only, packed in one f32 buffer (per block `m`, `v`, and for a half-precision
//! weight an f32 master copy of the block, which is what is updated and then rounded
//! into the weight). The step counter and the bias corrections are host scalars.
//!
//! One launch updates up to [`BLOCKS_PER_LAUNCH`] blocks of different weights (a
//! table of (element offset, block width, weight row stride, ...) per slot; each unit
//! finds its slot by comparing its element index with the slots' starts), so an S²FT
//! layer's `W_v`, `W_o`, `W_up`, `W_gate` and `W_down` blocks take one launch. The
//! slots are separate bindings (WGSL has no arrays of buffers): 6 weights + 6 grads +
//! state + table = 14 storage buffers, within every desktop backend's limit (a device
//! with fewer is refused with a clear error).

use super::grads::Block;
use crate::launch::{check_input, expect_shape, upload_u32};
use cubecl::prelude::*;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};

/// Blocks one launch updates.
pub const BLOCKS_PER_LAUNCH: usize = 6;
/// `u32` words per slot in the block table.
const SLOT_WORDS: usize = 6;
/// Units per cube of the AdamW kernel (its one configuration, `UNITS = [256]`).
const ADAMW_UNITS: usize = 256;

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
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Errors name the first parameter out of range.
    pub fn check(&self) -> Result<()> {
        let bad = |param: &str, expected: &str, v: f64| Error::Param {
            param: param.into(),
            expected: expected.into(),
            found: v.to_string(),
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(bad("lr", "a finite number >= 0", self.lr));
        }
        for (n, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(n, "0 <= beta < 1", b));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(bad("eps", "a finite number > 0", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad(
                "weight_decay",
                "a finite number >= 0",
                self.weight_decay,
            ));
        }
        Ok(())
    }
}

/// One block's place in a weight and in the packed state.
#[derive(Clone, Debug)]
struct BlockState {
    block: Block,
    /// The weight's `[out, in]`.
    weight: [usize; 2],
    dtype: DType,
    /// Offset of the block's `m` in the state (then `v`, then the master copy).
    offset: usize,
}

impl BlockState {
    fn shape(&self) -> [usize; 2] {
        self.block.shape(self.weight[0], self.weight[1])
    }
    fn len(&self) -> usize {
        let [r, c] = self.shape();
        r * c
    }
    fn master(&self) -> bool {
        self.dtype != DType::F32
    }
    /// Index of the block's first element in the weight.
    fn weight_offset(&self) -> usize {
        match self.block {
            Block::Rows { start, .. } => start * self.weight[1],
            Block::Columns { start, .. } => start,
        }
    }
}

/// AdamW over a list of weight blocks: the optimizer state of the blocks only, updated
/// with [`S2ftAdamW::step`] (weights in place).
pub struct S2ftAdamW {
    /// Hyper-parameters (may be changed between steps, e.g. by a schedule).
    pub config: AdamWConfig,
    blocks: Vec<BlockState>,
    state: Tensor,
    step: u64,
}

impl S2ftAdamW {
    /// Zero moments for each `(weight, block)`, and the f32 master copy of each
    /// half-precision block (read from the weight now).
    pub fn new(weights: &[(&Tensor, Block)], config: AdamWConfig) -> Result<Self> {
        let zeros: Vec<_> = weights.iter().map(|_| None).collect();
        Self::with_state(weights, config, &zeros, 0)
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
        config.check()?;
        let client = match weights.first() {
            Some((w, _)) => w.client().clone(),
            None => {
                return Err(Error::Param {
                    param: "blocks".into(),
                    expected: "at least one (weight, block)".into(),
                    found: "none".into(),
                })
            }
        };
        let mut blocks = Vec::new();
        let mut host = Vec::new();
        for (i, ((w, block), given)) in weights.iter().zip(state).enumerate() {
            let name = format!("w[{i}]");
            check_input(&name, w, &client)?;
            let &[out, inp] = w.shape() else {
                return Err(crate::launch::shape_err(
                    &name,
                    "[out, in]".into(),
                    w.shape(),
                ));
            };
            block.check(&name, out, inp)?;
            let b = BlockState {
                block: *block,
                weight: [out, inp],
                dtype: w.dtype(),
                offset: host.len(),
            };
            let n = b.len();
            let read = |t: &Tensor, what: &str| -> Result<Vec<f64>> {
                t.expect_dtype(what, &[DType::F32])?;
                expect_shape(what, t, &b.shape(), "the block's shape")?;
                Ok(t.download()?.to_f64())
            };
            match given {
                Some((m, v, _)) => {
                    host.extend(read(m, "m")?);
                    host.extend(read(v, "v")?);
                }
                None => host.extend(std::iter::repeat_n(0.0, 2 * n)),
            }
            if b.master() {
                match given.and_then(|g| g.2) {
                    Some(master) => host.extend(read(master, "master")?),
                    None => host.extend(block_values(w, &b)?),
                }
            }
            blocks.push(b);
        }
        let state = Tensor::upload(
            &client,
            &HostTensor::from_f64(DType::F32, vec![host.len().max(1)], &host_or_zero(host))?,
        )?;
        Ok(Self {
            config,
            blocks,
            state,
            step,
        })
    }

    /// Bytes of state: f32 `m` and `v` of every block, and master copies of half ones.
    pub fn state_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.len() * if b.master() { 12 } else { 8 })
            .sum()
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One AdamW step: `weights[i]`'s block updated in place from `grads[i]` (the
    /// block's shape, the weight's dtype). Weights and grads in the order given to `new`.
    pub fn step(&mut self, weights: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        if weights.len() != self.blocks.len() || grads.len() != self.blocks.len() {
            return Err(Error::Param {
                param: "blocks".into(),
                expected: format!("{} weights and grads (as created)", self.blocks.len()),
                found: format!("{} weights, {} grads", weights.len(), grads.len()),
            });
        }
        for (i, (b, (w, g))) in self
            .blocks
            .iter()
            .zip(weights.iter().zip(grads))
            .enumerate()
        {
            let (wn, gn) = (format!("w[{i}]"), format!("grad[{i}]"));
            check_input(&wn, w, self.state.client())?;
            w.expect_dtype(&wn, &[b.dtype])?;
            expect_shape(&wn, w, &b.weight, "as created")?;
            check_input(&gn, g, self.state.client())?;
            g.expect_dtype(&gn, &[b.dtype])?;
            expect_shape(&gn, g, &b.shape(), "the block's shape")?;
        }
        let t = self.step + 1;
        let c = &self.config;
        let bc1 = 1.0 - c.beta1.powf(t as f64);
        let bc2 = 1.0 - c.beta2.powf(t as f64);
        // Slots of one launch share the weights' dtype and hold distinct weights.
        let mut start = 0;
        while start < self.blocks.len() {
            let mut end = start + 1;
            while end < self.blocks.len()
                && end - start < BLOCKS_PER_LAUNCH
                && self.blocks[end].dtype == self.blocks[start].dtype
                && !weights[start..end]
                    .iter()
                    .any(|w| std::ptr::eq(*w, weights[end]))
            {
                end += 1;
            }
            self.launch(start..end, weights, grads, bc1, bc2)?;
            start = end;
        }
        self.step = t;
        Ok(())
    }

    fn launch(
        &self,
        range: std::ops::Range<usize>,
        weights: &[&Tensor],
        grads: &[&Tensor],
        bc1: f64,
        bc2: f64,
    ) -> Result<()> {
        let client = self.state.client();
        let dtype = self.blocks[range.start].dtype;
        let bindings = 2 * BLOCKS_PER_LAUNCH as u32 + 2;
        if client.report().max_bindings < bindings {
            return Err(Error::Unsupported {
                device: client.name().into(),
                feature: format!(
                    "s2ft_adamw_blocks binds {bindings} storage buffers; the device allows {}",
                    client.report().max_bindings
                ),
            });
        }
        // Each cube updates UNITS elements of one block (the slot is uniform in a cube):
        // a slot's first cube, then its element count, width, weight stride and offsets.
        let mut table = Vec::with_capacity(SLOT_WORDS * BLOCKS_PER_LAUNCH);
        let (mut len, mut cubes) = (0usize, 0usize);
        for b in &self.blocks[range.clone()] {
            let [_, cols] = b.shape();
            table.extend([
                cubes,
                b.len(),
                cols.max(1),
                b.weight[1],
                b.weight_offset(),
                b.offset,
            ]);
            len += b.len();
            cubes += b.len().div_ceil(ADAMW_UNITS);
        }
        // Unused slots start past the last cube: no cube selects them.
        while table.len() < SLOT_WORDS * BLOCKS_PER_LAUNCH {
            table.extend([usize::MAX >> 32, 0, 1, 0, 0, 0]);
        }
        if len == 0 {
            return Ok(());
        }
        if len > crate::launch::MAX_ELEMENTS {
            return Err(Error::Shape {
                tensor: "blocks".into(),
                expected: format!(
                    "at most {} elements per launch",
                    crate::launch::MAX_ELEMENTS
                ),
                found: len.to_string(),
            });
        }
        let table: Vec<u32> = table.into_iter().map(|x| x as u32).collect();
        let table = upload_u32(client, "block_table", &table)?;
        let ph: Vec<Tensor> = (0..2 * BLOCKS_PER_LAUNCH)
            .map(|_| Tensor::empty(client, dtype, &[1]))
            .collect::<Result<_>>()?;
        let slot = |i: usize, list: &[&Tensor], spare: usize| -> Tensor {
            match list.get(range.start + i) {
                Some(t) if range.start + i < range.end => (*t).clone(),
                _ => ph[spare].clone(),
            }
        };
        let w: Vec<Tensor> = (0..BLOCKS_PER_LAUNCH)
            .map(|i| slot(i, weights, i))
            .collect();
        let g: Vec<Tensor> = (0..BLOCKS_PER_LAUNCH)
            .map(|i| slot(i, grads, BLOCKS_PER_LAUNCH + i))
            .collect();
        let c = &self.config;
        S2ftAdamwBlocks::tuned(
            client,
            0.0,
            &S2ftAdamwBlocksArgs {
                w0: &w[0],
                w1: &w[1],
                w2: &w[2],
                w3: &w[3],
                w4: &w[4],
                w5: &w[5],
                g0: &g[0],
                g1: &g[1],
                g2: &g[2],
                g3: &g[3],
                g4: &g[4],
                g5: &g[5],
                state: &self.state,
                table: &table,
                len: len as u32,
                cubes: cubes as u32,
                decay: (1.0 - c.lr * c.weight_decay) as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                // 1 - beta from the f64 value: in f32, 1 - f32(0.999) is 1.3e-5 off.
                one_minus_beta1: (1.0 - c.beta1) as f32,
                one_minus_beta2: (1.0 - c.beta2) as f32,
                step_size: (c.lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                eps: c.eps as f32,
                master: dtype != DType::F32,
            },
        )?;
        Ok(())
    }

    /// Block `i`'s state as f32 tensors of the block's shape: `(m, v, master)`
    /// (`master` for half-precision weights).
    pub fn state_of(&self, i: usize) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let b = self.blocks.get(i).ok_or_else(|| Error::Param {
            param: "block".into(),
            expected: format!("< {}", self.blocks.len()),
            found: i.to_string(),
        })?;
        let n = b.len();
        let flat = self.state.reshape(&[self.state.numel(), 1])?;
        let part = |k: usize| -> Result<Tensor> {
            if n == 0 {
                return Tensor::empty(self.state.client(), DType::F32, &b.shape());
            }
            crate::rows::slice_rows(&flat, 0, b.offset + k * n, n, DType::F32)?.reshape(&b.shape())
        };
        Ok((
            part(0)?,
            part(1)?,
            if b.master() { Some(part(2)?) } else { None },
        ))
    }
}

fn host_or_zero(v: Vec<f64>) -> Vec<f64> {
    if v.is_empty() {
        vec![0.0]
    } else {
        v
    }
}

/// The block's current values (f64, row-major), read from the weight on the host.
fn block_values(w: &Tensor, b: &BlockState) -> Result<Vec<f64>> {
    let all = w.download()?.to_f64();
    let [r, c] = b.shape();
    let (off, ld) = (b.weight_offset(), b.weight[1]);
    Ok((0..r * c)
        .map(|e| all[off + (e / c) * ld + e % c])
        .collect())
}

/// AdamW over up to six blocks (see the module doc): one unit per block element, each
/// cube within one block, so the slot (and every branch on it) is uniform in a cube.
/// Slot `s`'s table words: first cube, length, block width, weight row
/// stride, weight offset, state offset. With `master` (half-precision weights) the
/// state holds an f32 master copy of every block, which is the parameter; the weight
/// only receives its rounding. f32 arithmetic throughout. In place: one configuration,
/// so the autotuner never runs it twice.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, dtype),
    grid = (cubes.min(65_535), cubes.div_ceil(65_535)),
    cube = UNITS
)]
pub fn s2ft_adamw_blocks<F: Float>(
    w0: &mut Array<F>,
    w1: &mut Array<F>,
    w2: &mut Array<F>,
    w3: &mut Array<F>,
    w4: &mut Array<F>,
    w5: &mut Array<F>,
    g0: &Array<F>,
    g1: &Array<F>,
    g2: &Array<F>,
    g3: &Array<F>,
    g4: &Array<F>,
    g5: &Array<F>,
    state: &mut Array<f32>,
    table: &Array<u32>,
    len: u32,
    cubes: u32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    #[comptime] master: bool,
) {
    let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    if cube < cubes {
        // The slot: the last whose first cube is <= this cube (unused slots start past
        // the end).
        let mut b = 0u32;
        #[unroll]
        for s in 1..comptime!(BLOCKS_PER_LAUNCH as u32) {
            if cube >= table[(s * comptime!(SLOT_WORDS as u32)) as usize] {
                b = s;
            }
        }
        let t = b * comptime!(SLOT_WORDS as u32);
        let e = (cube - table[t as usize]) * UNITS + UNIT_POS;
        let n = table[(t + 1) as usize];
        if e < n {
            let cols = table[(t + 2) as usize];
            let ld = table[(t + 3) as usize];
            let w_at = table[(t + 4) as usize] + (e / cols) * ld + e % cols;
            let s_at = table[(t + 5) as usize] + e;
            let g = f32::cast_from(select_slot(g0, g1, g2, g3, g4, g5, b, e));
            let mut p = 0.0f32;
            if comptime!(master) {
                p = state[(s_at + 2 * n) as usize];
            }
            if comptime!(!master) {
                p = f32::cast_from(select_slot(w0, w1, w2, w3, w4, w5, b, w_at));
            }
            p *= decay;
            let m = beta1 * state[s_at as usize] + one_minus_beta1 * g;
            let v = beta2 * state[(s_at + n) as usize] + one_minus_beta2 * g * g;
            p -= step_size * m / (f32::sqrt(v) / bc2_sqrt + eps);
            state[s_at as usize] = m;
            state[(s_at + n) as usize] = v;
            if comptime!(master) {
                state[(s_at + 2 * n) as usize] = p;
            }
            let out = F::cast_from(p);
            if b == 0 {
                w0[w_at as usize] = out;
            } else if b == 1 {
                w1[w_at as usize] = out;
            } else if b == 2 {
                w2[w_at as usize] = out;
            } else if b == 3 {
                w3[w_at as usize] = out;
            } else if b == 4 {
                w4[w_at as usize] = out;
            } else {
                w5[w_at as usize] = out;
            }
        }
    }
}

/// `slots[b][i]` for a slot index known only at run time (WGSL has no arrays of buffers).
#[cube]
fn select_slot<F: Float>(
    s0: &Array<F>,
    s1: &Array<F>,
    s2: &Array<F>,
    s3: &Array<F>,
    s4: &Array<F>,
    s5: &Array<F>,
    b: u32,
    i: u32,
) -> F {
    let mut v = F::new(0.0);
    if b == 0 {
        v = s0[i as usize];
    } else if b == 1 {
        v = s1[i as usize];
    } else if b == 2 {
        v = s2[i as usize];
    } else if b == 3 {
        v = s3[i as usize];
    } else if b == 4 {
        v = s4[i as usize];
    } else if b == 5 {
        v = s5[i as usize];
    }
    v
}
