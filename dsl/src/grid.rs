//! Positions in kiln's launch grids.
//!
//! Hosts launch 1-D cubes on a 2-D grid of cubes (x up to 65 535, then y), since every
//! backend caps each grid dimension at 65 535; these undo that linearization.

use cubecl::prelude::*;

/// Linear index of this cube in a grid launched as `(x, y, 1)` cubes.
#[cube]
pub fn linear_cube() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Linear index of this unit over the whole grid of 1-D cubes.
#[cube]
pub fn linear_unit() -> usize {
    linear_cube() * CUBE_DIM_X as usize + UNIT_POS_X as usize
}

/// The next position of a grid-stride loop over `0..len` from `at` (`at < len`): `at +
/// stride`, or `len` (ending the loop) where that would reach `len`. Never wraps: a plain
/// `at += stride` passes 2^32 for `len` near 2^31 on a 2-D grid, and a loop whose write
/// reads its target (`w += d`) then did some elements twice.
#[cube]
pub fn grid_stride_next(at: u32, stride: u32, len: u32) -> u32 {
    select(len - at > stride, at + stride, len)
}
