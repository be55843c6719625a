//! GLA with autotuning on (the default): tuning validates every candidate configuration
//! of every GLA kernel (and every chunk size) against the first before timing it, and
//! the tuned results must still match the f64 reference.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::client;
use kiln::check::Rng;
use kiln::kernels::gla::{gla, gla_backward, reference, GlaGradInputs, GlaInputs, GlaOptions};
use kiln::runtime::tune::CandidateStatus;
use kiln::{DType, HostTensor, Tensor};

fn up(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F32, shape.to_vec(), v).unwrap(),
    )
    .unwrap()
}

#[test]
fn tuned_forward_and_backward_match_the_reference() {
    // A fresh cache, so that every candidate is timed (one test in this binary).
    let (dir, seen) = common::tune_from_scratch("gla");
    let (b, t, h, dk, dv) = (1usize, 150usize, 2usize, 40usize, 24usize);
    let mut rng = Rng::new(99);
    let nk = b * t * h * dk;
    let q = rng.normals(nk, 1.0);
    let k = rng.normals(nk, 1.0);
    let v = rng.normals(b * t * h * dv, 1.0);
    let g: Vec<f64> = rng
        .normals(nk, 1.0)
        .into_iter()
        .map(|x| -(1.0 + (-x).exp()).ln())
        .collect();
    let d_o = rng.normals(b * t * h * dv, 1.0);
    let round = |s: &[usize], x: &[f64]| {
        HostTensor::from_f64(DType::F32, s.to_vec(), x)
            .unwrap()
            .to_f64()
    };
    let (sk, sv) = ([b, t, h, dk], [b, t, h, dv]);
    let (q, k, v, g, d_o) = (
        round(&sk, &q),
        round(&sk, &k),
        round(&sv, &v),
        round(&sk, &g),
        round(&sv, &d_o),
    );
    let dims = reference::Dims {
        heads: h,
        dk,
        dv,
        bounds: vec![0, t],
    };
    let scale = 1.0 / (dk as f64).sqrt();
    let (o_ref, _) = reference::forward(&q, &k, &v, &g, None, &dims, scale);
    let gr = reference::backward(&q, &k, &v, &g, None, &d_o, None, &dims, scale);

    let (tq, tk, tv, tg, tdo) = (
        up(&sk, &q),
        up(&sk, &k),
        up(&sv, &v),
        up(&sk, &g),
        up(&sv, &d_o),
    );
    let inp = GlaInputs {
        q: &tq,
        k: &tk,
        v: &tv,
        g: &tg,
        h0: None,
        cu_seqlens: None,
    };
    let opts = GlaOptions::default(); // chunk size tuned too
    let o = gla(&inp, &opts).unwrap().o.download().unwrap().to_f64();
    let e = reference::rms_relative(&o, &o_ref);
    assert!(e < 1e-5, "tuned forward: {e:.2e}");
    let grads = gla_backward(
        &inp,
        &GlaGradInputs {
            d_o: &tdo,
            dht: None,
        },
        &opts,
    )
    .unwrap();
    for (name, got, want) in [
        ("dq", &grads.dq, &gr.dq),
        ("dk", &grads.dk, &gr.dk),
        ("dv", &grads.dv, &gr.dv),
        ("dg", &grads.dg, &gr.dg),
    ] {
        let e = reference::rms_relative(&got.download().unwrap().to_f64(), want);
        assert!(e < 1e-5, "tuned backward {name}: {e:.2e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().unwrap();
    // Other tests in this binary do not exist, so every candidate seen is GLA's: none
    // may disagree with its kernel's first configuration.
    assert!(seen.len() > 10, "tuning timed {} candidates", seen.len());
    for (label, status) in seen.iter() {
        assert!(
            matches!(status, CandidateStatus::Timed(_)),
            "{label}: {status:?}"
        );
    }
}
