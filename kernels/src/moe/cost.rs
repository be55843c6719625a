//! The autotuner's cost model for the grouped expert GEMMs on CPU adapters: each
//! configuration estimated as `crate::tile_cost` estimates matmul's (the staged kernel as
//! matmul's staged vector kernel, the vector kernel as `matmul_vec4`), on one expert's rows
//! (`max_rows`), so that a ranked search times the few best-ranked instead of every
//! configuration of both kernels on a layer's first call. On GPUs every candidate is
//! timed (as for the quantized GEMMs: the constants were fitted on lavapipe).

use super::ffn::GroupedConfig;
use crate::tile_cost::{b_vec4, estimate, is_cpu, Tile};
use kiln_runtime::DeviceReport;

/// The model for an expert's `max_rows x n` output of `elem`-byte operands on `device`
/// (`None` off CPU adapters).
pub(super) fn model(
    device: &DeviceReport,
    max_rows: usize,
    n: usize,
    elem: usize,
) -> Option<impl Fn(&GroupedConfig) -> f64 + 'static> {
    let device = device.clone();
    is_cpu(&device).then_some(move |c: &GroupedConfig| {
        let f = |x: u32| x as f64;
        let (kind, fmas_per_load, bm, bn) = match c {
            // Staged through shared memory as vectors, read back per scalar of a.
            GroupedConfig::Staged(c) => (1.5, b_vec4(f(c.TM), f(c.TN)), c.BM, c.BN),
            // With `SHARE = 8` a unit reads TM / 8 of its rows of a (the plane shares them).
            GroupedConfig::Vec4(c) => {
                let (tm, tn) = (f(c.TM), f(c.TN));
                (1.0, 4.0 * tm * tn / (tm / f(c.SHARE) + tn), c.BM, c.BN)
            }
            // Tensor cores: never a CPU adapter's candidate.
            GroupedConfig::Cmma(_) => return f64::INFINITY,
        };
        let tile = Tile::plain(kind, fmas_per_load, (bm, bn), elem);
        estimate(&tile, max_rows, n, &device)
    })
}
