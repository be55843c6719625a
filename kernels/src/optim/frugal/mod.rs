//! FRUGAL (Zmushko et al., 2024), its coordinate and blockwise variants: Adam state only
//! on a seeded subset of each tensor's coordinates — `k = ceil(density · n)` single
//! coordinates, or whole rows or columns of the tensor seen as a matrix — or on whole
//! tensors of the list in turn ([`Subspace`]), signSGD on the rest, the subsets redrawn
//! every `update_gap` steps (and their state reset to zero):
//!
//! ```text
//! p *= 1 - lr wd                                   (decoupled, every coordinate)
//! active:   m, v as Adam;  p -= lr m̂ / (sqrt(v̂) + eps)   (t counts from the redraw)
//! inactive: p -= lr_free sign(g)                   (sign(0) = 0)
//! ```
//!
//! Subspace `j` (steps `j·gap + 1 ..= (j+1)·gap`) of tensor `i` is the `k` coordinates
//! (rows, columns) with the largest Philox words of `(seed_of(i), stream j)`, by the
//! exact device selection of the compressors (`super::topk`): a uniformly random subset,
//! the same on every backend, independent between the tensors of a list. Rows and
//! columns are expanded to their coordinates once per redraw; the step is the same
//! masked kernel for every variant.
//!
//! Multi-tensor: one [`Frugal`] updates a list of f32, f16 or bf16 tensors of any sizes.
//! The subsets, their bitmasks (one u32 per 32 coordinates) and the moments of every
//! tensor are packed each in one buffer; a step is two launches per [`SLOTS`] tensors of
//! one dtype (the slot machinery of the fused step, `super::slots`: each cube within one
//! tensor; views of one flat buffer with gradients at the same offsets: two launches per
//! vector width, whatever the count, as the fused step's span launches) and one to
//! advance the device step counter: signSGD over the coordinates whose
//! mask bit is clear, then Adam over the state slots, slot `s` being the subset's `s`-th
//! coordinate (its moments contiguous). A redraw selects each tensor's subset (a device
//! radix select per tensor, every `update_gap` steps) and packs it with its mask; the
//! step after it (device counter 0) starts the moments from zero. State: `8k` bytes of
//! moments, `n/8` of mask, `4k` of indices per tensor — at density 0.25, 40% of Adam's
//! `8n` — and for an f16/bf16 tensor an f32 master copy (`4n` bytes,
//! behind its moments), which is what is updated (the tensor receives its rounding: a
//! step smaller than half an ulp of the half value is not lost).
//!
//! Longer than most files: the optimizer's host side in the order of a step (subsets and
//! redraws, grouping into launches, resuming); its kernels are in `kernels.rs`.

mod kernels;
mod svd;

pub use kernels::*;
pub use svd::*;

use super::adam::{adam_constants, adam_direction_of, adam_moments_of};
use super::slots::{
    kind_groups, launch_groups, segment_of, select_slot, slot_args, slot_kernel, slot_of,
    store_slot, Spans, SLOTS, SLOT_WORDS,
};
use super::topk::{contiguous_regions, select_top_k, KeySource};
use super::{param_name, Hyper, Rule};
use crate::launch::{check_input, expect_shape, upload_u32};
use cubecl::prelude::*;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};
use std::collections::HashMap;

/// Units per cube of the FRUGAL kernels (their one configuration, `UNITS = [256]`).
const CUBE: usize = 256;

/// Coordinates per unit of the step (its one configuration, `PER = [4]`).
const STEP_PER: usize = 4;

kiln_runtime::comptime_enum! {
    /// Which coordinates of a tensor FRUGAL's state-full subset is made of (FRUGAL's
    /// `coord_choice`). A tensor of rank 2 or more is seen as the matrix
    /// `[shape[0], numel / shape[0]]` (a linear layer's `[out, in]` weight as it is); a
    /// vector (rank 0 or 1) is one row.
    pub enum Subspace {
        /// `ceil(density · n)` single coordinates (random-coordinate FRUGAL, RandK).
        Coordinates = "coordinates",
        /// `ceil(density · rows)` whole rows (a vector: all of it).
        Rows = "rows",
        /// `ceil(density · columns)` whole columns, the same in every row (FRUGAL's
        /// default for linear weights).
        Columns = "columns",
        /// `ceil(density · T)` whole tensors of the list of `T` (FRUGAL's blockwise
        /// projection, BAdam-like, random block order): those hold Adam state on every
        /// coordinate, the others none; the state is laid out anew at each redraw.
        Blocks = "blocks",
        /// The leading `ceil(density · min(rows, cols))` singular vectors of the
        /// gradient (FRUGAL's SVD projection, GaLore's subspace): Adam on the projected
        /// gradient, signSGD on the residual. [`FrugalSvd`] (not [`Frugal`]) steps it.
        Svd = "svd",
    }
}

