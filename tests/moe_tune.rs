//! The MoE layer with autotuning on (the default): the grouped GEMM's candidates from
//! both kernels (shared-memory staged, 4-wide direct) and both layer paths are each
//! checked against the first before being timed, and the tuned layer still matches the
//! f64 reference; then the default ranked search (CPU adapters: the grouped GEMMs' cost
//! model) leaves configurations untimed and still matches.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{client, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::matmul::Activation;
use kiln::kernels::moe::{
    moe_layer, reference as rf, ExpertWeights, GateOptions, LayerOptions, MoePath,
};
use kiln::runtime::tune::{Autotuner, CandidateStatus, Search};
use kiln::runtime::AdapterType;
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
    let experts = rf::Experts {
        w1: &w1,
        b1: Some(&b1),
        w2: &w2,
        b2: Some(&b2),
        m,
        f,
        activation: "relu",
    };
    let want = rf::layer(&x, &r, &experts);
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
    let log = seen;
    let seen = log.lock().unwrap();
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
    drop(seen);

    // The default (ranked) search where the grouped GEMMs' cost model applies (CPU
    // adapters): the first 41 tokens (capacity 21 rows an expert: a fresh key) time only
    // the best-ranked grouped configurations, and the layer still matches.
    if client().report().adapter_type == AdapterType::Cpu {
        Autotuner::global().set_search(Search::Ranked);
        log.lock().unwrap().clear();
        let s = 41;
        let x = &x[..s * m];
        let r = rf::gate(&rf::gate_logits(x, &wg, m, e), e, k, 1.0, true, false);
        let want = rf::layer(x, &r, &experts);
        let out = moe_layer(
            &t(&[s, m], x),
            &twg,
            &w,
            &LayerOptions {
                gate: GateOptions::new(k, 1.0),
                path: MoePath::Capacity,
            },
        )
        .unwrap();
        let err = max_rel_error(&down(&out.y), &want, 1.0);
        assert!(err < 4e-6, "ranked: y {err:e}");
        let seen = log.lock().unwrap();
        assert!(
            seen.iter()
                .any(|(_, st)| matches!(st, CandidateStatus::NotTimed { .. })),
            "every grouped configuration ran: {seen:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
