//! The row-per-unit forward kernel's fast tiles: offered on a CPU adapter from four
//! query tiles of rows (each takes llvmpipe ~30 s to compile), so the other attention
//! tests, whose shapes are smaller, run only its small tiles. Here the kernel tunes
//! over both on a ragged shape that has them (every candidate checked against the
//! first, all timed), and the tuned result must match the f64 reference.

mod common;

use common::up;
use kiln::check::Rng;
use kiln::kernels::attention::{
    attention_with, reference as rf, AttentionInputs, AttentionOptions, ForwardKernel,
};
use kiln::runtime::tune::CandidateStatus;
use kiln::{DType, HostTensor};

#[test]
fn rows_kernel_fast_tiles_match_the_reference() {
    let (dir, seen) = common::tune_from_scratch("attention-rows");
    // 515 query rows: 4 tiles of 128 and 3 rows; keys ragged too; GQA 2:1; D = 64.
    let (b, sq, sk, h, hkv, d) = (1, 515, 301, 2, 1, 64);
    let mut rng = Rng::new(11);
    let mut round = |s: &[usize]| {
        let n = s.iter().product();
        HostTensor::from_f64(DType::F32, s.to_vec(), &rng.normals(n, 1.0))
            .unwrap()
            .to_f64()
    };
    let (sq_, sk_) = ([b, sq, h, d], [b, sk, hkv, d]);
    let (q, k, v) = (round(&sq_), round(&sk_), round(&sk_));
    let client = common::client();
    if client.report().adapter_type != kiln::runtime::AdapterType::Cpu {
        // The fast tiles are a CPU adapter's; other devices run the one-row tile,
        // which tests/attention.rs covers.
        return;
    }
    let (tq, tk, tv) = (
        up(DType::F32, &sq_, &q),
        up(DType::F32, &sk_, &k),
        up(DType::F32, &sk_, &v),
    );
    for (causal, q_offset) in [(false, 0), (true, 40)] {
        let opts = AttentionOptions {
            causal,
            q_offset,
            ..Default::default()
        };
        let mut dims = rf::Dims::dense(b, sq, sk, h, hkv, d, d);
        dims.causal = causal;
        dims.shift = q_offset as i64;
        let (o_ref, l_ref) = rf::forward(&dims, &q, &k, &v);
        let r = attention_with(
            &AttentionInputs::new(&tq, &tk, &tv),
            &opts,
            ForwardKernel::Rows,
        )
        .unwrap();
        let what = format!("causal={causal}");
        common::assert_forward_close(&what, &r.out, &r.lse, &o_ref, &l_ref);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().unwrap();
    // The fast tile was a candidate, and every candidate was timed.
    assert!(seen.iter().any(|(l, _)| l.contains("TQ=16")), "{seen:?}");
    for (label, status) in seen.iter() {
        assert!(
            matches!(status, CandidateStatus::Timed(_)),
            "{label}: {status:?}"
        );
    }
}
