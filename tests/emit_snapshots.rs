//! Golden files of generated source (as naga pins its output): representative kernels
//! in both targets. CUDA text is normalized (cubecl orders shared-memory declarations
//! differently run to run) and entry-point hashes are not part of kiln's names.
//! Review changes with `cargo insta review`, or `INSTA_UPDATE=always cargo test`.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

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
    insta::assert_snapshot!(source("row_reduce", Target::Wgsl, &[]));
}

#[test]
fn softmax_cuda_f16() {
    insta::assert_snapshot!(source(
        "row_reduce",
        Target::Cuda,
        &[("dtype", "f16"), ("UNITS", "128")]
    ));
}

#[test]
fn add_wgsl_f16_vec4() {
    insta::assert_snapshot!(source(
        "elementwise_binary",
        Target::Wgsl,
        &[("dtype", "f16"), ("op", "add")]
    ));
}

#[test]
fn gelu_cuda_bf16_vec2() {
    insta::assert_snapshot!(source(
        "elementwise_unary",
        Target::Cuda,
        &[("dtype", "bf16"), ("vector", "2"), ("op", "gelu")]
    ));
}

#[test]
fn emission_is_deterministic() {
    for k in kiln::kernels::kernels() {
        for t in [Target::Cuda, Target::Wgsl] {
            if k.needs(kiln::runtime::Capability::TensorCores) && t == Target::Wgsl {
                continue; // refused, see below
            }
            let a = source(k.name, t, &[]);
            let b = source(k.name, t, &[]);
            assert_eq!(a, b, "{} {:?}", k.name, t);
        }
    }
}

/// WGSL byte for byte, not normalized: the text a driver hashes for its shader cache
/// (lavapipe's on disk, a GPU driver's pipeline cache). cubecl-ir 0.10.0 declared mutable
/// locals in the drain order of a map whose hasher is seeded per map, so the same kernel
/// came out differently from one compilation to the next (50 of the 88 kernels' default
/// configurations across processes) and missed the cache every time; `vendor/cubecl-ir`
/// declares them in creation order. Two compilations in one process use two seeds, so a
/// regression fails here.
#[test]
fn wgsl_is_the_same_text_every_time() {
    for k in kiln::kernels::kernels() {
        if k.needs(kiln::runtime::Capability::TensorCores) {
            continue; // no WGSL (refused, see below)
        }
        let cfg = KernelConfig::new(k, BTreeMap::new()).unwrap();
        let a = emit(k, Target::Wgsl, &cfg).unwrap().source;
        for _ in 0..2 {
            let b = emit(k, Target::Wgsl, &cfg).unwrap().source;
            assert!(a == b, "{}: WGSL differs between two compilations", k.name);
        }
    }
}

#[test]
fn matmul_cuda_staged_f16_fused() {
    insta::assert_snapshot!(source(
        "matmul_staged",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("BM", "64"),
            ("BN", "64"),
            ("BK", "16"),
            ("TM", "4"),
            ("TN", "4"),
            ("has_bias", "true"),
            ("act", "gelu")
        ]
    ));
}

#[test]
fn matmul_vec4_wgsl_trans_b_bias() {
    insta::assert_snapshot!(source(
        "matmul_vec4",
        Target::Wgsl,
        &[
            ("trans_b", "true"),
            ("has_bias", "true"),
            ("BM", "16"),
            ("BN", "64"),
            ("TM", "4"),
            ("TN", "4")
        ]
    ));
}

/// What a CPU adapter runs: the epilogue a loop over the tile's rows (row 0 stored, the
/// rest moved up a row), not unrolled.
#[test]
fn matmul_vec4_wgsl_cpu_adapter_rows_loop() {
    insta::assert_snapshot!(source(
        "matmul_vec4",
        Target::Wgsl,
        &[
            ("has_bias", "true"),
            ("has_residual", "true"),
            ("BM", "16"),
            ("BN", "64"),
            ("TM", "4"),
            ("TN", "4"),
            ("local_scalars", "true")
        ]
    ));
}

