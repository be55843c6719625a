//! Ring attention over any [`Communicator`]: `P` ranks, each holding its chunk(s) of
//! one sequence, compute exact attention of the whole sequence by passing blocks
//! around the ring and merging block results by their log-sum-exp.
//!
//! Layout ([`RingLayout`]): the `S` tokens are cut into `P` chunks (`contiguous`,
//! `tokenring`) or `2P` chunks (`zigzag`; rank `r` holds chunks `r` and `2P - 1 - r`,
//! concatenated along its tokens), chunk `c` covering `[c S / n, (c + 1) S / n)`: sizes
//! differ by at most one token when `S` is not divisible, nothing is padded.
//!
//! Varlen (`cu_seqlens`, B = 1): every packed sequence is cut the same way, and chunk `c`
//! is chunk `c` of every sequence, packed in sequence order ([`RingChunk`]); a block is
//! then a varlen attention call whose sequence bounds are the two chunks' segment
//! lengths. Because every sequence is cut alike, a (query chunk, key chunk) pair is
//! fully visible, diagonal or fully masked for all sequences at once, so the schedules
//! below are unchanged.
//!
//! Schedules (rank `r` at step `t` works with the blocks of rank `src = (r - t) mod P`):
//! - `contiguous`, `zigzag`: KV chunks travel forward (`send_recv` to `r + 1`, from
//!   `r - 1`). Each (query chunk, key chunk) pair is computed only if the causal mask
//!   leaves something: fully visible pairs run unmasked, the diagonal pairs masked with
//!   their positions as offsets, fully masked pairs are skipped. For `zigzag` this is
//!   exactly its schedule (step 0 causal; `src < r`: all of q against the first KV
//!   chunk; `src > r`: the second q chunk against all of the KV), with balanced work.
//! - `tokenring`: Q travels forward; each rank computes the travelling Q against its
//!   own KV and sends the partial `(out, lse)` straight back to Q's owner (one grouped
//!   `send_recv` per step), which merges. KV never moves.
//!
//! Backward (from the merged `out` and `lse`): every block runs the block backward with
//! the global `out`/`lse` ([`super::backward`]); `contiguous`/`zigzag` carry dk and dv
//! (f32) with their KV chunk and return them to its owner after the last step;
//! `tokenring` keeps dk/dv local and returns each dq partial to its owner. All partial
//! results are f32 and summed/merged in f32.
//!
//! Longer than most files: the forward and backward rings share the layout, the order of
//! a schedule's steps and the block helpers, and stay together so both walk the ring alike.

use super::backward::{backward_into, check_grad_inputs, AttentionGradInputs, AttentionGrads};
use super::forward::forward_into;
use super::problem::check;
use super::*;
use crate::elementwise::{add, mul};
use crate::rows::{copy_rows, slice_rows};
use kiln_runtime::comm::Communicator;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};
use std::ops::Range;

/// Which blocks travel and how the sequence is cut; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RingSchedule {
    /// `P` contiguous chunks, KV travels (causal work is unbalanced).
    #[default]
    Contiguous,
    /// `2P` chunks, rank `r` holding `r` and `2P - 1 - r`, KV travels (balanced).
    Zigzag,
    /// `P` contiguous chunks, Q travels forward and partial results return to Q's owner.
    TokenRing,
}

impl RingSchedule {
    /// Parses `contiguous`, `zigzag` or `tokenring`.
    pub fn parse(s: &str) -> Result<RingSchedule> {
        match s {
            "contiguous" => Ok(RingSchedule::Contiguous),
            "zigzag" => Ok(RingSchedule::Zigzag),
            "tokenring" => Ok(RingSchedule::TokenRing),
            other => Err(Error::Param {
                param: "schedule".into(),
                expected: "contiguous | zigzag | tokenring".into(),
                found: other.into(),
            }),
        }
    }
}

/// How a sequence of `seq_len` tokens (or several packed ones) is cut over `world_size`
/// ranks.
#[derive(Clone, Debug)]
pub struct RingLayout {
    /// Tokens of the whole sequence (all packed sequences together).
    pub seq_len: usize,
    /// Ranks in the ring.
    pub world_size: usize,
    /// The schedule the cut is for.
    pub schedule: RingSchedule,
    /// Sequence bounds over the tokens (`N + 1`; `[0, seq_len]` for one sequence).
    bounds: Vec<usize>,
    varlen: bool,
}

