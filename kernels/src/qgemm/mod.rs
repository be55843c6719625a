//! Quantized GEMMs (the math and numerics are in `docs/qgemm.md`): weight-only int4 (GPTQ and AWQ
//! checkpoints), int8 x int8, int8 weights viewed at 8/6/4/2 bits (Double Rounding),
//! and FlexRound's fake quantization for training.
//!
//! - [`w4a16`]: `y = x @ W_hat`, `W_hat[k, n] = (q[k, n] - z[g, n]) s[g, n]` with
//!   `g = k / G` (or `g_idx[k]`). Reads GPTQ (v1 stores z - 1, v2 z) and AWQ
//!   checkpoints as they are by repacking them first ([`w4a16_repack`], a pass over
//!   the weight); repack once and call [`w4a16_packed`] to skip it. x f32/f16/bf16,
//!   f32 accumulation, y in x's dtype.
//! - [`w8a8`]: `y = sx sw (xq @ wq^T) + bias`, exact i32 accumulation; with
//!   [`quantize_per_token`] to turn float activations into `(xq, sx)`.
//! - [`w8_bits`]: int8 `q8` `[K, N]` with per-channel `s8`, used at 8, 6, 4 or 2 bits.
//! - [`flexround`] / [`flexround_backward`]: element-wise fake quantization and its
//!   straight-through gradients.
//!
//! Rounding is round-half-to-even everywhere (the per-token quantizer, Double
//! Rounding's shift, FlexRound), identically on every backend. Dequantization happens
//! inside the GEMM's main loop; few rows take a split-K GEMV kernel, many rows a
//! register-tiled one, chosen by the autotuner.

mod cost;
#[macro_use]
mod dequant;
mod flexround;
mod gemm;
#[macro_use]
mod int8;
pub mod reference;
mod registry;
pub mod selftest;
mod tensor_core;
mod w8a8_host;
mod weight_only;

pub use dequant::{
    QgemmDirect, QgemmDirectArgs, QgemmDirectProblem, QgemmGemv, QgemmGemvArgs, QgemmTiled,
    QgemmTiledArgs, W4a16Repack, W4a16RepackArgs, WeightKind, TILE_K,
};
pub use flexround::{
    FlexroundBackwardCols, FlexroundBackwardColsArgs, FlexroundBackwardRows,
    FlexroundBackwardRowsArgs, FlexroundBackwardTotal, FlexroundBackwardTotalArgs,
    FlexroundForward, FlexroundForwardArgs,
};
pub use int8::{
    TokenQuantize, TokenQuantizeArgs, TokenScale, TokenScaleArgs, W8a8Direct, W8a8DirectArgs,
    W8a8DirectProblem, W8a8Gemm, W8a8GemmArgs, W8a8Gemv, W8a8GemvArgs, INT8_TILE_K,
};
pub use registry::{
    FLEXROUND, FLEXROUND_BACKWARD, QUANTIZE_PER_TOKEN, W4A16, W4A16_REPACK, W8A8, W8_BITS,
};
pub use tensor_core::{
    QgemmCmma, QgemmCmmaArgs, QgemmCmmaProblem, W8a8Cmma, W8a8CmmaArgs, W8a8CmmaProblem,
};

pub use flexround::{flexround, flexround_backward, FlexRoundGrads, FlexRoundInputs};
pub use gemm::Path;
pub use w8a8_host::{quantize_per_token, w8a8, w8a8_on, MAX_W8A8_K, W8A8_OUT_DTYPES};
pub use weight_only::{
    w4a16, w4a16_on, w4a16_packed, w4a16_packed_on, w4a16_repack, w8_bits, w8_bits_on, PackedW4,
    W4Format, W4Weights,
};

/// The direct kernels' (`qgemm_direct`, `w8a8_direct`) common requirements on a cube
/// of `bm x bn` outputs in `tm x tn` register tiles for an `m x n x k` problem: at most
/// 1024 units; `bm` no more than M rounds up to (16 at the least), and a few-row tile
/// (`bm < 16`) only where it covers M (tiles mostly past the edge stay out of the tuning
/// space); K a multiple of 4 (rows start on a vector or word); and tiles past 16 x 16
/// outputs a unit only where M and N fill the cube (their compiles are the costliest).
fn direct_tile_fits((bm, bn, tm, tn): (u32, u32, u32, u32), m: u32, n: u32, k: u32) -> bool {
    let rows = m.next_power_of_two();
    (bm / tm) * (bn / tn) <= 1024
        && bm <= rows.max(16)
        && (bm >= 16 || bm >= rows)
        && k.is_multiple_of(4)
        && (tm * tn <= 256 || (m >= bm && n >= bn))
}

/// Group sizes W4A16 accepts (`-1`: one group per column, G = K).
pub const GROUP_SIZES: [i64; 4] = [32, 64, 128, -1];
/// Bit widths [`w8_bits`] serves from one int8 weight.
pub const SWITCH_BITS: [u32; 4] = [8, 6, 4, 2];
/// Rows up to which the autotuner also tries the GEMV kernel.
pub const GEMV_MAX_ROWS: usize = 64;
