//! Joint tunables, a typed device capability in `require`, and 4-wide vector arrays:
//! the capability is recorded in the kernel's registry entry.
#![allow(missing_docs)] // a test crate of its own: its items are examples, not API
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test
use cubecl::prelude::*;
use kiln::runtime::cubecl;
use kiln::runtime::Capability;

#[kiln::kernel(
    tune((UNITS, PER) = [(64, 1), (32, 2)]),
    require(device.has(Capability::PlaneOps), UNITS * PER <= 256),
    key(len = pow2),
    grid = (len.div_ceil(UNITS * PER)),
    cube = UNITS,
)]
pub fn scale4(x: &Array<Vector<f32, Const<4>>>, out: &mut Array<Vector<f32, Const<4>>>, len: u32) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        out[i] = x[i] * Vector::new(2.0f32);
    }
}

fn main() {
    assert_eq!(SCALE4_KERNEL.capabilities, &[Capability::PlaneOps]);
    assert!(SCALE4_KERNEL.needs(Capability::PlaneOps));
    assert!(!SCALE4_KERNEL.needs(Capability::TensorCores));
    // Registered without a line of its own.
    assert!(kiln::runtime::registered_kernels()
        .iter()
        .any(|k| k.name == "scale4"));
}