/// One chunk of a [`RingLayout`]: chunk `index` of every sequence, packed in sequence
/// order (one segment for a single sequence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingChunk {
    /// Which chunk of each sequence (0-based; `P` or `2P` chunks per sequence).
    pub index: usize,
    /// Its global token range in every sequence, in sequence order (empty where a
    /// sequence is shorter than the number of chunks).
    pub segments: Vec<Range<usize>>,
}

impl RingChunk {
    /// Tokens of the chunk.
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.len()).sum()
    }
    /// Whether the chunk holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Its global token positions, in its local order.
    pub fn tokens(&self) -> impl Iterator<Item = usize> + '_ {
        self.segments.iter().flat_map(|s| s.clone())
    }
    /// Local sequence offsets of the chunk's segments (`N + 1`, 0 first).
    fn cu_seqlens(&self) -> Vec<i32> {
        let mut at = 0;
        let mut cu = vec![0];
        for s in &self.segments {
            at += s.len() as i32;
            cu.push(at);
        }
        cu
    }
}

impl RingLayout {
    /// The layout of one sequence (of every batch row); `world_size` must be 1..=1024.
    pub fn new(seq_len: usize, world_size: usize, schedule: RingSchedule) -> Result<RingLayout> {
        Self::with_bounds(vec![0, seq_len], false, world_size, schedule)
    }

    /// The layout of packed sequences (B = 1): `cu_seqlens` (`N + 1` offsets, 0 first,
    /// non-decreasing), every sequence cut as one sequence would be.
    pub fn varlen(
        cu_seqlens: &[i32],
        world_size: usize,
        schedule: RingSchedule,
    ) -> Result<RingLayout> {
        let ok = cu_seqlens.first() == Some(&0) && cu_seqlens.windows(2).all(|w| w[0] <= w[1]);
        if !ok {
            return Err(Error::Param {
                param: "cu_seqlens".into(),
                expected: "N + 1 >= 1 offsets, 0 first, non-decreasing".into(),
                found: format!("{cu_seqlens:?}"),
            });
        }
        let bounds = cu_seqlens.iter().map(|&x| x as usize).collect();
        Self::with_bounds(bounds, true, world_size, schedule)
    }

    fn with_bounds(
        bounds: Vec<usize>,
        varlen: bool,
        world_size: usize,
        schedule: RingSchedule,
    ) -> Result<RingLayout> {
        if world_size == 0 || world_size > 1024 {
            return Err(Error::Param {
                param: "world_size".into(),
                expected: "1 ..= 1024 ranks".into(),
                found: world_size.to_string(),
            });
        }
        Ok(RingLayout {
            seq_len: *bounds.last().unwrap_or(&0),
            world_size,
            schedule,
            bounds,
            varlen,
        })
    }

    /// Chunk `c` of `n` of every sequence.
    fn chunk(&self, c: usize, n: usize) -> RingChunk {
        let segments = self
            .bounds
            .windows(2)
            .map(|w| {
                // In u128: `c len` of a long sequence may pass usize (n >= 1, c < n).
                let (start, len) = (w[0], w[1].saturating_sub(w[0]) as u128);
                let at = |c: usize| start + (c as u128 * len / n as u128) as usize;
                at(c)..at(c + 1)
            })
            .collect();
        RingChunk { index: c, segments }
    }

    /// Rank `r`'s chunks, in the order its local tensors hold them (none for a rank
    /// outside the ring, `r >= world_size`).
    pub fn rank_chunks(&self, r: usize) -> Vec<RingChunk> {
        let p = self.world_size;
        if r >= p {
            return Vec::new();
        }
        match self.schedule {
            RingSchedule::Zigzag => vec![self.chunk(r, 2 * p), self.chunk(2 * p - 1 - r, 2 * p)],
            _ => vec![self.chunk(r, p)],
        }
    }

