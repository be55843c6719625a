//! The fused multi-tensor step: one launch updates up to [`SLOTS`] tensors (or blocks of
//! tensors) of different sizes in place, with their optimizer state packed in one f32
//! buffer and the step counter on the device.
//!
//! Slots: WGSL has no arrays of buffers, so the launch binds [`SLOTS`] weights and
//! [`SLOTS`] gradients as separate arguments (unused ones get a one-element placeholder),
//! plus the state, a table and the step counter: 15 storage buffers (Vulkan, Metal and
//! D3D12 drivers allow at least 31; a device with fewer is refused with a clear error).
//! Each cube updates `UNITS x PER` vectors of one slot, so the slot (and every branch on it)
//! is uniform in a cube. Vectors are 4 wide when every slot of the launch is 4-aligned
//! (lengths, offsets, and for a strided block its columns and row stride; state offsets
//! and the distance between a slot's state tensors are padded to 4), else 1; a contiguous
//! block whose length is not a multiple of 4 runs as two parts, its 4-wide body (bound as
//! the prefix of its weight and gradient that ends there) and its tail of 1-3 elements in
//! a one-wide launch. A slot is a [`Block`] of a row-major `[rows, cols]` weight: all of
//! it, rows `start..end`, or columns `start..end` (strided; S²FT's submatrices).
//!
//! State: per slot the rule's per-element tensors (`Rule::state_names`) one after the
//! other, its per-tensor scalars (AdaGrad-Norm's `b2`), then, for an f16/bf16 weight, an
//! f32 master copy of the slot, which is the parameter that is updated and then rounded
//! into the weight.
//!
//! Per-tensor norms (LAMB, AdaGrad-Norm): three launches per group instead of one. The
//! step kernel in [`Phase::Norms`] writes each cube's partial sums of squares (LAMB: the
//! moments too); `optim_slot_norms` (one cube per slot) sums a slot's partials in a
//! fixed order (deterministic; no atomics, which WGSL lacks for floats); the step kernel
//! in [`Phase::Update`] then applies the update with the slot's norms.
//!
//! Step counter: a `u32` on the device. Every launch of a step reads `t = counter + 1`;
//! one more one-unit launch advances it afterwards (ordered on the stream: no host
//! synchronisation per step). Bias corrections `1 - beta^t` are formed in the kernel as
//! `-expm1(t ln beta)` (series below |x| = 1/2), so `1 - 0.999^5` keeps f32's relative
//! precision instead of losing 8 bits to cancellation.

use super::rules::{Hyper, Rule};
use crate::launch::{check_input, expect_shape, shape_err, upload_u32};
use cubecl::prelude::*;
use kiln_dsl::cube_sum;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};
use std::collections::hash_map::Entry;

/// A kernel over the launch's [`SLOTS`] slots (WGSL has no arrays of buffers): its
/// weights `w0..w5` (updated in place) and gradients `g0..g5`, `N`-wide vectors of `F`,
/// come first, then its own arguments.
macro_rules! slot_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        pub fn $name:ident($($own:tt)*) $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel($($attr)*)]
        pub fn $name<F: Float, N: Size>(
            w0: &mut Array<Vector<F, N>>,
            w1: &mut Array<Vector<F, N>>,
            w2: &mut Array<Vector<F, N>>,
            w3: &mut Array<Vector<F, N>>,
            w4: &mut Array<Vector<F, N>>,
            w5: &mut Array<Vector<F, N>>,
            g0: &Array<Vector<F, N>>,
            g1: &Array<Vector<F, N>>,
            g2: &Array<Vector<F, N>>,
            g3: &Array<Vector<F, N>>,
            g4: &Array<Vector<F, N>>,
            g5: &Array<Vector<F, N>>,
            $($own)*
        ) $body
    };
}
pub(super) use slot_kernel;

/// The arguments of a [`slot_kernel!`] launch: weights `w[0..SLOTS]` and gradients
/// `g[0..SLOTS]` (tensors), then the kernel's own fields.
macro_rules! slot_args {
    ($args:ident, $w:expr, $g:expr, { $($own:tt)* }) => {
        $args {
            w0: &$w[0],
            w1: &$w[1],
            w2: &$w[2],
            w3: &$w[3],
            w4: &$w[4],
            w5: &$w[5],
            g0: &$g[0],
            g1: &$g[1],
            g2: &$g[2],
            g3: &$g[3],
            g4: &$g[4],
            g5: &$g[5],
            $($own)*
        }
    };
}
pub(super) use slot_args;

/// Tensors (or blocks) one launch updates.
pub const SLOTS: usize = 6;
// `optim_slot_norms` launches one cube per slot: `grid = (6)`.
const _: () = assert!(SLOTS == 6);
/// `u32` words per slot in the table: first cube, length, width, weight row stride,
/// weight offset, state offset, state stride, start in the slot (the fused step's; FRUGAL
/// uses the first six its own way).
pub(super) const SLOT_WORDS: usize = 8;
/// Units per cube of the step kernel (its one configuration, `UNITS = [256]`).
const STEP_UNITS: usize = 256;
/// Vectors per unit of the step kernel (its one configuration, `PER = [4]`).
const STEP_PER: usize = 4;

kiln_runtime::comptime_enum! {
    /// Which pass of the step kernel runs (a `#[comptime]` specialisation).
    pub enum Phase {
        /// The update (every rule; for LAMB and AdaGrad-Norm with the slot's norms).
        Update = "update",
        /// LAMB and AdaGrad-Norm's first pass: per-cube partial sums of squares.
        Norms = "norms",
    }
}

kiln_runtime::comptime_enum! {
    /// Where the norms pass of LAMB and AdaGrad-Norm leaves its partial sums of squares
    /// (a `#[comptime]` specialisation; the slot reduction adds them in a fixed order
    /// either way, so both are deterministic).
    pub enum Sums {
        /// One pair per cube, from a cube reduction (three barriers): GPUs, where a
        /// barrier is cheap and 256 times fewer partials keep the one-cube-per-slot
        /// reduction short.
        PerCube = "per_cube",
        /// One pair per unit, no barrier: CPU adapters, where a barrier switches every
        /// SIMD slice of the cube (lavapipe, 4M elements: LAMB 30.3 -> 23.7 ms,
        /// AdaGrad-Norm 20.3 -> 13.7 ms, docs/optim.md).
        PerUnit = "per_unit",
    }
}

