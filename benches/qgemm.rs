#![allow(missing_docs)]
//! Quantized GEMMs on the default device, side by side in one run: W4A16 (kiln layout,
//! G = 128), W8A8 and Double Rounding at 4 bits against kiln's own f16 `matmul` of the
//! same shape, for Llama-7B layer shapes (K, N) = (4096, 4096), (4096, 12288),
//! (11008, 4096) and M in {1, 4, 16, 64} (and 256 for the square shape). Activations f16.
//! Criterion's throughput is the GEMM's 2 M N K flops.
//!
//! `cargo bench -p kiln-benches --bench qgemm`; `KILN_BENCH_QUICK=1` keeps (4096, 4096) at M = 1, 16.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::matmul::{matmul, Epilogue};
use kiln::kernels::qgemm::{self, PackedW4};
use kiln::{Client, DType, Device, HostTensor, Tensor};

fn upload(client: &Client, dtype: DType, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::upload(
        client,
        &HostTensor::from_f64(dtype, shape.to_vec(), values).unwrap(),
    )
    .unwrap()
}

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096)]
    } else {
        &[(4096, 4096), (4096, 12288), (11008, 4096)]
    };
    // M = 256 only for the square shape: on lavapipe one f16 GEMM of 256 x 12288 x 4096
    // takes seconds, and each shape tunes every kernel first.
    let ms_for = |k: usize, n: usize| -> &'static [usize] {
        match (quick, k == n) {
            (true, _) => &[1, 16],
            (false, true) => &[1, 4, 16, 64, 256],
            (false, false) => &[1, 4, 16, 64],
        }
    };
    let mut rng = Rng::new(3);
    for &(k, n) in shapes {
        let mut group = cr.benchmark_group(format!("qgemm f16 K={k} N={n}"));
        group.sample_size(10);
        let words = |rng: &mut Rng, len: usize| -> Vec<f64> {
            (0..len)
                .map(|_| (rng.next_u64() as u32 as i32) as f64)
                .collect()
        };
        let codes = |rng: &mut Rng, len: usize| -> Vec<f64> {
            (0..len)
                .map(|_| (rng.uniform() * 255.0).floor() - 127.0)
                .collect()
        };
        let groups = k / 128;
        let packed = PackedW4 {
            qweight: upload(
                &client,
                DType::I32,
                &[k / 8, n],
                &words(&mut rng, k / 8 * n),
            ),
            scales: upload(&client, DType::F32, &[groups, n], &vec![0.01; groups * n]),
            qzeros: upload(&client, DType::F32, &[groups, n], &vec![8.0; groups * n]),
            g_idx: None,
            k,
            n,
            group_size: 128,
        };
        let w16 = upload(&client, DType::F16, &[k, n], &rng.normals(k * n, 0.02));
        let q8 = upload(&client, DType::I8, &[k, n], &codes(&mut rng, k * n));
        let wq = upload(&client, DType::I8, &[n, k], &codes(&mut rng, k * n));
        let s8 = upload(&client, DType::F32, &[n], &vec![0.01; n]);
        for &m in ms_for(k, n) {
            let x = upload(&client, DType::F16, &[m, k], &rng.normals(m * k, 1.0));
            let xq = upload(&client, DType::I8, &[m, k], &codes(&mut rng, m * k));
            let sx = upload(&client, DType::F32, &[m], &vec![0.01; m]);
            // Tune and compile outside the timing.
            matmul(&x, &w16, false, Epilogue::default()).unwrap();
            qgemm::w4a16_packed(&x, &packed).unwrap();
            qgemm::w8a8(&xq, &sx, &wq, &s8, None, DType::F16).unwrap();
            qgemm::w8_bits(&x, &q8, &s8, 4).unwrap();
            client.sync().unwrap();
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_function(BenchmarkId::new("f16 matmul", m), |b| {
                b.iter(|| {
                    matmul(&x, &w16, false, Epilogue::default()).unwrap();
                    client.sync().unwrap();
                })
            });
            group.bench_function(BenchmarkId::new("w4a16", m), |b| {
                b.iter(|| {
                    qgemm::w4a16_packed(&x, &packed).unwrap();
                    client.sync().unwrap();
                })
            });
            group.bench_function(BenchmarkId::new("w8a8", m), |b| {
                b.iter(|| {
                    qgemm::w8a8(&xq, &sx, &wq, &s8, None, DType::F16).unwrap();
                    client.sync().unwrap();
                })
            });
            group.bench_function(BenchmarkId::new("w8_bits b=4", m), |b| {
                b.iter(|| {
                    qgemm::w8_bits(&x, &q8, &s8, 4).unwrap();
                    client.sync().unwrap();
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
