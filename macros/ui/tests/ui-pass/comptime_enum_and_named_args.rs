//! A kernel with a `#[comptime]` enum, called with named arguments: the argument
//! struct, the problem struct with `..Default::default()`, and the enum by name in the
//! emission config and the tune key.
#![allow(missing_docs)] // a test crate of its own: its items are examples, not API
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test
use cubecl::prelude::*;
use kiln::runtime::cubecl;

kiln::runtime::comptime_enum! {
    /// What the kernel does to each element.
    pub enum Op { Copy = "copy", Negate = "negate" }
}

#[kiln::kernel(
    tune(UNITS = [64, 32]),
    key(len = pow2, dtype),
    grid = (len.div_ceil(UNITS)),
    cube = UNITS,
)]
pub fn map<F: Float>(x: &Array<F>, out: &mut Array<F>, len: u32, #[comptime] op: Op) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        if comptime!(op == Op::Negate) {
            out[i] = -x[i];
        } else {
            out[i] = x[i];
        }
    }
}

fn main() {
    // The problem struct: named fields, defaults for the rest (op = copy).
    let p = MapProblem {
        len: 1000,
        ..Default::default()
    };
    assert_eq!(p.op, Op::Copy);
    let key = Map::key(
        kiln::DType::F32,
        &MapProblem {
            op: Op::Negate,
            ..p
        },
    );
    assert!(
        key.shape.contains("len=1024") && key.shape.contains("op=negate"),
        "{}",
        key.shape
    );
    // The enum's words are its emission values.
    let spec = &MAP_KERNEL;
    let op = spec.config.iter().find(|c| c.name == "op").unwrap();
    assert_eq!((op.default, op.values), ("copy", "copy | negate"));
    // The argument struct names every tensor and scalar (not launched: no device here).
    let _launch: fn(&kiln::Client, &MapConfig, &MapArgs<'_>) -> kiln::Result<()> = Map::launch;
}