impl Sums {
    /// `PerUnit` on a CPU adapter, else `PerCube`.
    pub fn for_device(client: &kiln_runtime::Client) -> Sums {
        match client.report().adapter_type == kiln_runtime::AdapterType::Cpu {
            true => Sums::PerUnit,
            false => Sums::PerCube,
        }
    }
}

/// The part of a row-major weight `[out, in]` a step updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// `W[start:end, :]` (`Rows { start: 0, end: out }`: the whole weight).
    Rows {
        /// First row.
        start: usize,
        /// One past the last row.
        end: usize,
    },
    /// `W[:, start:end]`.
    Columns {
        /// First column.
        start: usize,
        /// One past the last column.
        end: usize,
    },
}

impl Block {
    /// All of a weight with `rows` rows.
    pub fn whole(rows: usize) -> Block {
        Block::Rows {
            start: 0,
            end: rows,
        }
    }

    /// A block from `kiln run`'s `block` (`rows` | `columns`), `start` and `end`.
    pub fn parse(kind: &str, start: usize, end: usize) -> Result<Block> {
        match kind {
            "rows" => Ok(Block::Rows { start, end }),
            "columns" => Ok(Block::Columns { start, end }),
            _ => Err(Error::Param {
                param: "block".into(),
                expected: "rows | columns".into(),
                found: kind.into(),
            }),
        }
    }

    /// `(start, end)`.
    pub fn range(&self) -> (usize, usize) {
        match *self {
            Block::Rows { start, end } | Block::Columns { start, end } => (start, end),
        }
    }

    /// The block's shape inside a weight of shape `[out, in]`.
    pub fn shape(&self, out: usize, inp: usize) -> [usize; 2] {
        let (s, e) = self.range();
        match self {
            Block::Rows { .. } => [e - s, inp],
            Block::Columns { .. } => [out, e - s],
        }
    }

    /// Checks the block against `w`'s shape `[out, in]` (`start <= end <=` the extent);
    /// errors name `start..end` and the weight `name`.
    pub fn check(&self, name: &str, out: usize, inp: usize) -> Result<()> {
        let (s, e) = self.range();
        let (extent, what) = match self {
            Block::Rows { .. } => (out, "rows"),
            Block::Columns { .. } => (inp, "columns"),
        };
        if s > e || e > extent {
            return Err(Error::Param {
                param: "start..end".into(),
                expected: format!("start <= end <= {extent} ({name}'s {what})"),
                found: format!("{s}..{e}"),
            });
        }
        Ok(())
    }
}

/// What one slot of a launch updates: elements `start .. start + len` of slot `slot`'s
/// block (all of it, or a ragged contiguous block's 4-wide body or its tail of 1-3).
#[derive(Clone, Copy, Debug)]
struct Part {
    slot: usize,
    start: usize,
    len: usize,
}

/// One slot: a block of a weight and its place in the packed state.
#[derive(Clone, Debug)]
struct Slot {
    block: Block,
    /// The weight's `[out, in]`.
    weight: [usize; 2],
    dtype: DType,
    /// Offset of the slot's first state tensor in the state buffer.
    offset: usize,
}

impl Slot {
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
    /// Distance between the slot's per-element state tensors: its length rounded up to 4,
    /// so that each starts 4-aligned.
    fn stride(&self) -> usize {
        self.len().next_multiple_of(4)
    }
    /// Whether the block is one contiguous run of the weight (rows, or all columns).
    fn contiguous(&self) -> bool {
        self.shape()[1] == self.weight[1] || self.shape()[0] <= 1
    }
    /// Index of the block's first element in the weight.
    fn weight_offset(&self) -> usize {
        match self.block {
            Block::Rows { start, .. } => start * self.weight[1],
            Block::Columns { start, .. } => start,
        }
    }
}

/// Given state of one slot: the rule's state tensors in order (f32; the block's shape,
/// `[1]` for a per-tensor scalar) and, for a half-precision weight, optionally its f32
/// master copy (else read from the weight).
pub struct GivenState<'a> {
    /// By `Rule::state_names` order.
    pub tensors: Vec<&'a Tensor>,
    /// The f32 master copy.
    pub master: Option<&'a Tensor>,
}

/// A fused optimizer over a list of weights (or blocks of weights): its state and its
/// device step counter; [`MultiTensorStep::step`] updates the weights in place.
pub struct MultiTensorStep {
    /// The update rule.
    pub rule: Rule,
    /// Hyper-parameters (may change between steps, e.g. by a schedule).
    pub hyper: Hyper,
    slots: Vec<Slot>,
    state: Tensor,
    counter: Tensor,
    steps: u64,
    sums: Sums,
    cache: std::sync::Mutex<LaunchCache>,
}

/// Device buffers a launch binds besides the weights, gradients, state and counter, kept
/// across steps (AdamW over 200 aligned tensors on lavapipe spent most of its step making
/// them: 13 placeholders, a guard, a table and a partials buffer per launch).
#[derive(Default)]
struct LaunchCache {
    /// Per group of parts (their slots and starts; and `Sums`): its slot table and
    /// partial sums buffer.
    groups: std::collections::HashMap<(Vec<(usize, usize)>, Sums), (Tensor, Tensor)>,
    /// Per dtype: `2 SLOTS` one-vector placeholders for unused slots.
    spares: std::collections::HashMap<DType, Vec<Tensor>>,
    /// Per vector width: the array whose length caps the launch's width.
    guards: std::collections::HashMap<usize, Tensor>,
}

impl MultiTensorStep {
    /// Zero state for each `(weight, block)` (each weight `[out, in]`; a vector is
    /// `[1, n]`), and the f32 master copy of each half-precision block (read now).
    pub fn new(rule: Rule, hyper: Hyper, weights: &[(&Tensor, Block)]) -> Result<Self> {
        let none: Vec<Option<GivenState<'_>>> = weights.iter().map(|_| None).collect();
        Self::with_state(rule, hyper, weights, &none, 0)
    }