    /// Tokens rank `r` holds (0 outside the ring).
    pub fn local_len(&self, r: usize) -> usize {
        self.rank_chunks(r).iter().map(|c| c.len()).sum()
    }

    /// Whether the layout is of packed sequences ([`RingLayout::varlen`]).
    pub fn is_varlen(&self) -> bool {
        self.varlen
    }
}

/// What a causal mask leaves of a (query chunk, key chunk) pair. Every sequence is cut
/// alike, so chunk indices decide for all of them: an earlier key chunk ends before the
/// query chunk starts, a later one starts after it ends.
enum Pair {
    Skip,
    Full,
    Diagonal,
}

fn pair(q: &RingChunk, k: &RingChunk, causal: bool) -> Pair {
    if q.is_empty() || k.is_empty() {
        Pair::Skip
    } else if !causal || k.index < q.index {
        Pair::Full
    } else if k.index > q.index {
        Pair::Skip
    } else {
        Pair::Diagonal
    }
}

/// The options of one block, f32 output: a diagonal pair is causal within each
/// sequence (both chunks start at the same position, so no offset); a fully masked pair
/// (run only by `tokenring`'s forward, for its partial of -inf) is causal with every key
/// placed after every query.
fn block_options(opts: &AttentionOptions, q: &RingChunk, k: &RingChunk) -> AttentionOptions {
    let (causal, k_offset) = match pair(q, k, opts.causal) {
        Pair::Full => (false, 0),
        Pair::Diagonal => (true, 0),
        Pair::Skip => (true, q.len().max(1)),
    };
    AttentionOptions {
        causal,
        q_offset: 0,
        k_offset,
        out_dtype: Some(DType::F32),
        ..opts.clone()
    }
}

/// A block's inputs: the chunks' segment bounds where the layout is varlen.
struct BlockBounds {
    q: Option<Vec<i32>>,
    k: Option<Vec<i32>>,
}

impl BlockBounds {
    fn of(layout: &RingLayout, q: &RingChunk, k: &RingChunk) -> BlockBounds {
        let b = |c: &RingChunk| layout.varlen.then(|| c.cu_seqlens());
        BlockBounds { q: b(q), k: b(k) }
    }
    fn inputs<'a>(&'a self, q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> AttentionInputs<'a> {
        AttentionInputs {
            q,
            k,
            v,
            cu_seqlens_q: self.q.as_deref(),
            cu_seqlens_k: self.k.as_deref(),
        }
    }
}

/// Local tensor `t` (`[B, local, ...]`) cut into the chunks of `chunks` (f32 or not).
fn split(t: &Tensor, chunks: &[RingChunk], to: Option<DType>) -> Result<Vec<Tensor>> {
    let mut at = 0;
    chunks
        .iter()
        .map(|c| {
            let s = slice_rows(t, 1, at, c.len(), to.unwrap_or(t.dtype()));
            at += c.len();
            s
        })
        .collect()
}

/// The same rows of `[B, H, local]` lse tensors (axis 2).
fn split_lse(t: &Tensor, chunks: &[RingChunk]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    chunks
        .iter()
        .map(|c| {
            let s = slice_rows(t, 2, at, c.len(), DType::F32);
            at += c.len();
            s
        })
        .collect()
}

fn zeros(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Tensor::zeros(t.client(), dtype, t.shape())
}

fn ring_check(
    comm: &dyn Communicator,
    layout: &RingLayout,
    q: &Tensor,
    k: &Tensor,
    opts: &AttentionOptions,
) -> Result<()> {
    if comm.world_size() != layout.world_size {
        return Err(Error::Param {
            param: "world_size".into(),
            expected: format!("the communicator's {} ranks", comm.world_size()),
            found: layout.world_size.to_string(),
        });
    }
    if opts.q_offset != 0 || opts.k_offset != 0 {
        return Err(Error::Param {
            param: "q_offset".into(),
            expected: "0 (a ring places its chunks itself)".into(),
            found: format!("q_offset {} k_offset {}", opts.q_offset, opts.k_offset),
        });
    }
    if layout.varlen && q.shape().first() != Some(&1) {
        return Err(Error::Shape {
            tensor: "q".into(),
            expected: "[1, tokens, heads, D] (varlen packs sequences along the tokens: B = 1)"
                .into(),
            found: kiln_runtime::shape_str(q.shape()),
        });
    }
    let want = layout.local_len(comm.rank());
    for (name, t) in [("q", q), ("k", k)] {
        if t.rank() != 4 || t.shape()[1] != want {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: format!(
                    "[B, {want}, heads, D]: rank {}'s {want} tokens of {} ({:?} over {} ranks)",
                    comm.rank(),
                    layout.seq_len,
                    layout.schedule,
                    layout.world_size
                ),
                found: kiln_runtime::shape_str(t.shape()),
            });
        }
    }
    Ok(())
}