/// `a`'s rows shared across a plane of 8 (lavapipe): each unit reads one row of eight
/// and `subgroupShuffle` from a constant lane hands out the others.
#[test]
fn matmul_vec4_plane_wgsl_shuffles() {
    insta::assert_snapshot!(source(
        "matmul_vec4_plane",
        Target::Wgsl,
        &[
            ("BM", "8"),
            ("BN", "128"),
            ("TM", "8"),
            ("TN", "16"),
            ("local_scalars", "true")
        ]
    ));
}

#[test]
fn matmul_wgsl_direct_trans_b() {
    insta::assert_snapshot!(source(
        "matmul_direct",
        Target::Wgsl,
        &[
            ("BM", "4"),
            ("BN", "256"),
            ("TM", "1"),
            ("TN", "4"),
            ("trans_b", "true"),
            ("has_residual", "true")
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
fn gla_fused_fwd_cuda_f16_vector_args() {
    insta::assert_snapshot!(source(
        "gla_fused_fwd",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("kp", "32"),
            ("has_init", "true"),
            ("BV", "32")
        ]
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
            ("wkind", "int4"),
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
        &[
            ("dtype", "f16"),
            ("wkind", "int8_bits"),
            ("BM", "32"),
            ("BN", "64")
        ]
    ));
}

#[test]
fn qgemm_direct_wgsl_int8_col_words() {
    insta::assert_snapshot!(source(
        "qgemm_direct",
        Target::Wgsl,
        &[
            ("dtype", "f16"),
            ("wkind", "int8_bits"),
            ("col_words", "true"),
            ("BM", "16"),
            ("BN", "128"),
            ("TM", "4"),
            ("TN", "8")
        ]
    ));
}

#[test]
fn w8a8_direct_wgsl() {
    insta::assert_snapshot!(source(
        "w8a8_direct",
        Target::Wgsl,
        &[
            ("dtype", "f32"),
            ("has_bias", "false"),
            ("BM", "16"),
            ("BN", "128"),
            ("TM", "4"),
            ("TN", "8")
        ]
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
            ("BN", "64"),
            ("TM", "8"),
            ("TN", "8")
        ]
    ));
}

#[test]
fn matmul_cmma_cuda_f16_bias_gelu() {
    insta::assert_snapshot!(source(
        "matmul_cmma",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("PLANES_M", "2"),
            ("PLANES_N", "2"),
            ("FRAGS_M", "2"),
            ("FRAGS_N", "2"),
            ("BK", "32"),
            ("has_bias", "true"),
            ("act", "gelu")
        ]
    ));
}

/// The tensor-core W4A16 path: int4 dequantized into f16 shared memory, `wmma`
/// fragments, y in f16.
#[test]
fn qgemm_cmma_cuda_f16_int4() {
    insta::assert_snapshot!(source(
        "qgemm_cmma",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("PLANES_M", "2"),
            ("PLANES_N", "1"),
            ("wkind", "int4"),
            ("act_order", "false")
        ]
    ));
}

/// The int8 tensor-core W8A8 path: int8 words staged as bytes in 16-deep fragment
/// slices, `wmma` s8 fragments with i32 accumulators, the scaled epilogue in f16.
#[test]
fn w8a8_cmma_cuda_f16() {
    insta::assert_snapshot!(source(
        "w8a8_cmma",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("PLANES_M", "2"),
            ("PLANES_N", "2"),
            ("FRAGS_M", "2"),
            ("FRAGS_N", "2"),
            ("BK", "64"),
            ("has_bias", "true")
        ]
    ));
}

/// Tensor-core kernels cannot be expressed in WGSL: a clear refusal, not a panic.
#[test]
fn tensor_core_kernels_are_refused_for_wgsl() {
    use kiln::runtime::Capability;
    for name in [
        "matmul_cmma",
        "qgemm_cmma",
        "moe_grouped_matmul_cmma",
        "w8a8_cmma",
        "attention_fwd_cmma",
        "attention_bwd_dq_cmma",
        "attention_bwd_dkv_cmma",
    ] {
        let spec = kiln::kernels::kernel(name).unwrap();
        assert!(spec.needs(Capability::TensorCores), "{name}");
        if name == "w8a8_cmma" {
            assert!(spec.needs(Capability::Int8TensorCores));
        }
        let cfg = KernelConfig::new(spec, BTreeMap::new()).unwrap();
        let e = emit(spec, Target::Wgsl, &cfg).unwrap_err();
        assert!(matches!(e, kiln::Error::Unsupported { .. }), "{name}: {e}");
        assert!(e.to_string().contains("cmma"), "{name}: {e}");
    }
}

