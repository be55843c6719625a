//! Mixture-of-Experts against the f64 reference written from the spec: the gate over
//! S in {1, 7, 513}, E in {1, 4, 8, 64}, k in {1, 2, 4}, capacity factors {0, 0.5, 1,
//! 2} (identical ids, locations and drops), adversarial routings, the layer on both
//! paths, determinism, expert parallelism against one device, gradients against finite
//! differences, bad input, and every configuration of the grouped GEMM kernels forced.
//!
//! One suite for the family (longer than most files): its tests share the reference
//! helpers at the top.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::matmul::Activation;
use kiln::kernels::moe::{
    moe_combine, moe_combine_backward, moe_dispatch, moe_dispatch_backward, moe_expert_ffn_on,
    moe_expert_ffn_sorted_with, moe_expert_ffn_with, moe_gate, moe_gate_backward,
    moe_grouped_matmul_with, moe_layer, moe_layer_backward, moe_layer_backward_local_ranks,
    moe_layer_expert_parallel, moe_layer_local_ranks, moe_layer_on, reference as rf, ExpertWeights,
    GateOptions, GroupedConfig, GroupedKernel, LayerOptions, MoeGroupedMatmul,
    MoeGroupedMatmulProblem, MoeGroupedMatmulV4, MoeGroupedMatmulV4Problem, MoePath, MoeRouting,
};
use kiln::runtime::comm::HostComm;
use kiln::{DType, HostTensor, Tensor};
use std::collections::BTreeMap;
use std::time::Duration;

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
    common::client()
}

fn round(dtype: DType, shape: &[usize], v: &[f64]) -> Vec<f64> {
    HostTensor::from_f64(dtype, shape.to_vec(), v)
        .unwrap()
        .to_f64()
}

fn ints(t: &Tensor) -> Vec<i64> {
    down(t).iter().map(|&v| v as i64).collect()
}

/// Router logits with the adversarial rows of the issue mixed in: exact ties, a row
/// with every logit equal, `-inf` entries, and a hot expert.
fn logits(rng: &mut Rng, s: usize, e: usize) -> Vec<f64> {
    let mut l = rng.normals(s * e, 2.0);
    for t in 0..s {
        match t % 11 {
            3 => l[t * e..(t + 1) * e].fill(0.25),
            5 if e > 1 => l[t * e + e - 1] = f64::NEG_INFINITY,
            7 => l[t * e + (t % e)] += 6.0,
            8 if e > 2 => {
                l[t * e + 2] = l[t * e];
            }
            _ => {}
        }
    }
    l
}

fn check_gate(s: usize, e: usize, k: usize, cf: f64, prioritized: bool, l: &[f64]) {
    let what = format!("S={s} E={e} k={k} cf={cf} prioritized={prioritized}");
    let lt = up(DType::F32, &[s, e], l);
    let mut opts = GateOptions::new(k, cf);
    opts.batch_prioritized = prioritized;
    let g = moe_gate(&lt, &opts).unwrap();
    let want = rf::gate(&round(DType::F32, &[s, e], l), e, k, cf, k > 1, prioritized);
    let r = &g.routing;
    let ids: Vec<i64> = want.ids.iter().map(|&x| x as i64).collect();
    assert_eq!(ints(r.expert_ids()), ids, "{what}: expert_ids");
    assert_eq!(ints(r.locations()), want.locations, "{what}: locations");
    assert_eq!(r.capacity(), want.capacity, "{what}: capacity");
    let eg = max_rel_error(&down(r.gates().unwrap()), &want.gates, 1e-3);
    assert!(eg < 1e-6, "{what}: gates {eg:e}");
    let el = max_rel_error(&down(&g.l_aux), &[want.l_aux], 1e-3);
    assert!(el < 1e-6, "{what}: l_aux {el:e}");
}

#[test]
fn gate_matches_reference_over_the_issue_matrix() {
    let _ = client();
    let mut rng = Rng::new(5);
    for s in [1, 7, 513] {
        for e in [1, 4, 8, 64] {
            let l = logits(&mut rng, s, e);
            for k in [1, 2, 4].into_iter().filter(|&k| k <= e) {
                for cf in [0.0, 0.5, 1.0, 2.0] {
                    check_gate(s, e, k, cf, false, &l);
                }
            }
            check_gate(s, e, 1.min(e), 1.0, true, &l);
        }
    }
}

#[test]
fn load_balancing_loss_stays_exact_over_many_tokens() {
    let _ = client();
    // Equal logits, E = 10: every top-1 to expert 0 (ties to the lower index), each
    // p = 0.1, so l_aux = 10 * 0.1 * 1 = 1. One f32 running sum over the 2^18 tokens
    // gave 0.9975.
    let (s, e) = (1 << 18, 10);
    let g = moe_gate(
        &up(DType::F32, &[s, e], &vec![0.0; s * e]),
        &GateOptions::new(1, 1.0),
    )
    .unwrap();
    let l_aux = down(&g.l_aux)[0];
    assert!((l_aux - 1.0).abs() < 1e-6, "l_aux {l_aux}");
    // Ragged against every level of the sum's tree (70001 = 273 blocks of 256 + 113)
    // and more experts than a cube has units: against the f64 reference.
    let mut rng = Rng::new(9);
    check_gate(70_001, 300, 2, 1.0, false, &logits(&mut rng, 70_001, 300));
}

#[test]
fn adversarial_routings() {
    let _ = client();
    let (s, e) = (50, 4);
    // Every token to one expert: locations 0..C-1 there, the rest dropped.
    let mut hot = vec![0.0; s * e];
    for t in 0..s {
        hot[t * e + 2] = 10.0;
    }
    check_gate(s, e, 1, 1.0, false, &hot);
    check_gate(s, e, 2, 0.5, false, &hot);
    // All logits equal: ties everywhere, the lower experts win.
    check_gate(s, e, 2, 1.0, false, &vec![0.3; s * e]);
    // -inf everywhere but one expert, and rows of nothing but -inf.
    let mut inf = vec![f64::NEG_INFINITY; s * e];
    for t in 0..s / 2 {
        inf[t * e + t % e] = 0.0;
    }
    check_gate(s, e, 2, 2.0, false, &inf);
    // E = 1, and k = E.
    check_gate(s, 1, 1, 1.0, false, &vec![0.0; s]);
    let mut rng = Rng::new(9);
    check_gate(s, e, e, 0.0, false, &rng.normals(s * e, 1.0));
    // The gates of a row with no mass are 0 and never NaN.
    let g = moe_gate(&up(DType::F32, &[s, e], &inf), &GateOptions::new(2, 1.0)).unwrap();
    assert!(down(g.routing.gates().unwrap())
        .iter()
        .all(|v| v.is_finite()));
}

