//! The fused multi-tensor step: one launch updates up to [`SLOTS`] tensors (or blocks of
//! tensors) of different sizes in place, with their optimizer state packed in one f32
//! buffer and the step counter on the device.
//!
//! Slots: WGSL has no arrays of buffers, so the launch binds [`SLOTS`] weights and
//! [`SLOTS`] gradients as separate arguments (unused ones get a one-element placeholder),
//! plus the state, a table, the step counter and the partial sums: 18 storage buffers
//! with cubecl's `info` (Vulkan, Metal and D3D12 drivers allow at least 31; the kernel
//! macro refuses a launch past the device's count with a clear error).
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
//!
//! Spans: where the weights are disjoint whole views of one buffer (a `FlatLayout`'s)
//! and the gradients views of one buffer at the same offsets, a launch binds each buffer
//! once (`w0`, `g0`) and takes any number of slots, each at its offset; a cube finds its
//! slot by a binary search of the table. One launch per kind for hundreds of tensors.
//!
//! Files: this one is the host side (state layout, parts, grouping, launches; about 580
//! lines, one concept: the layout and the launches must agree line for line); the
//! kernels are in `step`, the slot machinery shared with FRUGAL in `slots`, Adam's
//! in-kernel helpers in `adam`, [`Block`] in `block`.

use super::block::Block;
use super::rules::{Hyper, Rule};
use super::slots::{kind_groups, launch_groups, slot_args, Spans, SLOTS, SLOT_WORDS};
use super::step::{
    OptimAdvanceStep, OptimAdvanceStepArgs, OptimSlotNorms, OptimSlotNormsArgs, OptimStep,
    OptimStepArgs, Phase, Sums, NORMS_REPS, STEP_PER, STEP_UNITS,
};
use crate::launch::{check_input, expect_shape, shape_err, upload_u32};
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};
use std::collections::hash_map::Entry;

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
    /// Kernel launches of the last step.
    launches: usize,
    sums: Sums,
    cache: std::sync::Mutex<LaunchCache>,
}

/// Device buffers a launch binds besides the weights, gradients, state and counter, kept
/// across steps (AdamW over 200 aligned tensors on lavapipe spent most of its step making
/// them: 13 placeholders, a guard, a table and a partials buffer per launch).
/// A launch group: its parts' (slot, start) pairs, what it sums, and in a span launch
/// its slots' offsets in the span.
type GroupKey = (Vec<(usize, usize)>, Sums, Option<Vec<usize>>);

/// Launch groups whose tables a [`MultiTensorStep`] keeps (a list's groups: one per six
/// tensors and kind, or per kind for views).
pub(super) const MAX_CACHED_GROUPS: usize = 4096;

