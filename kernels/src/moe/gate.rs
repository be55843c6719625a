//! Top-k gating: softmax and top-k per token (`moe_gate_topk`), the deterministic slot
//! count (`routing`), Tutel's load-balancing loss (`moe_column_sums`), and the backward
//! through the renormalisation, the softmax and the loss (`moe_gate_backward_rows`).

use super::routing::{check_routes, count_slots, locate_slots, MoeRouting, SlotCounts};
use super::{capacity_for, GATE_EPS, MAX_TOP_K};
use crate::launch::{check_input, expect_shape, shape_err, upload_u32};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{Client, DType, Error, HostTensor, Result, Tensor};

/// Parameters of [`moe_gate`].
#[derive(Clone, Copy, Debug)]
pub struct GateOptions {
    /// Experts per token, `1 ..= min(8, E)`.
    pub top_k: usize,
    /// `> 0`: capacity `k floor(cf ceil(S / E))` slots per expert; `0`: dropless (the
    /// capacity is the busiest expert's route count).
    pub capacity_factor: f64,
    /// Renormalise the k gates to sum 1 (before any drop); `None`: for `k > 1`.
    pub normalize: Option<bool>,
    /// Count slots with tokens ordered by descending top-1 probability (ties: token
    /// order), so confident tokens keep their slots.
    pub batch_prioritized: bool,
}

impl GateOptions {
    /// Top-`k` gating at capacity factor `cf` with the defaults.
    pub fn new(top_k: usize, capacity_factor: f64) -> Self {
        GateOptions {
            top_k,
            capacity_factor,
            normalize: None,
            batch_prioritized: false,
        }
    }

    pub(super) fn normalize(&self) -> bool {
        self.normalize.unwrap_or(self.top_k > 1)
    }
}

/// The results of [`moe_gate`].
pub struct GateOutput {
    /// Ids, gates, locations and capacity.
    pub routing: MoeRouting,
    /// The load-balancing loss, a scalar f32 tensor (shape `[]`).
    pub l_aux: Tensor,
}

/// Checks `logits` `[S, E]` and the options; returns `(S, E)`.
pub(super) fn check_gate(logits: &Tensor, opts: &GateOptions) -> Result<(usize, usize)> {
    check_input("logits", logits, logits.client())?;
    let &[s, e] = logits.shape() else {
        return Err(shape_err("logits", "[S, E]".into(), logits.shape()));
    };
    if e == 0 {
        return Err(shape_err(
            "logits",
            "[S, E] with E >= 1 experts".into(),
            logits.shape(),
        ));
    }
    if opts.top_k == 0 || opts.top_k > e.min(MAX_TOP_K) {
        return Err(Error::Param {
            param: "top_k".into(),
            expected: format!("1 ..= min(8, E = {e})"),
            found: opts.top_k.to_string(),
        });
    }
    let cf = opts.capacity_factor;
    if !(cf.is_finite() && cf >= 0.0) {
        return Err(Error::Param {
            param: "capacity_factor".into(),
            expected: "a finite number >= 0 (0: dropless)".into(),
            found: cf.to_string(),
        });
    }
    // The capacity is an i32 output and sizes `[E, C, M]` buffers: refused where it
    // would pass i32 (a factor that large keeps every route anyway).
    let capacity = opts.top_k as f64 * (cf * s.div_ceil(e) as f64).floor();
    if capacity > i32::MAX as f64 {
        return Err(Error::Param {
            param: "capacity_factor".into(),
            expected: format!(
                "a capacity top_k floor(cf ceil(S / E)) of at most {} (S = {s}, E = {e})",
                i32::MAX
            ),
            found: cf.to_string(),
        });
    }
    check_routes("logits", logits.shape(), s, opts.top_k)?;
    Ok((s, e))
}

/// Softmax and top-k of `logits` into `expert_ids`, `gates` (renormalised when asked)
/// and `probs` `[S, E]` f32; `top1` `[S]` is each token's largest probability.
pub(super) struct TopK {
    pub ids: Tensor,
    pub gates: Tensor,
    pub probs: Tensor,
    pub top1: Tensor,
}