struct Layer {
    s: usize,
    m: usize,
    f: usize,
    e: usize,
    x: Vec<f64>,
    w_gate: Vec<f64>,
    w1: Vec<f64>,
    w2: Vec<f64>,
    b1: Vec<f64>,
    b2: Vec<f64>,
}

impl Layer {
    fn new(rng: &mut Rng, s: usize, m: usize, f: usize, e: usize, dtype: DType) -> Layer {
        let mut g = |shape: &[usize], scale: f64| {
            let n = shape.iter().product();
            round(dtype, shape, &rng.normals(n, scale))
        };
        Layer {
            s,
            m,
            f,
            e,
            x: g(&[s, m], 1.0),
            w_gate: g(&[m, e], 0.5),
            w1: g(&[e, m, f], 0.3),
            w2: g(&[e, f, m], 0.3),
            b1: g(&[e, f], 0.3),
            b2: g(&[e, m], 0.3),
        }
    }

    /// The experts in f64 (GELU).
    fn experts(&self) -> rf::Experts<'_> {
        rf::Experts {
            w1: &self.w1,
            b1: Some(&self.b1),
            w2: &self.w2,
            b2: Some(&self.b2),
            m: self.m,
            f: self.f,
            activation: "gelu",
        }
    }

    fn reference(&self, k: usize, cf: f64) -> (rf::Routing, Vec<f64>) {
        let logits = rf::gate_logits(&self.x, &self.w_gate, self.m, self.e);
        let r = rf::gate(&logits, self.e, k, cf, k > 1, false);
        let w = self.experts();
        let y = rf::layer(&self.x, &r, &w);
        // The dense per-token loop (dropless reference) agrees with GShard's einsums.
        let y2 = rf::layer_per_token(&self.x, &r, &w);
        assert!(max_rel_error(&y, &y2, 1.0) < 1e-12);
        (r, y)
    }

    fn run(
        &self,
        dtype: DType,
        k: usize,
        cf: f64,
        path: MoePath,
        world_size: usize,
    ) -> kiln::kernels::moe::LayerOutput {
        self.run_gate(dtype, GateOptions::new(k, cf), path, world_size)
    }

    fn run_gate(
        &self,
        dtype: DType,
        gate: GateOptions,
        path: MoePath,
        world_size: usize,
    ) -> kiln::kernels::moe::LayerOutput {
        let (s, m, e) = (self.s, self.m, self.e);
        let (x, wg) = (
            up(dtype, &[s, m], &self.x),
            up(dtype, &[m, e], &self.w_gate),
        );
        let device = DeviceExperts::up(dtype, &self.experts(), e, Activation::Gelu);
        let w = device.weights();
        let opts = LayerOptions { gate, path };
        if world_size == 1 {
            moe_layer(&x, &wg, &w, &opts).unwrap()
        } else {
            moe_layer_local_ranks(&x, &wg, &w, &opts, world_size).unwrap()
        }
    }
}

#[test]
fn layer_matches_reference_over_the_issue_matrix() {
    let _ = client();
    let mut rng = Rng::new(17);
    let mut n = 0;
    for s in [1, 7, 513] {
        for e in [1, 4, 8, 64] {
            let layer = Layer::new(&mut rng, s, 8, 12, e, DType::F32);
            for k in [1, 2, 4].into_iter().filter(|&k| k <= e) {
                for cf in [0.0, 0.5, 1.0, 2.0] {
                    let (r, want) = layer.reference(k, cf);
                    // Both paths on a quarter of the cases, alternating otherwise.
                    let paths: &[MoePath] = match n % 4 {
                        0 => &[MoePath::Capacity, MoePath::Dropless],
                        1 | 3 => &[MoePath::Dropless],
                        _ => &[MoePath::Capacity],
                    };
                    n += 1;
                    for &path in paths {
                        let out = layer.run(DType::F32, k, cf, path, 1);
                        let what = format!("S={s} E={e} k={k} cf={cf} {path:?}");
                        assert_eq!(ints(out.routing.locations()), r.locations, "{what}");
                        let err = max_rel_error(&down(&out.y), &want, 1.0);
                        assert!(err < 1e-6, "{what}: y {err:e}");
                    }
                }
            }
        }
    }
}

#[test]
fn half_precision_layer_within_1e3() {
    let _ = client();
    let mut rng = Rng::new(23);
    let layer = Layer::new(&mut rng, 61, 16, 24, 4, DType::F16);
    let (_, want) = layer.reference(2, 1.0);
    for path in [MoePath::Capacity, MoePath::Dropless] {
        let out = layer.run(DType::F16, 2, 1.0, path, 1);
        assert_eq!(out.y.dtype(), DType::F16);
        let err = max_rel_error(&down(&out.y), &want, 1.0);
        assert!(err < 1e-3, "{path:?}: y {err:e}");
    }
    // Expert parallelism in f16, in both counting orders (cf 0.5 drops: which routes
    // survive depends on every rank's tokens): the same routes as one device.
    for (cf, prioritized) in [(1.0, false), (0.5, true)] {
        let mut gate = GateOptions::new(2, cf);
        gate.batch_prioritized = prioritized;
        let one = layer.run_gate(DType::F16, gate, MoePath::Capacity, 1);
        for p in [2, 4] {
            let what = format!("f16 P={p} cf={cf} prioritized={prioritized}");
            let ep = layer.run_gate(DType::F16, gate, MoePath::Capacity, p);
            assert_eq!(
                ints(ep.routing.expert_ids()),
                ints(one.routing.expert_ids()),
                "{what}"
            );
            assert_eq!(
                ints(ep.routing.locations()),
                ints(one.routing.locations()),
                "{what}"
            );
            let err = max_rel_error(&down(&ep.y), &down(&one.y), 1.0);
            assert!(err < 1e-3, "{what}: y {err:e}");
        }
    }
}

