#![allow(missing_docs)]
//! S²FT on the default device, side by side in one run:
//! - one training step of a LLaMA-style block (causal GQA attention + SwiGLU FFN with
//!   residuals) at the LLaMA-2-7B block's proportions scaled for a CPU adapter (d =
//!   1024, 8 heads x 128, FFN 2752, 256 tokens, f32): full fine-tuning against S²FT
//!   (1 of 8 V/O heads, 1% of the FFN channels), both on kiln's kernels; the paper
//!   reports 1.5-2.7x lower latency;
//! - serving: `s2ft_adapter_forward` over 8 fine-tunes of a `W_down`-like column block
//!   in one batch against the base GEMM alone (the cost of the per-token deltas);
//! - the in-place block AdamW in GB/s against a 4-wide copy of the bytes it touches.
//!
//! `cargo bench -p kiln-benches --bench s2ft`; `KILN_S2FT_BENCH=small` runs d = 256 for a quick look.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::matmul::{matmul, Epilogue};
use kiln::kernels::s2ft::{
    s2ft_adapter_forward, s2ft_select, AdamWConfig, Block, HeadLayout, LlamaTrainer, LlamaWeights,
    S2ftAdamW, Strategy,
};
use kiln::{Client, DType, Device, HostTensor, Tensor};

#[path = "support/copy.rs"]
mod copy;
#[path = "support/data.rs"]
mod data;

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let small = std::env::var("KILN_S2FT_BENCH").is_ok_and(|v| v == "small");
    let (d, f, n_heads, t) = if small {
        (256, 688, 8, 64)
    } else {
        (1024, 2752, 8, 256)
    };
    let heads = HeadLayout {
        heads: n_heads,
        kv_heads: n_heads,
        head_dim: d / n_heads,
    };
    let mut rng = Rng::new(5);
    let x = data::normals(&client, &[t, d], &mut rng, 1.0);
    let target = rng.normals(t * d, 1.0);
    let cfg = AdamWConfig::default();
    let attn = s2ft_select(n_heads, 1, 1, 1, &Strategy::Random { seed: 1 }).unwrap();
    let ffn_units = (f / 100).max(1);
    let ffn = s2ft_select(f, 1, ffn_units, ffn_units, &Strategy::Random { seed: 2 }).unwrap();
    let weights = || LlamaWeights::random(&client, d, f, &heads, DType::F32, 3).unwrap();
    let mut full = LlamaTrainer::full(weights(), heads, cfg).unwrap();
    let mut s2 = LlamaTrainer::s2ft(weights(), heads, &attn, &ffn, cfg).unwrap();
    // First steps compile and tune every kernel of the shape.
    full.step(&x, &target).unwrap();
    s2.step(&x, &target).unwrap();
    let mut g = cr.benchmark_group(format!(
        "s2ft training step f32 d={d} heads={n_heads} ffn={f} tokens={t}"
    ));
    g.sample_size(10);
    g.bench_function("full fine-tuning (baseline)", |b| {
        b.iter(|| {
            full.step(&x, &target).unwrap();
            client.sync().unwrap();
        })
    });
    g.bench_function("s2ft", |b| {
        b.iter(|| {
            s2.step(&x, &target).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();

    // Serving 8 fine-tunes of W_down's column block (1% of the FFN channels) in one batch.
    let (a, width) = (8usize, ffn_units);
    let h = data::normals(&client, &[t, f], &mut rng, 1.0);
    let w0 = data::normals(&client, &[d, f], &mut rng, 1.0 / (f as f64).sqrt());
    let deltas = data::normals(&client, &[a, d, width], &mut rng, 0.01);
    let ids: Vec<f64> = (0..t).map(|i| (i % (a + 1)) as f64 - 1.0).collect();
    let ids = Tensor::upload(
        &client,
        &HostTensor::from_f64(DType::I32, vec![t], &ids).unwrap(),
    )
    .unwrap();
    s2ft_adapter_forward(&h, &w0, &deltas, &ids, false, 0).unwrap();
    let mut g = cr.benchmark_group(format!(
        "s2ft serving f32 tokens={t} in={f} out={d} fine-tunes={a} block=columns {width}"
    ));
    g.sample_size(20);
    g.bench_function("base GEMM x W0^T alone (baseline)", |b| {
        b.iter(|| {
            matmul(&h, &w0, true, Epilogue::default()).unwrap();
            client.sync().unwrap();
        })
    });
    g.bench_function("s2ft_adapter_forward", |b| {
        b.iter(|| {
            s2ft_adapter_forward(&h, &w0, &deltas, &ids, false, 0).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();

    // The block AdamW against a copy of the bytes it must touch: read g, m, v, w and
    // write m, v, w per element (f32: 28 bytes).
    let wbig = data::normals(&client, &[f, d], &mut rng, 1.0);
    let rows = f / 2;
    let grad = data::normals(&client, &[rows, d], &mut rng, 1.0);
    let mut opt = S2ftAdamW::new(
        &[(
            &wbig,
            Block::Rows {
                start: 0,
                end: rows,
            },
        )],
        cfg,
    )
    .unwrap();
    opt.step(&[&wbig], &[&grad]).unwrap();
    let n = rows * d;
    let mut g = cr.benchmark_group(format!("s2ft_adamw f32 block {rows} x {d}"));
    g.sample_size(20);
    g.throughput(Throughput::Bytes((28 * n) as u64));
    let (src, dst) = (
        Tensor::empty(&client, DType::F32, &[7 * n / 2]).unwrap(),
        Tensor::empty(&client, DType::F32, &[7 * n / 2]).unwrap(),
    );
    g.bench_function("copy (vector 4, baseline)", |b| {
        b.iter(|| {
            copy::copy(&src, &dst);
            client.sync().unwrap();
        })
    });
    g.bench_function("s2ft AdamW step", |b| {
        b.iter(|| {
            opt.step(&[&wbig], &[&grad]).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
