//! Ring attention over the host-staged communicator (P ranks in threads on the test
//! device): every schedule, P = 1..4, causal and not, GQA 4:1, sequence lengths not
//! divisible by P or 2P, forward and backward against the f64 whole-sequence
//! reference; PyTorch's vector through the registry for every schedule and P; bad input.

mod common;

use common::{down, up};
use kiln::check::{rms_relative, Rng};
use kiln::kernels::attention::{
    reference as rf, ring_attention_backward_local_ranks, ring_attention_local_ranks,
    AttentionGradInputs, AttentionOptions, RingLayout, RingSchedule,
};
use kiln::{load_safetensors, DType, HostTensor};

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

#[test]
fn every_schedule_and_world_size_equals_whole_attention() {
    let _ = client();
    // S = 37: not divisible by 2, 3, 4, 6 or 8; 8 query heads over 2 KV heads.
    let (b, s, h, hkv, d, dv) = (2, 37, 8, 2, 16, 12);
    let mut rng = Rng::new(31);
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
    for causal in [false, true] {
        let mut dims = rf::Dims::dense(b, s, s, h, hkv, d, dv);
        dims.causal = causal;
        let (o_ref, l_ref) = rf::forward(&dims, &q, &k, &v);
        let (dq_ref, dk_ref, dv_ref) = rf::backward(&dims, &q, &k, &v, &d_o);
        let (to, tl) = (
            up(DType::F32, &[b, s, h, dv], &o_ref),
            up(DType::F32, &[b, h, s], &l_ref),
        );
        let opts = AttentionOptions {
            causal,
            ..Default::default()
        };
        for schedule in SCHEDULES {
            for p in 1..=4 {
                let r = ring_attention_local_ranks(&tq, &tk, &tv, p, schedule, &opts).unwrap();
                let what = format!("{schedule:?} P={p} causal={causal}");
                common::assert_forward_close(&what, &r.out, &r.lse, &o_ref, &l_ref);
                let g = ring_attention_backward_local_ranks(
                    &tq,
                    &tk,
                    &tv,
                    &AttentionGradInputs {
                        out: &to,
                        lse: &tl,
                        d_o: &tdo,
                    },
                    p,
                    schedule,
                    &opts,
                )
                .unwrap();
                for (name, got, want) in [
                    ("dq", &g.dq, &dq_ref),
                    ("dk", &g.dk, &dk_ref),
                    ("dv", &g.dv, &dv_ref),
                ] {
                    let e = rms_relative(&down(got), want);
                    assert!(
                        e <= 1e-4,
                        "{schedule:?} P={p} causal={causal}: {name} {e:.2e}"
                    );
                }
            }
        }
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
                let mut all: Vec<usize> = (0..p).flat_map(|r| l.rank_chunks(r)).flatten().collect();
                all.sort();
                assert_eq!(all, (0..s).collect::<Vec<_>>(), "S={s} P={p} {schedule:?}");
                let lens: Vec<usize> = (0..p).map(|r| l.local_len(r)).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 2, "S={s} P={p} {schedule:?}: {lens:?}");
            }
        }
    }
}

#[test]
fn bad_ring_input_is_one_clear_line() {
    let _ = client();
    let t = up(DType::F32, &[1, 8, 2, 4], &[0.5; 64]);
    let e = ring_attention_local_ranks(
        &t,
        &t,
        &t,
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
        &t,
        &k3,
        &k3,
        2,
        RingSchedule::Contiguous,
        &AttentionOptions::default(),
    )
    .err()
    .expect("Hkv = 3 with H = 2 accepted")
    .to_string();
    assert!(e.contains("Hkv dividing"), "{e}");
}