pub(super) fn top_k(
    logits: &Tensor,
    s: usize,
    e: usize,
    k: usize,
    normalize: bool,
) -> Result<TopK> {
    let client = logits.client();
    let t = TopK {
        ids: Tensor::empty(client, DType::I32, &[s, k])?,
        gates: Tensor::empty(client, DType::F32, &[s, k])?,
        probs: Tensor::empty(client, DType::F32, &[s, e])?,
        top1: Tensor::empty(client, DType::F32, &[s])?,
    };
    if s > 0 {
        MoeGateTopk::tuned(
            client,
            0.0,
            &MoeGateTopkArgs {
                logits,
                expert_ids: &t.ids,
                gates: &t.gates,
                probs: &t.probs,
                top1: &t.top1,
                tokens: s as u32,
                experts: e as u32,
                top_k: k as u32,
                normalize,
            },
        )?;
    }
    Ok(t)
}

/// The counting order: tokens by descending top-1 probability (stable), as u32 on the
/// device; a one-element placeholder when not prioritised.
pub(super) fn counting_order(client: &Client, top1: &Tensor, prioritized: bool) -> Result<Tensor> {
    if !prioritized {
        return upload_u32(client, "order", &[]);
    }
    let p = top1.download()?.to_f64();
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    // Descending, NaN last, ties in token order (a stable sort).
    order.sort_by(|&a, &b| {
        let (x, y) = (p[a as usize], p[b as usize]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
    });
    upload_u32(client, "order", &order)
}

/// The capacity of a batch of `s` tokens: from the capacity factor, or (dropless) the
/// busiest expert's routes.
pub(super) fn capacity_of(s: usize, e: usize, opts: &GateOptions, per_expert: &[usize]) -> usize {
    if opts.capacity_factor > 0.0 {
        capacity_for(s, e, opts.top_k, opts.capacity_factor)
    } else {
        per_expert.iter().copied().max().unwrap_or(0)
    }
}

/// Each expert's share of top-1 routes, `count / S` (f32 `[E]`), from the slot counts.
fn top1_share(counts: &SlotCounts, s: usize) -> Vec<f64> {
    (0..counts.experts)
        .map(|e| counts.total(0, e) as f64 / s.max(1) as f64)
        .collect()
}

/// Top-k gating of `logits` `[S, E]` (f32/f16/bf16; softmax in f32): expert ids, gates
/// and slot locations `[S, k]`, the capacity, and `l_aux`. See the module docs for the
/// rules; every step is deterministic.
pub fn moe_gate(logits: &Tensor, opts: &GateOptions) -> Result<GateOutput> {
    let (s, e) = check_gate(logits, opts)?;
    let (k, client) = (opts.top_k, logits.client());
    let t = top_k(logits, s, e, k, opts.normalize())?;
    let order = counting_order(client, &t.top1, opts.batch_prioritized)?;
    let counts = count_slots(client, &t.ids, &order, opts.batch_prioritized, e)?;
    let per_expert: Vec<usize> = (0..e)
        .map(|x| (0..k).map(|i| counts.total(i, x)).sum())
        .collect();
    let capacity = capacity_of(s, e, opts, &per_expert);
    let locations = Tensor::empty(client, DType::I32, &[s, k])?;
    if s > 0 {
        locate_slots(
            client,
            &t.ids,
            &order,
            opts.batch_prioritized,
            &counts,
            &counts.bases(),
            capacity,
            &locations,
        )?;
    }
    let sums = prob_column_sums(&t.probs, s, e)?;
    let l_aux = load_balancing_loss(&sums, &top1_share(&counts, s), s);
    let l_aux = Tensor::upload_named(
        client,
        "l_aux",
        &HostTensor::from_f64(DType::F32, vec![], &[l_aux])?,
    )?;
    Ok(GateOutput {
        routing: MoeRouting::from_gate(t.ids, locations, Some(t.gates), capacity, &per_expert),
        l_aux,
    })
}

/// The gradient of the loss with respect to `logits` `[S, E]` (logits' dtype), given
/// the gradient of the gates `d_gates` `[S, k]` f32 (zero for dropped routes, as
/// [`super::moe_combine_backward`] returns it) and of `l_aux` (a number). The top-k
/// choice is recomputed from `logits` and held fixed; the top-1 shares in `l_aux` are
/// counts (no gradient), so `d l_aux / d p[s, e] = E share_e / S`.
pub fn moe_gate_backward(
    logits: &Tensor,
    d_gates: &Tensor,
    d_l_aux: f64,
    opts: &GateOptions,
) -> Result<Tensor> {
    let (s, e) = check_gate(logits, opts)?;
    let (k, client) = (opts.top_k, logits.client());
    d_gates.expect_usable("d_gates", client)?;
    d_gates.expect_dtype("d_gates", &[DType::F32])?;
    expect_shape("d_gates", d_gates, &[s, k], "[S, top_k] of logits")?;
    if !d_l_aux.is_finite() {
        return Err(Error::Param {
            param: "d_l_aux".into(),
            expected: "a finite number".into(),
            found: d_l_aux.to_string(),
        });
    }
    if s == 0 {
        return Tensor::empty(client, logits.dtype(), &[s, e]);
    }
    let order = upload_u32(client, "order", &[])?;
    let t = top_k(logits, s, e, k, opts.normalize())?;
    let counts = count_slots(client, &t.ids, &order, false, e)?;
    let aux: Vec<f64> = top1_share(&counts, s)
        .iter()
        .map(|sh| d_l_aux * e as f64 * sh / s as f64)
        .collect();
    gate_backward_with(logits, d_gates, &aux, opts)
}

/// [`moe_gate_backward`] with the gradient of `l_aux` through each expert's
/// probabilities given (`aux[e] = d l_aux / d p[s, e]` times the upstream gradient):
/// expert parallelism passes the global top-1 shares and token count.
pub(super) fn gate_backward_with(
    logits: &Tensor,
    d_gates: &Tensor,
    aux: &[f64],
    opts: &GateOptions,
) -> Result<Tensor> {
    let (s, e) = (logits.shape()[0], logits.shape()[1]);
    let (k, client) = (opts.top_k, logits.client());
    let d_logits = Tensor::empty(client, logits.dtype(), &[s, e])?;
    if s == 0 {
        return Ok(d_logits);
    }
    let t = top_k(logits, s, e, k, opts.normalize())?;
    let aux = Tensor::upload_named(
        client,
        "aux_grad",
        &HostTensor::from_f64(DType::F32, vec![e], aux)?,
    )?;
    MoeGateBackwardRows::tuned(
        client,
        0.0,
        &MoeGateBackwardRowsArgs {
            logits,
            expert_ids: &t.ids,
            d_gates,
            aux_grad: &aux,
            d_logits: &d_logits,
            tokens: s as u32,
            experts: e as u32,
            top_k: k as u32,
            normalize: opts.normalize(),
        },
    )?;
    Ok(d_logits)
}

/// The row maximum of `logits[row .. row + experts]` in f32, never below f32's lowest
/// (so an all `-inf` row gives `exp(-inf - lowest) = 0`, not NaN).
#[cube]
fn row_max<F: Float>(logits: &Array<F>, row: u32, experts: u32) -> f32 {
    let mut mx = f32::min_value();
    for j in 0..experts {
        mx = max(mx, f32::cast_from(logits[(row + j) as usize]));
    }
    mx
}

/// `1 / sum_j exp(logits[row + j] - mx)`, or 0 for a row with no mass (a NaN logit
/// makes it NaN, so the token's gates and output are NaN, not silently zero).
#[cube]
fn row_inv_sum<F: Float>(logits: &Array<F>, row: u32, experts: u32, mx: f32) -> f32 {
    let mut sum = 0.0f32;
    for j in 0..experts {
        sum += f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx);
    }
    select(sum == 0.0, 0.0f32, 1.0 / sum)
}

