//! A `#[comptime] u32` with its declared domain and a kernel that declares its dtypes:
//! both show in the emission config, and emission refuses what they exclude by name
//! before expanding anything.
#![allow(missing_docs)] // a test crate of its own: its items are examples, not API
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test
use cubecl::prelude::*;
use kiln::runtime::cubecl;
use std::collections::BTreeMap;

#[kiln::kernel(
    tune(UNITS = [64]),
    domain(width = [1, 2, 4]),
    dtypes = [f16, bf16],
    grid = (len.div_ceil(UNITS)),
    cube = UNITS,
)]
pub fn scale_by<F: Float>(x: &Array<F>, out: &mut Array<F>, len: u32, #[comptime] width: u32) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        out[i] = x[i] * F::cast_from(width);
    }
}

fn config(pairs: &[(&str, &str)]) -> kiln::Result<kiln::runtime::KernelConfig> {
    let values: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    kiln::runtime::KernelConfig::new(&SCALE_BY_KERNEL, values)
}

fn main() {
    let spec = &SCALE_BY_KERNEL;
    let knob = |n: &str| spec.config.iter().find(|c| c.name == n).unwrap();
    assert_eq!(
        (knob("width").default, knob("width").values),
        ("1", "1 | 2 | 4")
    );
    assert_eq!(
        (knob("dtype").default, knob("dtype").values),
        ("f16", "f16 | bf16")
    );
    let emit = |pairs: &[(&str, &str)]| {
        kiln::codegen::emit(spec, kiln::codegen::Target::Cuda, &config(pairs).unwrap())
    };
    assert!(emit(&[("width", "4")]).is_ok());
    let e = emit(&[("width", "3")]).err().unwrap().to_string();
    assert!(e.contains("`width`") && e.contains("1 | 2 | 4"), "{e}");
    let e = emit(&[("dtype", "f32")]).err().unwrap().to_string();
    assert!(e.contains("f16 | bf16") && e.contains("scale_by"), "{e}");
}