    /// Resumes after `steps` steps from given state (`None`: zeros) per block.
    pub fn with_state(
        rule: Rule,
        hyper: Hyper,
        weights: &[(&Tensor, Block)],
        state: &[Option<GivenState<'_>>],
        steps: u64,
    ) -> Result<Self> {
        hyper.check(rule)?;
        let Some((first, _)) = weights.first() else {
            return Err(Error::Param {
                param: "params".into(),
                expected: "at least one tensor".into(),
                found: "none".into(),
            });
        };
        let client = first.client().clone();
        let k = rule.state_names().len();
        let (mut slots, mut host) = (Vec::new(), Vec::new());
        for (i, ((w, block), given)) in weights.iter().zip(state).enumerate() {
            let name = format!("param[{i}]");
            check_input(&name, w, &client)?;
            let &[out, inp] = w.shape() else {
                return Err(shape_err(&name, "[out, in]".into(), w.shape()));
            };
            block.check(&name, out, inp)?;
            // Slot state starts 4-aligned, so the step can read it in 4-wide vectors.
            host.resize(host.len().next_multiple_of(4), 0.0);
            let s = Slot {
                block: *block,
                weight: [out, inp],
                dtype: w.dtype(),
                offset: host.len(),
            };
            let read_as = |t: &Tensor, what: &str, shape: &[usize], says: &str| {
                t.expect_dtype(what, &[DType::F32])?;
                expect_shape(what, t, shape, says)?;
                Ok::<_, Error>(t.download()?.to_f64())
            };
            let read = |t: &Tensor, what: &str, j: usize| match j < rule.element_states() {
                true => read_as(t, what, &s.shape(), "the block's shape"),
                false => read_as(t, what, &[1], "one per tensor"),
            };
            match given {
                Some(g) => {
                    if g.tensors.len() != k {
                        return Err(Error::Param {
                            param: "state".into(),
                            expected: format!("{k} tensors ({})", rule.state_names().join(", ")),
                            found: g.tensors.len().to_string(),
                        });
                    }
                    for (j, (t, what)) in g.tensors.iter().zip(rule.state_names()).enumerate() {
                        host.extend(read(t, what, j)?);
                        if j < rule.element_states() {
                            host.resize(host.len() + s.stride() - s.len(), 0.0);
                        }
                    }
                }
                None => host.extend(std::iter::repeat_n(
                    0.0,
                    rule.element_states() * s.stride() + rule.scalar_states(),
                )),
            }
            if s.master() {
                match given.as_ref().and_then(|g| g.master) {
                    Some(m) => host.extend(read(m, "master", 0)?),
                    None => host.extend(block_values(w, &s)?),
                }
            }
            slots.push(s);
        }
        host.resize(host.len().next_multiple_of(4).max(4), 0.0);
        let state = Tensor::upload(
            &client,
            &HostTensor::from_f64(DType::F32, vec![host.len()], &host)?,
        )?;
        let counter = upload_u32(&client, "step", &[steps as u32])?;
        Ok(Self {
            rule,
            hyper,
            slots,
            state,
            counter,
            steps,
            sums: Sums::for_device(&client),
            cache: Default::default(),
        })
    }

    /// Where LAMB's and AdaGrad-Norm's norms pass leaves its partial sums (default:
    /// [`Sums::for_device`]); the result is the same up to f32 rounding order.
    pub fn set_sums(&mut self, sums: Sums) {
        self.sums = sums;
    }

    /// Steps taken (a host mirror of the device counter).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Bytes of optimizer state (f32 state tensors, master copies of half blocks).
    pub fn state_bytes(&self) -> usize {
        let (k, scalars) = (self.rule.element_states(), self.rule.scalar_states());
        self.slots
            .iter()
            .map(|s| 4 * (s.stride() * k + s.len() * s.master() as usize + scalars))
            .sum()
    }

    /// One step: `weights[i]`'s block updated in place from `grads[i]` (the block's
    /// shape, the weight's dtype), in the order given at creation. Launches: one per
    /// [`SLOTS`] blocks of one dtype, one vector width and distinct weights (three for
    /// the rules with per-tensor norms; a contiguous block whose length is not a multiple
    /// of 4 counts as two, its 4-wide body and its tail), and one to advance the step
    /// counter. No host synchronisation.
    pub fn step(&mut self, weights: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let n = self.slots.len();
        if weights.len() != n || grads.len() != n {
            return Err(Error::Param {
                param: "params".into(),
                expected: format!("{n} params and grads (as created)"),
                found: format!("{} params, {} grads", weights.len(), grads.len()),
            });
        }
        for (i, (s, (w, g))) in self.slots.iter().zip(weights.iter().zip(grads)).enumerate() {
            let (wn, gn) = (format!("param[{i}]"), format!("grad[{i}]"));
            check_input(&wn, w, self.state.client())?;
            w.expect_dtype(&wn, &[s.dtype])?;
            expect_shape(&wn, w, &s.weight, "as created")?;
            check_input(&gn, g, self.state.client())?;
            g.expect_dtype(&gn, &[s.dtype])?;
            expect_shape(&gn, g, &s.shape(), "the block's shape")?;
        }
        self.hyper.check(self.rule)?;
        // Launches of up to SLOTS blocks sharing a dtype and a vector width (so that a
        // ragged block does not hold its neighbours to one element a unit), in order
        // within each kind, never the same weight twice in one launch (its bindings
        // would alias).
        let parts = parts_of(self.rule, &self.slots);
        let kind = |j: usize| (self.slots[parts[j].slot].dtype, self.aligned(parts[j]));
        let part_weights: Vec<&Tensor> = parts.iter().map(|p| weights[p.slot]).collect();
        for group in launch_groups(0..parts.len(), kind, &part_weights) {
            let group: Vec<Part> = group.iter().map(|&j| parts[j]).collect();
            self.launch(&group, weights, grads)?;
        }
        OptimAdvanceStep::tuned(
            self.state.client(),
            0.0,
            &OptimAdvanceStepArgs {
                counter: &self.counter,
            },
        )?;
        self.steps += 1;
        Ok(())
    }

    /// Whether part `p` can be read and written in 4-wide vectors: its elements (rows,
    /// for a strided block) and state fall on 4-element boundaries (a master copy behind
    /// AdaGrad-Norm's scalar does not).
    fn aligned(&self, p: Part) -> bool {
        let s = &self.slots[p.slot];
        let [_, cols] = s.shape();
        let layout = match s.contiguous() {
            true => vec![s.weight_offset() + p.start],
            false => vec![cols, s.weight[1], s.weight_offset()],
        };
        [p.len, p.start, s.offset, s.stride()]
            .iter()
            .chain(&layout)
            .all(|x| x % 4 == 0)
            && !(s.master() && self.rule.scalar_states() > 0)
    }

    /// One launch of the step over the parts `group` (at most [`SLOTS`], one dtype,
    /// distinct weights).
    fn launch(&self, group: &[Part], weights: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let client = self.state.client();
        let parts: Vec<(Part, &Slot)> = group.iter().map(|&p| (p, &self.slots[p.slot])).collect();
        let dtype = parts[0].1.dtype;
        let bindings = 2 * SLOTS as u32 + 4;
        if client.report().max_bindings < bindings {
            return Err(Error::Unsupported {
                device: client.name().into(),
                feature: format!(
                    "the fused optimizer step binds {bindings} storage buffers; the device allows {}",
                    client.report().max_bindings
                ),
            });
        }
        // 4-wide when every part is aligned; else one element a unit.
        let width = match group.iter().all(|&p| self.aligned(p)) {
            true => 4,
            false => 1,
        };
        let per_cube = STEP_UNITS * STEP_PER * width;
        let strided = parts.iter().any(|(_, s)| !s.contiguous());
        let mut table = Vec::with_capacity(SLOT_WORDS * SLOTS);
        let (mut len, mut cubes) = (0usize, 0usize);
        for (p, s) in &parts {
            // A contiguous block is addressed as one run (`cols = ld`), so a part of it
            // may start mid-row.
            let (cols, ld) = match s.contiguous() {
                true => (1, 1),
                false => (s.shape()[1].max(1), s.weight[1]),
            };
            table.extend([
                cubes,
                p.len,
                cols,
                ld,
                s.weight_offset() + p.start,
                s.offset,
                s.stride(),
                p.start,
            ]);
            len += p.len;
            cubes += p.len.div_ceil(per_cube);
        }
        // Unused slots start past the last cube: no cube selects them.
        while table.len() < SLOT_WORDS * SLOTS {
            table.extend([u32::MAX as usize, 0, 1, 1, 0, 0, 0, 0]);
        }
        if len == 0 {
            return Ok(());
        }
        if len > crate::launch::MAX_ELEMENTS {
            return Err(Error::Shape {
                tensor: "params".into(),
                expected: format!(
                    "at most {} elements per launch",
                    crate::launch::MAX_ELEMENTS
                ),
                found: len.to_string(),
            });
        }
        // Two norms per slot, then partial sums of squares (two per cube, or per unit).
        let sums_per_cube = match self.sums {
            Sums::PerCube => 1,
            Sums::PerUnit => STEP_UNITS,
        };
        // The group's table, partial sums, placeholders and guard: made at its first step,
        // then reused (each is a round trip to the device's server thread to create).
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = (group.iter().map(|p| (p.slot, p.start)).collect(), self.sums);
        if let Entry::Vacant(slot) = cache.groups.entry(key.clone()) {
            let table: Vec<u32> = table.into_iter().map(|x| x as u32).collect();
            let partials = match self.rule.needs_norms() {
                true => {
                    Tensor::empty(client, DType::F32, &[2 * SLOTS + 2 * cubes * sums_per_cube])?
                }
                false => crate::launch::absent(client)?,
            };
            let table = upload_u32(client, "slot_table", &table)?;
            slot.insert((table, partials));
        }
        if let Entry::Vacant(slot) = cache.spares.entry(dtype) {
            // Placeholders hold one vector (never written: no cube selects their slot).
            let ph: Vec<Tensor> = (0..2 * SLOTS)
                .map(|_| Tensor::empty(client, dtype, &[4]))
                .collect::<Result<_>>()?;
            slot.insert(ph);
        }
        if let Entry::Vacant(slot) = cache.guards.entry(width) {
            // `guard`'s length caps the kernel's vector width.
            slot.insert(Tensor::empty(client, DType::F32, &[width])?);
        }
        let (table, partials) = cache.groups[&key].clone();
        let ph = cache.spares[&dtype].clone();
        let guard = cache.guards[&width].clone();
        drop(cache);
        // A contiguous part is bound as the prefix of its weight and gradient that ends
        // with it: 4-wide when its end is 4-aligned although the whole tensor's length is
        // not (the launch's vector width is the widest dividing every binding's length).
        let slot = |i: usize, list: &[&Tensor], grad: bool| -> Result<Tensor> {
            let Some(&(p, s)) = parts.get(i) else {
                return Ok(ph[i + SLOTS * grad as usize].clone());
            };
            let t = list[p.slot];
            match (s.contiguous(), grad) {
                (false, _) => Ok(t.clone()),
                (true, false) => t.prefix(s.weight_offset() + p.start + p.len),
                (true, true) => t.prefix(p.start + p.len),
            }
        };
        let w: Vec<Tensor> = (0..SLOTS)
            .map(|i| slot(i, weights, false))
            .collect::<Result<_>>()?;
        let g: Vec<Tensor> = (0..SLOTS)
            .map(|i| slot(i, grads, true))
            .collect::<Result<_>>()?;
        if let Some(t) = w.iter().chain(&g).find(|t| t.numel() % width != 0) {
            // Guards the grid, sized for `width`: a narrower launch would skip elements.
            return Err(Error::Kernel {
                kernel: "optim_step".into(),
                message: format!(
                    "a binding of {} elements in a {width}-wide launch",
                    t.numel()
                ),
            });
        }
        let h = &self.hyper;
        let decoupled = 1.0 - h.lr * h.weight_decay;
        let (before, after) = match self.rule {
            Rule::AdamW | Rule::AdaBelief => (decoupled, 1.0),
            Rule::Adan if h.no_prox => (decoupled, 1.0),
            Rule::Adan => (1.0, 1.0 / (1.0 + h.lr * h.weight_decay)),
            Rule::AdaGrad | Rule::Lamb | Rule::AdaGradNorm => (1.0, 1.0),
        };
        // 1 - beta and ln(beta) from the f64 values: in f32, 1 - f32(0.999) is 1.3e-5 off.
        let ln = |b: f64| b.ln() as f32;
        let step = |phase: Phase| -> Result<()> {
            OptimStep::tuned(
                client,
                0.0,
                &slot_args!(OptimStepArgs, w, g, {
                    state: &self.state,
                    width: &guard,
                    table: &table,
                    counter: &self.counter,
                    partials: &partials,
                    len: len as u32,
                    cubes: cubes as u32,
                    lr: h.lr as f32,
                    beta1: h.beta1 as f32,
                    beta2: h.beta2 as f32,
                    beta3: h.beta3 as f32,
                    one_minus_beta1: (1.0 - h.beta1) as f32,
                    one_minus_beta2: (1.0 - h.beta2) as f32,
                    one_minus_beta3: (1.0 - h.beta3) as f32,
                    ln_beta1: ln(h.beta1),
                    ln_beta2: ln(h.beta2),
                    ln_beta3: ln(h.beta3),
                    eps: h.eps as f32,
                    weight_decay: h.weight_decay as f32,
                    decay_before: before as f32,
                    decay_after: after as f32,
                    rule: self.rule,
                    master: dtype != DType::F32,
                    phase,
                    slots: group.len() as u32,
                    strided,
                    sums: self.sums,
                }),
            )?;
            Ok(())
        };
        if self.rule.needs_norms() {
            step(Phase::Norms)?;
            OptimSlotNorms::tuned(
                client,
                0.0,
                &OptimSlotNormsArgs {
                    partials: &partials,
                    state: &self.state,
                    table: &table,
                    cubes: cubes as u32,
                    per_cube: per_cube as u32,
                    sums_per_cube: sums_per_cube as u32,
                    rule: self.rule,
                },
            )?;
        }
        step(Phase::Update)
    }

    /// Slot `i`'s state as f32 tensors (the block's shape; `[1]` for a per-tensor
    /// scalar) in `Rule::state_names` order, and its master copy (half weights).
    pub fn state_of(&self, i: usize) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let s = self.slots.get(i).ok_or_else(|| Error::Param {
            param: "slot".into(),
            expected: format!("< {}", self.slots.len()),
            found: i.to_string(),
        })?;
        let n = s.len();
        let flat = self.state.reshape(&[self.state.numel(), 1])?;
        let part = |at: usize, len: usize, shape: &[usize]| -> Result<Tensor> {
            if len == 0 {
                return Tensor::empty(self.state.client(), DType::F32, shape);
            }
            crate::rows::slice_rows(&flat, 0, s.offset + at, len, DType::F32)?.reshape(shape)
        };
        let (k, scalars) = (self.rule.element_states(), self.rule.scalar_states());
        let stride = s.stride();
        let mut tensors = (0..k)
            .map(|j| part(j * stride, n, &s.shape()))
            .collect::<Result<Vec<_>>>()?;
        for j in 0..scalars {
            tensors.push(part(k * stride + j, 1, &[1])?);
        }
        let master = match s.master() {
            true => Some(part(k * stride + scalars, n, &s.shape())?),
            false => None,
        };
        Ok((tensors, master))
    }
}