#[derive(Default)]
struct LaunchCache {
    /// Per group of parts (their slots and starts; and `Sums`): its slot tables (the
    /// update's, the norms pass's), partial sums buffer and per-slot totals (LAMB's norms).
    groups: std::collections::HashMap<GroupKey, (Tensor, Tensor, Tensor, Tensor)>,
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
        if state.len() != weights.len() {
            return Err(Error::Param {
                param: "state".into(),
                expected: format!("one entry (or None) per weight, {}", weights.len()),
                found: state.len().to_string(),
            });
        }
        // The kernel's step counter is u32 and counts the step being taken (`steps + 1`).
        if steps >= u64::from(u32::MAX) {
            return Err(Error::Param {
                param: "step".into(),
                expected: format!("the step being taken at most {} (a u32 counter)", u32::MAX),
                found: (u128::from(steps) + 1).to_string(),
            });
        }
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
            let name = super::param_name(weights.len(), "param", i);
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
            if !s.master() && given.as_ref().is_some_and(|g| g.master.is_some()) {
                // An f32 weight is its own master: a given copy would be ignored.
                return Err(Error::Param {
                    param: "master".into(),
                    expected: format!(
                        "none for an f32 parameter (only f16/bf16 parameters keep an f32 master copy; `{name}` is f32)"
                    ),
                    found: "a master tensor".into(),
                });
            }
            if s.master() {
                match given.as_ref().and_then(|g| g.master) {
                    Some(m) => host.extend(read_as(m, "master", &s.shape(), "the block's shape")?),
                    None => host.extend(block_values(w, &s)?),
                }
            }
            slots.push(s);
        }
        host.resize(host.len().next_multiple_of(4).max(4), 0.0);
        // The kernels index the packed state in 32 bits.
        super::slots::table_words(vec![host.len()])?;
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
            launches: 0,
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

    /// Kernel launches of the last step, the step counter's included (0 before one).
    pub fn launches(&self) -> usize {
        self.launches
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
    /// [`SLOTS`] blocks of one dtype, one vector width and distinct weights (one per
    /// vector width for views of one buffer with gradients at the same offsets; three for
    /// the rules with per-tensor norms; a contiguous block whose length is not a multiple
    /// of 4 counts as two, its 4-wide body and its tail), and one to advance the step
    /// counter. No host synchronisation.
    pub fn step(&mut self, weights: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let n = self.slots.len();
        super::expect_list(n, weights.len(), grads.len())?;
        for (i, (s, (w, g))) in self.slots.iter().zip(weights.iter().zip(grads)).enumerate() {
            let (wn, gn) = (
                super::param_name(n, "param", i),
                super::param_name(n, "grad", i),
            );
            check_input(&wn, w, self.state.client())?;
            w.expect_dtype(&wn, &[s.dtype])?;
            expect_shape(&wn, w, &s.weight, "as created")?;
            check_input(&gn, g, self.state.client())?;
            g.expect_dtype(&gn, &[s.dtype])?;
            expect_shape(&gn, g, &s.shape(), "the block's shape")?;
        }
        super::no_gradient_overlaps_a_weight(weights, grads)?;
        self.hyper.check(self.rule)?;
        if self.steps + 1 > u64::from(u32::MAX) {
            return Err(Error::Param {
                param: "step".into(),
                expected: format!("the step being taken at most {} (a u32 counter)", u32::MAX),
                found: (self.steps + 1).to_string(),
            });
        }
        // Launches of up to SLOTS blocks sharing a dtype and a vector width (so that a
        // ragged block does not hold its neighbours to one element a unit), in order
        // within each kind, never the same weight twice in one launch (its bindings
        // would alias); for the views of one flat buffer, one launch per kind.
        let parts = parts_of(self.rule, &self.slots);
        let kind = |j: usize| (self.slots[parts[j].slot].dtype, self.aligned(parts[j]));
        let spans = self.spans(weights, grads);
        let groups = match spans {
            Some(_) => kind_groups(0..parts.len(), kind),
            None => {
                let part_weights: Vec<&Tensor> = parts.iter().map(|p| weights[p.slot]).collect();
                launch_groups(0..parts.len(), kind, &part_weights)
            }
        };
        let mut launches = 1;
        for group in groups {
            let group: Vec<Part> = group.iter().map(|&j| parts[j]).collect();
            launches += self.launch(&group, weights, grads, spans.as_ref())?;
        }
        self.launches = launches;
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

    /// The weights and gradients as spans where a span launch can take them all: more
    /// than one slot, each a whole weight of one dtype, the weights disjoint views of one
    /// buffer and the gradients views of one buffer at the same offsets.
    fn spans(&self, weights: &[&Tensor], grads: &[&Tensor]) -> Option<Spans> {
        let whole = self
            .slots
            .iter()
            .all(|s| s.shape() == s.weight && s.dtype == self.slots[0].dtype);
        // LAMB's and AdaGrad-Norm's slot reduction runs a cube per tensor, in one grid
        // dimension.
        let max_slots = match self.rule.needs_norms() {
            true => self.state.client().report().max_cube_count.0 as usize,
            false => usize::MAX,
        };
        match whole {
            true => Spans::of(weights, grads, max_slots),
            false => None,
        }
    }

    /// One launch of the step over the parts `group` (at most [`SLOTS`], one dtype,
    /// distinct weights; any number in one `spans` launch); three for the rules with
    /// per-tensor norms. Returns the launches made (0 for an empty group).
    fn launch(
        &self,
        group: &[Part],
        weights: &[&Tensor],
        grads: &[&Tensor],
        spans: Option<&Spans>,
    ) -> Result<usize> {
        let client = self.state.client();
        let parts: Vec<(Part, &Slot)> = group.iter().map(|&p| (p, &self.slots[p.slot])).collect();
        let dtype = parts[0].1.dtype;
        // 4-wide when every part is aligned; else one element a unit.
        let width = match group.iter().all(|&p| self.aligned(p)) {
            true => 4,
            false => 1,
        };
        let per_cube = STEP_UNITS * STEP_PER * width;
        let strided = parts.iter().any(|(_, s)| !s.contiguous());
        let len: usize = parts.iter().map(|(p, _)| p.len).sum();
        // Slots in the table: SLOTS (unused ones start past the last cube), or a span
        // launch's parts, as many as there are.
        let nslots = match spans {
            Some(_) => parts.len(),
            None => SLOTS,
        };
        // The slot table for `per_cube` elements a cube, and the cube count.
        let slot_table = |per_cube: usize| -> Result<(Vec<u32>, usize)> {
            let mut table = Vec::with_capacity(SLOT_WORDS * SLOTS.max(parts.len()));
            let mut cubes = 0usize;
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
                    spans.map_or(0, |sp| sp.offsets[p.slot]) + s.weight_offset() + p.start,
                    s.offset,
                    s.stride(),
                    p.start,
                ]);
                cubes += p.len.div_ceil(per_cube);
            }
            // Unused slots start past the last cube: no cube selects them.
            while table.len() < SLOT_WORDS * nslots {
                table.extend([u32::MAX as usize, 0, 1, 1, 0, 0, 0, 0]);
            }
            Ok((super::slots::table_words(table)?, cubes))
        };
        let (table, cubes) = slot_table(per_cube)?;
        // The norms pass's own layout where its units take NORMS_REPS times more vectors.
        let norms_per_cube = match self.sums {
            Sums::PerUnit => per_cube * NORMS_REPS,
            Sums::PerCube => per_cube,
        };
        let (norms_table, norms_cubes) = slot_table(norms_per_cube)?;
        if len == 0 {
            return Ok(0);
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
        // Partial sums of squares past `2 SLOTS` words: a pair per unit, or two pairs per
        // cube (the second zero), so that each cube's start is 4-aligned for the slot
        // reduction's 4-wide reads.
        let sums_per_cube = match self.sums {
            Sums::PerCube => 2,
            Sums::PerUnit => STEP_UNITS,
        };
        // The group's table, partial sums, placeholders and guard: made at its first step,
        // then reused (each is a round trip to the device's server thread to create).
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = (
            group.iter().map(|p| (p.slot, p.start)).collect(),
            self.sums,
            spans.map(|sp| group.iter().map(|p| sp.offsets[p.slot]).collect()),
        );
        if cache.groups.len() >= MAX_CACHED_GROUPS && !cache.groups.contains_key(&key) {
            // Layouts that change from step to step (views of other buffers each time)
            // would add entries without end: start over.
            cache.groups.clear();
        }
        if let Entry::Vacant(slot) = cache.groups.entry(key.clone()) {
            // The partial sums, and the per-slot totals the reduction leaves for the update.
            let (partials, totals) = match self.rule.needs_norms() {
                true => (
                    Tensor::empty(
                        client,
                        DType::F32,
                        &[2 * SLOTS + 2 * norms_cubes * sums_per_cube],
                    )?,
                    Tensor::empty(client, DType::F32, &[2 * nslots])?,
                ),
                false => (
                    crate::launch::absent(client)?,
                    crate::launch::absent(client)?,
                ),
            };
            let table = upload_u32(client, "slot_table", &table)?;
            let norms_table = match self.rule.needs_norms() && norms_per_cube != per_cube {
                true => upload_u32(client, "slot_table", &norms_table)?,
                false => table.clone(),
            };
            slot.insert((table, norms_table, partials, totals));
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
        let (table, norms_table, partials, totals) = cache.groups[&key].clone();
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
        let (w, g): (Vec<Tensor>, Vec<Tensor>) = match spans {
            // Both spans in binding 0, up to the group's last element (a multiple of 4 in
            // a 4-wide launch).
            Some(sp) => {
                let end = parts
                    .iter()
                    .map(|(p, s)| sp.offsets[p.slot] + s.weight_offset() + p.start + p.len)
                    .max()
                    .unwrap_or(0);
                sp.bind(end, &ph)?
            }
            None => (
                (0..SLOTS)
                    .map(|i| slot(i, weights, false))
                    .collect::<Result<_>>()?,
                (0..SLOTS)
                    .map(|i| slot(i, grads, true))
                    .collect::<Result<_>>()?,
            ),
        };
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
            let (partials, table, cubes) = match phase {
                Phase::Norms => (&partials, &norms_table, norms_cubes),
                Phase::Update => (&totals, &table, cubes),
            };
            OptimStep::tuned(
                client,
                0.0,
                &slot_args!(OptimStepArgs, w, g, {
                    state: &self.state,
                    width: &guard,
                    table,
                    counter: &self.counter,
                    partials,
                    len: len as u32,
                    cubes: cubes as u32,
                    nslots: nslots as u32,
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
                    slots: match spans {
                        Some(_) => 1,
                        None => group.len() as u32,
                    },
                    strided,
                    sums: self.sums,
                    spans: spans.is_some(),
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
                    totals: &totals,
                    state: &self.state,
                    table: &norms_table,
                    nslots: nslots as u32,
                    cubes: norms_cubes as u32,
                    per_cube: norms_per_cube as u32,
                    sums_per_cube: sums_per_cube as u32,
                    rule: self.rule,
                },
            )?;
            step(Phase::Update)?;
            return Ok(3);
        }
        step(Phase::Update)?;
        Ok(1)
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