/// Merges a partial (f32 out, lse) into an accumulator slot.
fn merge_into(acc: &mut Option<(Tensor, Tensor)>, part: (Tensor, Tensor)) -> Result<()> {
    match acc {
        None => *acc = Some(part),
        Some((o, l)) => attention_merge(o, l, &part.0, &part.1)?,
    }
    Ok(())
}

/// The block of query chunk `qc` (rows `q`) against key chunk `kc` (`k`, `v`): its
/// forward with f32 out.
fn block(
    layout: &RingLayout,
    (qc, kc): (&RingChunk, &RingChunk),
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    let bounds = BlockBounds::of(layout, qc, kc);
    let inp = bounds.inputs(q, k, v);
    let p = check(&inp, &block_options(opts, qc, kc))?;
    let out = Tensor::empty(q.client(), DType::F32, &p.out_shape())?;
    let lse = Tensor::empty(q.client(), DType::F32, &p.lse_shape())?;
    forward_into(&inp, &p, &out, &lse)?;
    Ok((out, lse))
}

/// This rank's part of ring attention: `q` `[B, local, H, D]`, `k`/`v` `[B, local, Hkv,
/// D|Dv]` hold the rank's chunks of `layout` (concatenated), and every rank of `comm`
/// calls this with the same layout and options (`q_offset`/`k_offset` must be 0; the
/// layout gives the positions). Returns the rank's rows of the whole sequence's
/// attention: `out` `[B, local, H, Dv]` and `lse` `[B, H, local]`.
pub fn ring_attention(
    comm: &dyn Communicator,
    layout: &RingLayout,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    ring_check(comm, layout, q, k, opts)?;
    // The whole-problem check (shapes, dtypes, options) once, on the local tensors.
    let whole = check(&AttentionInputs::new(q, k, v), opts)?;
    // APE's temperature and scale belong to the whole sequence: `lse = T L + ln S` with
    // `L` the natural log-sum-exp of `s / T` over every key. Blocks merged with their own
    // `T L_b + ln S` would weigh block b by `B_b^T` instead of `B_b` (and depend on P), so
    // the blocks run at `scale / T` with `T = S = 1`, merge in `L`, and `T` and `ln S`
    // are applied once to the merged rows.
    let natural = AttentionOptions {
        scale: Some(whole.scale / whole.temperature),
        temperature: 1.0,
        lse_scale: 1.0,
        ..opts.clone()
    };
    let opts = &natural;
    let (r, p) = (comm.rank(), layout.world_size);
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let mine = layout.rank_chunks(r);
    let qs = split(q, &mine, None)?;
    let mut acc: Vec<Option<(Tensor, Tensor)>> = vec![None; mine.len()];
    match layout.schedule {
        RingSchedule::Contiguous | RingSchedule::Zigzag => {
            let mut kv: Vec<[Tensor; 2]> = split(k, &mine, None)?
                .into_iter()
                .zip(split(v, &mine, None)?)
                .map(|(a, b)| [a, b])
                .collect();
            for t in 0..p {
                let src = (r + p - t) % p;
                for (kc, [kb, vb]) in layout.rank_chunks(src).iter().zip(&kv) {
                    for ((qc, qa), slot) in mine.iter().zip(&qs).zip(acc.iter_mut()) {
                        // An empty chunk (more ranks than tokens) adds nothing: no launch.
                        if qc.is_empty()
                            || kc.is_empty()
                            || matches!(pair(qc, kc, opts.causal), Pair::Skip)
                        {
                            continue;
                        }
                        merge_into(slot, block(layout, (qc, kc), qa, kb, vb, opts)?)?;
                    }
                }
                if t + 1 < p {
                    kv = pass_on(comm, &kv, next, prev)?;
                }
            }
        }
        RingSchedule::TokenRing => {
            let (kv_k, kv_v) = (k, v);
            let mut q_cur = qs.clone();
            for t in 0..p {
                let owner = (r + p - t) % p;
                let kc = &mine[0];
                let parts: Vec<(Tensor, Tensor)> = layout
                    .rank_chunks(owner)
                    .iter()
                    .zip(&q_cur)
                    .map(|(qc, qa)| block(layout, (qc, kc), qa, kv_k, kv_v, opts))
                    .collect::<Result<_>>()?;
                for (a, (o, l)) in parts.into_iter().enumerate() {
                    let back = if t == 0 {
                        (o, l)
                    } else {
                        // To Q's owner; from the rank that holds our Q this step.
                        let from = (r + t) % p;
                        (
                            comm.send_recv(&o, owner, from)?,
                            comm.send_recv(&l, owner, from)?,
                        )
                    };
                    merge_into(&mut acc[a], back)?;
                }
                if t + 1 < p {
                    q_cur = q_cur
                        .iter()
                        .map(|x| comm.send_recv(x, next, prev))
                        .collect::<Result<_>>()?;
                }
            }
        }
    }
    let out = Tensor::empty(q.client(), whole.out_dtype, &whole.out_shape())?;
    let lse = Tensor::empty(q.client(), DType::F32, &whole.lse_shape())?;
    let mut at = 0;
    for ((qc, qa), slot) in mine.iter().zip(&qs).zip(acc) {
        // Only an empty chunk has no block (its diagonal pair is always computed).
        let Some((o, l)) = slot else {
            debug_assert!(qa.shape()[1] == 0);
            continue;
        };
        copy_rows(&o, 1, 0, &out, at, qc.len())?;
        copy_rows(&l, 2, 0, &lse, at, qc.len())?;
        at += qc.len();
    }
    let lse = ape_lse(lse, whole.temperature, whole.lse_scale)?;
    Ok(AttentionOutput { out, lse })
}

