//! S²FT, structured-sparse fine-tuning ("select sparsely, compute densely"): pick a few
//! attention heads and FFN channels per block, co-permute the coupled weight matrices so
//! the picked pieces form one dense submatrix, train only those submatrices with partial
//! backpropagation, update them in place, and serve many fine-tunes over one base
//! weight. The math, layouts and numbers are in `docs/s2ft.md`.
//!
//! Weights are in PyTorch's `[out, in]` layout (`y = x W^T`): `W_q` `[H hd, d]`, `W_k`,
//! `W_v` `[Hkv hd, d]`, `W_o` `[d, H hd]`, `W_up`, `W_gate` `[F, d]`, `W_down` `[d, F]`.
//!
//! - **Units** (`select.rs`): a KV group of heads for attention (with `Hkv = H`, one
//!   head: `hd` rows of `W_k`/`W_v`, `H / Hkv` heads of `W_q` and of `W_o`'s columns), one
//!   channel for the FFN. Two sets are picked per coupled pair: A, the units whose rows
//!   are trained (`W_v`, `W_up`, `W_gate`), and B, those whose columns are trained
//!   (`W_o`, `W_down`).
//! - **Co-permutation** (`permute.rs`): new unit order A-only, shared, B-only, the rest
//!   (each ascending), applied to every matrix of the pair (rows of `W_q`, `W_k`, `W_v`,
//!   `W_up`, `W_gate`; columns of `W_o`, `W_down`), so the layer's function is unchanged
//!   and both trainable sets are contiguous: the row block is units `0 .. |A|`, the
//!   column block units `|A-only| .. |A| + |B-only|`.
//! - **Partial backpropagation** (`grads.rs`): row block `dDelta = dY[:, 0:r]^T X`,
//!   column block `dDelta = dY^T X[:, s:e]` (only the slice is saved), `dX = dY W` on
//!   request; GEMMs reading column windows in place, f32 accumulation.
//! - **In-place optimizer** (`adamw.rs`): PyTorch's AdamW on the blocks only, state for
//!   the blocks only, an f32 master copy of a half-precision block, one launch for up to
//!   [`BLOCKS_PER_LAUNCH`] blocks.
//! - **Serving** (`adapter.rs`): `y = x W0^T` plus each token's own fine-tune's block
//!   delta (`adapter_ids`), and merge/unmerge of one fine-tune into `W0` in place.

mod adamw;
mod adapter;
mod block;
mod grads;
mod llama;
mod permute;
pub mod reference;
mod registry;
mod select;
pub mod selftest;

pub use adamw::{AdamWConfig, S2ftAdamW, BLOCKS_PER_LAUNCH};
pub use adapter::{
    s2ft_adapter_forward, s2ft_merge, S2ftAdapterDelta, S2ftAdapterDeltaArgs, S2ftBlockAdd,
    S2ftBlockAddArgs,
};
pub use block::{
    ffn_forward, swiglu, swiglu_backward, FfnActivations, FfnWeights, S2ftSwiglu, S2ftSwigluArgs,
};
pub use grads::{s2ft_partial_backward, s2ft_save_slice, Block};
pub use llama::{LlamaTrainer, LlamaWeights, StepStats};
pub use permute::{
    s2ft_permute, s2ft_permute_attention, s2ft_permute_ffn, s2ft_permute_in_place,
    s2ft_verify_attention, s2ft_verify_ffn, AttentionWeights, Axis, HeadLayout, S2ftPermuteUnits,
    S2ftPermuteUnitsArgs, VerifyReport,
};
pub use registry::{
    S2FT_ADAMW_STEP, S2FT_ADAPTER_FORWARD, S2FT_MERGE, S2FT_PARTIAL_BACKWARD, S2FT_PERMUTE,
    S2FT_SELECT, S2FT_VERIFY,
};
pub use select::{
    s2ft_select, S2ftPermutation, S2ftUnitScores, S2ftUnitScoresArgs, Strategy, MAX_UNITS,
};