#[test]
fn ten_runs_are_bit_identical() {
    let _ = client();
    let mut rng = Rng::new(29);
    let layer = Layer::new(&mut rng, 513, 16, 16, 8, DType::F32);
    let first = layer.run(DType::F32, 2, 1.0, MoePath::Dropless, 1);
    let bits = |t: &Tensor| {
        t.download()
            .unwrap()
            .to_f64()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    let (y0, ids0, loc0) = (
        bits(&first.y),
        bits(first.routing.expert_ids()),
        bits(first.routing.locations()),
    );
    for _ in 0..9 {
        let out = layer.run(DType::F32, 2, 1.0, MoePath::Dropless, 1);
        assert_eq!(bits(&out.y), y0);
        assert_eq!(bits(out.routing.expert_ids()), ids0);
        assert_eq!(bits(out.routing.locations()), loc0);
    }
}

#[test]
fn expert_parallel_backward_equals_one_device() {
    let _ = client();
    let mut rng = Rng::new(37);
    // 61 tokens over 2 or 4 ranks, 8 experts, cf 1 (some drops), d_l_aux.
    let layer = Layer::new(&mut rng, 61, 12, 8, 8, DType::F32);
    backward_over_ranks_equals_one_device(&layer, &mut rng, &[2, 4]);
}

/// `moe_layer_backward` over each of `ranks` expert-parallel ranks (top-2, cf 1, d_l_aux
/// 0.7, a random `dy`) equals one device's: every gradient within 1e-6.
fn backward_over_ranks_equals_one_device(layer: &Layer, rng: &mut Rng, ranks: &[usize]) {
    let (s, m, f, e) = (layer.s, layer.m, layer.f, layer.e);
    let t = |shape: &[usize], v: &[f64]| up(DType::F32, shape, v);
    let (x, wg, w1, w2, b1, b2) = (
        t(&[s, m], &layer.x),
        t(&[m, e], &layer.w_gate),
        t(&[e, m, f], &layer.w1),
        t(&[e, f, m], &layer.w2),
        t(&[e, f], &layer.b1),
        t(&[e, m], &layer.b2),
    );
    let dy = t(&[s, m], &rng.normals(s * m, 1.0));
    let w = ExpertWeights {
        w1: &w1,
        b1: Some(&b1),
        w2: &w2,
        b2: Some(&b2),
        activation: Activation::Gelu,
    };
    let gate = GateOptions::new(2, 1.0);
    let one = moe_layer_backward(&x, &wg, &w, &gate, &dy, 0.7).unwrap();
    for &p in ranks {
        let ep = moe_layer_backward_local_ranks(&x, &wg, &w, &gate, &dy, 0.7, p).unwrap();
        for (name, a, b) in [
            ("dx", &ep.dx, &one.dx),
            ("d_w_gate", &ep.d_w_gate, &one.d_w_gate),
            ("d_w1", &ep.d_w1, &one.d_w1),
            ("d_w2", &ep.d_w2, &one.d_w2),
            ("d_b1", &ep.d_b1, &one.d_b1),
            ("d_b2", &ep.d_b2, &one.d_b2),
        ] {
            assert_eq!(a.shape(), b.shape(), "P={p} {name}");
            let err = max_rel_error(&down(a), &down(b), 1.0);
            assert!(err < 1e-6, "P={p} {name}: {err:e}");
        }
    }
}

#[test]
fn expert_parallel_equals_one_device() {
    let _ = client();
    let mut rng = Rng::new(31);
    // 509 tokens (not divisible by 2 or 4), 8 experts over 2 or 4 ranks; slots counted
    // in token order, or by top-1 probability over every rank's tokens (where cf 0.5
    // drops, which routes survive depends on all of them).
    let layer = Layer::new(&mut rng, 509, 16, 12, 8, DType::F32);
    for (cf, prioritized) in [(0.0, false), (1.0, false), (0.5, true), (0.0, true)] {
        let mut gate = GateOptions::new(2, cf);
        gate.batch_prioritized = prioritized;
        let what = |p: usize| format!("P={p} cf={cf} prioritized={prioritized}");
        let one = layer.run_gate(DType::F32, gate, MoePath::Capacity, 1);
        for p in [2, 4] {
            let ep = layer.run_gate(DType::F32, gate, MoePath::Capacity, p);
            assert_eq!(
                ints(ep.routing.expert_ids()),
                ints(one.routing.expert_ids()),
                "{}",
                what(p)
            );
            assert_eq!(
                ints(ep.routing.locations()),
                ints(one.routing.locations()),
                "{}",
                what(p)
            );
            let err = max_rel_error(&down(&ep.y), &down(&one.y), 1.0);
            assert!(err < 1e-6, "{}: y {err:e}", what(p));
            let el = max_rel_error(&down(&ep.l_aux), &down(&one.l_aux), 1e-3);
            assert!(el < 1e-6, "{}: l_aux {el:e}", what(p));
        }
    }
}

/// Fewer tokens than ranks: rank 3 of 4 holds none (3 tokens), in both counting orders.
#[test]
fn expert_parallel_with_an_empty_rank_equals_one_device() {
    let _ = client();
    let mut rng = Rng::new(41);
    let layer = Layer::new(&mut rng, 3, 8, 8, 4, DType::F32);
    for prioritized in [false, true] {
        let mut gate = GateOptions::new(2, 1.0);
        gate.batch_prioritized = prioritized;
        let one = layer.run_gate(DType::F32, gate, MoePath::Capacity, 1);
        let ep = layer.run_gate(DType::F32, gate, MoePath::Capacity, 4);
        assert_eq!(
            ints(ep.routing.expert_ids()),
            ints(one.routing.expert_ids())
        );
        assert_eq!(ints(ep.routing.locations()), ints(one.routing.locations()));
        let err = max_rel_error(&down(&ep.y), &down(&one.y), 1.0);
        assert!(err < 1e-6, "prioritized={prioritized}: y {err:e}");
    }
    // The backward, rank 3 with no tokens.
    backward_over_ranks_equals_one_device(&layer, &mut rng, &[4]);
}

/// A routing of random logits and its f64 reference.
fn routing(rng: &mut Rng, s: usize, e: usize, k: usize, cf: f64) -> (MoeRouting, rf::Routing) {
    let l = round(DType::F32, &[s, e], &rng.normals(s * e, 1.5));
    let g = moe_gate(&up(DType::F32, &[s, e], &l), &GateOptions::new(k, cf)).unwrap();
    (g.routing, rf::gate(&l, e, k, cf, k > 1, false))
}

/// Central differences of `f` at `x` along every coordinate.
fn finite_differences(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[i] += h;
            b[i] -= h;
            (f(&a) - f(&b)) / (2.0 * h)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn gradients_match_finite_differences_of_the_reference() {
    let _ = client();
    let mut rng = Rng::new(41);
    let (s, e, k, m) = (23, 5, 2, 6);
    // Gate: L = <d_gates, gates(logits)> + d_l_aux l_aux(logits), selection fixed.
    let l = round(DType::F32, &[s, e], &rng.normals(s * e, 1.0));
    let dg = round(DType::F32, &[s, k], &rng.normals(s * k, 1.0));
    let d_l_aux = 0.6;
    let got = down(
        &moe_gate_backward(
            &up(DType::F32, &[s, e], &l),
            &up(DType::F32, &[s, k], &dg),
            d_l_aux,
            &GateOptions::new(k, 1.0),
        )
        .unwrap(),
    );
    let fd = finite_differences(&l, 1e-6, |x| {
        let r = rf::gate(x, e, k, 1.0, true, false);
        dot(&dg, &r.gates) + d_l_aux * r.l_aux
    });
    let err = max_rel_error(&got, &fd, 1.0);
    assert!(err < 1e-5, "d_logits {err:e}");

    // Dispatch and combine are linear: their gradients against differences of
    // <upstream, op(input)>.
    let (r, rr) = routing(&mut rng, s, e, k, 1.0);
    let c = r.capacity();
    let x = round(DType::F32, &[s, m], &rng.normals(s * m, 1.0));
    let d_d = round(DType::F32, &[e, c, m], &rng.normals(e * c * m, 1.0));
    let dx = down(&moe_dispatch_backward(&up(DType::F32, &[e, c, m], &d_d), &r).unwrap());
    let fd = finite_differences(&x, 1e-3, |x| dot(&d_d, &rr.dispatch(x, m)));
    assert!(max_rel_error(&dx, &fd, 1.0) < 1e-5, "dx");
    let y_e = round(DType::F32, &[e, c, m], &rng.normals(e * c * m, 1.0));
    let dy = round(DType::F32, &[s, m], &rng.normals(s * m, 1.0));
    let (d_out, d_gates) = moe_combine_backward(
        &up(DType::F32, &[s, m], &dy),
        &up(DType::F32, &[e, c, m], &y_e),
        &r,
    )
    .unwrap();
    let fd = finite_differences(&y_e, 1e-3, |v| dot(&dy, &rr.combine(v, m)));
    assert!(
        max_rel_error(&down(&d_out), &fd, 1.0) < 1e-5,
        "d_expert_out"
    );
    let fd = finite_differences(&rr.gates, 1e-3, |g| {
        let mut r2 = rr.clone();
        r2.gates = g.to_vec();
        dot(&dy, &r2.combine(&y_e, m))
    });
    assert!(max_rel_error(&down(&d_gates), &fd, 1.0) < 1e-5, "d_gates");
    // And the forward ops against the same reference.
    let disp = down(&moe_dispatch(&up(DType::F32, &[s, m], &x), &r).unwrap());
    assert_eq!(disp, rr.dispatch(&x, m));
    let y = down(&moe_combine(&up(DType::F32, &[e, c, m], &y_e), &r).unwrap());
    assert!(max_rel_error(&y, &rr.combine(&y_e, m), 1.0) < 1e-6);
}

/// A random f32 layer of `s` tokens (gelu experts with biases) at top-`k`, capacity
/// factor `cf`, and an upstream gradient `dy`.
fn random_layer(
    rng: &mut Rng,
    (s, m, f, e): (usize, usize, usize, usize),
    k: usize,
    cf: f64,
) -> (rf::LayerInputs, Vec<f64>) {
    let mut g = |n: usize, scale: f64| round(DType::F32, &[n], &rng.normals(n, scale));
    let inputs = rf::LayerInputs {
        x: g(s * m, 1.0),
        w_gate: g(m * e, 0.5),
        w1: g(e * m * f, 0.4),
        b1: g(e * f, 0.3),
        w2: g(e * f * m, 0.4),
        b2: g(e * m, 0.3),
        m,
        f,
        e,
        k,
        cf,
        activation: "gelu",
    };
    let dy = g(s * m, 1.0);
    (inputs, dy)
}

/// A layer's tensors on the device: x, w_gate, w1, w2, b1, b2.
struct DeviceLayer([Tensor; 6]);

impl DeviceLayer {
    fn up(i: &rf::LayerInputs) -> DeviceLayer {
        let (m, f, e) = (i.m, i.f, i.e);
        let s = i.x.len() / m;
        let t = |shape: &[usize], v: &[f64]| up(DType::F32, shape, v);
        DeviceLayer([
            t(&[s, m], &i.x),
            t(&[m, e], &i.w_gate),
            t(&[e, m, f], &i.w1),
            t(&[e, f, m], &i.w2),
            t(&[e, f], &i.b1),
            t(&[e, m], &i.b2),
        ])
    }

    fn experts(&self) -> ExpertWeights<'_> {
        let [_, _, w1, w2, b1, b2] = &self.0;
        ExpertWeights {
            w1,
            b1: Some(b1),
            w2,
            b2: Some(b2),
            activation: Activation::Gelu,
        }
    }
}

/// `moe_layer_backward` of `inputs` for `dy` and `d_l_aux`: every gradient within 1e-5
/// of finite differences of the f64 reference.
fn check_layer_backward(inputs: &rf::LayerInputs, dy: &[f64], d_l_aux: f64, what: &str) {
    let d = DeviceLayer::up(inputs);
    let [x, wg, ..] = &d.0;
    let grads = moe_layer_backward(
        x,
        wg,
        &d.experts(),
        &GateOptions::new(inputs.k, inputs.cf),
        &up(DType::F32, x.shape(), dy),
        d_l_aux,
    )
    .unwrap();
    for (name, got) in [
        ("x", &grads.dx),
        ("w_gate", &grads.d_w_gate),
        ("w1", &grads.d_w1),
        ("b1", &grads.d_b1),
        ("w2", &grads.d_w2),
        ("b2", &grads.d_b2),
    ] {
        let fd = inputs.grad_fd(name, dy, d_l_aux);
        let err = max_rel_error(&down(got), &fd, 1.0);
        assert!(err < 1e-5, "{what}: d_{name}: {err:e}");
    }
}

#[test]
fn layer_backward_matches_finite_differences_for_every_input() {
    let _ = client();
    // 11 tokens, M = 5, 4 experts of F = 6, top-2 at cf 0.5 (drops), gelu, d_l_aux.
    let (inputs, dy) = random_layer(&mut Rng::new(43), (11, 5, 6, 4), 2, 0.5);
    check_layer_backward(&inputs, &dy, 0.8, "11 tokens, top-2, cf 0.5");
}

/// Capacity 0 (7 tokens over 8 experts at cf 0.5: `floor(0.5 ceil(7 / 8)) = 0`): every
/// route dropped, so dispatch is `[E, 0, M]`, combine and dispatch's backward are zeros,
/// and the layer (capacity path) and its backward match the reference, with `M` both a
/// multiple of 4 (the 4-wide kernels) and not. These used to panic inside wgpu (a
/// launch binding an empty tensor as vectors).
#[test]
fn capacity_zero_drops_every_route_without_a_launch() {
    let _ = client();
    let mut rng = Rng::new(47);
    let (s, f, e, k, cf) = (7, 3, 8, 1, 0.5);
    for m in [4, 5] {
        let (inputs, dy) = random_layer(&mut rng, (s, m, f, e), k, cf);
        let d = DeviceLayer::up(&inputs);
        let [x, wg, ..] = &d.0;
        let logits = rf::gate_logits(&inputs.x, &inputs.w_gate, m, e);
        let gate = moe_gate(&up(DType::F32, &[s, e], &logits), &GateOptions::new(k, cf)).unwrap();
        let r = &gate.routing;
        assert_eq!(r.capacity(), 0, "M={m}");
        assert!(ints(r.locations()).iter().all(|&l| l == -1), "M={m}");
        let dispatched = moe_dispatch(x, r).unwrap();
        assert_eq!(dispatched.shape(), [e, 0, m]);
        assert_eq!(
            down(&moe_combine(&dispatched, r).unwrap()),
            vec![0.0; s * m]
        );
        assert_eq!(
            down(&moe_dispatch_backward(&dispatched, r).unwrap()),
            vec![0.0; s * m]
        );
        let dy_t = up(DType::F32, &[s, m], &dy);
        let (d_out, d_gates) = moe_combine_backward(&dy_t, &dispatched, r).unwrap();
        assert_eq!(d_out.shape(), [e, 0, m]);
        assert_eq!(down(&d_gates), vec![0.0; s * k]);
        let opts = LayerOptions {
            gate: GateOptions::new(k, cf),
            path: MoePath::Capacity,
        };
        let out = moe_layer(x, wg, &d.experts(), &opts).unwrap();
        assert_eq!(down(&out.y), vec![0.0; s * m], "M={m}");
        check_layer_backward(&inputs, &dy, 0.8, &format!("capacity 0, M={m}"));
    }
}

/// Experts of `w1`, `w2` without biases, silu.
fn silu_experts<'a>(w1: &'a Tensor, w2: &'a Tensor) -> ExpertWeights<'a> {
    ExpertWeights {
        w1,
        b1: None,
        w2,
        b2: None,
        activation: Activation::Silu,
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let _ = client();
    let one_line = |e: kiln::Error, names: &[&str]| {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            names.iter().any(|n| msg.contains(n)),
            "{msg} names none of {names:?}"
        );
    };
    let i32s = |shape: &[usize], v: &[f64]| up(DType::I32, shape, v);
    // Ids out of range.
    let ids = i32s(&[2, 1], &[0.0, 4.0]);
    let locs = i32s(&[2, 1], &[0.0, 0.0]);
    one_line(
        MoeRouting::from_tensors(&ids, &locs, None, 4, 2)
            .err()
            .unwrap(),
        &["expert_ids"],
    );
    // A capacity too small for the given locations.
    let ids = i32s(&[2, 1], &[0.0, 0.0]);
    let locs = i32s(&[2, 1], &[0.0, 3.0]);
    one_line(
        MoeRouting::from_tensors(&ids, &locs, None, 4, 2)
            .err()
            .unwrap(),
        &["capacity"],
    );
    // Two routes in one slot.
    let locs = i32s(&[2, 1], &[1.0, 1.0]);
    one_line(
        MoeRouting::from_tensors(&ids, &locs, None, 4, 2)
            .err()
            .unwrap(),
        &["locations"],
    );
    // One token choosing the same expert twice.
    let twice = i32s(&[1, 2], &[3.0, 3.0]);
    let two_slots = i32s(&[1, 2], &[0.0, 1.0]);
    let e = MoeRouting::from_tensors(&twice, &two_slots, None, 4, 2)
        .err()
        .unwrap();
    assert!(e.to_string().contains("distinct"), "{e}");
    one_line(e, &["expert_ids"]);
    // k > E.
    let l = up(DType::F32, &[3, 4], &[0.0; 12]);
    one_line(
        moe_gate(&l, &GateOptions::new(5, 1.0)).err().unwrap(),
        &["top_k"],
    );
    one_line(
        moe_gate(&l, &GateOptions::new(2, -1.0)).err().unwrap(),
        &["capacity_factor"],
    );
    // A capacity past i32 (the capacity output, and [E, C, M] buffers), and E x C slots
    // past 32-bit indexing: refused by name, not an overflow or a huge allocation.
    one_line(
        moe_gate(&l, &GateOptions::new(2, 1e300)).err().unwrap(),
        &["capacity_factor"],
    );
    one_line(
        MoeRouting::from_tensors(&ids, &locs, None, 2, usize::MAX / 2 + 1)
            .err()
            .unwrap(),
        &["capacity"],
    );
    one_line(
        MoeRouting::from_tensors(&ids, &locs, None, 4, 1 << 40)
            .err()
            .unwrap(),
        &["capacity"],
    );
    // Shape mismatches.
    let locs = i32s(&[2, 1], &[0.0, 1.0]);
    let r = MoeRouting::from_tensors(&ids, &locs, None, 4, 2).unwrap();
    let x = up(DType::F32, &[3, 8], &[0.0; 24]);
    one_line(moe_dispatch(&x, &r).err().unwrap(), &["x"]);
    let out = up(DType::F32, &[4, 3, 8], &[0.0; 96]);
    one_line(
        moe_combine(&out, &r).err().unwrap(),
        &["expert_out", "gates"],
    );
    let x = up(DType::F32, &[5, 8], &[0.0; 40]);
    let wg = up(DType::F32, &[8, 4], &[0.0; 32]);
    let w1 = up(DType::F32, &[4, 8, 6], &[0.0; 192]);
    let w2 = up(DType::F32, &[4, 8, 6], &[0.0; 192]);
    let w = silu_experts(&w1, &w2);
    let opts = LayerOptions {
        gate: GateOptions::new(2, 1.0),
        path: MoePath::Auto,
    };
    one_line(moe_layer(&x, &wg, &w, &opts).err().unwrap(), &["w2"]);
    let w2 = up(DType::F32, &[4, 6, 8], &[0.0; 192]);
    let w = ExpertWeights { w2: &w2, ..w };
    one_line(
        moe_layer_local_ranks(&x, &wg, &w, &opts, 3).err().unwrap(),
        &["world_size"],
    );
    // Expert parallelism runs the capacity layout: dropless is refused, not ignored.
    let dropless = LayerOptions {
        path: MoePath::Dropless,
        ..opts
    };
    one_line(
        moe_layer_local_ranks(&x, &wg, &w, &dropless, 2)
            .err()
            .unwrap(),
        &["path"],
    );
    // The tensor-core kernel alone: never for f32 experts, refused as unsupported (the
    // self-test's skip), on one device and over several ranks.
    let err = moe_layer_on(&x, &wg, &w, &dropless, GroupedKernel::TensorCores)
        .err()
        .unwrap();
    assert!(matches!(err, kiln::Error::Unsupported { .. }), "{err}");
    one_line(err, &["tensor cores", "f32"]);
    let host = |t: &Tensor| t.download().unwrap();
    let inputs = BTreeMap::from([
        ("x".to_string(), host(&x)),
        ("w_gate".to_string(), host(&wg)),
        ("w1".to_string(), host(&w1)),
        ("w2".to_string(), host(&w2)),
    ]);
    let params = |world: &str| {
        BTreeMap::from([
            ("kernel".to_string(), "tensor_cores".to_string()),
            ("world_size".to_string(), world.to_string()),
        ])
    };
    let op = kiln::kernels::op("moe_layer").unwrap();
    // Over two ranks each rank's experts take the pinned kernel: f32 experts refuse it
    // on every rank alike, as unsupported.
    let e = op.call_host(client(), &inputs, params("2")).unwrap_err();
    assert!(matches!(e, kiln::Error::Unsupported { .. }), "{e}");
    one_line(e, &["tensor cores"]);
    // No ranks: named as such, whatever the kernel.
    let e = op.call_host(client(), &inputs, params("0")).unwrap_err();
    assert!(e.to_string().contains("1 or more ranks"), "{e}");
    one_line(e, &["world_size"]);
    // More ranks than one process runs in threads (each with its own communicator
    // state), though they divide E: refused before any is started.
    let (w1w, w2w) = (
        up(DType::F32, &[2048, 1, 1], &[0.0; 2048]),
        up(DType::F32, &[2048, 1, 1], &[0.0; 2048]),
    );
    let wide = silu_experts(&w1w, &w2w);
    let (x1, wg1) = (
        up(DType::F32, &[1, 1], &[0.0]),
        up(DType::F32, &[1, 2048], &[0.0; 2048]),
    );
    let e = moe_layer_local_ranks(&x1, &wg1, &wide, &opts, 2048)
        .err()
        .unwrap();
    assert!(e.to_string().contains("at most 1024"), "{e}");
    one_line(e, &["world_size"]);
    // `moe_dispatch` of an empty batch with E to infer from the ids: named, not E = 0.
    let dispatch = kiln::kernels::op("moe_dispatch").unwrap();
    let empty = BTreeMap::from([
        ("x".to_string(), host(&up(DType::F32, &[0, 8], &[]))),
        ("expert_ids".to_string(), host(&i32s(&[0, 2], &[]))),
        ("locations".to_string(), host(&i32s(&[0, 2], &[]))),
    ]);
    let e = dispatch
        .call_host(client(), &empty, BTreeMap::new())
        .unwrap_err();
    assert!(e.to_string().contains("no id >= 0"), "{e}");
    one_line(e, &["num_experts"]);
    // Expert parallel: the capacity of the global batch is bounded, not only each
    // rank's (4 tokens a rank: C = 1e9 ceil(4 / 2) fits; over both ranks 4e9 does not).
    let x = up(DType::F32, &[4, 8], &[0.0; 32]);
    let wg = up(DType::F32, &[8, 2], &[0.0; 16]);
    let w1 = up(DType::F32, &[1, 8, 6], &[0.0; 48]);
    let w2 = up(DType::F32, &[1, 6, 8], &[0.0; 48]);
    let w = silu_experts(&w1, &w2);
    let opts = LayerOptions {
        gate: GateOptions::new(1, 1e9),
        path: MoePath::Capacity,
    };
    let clients = vec![client().clone(); 2];
    for r in HostComm::run(clients, Duration::from_secs(60), |comm| {
        moe_layer_expert_parallel(comm, &x, &wg, &w, &opts)
            .err()
            .expect("a global capacity of 4e9 accepted")
    }) {
        one_line(r.unwrap(), &["capacity_factor"]);
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
                trans_b: false,
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
        let device = DeviceExperts::up(dtype, &experts, e, Activation::Gelu);
        let w = device.weights();
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
            // The tiles that share a's rows across a plane of 8 (lavapipe) are among them.
            let shared = configs
                .iter()
                .filter(|c| c.label().contains("SHARE=8"))
                .count();
            assert!(
                shared >= 2 || !common::has_planes_of_8(),
                "{shared} shared tiles"
            );
            each_config(dtype, &configs, &want, bound, floor, |cfg| {
                moe_expert_ffn_with(&td, &w, cfg)
            });
            // A configuration the problem does not offer is refused by name: the 32 x 32
            // tile with 20 rows an expert.
            let big = configs.iter().find(|c| c.label().contains("TM=32 TN=32"));
            assert!(
                big.is_some() || !common::on_cpu_adapter(),
                "no 32 x 32 tile"
            );
            if let Some(&big) = big {
                let few = t(&[e, 20, m], &d[..e * 20 * m]);
                let err = moe_expert_ffn_with(&few, &w, big).unwrap_err();
                common::assert_clear(err, &["config", "TM=32 TN=32"]);
            }
            // The tensor-core kernel alone: f32 experts never have it (wmma has no f32
            // 16 x 16 x 16 fragment), a refusal that names it (the self-test's skip),
            // also where M and F are multiples of 8, as the wmma tiles want.
            let err = moe_expert_ffn_on(&td, &w, GroupedKernel::TensorCores).unwrap_err();
            assert!(matches!(err, kiln::Error::Unsupported { .. }), "{err}");
            common::assert_clear(err, &["tensor cores", "kernel=tensor_cores", "f32"]);
            let (m8, f8) = (24, 40);
            let small = rf::Experts {
                w1: &w1[..e * m8 * f8],
                b1: Some(&b1[..e * f8]),
                w2: &w2[..e * f8 * m8],
                b2: Some(&b2[..e * m8]),
                m: m8,
                f: f8,
                activation: "gelu",
            };
            let dev8 = DeviceExperts::up(dtype, &small, e, Activation::Gelu);
            let d8 = t(&[e, 21, m8], &d[..e * 21 * m8]);
            let err =
                moe_expert_ffn_on(&d8, &dev8.weights(), GroupedKernel::TensorCores).unwrap_err();
            assert!(matches!(err, kiln::Error::Unsupported { .. }), "{err}");
            common::assert_clear(err, &["tensor cores", "f32", "K = 24, N = 40"]);
            let err = GroupedKernel::parse("wmma").unwrap_err();
            common::assert_clear(err, &["kernel", "auto | tensor_cores", "wmma"]);
        }
    }
}

