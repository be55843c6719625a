//! Ring attention over the host-staged communicator (P ranks in threads on the test
//! device): every schedule, P = 1..4, causal and not, GQA 4:1, sequence lengths not
//! divisible by P or 2P, dense batches and packed (varlen) sequences with an empty and
//! a one-token one, forward and backward against the f64 whole-sequence reference;
//! PyTorch's vector through the registry for every schedule and P; bad input.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{down, up};
use kiln::check::{rms_relative, Rng};
use kiln::kernels::attention::{
    reference as rf, ring_attention_backward, ring_attention_backward_local_ranks,
    ring_attention_local_ranks, AttentionGradInputs, AttentionInputs, AttentionOptions, RingLayout,
    RingSchedule,
};
use kiln::runtime::comm::HostComm;
use kiln::{load_safetensors, DType, HostTensor};
use std::time::Duration;

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
    common::client()
}

const SCHEDULES: [RingSchedule; 3] = [
    RingSchedule::Contiguous,
    RingSchedule::Zigzag,
    RingSchedule::TokenRing,
];

fn round(shape: &[usize], v: &[f64]) -> Vec<f64> {
    HostTensor::from_f64(DType::F32, shape.to_vec(), v)
        .unwrap()
        .to_f64()
}

/// Every schedule, P = 1..=4, causal and not: the ring forward and backward of whole
/// tensors (`b` sequences of `s` tokens, or with `cu` the packed sequences of one row)
/// against the f64 reference of attention over the whole sequences; 8 query heads over
/// 2 KV heads.
fn every_schedule_equals_whole_attention(b: usize, s: usize, cu: Option<&[i32]>, seed: u64) {
    every_schedule_with(b, s, cu, seed, (1.0, 1.0));
}

/// [`every_schedule_equals_whole_attention`] with APE's `(temperature, lse_scale)`.
fn every_schedule_with(b: usize, s: usize, cu: Option<&[i32]>, seed: u64, ape: (f64, f64)) {
    let _ = client();
    let (h, hkv, d, dv) = (8, 2, 16, 12);
    let mut rng = Rng::new(seed);
    let q = round(&[b, s, h, d], &rng.normals(b * s * h * d, 1.0));
    let k = round(&[b, s, hkv, d], &rng.normals(b * s * hkv * d, 1.0));
    let v = round(&[b, s, hkv, dv], &rng.normals(b * s * hkv * dv, 1.0));
    let d_o = round(&[b, s, h, dv], &rng.normals(b * s * h * dv, 1.0));
    let (tq, tk, tv, tdo) = (
        up(DType::F32, &[b, s, h, d], &q),
        up(DType::F32, &[b, s, hkv, d], &k),
        up(DType::F32, &[b, s, hkv, dv], &v),
        up(DType::F32, &[b, s, h, dv], &d_o),
    );
    let inp = AttentionInputs {
        cu_seqlens_q: cu,
        cu_seqlens_k: cu,
        ..AttentionInputs::new(&tq, &tk, &tv)
    };
    for causal in [false, true] {
        let mut dims = rf::Dims::dense(b, s, s, h, hkv, d, dv);
        dims.causal = causal;
        (dims.temperature, dims.lse_scale) = ape;
        if let Some(cu) = cu {
            dims.bounds_q = cu.iter().map(|&x| x as usize).collect();
            dims.bounds_k = dims.bounds_q.clone();
            dims.varlen = true;
        }
        let (o_ref, l_ref) = rf::forward(&dims, &q, &k, &v);
        let (dq_ref, dk_ref, dv_ref) = rf::backward(&dims, &q, &k, &v, &d_o);
        let (to, tl) = (
            up(DType::F32, &[b, s, h, dv], &o_ref),
            up(DType::F32, &[b, h, s], &l_ref),
        );
        let opts = AttentionOptions {
            causal,
            temperature: ape.0,
            lse_scale: ape.1,
            ..Default::default()
        };
        for schedule in SCHEDULES {
            for p in 1..=4 {
                let r = ring_attention_local_ranks(&inp, p, schedule, &opts).unwrap();
                let what = format!(
                    "{schedule:?} P={p} causal={causal} varlen={} (T, S) = {ape:?}",
                    cu.is_some()
                );
                common::assert_forward_close(&what, &r.out, &r.lse, &o_ref, &l_ref);
                let grad = AttentionGradInputs {
                    out: &to,
                    lse: &tl,
                    d_o: &tdo,
                };
                let g =
                    ring_attention_backward_local_ranks(&inp, &grad, p, schedule, &opts).unwrap();
                for (name, got, want) in [
                    ("dq", &g.dq, &dq_ref),
                    ("dk", &g.dk, &dk_ref),
                    ("dv", &g.dv, &dv_ref),
                ] {
                    let e = rms_relative(&down(got), want);
                    assert!(e <= 1e-4, "{what}: {name} {e:.2e}");
                }
            }
        }
    }
}