/// The parts the launches update: each slot whole, except a contiguous slot whose length
/// is not a multiple of 4 (and at least 4), under a rule without per-tensor norms: its
/// 4-wide body and its tail of 1-3 elements (else the whole slot runs one element a
/// unit, half the speed on lavapipe: AdamW over 200 tensors of mixed sizes, three in
/// four ragged, 100 ms against 49 ms with the sizes rounded to 4).
fn parts_of(rule: Rule, slots: &[Slot]) -> Vec<Part> {
    let mut parts = Vec::with_capacity(slots.len());
    for (i, s) in slots.iter().enumerate() {
        let (n, body) = (s.len(), s.len() / 4 * 4);
        let split = !rule.needs_norms()
            && s.contiguous()
            && s.weight_offset() % 4 == 0
            && body > 0
            && body < n
            && !(s.master() && rule.scalar_states() > 0);
        if split {
            parts.push(Part {
                slot: i,
                start: 0,
                len: body,
            });
            parts.push(Part {
                slot: i,
                start: body,
                len: n - body,
            });
        } else {
            parts.push(Part {
                slot: i,
                start: 0,
                len: n,
            });
        }
    }
    parts
}

/// The block's current values (f64, row-major), read from the weight on the host.
fn block_values(w: &Tensor, s: &Slot) -> Result<Vec<f64>> {
    let all = w.download()?.to_f64();
    let [r, c] = s.shape();
    let (off, ld) = (s.weight_offset(), s.weight[1]);
    Ok((0..r * c)
        .map(|e| all[off + (e / c) * ld + e % c])
        .collect())
}

