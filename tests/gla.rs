//! GLA: the chunked and recurrent forward, the decode step and the chunked backward
//! against the f64 reference (written from the recurrent form) on fla's own test
//! shapes, against fla's vectors, and against each other; bad input.
//!
//! Bars (fla's measure, RMS-relative error): 1e-5 in f32; 0.004 (outputs) and 0.005
//! (gradients) in f16. bf16 is exercised where the device has it and must be refused
//! with `Unsupported` where it has not.
//!
//! Longer than most files on purpose: one suite for the GLA family, whose cases share
//! the input builders and the f64 reference checks defined at the top.

mod common;

use common::{data, down, up};

/// The device, with autotuning off in this binary: every kernel runs its first
/// configuration, so the many shapes here do not each compile and time every candidate
/// (`tests/gla_tune.rs` tunes, and so validates every candidate, on one shape).
fn client() -> &'static kiln::Client {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Before the first operator call creates the global autotuner.
    ONCE.call_once(|| std::env::set_var("KILN_AUTOTUNE", "off"));
    common::client()
}
use kiln::check::Rng;
use kiln::kernels::gla::{
    gla, gla_backward, gla_recurrent, gla_step, reference, GlaGradInputs, GlaInputs, GlaMode,
    GlaOptions,
};
use kiln::{load_safetensors, DType, Error, HostTensor, Tensor};
use reference::{rms_relative, Dims};

/// The inputs of one case, in f64 as rounded to the dtype.
struct Case {
    dtype: DType,
    shape_k: Vec<usize>,
    shape_v: Vec<usize>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    h0: Option<Vec<f64>>,
    d_o: Vec<f64>,
    dht: Option<Vec<f64>>,
    cu: Option<Vec<i32>>,
    dims: Dims,
}

fn logsigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

fn round(dtype: DType, shape: &[usize], v: &[f64]) -> Vec<f64> {
    HostTensor::from_f64(dtype, shape.to_vec(), v)
        .unwrap()
        .to_f64()
}

/// fla's test inputs: q, k, v ~ randn, g = logsigmoid(randn), with a run of gates at
/// -20 (near-total forgetting) in the first rows; h0, do, dht ~ randn.
#[allow(clippy::too_many_arguments)]
fn case(
    dtype: DType,
    b: usize,
    t: usize,
    h: usize,
    dk: usize,
    dv: usize,
    h0: bool,
    dht: bool,
    cu: Option<Vec<i32>>,
    seed: u64,
) -> Case {
    let mut rng = Rng::new(seed);
    let n_seq = cu.as_ref().map_or(b, |c| c.len() - 1);
    let (nk, nv) = (b * t * h * dk, b * t * h * dv);
    let shape_k = vec![b, t, h, dk];
    let shape_v = vec![b, t, h, dv];
    let mut g: Vec<f64> = rng.normals(nk, 1.0).into_iter().map(logsigmoid).collect();
    for e in g.iter_mut().take((5 * h * dk).min(nk)).skip(2 * h * dk) {
        *e = -20.0;
    }
    let state = [n_seq, h, dk, dv];
    let mut c = Case {
        dtype,
        q: round(dtype, &shape_k, &rng.normals(nk, 1.0)),
        k: round(dtype, &shape_k, &rng.normals(nk, 1.0)),
        v: round(dtype, &shape_v, &rng.normals(nv, 1.0)),
        g: round(DType::F32, &shape_k, &g),
        h0: h0.then(|| rng.normals(state.iter().product(), 1.0)),
        d_o: round(dtype, &shape_v, &rng.normals(nv, 1.0)),
        dht: dht.then(|| rng.normals(state.iter().product(), 1.0)),
        dims: Dims {
            heads: h,
            dk,
            dv,
            bounds: vec![],
        },
        cu: cu.clone(),
        shape_k,
        shape_v,
    };
    c.h0 = c.h0.map(|x| round(DType::F32, &state, &x));
    c.dht = c.dht.map(|x| round(DType::F32, &state, &x));
    c.dims.bounds = match cu {
        Some(cu) => cu.iter().map(|&x| x as usize).collect(),
        None => (0..=b).map(|i| i * t).collect(),
    };
    c
}