/// `T L + ln S` of the merged natural log-sum-exp `lse` `[B, H, local]` (itself where
/// `T = S = 1`); `-inf` rows (no key) stay `-inf`.
fn ape_lse(lse: Tensor, temperature: f64, lse_scale: f64) -> Result<Tensor> {
    let local = lse.shape()[2];
    if (temperature == 1.0 && lse_scale == 1.0) || lse.numel() == 0 {
        return Ok(lse);
    }
    let row = |x: f64| {
        Tensor::upload(
            lse.client(),
            &HostTensor::from_f64(DType::F32, vec![local], &vec![x; local])?,
        )
    };
    add(&mul(&lse, &row(temperature)?)?, &row(lse_scale.ln())?)
}

/// One block's backward into f32 partial gradients (with the global out/lse rows of
/// the query chunk).
fn block_backward(
    layout: &RingLayout,
    (qc, kc): (&RingChunk, &RingChunk),
    qa: &Tensor,
    kb: &Tensor,
    vb: &Tensor,
    grad: &AttentionGradInputs<'_>,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bounds = BlockBounds::of(layout, qc, kc);
    let inp = bounds.inputs(qa, kb, vb);
    let p = check(&inp, &block_options(opts, qc, kc))?;
    let f = |t: &Tensor| Tensor::empty(t.client(), DType::F32, t.shape());
    let (dq, dk, dv) = (f(qa)?, f(kb)?, f(vb)?);
    backward_into(&inp, grad, &p, &dq, &dk, &dv, None)?;
    Ok((dq, dk, dv))
}