/// The launches of a step: the tensors `items` in groups of up to [`SLOTS`] of one
/// `kind` (dtype, vector width), in order within each kind, never the same weight twice
/// in one group (its bindings would alias). A group is listed when it fills, the open
/// ones last.
pub(super) fn launch_groups<K: PartialEq>(
    items: impl IntoIterator<Item = usize>,
    kind: impl Fn(usize) -> K,
    weights: &[&Tensor],
) -> Vec<Vec<usize>> {
    let (mut open, mut full): (Vec<Vec<usize>>, Vec<Vec<usize>>) = (vec![], vec![]);
    for i in items {
        let joins = |g: &Vec<usize>| {
            kind(g[0]) == kind(i) && !g.iter().any(|&j| std::ptr::eq(weights[j], weights[i]))
        };
        match open.iter().position(joins) {
            Some(at) => open[at].push(i),
            None => open.push(vec![i]),
        }
        if let Some(at) = open.iter().position(|g| g.len() == SLOTS) {
            full.push(open.remove(at));
        }
    }
    full.extend(open);
    full
}

/// `1 - beta^t = -expm1(t ln beta)`: a series below `|x| = 1/2` (ten terms, Horner), so a
/// `beta^t` close to 1 does not cancel; `1 - exp(x)` beyond. `ln beta = -inf` gives 1.
#[cube]
fn one_minus_pow(ln_beta: f32, t: f32) -> f32 {
    let x = t * ln_beta;
    let mut r = 1.0f32 - f32::exp(x);
    if x > -0.5f32 {
        let mut s = 1.0f32;
        #[unroll]
        for k in 0..10u32 {
            s = 1.0f32 + x * s / f32::cast_from(11 - k);
        }
        r = -x * s;
    }
    r
}

/// The slot of `cube`: the last of the launch's first `slots` (comptime) whose first cube
/// (word 0 of its `SLOT_WORDS` in `table`) is `<= cube`.
#[cube]
pub(super) fn slot_of(table: &Array<u32>, cube: u32, #[comptime] slots: u32) -> u32 {
    let mut b = 0u32;
    #[unroll]
    for s in 1..slots {
        b = select(
            cube >= table[(s * comptime!(SLOT_WORDS as u32)) as usize],
            s,
            b,
        );
    }
    b
}