/// One unit per token: the softmax of its logits (`probs`), then its top-k by repeated
/// selection in the order (logit descending, expert ascending): choice `i` is the
/// first maximum among the experts after choice `i - 1` in that order, so ties go to
/// the lower index and no chosen set is stored. Selection compares the logits (the
/// same order as the probabilities, without their rounding).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(tokens = pow2, experts = pow2, dtype),
    grid = cubes(tokens.div_ceil(UNITS)),
    cube = UNITS,
    defaults(normalize = true)
)]
pub fn moe_gate_topk<F: Float>(
    logits: &Array<F>,
    expert_ids: &mut Array<i32>,
    gates: &mut Array<f32>,
    probs: &mut Array<f32>,
    top1: &mut Array<f32>,
    tokens: u32,
    experts: u32,
    top_k: u32,
    #[comptime] normalize: bool,
) {
    let s = linear_unit() as u32;
    if s < tokens {
        let row = s * experts;
        let mx = row_max::<F>(logits, row, experts);
        let inv = row_inv_sum::<F>(logits, row, experts, mx);
        for j in 0..experts {
            let x = f32::cast_from(logits[(row + j) as usize]);
            probs[(row + j) as usize] = f32::exp(x - mx) * inv;
        }
        let mut prev_v = 0.0f32;
        let mut prev_j = 0u32;
        let mut gsum = 0.0f32;
        for i in 0..top_k {
            let mut best_v = 0.0f32;
            let mut best_j = experts;
            for j in 0..experts {
                let v = f32::cast_from(logits[(row + j) as usize]);
                let after = i == 0 || v < prev_v || (v == prev_v && j > prev_j);
                if after && (best_j == experts || v > best_v) {
                    best_v = v;
                    best_j = j;
                }
            }
            // Only NaN logits leave nothing eligible: keep the ids in range.
            best_j = min(best_j, experts - 1);
            let p = probs[(row + best_j) as usize];
            expert_ids[(s * top_k + i) as usize] = best_j as i32;
            gates[(s * top_k + i) as usize] = p;
            gsum += p;
            if i == 0 {
                top1[s as usize] = p;
            }
            prev_v = best_v;
            prev_j = best_j;
        }
        if comptime!(normalize) {
            let denom = max(gsum, comptime!(GATE_EPS));
            for i in 0..top_k {
                let at = (s * top_k + i) as usize;
                gates[at] = gates[at] / denom;
            }
        }
    }
}