/// Device tensors of a case: q, k, v, g (f32), h0, do, dht.
struct Dev {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    h0: Option<Tensor>,
    d_o: Tensor,
    dht: Option<Tensor>,
}

fn upload(c: &Case) -> Dev {
    let st = [c.dims.n_seq(), c.dims.heads, c.dims.dk, c.dims.dv];
    Dev {
        q: up(c.dtype, &c.shape_k, &c.q),
        k: up(c.dtype, &c.shape_k, &c.k),
        v: up(c.dtype, &c.shape_v, &c.v),
        g: up(DType::F32, &c.shape_k, &c.g),
        h0: c.h0.as_ref().map(|x| up(DType::F32, &st, x)),
        d_o: up(c.dtype, &c.shape_v, &c.d_o),
        dht: c.dht.as_ref().map(|x| up(DType::F32, &st, x)),
    }
}

fn inputs<'a>(d: &'a Dev, c: &'a Case) -> GlaInputs<'a> {
    GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: d.h0.as_ref(),
        cu_seqlens: c.cu.as_deref(),
    }
}

/// Which results [`check_parts`] checks: a case split in two tests compiles (and tunes)
/// the forward kernels in one and the backward kernels in the other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    Both,
    Forward,
    Backward,
}

/// Runs everything on one case and checks each result against the reference within
/// `fwd` (o, ht) and `bwd` (gradients) RMS-relative error.
fn check_case(c: &Case, chunk: usize, fwd: f64, bwd: f64, what: &str) {
    check_parts(c, chunk, fwd, bwd, what, Parts::Both)
}

/// [`check_case`] for the forward forms, the gradients, or both.
fn check_parts(c: &Case, chunk: usize, fwd: f64, bwd: f64, what: &str, parts: Parts) {
    let scale = 1.0 / (c.dims.dk as f64).sqrt();
    let d = upload(c);
    let inp = inputs(&d, c);
    let opts = GlaOptions {
        output_final_state: true,
        chunk_size: Some(chunk),
        ..Default::default()
    };
    if parts != Parts::Backward {
        check_forward(c, &inp, &opts, scale, fwd, what);
    }
    if parts != Parts::Forward {
        check_backward(c, &d, &inp, &opts, scale, bwd, what);
    }
}

/// The chunked, recurrent and (where it applies) fused forward forms against the
/// reference and each other.
fn check_forward(
    c: &Case,
    inp: &GlaInputs<'_>,
    opts: &GlaOptions,
    scale: f64,
    fwd: f64,
    what: &str,
) {
    let (o_ref, ht_ref) =
        reference::forward(&c.q, &c.k, &c.v, &c.g, c.h0.as_deref(), &c.dims, scale);
    let mut worst_f = 0.0f64;
    let mut chunked_o = Vec::new();
    let mut forms = vec![
        ("chunked", gla(inp, opts).unwrap()),
        ("recurrent", gla_recurrent(inp, opts).unwrap()),
    ];
    // The fused kernel where it applies (K <= 128, K and V multiples of 4).
    if c.dims.dk <= 128 && c.dims.dk % 4 == 0 && c.dims.dv % 4 == 0 {
        let fused = GlaOptions {
            output_final_state: true,
            mode: GlaMode::FusedChunk,
            ..Default::default()
        };
        forms.push(("fused", gla(inp, &fused).unwrap()));
    }
    for (form, out) in forms {
        let o = down(&out.o);
        let eo = rms_relative(&o, &o_ref);
        let eh = rms_relative(&down(out.ht.as_ref().unwrap()), &ht_ref);
        assert!(
            eo < fwd && eh < fwd,
            "{what}, {form}: o error {eo:.2e}, ht error {eh:.2e} (bar {fwd:.0e})"
        );
        worst_f = worst_f.max(eo).max(eh);
        if form == "chunked" {
            chunked_o = o;
        } else {
            // The forms agree with each other as well as with the reference.
            let e = rms_relative(&chunked_o, &o);
            assert!(e < fwd, "{what}: chunked vs {form} o differ by {e:.2e}");
        }
    }
    eprintln!("{what}: forward {worst_f:.2e}");
}