#[test]
fn every_schedule_and_world_size_equals_whole_attention() {
    // S = 37: not divisible by 2, 3, 4, 6 or 8.
    every_schedule_equals_whole_attention(2, 37, None, 31);
}

#[test]
fn packed_sequences_every_schedule_and_world_size_equal_whole_attention() {
    // Sequences of 9, 0, 1, 23 and 4 tokens: shorter than 2P chunks, empty, one token.
    every_schedule_equals_whole_attention(1, 37, Some(&[0, 9, 9, 10, 33, 37]), 32);
}

#[test]
fn ape_temperature_and_scale_apply_to_the_whole_sequence() {
    // APE's defaults T = S = 0.9: the ring's lse is T LSE(s / T) + ln S of every key, for
    // every P (blocks merged with their own T-scaled lse would weigh them by B^T).
    every_schedule_with(1, 23, None, 35, (0.9, 0.9));
    every_schedule_with(1, 23, Some(&[0, 7, 7, 23]), 36, (1.7, 0.5));
}

#[test]
fn fewer_tokens_than_chunks_leave_ranks_empty() {
    // 3 tokens over up to 8 chunks: whole chunks (and ranks) hold nothing.
    every_schedule_equals_whole_attention(1, 3, None, 33);
    every_schedule_equals_whole_attention(1, 3, Some(&[0, 1, 3]), 34);
}

/// Far more ranks than tokens (4 tokens, 160 ranks, forward and backward): the empty
/// ranks still pass every block on, and the result is whole attention's. Before empty
/// tensors shared one buffer, 160 rank threads queueing device calls took minutes.
#[test]
fn far_more_ranks_than_tokens_equal_whole_attention() {
    let _ = client();
    let (b, s, h, d) = (1, 4, 2, 8);
    let mut rng = Rng::new(37);
    let q = round(&[b, s, h, d], &rng.normals(b * s * h * d, 1.0));
    let k = round(&[b, s, h, d], &rng.normals(b * s * h * d, 1.0));
    let v = round(&[b, s, h, d], &rng.normals(b * s * h * d, 1.0));
    let d_o = round(&[b, s, h, d], &rng.normals(b * s * h * d, 1.0));
    let t = |x: &[f64]| up(DType::F32, &[b, s, h, d], x);
    let (tq, tk, tv, tdo) = (t(&q), t(&k), t(&v), t(&d_o));
    let inp = AttentionInputs::new(&tq, &tk, &tv);
    let mut dims = rf::Dims::dense(b, s, s, h, h, d, d);
    dims.causal = true;
    let (o_ref, l_ref) = rf::forward(&dims, &q, &k, &v);
    let (dq_ref, _, dv_ref) = rf::backward(&dims, &q, &k, &v, &d_o);
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    for schedule in SCHEDULES {
        let r = ring_attention_local_ranks(&inp, 160, schedule, &opts).unwrap();
        common::assert_forward_close(
            &format!("{schedule:?} P=160"),
            &r.out,
            &r.lse,
            &o_ref,
            &l_ref,
        );
    }
    let (to, tl) = (t(&o_ref), up(DType::F32, &[b, h, s], &l_ref));
    let grad = AttentionGradInputs {
        out: &to,
        lse: &tl,
        d_o: &tdo,
    };
    let g =
        ring_attention_backward_local_ranks(&inp, &grad, 160, RingSchedule::Zigzag, &opts).unwrap();
    for (name, got, want) in [("dq", &g.dq, &dq_ref), ("dv", &g.dv, &dv_ref)] {
        let e = rms_relative(&down(got), want);
        assert!(e <= 1e-4, "P=160: {name} {e:.2e}");
    }
}

