#![allow(missing_docs)]
//! GLA on the default device, side by side in one run: the chunkwise forward (`auto`:
//! the algorithm the autotuner picks for this device, and `mode=chunk`, the
//! chunk-parallel pipeline) against the recurrent forward, and forward + backward, for B = 2, H = 4,
//! K = V = 64, T in {256, 1024, 4096}, f32, gates logsigmoid(randn) clamped at -5 (the
//! spec's benchmark inputs). Criterion's throughput is tokens (B T) per second.
//!
//! `cargo bench -p kiln-benches --bench gla`; `KILN_BENCH_QUICK=1` keeps T = 256 and 1024.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::gla::{
    gla, gla_backward, gla_recurrent, GlaGradInputs, GlaInputs, GlaMode, GlaOptions,
};
use kiln::{Client, DType, Device, HostTensor, Tensor};

fn upload(client: &Client, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, shape.to_vec(), values).unwrap(),
    )
    .unwrap()
}

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let (b, h, d) = (2usize, 4usize, 64usize);
    let ts: &[usize] = if quick {
        &[256, 1024]
    } else {
        &[256, 1024, 4096]
    };
    let mut rng = Rng::new(7);
    let mut group = cr.benchmark_group("gla f32 B=2 H=4 D=64");
    group.sample_size(10);
    for &t in ts {
        let shape = [b, t, h, d];
        let n = b * t * h * d;
        let q = upload(&client, &shape, &rng.normals(n, 1.0));
        let k = upload(&client, &shape, &rng.normals(n, 1.0));
        let v = upload(&client, &shape, &rng.normals(n, 1.0));
        let gates: Vec<f64> = rng
            .normals(n, 1.0)
            .into_iter()
            .map(|x| (-(1.0 + (-x).exp()).ln()).max(-5.0))
            .collect();
        let g = upload(&client, &shape, &gates);
        let d_o = upload(&client, &shape, &rng.normals(n, 1.0));
        let inp = GlaInputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            h0: None,
            cu_seqlens: None,
        };
        let opts = GlaOptions::default();
        let chunk_opts = GlaOptions {
            mode: GlaMode::Chunk,
            ..Default::default()
        };
        let grad = GlaGradInputs {
            d_o: &d_o,
            dht: None,
        };
        // Tune and compile outside the timing.
        gla(&inp, &opts).unwrap();
        gla(&inp, &chunk_opts).unwrap();
        gla_recurrent(&inp, &opts).unwrap();
        gla_backward(&inp, &grad, &opts).unwrap();
        client.sync().unwrap();
        group.throughput(Throughput::Elements((b * t) as u64));
        group.bench_function(BenchmarkId::new("forward (auto)", t), |bch| {
            bch.iter(|| {
                gla(&inp, &opts).unwrap();
                client.sync().unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("forward mode=chunk", t), |bch| {
            bch.iter(|| {
                gla(&inp, &chunk_opts).unwrap();
                client.sync().unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("recurrent forward", t), |bch| {
            bch.iter(|| {
                gla_recurrent(&inp, &opts).unwrap();
                client.sync().unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("forward (auto) + backward", t), |bch| {
            bch.iter(|| {
                gla(&inp, &opts).unwrap();
                gla_backward(&inp, &grad, &opts).unwrap();
                client.sync().unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