/// Rows of `[R, E]` one cube of [`moe_column_sums`] adds.
pub(super) const SUM_ROWS: u32 = 256;

/// Each column's sum over every row of `probs` `[S, E]` f32, the tree of
/// [`moe_column_sums`] launches (each adds at most 256 rows a cube, so no f32 sum runs
/// over more than 256 terms, in a fixed order whatever the device), downloaded as
/// f64 `[E]` (zeros where S = 0). For `l_aux`'s `mean_s p[s, e]`: one f32 running sum
/// over the tokens drifted by 4 % at S = 4M with E = 10 (every add rounded alike).
pub(super) fn prob_column_sums(probs: &Tensor, s: usize, e: usize) -> Result<Vec<f64>> {
    let client = probs.client();
    if s == 0 {
        return Ok(vec![0.0; e]);
    }
    let mut rows = s;
    let mut cur = probs.clone();
    while rows > 1 {
        let blocks = rows.div_ceil(SUM_ROWS as usize);
        let sums = Tensor::empty(client, DType::F32, &[blocks, e])?;
        MoeColumnSums::tuned(
            client,
            0.0,
            &MoeColumnSumsArgs {
                src: &cur,
                sums: &sums,
                rows: rows as u32,
                experts: e as u32,
            },
        )?;
        (cur, rows) = (sums, blocks);
    }
    Ok(cur.download()?.to_f64())
}

/// `l_aux = E sum_e (sums_e / S) share_e` from the column sums of the probabilities
/// and each expert's share of top-1 routes (of `S` tokens), in f64.
pub(super) fn load_balancing_loss(sums: &[f64], share: &[f64], s: usize) -> f64 {
    let inv_s = 1.0 / s.max(1) as f64;
    sums.len() as f64
        * sums
            .iter()
            .zip(share)
            .map(|(m, c)| m * inv_s * c)
            .sum::<f64>()
}