kiln_runtime::comptime_enum! {
    /// Which tensors of a list take their turn holding state (the `blocks` subspace; the
    /// authors' `block_order`), `a = ceil(density · T)` of `T` at each redraw `j`.
    pub enum BlockOrder {
        /// The `a` with the largest Philox words of `(seed, stream j)`.
        Random = "random",
        /// `j a, j a + 1, ..` (mod `T`): the list in order, round and round.
        Ascending = "ascending",
        /// `T - 1 - j a, T - 2 - j a, ..` (mod `T`): from the end.
        Descending = "descending",
        /// `a / 2` from each end in turn: `i` and `T - 1 - i` for `i` from `j a / 2` (mod
        /// `T / 2`); `a` and `T` even.
        Mirror = "mirror",
    }
}

/// The matrix FRUGAL's row and column subspaces see a tensor of `shape` as: `(rows,
/// columns)`, `[shape[0], numel / shape[0]]` from rank 2, one row of `numel` below.
pub fn frugal_matrix(shape: &[usize]) -> (usize, usize) {
    let n: usize = shape.iter().product();
    match shape {
        [rows, _, ..] if *rows > 0 => (*rows, n / rows),
        [_, _, ..] => (0, 0),
        _ => (1, n),
    }
}

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
    /// Seed of the subsets (of the first tensor; see [`FrugalConfig::seed_of`]).
    pub seed: u64,
    /// What the subsets are made of: coordinates, rows, columns or blocks.
    pub subspace: Subspace,
    /// For blocks: the order in which tensors take their turn.
    pub block_order: BlockOrder,
}

