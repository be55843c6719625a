//! The autotuner's cost model for matmul configurations: an estimate of each
//! candidate's time, used to rank them so that a ranked search times only the few most
//! promising (`runtime::tune::Search`). It only orders candidates; timing decides.
//!
//! Per useful multiply-add, a configuration pays:
//! - its loads: a unit's register tile of `TM x TN` accumulators reads `TM + TN`
//!   operands per step of K (scalars), or 4-wide vectors where its kernel reads them so;
//!   the intensity `FMAs / loads` is what the register tile buys, and a load costs
//!   about `LOAD_COST` multiply-adds (measured on lavapipe, where every load is a
//!   bounds-checked gather: the 1024^3 times of the 34 candidates span 20x and follow
//!   this term);
//! - its kernel's overhead (`kind_factor`: on a CPU, staging through shared memory
//!   costs barriers that split the cube's loop; on a GPU it is what makes loads coalesce);
//! - the padding of ragged edge tiles (`padded / real` area);
//! - load imbalance: the last wave of cubes over the device's parallel slots;
//! - and at least the memory traffic: a cube reads `(BM + BN) K` operands for
//!   `BM BN K` multiply-adds, so `elem (1/BM + 1/BN)` bytes per multiply-add at
//!   `BYTE_COST` each. This term dominates at small M (a GEMV reads every weight once
//!   whatever its tile): there the estimates of all candidates come within a few
//!   percent, and the tuner times every candidate within 10 % of its last finalist.
//!
//! Tensor-core configurations, where the device has them, rank first for half precision.
//!
//! cubek-matmul (cubecl's own GEMM, whose tiles kiln does not see) is estimated from
//! kiln's best estimate: on a GPU just under it, so it is always a finalist (on NVIDIA its
//! tensor-core pipelines are cubecl's strongest GEMMs); on a CPU adapter at 2.5x it (its
//! Auto strategy measured 1.4-6x slower than kiln's tuned kernels on lavapipe), so only
//! an exhaustive search times it there.

use super::{MatmulConfig, Problem};
use kiln_runtime::{AdapterType, Client, DeviceReport};

/// A load's cost in multiply-adds (relative).
const LOAD_COST: f64 = 16.0;

/// A byte read from memory, in multiply-adds (lavapipe's GEMV: about 2 GB/s against
/// 16 GFLOP/s for the best-tiled GEMM).
const BYTE_COST: f64 = 8.0;

/// The cost model for `problem` (elements of `elem` bytes) on `client`'s device, over
/// `candidates` (cubek's estimate derives from kiln's best among them).
pub(super) fn model(
    client: &Client,
    p: &Problem,
    elem: usize,
    candidates: &[MatmulConfig],
) -> impl Fn(&MatmulConfig) -> f64 {
    let device = client.report().clone();
    let p = *p;
    let kiln_best = candidates
        .iter()
        .filter(|c| **c != MatmulConfig::Cubek)
        .map(|c| cost(c, &p, elem, &device))
        .fold(f64::INFINITY, f64::min);
    let cubek = kiln_best
        * if device.adapter_type == AdapterType::Cpu {
            2.5
        } else {
            0.95
        };
    move |c| match c {
        MatmulConfig::Cubek => cubek,
        c => cost(c, &p, elem, &device),
    }
}

/// Estimated time of `c` on `problem` for `device`, in relative units (lower is better).
fn cost(c: &MatmulConfig, p: &Problem, elem: usize, device: &DeviceReport) -> f64 {
    let cpu = device.adapter_type == AdapterType::Cpu;
    let f = |x: u32| x as f64;
    // (kind factor, FMAs per load instruction of one unit per step of K)
    let (kind, intensity) = match c {
        MatmulConfig::Staged(c) => (if cpu { 1.5 } else { 1.0 }, scalar(f(c.TM), f(c.TN))),
        MatmulConfig::StagedV4(c) => (if cpu { 1.5 } else { 1.0 }, b_vec4(f(c.TM), f(c.TN))),
        MatmulConfig::DirectV4(c) => (1.5, b_vec4(f(c.TM), f(c.TN))),
        MatmulConfig::Direct(c) => (if cpu { 1.0 } else { 1.5 }, scalar(f(c.TM), f(c.TN))),
        MatmulConfig::Vec4(c) => (if cpu { 1.0 } else { 1.2 }, 4.0 * scalar(f(c.TM), f(c.TN))),
        // A 16x16x16 fragment product per plane step: far above any FMA tile.
        MatmulConfig::Cmma(_) => (0.1, 64.0),
        MatmulConfig::Cubek => return f64::INFINITY,
    };
    let (bm, bn) = c.tile().unwrap_or((1, 1));
    let (m, n) = (p.m.max(1), p.n.max(1));
    let (tiles_m, tiles_n) = (m.div_ceil(bm as usize), n.div_ceil(bn as usize));
    let padding = (tiles_m * bm as usize * tiles_n * bn as usize) as f64 / (m * n) as f64;
    let cubes = tiles_m * tiles_n;
    let slots = parallel_slots(device).max(1);
    let imbalance = (cubes.div_ceil(slots) * slots) as f64 / cubes as f64;
    let compute = kind * (1.0 + LOAD_COST / intensity);
    let memory = BYTE_COST * elem as f64 * (1.0 / f(bm) + 1.0 / f(bn));
    compute.max(memory) * padding * imbalance
}

/// FMAs per scalar load for a `tm x tn` register tile: `tm * tn` products from `tm + tn`
/// operands.
fn scalar(tm: f64, tn: f64) -> f64 {
    tm * tn / (tm + tn)
}

/// As [`scalar`], with `b`'s `tn` operands read as `tn / 4` vectors.
fn b_vec4(tm: f64, tn: f64) -> f64 {
    tm * tn / (tm + tn / 4.0)
}

/// How many cubes the device runs at once: lavapipe runs one per CPU thread; a GPU
/// several per multiprocessor (the report has no multiprocessor count: 264 stands for a
/// large one, two cubes on each of 132).
fn parallel_slots(device: &DeviceReport) -> usize {
    if device.adapter_type == AdapterType::Cpu {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        264
    }
}
