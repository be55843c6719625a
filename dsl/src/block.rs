//! Basic-block boundaries inside long unrolled register-tile bodies, for llvmpipe's
//! compile time.
//!
//! llvmpipe (lavapipe's compiler) turns every `if` into a mask: only a loop ends an LLVM
//! basic block, so a register tile's unrolled multiply-adds are one block, thousands of
//! instructions long. LLVM's promotion of llvmpipe's stack slots to registers (SROA,
//! `PromoteMemToReg`) scans a block from its start for each slot it decides about, up to
//! the slot's first use there: quadratic in the block's length. In a cold
//! `kiln tune matmul --shape 1024x1024x1024` that scan was a third of the process (perf,
//! 2026-12-06; `matmul_vec4_plane`'s 64 x 16 tile, 4 096 multiply-adds a step). A loop
//! the compiler cannot unroll, carrying only a counter, between groups of rows cuts the
//! block: that tile compiled in 1.6-1.9 s instead of 3.3-3.7 s (three alternating
//! compiles through wgpu-native, Mesa's cache off), and ran as fast (no
//! accumulator crosses the loop, so none is blended through the lanes' mask for it).
//! Only where that scan runs, LLVM's passes on: with `GALLIVM_PERF=nopt` it is skipped.

use cubecl::prelude::*;

/// Scalars of accumulators per basic block of a register tile's step: 64 4-wide vectors
/// or 256 scalars. Larger blocks compile longer; smaller ones cost run time (32 vectors a
/// block ran the 64 x 16 tile about 5 % slower at 1024^3, 64 nothing measurable).
pub const BLOCK_SCALARS: u32 = 256;

/// Rows of a `tm`-row tile of `per_row` scalars of accumulators a row that make one
/// basic block between [`block_boundary()`]s: [`BLOCK_SCALARS`] per block, all `tm`
/// where that does not divide the tile.
pub fn rows_per_block(tm: u32, per_row: u32) -> u32 {
    let rows = (BLOCK_SCALARS / per_row.max(1)).clamp(1, tm.max(1));
    if tm.is_multiple_of(rows) {
        rows
    } else {
        tm
    }
}

/// `min(n, 1)`, through a loop no compiler can unroll (its trip count is `n`'s): a
/// basic-block boundary on llvmpipe. Called with `n >= 1` it returns 1; a caller folds
/// the result into its loop counter (`k += step * boundary`) so the loop is not dead
/// code.
#[cube]
pub fn block_boundary(n: u32) -> u32 {
    let mut t = 0u32;
    while t < min(n, 1u32) {
        t += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 256 scalars a block where that divides the tile, else the whole tile one block.
    #[test]
    fn rows_per_block_splits_by_256_scalars() {
        assert_eq!(rows_per_block(64, 16), 16); // 64 x 16 scalars: four blocks
        assert_eq!(rows_per_block(32, 32), 8); // 32 x 32: four blocks
        assert_eq!(rows_per_block(64, 32), 8); // 64 x 8 vectors of 4: eight blocks
        assert_eq!(rows_per_block(16, 16), 16); // 256 scalars: one block
        assert_eq!(rows_per_block(8, 512), 1); // a row past 256 scalars: a row a block
        assert_eq!(rows_per_block(24, 16), 24); // 16 rows do not divide 24
        assert_eq!(rows_per_block(1, 0), 1); // degenerate widths do not divide by zero
        assert_eq!(rows_per_block(0, 4), 1); // no rows: zero groups of one
    }
}