/// The layer backward's data GEMMs (`dY W2^T`, `dPre W1^T`) take b as `[E, N, K]`
/// (`trans_b`): every configuration of both grouped kernels offered for it, on experts of
/// 133, 0, 37 and 300 rows (ragged against every tile, one expert empty), K = 132 and
/// N = 260, against f64; then bad input to the entry point, one clear line each.
#[test]
fn every_grouped_config_with_trans_b_matches_the_reference_f32() {
    grouped_trans_b(DType::F32);
}

#[test]
fn every_grouped_config_with_trans_b_matches_the_reference_f16() {
    grouped_trans_b(DType::F16);
}

fn grouped_trans_b(dtype: DType) {
    if common::refused(dtype) {
        return;
    }
    let (k, n, counts) = (132usize, 260usize, [133usize, 0, 37, 300]);
    let (e, rows) = (counts.len(), counts.iter().sum::<usize>());
    let mut rng = Rng::new(29);
    let a = round(dtype, &[rows, k], &rng.normals(rows * k, 1.0));
    let b = round(dtype, &[e, n, k], &rng.normals(e * n * k, 1.0));
    // c[r, j] = sum_k a[r, k] b[e(r), j, k], in f64.
    let mut want = vec![0.0; rows * n];
    let mut r0 = 0;
    for (g, &count) in counts.iter().enumerate() {
        for r in r0..r0 + count {
            for j in 0..n {
                let bj = &b[(g * n + j) * k..(g * n + j + 1) * k];
                want[r * n + j] = a[r * k..(r + 1) * k]
                    .iter()
                    .zip(bj)
                    .map(|(x, y)| x * y)
                    .sum();
            }
        }
        r0 += count;
    }
    let (ta, tb) = (up(dtype, &[rows, k], &a), up(dtype, &[e, n, k], &b));
    let (n, k, experts, max_rows) = (n as u32, k as u32, e as u32, 300u32);
    macro_rules! problem {
        ($ty:ident) => {
            $ty {
                n,
                k,
                experts,
                max_rows,
                has_bias: false,
                act: Activation::None,
                scatter: false,
                a_f32: false,
                c_f32: false,
                trans_b: true,
            }
        };
    }
    let staged = MoeGroupedMatmul::space(client(), &problem!(MoeGroupedMatmulProblem));
    let vec4 = MoeGroupedMatmulV4::space(client(), &problem!(MoeGroupedMatmulV4Problem));
    let mut configs: Vec<GroupedConfig> = staged.into_iter().map(GroupedConfig::Staged).collect();
    configs.extend(vec4.into_iter().map(GroupedConfig::Vec4));
    if common::on_cpu_adapter() {
        // The 11 vector tiles (the 32 x 32 one: an expert's 300 rows fill its cube).
        let count = configs
            .iter()
            .filter(|c| c.label().starts_with("vec4"))
            .count();
        assert_eq!(count, 11, "{configs:?}");
    }
    // One rounding of the output (f16), plus f32 accumulation over K terms of size ~1.
    let bound = dtype.epsilon() + 8.0 * f32::EPSILON as f64 * (k as f64).sqrt();
    each_config(dtype, &configs, &want, bound, 1.0, |cfg| {
        moe_grouped_matmul_with(&ta, &tb, &counts, true, cfg)
    });
    // Bad input: b in the other layout, counts that do not sum to a's rows, b in
    // another dtype.
    let cfg = configs[0];
    let err = moe_grouped_matmul_with(&ta, &tb, &counts, false, cfg).unwrap_err();
    common::assert_clear(err, &["b", "[4, 132, N]", "[4, 260, 132]"]);
    let err = moe_grouped_matmul_with(&ta, &tb, &[133, 0, 37, 299], true, cfg).unwrap_err();
    common::assert_clear(err, &["counts", "470", "469"]);
    let other = if dtype == DType::F32 {
        DType::F16
    } else {
        DType::F32
    };
    if !common::refused(other) {
        let tb_other = up(other, &[e, n as usize, k as usize], &b);
        let err = moe_grouped_matmul_with(&ta, &tb_other, &counts, true, cfg).unwrap_err();
        common::assert_clear(err, &["`b`", other.name()]);
    }
}

