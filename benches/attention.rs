#![allow(missing_docs)]
//! Attention on the default device, side by side in one run:
//! - the fused block (`attention`: one pass over key tiles, online softmax; and each of
//!   its two forward kernels alone, `Staged` and `Rows`) against the unfused kiln path (per head: `matmul(q, k^T)` with the causal mask as the
//!   epilogue's residual, `softmax`, `matmul(p, v)`) and cubek-attention 0.2's unit
//!   routine (cubecl 0.10's own, checked against kiln's output first), B = 1, H = 8,
//!   D = 64, f32, S in {512, 2048, 4096}, causal and not (the shapes);
//! - ring overhead: `ring_attention` (zigzag, causal, host-staged communicator, P ranks
//!   in threads on this device) against the single-device block at the same total
//!   length, P = 2 and 4.
//!
//! `cargo bench -p kiln-benches --bench attention`; `KILN_BENCH_QUICK=1` keeps S = 512 and 2048.
//! Throughput: FLOPs of the non-causal form (4 S^2 D H); causal runs do about half.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cubecl::prelude::*;
use cubek_attention::definition::{AccumulatorPrecision, AttentionGlobalTypes};
use cubek_attention::launch::{BlueprintStrategy, Strategy};
use kiln::check::Rng;
use kiln::kernels::attention::{
    attention, attention_with, ring_attention_local_ranks, AttentionInputs, AttentionOptions,
    ForwardKernel, RingSchedule,
};
use kiln::kernels::matmul::{matmul, Epilogue};
use kiln::kernels::rowwise::softmax;
use kiln::runtime::dispatch;
use kiln::{Client, DType, Device, HostTensor, Tensor};

fn upload(client: &Client, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, shape.to_vec(), values).unwrap(),
    )
    .unwrap()
}

/// A contiguous `[1, H, S, D]` tensor as a cubek binding.
fn heads_major<R: Runtime>(t: &Tensor, (s, h, d): (usize, usize, usize)) -> TensorBinding<R> {
    TensorBinding {
        handle: t.handle().clone().binding(),
        strides: vec![s * h * d, s * d, d, 1].into(),
        shape: vec![1, h, s, d].into(),
        runtime: std::marker::PhantomData,
    }
}

/// Token-major `[S, H, D]` values in head-major `[H, S, D]` order (cubek's layout).
fn to_heads_major(values: &[f64], s: usize, h: usize, d: usize) -> Vec<f64> {
    (0..h)
        .flat_map(|x| (0..s).flat_map(move |t| (0..d).map(move |e| (t, x, e))))
        .map(|(t, x, e)| values[(t * h + x) * d + e])
        .collect()
}

/// `out` = attention through cubek-attention 0.2's unit routine (cubecl 0.10's own
/// flash attention; its accelerated routine needs tensor cores), f32 accumulation.
fn cubek_attention(
    client: &Client,
    [q, k, v, out]: [&Tensor; 4],
    dims: (usize, usize, usize),
    causal: bool,
) -> Result<(), String> {
    let f32t = f32::as_type_native_unchecked();
    dispatch!(client, cc => {
        let types =
            AttentionGlobalTypes::from_single_float_dtype(f32t, AttentionGlobalTypes::mask_dtype(cc));
        cubek_attention::launch::launch_ref(
            Strategy::Unit(BlueprintStrategy::Inferred(())),
            cc,
            heads_major(q, dims),
            heads_major(k, dims),
            heads_major(v, dims),
            None,
            heads_major(out, dims),
            &types,
            cubek_attention::definition::AttentionOptions {
                causal,
                accumulator_precision: AccumulatorPrecision::default(),
            },
        )
        .map_err(|e| format!("{e:?}"))
    })
}

