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
        &[("dtype", "f16"), ("UNITS", "128")]
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

#[test]
fn matmul_cuda_staged_f16_fused() {
    insta::assert_snapshot!(source(
        "matmul",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("bm", "32"),
            ("bn", "32"),
            ("bk", "4"),
            ("tm", "2"),
            ("tn", "2"),
            ("bias", "true"),
            ("activation", "gelu")
        ]
    ));
}

#[test]
fn matmul_wgsl_direct_trans_b() {
    insta::assert_snapshot!(source(
        "matmul",
        Target::Wgsl,
        &[
            ("bm", "8"),
            ("bn", "32"),
            ("tm", "1"),
            ("tn", "2"),
            ("stage", "false"),
            ("trans_b", "true"),
            ("residual", "true")
        ]
    ));
}

#[test]
fn gla_scores_wgsl_chunk16() {
    insta::assert_snapshot!(source(
        "gla_scores",
        Target::Wgsl,
        &[("chunk", "16"), ("decay", "true"), ("BD", "16")]
    ));
}

#[test]
fn gla_state_pass_cuda_f16_reverse() {
    insta::assert_snapshot!(source(
        "gla_state_pass",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("chunk", "32"),
            ("reverse", "true"),
            ("has_init", "true"),
            ("BK", "16"),
            ("BV", "32"),
            ("TT", "4")
        ]
    ));
}

#[test]
fn qgemm_gemv_wgsl_int4_four_rows() {
    insta::assert_snapshot!(source(
        "qgemm_gemv",
        Target::Wgsl,
        &[
            ("dtype", "f16"),
            ("mt", "4"),
            ("wkind", "0"),
            ("BN", "64"),
            ("KS", "4")
        ]
    ));
}

#[test]
fn qgemm_tiled_cuda_int8_bits() {
    insta::assert_snapshot!(source(
        "qgemm_tiled",
        Target::Cuda,
        &[("dtype", "f16"), ("wkind", "1"), ("BM", "32"), ("BN", "64")]
    ));
}

#[test]
fn w8a8_gemm_cuda_bias() {
    insta::assert_snapshot!(source(
        "w8a8_gemm",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("has_bias", "true"),
            ("BM", "64"),
            ("BN", "32")
        ]
    ));
}