/// The layer backward's weight gradients (`d_w1 = D^T dPre`, `d_w2 = H^T dY` per expert,
/// `d_w_gate = x^T d_logits`): every configuration of both `grouped_matmul_tn` kernels on
/// column windows (a's columns 4..136, b's 0..260) of groups of 133, 0, 37 and 300 rows,
/// against f64; a window not 4-aligned offers the staged kernel only; bad input is one
/// clear line.
#[test]
fn every_grouped_tn_config_matches_the_reference_f32() {
    grouped_tn(DType::F32);
}

#[test]
fn every_grouped_tn_config_matches_the_reference_f16() {
    grouped_tn(DType::F16);
}

fn grouped_tn(dtype: DType) {
    use kiln::kernels::matmul::{
        grouped_matmul_tn_with, GroupedMatmulTn, GroupedMatmulTnProblem, GroupedMatmulTnV4,
        GroupedMatmulTnV4Problem, GroupedTnConfig,
    };
    if common::refused(dtype) {
        return;
    }
    let counts = [133usize, 0, 37, 300];
    let (rows, lda, ldb) = (counts.iter().sum::<usize>(), 140usize, 264usize);
    let mut rng = Rng::new(31);
    let a = round(dtype, &[rows, lda], &rng.normals(rows * lda, 1.0));
    let b = round(dtype, &[rows, ldb], &rng.normals(rows * ldb, 1.0));
    let (ta, tb) = (up(dtype, &[rows, lda], &a), up(dtype, &[rows, ldb], &b));
    let offered = |a_col: usize, ka: usize, n: usize| -> Vec<GroupedTnConfig> {
        let (ka, n, a_col, max_rows) = (ka as u32, n as u32, a_col as u32, 300u32);
        let (lda, ldb, experts) = (lda as u32, ldb as u32, counts.len() as u32);
        macro_rules! problem {
            ($ty:ident) => {
                $ty {
                    ka,
                    n,
                    lda,
                    ldb,
                    a_col,
                    b_col: 0,
                    experts,
                    max_rows,
                    a_f32: false,
                    b_f32: false,
                }
            };
        }
        let staged = GroupedMatmulTn::space(client(), &problem!(GroupedMatmulTnProblem));
        let vec4 = GroupedMatmulTnV4::space(client(), &problem!(GroupedMatmulTnV4Problem));
        (staged.into_iter().map(GroupedTnConfig::Staged))
            .chain(vec4.into_iter().map(GroupedTnConfig::Vec4))
            .collect()
    };
    for (a_cols, n) in [(4..136, 260), (1..134, 260), (4..136, 8)] {
        let ka = a_cols.len();
        // c[g, i, j] = sum over g's rows r of a[r, a_col + i] b[r, j], in f64.
        let mut want = vec![0.0; counts.len() * ka * n];
        let mut r0 = 0;
        for (g, &count) in counts.iter().enumerate() {
            for r in r0..r0 + count {
                for i in 0..ka {
                    let x = a[r * lda + a_cols.start + i];
                    for j in 0..n {
                        want[(g * ka + i) * n + j] += x * b[r * ldb + j];
                    }
                }
            }
            r0 += count;
        }
        let configs = offered(a_cols.start, ka, n);
        let vec4 = configs
            .iter()
            .filter(|c| matches!(c, GroupedTnConfig::Vec4(_)))
            .count();
        // Windows at a multiple of 4: the 5 vector tiles (the few-column one too) where
        // the problem fills them, and the 3 that share `a` across a plane of 8 where the
        // device has such planes; at column 1, the staged kernel alone.
        let want_vec4 = match (a_cols.start, n) {
            (1, _) => 0,
            (_, 260) if common::has_planes_of_8() => 8,
            (_, 260) => 5,
            _ => 3,
        };
        assert_eq!(vec4, want_vec4, "{a_cols:?} N = {n}: {configs:?}");
        assert!(configs.len() > vec4, "no staged configuration: {configs:?}");
        // One rounding of the output, plus f32 accumulation over up to 300 rows.
        let bound = dtype.epsilon() + 8.0 * f32::EPSILON as f64 * (300f64).sqrt();
        for cfg in configs {
            let c = grouped_matmul_tn_with(&ta, a_cols.clone(), &tb, 0..n, &counts, cfg).unwrap();
            let err = max_rel_error(&down(&c), &want, 1.0);
            assert!(err < bound, "{} {a_cols:?} N = {n}: {err:e}", cfg.label());
        }
    }
    // Bad input: counts that do not sum to the rows, a window past a's columns, a
    // configuration the problem does not offer (a vector tile on an unaligned window).
    let staged = offered(4, 132, 260)[0];
    let err = grouped_matmul_tn_with(&ta, 4..136, &tb, 0..260, &[133, 0, 37, 299], staged);
    common::assert_clear(err.unwrap_err(), &["counts", "470", "469"]);
    let err = grouped_matmul_tn_with(&ta, 100..141, &tb, 0..260, &counts, staged);
    common::assert_clear(err.unwrap_err(), &["`a`", "100..141", "[470, 140]"]);
    // An empty window gives an empty gradient, launching nothing.
    let empty = grouped_matmul_tn_with(&ta, 4..4, &tb, 0..260, &counts, staged).unwrap();
    assert_eq!(empty.shape(), &[4, 0, 260]);
    let v4 = *offered(4, 132, 260)
        .iter()
        .find(|c| matches!(c, GroupedTnConfig::Vec4(_)))
        .unwrap_or(&staged);
    if v4 != staged {
        let err = grouped_matmul_tn_with(&ta, 1..133, &tb, 0..260, &counts, v4);
        common::assert_clear(err.unwrap_err(), &["config", "vec4"]);
    }
}

