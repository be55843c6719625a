//! Attention blocks that also return their log-sum-exp, the stable merge of two
//! partial results, and (on top of both) ring attention. The math, schedules and
//! numerics are in `docs/attention.md`.
//!
//! Layouts (token-major, as flash-attention): `q` `[B, Sq, H, D]`, `k` `[B, Sk, Hkv, D]`,
//! `v` `[B, Sk, Hkv, Dv]` with `H` a multiple of `Hkv` (grouped-query: query head `h`
//! reads KV head `h / (H / Hkv)`); `out` `[B, Sq, H, Dv]`; `lse` `[B, H, Sq]` f32, natural
//! log. Varlen batches: `B = 1` and `cu_seqlens_q` / `cu_seqlens_k` (N + 1 offsets each).
//!
//! For query row `i` and key `j` of one sequence, with `s_ij = scale q_i . k_j`:
//! `p_ij = softmax_j(s_ij / T)` over the keys the mask allows (`causal`: `k_offset + j
//! <= q_offset + i`), `out_i = sum_j p_ij v_j`, `lse_i = T ln sum_j exp(s_ij / T) +
//! ln(lse_scale)` (APE's temperature `T` and scale; both 1 by default). A row with no
//! allowed key has `out = 0` and `lse = -inf`, never NaN.
//!
//! - [`attention`]: one pass over key tiles with an online softmax (nothing of size
//!   `Sq x Sk` in memory); f32 accumulation for every dtype.
//! - [`attention_backward`]: dq, dk, dv from `out`, `lse` and `do` (delta computed once;
//!   dk and dv summed over each KV head's query group without atomics).
//! - [`attention_merge`]: `out = out_a - sigmoid(lse_b - lse_a) (out_a - out_b)`,
//!   `lse = lse_a - logsigmoid(lse_a - lse_b)`, in place on `out_a` / `lse_a`.

#[macro_use]
mod tile;
mod backward;
mod backward_tc;
mod forward;
mod merge;
mod problem;
pub mod reference;
mod registry;
mod ring;
mod rows;
pub mod selftest;
mod tensor_core;

pub use backward::{
    attention_backward, attention_backward_with, AttentionBwdDkv, AttentionBwdDkvArgs,
    AttentionBwdDq, AttentionBwdDqArgs, AttentionBwdPrep, AttentionBwdPrepArgs,
    AttentionGradInputs, AttentionGrads, BackwardKernel,
};
pub use backward_tc::{
    AttentionBwdDkvCmma, AttentionBwdDkvCmmaArgs, AttentionBwdDqCmma, AttentionBwdDqCmmaArgs,
};
pub use forward::{attention, attention_with, AttentionFwd, AttentionFwdArgs, ForwardKernel};
pub use merge::{
    attention_merge, AttentionMergeRows, AttentionMergeRowsArgs, AttentionMergeRowsProblem,
};
pub use registry::{
    ATTENTION, ATTENTION_BACKWARD, ATTENTION_MERGE, RING_ATTENTION, RING_ATTENTION_BACKWARD,
};
pub use ring::{
    ring_attention, ring_attention_backward, ring_attention_backward_local_ranks,
    ring_attention_local_ranks, RingLayout, RingSchedule,
};
pub use rows::{AttentionFwdRows, AttentionFwdRowsArgs, AttentionFwdRowsProblem};
pub use tensor_core::{AttentionFwdCmma, AttentionFwdCmmaArgs, AttentionFwdCmmaProblem};

use kiln_runtime::{DType, Tensor};

/// Largest head dimension (`D` and `Dv`) the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

/// Parameters of [`attention`] (and of the backward and the ring operators).
#[derive(Clone, Debug)]
pub struct AttentionOptions {
    /// Score scale; `None` means `D^-1/2`.
    pub scale: Option<f64>,
    /// Mask keys after the query: key `j` is seen by query `i` iff
    /// `k_offset + j <= q_offset + i`.
    pub causal: bool,
    /// Position of the block's first query row in the whole sequence (causal mask).
    pub q_offset: usize,
    /// Position of the block's first key in the whole sequence (causal mask).
    pub k_offset: usize,
    /// Softmax temperature `T > 0` (APE): probabilities of `s / T`, `lse` scaled by `T`.
    pub temperature: f64,
    /// APE's scale `S > 0`: `ln S` is added to `lse` (not to `out`).
    pub lse_scale: f64,
    /// Dtype of `out`: `None` means q's dtype; `Some(F32)` for partial blocks that are
    /// merged afterwards.
    pub out_dtype: Option<DType>,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self {
            scale: None,
            causal: false,
            q_offset: 0,
            k_offset: 0,
            temperature: 1.0,
            lse_scale: 1.0,
            out_dtype: None,
        }
    }
}

/// The inputs of [`attention`].
#[derive(Clone, Copy)]
pub struct AttentionInputs<'a> {
    /// Queries `[B, Sq, H, D]`.
    pub q: &'a Tensor,
    /// Keys `[B, Sk, Hkv, D]`, q's dtype.
    pub k: &'a Tensor,
    /// Values `[B, Sk, Hkv, Dv]`, q's dtype.
    pub v: &'a Tensor,
    /// Varlen query offsets (N + 1 entries, 0 first, Sq last, non-decreasing; B = 1).
    pub cu_seqlens_q: Option<&'a [i32]>,
    /// Varlen key offsets (N + 1 entries, 0 first, Sk last, non-decreasing; B = 1).
    pub cu_seqlens_k: Option<&'a [i32]>,
}

impl<'a> AttentionInputs<'a> {
    /// Dense (not varlen) inputs.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Self {
            q,
            k,
            v,
            cu_seqlens_q: None,
            cu_seqlens_k: None,
        }
    }
}

/// The results of [`attention`].
pub struct AttentionOutput {
    /// `[B, Sq, H, Dv]` in `out_dtype`.
    pub out: Tensor,
    /// `[B, H, Sq]` f32, natural log; `-inf` for rows that see no key.
    pub lse: Tensor,
}