/// `slots[b][i]` for a slot index known only at run time (WGSL has no arrays of buffers),
/// among the launch's first `slots` (comptime): one slot reads without a branch. Why it
/// matters: lavapipe runs every branch masked, so each slot costs a load (a 4-wide copy
/// through a six-way pick ran at 0.61-0.66 of the plain copy).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn select_slot<F: Float, N: Size>(
    s0: &Array<Vector<F, N>>,
    s1: &Array<Vector<F, N>>,
    s2: &Array<Vector<F, N>>,
    s3: &Array<Vector<F, N>>,
    s4: &Array<Vector<F, N>>,
    s5: &Array<Vector<F, N>>,
    b: u32,
    i: u32,
    #[comptime] slots: u32,
) -> Vector<F, N> {
    let mut v = Vector::<F, N>::new(F::new(0.0));
    if comptime!(slots == 1) {
        v = s0[i as usize];
    } else {
        if b == 0 {
            v = s0[i as usize];
        }
        if b == 1 {
            v = s1[i as usize];
        }
        if comptime!(slots > 2) {
            if b == 2 {
                v = s2[i as usize];
            }
        }
        if comptime!(slots > 3) {
            if b == 3 {
                v = s3[i as usize];
            }
        }
        if comptime!(slots > 4) {
            if b == 4 {
                v = s4[i as usize];
            }
        }
        if comptime!(slots > 5) {
            if b == 5 {
                v = s5[i as usize];
            }
        }
    }
    v
}

/// `slots[b][i] = v` among the launch's first `slots` (comptime), as [`select_slot`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_slot<F: Float, N: Size>(
    s0: &mut Array<Vector<F, N>>,
    s1: &mut Array<Vector<F, N>>,
    s2: &mut Array<Vector<F, N>>,
    s3: &mut Array<Vector<F, N>>,
    s4: &mut Array<Vector<F, N>>,
    s5: &mut Array<Vector<F, N>>,
    b: u32,
    i: u32,
    v: Vector<F, N>,
    #[comptime] slots: u32,
) {
    if comptime!(slots == 1) {
        s0[i as usize] = v;
    } else {
        if b == 0 {
            s0[i as usize] = v;
        }
        if b == 1 {
            s1[i as usize] = v;
        }
        if comptime!(slots > 2) {
            if b == 2 {
                s2[i as usize] = v;
            }
        }
        if comptime!(slots > 3) {
            if b == 3 {
                s3[i as usize] = v;
            }
        }
        if comptime!(slots > 4) {
            if b == 4 {
                s4[i as usize] = v;
            }
        }
        if comptime!(slots > 5) {
            if b == 5 {
                s5[i as usize] = v;
            }
        }
    }
}

/// The sum of a vector's lanes.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let width = N::value().comptime() as u32;
    let mut s = 0.0f32;
    #[unroll]
    for l in 0..width {
        s += v[l as usize];
    }
    s
}

