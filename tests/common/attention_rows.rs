//! The row-per-unit attention forward kernel's fast tiles, tuned from scratch: shared by
//! `tests/attention_rows.rs` and `tests/attention_rows_causal.rs`.

use crate::common::up;
use kiln::check::Rng;
use kiln::kernels::attention::{
    attention_with, reference as rf, AttentionInputs, AttentionOptions, ForwardKernel,
};
use kiln::runtime::tune::CandidateStatus;
use kiln::{DType, HostTensor};

/// Tunes the rows kernel from scratch on the ragged shape below (`causal` with the
/// queries at `q_offset`), asserts the tuned result against the f64 reference, that the
/// fast tile was a candidate and that every candidate was timed. One per test binary
/// (each tile set takes llvmpipe ~30 s to compile; `causal` is compiled in).
pub fn fast_tiles_match_the_reference(causal: bool, q_offset: usize) {
    let (dir, seen) = crate::common::tune_from_scratch(&format!("attention-rows-{causal}"));
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
    let client = crate::common::client();
    if client.report().adapter_type != kiln::runtime::AdapterType::Cpu {
        // The fast tiles are a CPU adapter's; other devices run the one-row tile,
        // which tests/attention.rs covers.
        eprintln!(
            "attention_rows: not a CPU adapter, nothing to run (tests/attention.rs covers it)"
        );
        return;
    }
    let (tq, tk, tv) = (
        up(DType::F32, &sq_, &q),
        up(DType::F32, &sk_, &k),
        up(DType::F32, &sk_, &v),
    );
    {
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
        crate::common::assert_forward_close(&what, &r.out, &r.lse, &o_ref, &l_ref);
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
