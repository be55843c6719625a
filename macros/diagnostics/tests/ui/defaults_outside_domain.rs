#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

// An emission default must be one of the argument's declared values.
#[kiln::kernel(tune(UNITS = [32]), grid = (rows), cube = UNITS, domain(per = [1, 2, 4]), defaults(per = 3))]
fn copy<F: Float>(x: &Array<F>, out: &mut Array<F>, rows: u32, #[comptime] per: u32) {
    out[ABSOLUTE_POS] = x[ABSOLUTE_POS] * F::cast_from(per);
}

fn main() {}