slot_kernel! {
    /// The fused step over up to six slots (see the module doc): each unit updates one
    /// `N`-wide vector of one slot's elements (`N` = 4 when every slot of the launch is
    /// 4-aligned: lengths, columns, row strides and offsets; else 1: the `width` array's
    /// length caps it), each cube within one slot. Table entries are in elements.
    /// `t = counter[0] + 1`. f32 arithmetic throughout; with `master` the state's master
    /// copy is the parameter and the weight receives its rounding. In place: one
    /// configuration, so the autotuner never runs it twice. `phase` = `Norms` (LAMB,
    /// AdaGrad-Norm) writes the cube's sums of squares to `partials[2 cube ..]` instead of
    /// the weight.
    #[kernel(
        tune(UNITS = [256], PER = [4]),
        vector = [4, 1],
        key(len = pow2, dtype),
        grid = cubes(cubes),
        cube = UNITS,
        domain(slots = 1..=6)
    )]
    pub fn optim_step(
        state: &mut Array<Vector<f32, N>>,
        width: &Array<Vector<f32, N>>,
        table: &Array<u32>,
        counter: &Array<u32>,
        partials: &mut Array<f32>,
        len: u32,
        cubes: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        beta3: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        one_minus_beta3: f32,
        ln_beta1: f32,
        ln_beta2: f32,
        ln_beta3: f32,
        eps: f32,
        weight_decay: f32,
        decay_before: f32,
        decay_after: f32,
        #[comptime] rule: Rule,
        #[comptime] master: bool,
        #[comptime] phase: Phase,
        #[comptime] slots: u32,
        #[comptime] strided: bool,
        #[comptime] sums: Sums,
    ) {
        let _ = width[0];
        let nw = N::value().comptime() as u32;
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        // The slot and its constants before any branch: the addresses are uniform in the
        // cube, so a CPU adapter loads each once (inside control flow it gathers per lane).
        let b = slot_of(table, cube, slots);
        let t = b * comptime!(SLOT_WORDS as u32);
        // The slot's first cube, its length in elements and vectors, its weight layout and
        // state base.
        let first_cube = table[t as usize];
        let n = table[(t + 1) as usize];
        let nv = n / nw;
        let cols = table[(t + 2) as usize];
        let ld = table[(t + 3) as usize];
        let w_off = table[(t + 4) as usize];
        let base = table[(t + 5) as usize];
        // Per-element states `stride` apart (the slot's length rounded up to 4); `start`:
        // where this part of the slot begins (a ragged slot's 4-wide body and its tail).
        let stride = table[(t + 6) as usize];
        let start = table[(t + 7) as usize];
        let sv = stride / nw;
        let step = counter[0];
        if cube < cubes {
            // A whole row-major weight (or a rows block): no division per vector. `strided`
            // (comptime: a column block in the launch) because lavapipe would compute the
            // division of an untaken branch anyway.
            let contiguous = ld == cols;
            // Per-element states at base + j stride + e, scalars at base + K stride + j,
            // master after (all 4-aligned when N = 4: the host pads slot offsets and
            // strides, and refuses N = 4 for a master copy behind per-tensor scalars).
            let k = comptime!(rule.element_states() as u32);
            let scalars_at = base + k * stride;
            let tf = f32::cast_from(step + 1);
            let moments = adam_constants(
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                ln_beta1,
                ln_beta2,
                eps,
                tf,
            );
            // Adan's other bias corrections, also once per unit.
            let mut adan_bc2 = 1.0f32;
            let mut adan_sqrt_bc3 = 1.0f32;
            if comptime!(rule == Rule::Adan) {
                adan_bc2 = one_minus_pow(ln_beta2, tf);
                adan_sqrt_bc3 = f32::sqrt(one_minus_pow(ln_beta3, tf));
            }
            let zero = Vector::<f32, N>::new(0.0);
            let wd = Vector::<f32, N>::new(weight_decay);
            let mut sq0 = 0.0f32;
            let mut sq1 = 0.0f32;
            // Each unit updates PER vectors, UNITS apart (consecutive units touch consecutive
            // vectors): the slot lookup and the step's constants are paid once per PER.
            #[unroll]
            for rep in 0..PER {
                let e = (cube - first_cube) * comptime!(UNITS * PER) + rep * UNITS + UNIT_POS;
                let inside = e < nv;
                // Out-of-slot units read vector 0 (a slot has one, or no cube) and add nothing.
                let ei = select(inside, e, 0u32);
                let first = ei * nw;
                let mut w_at = (w_off + first) / nw;
                if comptime!(strided) {
                    if !contiguous {
                        w_at = (w_off + (first / cols) * ld + first % cols) / nw;
                    }
                }
                let s_at = (base + start) / nw + ei;
                let master_at =
                    (scalars_at + comptime!(rule.scalar_states() as u32) + start) / nw + ei;
                let mut g = zero;
                let mut p = zero;
                if inside {
                    g = Vector::<f32, N>::cast_from(select_slot(
                        g0, g1, g2, g3, g4, g5, b, start / nw + ei, slots,
                    ));
                    if comptime!(master) {
                        p = state[master_at as usize];
                    }
                    if comptime!(!master) {
                        p = Vector::<f32, N>::cast_from(select_slot(
                            w0, w1, w2, w3, w4, w5, b, w_at, slots,
                        ));
                    }
                }
                if comptime!(phase == Phase::Norms) {
                    if inside {
                        if comptime!(rule == Rule::Lamb) {
                            let mv = advance_moments(state, s_at, sv, g, moments, false);
                            let r = adam_direction_of(mv.m, mv.v, moments) + wd * p;
                            sq0 += lane_sum(p * p);
                            sq1 += lane_sum(r * r);
                        }
                        if comptime!(rule == Rule::AdaGradNorm) {
                            let gg = g + wd * p;
                            sq0 += lane_sum(gg * gg);
                        }
                    }
                }
                if comptime!(phase == Phase::Update) {
                    if inside {
                        p *= Vector::<f32, N>::new(decay_before);
                        if comptime!(rule == Rule::AdamW || rule == Rule::AdaBelief) {
                            let belief = comptime!(rule == Rule::AdaBelief);
                            let mv = advance_moments(state, s_at, sv, g, moments, belief);
                            p -= Vector::<f32, N>::new(lr) * adam_direction_of(mv.m, mv.v, moments);
                        }
                        if comptime!(rule == Rule::Adan) {
                            // The difference is 0 at the first step (grad_prev is not yet a gradient).
                            let mut delta = g - state[(s_at + 3 * sv) as usize];
                            if step == 0 {
                                delta = zero;
                            }
                            let m = Vector::<f32, N>::new(beta1) * state[s_at as usize]
                                + Vector::<f32, N>::new(one_minus_beta1) * g;
                            let d = Vector::<f32, N>::new(beta2) * state[(s_at + sv) as usize]
                                + Vector::<f32, N>::new(one_minus_beta2) * delta;
                            let u = g + Vector::<f32, N>::new(beta2) * delta;
                            let nn = Vector::<f32, N>::new(beta3) * state[(s_at + 2 * sv) as usize]
                                + Vector::<f32, N>::new(one_minus_beta3) * u * u;
                            let den = Vector::sqrt(nn) / Vector::<f32, N>::new(adan_sqrt_bc3)
                                + Vector::<f32, N>::new(eps);
                            p -= Vector::<f32, N>::new(lr / moments.bc1) * m / den
                                + Vector::<f32, N>::new(lr * beta2 / adan_bc2) * d / den;
                            state[s_at as usize] = m;
                            state[(s_at + sv) as usize] = d;
                            state[(s_at + 2 * sv) as usize] = nn;
                            state[(s_at + 3 * sv) as usize] = g;
                        }
                        if comptime!(rule == Rule::AdaGrad) {
                            let gg = g + wd * p;
                            let v = state[s_at as usize] + gg * gg;
                            p -= Vector::<f32, N>::new(lr) * gg
                                / (Vector::sqrt(v) + Vector::<f32, N>::new(eps));
                            state[s_at as usize] = v;
                        }
                        if comptime!(rule == Rule::Lamb) {
                            // The moments were advanced by the norms pass; the same r again.
                            let r = adam_direction_of(
                                state[s_at as usize],
                                state[(s_at + sv) as usize],
                                moments,
                            ) + wd * p;
                            let w_norm = f32::sqrt(partials[(2 * b) as usize]);
                            let r_norm = f32::sqrt(partials[(2 * b + 1) as usize]);
                            let trust = select(w_norm > 0.0 && r_norm > 0.0, w_norm / r_norm, 1.0f32);
                            p -= Vector::<f32, N>::new(lr * trust) * r;
                        }
                        if comptime!(rule == Rule::AdaGradNorm) {
                            // b2 was advanced by the slot reduction; it sits 4-aligned (lane 0)
                            // or alone (N = 1).
                            let b2 = state[(scalars_at / nw) as usize][0];
                            let gg = g + wd * p;
                            p -= Vector::<f32, N>::new(lr / (f32::sqrt(b2) + eps)) * gg;
                        }
                        p *= Vector::<f32, N>::new(decay_after);
                        if comptime!(master) {
                            state[master_at as usize] = p;
                        }
                        let out = Vector::<F, N>::cast_from(p);
                        store_slot(w0, w1, w2, w3, w4, w5, b, w_at, out, slots);
                    }
                }
            }
            if comptime!(phase == Phase::Norms) {
                // Past the slots' totals (`2 SLOTS` words): one pair per unit, or per cube.
                let totals = comptime!(2 * SLOTS as u32);
                if comptime!(sums == Sums::PerUnit) {
                    let at = totals + 2 * (cube * UNITS + UNIT_POS);
                    partials[at as usize] = sq0;
                    partials[(at + 1) as usize] = sq1;
                } else {
                    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
                    let total0 = cube_sum(&mut smem, sq0, UNITS);
                    let total1 = cube_sum(&mut smem, sq1, UNITS);
                    if UNIT_POS == 0 {
                        partials[(totals + 2 * cube) as usize] = total0;
                        partials[(totals + 2 * cube + 1) as usize] = total1;
                    }
                }
            }
        }
    }
}

