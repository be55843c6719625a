//! The autotuner's cost model for matmul configurations: an estimate of each
//! candidate's time, used to rank them so that a ranked search times only the few most
//! promising (`runtime::tune::Search`). It only orders candidates; timing decides.
//!
//! The estimate itself is `crate::tile_cost`'s (loads per multiply-add, kernel
//! overhead, padding, load imbalance, memory traffic); here, what each kind of matmul
//! configuration loads. At small M the memory term dominates: there the estimates of all
//! candidates come within a few percent, and the tuner times every candidate within
//! [`TIES`] of its last finalist.
//!
//! Tensor-core configurations, where the device has them, rank first for half precision.
//!
//! The split-K kernel for few rows (`matmul_gemv`) is outside the tile model. On a GPU
//! its configurations with the most rows per cube rank just behind cubek, so both are
//! always timed. On a H200 at M = 1, register tiles walked all of K per unit and reached
//! 80 GB/s (docs/measured/h200-2026-12-04). On a CPU adapter it is not ranked (estimated
//! +inf): a cube there runs its SIMD groups one after another, and the tiles already run
//! the few-row shapes at 4.5-6x cubek.
//!
//! cubek-matmul (cubecl's own GEMM, whose tiles kiln does not see) is estimated from
//! kiln's best estimate: on a GPU just under it, so it is always a finalist (on NVIDIA its
//! tensor-core pipelines are cubecl's strongest GEMMs); on a CPU adapter at 2.5x it (its
//! Auto strategy measured 1.4-6x slower than kiln's tuned kernels on lavapipe), so only
//! an exhaustive search times it there.

use super::{MatmulConfig, Problem};

/// How many of the model's best a ranked search times for `problem` on `device`. Each
/// finalist costs a compilation, most of a ranked search's time on a CPU adapter (LLVM:
/// 1.2-1.7 s a plane tile on a 2-core Xeon). There, where the best estimate is
/// compute-bound, the best 2 held the exhaustive winner at every benchmark shape
/// (`kiln tune matmul --exhaustive`, 2026-12-07: the 64 x 16 plane tile, the model's
/// first, won 256^3, 512^3, 1024^3 and 128 x 4096^2; docs/performance.md). Where the
/// memory term makes the best estimate (few rows: 16 x 4096^2), tiles with as many rows
/// estimate alike and the model does not rank them: 3 and the ties, as on a GPU, where a
/// compilation is a fraction of a second and the model is not fitted (on lavapipe before
/// the plane tiles, the best 3 held the winner or one within 5.4 %; ranks 4-5 never won).
pub(super) fn finalists(
    device: &DeviceReport,
    p: &Problem,
    elem: usize,
    candidates: &[MatmulConfig],
) -> usize {
    let best = candidates
        .iter()
        .filter_map(|c| Some((tile(c, elem, device)?, cost(c, p, elem, device))))
        .min_by(|(_, x), (_, y)| x.total_cmp(y));
    match best {
        Some((t, _)) if is_cpu(device) && !memory_bound(&t) => 2,
        _ => 3,
    }
}

/// Estimates within 5 % of the last finalist are timed too: at small M, where the memory
/// term makes every tile's estimate come within a few percent, the model does not rank
/// and timing decides; at 1024^3 the next tiles (8 x 16, 16 x 8: 1.75 against 8 x 32's
/// 1.625, 7.7 % apart) measured 15-80 % slower.
pub(super) const TIES: f64 = 0.05;
use crate::tile_cost::{b_vec4, estimate, is_cpu, memory_bound, scalar, Tile};
use kiln_runtime::{Client, DeviceReport};

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
        .filter(|c| !matches!(c, MatmulConfig::Cubek | MatmulConfig::Gemv(_)))
        .map(|c| cost(c, &p, elem, &device))
        .fold(f64::INFINITY, f64::min);
    let cpu = is_cpu(&device);
    let cubek = kiln_best * if cpu { 2.5 } else { 0.95 };
    // The split-K configurations that read b once for the most rows (the others read
    // it once per MT rows: ranked past the ties).
    let gemv_rows = candidates
        .iter()
        .filter_map(|c| match c {
            MatmulConfig::Gemv(g) => Some(g.MT),
            _ => None,
        })
        .max();
    // The tensor-core tiles' estimates differ by their padding and fill only: the model
    // does not know their pipelines, so those within 30 % of the best are all estimated
    // at kiln's best (ties: every one is timed, a dozen launches of a fast kernel).
    let cmma_best = candidates
        .iter()
        .filter(|c| matches!(c, MatmulConfig::Cmma(_)))
        .map(|c| cost(c, &p, elem, &device))
        .fold(f64::INFINITY, f64::min);
    move |c| match c {
        MatmulConfig::Cubek => cubek,
        MatmulConfig::Cmma(_) if cost(c, &p, elem, &device) <= 1.3 * cmma_best => kiln_best,
        MatmulConfig::Gemv(_) if cpu => f64::INFINITY,
        MatmulConfig::Gemv(g) if Some(g.MT) == gemv_rows => kiln_best * 0.96,
        MatmulConfig::Gemv(_) => kiln_best * 1.2,
        c => cost(c, &p, elem, &device),
    }
}

/// Estimated time of `c` on `problem` for `device`, in relative units (lower is better).
fn cost(c: &MatmulConfig, p: &Problem, elem: usize, device: &DeviceReport) -> f64 {
    match tile(c, elem, device) {
        Some(t) => estimate(&t, p.m, p.n, device),
        None => f64::INFINITY,
    }
}

/// `c` as the tile model sees it (`None`: outside the model, cubek and the split-K GEMV).
fn tile(c: &MatmulConfig, elem: usize, device: &DeviceReport) -> Option<Tile> {
    let cpu = is_cpu(device);
    let f = |x: u32| x as f64;
    // (kind factor, FMAs per load instruction of one unit per step of K)
    let (kind, fmas_per_load) = match c {
        MatmulConfig::Staged(c) => (if cpu { 1.5 } else { 1.0 }, scalar(f(c.TM), f(c.TN))),
        MatmulConfig::StagedV4(c) => (if cpu { 1.5 } else { 1.0 }, b_vec4(f(c.TM), f(c.TN))),
        MatmulConfig::DirectV4(c) => (1.5, b_vec4(f(c.TM), f(c.TN))),
        MatmulConfig::Direct(c) => (if cpu { 1.0 } else { 1.5 }, scalar(f(c.TM), f(c.TN))),
        MatmulConfig::Vec4(c) => (if cpu { 1.0 } else { 1.2 }, 4.0 * scalar(f(c.TM), f(c.TN))),
        // A unit reads TM / 8 of the tile's `a` vectors (the plane shares them) and TN of b.
        MatmulConfig::Vec4Plane(c) => (1.0, 4.0 * f(c.TM) * f(c.TN) / (f(c.TM) / 8.0 + f(c.TN))),
        // A 16x16x16 fragment product per plane step: far above any FMA tile.
        MatmulConfig::Cmma(_) => (0.1, 64.0),
        MatmulConfig::Cubek | MatmulConfig::Gemv(_) => return None,
    };
    Some(Tile::plain(
        kind,
        fmas_per_load,
        c.tile().unwrap_or((1, 1)),
        elem,
    ))
}
