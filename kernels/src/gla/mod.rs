//! Gated Linear Attention (Yang et al., arXiv 2312.06635; the math and numerics are in `docs/gla.md`).
//!
//! Per (sequence, head), with the state `S` a `K x V` matrix:
//! `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`, `ht = S_T`.
//! Tensors (BTHD): q, k, g `[B, T, H, K]`; v `[B, T, H, V]`; h0, ht `[B, H, K, V]`
//! (f32); o `[B, T, H, V]` in q's dtype. `g` is the log decay (<= 0), f32 or q's dtype,
//! upcast to f32. Varlen batches: `B = 1` and `cu_seqlens` (N + 1 row offsets), each
//! sequence starting from its own `h0` row (or zero); states are then `[N, H, K, V]`.
//!
//! - [`gla`]: the chunkwise-parallel forward (chunks of `chunk_size` rows; state pass
//!   over chunks, intra-chunk scores in f32 with every exponent `<= 0`).
//! - [`gla_recurrent`]: the step-by-step forward (short sequences, cross-check).
//! - [`gla_step`]: one decode step against a device-resident state, updated in place.
//! - [`gla_backward`]: chunked backward. Gradients come back in the dtype of their
//!   input (dq, dk, dv in q's dtype, dg in g's dtype), dh0 in f32; every
//!   intermediate is f32.
//!
//! Accumulation is f32 for every input dtype. Chunk sizes 16, 32 and 64 are supported
//! (64 by default, as fla). Sequence offsets, chunk tables and all indices are 32-bit:
//! problems whose per-chunk states exceed 2^32 elements are refused.

mod backward;
mod chunk_backward;
mod chunk_output;
mod chunk_state;
mod forward;
mod fused;
mod problem;
mod recurrent;
pub mod reference;
mod registry;
pub mod selftest;
mod sequential;

pub use backward::gla_backward;
pub use chunk_backward::{GlaBwdDg, GlaBwdDgArgs, GlaBwdDqk, GlaBwdDqkArgs};
pub use chunk_output::{GlaChunkOut, GlaChunkOutArgs, GlaScores, GlaScoresArgs};
pub use chunk_state::{GlaCumsum, GlaCumsumArgs, GlaStatePass, GlaStatePassArgs};
pub use forward::gla;
pub use fused::{GlaFusedFwd, GlaFusedFwdArgs, GlaFusedFwdProblem, FUSED_CHUNK};
pub use recurrent::{
    steps_per_round, GlaRecurrent, GlaRecurrentArgs, GlaRecurrentProblem, StateInit, ToF32,
    ToF32Args,
};
pub use registry::{GLA, GLA_BACKWARD, GLA_RECURRENT, GLA_STEP};
pub use sequential::{gla_recurrent, gla_step};

use kiln_runtime::{Result, Tensor};
use problem::check;

/// Chunk lengths the chunked kernels support.
pub const CHUNK_SIZES: [usize; 3] = [16, 32, 64];

/// The forward's algorithm (fla's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlaMode {
    /// The autotuner times both algorithms per device and shape (`fused_chunk` only
    /// where K <= 128), unless `chunk_size` is given, which means `Chunk`.
    #[default]
    Auto,
    /// The chunk-parallel kernels: cumsum, state pass, scores, output (parallel over
    /// chunks; what a GPU wants).
    Chunk,
    /// One kernel walking each sequence in chunks of 16 rows with the state in
    /// registers (parallel over sequences, heads and V tiles only; what a CPU adapter
    /// wants). Needs K <= 128.
    FusedChunk,
}

impl std::fmt::Display for GlaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GlaMode::Auto => "auto",
            GlaMode::Chunk => "chunk",
            GlaMode::FusedChunk => "fused_chunk",
        })
    }
}

/// Options of the forward and backward operators.
#[derive(Clone, Debug)]
pub struct GlaOptions {
    /// Score scale; `None` means `K^-1/2`.
    pub scale: Option<f64>,
    /// Whether the forward returns the final state `ht`.
    pub output_final_state: bool,
    /// Rows per chunk of the chunked kernels: 16, 32 or 64; `None` lets the autotuner
    /// pick among them (per device and bucketed shape, like a kernel tunable).
    pub chunk_size: Option<usize>,
    /// The forward's algorithm (the backward is always chunk-parallel).
    pub mode: GlaMode,
}

impl Default for GlaOptions {
    fn default() -> Self {
        Self {
            scale: None,
            output_final_state: false,
            chunk_size: None,
            mode: GlaMode::Auto,
        }
    }
}

/// The inputs of the forward (and of the backward, with [`GlaGradInputs`]).
#[derive(Clone, Copy)]
pub struct GlaInputs<'a> {
    /// Queries `[B, T, H, K]`.
    pub q: &'a Tensor,
    /// Keys `[B, T, H, K]`, q's dtype.
    pub k: &'a Tensor,
    /// Values `[B, T, H, V]`, q's dtype.
    pub v: &'a Tensor,
    /// Log decays `[B, T, H, K]`, <= 0, f32 or q's dtype.
    pub g: &'a Tensor,
    /// Initial states `[N, H, K, V]` f32 (N = B, or the number of varlen sequences).
    pub h0: Option<&'a Tensor>,
    /// Varlen row offsets (N + 1 entries, 0 first, T last, non-decreasing); needs B = 1.
    pub cu_seqlens: Option<&'a [i32]>,
}

/// The forward's results.
pub struct GlaOutput {
    /// `[B, T, H, V]`, q's dtype.
    pub o: Tensor,
    /// `[N, H, K, V]` f32, when asked for.
    pub ht: Option<Tensor>,
}

/// The backward's extra inputs.
#[derive(Clone, Copy)]
pub struct GlaGradInputs<'a> {
    /// dL/do `[B, T, H, V]`, q's dtype.
    pub d_o: &'a Tensor,
    /// dL/dht `[N, H, K, V]` f32.
    pub dht: Option<&'a Tensor>,
}

/// The backward's results.
pub struct GlaGrads {
    /// `[B, T, H, K]`, q's dtype.
    pub dq: Tensor,
    /// `[B, T, H, K]`, q's dtype.
    pub dk: Tensor,
    /// `[B, T, H, V]`, q's dtype.
    pub dv: Tensor,
    /// `[B, T, H, K]`, g's dtype.
    pub dg: Tensor,
    /// `[N, H, K, V]` f32, when `h0` was given.
    pub dh0: Option<Tensor>,
}

/// The f64 reference dimensions of a checked problem (for tests and `kiln selftest`).
pub fn reference_dims(inp: &GlaInputs<'_>) -> Result<reference::Dims> {
    Ok(check(inp, None)?.dims())
}
