//! Several kernels stamped from one signature by a `macro_rules!`: the caller supplies
//! each kernel's name, tunables, `require` list and body, the macro the arguments and
//! the grid. The body and `require` name arguments and tunables the macro's template
//! declares (`x`, `len`, `UNITS`, `device`), which macro_rules hygiene would keep
//! apart; `#[kiln::kernel]` binds them as one set.
#![allow(missing_docs)] // a test crate of its own: its items are examples, not API
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test
use cubecl::prelude::*;
use kiln::runtime::cubecl;

macro_rules! unary_kernel {
    ($name:ident, tune($($tune:tt)*), require($($req:tt)*), $body:block) => {
        #[kiln::kernel(
            tune($($tune)*),
            require($($req)*),
            key(len = pow2),
            grid = cubes(len.div_ceil(UNITS)),
            cube = UNITS,
        )]
        pub fn $name(x: &Array<f32>, out: &mut Array<f32>, len: u32, #[comptime] negate: bool) $body
    };
}

unary_kernel!(
    double,
    tune(UNITS = [64, 32]),
    require(UNITS <= device.max_units_per_cube, len > 0),
    {
        let i = ABSOLUTE_POS;
        if i < len as usize {
            let y = x[i] * 2.0;
            out[i] = if negate { -y } else { y };
        }
    }
);

unary_kernel!(square, tune(UNITS = [128]), require(UNITS % 32 == 0), {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        let y = x[i] * x[i];
        out[i] = if negate { -y } else { y };
    }
});

fn main() {
    let names: Vec<&str> = kiln::runtime::registered_kernels()
        .iter()
        .map(|k| k.name)
        .collect();
    assert!(names.contains(&"double") && names.contains(&"square"));
    assert_eq!(DoubleConfig { UNITS: 64 }.UNITS, 64);
}
