//! Mixture-of-Experts: top-k gating with deterministic slots, dispatch and combine
//! (forward and backward), the grouped expert FFN in the capacity and the sorted
//! (dropless) layouts, and the whole layer, on one device or expert-parallel over a
//! [`Communicator`](kiln_runtime::comm::Communicator). The math is in `docs/moe.md`.
//!
//! Gating, per token `s` of `logits` `[S, E]` (softmax in f32 for every dtype):
//! `p = softmax(logits_s)`; the top-k experts `I_1..I_k` by `p` (ties: the lower expert
//! index); `g_i = p[I_i]`, renormalised `g_i / max(sum g, eps)` when `normalize` (before
//! any drop); `l_aux = E sum_e mean_s p[s, e] * mean_s 1[I_1[s] = e]` (Tutel's
//! load-balancing loss, top-1 counted before drops).
//!
//! Slots: the location of route `(s, i)` at expert `e = I_i[s]` counts the routes before
//! it in the order (every first choice, token order; then every second choice; ...),
//! optionally with tokens ordered by descending top-1 probability (`batch_prioritized`).
//! A route is kept iff its location `< capacity`; capacity `C = k floor(cf ceil(S / E))`
//! (Tutel), or with `cf = 0` (dropless) the largest count at one expert. Counting is an
//! exclusive prefix count computed per chunk of tokens and scanned in a fixed order: no
//! atomic counters, so the same input drops the same routes on every run and backend.
//!
//! Data movement (no float atomics anywhere; every reduction over routes is a gather):
//! - dispatch `D[e, loc] = x[s]` through a slot -> route map (empty slots are zero);
//! - combine `y[s] = sum_i keep_i g_i Y[I_i, loc_i]`, summed in choice order;
//! - backward: `dx[s] = sum_i keep_i dD[I_i, loc_i]`, `dY[I_i, loc_i] = g_i dy[s]`,
//!   `dg_i = keep_i <dy[s], Y[I_i, loc_i]>`, and `d_logits` through the renormalisation,
//!   the softmax and `l_aux`.
//!
//! Layouts of the expert rows: the capacity layout `[E, C, M]` (slot `(e, loc)` at row
//! `e C + loc`, empty slots zero) and the sorted layout (the kept routes grouped by
//! expert, expert `e`'s rows at `offsets[e] .. offsets[e + 1]`, no padding at all: a
//! GEMM tile never straddles two experts because tiles are cut per expert).

mod backward;
mod cost;
mod expert_parallel;
mod ffn;
mod gate;
mod grouped;
mod layer;
mod movement;
pub mod reference;
mod registry;
mod routing;
pub mod selftest;

pub use backward::{moe_layer_backward, LayerGrads, MoeActivation, MoeActivationArgs};
pub use expert_parallel::{
    moe_layer_backward_expert_parallel, moe_layer_expert_parallel, moe_layer_expert_parallel_on,
};
pub use ffn::{
    moe_expert_ffn, moe_expert_ffn_on, moe_expert_ffn_sorted, moe_expert_ffn_sorted_on,
    moe_expert_ffn_sorted_with, moe_expert_ffn_with, moe_grouped_matmul_with, ExpertWeights,
    GroupedConfig, GroupedKernel, MoeGroupedMatmul, MoeGroupedMatmulArgs, MoeGroupedMatmulCmma,
    MoeGroupedMatmulCmmaArgs, MoeGroupedMatmulCmmaConfig, MoeGroupedMatmulCmmaProblem,
    MoeGroupedMatmulConfig, MoeGroupedMatmulProblem, MoeGroupedMatmulV4, MoeGroupedMatmulV4Args,
    MoeGroupedMatmulV4Config, MoeGroupedMatmulV4Problem,
};
pub use gate::{
    moe_gate, moe_gate_backward, GateOptions, GateOutput, MoeColumnSums, MoeColumnSumsArgs,
    MoeGateBackwardRows, MoeGateBackwardRowsArgs, MoeGateTopk, MoeGateTopkArgs,
};
pub use layer::{
    moe_layer, moe_layer_backward_local_ranks, moe_layer_local_ranks, moe_layer_local_ranks_on,
    moe_layer_on, LayerOptions, LayerOutput, MoePath,
};
pub use movement::{
    moe_combine, moe_combine_backward, moe_dispatch, moe_dispatch_backward, MoeCombineRows,
    MoeCombineRowsArgs, MoeCombineRowsV4, MoeCombineRowsV4Args, MoeGateGrads, MoeGateGradsArgs,
    MoeGatherRows, MoeGatherRowsArgs, MoeGatherRowsV4, MoeGatherRowsV4Args,
};
pub use registry::{
    MOE_COMBINE, MOE_COMBINE_BACKWARD, MOE_DISPATCH, MOE_DISPATCH_BACKWARD, MOE_EXPERT_FFN,
    MOE_GATE, MOE_GATE_BACKWARD, MOE_LAYER, MOE_LAYER_BACKWARD,
};
pub use routing::{MoeRouteScan, MoeRouteScanArgs, MoeRouteSlots, MoeRouteSlotsArgs, MoeRouting};

/// Largest `top_k` (the gating kernels keep the k choices of a token in registers).
pub const MAX_TOP_K: usize = 8;

/// The renormalisation floor of the k gates: f32's epsilon (Tutel's `finfo.eps`).
pub const GATE_EPS: f32 = f32::EPSILON;

/// Tutel's capacity for `tokens` over `experts` at capacity factor `cf > 0`:
/// `k floor(cf ceil(S / E))`.
pub fn capacity_for(tokens: usize, experts: usize, top_k: usize, cf: f64) -> usize {
    let per_expert = tokens.div_ceil(experts.max(1));
    // Saturating (f64 -> usize casts saturate too): callers bound it (`moe_gate`).
    top_k.saturating_mul((cf * per_expert as f64).floor() as usize)
}
