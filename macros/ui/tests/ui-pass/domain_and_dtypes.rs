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

/// A `defaults(..)` value is also the problem's default.
#[kiln::kernel(
    tune(UNITS = [64]),
    domain(per = [1, 2, 4, 8]),
    defaults(per = 2),
    grid = (len.div_ceil(UNITS)),
    cube = UNITS,
)]
pub fn scale_per<F: Float>(x: &Array<F>, out: &mut Array<F>, len: u32, #[comptime] per: u32) {
    let i = ABSOLUTE_POS;
    if i < len as usize {
        out[i] = x[i] * F::cast_from(per);
    }
}

fn main() {
    // `..Default::default()` gives a `#[comptime]` u32 a value it may take: its
    // `defaults(..)` value, else its domain's first (not 0, which `launch` refuses).
    let p = ScaleByProblem {
        len: 5,
        ..Default::default()
    };
    assert_eq!((p.len, p.width), (5, 1));
    assert_eq!(ScalePerProblem::default().per, 2);
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
