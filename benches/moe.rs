#![allow(missing_docs)]
//! Mixture-of-Experts on the default device, side by side in one run, at Tutel's layer
//! shape scaled for a CPU adapter: S = 2048 tokens, M = F = 512, E = 8 experts, top-2,
//! capacity factor 1 (C = 512), f32.
//! - dispatch and combine in GiB/s against a 4-wide copy of the dispatched bytes
//!   (goal: at least 0.9 of the copy);
//! - the expert FFN: one grouped launch per GEMM (`moe_expert_ffn`) against a loop of
//!   E pairs of kiln `matmul`s on per-expert slices;
//! - the whole layer: the capacity path, the dropless (sorted) path, and the same layer
//!   with its experts as E separate pairs of kiln `matmul`s (goal: at least 2x).
//!
//! `cargo bench -p kiln-benches --bench moe`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::matmul::{matmul, Activation, Epilogue};
use kiln::kernels::moe::{
    moe_combine, moe_dispatch, moe_expert_ffn, moe_gate, moe_layer, ExpertWeights, GateOptions,
    LayerOptions, MoePath,
};
use kiln::kernels::rows::{copy_rows, slice_rows};
use kiln::{Client, DType, Device, Tensor};

#[path = "support/copy.rs"]
mod copy;
#[path = "support/data.rs"]
mod data;

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let (s, m, f, e, k) = (2048usize, 512usize, 512usize, 8usize, 2usize);
    let mut rng = Rng::new(11);
    let x = data::normals(&client, &[s, m], &mut rng, 1.0);
    let w_gate = data::normals(&client, &[m, e], &mut rng, 0.05);
    let w1 = data::normals(&client, &[e, m, f], &mut rng, 0.05);
    let w2 = data::normals(&client, &[e, f, m], &mut rng, 0.05);
    let b1 = data::normals(&client, &[e, f], &mut rng, 0.05);
    let b2 = data::normals(&client, &[e, m], &mut rng, 0.05);
    let w = ExpertWeights {
        w1: &w1,
        b1: Some(&b1),
        w2: &w2,
        b2: Some(&b2),
        activation: Activation::Silu,
    };
    let gate = GateOptions::new(k, 1.0);
    let logits = matmul(&x, &w_gate, false, Epilogue::default()).unwrap();
    let routing = moe_gate(&logits, &gate).unwrap().routing;
    let c = routing.capacity();
    let kept: usize = routing.rows_per_expert().iter().sum();
    eprintln!("capacity {c}, kept routes {kept} of {}", s * k);

    // Data movement: bytes written to the slots plus the token rows read (dispatch);
    // slot rows read plus y written (combine); the copy moves E C M floats each way.
    let slots = moe_dispatch(&x, &routing).unwrap();
    let y_e = moe_expert_ffn(&slots, &w).unwrap();
    moe_combine(&y_e, &routing).unwrap();
    let mut g = cr.benchmark_group(format!(
        "moe data movement f32 S={s} M={m} E={e} k={k} cf=1"
    ));
    g.sample_size(20);
    let copy_out = Tensor::empty(&client, DType::F32, &[e * c * m]).unwrap();
    let flat = slots.reshape(&[e * c * m]).unwrap();
    g.throughput(Throughput::Bytes((2 * e * c * m * 4) as u64));
    g.bench_function("copy (vector 4, baseline)", |b| {
        b.iter(|| {
            copy::copy(&flat, &copy_out);
            client.sync().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(((e * c * m + kept * m) * 4) as u64));
    g.bench_function("moe_dispatch", |b| {
        b.iter(|| {
            let d = moe_dispatch(&x, &routing).unwrap();
            client.sync().unwrap();
            d
        })
    });
    g.throughput(Throughput::Bytes(((kept * m + s * m) * 4) as u64));
    g.bench_function("moe_combine", |b| {
        b.iter(|| {
            let y = moe_combine(&y_e, &routing).unwrap();
            client.sync().unwrap();
            y
        })
    });
    g.finish();

    // The experts: one grouped launch per GEMM against E pairs of matmuls.
    let per_expert = |t: &Tensor| -> Vec<Tensor> {
        (0..e)
            .map(|i| slice_rows(t, 0, i, 1, DType::F32).unwrap())
            .collect()
    };
    let squeeze = |v: Vec<Tensor>, shape: &[usize]| -> Vec<Tensor> {
        v.into_iter().map(|t| t.reshape(shape).unwrap()).collect()
    };
    let (w1s, w2s) = (
        squeeze(per_expert(&w1), &[m, f]),
        squeeze(per_expert(&w2), &[f, m]),
    );
    let (b1s, b2s) = (
        squeeze(per_expert(&b1), &[f]),
        squeeze(per_expert(&b2), &[m]),
    );
    let slots_e = squeeze(per_expert(&slots), &[c, m]);
    let loop_ffn = |d: &[Tensor]| -> Vec<Tensor> {
        (0..e)
            .map(|i| {
                let h = matmul(
                    &d[i],
                    &w1s[i],
                    false,
                    Epilogue {
                        bias: Some(&b1s[i]),
                        activation: Activation::Silu,
                        residual: None,
                    },
                )
                .unwrap();
                matmul(
                    &h,
                    &w2s[i],
                    false,
                    Epilogue {
                        bias: Some(&b2s[i]),
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .collect()
    };
    loop_ffn(&slots_e);
    let mut g = cr.benchmark_group(format!("moe expert FFN f32 E={e} C={c} M={m} F={f}"));
    g.sample_size(10);
    g.throughput(Throughput::Elements((4 * e * c * m * f) as u64));
    g.bench_function("grouped (moe_expert_ffn, 2 launches)", |b| {
        b.iter(|| {
            let y = moe_expert_ffn(&slots, &w).unwrap();
            client.sync().unwrap();
            y
        })
    });
    g.bench_function(
        BenchmarkId::new("loop of matmuls", format!("{} launches", 2 * e)),
        |b| {
            b.iter(|| {
                let y = loop_ffn(&slots_e);
                client.sync().unwrap();
                y
            })
        },
    );
    g.finish();

    // The whole layer.
    let mut g = cr.benchmark_group(format!("moe layer f32 S={s} M={m} F={f} E={e} k={k} cf=1"));
    g.sample_size(10);
    g.throughput(Throughput::Elements((4 * k * s * m * f) as u64));
    for path in [MoePath::Capacity, MoePath::Dropless] {
        let opts = LayerOptions { gate, path };
        moe_layer(&x, &w_gate, &w, &opts).unwrap();
        g.bench_function(
            BenchmarkId::new("moe_layer", format!("{path:?}").to_lowercase()),
            |b| {
                b.iter(|| {
                    let out = moe_layer(&x, &w_gate, &w, &opts).unwrap();
                    client.sync().unwrap();
                    out.y
                })
            },
        );
    }
    let looped_layer = || {
        let logits = matmul(&x, &w_gate, false, Epilogue::default()).unwrap();
        let r = moe_gate(&logits, &gate).unwrap().routing;
        let d = moe_dispatch(&x, &r).unwrap();
        let d_e: Vec<Tensor> = (0..e)
            .map(|i| {
                slice_rows(&d, 0, i, 1, DType::F32)
                    .unwrap()
                    .reshape(&[c, m])
                    .unwrap()
            })
            .collect();
        let outs = loop_ffn(&d_e);
        let y_e = Tensor::empty(&client, DType::F32, &[e * c, m]).unwrap();
        for (i, o) in outs.iter().enumerate() {
            copy_rows(o, 0, 0, &y_e, i * c, c).unwrap();
        }
        let y = moe_combine(&y_e.reshape(&[e, c, m]).unwrap(), &r).unwrap();
        client.sync().unwrap();
        y
    };
    looped_layer();
    g.bench_function("same layer, experts as E pairs of matmuls", |b| {
        b.iter(looped_layer)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
