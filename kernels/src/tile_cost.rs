//! The estimate behind the autotuner's cost models of register-tiled GEMM kernels
//! (`matmul`, the quantized GEMMs): a configuration's time per useful multiply-add, in
//! relative units. It only ranks candidates so that a ranked search times the promising
//! few (`kiln_runtime::tune::Search`); timing decides.
//!
//! Per multiply-add a configuration pays:
//! - its loads: `1 / fmas_per_load` load instructions of one unit, each costing about
//!   `LOAD_COST` multiply-adds (on lavapipe every load is a bounds-checked gather: the
//!   1024^3 matmul times of 34 candidates span 20x and follow this term), times its
//!   kernel's overhead `kind` (on a CPU, staging through shared memory costs barriers that
//!   split the cube's loop; on a GPU it is what makes loads coalesce);
//! - `ops_per_fma`: other arithmetic per multiply-add (a quantized weight's decoding,
//!   shared by the rows of the unit's tile);
//! - the padding of ragged edge tiles (`padded / real` area) and the imbalance of the last
//!   wave of cubes over the device's parallel slots;
//! - and at least the memory traffic: a `BM x BN` cube reads `BM K` left operands and
//!   `BN K` right ones for `BM BN K` multiply-adds, so `a_bytes / BN + b_bytes / BM` bytes
//!   each at `BYTE_COST`. This term dominates at small M (a GEMV reads every weight once
//!   whatever its tile).

use kiln_runtime::{AdapterType, DeviceReport};

/// A load's cost in multiply-adds (relative).
const LOAD_COST: f64 = 16.0;

/// A byte read from memory, in multiply-adds (lavapipe's GEMV: about 2 GB/s against
/// 16 GFLOP/s for the best-tiled GEMM).
const BYTE_COST: f64 = 8.0;

/// One configuration of a register-tiled GEMM as the model sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    /// The kernel's overhead factor on its compute (1 for the best kind on the device).
    pub kind: f64,
    /// Multiply-adds per load instruction of one unit.
    pub fmas_per_load: f64,
    /// Other arithmetic per multiply-add, in multiply-adds.
    pub ops_per_fma: f64,
    /// Output rows and columns of one cube.
    pub bm: u32,
    pub bn: u32,
    /// Bytes of one element of the left operand (rows of the output) and of the right.
    pub a_bytes: f64,
    pub b_bytes: f64,
}

impl Tile {
    /// A plain GEMM's tile: both operands of `elem` bytes, no other arithmetic.
    pub fn plain(kind: f64, fmas_per_load: f64, (bm, bn): (u32, u32), elem: usize) -> Tile {
        Tile {
            kind,
            fmas_per_load,
            ops_per_fma: 0.0,
            bm,
            bn,
            a_bytes: elem as f64,
            b_bytes: elem as f64,
        }
    }
}

/// Estimated time of `t` on an `m x n` output on `device`, relative (lower is better).
pub(crate) fn estimate(t: &Tile, m: usize, n: usize, device: &DeviceReport) -> f64 {
    let (bm, bn) = (t.bm.max(1) as usize, t.bn.max(1) as usize);
    let (m, n) = (m.max(1), n.max(1));
    let (tiles_m, tiles_n) = (m.div_ceil(bm), n.div_ceil(bn));
    let padding = (tiles_m * bm * tiles_n * bn) as f64 / (m * n) as f64;
    let cubes = tiles_m * tiles_n;
    let slots = parallel_slots(device).max(1);
    let imbalance = (cubes.div_ceil(slots) * slots) as f64 / cubes as f64;
    let (compute, memory) = terms(t);
    compute.max(memory) * padding * imbalance
}

/// Whether `t`'s memory term, not its compute, makes its estimate. There every tile with
/// as many rows estimates about the same, and the model does not rank them.
pub(crate) fn memory_bound(t: &Tile) -> bool {
    let (compute, memory) = terms(t);
    memory > compute
}

/// A tile's compute and memory terms per multiply-add (before padding and imbalance).
fn terms(t: &Tile) -> (f64, f64) {
    let (bm, bn) = (t.bm.max(1) as f64, t.bn.max(1) as f64);
    let compute = t.kind * (1.0 + LOAD_COST / t.fmas_per_load) + t.ops_per_fma;
    let memory = BYTE_COST * (t.a_bytes / bn + t.b_bytes / bm);
    (compute, memory)
}

/// Multiply-adds per scalar load for a `tm x tn` register tile: `tm tn` products from
/// `tm + tn` operands.
pub(crate) fn scalar(tm: f64, tn: f64) -> f64 {
    tm * tn / (tm + tn)
}

/// As [`scalar`], with the right operand's `tn` values read as `tn / 4` vectors.
pub(crate) fn b_vec4(tm: f64, tn: f64) -> f64 {
    tm * tn / (tm + tn / 4.0)
}

/// Whether `device` is a CPU adapter (lavapipe, SwiftShader, WARP).
pub(crate) fn is_cpu(device: &DeviceReport) -> bool {
    device.adapter_type == AdapterType::Cpu
}

/// How many cubes the device runs at once: lavapipe runs one per CPU thread; a GPU
/// several per multiprocessor (the report has no multiprocessor count: 264 stands for a
/// large one, two cubes on each of 132).
fn parallel_slots(device: &DeviceReport) -> usize {
    if is_cpu(device) {
        kiln_runtime::host_threads()
    } else {
        264
    }
}