/// Column sums of `src` `[rows, E]` over blocks of [`SUM_ROWS`] rows: `sums[c, e]` is
/// the sum of column `e` over rows `c SUM_ROWS ..`. Units take the block's columns
/// `E' = min(E, UNITS)` at a time, `UNITS / E'` lanes to a column: lane `l` adds rows
/// `l, l + lanes, ..` (coalesced: a lane's columns sit side by side), then lane 0 adds
/// the lanes' partials in order. Deterministic; no f32 sum over more than 256 terms.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(rows = pow2, experts = pow2),
    // SUM_ROWS rows a cube.
    grid = cubes(rows.div_ceil(256)),
    cube = UNITS,
)]
pub fn moe_column_sums(src: &Array<f32>, sums: &mut Array<f32>, rows: u32, experts: u32) {
    let cube = kiln_dsl::linear_cube() as u32;
    let blocks = (rows + comptime!(SUM_ROWS - 1)) / comptime!(SUM_ROWS);
    let width = min(experts, UNITS);
    let lanes = UNITS / width;
    let lane = UNIT_POS / width;
    let column = UNIT_POS % width;
    let r0 = cube * comptime!(SUM_ROWS);
    let r_end = min(r0 + comptime!(SUM_ROWS), rows);
    let mut partial = SharedMemory::<f32>::new(UNITS as usize);
    // Uniform: every unit walks the same column groups and meets every barrier.
    let mut first = 0u32;
    while first < experts {
        let e = first + column;
        let mut acc = 0.0f32;
        if lane < lanes && e < experts {
            let mut r = r0 + lane;
            while r < r_end {
                acc += src[(r * experts + e) as usize];
                r += lanes;
            }
        }
        partial[UNIT_POS as usize] = acc;
        sync_cube();
        if lane == 0 && e < experts && cube < blocks {
            let mut total = 0.0f32;
            for l in 0..lanes {
                total += partial[(l * width + column) as usize];
            }
            sums[(cube * experts + e) as usize] = total;
        }
        sync_cube();
        first += width;
    }
}

/// One unit per token: `d_logits = p (dp - <p, dp>)` with `dp_j = aux_grad[j] +
/// sum_i [I_i = j] dg_i`, where `dg_i` is the gradient of the selected probability:
/// `(dĝ_i - sum_j dĝ_j ĝ_j) / denom` through the renormalisation `ĝ = g / denom`
/// (`denom = max(sum g, eps)`; below eps the denominator is a constant).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(tokens = pow2, experts = pow2, dtype),
    grid = cubes(tokens.div_ceil(UNITS)),
    cube = UNITS,
    defaults(normalize = true)
)]
pub fn moe_gate_backward_rows<F: Float>(
    logits: &Array<F>,
    expert_ids: &Array<i32>,
    d_gates: &Array<f32>,
    aux_grad: &Array<f32>,
    d_logits: &mut Array<F>,
    tokens: u32,
    experts: u32,
    top_k: u32,
    #[comptime] normalize: bool,
) {
    let s = linear_unit() as u32;
    if s < tokens {
        let row = s * experts;
        let mx = row_max::<F>(logits, row, experts);
        let inv = row_inv_sum::<F>(logits, row, experts, mx);
        let base = s * top_k;
        let mut gsum = 0.0f32;
        for i in 0..top_k {
            let j = expert_ids[(base + i) as usize] as u32;
            gsum += f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx) * inv;
        }
        let denom = max(gsum, comptime!(GATE_EPS));
        let above = gsum > comptime!(GATE_EPS);
        let mut dot = 0.0f32;
        if comptime!(normalize) {
            for i in 0..top_k {
                let j = expert_ids[(base + i) as usize] as u32;
                let p = f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx) * inv;
                dot += d_gates[(base + i) as usize] * p / denom;
            }
        }
        // <p, dp>: the aux part over every expert, then the selected ones.
        let mut pdp = 0.0f32;
        for j in 0..experts {
            let p = f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx) * inv;
            pdp += p * aux_grad[j as usize];
        }
        for i in 0..top_k {
            let j = expert_ids[(base + i) as usize] as u32;
            let p = f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx) * inv;
            pdp += p * selected_grad(d_gates[(base + i) as usize], dot, denom, above, normalize);
        }
        for j in 0..experts {
            let mut dp = aux_grad[j as usize];
            for i in 0..top_k {
                if expert_ids[(base + i) as usize] as u32 == j {
                    dp += selected_grad(d_gates[(base + i) as usize], dot, denom, above, normalize);
                }
            }
            let p = f32::exp(f32::cast_from(logits[(row + j) as usize]) - mx) * inv;
            d_logits[(row + j) as usize] = F::cast_from(p * (dp - pdp));
        }
    }
}

/// The gradient of a selected probability from its gate's gradient `dg` (see
/// `moe_gate_backward_rows`).
#[cube]
fn selected_grad(dg: f32, dot: f32, denom: f32, above: bool, #[comptime] normalize: bool) -> f32 {
    let mut out = dg;
    if comptime!(normalize) {
        out = select(above, (dg - dot) / denom, dg / denom);
    }
    out
}