/// The tensor-core attention forward: two passes over the keys, `Q K^T` and `P V` on
/// `wmma` f16 fragments with f32 accumulators, causal.
#[test]
fn attention_fwd_cmma_cuda_f16_causal() {
    insta::assert_snapshot!(source(
        "attention_fwd_cmma",
        Target::Cuda,
        &[
            ("dtype", "f16"),
            ("causal", "true"),
            ("PLANES", "4"),
            ("BK", "64"),
            ("BV", "64"),
            ("BD", "32")
        ]
    ));
}

/// The tensor-core dk/dv kernel: `S^T`, `dP^T` on `wmma`, `P^T` and `dS^T` formed
/// transposed, `dV += P^T dO` and `dK += dS^T Q` in fragments across the query loop.
#[test]
fn attention_bwd_dkv_cmma_cuda_bf16_causal() {
    insta::assert_snapshot!(source(
        "attention_bwd_dkv_cmma",
        Target::Cuda,
        &[
            ("dtype", "bf16"),
            ("causal", "true"),
            ("PLANES", "4"),
            ("BQ", "32"),
            ("BC", "64"),
            ("BD", "32")
        ]
    ));
}

#[test]
fn attention_fwd_wgsl_causal_varlen() {
    insta::assert_snapshot!(source(
        "attention_fwd",
        Target::Wgsl,
        &[
            ("causal", "true"),
            ("varlen", "true"),
            ("BQ", "16"),
            ("BK", "32"),
            ("TQ", "2"),
            ("TK", "4"),
            ("BV", "32")
        ]
    ));
}

#[test]
fn attention_fwd_rows_wgsl_causal_f16() {
    insta::assert_snapshot!(source(
        "attention_fwd_rows",
        Target::Wgsl,
        &[
            ("dtype", "f16"),
            ("causal", "true"),
            ("BQ", "64"),
            ("TQ", "4"),
            ("TK", "2"),
            ("DQ", "16"),
            ("BV", "64")
        ]
    ));
}

/// The CPU adapters' form: the plane's lanes read an eighth of each key's vectors and
/// exchange them by shuffles (`SHARE = 8`).
#[test]
fn attention_fwd_rows_wgsl_plane_shared_f32() {
    insta::assert_snapshot!(source(
        "attention_fwd_rows",
        Target::Wgsl,
        &[
            ("dtype", "f32"),
            ("BQ", "64"),
            ("TQ", "4"),
            ("TK", "2"),
            ("DQ", "16"),
            ("BV", "64"),
            ("SHARE", "8")
        ]
    ));
}

#[test]
fn attention_bwd_dkv_cuda_bf16_causal() {
    insta::assert_snapshot!(source(
        "attention_bwd_dkv",
        Target::Cuda,
        &[("dtype", "bf16"), ("causal", "true"), ("grad_f32", "true")]
    ));
}

#[test]
fn moe_grouped_matmul_v4_wgsl_scatter_silu() {
    insta::assert_snapshot!(source(
        "moe_grouped_matmul_v4",
        Target::Wgsl,
        &[
            ("has_bias", "true"),
            ("act", "silu"),
            ("scatter", "true"),
            ("BM", "64"),
            ("BN", "64")
        ]
    ));
}

/// The tensor-core grouped GEMM of the MoE layer's second product in the sorted
/// layout: 8-wide operand loads, wmma fragments, each row scaled by its gate and
/// written to its route's row.
#[test]
fn moe_grouped_matmul_cmma_cuda_bf16_scatter() {
    insta::assert_snapshot!(source(
        "moe_grouped_matmul_cmma",
        Target::Cuda,
        &[
            ("dtype", "bf16"),
            ("scatter", "true"),
            ("PLANES_M", "2"),
            ("PLANES_N", "2"),
            ("FRAGS_M", "2"),
            ("FRAGS_N", "2"),
            ("BK", "32")
        ]
    ));
}

#[test]
fn moe_gate_topk_cuda_f16_normalized() {
    insta::assert_snapshot!(source(
        "moe_gate_topk",
        Target::Cuda,
        &[("dtype", "f16"), ("normalize", "true")]
    ));
}