/// Head `h` of a `[S, H, D]` tensor as `[S, D]` (host-side: the unfused path's layout).
fn head(values: &[f64], s: usize, h: usize, d: usize, which: usize, scale: f64) -> Vec<f64> {
    (0..s)
        .flat_map(|t| {
            values[(t * h + which) * d..][..d]
                .iter()
                .map(move |x| x * scale)
        })
        .collect()
}

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let (h, d) = (8usize, 64usize);
    let lens: &[usize] = if quick {
        &[512, 2048]
    } else {
        &[512, 2048, 4096]
    };
    let mut rng = Rng::new(3);
    let mut group = cr.benchmark_group("attention f32 B=1 H=8 D=64");
    group.sample_size(10);
    for &s in lens {
        let n = s * h * d;
        let (qv, kv, vv) = (
            rng.normals(n, 1.0),
            rng.normals(n, 1.0),
            rng.normals(n, 1.0),
        );
        let shape = [1, s, h, d];
        let (q, k, v) = (
            upload(&client, &shape, &qv),
            upload(&client, &shape, &kv),
            upload(&client, &shape, &vv),
        );
        // The unfused path's per-head operands (q pre-scaled by D^-1/2).
        let scale = 1.0 / (d as f64).sqrt();
        let heads: Vec<[Tensor; 3]> = (0..h)
            .map(|x| {
                [
                    upload(&client, &[s, d], &head(&qv, s, h, d, x, scale)),
                    upload(&client, &[s, d], &head(&kv, s, h, d, x, 1.0)),
                    upload(&client, &[s, d], &head(&vv, s, h, d, x, 1.0)),
                ]
            })
            .collect();
        let mask_values: Vec<f64> = (0..s * s)
            .map(|e| {
                if e % s > e / s {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = upload(&client, &[s, s], &mask_values);
        group.throughput(Throughput::Elements((4 * s * s * d * h) as u64));
        for causal in [false, true] {
            let opts = AttentionOptions {
                causal,
                ..Default::default()
            };
            let tag = format!("S={s} causal={causal}");
            // Warm-up outside the timing: the first call of a shape tunes.
            attention(&AttentionInputs::new(&q, &k, &v), &opts).unwrap();
            group.bench_function(BenchmarkId::new("fused attention", &tag), |b| {
                b.iter(|| {
                    let r = attention(&AttentionInputs::new(&q, &k, &v), &opts).unwrap();
                    client.sync().unwrap();
                    r
                })
            });
            // Each forward kernel alone (its tiles tuned), to show what the choice is between.
            for kernel in [ForwardKernel::Staged, ForwardKernel::Rows] {
                let inp = AttentionInputs::new(&q, &k, &v);
                attention_with(&inp, &opts, kernel).unwrap();
                group.bench_function(BenchmarkId::new(format!("{kernel:?} kernel"), &tag), |b| {
                    b.iter(|| {
                        let r = attention_with(&inp, &opts, kernel).unwrap();
                        client.sync().unwrap();
                        r
                    })
                });
            }
            let unfused = || {
                let outs: Vec<Tensor> = heads
                    .iter()
                    .map(|[qh, kh, vh]| {
                        let ep = Epilogue {
                            residual: causal.then_some(&mask),
                            ..Default::default()
                        };
                        let scores = matmul(qh, kh, true, ep).unwrap();
                        let p = softmax(&scores).unwrap();
                        matmul(&p, vh, false, Epilogue::default()).unwrap()
                    })
                    .collect();
                client.sync().unwrap();
                outs
            };
            // cubecl's own attention, where it runs, on head-major copies (its layout);
            // checked against kiln's output before it is timed.
            let hm =
                |values: &[f64]| upload(&client, &[1, h, s, d], &to_heads_major(values, s, h, d));
            let (qh, kh, vh) = (hm(&qv), hm(&kv), hm(&vv));
            let out = Tensor::empty(&client, DType::F32, &[1, h, s, d]).unwrap();
            match cubek_attention(&client, [&qh, &kh, &vh, &out], (s, h, d), causal) {
                Ok(()) => {
                    let want = attention(&AttentionInputs::new(&q, &k, &v), &opts).unwrap();
                    let want = to_heads_major(&want.out.download().unwrap().to_f64(), s, h, d);
                    let err = kiln::check::rms_relative(&out.download().unwrap().to_f64(), &want);
                    eprintln!("cubek-attention {tag}: rel-RMS {err:.2e} against kiln's");
                    group.bench_function(BenchmarkId::new("cubek-attention unit", &tag), |b| {
                        b.iter(|| {
                            cubek_attention(&client, [&qh, &kh, &vh, &out], (s, h, d), causal)
                                .unwrap();
                            client.sync().unwrap();
                        })
                    });
                }
                Err(e) => eprintln!("cubek-attention {tag}: does not run here: {e}"),
            }
            unfused();
            group.bench_function(
                BenchmarkId::new("unfused matmul-softmax-matmul", &tag),
                |b| b.iter(unfused),
            );
        }
    }
    group.finish();

    // Ring overhead at one total length.
    let s = 2048;
    let n = s * h * d;
    let shape = [1, s, h, d];
    let (q, k, v) = (
        upload(&client, &shape, &rng.normals(n, 1.0)),
        upload(&client, &shape, &rng.normals(n, 1.0)),
        upload(&client, &shape, &rng.normals(n, 1.0)),
    );
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    let mut group = cr.benchmark_group("ring attention f32 causal S=2048 H=8 D=64");
    group.sample_size(10);
    group.throughput(Throughput::Elements((4 * s * s * d * h) as u64));
    attention(&AttentionInputs::new(&q, &k, &v), &opts).unwrap();
    group.bench_function("single device", |b| {
        b.iter(|| {
            let r = attention(&AttentionInputs::new(&q, &k, &v), &opts).unwrap();
            client.sync().unwrap();
            r
        })
    });
    for p in [2usize, 4] {
        ring_attention_local_ranks(
            &AttentionInputs::new(&q, &k, &v),
            p,
            RingSchedule::Zigzag,
            &opts,
        )
        .unwrap();
        group.bench_function(
            BenchmarkId::new("zigzag ring, host-staged", format!("P={p}")),
            |b| {
                b.iter(|| {
                    let r = ring_attention_local_ranks(
                        &AttentionInputs::new(&q, &k, &v),
                        p,
                        RingSchedule::Zigzag,
                        &opts,
                    )
                    .unwrap();
                    client.sync().unwrap();
                    r
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