/// Adam's constants at one step in a kernel: the decays and `1 − β` (from f64 on the
/// host), `eps`, and the bias corrections `1 − β1^t` and `sqrt(1 − β2^t)` (formed once
/// per unit by [`adam_constants`], not per element).
#[derive(CubeType, Clone, Copy)]
pub(super) struct Moments {
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub bc1: f32,
    pub sqrt_bc2: f32,
}

/// [`Moments`] at step `t` (1-based, as f32) from the decays, `1 − β`, `ln β` and `eps`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn adam_constants(
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    eps: f32,
    t: f32,
) -> Moments {
    Moments {
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        bc1: one_minus_pow(ln_beta1, t),
        sqrt_bc2: f32::sqrt(one_minus_pow(ln_beta2, t)),
    }
}

/// Adam's first and second moments after a step.
#[derive(CubeType, Clone, Copy)]
pub(super) struct AdamMoments<N: Size> {
    pub m: Vector<f32, N>,
    pub v: Vector<f32, N>,
}

/// The moments `m`, `v` advanced by `g`: Adam's `v` of `g²`, or with `belief`
/// AdaBelief's `s` of `(g − m)²` plus `eps`.
#[cube]
pub(super) fn adam_moments_of<N: Size>(
    m: Vector<f32, N>,
    v: Vector<f32, N>,
    g: Vector<f32, N>,
    c: Moments,
    #[comptime] belief: bool,
) -> AdamMoments<N> {
    let m = Vector::<f32, N>::new(c.beta1) * m + Vector::<f32, N>::new(c.one_minus_beta1) * g;
    let mut d = g;
    if comptime!(belief) {
        d = g - m;
    }
    let mut v =
        Vector::<f32, N>::new(c.beta2) * v + Vector::<f32, N>::new(c.one_minus_beta2) * d * d;
    if comptime!(belief) {
        v += Vector::<f32, N>::new(c.eps);
    }
    AdamMoments::<N> { m, v }
}

/// The bias-corrected Adam direction `m̂ / (sqrt(v̂) + eps)` at `c`'s step (AdamW's and
/// AdaBelief's step over `lr`, LAMB's `r` before its decay term, FRUGAL's active
/// coordinates).
#[cube]
pub(super) fn adam_direction_of<N: Size>(
    m: Vector<f32, N>,
    v: Vector<f32, N>,
    c: Moments,
) -> Vector<f32, N> {
    m / Vector::<f32, N>::new(c.bc1)
        / (Vector::sqrt(v) / Vector::<f32, N>::new(c.sqrt_bc2) + Vector::<f32, N>::new(c.eps))
}

/// [`adam_moments_of`] on the vectors `state[s_at]`, `state[s_at + nv]`, in place; returns
/// the new moments.
#[cube]
fn advance_moments<N: Size>(
    state: &mut Array<Vector<f32, N>>,
    s_at: u32,
    nv: u32,
    g: Vector<f32, N>,
    c: Moments,
    #[comptime] belief: bool,
) -> AdamMoments<N> {
    let mv = adam_moments_of(
        state[s_at as usize],
        state[(s_at + nv) as usize],
        g,
        c,
        belief,
    );
    state[s_at as usize] = mv.m;
    state[(s_at + nv) as usize] = mv.v;
    mv
}

/// [`adam_moments_of`] on scalar state at `state[s_at]`, `state[s_at + n]`, in place.
#[cube]
pub(super) fn adam_moments(
    state: &mut Array<f32>,
    s_at: u32,
    n: u32,
    g: f32,
    c: Moments,
    #[comptime] belief: bool,
) {
    let mv = adam_moments_of::<Const<1>>(
        Vector::new(state[s_at as usize]),
        Vector::new(state[(s_at + n) as usize]),
        Vector::new(g),
        c,
        belief,
    );
    state[s_at as usize] = mv.m[0];
    state[(s_at + n) as usize] = mv.v[0];
}

/// [`adam_direction_of`] on scalar state at `state[s_at]`, `state[s_at + n]`.
#[cube]
pub(super) fn adam_direction(state: &Array<f32>, s_at: u32, n: u32, c: Moments) -> f32 {
    adam_direction_of::<Const<1>>(
        Vector::new(state[s_at as usize]),
        Vector::new(state[(s_at + n) as usize]),
        c,
    )[0]
}

/// Per-slot sums of the step kernel's per-cube partials (`Phase::Norms`; `per_cube`
/// elements per cube), one cube per slot, in a fixed order: LAMB's `||p||^2, ||r||^2` to `partials[2 cubes + 2 slot ..]`;
/// AdaGrad-Norm's `||g||^2` added to the slot's `b2`. Unused slots do nothing.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (6), cube = UNITS)]
pub fn optim_slot_norms(
    partials: &mut Array<f32>,
    state: &mut Array<f32>,
    table: &Array<u32>,
    cubes: u32,
    per_cube: u32,
    sums_per_cube: u32,
    #[comptime] rule: Rule,
) {
    let t = CUBE_POS_X * comptime!(SLOT_WORDS as u32);
    let first = table[t as usize];
    if first < cubes {
        let n = table[(t + 1) as usize];
        let count = (n + per_cube - 1) / per_cube * sums_per_cube;
        let base = comptime!(2 * SLOTS as u32) + 2 * first * sums_per_cube;
        let mut s0 = 0.0f32;
        let mut s1 = 0.0f32;
        let mut i = UNIT_POS;
        while i < count {
            s0 += partials[(base + 2 * i) as usize];
            s1 += partials[(base + 2 * i + 1) as usize];
            i += UNITS;
        }
        let mut smem = SharedMemory::<f32>::new(UNITS as usize);
        let total0 = cube_sum(&mut smem, s0, UNITS);
        let total1 = cube_sum(&mut smem, s1, UNITS);
        if UNIT_POS == 0 {
            if comptime!(rule == Rule::AdaGradNorm) {
                let at = table[(t + 5) as usize]
                    + comptime!(rule.element_states() as u32) * table[(t + 6) as usize];
                state[at as usize] += total0;
            }
            if comptime!(rule != Rule::AdaGradNorm) {
                partials[(2 * CUBE_POS_X) as usize] = total0;
                partials[(2 * CUBE_POS_X + 1) as usize] = total1;
            }
        }
    }
}

/// `counter[0] += 1`, one unit: ordered after the step's launches on the stream.
#[kiln_macros::kernel(tune(UNITS = [1]), grid = (1), cube = UNITS)]
pub fn optim_advance_step(counter: &mut Array<u32>) {
    if UNIT_POS == 0 {
        counter[0] = counter[0] + 1;
    }
}
