//! Golden files of generated source (as naga pins its output): representative kernels
//! in both targets. CUDA text is normalized (cubecl orders shared-memory declarations
//! differently run to run) and entry-point hashes are not part of kiln's names.
//! Review changes with `cargo insta review`, or `INSTA_UPDATE=always cargo test`.

use kiln::codegen::{emit, normalize, Target};
use kiln::runtime::KernelConfig;
use std::collections::BTreeMap;

fn source(kernel: &str, target: Target, config: &[(&str, &str)]) -> String {
    let spec = kiln::kernels::kernel(kernel).unwrap();
    let values: BTreeMap<String, String> = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cfg = KernelConfig::new(spec, values).unwrap();
    let out = emit(spec, target, &cfg).unwrap();
    normalize(&out.source)
}

#[test]
fn softmax_wgsl_f32() {
    insta::assert_snapshot!(source("softmax", Target::Wgsl, &[]));
}

#[test]
fn softmax_cuda_f16() {
    insta::assert_snapshot!(source(
        "softmax",
        Target::Cuda,
        &[("dtype", "f16"), ("units", "128")]
    ));
}

#[test]
fn add_wgsl_f16_vec4() {
    insta::assert_snapshot!(source("add", Target::Wgsl, &[("dtype", "f16")]));
}

#[test]
fn gelu_cuda_bf16_vec2() {
    insta::assert_snapshot!(source(
        "gelu",
        Target::Cuda,
        &[("dtype", "bf16"), ("vector", "2")]
    ));
}

#[test]
fn emission_is_deterministic() {
    for k in kiln::kernels::kernels() {
        for t in [Target::Cuda, Target::Wgsl] {
            let a = source(k.name, t, &[]);
            let b = source(k.name, t, &[]);
            assert_eq!(a, b, "{} {:?}", k.name, t);
        }
    }
}