/// One ring step for groups of tensors that travel together: each sent to `next`,
/// its successor received from `prev`.
fn pass_on<const N: usize>(
    comm: &dyn Communicator,
    groups: &[[Tensor; N]],
    next: usize,
    prev: usize,
) -> Result<Vec<[Tensor; N]>> {
    groups
        .iter()
        .map(|g| {
            let v = g
                .iter()
                .map(|t| comm.send_recv(t, next, prev))
                .collect::<Result<Vec<_>>>()?;
            Ok(v.try_into()
                .unwrap_or_else(|_| unreachable!("N tensors in, N out")))
        })
        .collect()
}

fn add_into(acc: &mut Tensor, part: &Tensor) -> Result<()> {
    *acc = add(acc, part)?;
    Ok(())
}

/// This rank's part of the ring backward: the local `q`, `k`, `v` as for
/// [`ring_attention`], with the rank's rows of the merged `out`, `lse` and of `do`.
/// Returns the rank's rows of dq, dk, dv of the whole sequence (dk/dv of its own KV
/// chunks, summed over every query that sees them), in q's dtype.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_backward(
    comm: &dyn Communicator,
    layout: &RingLayout,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &AttentionGradInputs<'_>,
    opts: &AttentionOptions,
) -> Result<AttentionGrads> {
    ring_check(comm, layout, q, k, opts)?;
    let whole = check(&AttentionInputs::new(q, k, v), opts)?;
    // This rank's rows of out, lse and do: checked here, not only by the local-ranks
    // driver (the block kernels index them with the whole problem's shapes).
    check_grad_inputs(grad, &whole)?;
    let (r, p) = (comm.rank(), layout.world_size);
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let mine = layout.rank_chunks(r);
    let qs = split(q, &mine, None)?;
    let outs = split(grad.out, &mine, None)?;
    let lses = split_lse(grad.lse, &mine)?;
    let dos = split(grad.d_o, &mine, None)?;
    let ks = split(k, &mine, None)?;
    let vs = split(v, &mine, None)?;
    let f32_zeros = |ts: &[Tensor]| {
        ts.iter()
            .map(|t| zeros(t, DType::F32))
            .collect::<Result<Vec<_>>>()
    };
    let mut dq = f32_zeros(&qs)?;
    let (dk, dv) = match layout.schedule {
        RingSchedule::Contiguous | RingSchedule::Zigzag => {
            let mut kv: Vec<[Tensor; 4]> = Vec::new();
            for ((kb, vb), (dkb, dvb)) in ks
                .iter()
                .zip(&vs)
                .zip(f32_zeros(&ks)?.into_iter().zip(f32_zeros(&vs)?))
            {
                kv.push([kb.clone(), vb.clone(), dkb, dvb]);
            }
            for t in 0..p {
                let src = (r + p - t) % p;
                for (kc, [kb, vb, dkb, dvb]) in layout.rank_chunks(src).iter().zip(kv.iter_mut()) {
                    for (a, qc) in mine.iter().enumerate() {
                        if qc.is_empty()
                            || kc.is_empty()
                            || matches!(pair(qc, kc, opts.causal), Pair::Skip)
                        {
                            continue;
                        }
                        let g = AttentionGradInputs {
                            out: &outs[a],
                            lse: &lses[a],
                            d_o: &dos[a],
                        };
                        let (pq, pk, pv) =
                            block_backward(layout, (qc, kc), &qs[a], kb, vb, &g, opts)?;
                        add_into(&mut dq[a], &pq)?;
                        add_into(dkb, &pk)?;
                        add_into(dvb, &pv)?;
                    }
                }
                if t + 1 < p {
                    kv = pass_on(comm, &kv, next, prev)?;
                }
            }
            // After the last step rank r holds the KV of r + 1: one more hop home.
            let mut dk = Vec::new();
            let mut dv = Vec::new();
            for x in kv {
                let [_, _, dkb, dvb] = x;
                if p > 1 {
                    dk.push(comm.send_recv(&dkb, next, prev)?);
                    dv.push(comm.send_recv(&dvb, next, prev)?);
                } else {
                    dk.push(dkb);
                    dv.push(dvb);
                }
            }
            (dk, dv)
        }
        RingSchedule::TokenRing => {
            let mut dk = f32_zeros(&ks)?;
            let mut dv = f32_zeros(&vs)?;
            let mut cur: Vec<[Tensor; 4]> = (0..mine.len())
                .map(|a| {
                    [
                        qs[a].clone(),
                        outs[a].clone(),
                        lses[a].clone(),
                        dos[a].clone(),
                    ]
                })
                .collect();
            let kc = &mine[0];
            for t in 0..p {
                let owner = (r + p - t) % p;
                for (a, (qc, [qa, oa, la, da])) in
                    layout.rank_chunks(owner).iter().zip(&cur).enumerate()
                {
                    let g = AttentionGradInputs {
                        out: oa,
                        lse: la,
                        d_o: da,
                    };
                    let (pq, pk, pv) = if matches!(pair(qc, kc, opts.causal), Pair::Skip) {
                        (
                            zeros(qa, DType::F32)?,
                            zeros(&ks[0], DType::F32)?,
                            zeros(&vs[0], DType::F32)?,
                        )
                    } else {
                        block_backward(layout, (qc, kc), qa, &ks[0], &vs[0], &g, opts)?
                    };
                    add_into(&mut dk[0], &pk)?;
                    add_into(&mut dv[0], &pv)?;
                    let back = if t == 0 {
                        pq
                    } else {
                        comm.send_recv(&pq, owner, (r + t) % p)?
                    };
                    add_into(&mut dq[a], &back)?;
                }
                if t + 1 < p {
                    cur = pass_on(comm, &cur, next, prev)?;
                }
            }
            (dk, dv)
        }
    };
    let dtype = whole.dtype;
    let join = |parts: &[Tensor], like: &Tensor| -> Result<Tensor> {
        let out = Tensor::empty(like.client(), dtype, like.shape())?;
        let mut at = 0;
        for (c, part) in mine.iter().zip(parts) {
            copy_rows(part, 1, 0, &out, at, c.len())?;
            at += c.len();
        }
        Ok(out)
    };
    Ok(AttentionGrads {
        dq: join(&dq, q)?,
        dk: join(&dk, k)?,
        dv: join(&dv, v)?,
    })
}

