#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

#[kiln::kernel(tune(UNITS = [32]), grid = (rows), cube = UNITS)]
fn copy<F: Float>(x: &Array<Vector<F, Const<3>>>, out: &mut Array<F>, rows: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS][0];
}

fn main() {}