/// The gradients against the reference's.
fn check_backward(
    c: &Case,
    d: &Dev,
    inp: &GlaInputs<'_>,
    opts: &GlaOptions,
    scale: f64,
    bwd: f64,
    what: &str,
) {
    let gr = reference::backward(
        &c.q,
        &c.k,
        &c.v,
        &c.g,
        c.h0.as_deref(),
        &c.d_o,
        c.dht.as_deref(),
        &c.dims,
        scale,
    );
    let mut worst_b = 0.0f64;
    let g = gla_backward(
        inp,
        &GlaGradInputs {
            d_o: &d.d_o,
            dht: d.dht.as_ref(),
        },
        opts,
    )
    .unwrap();
    let mut pairs = vec![
        ("dq", &g.dq, &gr.dq),
        ("dk", &g.dk, &gr.dk),
        ("dv", &g.dv, &gr.dv),
        ("dg", &g.dg, &gr.dg),
    ];
    if let Some(dh0) = &g.dh0 {
        pairs.push(("dh0", dh0, &gr.dh0));
    }
    assert_eq!(
        g.dh0.is_some(),
        c.h0.is_some(),
        "{what}: dh0 exactly when h0 is given"
    );
    for (name, got, want) in pairs {
        let e = rms_relative(&down(got), want);
        assert!(e < bwd, "{what}: {name} error {e:.2e} (bar {bwd:.0e})");
        worst_b = worst_b.max(e);
    }
    eprintln!("{what}: backward {worst_b:.2e}");
}

/// fla's T list with K = V = 100 (not a power of two), alternating h0 and dht: case
/// `i` of the list, in three tests so that none runs for minutes. B = H = 2, except
/// B = H = 1 at T = 2048, where the f64 reference (a debug build's, 4 steps of K x V
/// per token and head) was most of the suite's longest test.
fn fla_shape_k100(i: usize) {
    fla_shape_k100_parts(i, Parts::Both)
}

/// [`fla_shape_k100`]'s forward, backward or both.
fn fla_shape_k100_parts(i: usize, parts: Parts) {
    let t = [130usize, 146, 162, 178, 300, 2048][i];
    let bh = if t > 1000 { 1 } else { 2 };
    let c = case(
        DType::F32,
        bh,
        t,
        bh,
        100,
        100,
        i % 2 == 0,
        i % 3 != 1,
        None,
        10 + i as u64,
    );
    check_parts(&c, 64, 1e-5, 1e-5, &format!("f32 T={t} K=V=100"), parts);
}

#[test]
fn fla_shapes_f32_k100_short() {
    (0..3).for_each(fla_shape_k100);
}

#[test]
fn fla_shapes_f32_k100_medium() {
    (3..5).for_each(fla_shape_k100);
}