#[test]
fn optim_step_wgsl_f16_adan_master() {
    insta::assert_snapshot!(source(
        "optim_step",
        Target::Wgsl,
        &[("dtype", "f16"), ("rule", "adan"), ("master", "true")]
    ));
}

#[test]
fn grouped_matmul_tn_cuda_bf16() {
    insta::assert_snapshot!(source(
        "grouped_matmul_tn",
        Target::Cuda,
        &[("dtype", "bf16"), ("BM", "32"), ("BN", "64")]
    ));
}

/// What a CPU adapter runs: scalar arguments copied into locals before the first branch.
#[test]
fn optim_step_wgsl_adamw_cpu_adapter() {
    insta::assert_snapshot!(source(
        "optim_step",
        Target::Wgsl,
        &[
            ("dtype", "f32"),
            ("rule", "adamw"),
            ("local_scalars", "true")
        ]
    ));
}

#[test]
fn optim_step_wgsl_lamb_norms_pass() {
    insta::assert_snapshot!(source(
        "optim_step",
        Target::Wgsl,
        &[
            ("dtype", "f32"),
            ("rule", "lamb"),
            ("phase", "norms"),
            ("slots", "6")
        ]
    ));
}

/// A span launch: one weight and one gradient binding, the slot found by a binary
/// search of the table (LAMB's update, reading its slot's norms).
#[test]
fn optim_step_cuda_lamb_spans() {
    insta::assert_snapshot!(source(
        "optim_step",
        Target::Cuda,
        &[
            ("dtype", "f32"),
            ("rule", "lamb"),
            ("slots", "1"),
            ("spans", "true")
        ]
    ));
}

#[test]
fn perturb_normal_cuda_bf16() {
    insta::assert_snapshot!(source("perturb_normal", Target::Cuda, &[("dtype", "bf16")]));
}

/// An atomic array argument (`&mut Array<Atomic<u32>>`): rand-k's marks, set with
/// `atomicOr` by the inverse permutation.
#[test]
fn topk_subset_mark_wgsl_atomic_or() {
    insta::assert_snapshot!(source("topk_subset_mark", Target::Wgsl, &[]));
}

/// On a CPU adapter the large register tiles' unrolled multiply-adds are cut into basic
/// blocks of 256 scalars of accumulators by loops that run once (`kiln_dsl::block_boundary`:
/// LLVM's slot promotion is quadratic in a block's length, a third of a cold tune), and
/// only there: the GPU forms keep one loop, K's. Counts the WGSL's `loop`s (K's loop and
/// the boundaries; epilogues are `for` loops).
#[test]
fn register_tiles_on_cpu_adapters_are_cut_into_blocks() {
    let loops = |kernel: &str, config: &[(&str, &str)], cpu: bool| {
        let mut config = config.to_vec();
        config.push(("local_scalars", if cpu { "true" } else { "false" }));
        source(kernel, Target::Wgsl, &config)
            .lines()
            .filter(|l| l.trim_start().starts_with("loop {"))
            .count()
    };
    let tall = [("BM", "64"), ("BN", "128"), ("TM", "64"), ("TN", "16")];
    let square = [("BM", "128"), ("BN", "128"), ("TM", "32"), ("TN", "32")];
    let shared: Vec<_> = tall.iter().copied().chain([("SHARE", "8")]).collect();
    // 64 x 16 f32 (vectors of 4): 1024 scalars, four blocks, three boundaries.
    assert_eq!(loops("matmul_vec4_plane", &tall, true), 4);
    assert_eq!(loops("matmul_vec4_plane", &tall, false), 1);
    assert_eq!(loops("matmul_vec4", &square, true), 4);
    assert_eq!(loops("matmul_vec4", &square, false), 1);
    assert_eq!(loops("w8a8_direct", &shared, true), 4);
    assert_eq!(loops("w8a8_direct", &shared, false), 1);
    // Shared rows are lavapipe's alone: blocks whatever `local_scalars` says.
    assert_eq!(loops("qgemm_direct", &shared, true), 4);
    // A 16 x 16 tile is one block.
    let small = [
        ("BM", "128"),
        ("BN", "128"),
        ("TM", "16"),
        ("TN", "16"),
        ("SHARE", "1"),
    ];
    assert_eq!(loops("w8a8_direct", &small, true), 1);
}
