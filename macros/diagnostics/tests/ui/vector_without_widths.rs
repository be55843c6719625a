#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

#[kiln::kernel(tune(UNITS = [32]), grid = (len), cube = UNITS)]
fn copy<F: Float, N: Size>(x: &Array<Vector<F, N>>, out: &mut Array<Vector<F, N>>, len: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS];
}

fn main() {}