#[test]
fn pytorch_vector_through_the_registry_for_every_schedule() {
    let hosts = load_safetensors(common::data("ring_attention_causal_f32.safetensors")).unwrap();
    let spec = kiln::kernels::op("ring_attention").unwrap();
    for schedule in ["contiguous", "zigzag", "tokenring"] {
        for p in 1..=4 {
            let params = [
                ("causal", "true".to_string()),
                ("world_size", p.to_string()),
                ("schedule", schedule.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let outs = spec.call_host(client(), &hosts, params).unwrap();
            for name in ["out", "lse"] {
                let e = rms_relative(
                    &outs[name].to_f64(),
                    &hosts[&format!("expected_{name}")].to_f64(),
                );
                assert!(e <= 1e-5, "{schedule} P={p}: {name} {e:.2e}");
            }
        }
    }
}

#[test]
fn layouts_cut_ragged_chunks_without_padding() {
    for s in [0, 1, 5, 37, 150] {
        for p in 1..=4 {
            for schedule in SCHEDULES {
                let l = RingLayout::new(s, p, schedule).unwrap();
                let mut all: Vec<usize> = (0..p)
                    .flat_map(|r| l.rank_chunks(r))
                    .flat_map(|c| c.tokens().collect::<Vec<_>>())
                    .collect();
                all.sort();
                assert_eq!(all, (0..s).collect::<Vec<_>>(), "S={s} P={p} {schedule:?}");
                let lens: Vec<usize> = (0..p).map(|r| l.local_len(r)).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 2, "S={s} P={p} {schedule:?}: {lens:?}");
                // A rank outside the ring holds nothing (zigzag's mirrored chunk index
                // would underflow).
                assert!(l.rank_chunks(p).is_empty() && l.local_len(2 * p + 1) == 0);
            }
        }
    }
    // A sequence so long that `c len` passes usize is still cut exactly.
    let l = RingLayout::new(usize::MAX / 2, 4, RingSchedule::Zigzag).unwrap();
    let total: usize = (0..4).map(|r| l.local_len(r)).sum();
    assert_eq!(total, usize::MAX / 2);
}

#[test]
fn packed_layouts_cut_every_sequence_alike() {
    let cu = [0, 9, 9, 10, 33, 37];
    for p in 1..=4 {
        for schedule in SCHEDULES {
            let l = RingLayout::varlen(&cu, p, schedule).unwrap();
            let n = if schedule == RingSchedule::Zigzag {
                2 * p
            } else {
                p
            };
            let mut all = Vec::new();
            for r in 0..p {
                for c in l.rank_chunks(r) {
                    // Chunk c of every sequence, in sequence order.
                    assert_eq!(c.segments.len(), cu.len() - 1);
                    for (w, seg) in cu.windows(2).zip(&c.segments) {
                        let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
                        assert_eq!(seg.start, start + c.index * len / n, "P={p} {schedule:?}");
                        assert_eq!(
                            seg.end,
                            start + (c.index + 1) * len / n,
                            "P={p} {schedule:?}"
                        );
                    }
                    all.extend(c.tokens());
                }
            }
            all.sort();
            assert_eq!(all, (0..37).collect::<Vec<_>>(), "P={p} {schedule:?}");
        }
    }
    let e = RingLayout::varlen(&[0, 5, 3], 2, RingSchedule::Zigzag)
        .err()
        .unwrap();
    common::assert_clear(e, &["cu_seqlens", "non-decreasing"]);
}

#[test]
fn bad_ring_input_is_one_clear_line() {
    let _ = client();
    let t = up(DType::F32, &[1, 8, 2, 4], &[0.5; 64]);
    let e = ring_attention_local_ranks(
        &AttentionInputs::new(&t, &t, &t),
        0,
        RingSchedule::Zigzag,
        &AttentionOptions::default(),
    )
    .err()
    .expect("world_size 0 accepted");
    let text = e.to_string();
    assert!(
        text.contains("world_size") && text.lines().count() == 1,
        "{text}"
    );
    let e = RingSchedule::parse("ring").err().unwrap().to_string();
    assert!(e.contains("contiguous | zigzag | tokenring"), "{e}");
    let k3 = up(DType::F32, &[1, 8, 3, 4], &[0.5; 96]);
    let e = ring_attention_local_ranks(
        &AttentionInputs::new(&t, &k3, &k3),
        2,
        RingSchedule::Contiguous,
        &AttentionOptions::default(),
    )
    .err()
    .expect("Hkv = 3 with H = 2 accepted")
    .to_string();
    assert!(e.contains("Hkv dividing"), "{e}");
    // Packed sequences: the key offsets must be the query offsets.
    let e = ring_attention_local_ranks(
        &AttentionInputs {
            cu_seqlens_q: Some(&[0, 3, 8]),
            cu_seqlens_k: Some(&[0, 4, 8]),
            ..AttentionInputs::new(&t, &t, &t)
        },
        2,
        RingSchedule::Zigzag,
        &AttentionOptions::default(),
    )
    .err()
    .expect("different cu_seqlens_k accepted");
    common::assert_clear(e, &["cu_seqlens_k", "cu_seqlens_q"]);
    // A rank's own backward checks its rows of out, lse and do (Dv = 4, not 3).
    let bad_do = up(DType::F32, &[1, 8, 2, 3], &[0.5; 48]);
    let lse = up(DType::F32, &[1, 2, 8], &[0.0; 16]);
    let e = HostComm::run(vec![client().clone()], Duration::from_secs(60), |comm| {
        let layout = RingLayout::new(8, 1, RingSchedule::Contiguous).unwrap();
        ring_attention_backward(
            comm,
            &layout,
            &t,
            &t,
            &t,
            &AttentionGradInputs {
                out: &t,
                lse: &lse,
                d_o: &bad_do,
            },
            &AttentionOptions::default(),
        )
        .err()
        .expect("do of the wrong shape accepted")
    })
    .remove(0)
    .unwrap();
    common::assert_clear(e, &["do", "[1, 8, 2, 4]"]);
}
