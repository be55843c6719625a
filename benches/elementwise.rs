#![allow(missing_docs)]
//! Bandwidth of the element-wise and row-wise operators against a 4-wide vectorized
//! copy of the same bytes, side by side in one run on the default device
//! (`KILN_DEVICE` to pick another). kiln's goal: at least 90% of the copy.
//!
//! `cargo bench -p kiln-benches --bench elementwise`; criterion prints GiB/s for each.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::{elementwise, rowwise};
use kiln::{Client, DType, Device, HostTensor, Tensor};

#[path = "support/copy.rs"]
mod copy;
use copy::copy;

fn bench(c: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let (rows, cols) = (2048, 2048);
    let n = rows * cols;
    let v = Rng::new(1).normals(n, 2.0);
    let x = Tensor::upload(
        &client,
        &HostTensor::from_f64(DType::F32, vec![rows, cols], &v).unwrap(),
    )
    .unwrap();
    let y = Tensor::upload(
        &client,
        &HostTensor::from_f64(DType::F32, vec![cols], &v[..cols]).unwrap(),
    )
    .unwrap();
    let out = Tensor::empty(&client, DType::F32, &[rows, cols]).unwrap();

    // Every case moves 2 n f32 (read x, write out); softmax reads x twice.
    let mut g = c.benchmark_group("f32 2048x2048");
    g.sample_size(20)
        .throughput(Throughput::Bytes((2 * n * 4) as u64));
    g.bench_function("copy (vector 4, baseline)", |b| {
        b.iter(|| {
            copy(&x, &out);
            client.sync().unwrap();
        })
    });
    g.bench_function("add x + y[cols]", |b| {
        b.iter(|| {
            let _o = elementwise::add(&x, &y).unwrap();
            client.sync().unwrap();
        })
    });
    g.bench_function("silu", |b| {
        b.iter(|| {
            let _o = elementwise::silu(&x).unwrap();
            client.sync().unwrap();
        })
    });
    g.bench_function("softmax (last dim)", |b| {
        b.iter(|| {
            let _o = rowwise::softmax(&x).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
