//! Quantized GEMMs with autotuning on (the default): the tuner chooses between the GEMV
//! and the tiled kernel for few rows and tunes each kernel's tiles; every candidate must
//! validate against the first (none rejected, none failed), and the tuned results must
//! match f64.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::client;
use kiln::check::Rng;
use kiln::kernels::qgemm::{self, reference as qr, reference::W4Codes, W4Format, W4Weights};
use kiln::runtime::tune::{Autotuner, CandidateStatus, Search};
use kiln::runtime::AdapterType;
use kiln::{DType, HostTensor, Tensor};

fn up(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::upload(
        client(),
        &HostTensor::from_f64(dtype, shape.to_vec(), v).unwrap(),
    )
    .unwrap()
}

fn mean_rel(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).abs()).sum();
    num / want.iter().map(|w| w.abs()).sum::<f64>()
}

#[test]
fn tuned_quantized_gemms_match_f64_and_every_candidate_validates() {
    // A fresh cache, so that every candidate is timed (one test in this binary).
    let (dir, seen) = common::tune_from_scratch("qgemm");
    let mut rng = Rng::new(21);
    let (n, k) = (72, 256);
    let c = W4Codes::quantize(&rng.normals(k * n, 0.05), k, n, 128);
    let qw: Vec<f64> = c.gptq_qweight().iter().map(|&v| v as f64).collect();
    let qz: Vec<f64> = c.qzeros("gptq", 2).iter().map(|&v| v as f64).collect();
    let (qweight, scales, qzeros) = (
        up(DType::I32, &[k / 8, n], &qw),
        up(DType::F32, &[k / 128, n], &c.s),
        up(DType::I32, &[k / 128, n / 8], &qz),
    );
    let w = W4Weights {
        format: W4Format::Gptq { version: 2 },
        qweight: &qweight,
        scales: &scales,
        qzeros: Some(&qzeros),
        g_idx: None,
        group_size: 128,
    };
    let wf = c.dequantize(None);
    // M = 1 and 16: GEMV or tiled, both timed; M = 100: tiled only.
    for m in [1, 16, 100] {
        let x = rng.normals(m * k, 1.0);
        let y = qgemm::w4a16(&up(DType::F32, &[m, k], &x), &w).unwrap();
        let err = mean_rel(
            &y.download().unwrap().to_f64(),
            &qr::matmul(&x, &wf, m, k, n),
        );
        assert!(err < 1e-5, "w4a16 M={m}: {err:e}");
    }
    // Double Rounding at 6 bits, and W8A8, both tuned.
    let q8: Vec<f64> = (0..k * n)
        .map(|i| ((i * 73 % 255) as f64) - 127.0)
        .collect();
    let s8 = vec![0.02; n];
    let q8i: Vec<i8> = q8.iter().map(|&v| v as i8).collect();
    let x = rng.normals(4 * k, 1.0);
    let y = qgemm::w8_bits(
        &up(DType::F32, &[4, k], &x),
        &up(DType::I8, &[k, n], &q8),
        &up(DType::F32, &[n], &s8),
        6,
    )
    .unwrap();
    let want = qr::matmul(&x, &qr::w8_bits_weight(&q8i, &s8, k, n, 6), 4, k, n);
    assert!(mean_rel(&y.download().unwrap().to_f64(), &want) < 1e-5);
    let xq: Vec<f64> = (0..20 * k)
        .map(|i| ((i * 31 % 255) as f64) - 127.0)
        .collect();
    let sx = vec![0.01; 20];
    let y = qgemm::w8a8(
        &up(DType::I8, &[20, k], &xq),
        &up(DType::F32, &[20], &sx),
        &up(DType::I8, &[n, k], &q8),
        &up(DType::F32, &[n], &s8),
        None,
        DType::F32,
    )
    .unwrap();
    let wt: Vec<f64> = q8.clone();
    let want = qr::w8a8(&xq, &sx, &wt, &s8, None, 20, n, k);
    assert!(mean_rel(&y.download().unwrap().to_f64(), &want) < 1e-6);

    let log = seen;
    let seen = log.lock().unwrap();
    let timed = seen
        .iter()
        .filter(|(_, s)| matches!(s, CandidateStatus::Timed(_)))
        .count();
    let bad: Vec<_> = seen
        .iter()
        .filter(|(_, s)| !matches!(s, CandidateStatus::Timed(_)))
        .collect();
    assert!(bad.is_empty(), "rejected or failed candidates: {bad:?}");
    // Both paths at M = 1 and 16, and several configurations of each kernel.
    assert!(
        seen.iter().filter(|(l, _)| l == "gemv").count() >= 2,
        "{seen:?}"
    );
    assert!(timed >= 10, "only {timed} candidates timed");
    drop(seen);
    ranked_search_on_a_cpu_adapter(&log, &w, &wf, &mut rng);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The default (ranked) search where the quantized GEMMs' cost model applies (CPU
/// adapters): W4A16 at M = 64 runs the direct path alone (the GEMV's and the tiled
/// kernel's estimates are past twice its own, so neither runs) and times only the direct
/// kernel's best-ranked configurations; the result matches f64.
fn ranked_search_on_a_cpu_adapter(
    log: &common::TuneLog,
    w: &W4Weights<'_>,
    wf: &[f64],
    rng: &mut Rng,
) {
    if client().report().adapter_type != AdapterType::Cpu {
        eprintln!("not a CPU adapter: the quantized GEMMs have no cost model here");
        return;
    }
    Autotuner::global().set_search(Search::Ranked);
    log.lock().unwrap().clear();
    let (m, k, n) = (64, 256, 72);
    let x = rng.normals(m * k, 1.0);
    let y = qgemm::w4a16(&up(DType::F32, &[m, k], &x), w).unwrap();
    let err = mean_rel(
        &y.download().unwrap().to_f64(),
        &qr::matmul(&x, wf, m, k, n),
    );
    assert!(err < 1e-5, "w4a16 M={m} ranked: {err:e}");
    let seen = log.lock().unwrap();
    let status = |label: &str| {
        seen.iter()
            .find(|(l, _)| l == label)
            .map(|(_, s)| s.clone())
    };
    assert!(
        matches!(status("direct"), Some(CandidateStatus::Timed(_))),
        "{seen:?}"
    );
    for path in ["gemv", "tiled"] {
        assert!(
            matches!(status(path), Some(CandidateStatus::NotTimed { .. })),
            "{path}: {seen:?}"
        );
    }
    let not_timed = seen
        .iter()
        .filter(|(_, s)| matches!(s, CandidateStatus::NotTimed { .. }))
        .count();
    assert!(
        not_timed > 2,
        "the direct kernel's configurations all ran: {seen:?}"
    );
}