/// T = 2048 (a shape bucket of its own: every kernel tunes again), forward and backward
/// in two tests.
#[test]
fn fla_shapes_f32_k100_long_forward() {
    fla_shape_k100_parts(5, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k100_long_backward() {
    fla_shape_k100_parts(5, Parts::Backward);
}

/// K = V = 300: wider than every tile, with h0 (T = 130) and with dht (T = 300); one
/// head (the reference's K x V steps dominate these tests); forward and backward in two
/// tests each.
fn fla_shape_k300(i: usize, parts: Parts) {
    let t = [130usize, 300][i];
    let c = case(
        DType::F32,
        1,
        t,
        1,
        300,
        300,
        i == 0,
        i == 1,
        None,
        20 + i as u64,
    );
    check_parts(&c, 64, 1e-5, 1e-5, &format!("f32 T={t} K=V=300"), parts);
}

#[test]
fn fla_shapes_f32_k300_with_h0_forward() {
    fla_shape_k300(0, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k300_with_h0_backward() {
    fla_shape_k300(0, Parts::Backward);
}

#[test]
fn fla_shapes_f32_k300_with_dht_forward() {
    fla_shape_k300(1, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k300_with_dht_backward() {
    fla_shape_k300(1, Parts::Backward);
}

/// Every chunk size with K, V not multiples of the tiles (two tests per chunk size, the
/// forward and the backward: each compiles its own kernels).
fn chunk_size_with_uneven_k_v(chunk: usize, dk: usize, dv: usize, parts: Parts) {
    let c = case(
        DType::F32,
        2,
        77,
        3,
        dk,
        dv,
        true,
        true,
        None,
        30 + chunk as u64,
    );
    check_parts(
        &c,
        chunk,
        1e-5,
        1e-5,
        &format!("chunk {chunk} K={dk} V={dv}"),
        parts,
    );
}

#[test]
fn chunk_size_16_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(16, 24, 40, Parts::Forward);
}

#[test]
fn chunk_size_16_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(16, 24, 40, Parts::Backward);
}

#[test]
fn chunk_size_32_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(32, 64, 17, Parts::Forward);
}

#[test]
fn chunk_size_32_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(32, 64, 17, Parts::Backward);
}

#[test]
fn chunk_size_64_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(64, 7, 130, Parts::Forward);
}

#[test]
fn chunk_size_64_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(64, 7, 130, Parts::Backward);
}

/// f16 inputs (f32 accumulation) within fla's bars; forward and backward in two tests
/// (each compiles and tunes its own f16 kernels).
fn half_precision(parts: Parts) {
    let c = case(DType::F16, 2, 162, 2, 100, 100, true, true, None, 40);
    check_parts(&c, 64, 0.004, 0.005, "f16 T=162 K=V=100", parts);
}

#[test]
fn half_precision_forward_within_fla_bars() {
    half_precision(Parts::Forward);
}

#[test]
fn half_precision_backward_within_fla_bars() {
    half_precision(Parts::Backward);
}

