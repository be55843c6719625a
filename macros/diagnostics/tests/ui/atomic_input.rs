#![allow(unused_imports)]
use kiln::runtime::cubecl;
use cubecl::prelude::*;

#[kiln::kernel(tune(UNITS = [32]), grid = (rows), cube = UNITS)]
fn mark(flags: &Array<Atomic<u32>>, out: &mut Array<u32>, rows: u32) {
    out[ABSOLUTE_POS] = flags[ABSOLUTE_POS].load();
}

fn main() {}
