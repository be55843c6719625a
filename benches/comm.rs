//! The host-staged communicator's ring step against a device-local copy of the same
//! bytes, measured side by side (criterion, one run):
//! - `HostComm` with 2 ranks on the one device, each rank's `send_recv` of a 16 MiB f32
//!   block to its neighbour (download, hand-over, upload), timed on rank 0;
//! - a 4-wide vectorized copy of 16 MiB on the device.
//!
//! Throughput is the block's bytes in both, so the ratio of the GiB/s is the price of
//! staging through host memory.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::runtime::comm::{Communicator, HostComm};
use kiln::{Client, DType, Device, Tensor};
use std::time::{Duration, Instant};

#[path = "support/copy.rs"]
mod copy;

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let n = 1usize << 22;
    let bytes = 4 * n;
    let (src, dst) = (
        Tensor::empty(&client, DType::F32, &[n]).unwrap(),
        Tensor::empty(&client, DType::F32, &[n]).unwrap(),
    );
    let mut g = cr.benchmark_group(format!("comm ring step, {} MiB per rank", bytes >> 20));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("copy (vector 4, device-local baseline)", |b| {
        b.iter(|| {
            copy::copy(&src, &dst);
            client.sync().unwrap();
        })
    });
    g.bench_function("HostComm send_recv, 2 ranks", |b| {
        b.iter_custom(|iters| {
            let times = HostComm::run(vec![client.clone(); 2], Duration::from_secs(120), |c| {
                let block = Tensor::empty(c.client(), DType::F32, &[n]).unwrap();
                c.barrier().unwrap();
                let start = Instant::now();
                for _ in 0..iters {
                    let got = c.send_recv(&block, 1 - c.rank(), 1 - c.rank()).unwrap();
                    std::hint::black_box(got);
                }
                c.client().sync().unwrap();
                start.elapsed()
            });
            times[0].as_ref().copied().expect("rank 0")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
