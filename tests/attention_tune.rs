//! Attention with autotuning on (the default): tuning runs every candidate
//! configuration of the forward and backward kernels, checks each against the first
//! before timing it, and the tuned results must still match the f64 reference.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{client, down, up};
use kiln::check::{rms_relative, Rng};
use kiln::kernels::attention::{
    attention, attention_backward, attention_with, reference as rf, AttentionGradInputs,
    AttentionInputs, AttentionOptions, ForwardKernel,
};
use kiln::runtime::tune::CandidateStatus;
use kiln::{DType, HostTensor};

#[test]
fn tuned_forward_and_backward_match_the_reference() {
    // A fresh cache, so that every candidate is timed (one test in this binary).
    let (dir, seen) = common::tune_from_scratch("attention");
    // Dv = 72 > 64 keeps BV = 128 and the wide dq/dkv column tiles in the space.
    let (b, sq, sk, h, hkv, d, dv) = (1, 70, 83, 4, 2, 72, 72);
    let mut rng = Rng::new(5);
    let mut round = |s: &[usize], n: usize| {
        HostTensor::from_f64(DType::F32, s.to_vec(), &rng.normals(n, 1.0))
            .unwrap()
            .to_f64()
    };
    let (sq_, sk_, sv_, so_) = (
        [b, sq, h, d],
        [b, sk, hkv, d],
        [b, sk, hkv, dv],
        [b, sq, h, dv],
    );
    let q = round(&sq_, b * sq * h * d);
    let k = round(&sk_, b * sk * hkv * d);
    let v = round(&sv_, b * sk * hkv * dv);
    let d_o = round(&so_, b * sq * h * dv);
    let mut dims = rf::Dims::dense(b, sq, sk, h, hkv, d, dv);
    dims.causal = true;
    dims.shift = 13;
    let (o_ref, l_ref) = rf::forward(&dims, &q, &k, &v);
    let (dq_ref, dk_ref, dv_ref) = rf::backward(&dims, &q, &k, &v, &d_o);
    let _ = client();
    let (tq, tk, tv, tdo) = (
        up(DType::F32, &sq_, &q),
        up(DType::F32, &sk_, &k),
        up(DType::F32, &sv_, &v),
        up(DType::F32, &so_, &d_o),
    );
    let inp = AttentionInputs::new(&tq, &tk, &tv);
    let opts = AttentionOptions {
        causal: true,
        q_offset: 13,
        ..Default::default()
    };
    let fwd = attention(&inp, &opts).unwrap();
    common::assert_forward_close("tuned forward", &fwd.out, &fwd.lse, &o_ref, &l_ref);
    // Each forward kernel with its own tiles tuned (the choice between them may leave
    // one untimed where its cost model is sure).
    for kernel in [ForwardKernel::Staged, ForwardKernel::Rows] {
        // On a GPU kiln refuses the rows kernel past D = 64 by design (its registers).
        if kernel == ForwardKernel::Rows && !common::on_cpu_adapter() {
            let Err(e) = attention_with(&inp, &opts, kernel) else {
                panic!("the rows kernel ran with D = 72 on a GPU");
            };
            common::assert_clear(e, &["kernel", "D <= 64 on a GPU", "D = 72"]);
            continue;
        }
        let r = attention_with(&inp, &opts, kernel).unwrap();
        let what = format!("tuned {kernel:?} forward");
        common::assert_forward_close(&what, &r.out, &r.lse, &o_ref, &l_ref);
    }
    let g = attention_backward(
        &inp,
        &AttentionGradInputs {
            out: &fwd.out,
            lse: &fwd.lse,
            d_o: &tdo,
        },
        &opts,
    )
    .unwrap();
    for (name, got, want) in [
        ("dq", &g.dq, &dq_ref),
        ("dk", &g.dk, &dk_ref),
        ("dv", &g.dv, &dv_ref),
    ] {
        let e = rms_relative(&down(got), want);
        assert!(e <= 1e-4, "tuned backward {name}: {e:.2e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 15, "tuning timed {} candidates", seen.len());
    for (label, status) in seen.iter() {
        assert!(
            matches!(status, CandidateStatus::Timed(_)),
            "{label}: {status:?}"
        );
    }
}
