//! The MoE layer with autotuning on (the default): the grouped GEMM's candidates from
//! both kernels (shared-memory staged, 4-wide direct) and both layer paths are each
//! checked against the first before being timed, and the tuned layer still matches the
//! f64 reference. Then every grouped configuration, forced, against the reference.

mod common;

use common::{client, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::matmul::Activation;
use kiln::kernels::moe::{
    moe_expert_ffn_sorted_with, moe_expert_ffn_with, moe_gate, moe_layer, reference as rf,
    ExpertWeights, GateOptions, GroupedConfig, LayerOptions, MoeGroupedMatmul,
    MoeGroupedMatmulProblem, MoeGroupedMatmulV4, MoeGroupedMatmulV4Problem, MoePath,
};
use kiln::runtime::tune::CandidateStatus;
use kiln::{DType, HostTensor};

#[test]
fn tuned_layer_matches_the_reference() {
    let (dir, seen) = common::tune_from_scratch("moe");
    // Ragged against every tile: 83 tokens, M = 36, F = 44, 4 experts, top-2.
    let (s, m, f, e, k) = (83, 36, 44, 4, 2);
    let mut rng = Rng::new(7);
    let mut gen = |shape: &[usize], scale: f64| {
        let n = shape.iter().product();
        HostTensor::from_f64(DType::F32, shape.to_vec(), &rng.normals(n, scale))
            .unwrap()
            .to_f64()
    };
    let (x, wg, w1, w2, b1, b2) = (
        gen(&[s, m], 1.0),
        gen(&[m, e], 0.5),
        gen(&[e, m, f], 0.3),
        gen(&[e, f, m], 0.3),
        gen(&[e, f], 0.3),
        gen(&[e, m], 0.3),
    );
    let r = rf::gate(&rf::gate_logits(&x, &wg, m, e), e, k, 1.0, true, false);
    let want = rf::layer(
        &x,
        &r,
        &rf::Experts {
            w1: &w1,
            b1: Some(&b1),
            w2: &w2,
            b2: Some(&b2),
            m,
            f,
            activation: "relu",
        },
    );
    let _ = client();
    let t = |shape: &[usize], v: &[f64]| up(DType::F32, shape, v);
    let (tx, twg, tw1, tw2, tb1, tb2) = (
        t(&[s, m], &x),
        t(&[m, e], &wg),
        t(&[e, m, f], &w1),
        t(&[e, f, m], &w2),
        t(&[e, f], &b1),
        t(&[e, m], &b2),
    );
    let w = ExpertWeights {
        w1: &tw1,
        b1: Some(&tb1),
        w2: &tw2,
        b2: Some(&tb2),
        activation: Activation::Relu,
    };
    for path in [MoePath::Auto, MoePath::Capacity, MoePath::Dropless] {
        let out = moe_layer(
            &tx,
            &twg,
            &w,
            &LayerOptions {
                gate: GateOptions::new(k, 1.0),
                path,
            },
        )
        .unwrap();
        // F = 44 products per hidden unit and M = 36 per output: f32 rounding of a few
        // 1e-7 per sum (relative to max(|y|, 1)).
        let err = max_rel_error(&down(&out.y), &want, 1.0);
        assert!(err < 4e-6, "tuned {path:?}: y {err:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().unwrap();
    for kind in ["staged", "vec4", "capacity", "dropless"] {
        assert!(
            seen.iter().any(|(l, _)| l.starts_with(kind)),
            "no `{kind}` candidate timed: {seen:?}"
        );
    }
    for (label, status) in seen.iter() {
        assert!(
            matches!(status, CandidateStatus::Timed(_)),
            "{label}: {status:?}"
        );
    }
}

/// The configurations of both grouped kernels offered to both GEMMs of an FFN of width
/// `m`, hidden width `f`, `experts` experts of at most `max_rows` rows.
fn grouped_configs(max_rows: usize, m: usize, f: usize, experts: usize) -> Vec<GroupedConfig> {
    let offered = |n: usize, k: usize| {
        let (n, k, experts, max_rows) = (n as u32, k as u32, experts as u32, max_rows as u32);
        let staged = MoeGroupedMatmul::space(
            client(),
            &MoeGroupedMatmulProblem {
                n,
                k,
                experts,
                max_rows,
                has_bias: true,
                act: Activation::Gelu,
                scatter: false,
                a_f32: false,
                c_f32: false,
                trans_b: false,
            },
        );
        let vec4 = MoeGroupedMatmulV4::space(
            client(),
            &MoeGroupedMatmulV4Problem {
                n,
                k,
                experts,
                max_rows,
                has_bias: true,
                act: Activation::Gelu,
                scatter: false,
                a_f32: false,
                c_f32: false,
            },
        );
        let mut all: Vec<GroupedConfig> = staged.into_iter().map(GroupedConfig::Staged).collect();
        all.extend(vec4.into_iter().map(GroupedConfig::Vec4));
        all
    };
    let second = offered(m, f);
    offered(f, m)
        .into_iter()
        .filter(|c| second.contains(c))
        .collect()
}

/// Every configuration of both grouped kernels forced on both GEMMs of the expert FFN:
/// f32 in the capacity layout (bias + GELU, plain stores), f16 in the sorted layout
/// (hidden activations in f32, the second GEMM scaling each row by its gate into its
/// route's row). M = 132, F = 260 and 133 or 300 rows an expert: ragged against every
/// tile, and large enough for the register tiles past 16 x 16 (offered only where an
/// expert's rows and N fill a cube).
#[test]
fn every_grouped_config_matches_the_reference() {
    let (m, f, e) = (132, 260, 2);
    let mut rng = Rng::new(23);
    let mut gen = |dtype: DType, shape: &[usize], scale: f64| {
        let n = shape.iter().product();
        HostTensor::from_f64(dtype, shape.to_vec(), &rng.normals(n, scale))
            .unwrap()
            .to_f64()
    };
    for (dtype, sorted) in [(DType::F32, false), (DType::F16, true)] {
        if common::refused(dtype) {
            continue;
        }
        let (w1, w2, b1, b2) = (
            gen(dtype, &[e, m, f], 0.3),
            gen(dtype, &[e, f, m], 0.3),
            gen(dtype, &[e, f], 0.3),
            gen(dtype, &[e, m], 0.3),
        );
        let experts = rf::Experts {
            w1: &w1,
            b1: Some(&b1),
            w2: &w2,
            b2: Some(&b2),
            m,
            f,
            activation: "gelu",
        };
        let t = |shape: &[usize], v: &[f64]| up(dtype, shape, v);
        let (tw1, tw2, tb1, tb2) = (
            t(&[e, m, f], &w1),
            t(&[e, f, m], &w2),
            t(&[e, f], &b1),
            t(&[e, m], &b2),
        );
        let w = ExpertWeights {
            w1: &tw1,
            b1: Some(&tb1),
            w2: &tw2,
            b2: Some(&tb2),
            activation: Activation::Gelu,
        };
        // Relative to |y| + `floor`. f32: sums of M = 132 and F = 260 terms of a few units
        // each, 8 eps sqrt(K) per GEMM (the matmul tests' bound), floor 1. f16: each
        // route's row (|g Y| up to a few times y's RMS, so the two of a token can cancel)
        // and their sum rounded to f16 once each: 8 half-ulps, floor y's RMS.
        let (bound, floor) = if dtype == DType::F32 {
            (16.0 * f32::EPSILON as f64 * (f as f64).sqrt(), 1.0)
        } else {
            (8.0 * DType::F16.epsilon() / 2.0, 0.0f64)
        };
        if sorted {
            // Top-2 of 2 experts, dropless: all 300 tokens at each expert.
            let s = 300;
            let x = gen(dtype, &[s, m], 1.0);
            let l = gen(DType::F32, &[s, e], 1.5);
            let g = moe_gate(&up(DType::F32, &[s, e], &l), &GateOptions::new(2, 0.0)).unwrap();
            let want = rf::layer(&x, &rf::gate(&l, e, 2, 0.0, true, false), &experts);
            let tx = t(&[s, m], &x);
            let configs = grouped_configs(s, m, f, e);
            let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
            each_config(dtype, &configs, &want, bound, floor.max(rms), |cfg| {
                moe_expert_ffn_sorted_with(&tx, &g.routing, &w, cfg)
            });
        } else {
            let c = 133;
            let d = gen(dtype, &[e, c, m], 1.0);
            let want = experts.ffn_slots(&d, e);
            let td = t(&[e, c, m], &d);
            let configs = grouped_configs(c, m, f, e);
            each_config(dtype, &configs, &want, bound, floor, |cfg| {
                moe_expert_ffn_with(&td, &w, cfg)
            });
            // A configuration the problem does not offer is refused by name: the 32 x 32
            // tile with 20 rows an expert.
            let big = *configs
                .iter()
                .find(|c| c.label().ends_with("TM=32 TN=32"))
                .unwrap();
            let few = t(&[e, 20, m], &d[..e * 20 * m]);
            let err = moe_expert_ffn_with(&few, &w, big).unwrap_err();
            common::assert_clear(err, &["config", "TM=32 TN=32"]);
        }
    }
}

/// Runs `run` on each of `configs` (which must include staged ones and the 32 x 32 vector
/// tile) and checks it against `want` within `bound` (relative to |want| + `floor`).
fn each_config(
    dtype: DType,
    configs: &[GroupedConfig],
    want: &[f64],
    bound: f64,
    floor: f64,
    run: impl Fn(GroupedConfig) -> kiln::Result<kiln::Tensor>,
) {
    for kind in ["staged", "vec4 BM=128 BN=128 TM=32 TN=32"] {
        assert!(
            configs.iter().any(|c| c.label().starts_with(kind)),
            "{dtype}: no `{kind}` configuration offered: {configs:?}"
        );
    }
    for &cfg in configs {
        let err = max_rel_error(&down(&run(cfg).unwrap()), want, floor);
        assert!(err < bound, "{dtype} {}: {err:e} >= {bound:e}", cfg.label());
    }
}
