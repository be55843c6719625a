//! GLA: the chunked and recurrent forward, the decode step and the chunked backward
//! against the f64 reference (written from the recurrent form) on fla's own test
//! shapes, against fla's vectors, and against each other; bad input.
//!
//! Bars (fla's measure, RMS-relative error): 1e-5 in f32; 0.004 (outputs) and 0.005
//! (gradients) in f16. bf16 is exercised where the device has it and must be refused
//! with `Unsupported` where it has not.
//!
//! One binary for the family (each test binary links all of kiln): the input builders
//! and the f64 reference checks are here, the cases in one module per concern.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod bad_input;
#[path = "../common/mod.rs"]
mod common;
mod edges;
mod sequences;
mod shapes;
mod vectors;

use common::{data, down, up};

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
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
    if c.dims.dk <= 128 && c.dims.dk.is_multiple_of(4) && c.dims.dv.is_multiple_of(4) {
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
