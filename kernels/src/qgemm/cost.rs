//! The autotuner's cost model for the quantized GEMMs on CPU adapters: an estimate of each
//! configuration of the GEMV, tiled and direct kernels (`crate::tile_cost`: loads and
//! decoding per multiply-add, padding, memory traffic), and of each path as its best
//! configuration's. With it a ranked search runs only the paths within 2x of the best
//! estimate and times each kernel's best-ranked few, instead of tuning every
//! configuration of every path on first use (lavapipe, 64 x 4096 x 4096: the GEMV's
//! candidates alone run 4 s each).
//!
//! On GPUs the quantized GEMMs have no model (every candidate is timed: compiles and runs
//! take milliseconds there, and the constants were fitted on lavapipe only).

use super::dequant::{QgemmDirectConfig, QgemmGemvConfig, QgemmTiledConfig};
use super::int8::{W8a8DirectConfig, W8a8GemmConfig, W8a8GemvConfig};
use super::WeightKind;
use crate::tile_cost::{estimate, is_cpu, scalar, Tile};
use kiln_runtime::DeviceReport;

/// What the model needs of a dequantizing GEMM's problem.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub m: usize,
    pub n: usize,
    /// Bytes of an activation (x).
    pub x_bytes: f64,
    pub weights: Weights,
}

/// How the weight is stored and decoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Weights {
    /// int4, eight rows a word, group scales and zero points (`g_idx` with act order).
    Int4 { act_order: bool },
    /// int8 Double Rounding, one byte load a weight, or four columns a word.
    Int8 { col_words: bool },
    /// W8A8: int8 codes of x and of the weight, K-contiguous, four a word.
    W8a8,
}

impl Shape {
    /// Bytes of a weight.
    fn w_bytes(&self) -> f64 {
        match self.weights {
            Weights::Int4 { .. } => 0.5,
            _ => 1.0,
        }
    }

    /// Arithmetic to decode one weight, in multiply-adds: unpacking, and for int4
    /// `(q - z) s`, for int8 Double Rounding's shift, rounding, clamp and scales.
    fn decode_ops(&self) -> f64 {
        match self.weights {
            Weights::Int4 { .. } => 4.0,
            Weights::Int8 { .. } => 10.0,
            Weights::W8a8 => 2.0,
        }
    }

    fn tile(&self, kind: f64, fmas_per_load: f64, ops_per_fma: f64, bm: u32, bn: u32) -> Tile {
        Tile {
            kind,
            fmas_per_load,
            ops_per_fma,
            bm,
            bn,
            a_bytes: self.x_bytes,
            b_bytes: self.w_bytes(),
        }
    }
}

/// Whether the quantized GEMMs have a model on `device` (CPU adapters: see the module
/// docs).
pub(super) fn applies(device: &DeviceReport) -> bool {
    is_cpu(device)
}

/// `qgemm_direct`: per step of eight rows of K a unit reads two vectors of x per row and
/// its weights (int4: a word a column; int8: a byte load a weight, or a word for four
/// columns; act order: a group index, a scale and a zero point a weight more), and
/// decodes each weight once for its `TM` rows (with `SHARE = 8`, x's rows shared by the
/// plane: a unit reads `TM / 8` of them).
pub(super) fn qgemm_direct(c: &QgemmDirectConfig, s: &Shape, device: &DeviceReport) -> f64 {
    let (tm, tn) = (c.TM as f64, c.TN as f64);
    let weight_loads = match s.weights {
        Weights::Int4 { act_order: false } => tn,
        Weights::Int4 { act_order: true } => tn + 24.0 * tn,
        Weights::Int8 { col_words: false } => 8.0 * tn,
        _ => 2.0 * tn,
    };
    // With `SHARE = 8` a unit reads its plane's share of x's rows, TM / 8 (the rest by
    // shuffles).
    let x_loads = 2.0 * tm / c.SHARE as f64;
    let fmas_per_load = 8.0 * tm * tn / (x_loads + weight_loads);
    let tile = s.tile(1.0, fmas_per_load, s.decode_ops() / tm, c.BM, c.BN);
    estimate(&tile, s.m, s.n, device)
}

/// `qgemm_tiled`: see [`staged`].
pub(super) fn qgemm_tiled(c: &QgemmTiledConfig, s: &Shape, device: &DeviceReport) -> f64 {
    staged((c.BM, c.BN, c.TM, c.TN), s, device)
}

/// The shared-memory kernels (`qgemm_tiled`, `w8a8_gemm`): register tiles from shared
/// memory (scalar loads), staged with barriers (1.5x on a CPU), each weight decoded once
/// per cube of `BM` rows.
fn staged((bm, bn, tm, tn): (u32, u32, u32, u32), s: &Shape, device: &DeviceReport) -> f64 {
    let ops = s.decode_ops() / bm as f64;
    let tile = s.tile(1.5, scalar(tm as f64, tn as f64), ops, bm, bn);
    estimate(&tile, s.m, s.n, device)
}

/// `qgemm_gemv`: a unit owns a column and `mt` rows; per weight one load and `mt` loads
/// of x for `mt` multiply-adds.
pub(super) fn qgemm_gemv(c: &QgemmGemvConfig, mt: u32, s: &Shape, device: &DeviceReport) -> f64 {
    let rows = mt as f64;
    let tile = s.tile(1.0, rows / (1.0 + rows), s.decode_ops() / rows, mt, c.BN);
    estimate(&tile, s.m, s.n, device)
}

/// `w8a8_direct`: per word of K a unit reads `TM + TN` words (`TM / 8 + TN` with
/// `SHARE = 8`: x's rows shared by the plane) and multiplies `4 TM TN` pairs of unpacked
/// codes.
pub(super) fn w8a8_direct(c: &W8a8DirectConfig, s: &Shape, device: &DeviceReport) -> f64 {
    let (tm, tn) = (c.TM as f64, c.TN as f64);
    let unpack = s.decode_ops() * (tm + tn) / (tm * tn);
    let x_loads = tm / c.SHARE as f64;
    let tile = s.tile(1.0, 4.0 * tm * tn / (x_loads + tn), unpack, c.BM, c.BN);
    estimate(&tile, s.m, s.n, device)
}

/// `w8a8_gemm`: staged as i32 through shared memory ([`staged`]).
pub(super) fn w8a8_gemm(c: &W8a8GemmConfig, s: &Shape, device: &DeviceReport) -> f64 {
    staged((c.BM, c.BN, c.TM, c.TN), s, device)
}

/// `w8a8_gemv`: a unit walks a column's words of K for `mt` rows (one word of the weight
/// and `mt` of x for `4 mt` products).
pub(super) fn w8a8_gemv(c: &W8a8GemvConfig, mt: u32, s: &Shape, device: &DeviceReport) -> f64 {
    let rows = mt as f64;
    let tile = s.tile(
        1.0,
        4.0 * rows / (1.0 + rows),
        s.decode_ops() / rows,
        mt,
        c.BN,
    );
    estimate(&tile, s.m, s.n, device)
}

/// The estimate of a path: its best configuration's (`+inf` for an empty space).
pub(super) fn best(estimates: impl IntoIterator<Item = f64>) -> f64 {
    estimates.into_iter().fold(f64::INFINITY, f64::min)
}

impl From<(WeightKind, bool, bool)> for Weights {
    /// (weight kind, act order, int8 columns four to a word).
    fn from((wkind, act_order, col_words): (WeightKind, bool, bool)) -> Weights {
        match wkind {
            WeightKind::Int4 => Weights::Int4 { act_order },
            WeightKind::Int8Bits => Weights::Int8 { col_words },
        }
    }
}
