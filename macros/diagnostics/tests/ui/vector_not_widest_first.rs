#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

// The first listed width that divides runs: an ascending list would always run width 1.
#[kiln::kernel(tune(UNITS = [32]), vector = [1, 2, 4], grid = (len), cube = UNITS)]
fn copy<F: Float, N: Size>(x: &Array<Vector<F, N>>, out: &mut Array<Vector<F, N>>, len: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS];
}

fn main() {}