#[test]
fn bf16_runs_or_is_refused_clearly() {
    let c = case(DType::BF16, 1, 70, 2, 32, 32, false, false, None, 41);
    if client().report().bf16 {
        check_case(&c, 64, 0.004, 0.005, "bf16 T=70 K=V=32");
    } else {
        let err = Tensor::upload(
            client(),
            &HostTensor::from_f64(DType::BF16, c.shape_k.clone(), &c.q).unwrap(),
        )
        .and_then(|q| {
            gla(
                &GlaInputs {
                    q: &q,
                    k: &q,
                    v: &q,
                    g: &q,
                    h0: None,
                    cu_seqlens: None,
                },
                &GlaOptions::default(),
            )
            .map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
}

/// Four packed sequences, one empty, one shorter than a chunk, one spanning three
/// chunks (of 64), with h0; at chunk 64 also without h0.
fn varlen_sequences(chunk: usize) {
    let cu = vec![0, 37, 37, 190, 200];
    let c = case(
        DType::F32,
        1,
        200,
        2,
        48,
        40,
        true,
        true,
        Some(cu.clone()),
        50,
    );
    check_case(&c, chunk, 1e-5, 1e-5, &format!("varlen chunk {chunk}"));
    if chunk == 64 {
        let c = case(DType::F32, 1, 200, 2, 48, 40, false, false, Some(cu), 51);
        check_case(&c, 64, 1e-5, 1e-5, "varlen without h0");
    }
}

#[test]
fn varlen_sequences_restart_from_their_own_state_chunk_64() {
    varlen_sequences(64);
}

#[test]
fn varlen_sequences_restart_from_their_own_state_chunk_16() {
    varlen_sequences(16);
}

#[test]
fn decode_steps_reproduce_the_sequence() {
    // T steps of gla_step from h0 give the recurrent outputs and the final state.
    let (b, t, h, dk, dv) = (3usize, 9usize, 2usize, 20usize, 12usize);
    let c = case(DType::F32, b, t, h, dk, dv, true, false, None, 60);
    let scale = 0.3;
    let (o_ref, ht_ref) =
        reference::forward(&c.q, &c.k, &c.v, &c.g, c.h0.as_deref(), &c.dims, scale);
    let state = up(DType::F32, &[b, h, dk, dv], c.h0.as_ref().unwrap());
    let before = down(&state);
    let mut o = vec![0.0; b * t * h * dv];
    let slice = |x: &[f64], step: usize, w: usize| -> Vec<f64> {
        (0..b)
            .flat_map(|bi| x[((bi * t + step) * h) * w..((bi * t + step) * h + h) * w].to_vec())
            .collect()
    };
    for step in 0..t {
        let q = up(DType::F32, &[b, 1, h, dk], &slice(&c.q, step, dk));
        let k = up(DType::F32, &[b, 1, h, dk], &slice(&c.k, step, dk));
        let v = up(DType::F32, &[b, 1, h, dv], &slice(&c.v, step, dv));
        let g = up(DType::F32, &[b, 1, h, dk], &slice(&c.g, step, dk));
        let out = down(&gla_step(&q, &k, &v, &g, &state, Some(scale)).unwrap());
        for bi in 0..b {
            let dst = ((bi * t + step) * h) * dv;
            o[dst..dst + h * dv].copy_from_slice(&out[bi * h * dv..(bi + 1) * h * dv]);
        }
    }
    assert_ne!(down(&state), before, "the state is updated in place");
    let eo = rms_relative(&o, &o_ref);
    let eh = rms_relative(&down(&state), &ht_ref);
    assert!(eo < 1e-6 && eh < 1e-6, "decode: o {eo:.2e}, state {eh:.2e}");
}

/// fla's own vectors (naive_recurrent_gla + autograd, f32): the operator registry
/// path of `kiln run`, and our f64 reference, both agree with them.
#[test]
fn fla_vectors_agree_t130_d100() {
    fla_vectors_agree("gla_T130_D100_f32.safetensors");
}

/// As [`fla_vectors_agree_t130_d100`], T = 300, K = V = 64.
#[test]
fn fla_vectors_agree_t300_d64() {
    fla_vectors_agree("gla_T300_D64_f32.safetensors");
}

fn fla_vectors_agree(file: &str) {
    {
        let hosts = load_safetensors(data(file)).unwrap();
        let f = |n: &str| hosts[n].to_f64();
        let shape = hosts["q"].shape.clone();
        let dims = Dims {
            heads: shape[2],
            dk: shape[3],
            dv: hosts["v"].shape[3],
            bounds: vec![0, shape[1]],
        };
        let scale = 1.0 / (dims.dk as f64).sqrt();
        let (o, ht) = reference::forward(
            &f("q"),
            &f("k"),
            &f("v"),
            &f("g"),
            Some(&f("h0")),
            &dims,
            scale,
        );
        let gr = reference::backward(
            &f("q"),
            &f("k"),
            &f("v"),
            &f("g"),
            Some(&f("h0")),
            &f("do"),
            Some(&f("dht")),
            &dims,
            scale,
        );
        for (name, ours) in [
            ("o", &o),
            ("ht", &ht),
            ("dq", &gr.dq),
            ("dk", &gr.dk),
            ("dv", &gr.dv),
            ("dg", &gr.dg),
            ("dh0", &gr.dh0),
        ] {
            let e = rms_relative(ours, &f(&format!("expected_{name}")));
            assert!(e < 1e-5, "{file}: f64 reference {name} vs fla: {e:.2e}");
        }
        let params = |extra: &[(&str, &str)]| {
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (op, mode) in [
            ("gla", "auto"),
            ("gla", "chunk"),
            ("gla", "fused_chunk"),
            ("gla_recurrent", ""),
        ] {
            let spec = kiln::kernels::op(op).unwrap();
            let mut extra = vec![("output_final_state", "true")];
            if !mode.is_empty() {
                extra.push(("mode", mode));
            }
            let outs = spec.call_host(client(), &hosts, params(&extra)).unwrap();
            for name in ["o", "ht"] {
                let e = rms_relative(&outs[name].to_f64(), &f(&format!("expected_{name}")));
                assert!(e < 1e-5, "{file}: {op} {mode} {name} vs fla: {e:.2e}");
            }
        }
        let e = kiln::kernels::op("gla")
            .unwrap()
            .call_host(client(), &hosts, params(&[("mode", "fused")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode") && e.contains("fused_chunk"), "{e}");
        let spec = kiln::kernels::op("gla_backward").unwrap();
        let outs = spec.call_host(client(), &hosts, params(&[])).unwrap();
        for name in ["dq", "dk", "dv", "dg", "dh0"] {
            let e = rms_relative(&outs[name].to_f64(), &f(&format!("expected_{name}")));
            assert!(e < 1e-5, "{file}: gla_backward {name} vs fla: {e:.2e}");
        }
    }
}

#[test]
fn bad_inputs_are_named() {
    let f = |shape: &[usize]| up(DType::F32, shape, &vec![-0.5; shape.iter().product()]);
    let (q, v, g) = (f(&[2, 10, 3, 8]), f(&[2, 10, 3, 6]), f(&[2, 10, 3, 8]));
    let opts = GlaOptions::default();
    let run = |q: &Tensor,
               k: &Tensor,
               v: &Tensor,
               g: &Tensor,
               h0: Option<&Tensor>,
               cu: Option<&[i32]>| {
        gla(
            &GlaInputs {
                q,
                k,
                v,
                g,
                h0,
                cu_seqlens: cu,
            },
            &opts,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let expect = |msg: String, needles: &[&str]| {
        for n in needles {
            assert!(msg.contains(n), "`{msg}` should mention `{n}`");
        }
    };
    expect(
        run(&q, &f(&[2, 10, 3, 9]), &v, &g, None, None),
        &["`k`", "[2, 10, 3, 8]", "[2, 10, 3, 9]"],
    );
    expect(
        run(&q, &q, &f(&[2, 11, 3, 6]), &g, None, None),
        &["`v`", "[2, 11, 3, 6]"],
    );
    expect(run(&q, &q, &f(&[1, 10, 3, 6]), &g, None, None), &["`v`"]);
    expect(run(&q, &q, &v, &f(&[2, 10, 3, 7]), None, None), &["`g`"]);
    expect(
        run(&f(&[2, 10, 8]), &q, &v, &g, None, None),
        &["`q`", "[B, T, H, K]"],
    );
    expect(
        run(&q, &q, &v, &g, Some(&f(&[2, 3, 8, 5])), None),
        &["`h0`", "[2, 3, 8, 6]"],
    );
    let q1 = f(&[1, 10, 3, 8]);
    let v1 = f(&[1, 10, 3, 6]);
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[0, 6, 4, 10])),
        &["cu_seqlens", "decreasing"],
    );
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[0, 4, 9])),
        &["cu_seqlens", "end at T"],
    );
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[1, 4, 10])),
        &["cu_seqlens", "start at 0"],
    );
    expect(
        run(&q, &q, &v, &g, None, Some(&[0, 10, 20])),
        &["`q`", "B = 1"],
    );
    let half = up(DType::F16, &[2, 10, 3, 8], &vec![0.5; 480]);
    expect(run(&q, &half, &v, &g, None, None), &["`k`", "f32", "f16"]);
    let bad_chunk = GlaOptions {
        chunk_size: Some(48),
        ..Default::default()
    };
    let msg = gla(
        &GlaInputs {
            q: &q,
            k: &q,
            v: &v,
            g: &g,
            h0: None,
            cu_seqlens: None,
        },
        &bad_chunk,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    expect(msg, &["chunk_size", "48"]);
    // fused_chunk: chunks of 16 rows only, K <= 128 and K, V multiples of 4 (V = 6 here).
    let fused = |chunk_size: Option<usize>, q: &Tensor, v: &Tensor, g: &Tensor| {
        gla(
            &GlaInputs {
                q,
                k: q,
                v,
                g,
                h0: None,
                cu_seqlens: None,
            },
            &GlaOptions {
                chunk_size,
                mode: GlaMode::FusedChunk,
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    expect(fused(None, &q, &v, &g), &["mode", "K = 8, V = 6"]);
    let (q8, v8) = (f(&[2, 10, 3, 8]), f(&[2, 10, 3, 8]));
    expect(fused(Some(32), &q8, &v8, &q8), &["chunk_size", "32"]);
    let wide = f(&[1, 4, 1, 132]);
    expect(
        fused(None, &wide, &f(&[1, 4, 1, 8]), &wide),
        &["mode", "K = 132"],
    );
    // The backward checks its own inputs too.
    let msg = gla_backward(
        &GlaInputs {
            q: &q,
            k: &q,
            v: &v,
            g: &g,
            h0: None,
            cu_seqlens: None,
        },
        &GlaGradInputs { d_o: &q, dht: None },
        &opts,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    expect(msg, &["`do`", "[2, 10, 3, 6]"]);
    // The decode step wants one token and names its state.
    let msg = gla_step(&q, &q, &v, &g, &f(&[2, 3, 8, 6]), None)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    expect(msg, &["`q`", "[B, 1, H, K]"]);
    let (q1t, v1t) = (f(&[2, 1, 3, 8]), f(&[2, 1, 3, 6]));
    let msg = gla_step(&q1t, &q1t, &v1t, &q1t, &f(&[2, 3, 8, 5]), None)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    expect(msg, &["`state`"]);
}

/// A gate of -inf is the log of a zero decay: the state is wiped at that step. Every
/// form agrees with the recurrence (no `-inf - -inf = NaN` in the chunked cumsums),
/// forward and backward, for a whole row of -inf and for single and consecutive -inf
/// elements, with chunks that start before, at and after them.
fn minus_infinity_gates(chunk: usize) {
    let (h, dk, dv, t) = (2usize, 16usize, 12usize, 50usize);
    let mut c = case(
        DType::F32,
        2,
        t,
        h,
        dk,
        dv,
        true,
        true,
        None,
        70 + chunk as u64,
    );
    for e in &mut c.g[7 * h * dk..8 * h * dk] {
        *e = f64::NEG_INFINITY;
    }
    c.g[(t + 20) * h * dk + 3] = f64::NEG_INFINITY;
    c.g[(t + 21) * h * dk + 3] = f64::NEG_INFINITY;
    c.g[(t + 33) * h * dk + dk + 5] = f64::NEG_INFINITY;
    check_case(&c, chunk, 1e-5, 1e-5, &format!("-inf gates, chunk {chunk}"));
}

#[test]
fn minus_infinity_gates_are_full_forgetting_chunk_16() {
    minus_infinity_gates(16);
}

#[test]
fn minus_infinity_gates_are_full_forgetting_chunk_64() {
    minus_infinity_gates(64);
}

#[test]
fn no_tokens_gives_an_empty_output_and_the_initial_state() {
    // T = 0: nothing to tune or launch over time; the state passes through unchanged.
    let c = case(DType::F32, 2, 0, 2, 8, 4, true, false, None, 80);
    let d = upload(&c);
    let inp = inputs(&d, &c);
    let out = gla(
        &inp,
        &GlaOptions {
            output_final_state: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.o.shape(), &[2, 0, 2, 4]);
    assert_eq!(down(out.ht.as_ref().unwrap()), c.h0.clone().unwrap());
}

#[test]
fn a_scale_beyond_f32_arithmetic_is_refused_by_name() {
    // 1e38 is an f32 but `scale q k` overflows the scores to inf (and inf - inf to NaN);
    // 1e39 is not even an f32. Both are refused with the allowed range; 2^60 still runs.
    let c = case(DType::F32, 1, 9, 1, 8, 4, false, false, None, 90);
    let d = upload(&c);
    let inp = inputs(&d, &c);
    for scale in [1e38, 1e39, -1e38, f64::NAN, f64::INFINITY] {
        let e = gla(
            &inp,
            &GlaOptions {
                scale: Some(scale),
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(e.contains("`scale`") && e.contains("2^60"), "{scale}: {e}");
    }
    let o = gla(
        &inp,
        &GlaOptions {
            scale: Some(2f64.powi(60)),
            ..Default::default()
        },
    )
    .unwrap()
    .o;
    assert_eq!(o.shape(), &[1, 9, 1, 4]);
}