/// Rank `r`'s local tensor of the whole-sequence tensor `t` (token axis `axis`: 1 for
/// `[B, S, ...]`, 2 for lse `[B, H, S]`): its chunks' segments concatenated.
fn gather_local(t: &Tensor, chunks: &[RingChunk], axis: usize) -> Result<Tensor> {
    let mut shape = t.shape().to_vec();
    shape[axis] = chunks.iter().map(|c| c.len()).sum();
    let local = Tensor::empty(t.client(), t.dtype(), &shape)?;
    let mut at = 0;
    for s in chunks.iter().flat_map(|c| &c.segments) {
        copy_rows(t, axis, s.start, &local, at, s.len())?;
        at += s.len();
    }
    Ok(local)
}

/// Writes rank-local rows back into the whole tensor `whole` at their positions.
fn scatter_local(local: &Tensor, chunks: &[RingChunk], whole: &Tensor, axis: usize) -> Result<()> {
    let mut at = 0;
    for s in chunks.iter().flat_map(|c| &c.segments) {
        copy_rows(local, axis, at, whole, s.start, s.len())?;
        at += s.len();
    }
    Ok(())
}

/// The layout of whole-sequence inputs (already checked as one attention call): one
/// sequence per batch row, or the packed sequences of `cu_seqlens_q`, which must equal
/// `cu_seqlens_k` (a ring attends a sequence to itself).
fn whole_layout(
    inp: &AttentionInputs<'_>,
    world_size: usize,
    schedule: RingSchedule,
) -> Result<RingLayout> {
    let (q, k) = (inp.q, inp.k);
    if k.shape()[1] != q.shape()[1] {
        return Err(Error::Shape {
            tensor: "k".into(),
            expected: format!("[B, {}, Hkv, D] (one sequence: Sk = Sq)", q.shape()[1]),
            found: kiln_runtime::shape_str(k.shape()),
        });
    }
    match (inp.cu_seqlens_q, inp.cu_seqlens_k) {
        (None, None) => RingLayout::new(q.shape()[1], world_size, schedule),
        (Some(cq), Some(ck)) if cq == ck => RingLayout::varlen(cq, world_size, schedule),
        (cq, ck) => {
            let text = |c: Option<&[i32]>| c.map_or("absent".to_string(), |c| format!("{c:?}"));
            Err(Error::Param {
                param: "cu_seqlens_k".into(),
                expected: format!(
                    "equal to cu_seqlens_q, {} (a ring attends each sequence to itself)",
                    text(cq)
                ),
                found: text(ck),
            })
        }
    }
}