impl Default for FrugalConfig {
    /// Density 0.25, a redraw every 200 steps (the paper's defaults), `lr_free` 1e-3,
    /// seed 0, single coordinates.
    fn default() -> Self {
        FrugalConfig {
            density: 0.25,
            update_gap: 200,
            lr_free: 1e-3,
            seed: 0,
            subspace: Subspace::Coordinates,
            block_order: BlockOrder::Random,
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
        // The step within a subspace is a u32 counter on the device.
        if self.update_gap == 0 || self.update_gap > u64::from(u32::MAX) {
            return Err(bad(
                "update_gap",
                &format!(">= 1 and at most {} (a u32 counter)", u32::MAX),
                self.update_gap.to_string(),
            ));
        }
        // Finite also as the f32 the kernels compute with.
        if !(self.lr_free.is_finite() && self.lr_free >= 0.0 && (self.lr_free as f32).is_finite()) {
            return Err(bad(
                "lr_free",
                "a finite number >= 0 (finite in f32)",
                self.lr_free.to_string(),
            ));
        }
        Ok(())
    }

    /// Coordinates with state for a tensor of `shape`: `ceil(density · n)`, at least 1
    /// (none for an empty tensor); for rows or columns, that many whole lines of
    /// [`frugal_matrix`] times a line's length.
    ///
    /// For blocks: an active tensor's, all of it ([`FrugalConfig::active_tensors`] says
    /// which are). For svd: the elements of each moment, `rank · max(rows, cols)`.
    pub fn active(&self, shape: &[usize]) -> usize {
        let n = shape.iter().product();
        match (self.subspace, self.lines(shape)) {
            (Subspace::Blocks, _) => n,
            (Subspace::Svd, _) => {
                let (rows, cols) = frugal_matrix(shape);
                self.rank(shape) * rows.max(cols)
            }
            (_, Some((lines, taken))) => taken * (n / lines.max(1)),
            (_, None) => self.taken(n),
        }
    }

    /// Which of a list of `count` tensors hold state in subspace `j` (increasing): for
    /// blocks `a = ceil(density · count)` of them in [`FrugalConfig::block_order`]
    /// (random: the largest Philox words of `(seed, stream j)`, the list's seed, not each
    /// tensor's); every tensor otherwise.
    pub fn active_tensors(&self, count: usize, j: u32) -> Vec<usize> {
        if self.subspace != Subspace::Blocks || count == 0 {
            return (0..count).collect();
        }
        let a = self.taken(count);
        let turn = j as usize * a;
        let mut taken: Vec<usize> = match self.block_order {
            BlockOrder::Random => {
                let keys = super::compress::random_keys(count, self.seed, j);
                super::compress::reference_select(&keys, a)
            }
            BlockOrder::Ascending => (0..a).map(|x| (turn + x) % count).collect(),
            BlockOrder::Descending => {
                let start = count - 1 - turn % count;
                (0..a).map(|x| (start + count - x) % count).collect()
            }
            BlockOrder::Mirror => {
                let half = (count / 2).max(1);
                let start = (j as usize * (a / 2)) % half;
                (0..a / 2)
                    .map(|x| (start + x) % half)
                    .flat_map(|i| [i, count - 1 - i])
                    .collect()
            }
        };
        taken.sort_unstable();
        taken.dedup();
        taken
    }

    /// For blocks in mirror order: `a` and the list's length `count` must be even (a
    /// tensor from each end at a time); the error names `block_order`.
    fn check_blocks(&self, count: usize) -> Result<()> {
        let a = self.taken(count);
        if self.subspace == Subspace::Blocks
            && self.block_order == BlockOrder::Mirror
            && (!a.is_multiple_of(2) || !count.is_multiple_of(2))
        {
            return Err(Error::Param {
                param: "block_order".into(),
                expected:
                    "mirror: an even number of tensors and of active ones (ceil(density * tensors))"
                        .into(),
                found: format!("{a} of {count} tensors"),
            });
        }
        Ok(())
    }

    /// For rows or columns: how many lines the tensor has and how many are taken; `None`
    /// for single coordinates and blocks.
    pub fn lines(&self, shape: &[usize]) -> Option<(usize, usize)> {
        let (rows, cols) = frugal_matrix(shape);
        let lines = match self.subspace {
            Subspace::Coordinates | Subspace::Blocks | Subspace::Svd => return None,
            Subspace::Rows => rows,
            Subspace::Columns => cols,
        };
        Some((lines, self.taken(lines)))
    }

    /// The SVD subspace's rank for a tensor of `shape`: `ceil(density · min(rows, cols))`
    /// of [`frugal_matrix`], at least 1 (0 for an empty tensor).
    pub fn rank(&self, shape: &[usize]) -> usize {
        let (rows, cols) = frugal_matrix(shape);
        self.taken(rows.min(cols))
    }

    /// `ceil(density · count)`, at least 1 of a non-empty set. The product is taken
    /// down by a relative 1e-12 first: in f64 `0.07 · 100` is `7.000000000000001`, whose
    /// ceiling took an eighth coordinate (and `0.55 · 200` a 111th row).
    fn taken(&self, count: usize) -> usize {
        match count {
            0 => 0,
            _ => {
                let exact = self.density * count as f64;
                ((exact - exact * 1e-12).ceil() as usize).clamp(1, count)
            }
        }
    }

    /// The seed of the subsets of the `i`-th tensor of a list: `seed + i · 0x9E37_79B9_7F4A_7C15`
    /// (wrapping; splitmix64's increment), so tensor 0 draws from `seed` itself and
    /// tensors of the same size get independent subsets.
    pub fn seed_of(&self, i: usize) -> u64 {
        self.seed
            .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// Where tensor `i` of a [`Frugal`] list keeps its part of the packed buffers.
#[derive(Clone, Copy, Debug)]
struct Packed {
    /// Coordinates, and those with state.
    n: usize,
    k: usize,
    /// The matrix it is seen as, for row and column subspaces (`frugal_matrix`).
    rows: usize,
    cols: usize,
    /// Offsets (in elements) of its subset, its mask words, its moments (`m` then `v`,
    /// `k` each, each starting at a multiple of 4: the Adam pass reads them four slots at
    /// a time) and its master copy (`n` elements in the masters buffer, for a half tensor).
    indices: usize,
    mask: usize,
    state: usize,
    master_at: usize,
    /// The tensor's dtype (f16/bf16: it has a master copy).
    dtype: DType,
}

impl Packed {
    fn master(&self) -> bool {
        self.dtype != DType::F32
    }

    /// The stride of its moments: `k` rounded up to a multiple of 4 (`v` starts there).
    fn k4(&self) -> usize {
        self.k.next_multiple_of(4)
    }

    /// The signSGD pass's vector width for this tensor: 4 when its length is a multiple
    /// of 4 (a vector's four coordinates then share one mask word).
    fn width(&self) -> usize {
        if self.n.is_multiple_of(4) {
            4
        } else {
            1
        }
    }
}

/// A launch's tensors, and for a span launch their offsets in the spans.
type GroupKey = (Vec<usize>, Option<Vec<usize>>);

/// A FRUGAL optimizer for a list of f32/f16/bf16 tensors (one, or many of different
/// sizes and dtypes): their subsets, their state and the device step counter; [`Frugal::step`] (one tensor) and
/// [`Frugal::step_multi`] (the list) update the tensors in place.
pub struct Frugal {
    /// Adam's part (`lr`, `beta1`, `beta2`, `eps`, `weight_decay`; may change between
    /// steps).
    pub hyper: Hyper,
    /// FRUGAL's part (`lr_free` may change between steps; density and seed are fixed at
    /// creation).
    pub config: FrugalConfig,
    packed: Vec<Packed>,
    /// Density, seed and subspace at creation (the packing depends on them).
    drawn_with: (f64, u64, Subspace),
    indices: Tensor,
    mask: Tensor,
    /// The moments of every tensor ([`Packed::state`]).
    state: Tensor,
    /// The f32 master copies of the half tensors ([`Packed::master_at`]).
    masters: Tensor,
    counter: Tensor,
    steps: u64,
    /// Kernel launches of the last step's update (not its redraw's selections).
    launches: usize,
    /// Per dtype: `2 SLOTS` one-element placeholders for the unused slots of a launch.
    spares: HashMap<DType, Vec<Tensor>>,
    /// Per group of tensors (and, for a span launch, their offsets in the spans): the
    /// slot table and cube count of each pass (signSGD, Adam).
    tables: HashMap<GroupKey, [(Tensor, usize); 2]>,
    /// Per vector width: the array whose length caps the signSGD pass's width.
    guards: HashMap<usize, Tensor>,
}

impl Frugal {
    /// Zero state for `param` (f32, f16 or bf16, any shape; the first subset is drawn at
    /// the first step; a half `param`'s f32 master copy is read now).
    pub fn new(param: &Tensor, hyper: Hyper, config: FrugalConfig) -> Result<Self> {
        Self::resume(param, hyper, config, 0, None)
    }

    /// Zero state for each of `params` (f32/f16/bf16, any shapes and sizes, distinct
    /// tensors).
    pub fn new_multi(params: &[&Tensor], hyper: Hyper, config: FrugalConfig) -> Result<Self> {
        Self::resume_multi(params, hyper, config, 0, &[])
    }

    /// Resumes after `steps` steps with the current subspace's moments `(m, v)` (`[k]`
    /// f32 each, in the order of the subset's increasing indices; `None`: zeros). A half
    /// `param`'s master copy is read from it; [`Frugal::set_master`] gives a saved one.
    pub fn resume(
        param: &Tensor,
        hyper: Hyper,
        config: FrugalConfig,
        steps: u64,
        moments: Option<(&Tensor, &Tensor)>,
    ) -> Result<Self> {
        Self::resume_multi(&[param], hyper, config, steps, &[moments])
    }

    /// [`Frugal::resume`] for a list: `moments[i]` for `params[i]` (an empty slice: all
    /// zeros).
    pub fn resume_multi(
        params: &[&Tensor],
        hyper: Hyper,
        config: FrugalConfig,
        steps: u64,
        moments: &[Option<(&Tensor, &Tensor)>],
    ) -> Result<Self> {
        hyper.check(Rule::AdamW)?;
        config.check()?;
        let Some(first) = params.first() else {
            return Err(Error::Param {
                param: "params".into(),
                expected: "at least one tensor".into(),
                found: "none".into(),
            });
        };
        config.check_blocks(params.len())?;
        if config.subspace == Subspace::Svd {
            return Err(Error::Param {
                param: "subspace".into(),
                expected: "coordinates, rows, columns or blocks (svd: FrugalSvd steps it)".into(),
                found: "svd".into(),
            });
        }
        if !moments.is_empty() && moments.len() != params.len() {
            return Err(Error::Param {
                param: "moments".into(),
                expected: format!("one entry per param ({}), or none", params.len()),
                found: moments.len().to_string(),
            });
        }
        let client = first.client().clone();
        for (i, param) in params.iter().enumerate() {
            let name = param_name(params.len(), "param", i);
            check_input(&name, param, &client)?;
            param.expect_dtype(&name, &[DType::F32, DType::F16, DType::BF16])?;
        }
        // The current subspace's sizes (a redraw at the next step keeps them, but blocks).
        let subspace = subspace_index(&config, steps)?;
        let active = config.active_tensors(params.len(), subspace);
        let ks: Vec<usize> = (0..params.len())
            .map(|i| match active.contains(&i) {
                true => config.active(params[i].shape()),
                false => 0,
            })
            .collect();
        let (packed, indices, words, _) = pack(params, &ks, config.subspace);
        let (mut host, mut masters) = (Vec::new(), Vec::new());
        for (i, (param, p)) in params.iter().zip(&packed).enumerate() {
            let k = p.k;
            match moments.get(i).copied().flatten() {
                Some((m, v)) => {
                    for (t, what) in [(m, "m"), (v, "v")] {
                        let what = param_name(params.len(), what, i);
                        t.expect_dtype(&what, &[DType::F32])?;
                        let why = match k {
                            0 => "none: the tensor holds no state in this subspace (blocks)",
                            _ => "the subset's size (see FrugalConfig::active)",
                        };
                        expect_shape(&what, t, &[k], why)?;
                        host.extend(t.download()?.to_f64());
                        host.resize(host.len().next_multiple_of(4), 0.0);
                    }
                }
                None => host.extend(std::iter::repeat_n(0.0, 2 * p.k4())),
            }
            if p.master() {
                masters.extend(param.download()?.to_f64());
            }
        }
        // At least one 4-wide vector (the Adam pass reads it so).
        host.resize(host.len().max(4), 0.0);
        let state = upload_f32(&client, &host)?;
        let masters = upload_f32(&client, &masters)?;
        let local = steps % config.update_gap;
        let mut f = Frugal {
            hyper,
            config,
            packed,
            drawn_with: (config.density, config.seed, config.subspace),
            // Zeros until the first draw (`state` reads the subset before any step); at
            // least one 4-wide vector (the Adam pass reads it so).
            indices: Tensor::upload(
                &client,
                &HostTensor::from_bytes(
                    DType::I32,
                    vec![indices.max(4)],
                    vec![0; 4 * indices.max(4)],
                )?,
            )?,
            mask: upload_u32(&client, "mask", &vec![0; words.max(1)])?,
            state,
            masters,
            counter: upload_u32(&client, "step", &[local as u32])?,
            steps,
            launches: 0,
            spares: HashMap::new(),
            tables: HashMap::new(),
            guards: HashMap::new(),
        };
        if local != 0 {
            // Mid-subspace: the current subsets, keeping the given state. (At a redraw
            // the next step resets the state anyway.)
            f.draw(params, subspace)?;
        }
        Ok(f)
    }

    /// Device memory the optimizer holds, in bytes: the packed subsets, masks and state
    /// (moments and master copies; for blocks, those of the tensors now active).
    pub fn state_bytes(&self) -> usize {
        4 * (self.indices.numel() + self.mask.numel() + self.state.numel() + self.masters.numel())
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Kernel launches of the last step's update, the step counter's included (a
    /// redraw's selections not counted; 0 before a step).
    pub fn launches(&self) -> usize {
        self.launches
    }

    /// The current subset (`[k]` i32, increasing) and moments `(m, v)` (`[k]` f32) of
    /// the (first) tensor.
    pub fn state(&self) -> Result<(Tensor, Tensor, Tensor)> {
        self.state_of(0)
    }

    /// [`Frugal::state`] of the `i`-th tensor of the list (read through the host).
    pub fn state_of(&self, i: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let p = self.packed_at(i)?;
        let client = self.state.client();
        // A whole tensor (density 1, an active block) is its own subset; a block's has
        // no entries in the packed subsets.
        let indices = match (self.config.subspace, p.k == p.n) {
            (Subspace::Blocks, _) | (_, true) => {
                (0..p.k as i32).flat_map(i32::to_le_bytes).collect()
            }
            _ => self.indices.download()?.data[4 * p.indices..4 * (p.indices + p.k)].to_vec(),
        };
        let indices = HostTensor::from_bytes(DType::I32, vec![p.k], indices)?;
        let state = self.state.download()?.to_f64();
        let part = |at: usize| {
            let values = &state[at..at + p.k];
            Tensor::upload(
                client,
                &HostTensor::from_f64(DType::F32, vec![p.k], values)?,
            )
        };
        Ok((
            Tensor::upload(client, &indices)?,
            part(p.state)?,
            part(p.state + p.k4())?,
        ))
    }

    /// The f32 master copy of the `i`-th tensor (`None` for an f32 tensor), in its shape
    /// flattened to `[n]` (read through the host).
    pub fn master_of(&self, i: usize) -> Result<Option<Tensor>> {
        let p = self.packed_at(i)?;
        if !p.master() {
            return Ok(None);
        }
        let masters = self.masters.download()?.to_f64();
        let at = p.master_at;
        upload_f32(self.masters.client(), &masters[at..at + p.n]).map(Some)
    }

    /// Replaces the master copy of the `i`-th tensor (an f16/bf16 one) by `master` (f32,
    /// as many elements as the tensor), e.g. a saved one when resuming (through the host).
    pub fn set_master(&mut self, i: usize, master: &Tensor) -> Result<()> {
        let p = self.packed_at(i)?;
        let name = param_name(self.packed.len(), "master", i);
        if !p.master() {
            return Err(Error::Param {
                param: name,
                expected: "a master copy only for an f16/bf16 tensor".into(),
                found: format!("tensor {i} is {}", p.dtype),
            });
        }
        check_input(&name, master, self.state.client())?;
        master.expect_dtype(&name, &[DType::F32])?;
        if master.numel() != p.n {
            return Err(Error::Shape {
                tensor: name,
                expected: format!("{} elements (the tensor's)", p.n),
                found: format!("{:?}", master.shape()),
            });
        }
        let mut masters = self.masters.download()?.to_f64();
        let at = p.master_at;
        masters[at..at + p.n].copy_from_slice(&master.download()?.to_f64());
        self.masters = upload_f32(self.masters.client(), &masters)?;
        Ok(())
    }

    fn packed_at(&self, i: usize) -> Result<Packed> {
        self.packed.get(i).copied().ok_or_else(|| Error::Param {
            param: "tensor".into(),
            expected: format!("< {}", self.packed.len()),
            found: i.to_string(),
        })
    }

    /// Draws subspace `j`'s subsets and packs them with their masks (for blocks: lays
    /// the state out for the tensors now active).
    fn draw(&mut self, params: &[&Tensor], stream: u32) -> Result<()> {
        if self.config.subspace == Subspace::Blocks {
            return self.relayout(params, stream);
        }
        for (i, (p, param)) in self.packed.iter().zip(params).enumerate() {
            if p.n == 0 {
                continue;
            }
            let seed = (self.config.seed_of(i), stream);
            let picked = match self.config.subspace {
                Subspace::Coordinates => {
                    select_top_k(param, None, p.k, KeySource::Random, seed, 1.0)?.indices
                }
                // The lines by the same selection (over as many keys as lines; the
                // values it gathers from the parameter's first elements are unused),
                // then their coordinates, increasing.
                lines => {
                    let count = if lines == Subspace::Rows {
                        p.rows
                    } else {
                        p.cols
                    };
                    let taken = p.k / (p.n / count);
                    let keys = param.prefix(count)?;
                    let chosen = select_top_k(&keys, None, taken, KeySource::Random, seed, 1.0)?;
                    let picked = Tensor::empty(param.client(), DType::I32, &[p.k])?;
                    FrugalLines::tuned(
                        param.client(),
                        0.0,
                        &FrugalLinesArgs {
                            lines: &chosen.indices,
                            picked: &picked,
                            k: p.k as u32,
                            taken: taken as u32,
                            cols: p.cols as u32,
                            columns: (lines == Subspace::Columns) as u32,
                        },
                    )?;
                    picked
                }
            };
            let words = p.n.div_ceil(32);
            FrugalMask::tuned(
                param.client(),
                0.0,
                &FrugalMaskArgs {
                    picked: &picked,
                    indices: &self.indices,
                    mask: &self.mask,
                    k: p.k as u32,
                    words: words as u32,
                    units: words.max(p.k) as u32,
                    indices_at: p.indices as u32,
                    mask_at: p.mask as u32,
                },
            )?;
        }
        Ok(())
    }

    /// Blocks: the tensors active in subspace `j` get moments for all their coordinates
    /// (zeroed by the step at the redraw), the others none (the master copies keep their
    /// places: they do not depend on the subspace).
    fn relayout(&mut self, params: &[&Tensor], j: u32) -> Result<()> {
        let active = self.config.active_tensors(params.len(), j);
        let ks: Vec<usize> = (0..params.len())
            .map(|i| match active.contains(&i) {
                true => self.packed[i].n,
                false => 0,
            })
            .collect();
        if ks.iter().zip(&self.packed).all(|(&k, p)| k == p.k) {
            return Ok(());
        }
        let (packed, _, _, len) = pack(params, &ks, self.config.subspace);
        self.state = Tensor::empty(self.state.client(), DType::F32, &[len.max(4)])?;
        self.packed = packed;
        // The launches' slot tables hold the old offsets.
        self.tables.clear();
        Ok(())
    }

    /// One step of `param` (as created) by `grad` (param's dtype and shape), in place. At
    /// the first step of a subspace the subset is redrawn and the moments reset.
    pub fn step(&mut self, param: &Tensor, grad: &Tensor) -> Result<()> {
        self.step_multi(&[param], &[grad])
    }

    /// One step of every tensor of the list (as created, in order) by its gradient (the
    /// tensor's dtype and shape), in place: two launches per [`SLOTS`] tensors of one dtype and vector width
    /// (per vector width for views of one buffer, gradients at the same offsets)
    /// and one to advance the step counter, no host synchronisation (a redraw adds a selection per tensor).
    pub fn step_multi(&mut self, params: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let count = self.packed.len();
        super::expect_list(count, params.len(), grads.len())?;
        let client = self.state.client().clone();
        for (i, (p, (param, grad))) in self.packed.iter().zip(params.iter().zip(grads)).enumerate()
        {
            check_step_pair(count, i, param, grad, p.n, p.dtype, &client)?;
        }
        super::no_gradient_overlaps_a_weight(params, grads)?;
        self.hyper.check(Rule::AdamW)?;
        self.config.check()?;
        self.config.check_blocks(count)?;
        let c = &self.config;
        if (c.density, c.seed, c.subspace) != self.drawn_with {
            return Err(Error::Param {
                param: "density, seed, subspace".into(),
                expected: format!(
                    "{:?} (as created: they fix the state's size)",
                    self.drawn_with
                ),
                found: format!("{:?}", (c.density, c.seed, c.subspace)),
            });
        }
        if self.steps.is_multiple_of(self.config.update_gap) {
            self.draw(params, subspace_index(&self.config, self.steps)?)?;
            // Counter 0: the step starts the new subsets' moments from zero.
            self.counter = upload_u32(&client, "step", &[0])?;
        }
        let live = (0..count).filter(|&i| self.packed[i].n > 0);
        let kind = |i: usize| (self.packed[i].dtype, self.packed[i].width());
        // Views of one flat buffer (gradients at the same offsets, one dtype): one launch
        // per pass and vector width, whatever the count; else up to SLOTS a launch.
        let spans = Spans::of(params, grads, usize::MAX);
        let groups = match spans {
            Some(_) => kind_groups(live, kind),
            None => launch_groups(live, kind, params),
        };
        let mut launches = 1;
        for group in groups {
            launches += self.launch(&group, params, grads, spans.as_ref())?;
        }
        self.launches = launches;
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

    /// The step over the tensors `group` (at most [`SLOTS`], distinct; any number in a
    /// `spans` launch): one launch of the signSGD pass over every coordinate without
    /// state, one of the Adam pass over the state slots (none where no tensor of the group
    /// has state).
    fn launch(
        &mut self,
        group: &[usize],
        params: &[&Tensor],
        grads: &[&Tensor],
        spans: Option<&Spans>,
    ) -> Result<usize> {
        let client = self.state.client().clone();
        let offsets: Option<Vec<usize>> =
            spans.map(|sp| group.iter().map(|&i| sp.offsets[i]).collect());
        let key = (group.to_vec(), offsets.clone());
        // Slots in the tables: SLOTS, or a span launch's tensors.
        let nslots = match spans {
            Some(_) => group.len(),
            None => SLOTS,
        };
        if !self.tables.contains_key(&key) {
            if self.tables.len() >= super::multi::MAX_CACHED_GROUPS {
                // Layouts that change from step to step would add tables without end.
                self.tables.clear();
            }
            // Per pass, each slot's first cube: the signSGD pass covers a tensor's
            // coordinates (none for a whole tensor with state), the Adam pass its slots.
            let packed: Vec<Packed> = group.iter().map(|&i| self.packed[i]).collect();
            let at = offsets.clone().unwrap_or_else(|| vec![0; group.len()]);
            let sign = slot_table(&client, &packed, &at, nslots, |p| match p.k == p.n {
                true => 0,
                false => p.n / p.width(),
            })?;
            // Four state slots a unit.
            let adam = slot_table(&client, &packed, &at, nslots, |p| p.k.div_ceil(4))?;
            self.tables.insert(key.clone(), [sign, adam]);
        }
        let [(sign_table, sign_cubes), (adam_table, adam_cubes)] = self.tables[&key].clone();
        let len: usize = group.iter().map(|&i| self.packed[i].n).sum();
        let dtype = self.packed[group[0]].dtype;
        if let std::collections::hash_map::Entry::Vacant(e) = self.spares.entry(dtype) {
            // Four elements: a placeholder never narrows a 4-wide launch.
            let spares = (0..2 * SLOTS)
                .map(|_| Tensor::empty(&client, dtype, &[4]))
                .collect::<Result<_>>()?;
            e.insert(spares);
        }
        let width = self.packed[group[0]].width();
        if let std::collections::hash_map::Entry::Vacant(e) = self.guards.entry(width) {
            // Its length caps the launch's vector width (the widest dividing every binding).
            let guard = Tensor::empty(&client, DType::F32, &[width])?;
            e.insert(guard);
        }
        let guard = self.guards[&width].clone();
        let spares = &self.spares[&dtype];
        let slot = |s: usize, list: &[&Tensor], spare: usize| -> Tensor {
            match group.get(s) {
                Some(&i) => list[i].clone(),
                None => spares[spare].clone(),
            }
        };
        let (w, g) = match spans {
            // Both spans bound once, up to the group's last element.
            Some(sp) => {
                let end = group
                    .iter()
                    .map(|&i| sp.offsets[i] + self.packed[i].n)
                    .max();
                sp.bind(end.unwrap_or(0), spares)?
            }
            None => (
                (0..SLOTS).map(|s| slot(s, params, s)).collect(),
                (0..SLOTS).map(|s| slot(s, grads, SLOTS + s)).collect(),
            ),
        };
        let h = &self.hyper;
        let master = dtype != DType::F32;
        let slots = match spans {
            Some(_) => 1,
            None => group.len() as u32,
        };
        let decay = (1.0 - h.lr * h.weight_decay) as f32;
        if sign_cubes > 0 {
            FrugalSignStep::tuned(
                &client,
                0.0,
                &slot_args!(FrugalSignStepArgs, w, g, {
                    mask: &self.mask,
                    masters: &self.masters,
                    width: &guard,
                    table: &sign_table,
                    len: len as u32,
                    cubes: sign_cubes as u32,
                    nslots: nslots as u32,
                    contiguous: contiguous_regions(&client),
                    lr_free: self.config.lr_free as f32,
                    decay,
                    master,
                    slots,
                    spans: spans.is_some(),
                }),
            )?;
        }
        if adam_cubes > 0 {
            FrugalAdamStep::tuned(
                &client,
                0.0,
                &slot_args!(FrugalAdamStepArgs, w, g, {
                    indices: &self.indices,
                    state: &self.state,
                    masters: &self.masters,
                    table: &adam_table,
                    counter: &self.counter,
                    len: len as u32,
                    cubes: adam_cubes as u32,
                    nslots: nslots as u32,
                    lr: h.lr as f32,
                    beta1: h.beta1 as f32,
                    beta2: h.beta2 as f32,
                    one_minus_beta1: (1.0 - h.beta1) as f32,
                    one_minus_beta2: (1.0 - h.beta2) as f32,
                    ln_beta1: h.beta1.ln() as f32,
                    ln_beta2: h.beta2.ln() as f32,
                    eps: h.eps as f32,
                    decay,
                    master,
                    slots,
                    spans: spans.is_some(),
                }),
            )?;
        }
        Ok(usize::from(sign_cubes > 0) + usize::from(adam_cubes > 0))
    }
}

/// A launch's slot table (`SLOT_WORDS` per slot: first cube, `n`, `k`, subset, mask,
/// moments and master offsets, the tensor's first element in its binding, `at`) for a
/// pass that covers `units(p)` of each tensor, `PER` to a unit, padded to `nslots`
/// slots; and its cube count.
fn slot_table(
    client: &kiln_runtime::Client,
    packed: &[Packed],
    at: &[usize],
    nslots: usize,
    units: impl Fn(&Packed) -> usize,
) -> Result<(Tensor, usize)> {
    let mut table = Vec::with_capacity(SLOT_WORDS * nslots.max(packed.len()));
    let mut cubes = 0usize;
    for (p, &at) in packed.iter().zip(at) {
        table.extend([cubes, p.n, p.k, p.indices, p.mask, p.state, p.master_at, at]);
        cubes += units(p).div_ceil(CUBE * STEP_PER);
    }
    // Unused slots start past the last cube: no cube selects them.
    while table.len() < SLOT_WORDS * nslots {
        table.extend([u32::MAX as usize, 0, 0, 0, 0, 0, 0, 0]);
    }
    let table = crate::optim::slots::table_words(table)?;
    Ok((upload_u32(client, "slot_table", &table)?, cubes))
}

/// The subspace step `steps + 1` belongs to, as the generator's stream.
fn subspace_index(config: &FrugalConfig, steps: u64) -> Result<u32> {
    u32::try_from(steps / config.update_gap).map_err(|_| Error::Param {
        param: "step".into(),
        expected: format!("fewer than 2^32 subspaces of {} steps", config.update_gap),
        // The step as the caller numbers it (1-based).
        found: (steps + 1).to_string(),
    })
}

/// The packed layout of `params` with `ks[i]` coordinates of state each: per tensor its
/// subset and its moments `m`, `v` (each at a multiple of 4), its mask words, and an
/// f16/bf16 tensor's master copy; and the lengths of the subsets, masks and moments.
/// Blocks keep no subsets or masks (a tensor is all in or all out).
fn pack(
    params: &[&Tensor],
    ks: &[usize],
    subspace: Subspace,
) -> (Vec<Packed>, usize, usize, usize) {
    let (mut packed, mut indices, mut words, mut state, mut masters) = (Vec::new(), 0, 0, 0, 0);
    for (param, &k) in params.iter().zip(ks) {
        let n = param.numel();
        let (rows, cols) = frugal_matrix(param.shape());
        let p = Packed {
            n,
            k,
            rows,
            cols,
            indices,
            mask: words,
            state,
            master_at: masters,
            dtype: param.dtype(),
        };
        packed.push(p);
        if subspace != Subspace::Blocks {
            indices += p.k4();
            words += n.div_ceil(32);
        }
        state += 2 * p.k4();
        if p.master() {
            masters += n;
        }
    }
    (packed, indices, words, state)
}

/// Checks tensor `i` of a list of `count` at a step: `param` on `client`, of `dtype` and
/// `n` elements (as created), `grad` of its dtype and shape; errors name `param[i]` or
/// `grad[i]` (`param` / `grad` for a list of one).
fn check_step_pair(
    count: usize,
    i: usize,
    param: &Tensor,
    grad: &Tensor,
    n: usize,
    dtype: DType,
    client: &kiln_runtime::Client,
) -> Result<()> {
    let (pn, gn) = (param_name(count, "param", i), param_name(count, "grad", i));
    check_input(&pn, param, client)?;
    param.expect_dtype(&pn, &[dtype])?;
    if param.numel() != n {
        return Err(Error::Shape {
            tensor: pn,
            expected: format!("{n} elements (as created)"),
            found: format!("{:?}", param.shape()),
        });
    }
    check_input(&gn, grad, client)?;
    grad.expect_dtype(&gn, &[dtype])?;
    expect_shape(&gn, grad, param.shape(), "param's shape")
}

/// An f32 vector on the device (`[1]` zeros when empty: a binding is never empty).
fn upload_f32(client: &kiln_runtime::Client, values: &[f64]) -> Result<Tensor> {
    let values = match values.is_empty() {
        true => &[0.0][..],
        false => values,
    };
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, vec![values.len()], values)?,
    )
}
