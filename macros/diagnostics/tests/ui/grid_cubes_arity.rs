#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

// `cubes(n)` lays out n cubes; two expressions are a mistake.
#[kiln::kernel(tune(UNITS = [32]), grid = cubes(rows, 2), cube = UNITS)]
fn copy<F: Float>(x: &Array<F>, out: &mut Array<F>, rows: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS];
}

fn main() {}