/// Ring attention of whole-sequence tensors (`[B, S, ...]`, or packed sequences with
/// `cu_seqlens_q` = `cu_seqlens_k` and B = 1) over `world_size` ranks in this process
/// (threads on q's device, the host-staged communicator): splits the sequence(s) as
/// `schedule` prescribes, runs every rank, and returns the whole `out` and `lse`. What
/// `kiln run ring_attention` does; equal to [`attention`] of the whole.
pub fn ring_attention_local_ranks(
    inp: &AttentionInputs<'_>,
    world_size: usize,
    schedule: RingSchedule,
    opts: &AttentionOptions,
) -> Result<AttentionOutput> {
    let whole = check(inp, opts)?;
    let layout = whole_layout(inp, world_size, schedule)?;
    let (q, k, v) = (inp.q, inp.k, inp.v);
    let parts = crate::launch::on_local_ranks(q.client(), "ring_attention", world_size, |c| {
        let chunks = layout.rank_chunks(c.rank());
        let local = |t: &Tensor| gather_local(t, &chunks, 1);
        ring_attention(c, &layout, &local(q)?, &local(k)?, &local(v)?, opts)
    })?;
    let out = Tensor::empty(q.client(), whole.out_dtype, &whole.out_shape())?;
    let lse = Tensor::empty(q.client(), DType::F32, &whole.lse_shape())?;
    for (r, part) in parts.iter().enumerate() {
        let chunks = layout.rank_chunks(r);
        scatter_local(&part.out, &chunks, &out, 1)?;
        scatter_local(&part.lse, &chunks, &lse, 2)?;
    }
    Ok(AttentionOutput { out, lse })
}

/// The backward of [`ring_attention_local_ranks`]: whole `q`, `k`, `v` (with their
/// `cu_seqlens`), `out`, `lse`, `do` in, whole dq, dk, dv out.
pub fn ring_attention_backward_local_ranks(
    inp: &AttentionInputs<'_>,
    grad: &AttentionGradInputs<'_>,
    world_size: usize,
    schedule: RingSchedule,
    opts: &AttentionOptions,
) -> Result<AttentionGrads> {
    let whole = check(inp, opts)?;
    check_grad_inputs(grad, &whole)?;
    let layout = whole_layout(inp, world_size, schedule)?;
    let (q, k, v) = (inp.q, inp.k, inp.v);
    let parts = crate::launch::on_local_ranks(q.client(), "ring_attention", world_size, |c| {
        let chunks = layout.rank_chunks(c.rank());
        let local = |t: &Tensor| gather_local(t, &chunks, 1);
        let (out, lse, d_o) = (
            local(grad.out)?,
            gather_local(grad.lse, &chunks, 2)?,
            local(grad.d_o)?,
        );
        let g = AttentionGradInputs {
            out: &out,
            lse: &lse,
            d_o: &d_o,
        };
        ring_attention_backward(c, &layout, &local(q)?, &local(k)?, &local(v)?, &g, opts)
    })?;
    let dq = Tensor::empty(q.client(), q.dtype(), q.shape())?;
    let dk = Tensor::empty(q.client(), q.dtype(), k.shape())?;
    let dv = Tensor::empty(q.client(), q.dtype(), v.shape())?;
    for (r, part) in parts.iter().enumerate() {
        let chunks = layout.rank_chunks(r);
        scatter_local(&part.dq, &chunks, &dq, 1)?;
        scatter_local(&part.dk, &chunks, &dk, 1)?;
        scatter_local(&part.dv, &chunks, &dv, 1)?;
    }
    Ok(AttentionGrads { dq, dk, dv })
}