/// The bias gradients' kernel: each group's column sums, every configuration (and the
/// tuned one) against f64 on ragged groups (an empty one), windows at odd columns and
/// widths past one cube of columns.
#[test]
fn every_column_sums_config_matches_the_reference_f32() {
    column_sums(DType::F32);
}

#[test]
fn every_column_sums_config_matches_the_reference_f16() {
    column_sums(DType::F16);
}

fn column_sums(dtype: DType) {
    use kiln::kernels::matmul::{
        grouped_column_sums_with, GroupedColumnSums, GroupedColumnSumsProblem,
    };
    if common::refused(dtype) {
        return;
    }
    let counts = [133usize, 0, 37, 300];
    let (rows, ldb) = (counts.iter().sum::<usize>(), 301usize);
    let mut rng = Rng::new(37);
    let b = round(dtype, &[rows, ldb], &rng.normals(rows * ldb, 1.0));
    let tb = up(dtype, &[rows, ldb], &b);
    for cols in [0..ldb, 3..260, 5..6] {
        let n = cols.len();
        let mut want = vec![0.0; counts.len() * n];
        let mut r0 = 0;
        for (g, &count) in counts.iter().enumerate() {
            for r in r0..r0 + count {
                for j in 0..n {
                    want[g * n + j] += b[r * ldb + cols.start + j];
                }
            }
            r0 += count;
        }
        let problem = GroupedColumnSumsProblem {
            n: n as u32,
            ldb: ldb as u32,
            b_col: cols.start as u32,
            experts: counts.len() as u32,
            max_rows: 300,
            b_f32: false,
        };
        let configs = GroupedColumnSums::space(client(), &problem);
        assert_eq!(configs.len(), 3, "{configs:?}");
        // One rounding of the output, plus f32 sums over up to 300 rows.
        let bound = dtype.epsilon() + 8.0 * f32::EPSILON as f64 * (300f64).sqrt();
        for cfg in configs.into_iter().map(Some).chain([None]) {
            let c = grouped_column_sums_with(&tb, cols.clone(), &counts, cfg).unwrap();
            assert_eq!(c.shape(), &[counts.len(), n]);
            let err = max_rel_error(&down(&c), &want, 1.0);
            assert!(err < bound, "{cfg:?} columns {cols:?}: {err:e}");
        }
    }
    // Bad input: counts that do not cover the rows, a window past b's columns.
    let err = grouped_column_sums_with(&tb, 0..8, &[133, 0, 37, 299], None);
    common::assert_clear(err.unwrap_err(), &["counts", "470", "469"]);
    let err = grouped_column_sums_with(&tb, 300..302, &counts, None);
    common::assert_clear(err.unwrap_err(), &["`b`", "300..302", "[470, 301]"]);
    let empty = grouped_column_sums_with(&tb, 7..7, &counts, None).unwrap();
    assert_eq!(empty.shape(), &[4, 0]);
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
    // The 32 x 32 register tile is a CPU adapter's: on a GPU the register budget
    // (kernels/cuda-budget.txt) drops it where it would spill.
    let kinds: &[&str] = if common::on_cpu_adapter() {
        &["staged", "vec4 BM=128 BN=128 TM=32 TN=32"]
    } else {
        &["staged"]
    };
    for kind in kinds {
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

/// An expert FFN's weights on the device, uploaded from the f64 reference's.
struct DeviceExperts {
    w1: kiln::Tensor,
    b1: kiln::Tensor,
    w2: kiln::Tensor,
    b2: kiln::Tensor,
    activation: Activation,
}

impl DeviceExperts {
    /// `w`'s weights and biases (both present) in `dtype`, `e` experts.
    fn up(dtype: DType, w: &rf::Experts<'_>, e: usize, activation: Activation) -> Self {
        let (m, f) = (w.m, w.f);
        DeviceExperts {
            w1: up(dtype, &[e, m, f], w.w1),
            b1: up(dtype, &[e, f], w.b1.expect("b1")),
            w2: up(dtype, &[e, f, m], w.w2),
            b2: up(dtype, &[e, m], w.b2.expect("b2")),
            activation,
        }
    }

    fn weights(&self) -> ExpertWeights<'_> {
        ExpertWeights {
            w1: &self.w1,
            b1: Some(&self.b1),
            w2: &self.w2,
            b2: Some(&self.b2),
            activation: self.activation,
        }
    }
}
