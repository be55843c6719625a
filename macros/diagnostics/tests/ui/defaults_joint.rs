#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

#[kiln::kernel(tune(UNITS = [32]), defaults((BM, BN) = [(64, 64)]), grid = (rows), cube = UNITS)]
fn copy<F: Float>(x: &Array<F>, out: &mut Array<F>, rows: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS];
}

fn main() {}
