#![allow(missing_docs)]
//! f32 matmul on the default device, side by side in one run: kiln autotuned, kiln's
//! first valid config (what it runs without tuning), and cubek-matmul 0.2.0's
//! `Strategy::Auto` (cubecl 0.10's own matmul). Shapes: square 256..2048 and the
//! Llama-7B projection shape K = N = 4096 with M = 1, 16, 128 (and 2048, see below; the f32 weights
//! of the wider Llama projections exceed lavapipe's 128 MiB binding limit).
//!
//! `cargo bench -p kiln-benches --bench matmul`; `KILN_BENCH_QUICK=1` keeps only the small shapes,
//! `KILN_BENCH_FULL=1` adds 2048 x 4096 x 4096.
//! Criterion reports time and FLOP/s (`Throughput::Elements` counts flops here).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cubecl::prelude::*;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::Strategy;
use cubek_std::InputBinding;
use kiln::check::Rng;
use kiln::kernels::matmul::{self, Epilogue};
use kiln::runtime::dispatch;
use kiln::{Client, DType, Device, Tensor};

#[path = "support/data.rs"]
mod data;

fn binding<R: Runtime>(t: &Tensor, shape: [usize; 3]) -> TensorBinding<R> {
    let strides = [shape[1] * shape[2], shape[2], 1];
    TensorBinding {
        handle: t.handle().clone().binding(),
        strides: strides.to_vec().into(),
        shape: shape.to_vec().into(),
        runtime: std::marker::PhantomData,
    }
}

/// c = a @ b through cubek-matmul's Auto strategy (rank-3 bindings, batch 1).
fn cubek(client: &Client, a: &Tensor, b: &Tensor, c: &Tensor, (m, n, k): (usize, usize, usize)) {
    let f32t = f32::as_type_native_unchecked().storage_type();
    let mut elems = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: f32t,
        rhs: f32t,
        out: f32t,
    });
    let r = dispatch!(client, cc => cubek_matmul::launch::launch_ref(
        &Strategy::Auto,
        cc,
        InputBinding::Normal(binding(a, [1, m, k]), f32t),
        InputBinding::Normal(binding(b, [1, k, n]), f32t),
        binding(c, [1, m, n]),
        &mut elems,
    ));
    r.expect("cubek-matmul launch");
}

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let quick = std::env::var_os("KILN_BENCH_QUICK").is_some();
    let mut shapes = vec![(256, 256, 256), (512, 512, 512), (1024, 1024, 1024)];
    if !quick {
        shapes.extend([
            (2048, 2048, 2048),
            (1, 4096, 4096),
            (16, 4096, 4096),
            (128, 4096, 4096),
        ]);
    }
    if std::env::var_os("KILN_BENCH_FULL").is_some() {
        // Tuning this one on lavapipe takes several minutes.
        shapes.push((2048, 4096, 4096));
    }
    let mut rng = Rng::new(5);
    let mut g = cr.benchmark_group("matmul f32");
    g.sample_size(10);
    for (m, n, k) in shapes {
        let id = format!("{m}x{n}x{k}");
        let (a, b) = (
            data::normals(&client, &[m, k], &mut rng, 1.0),
            data::normals(&client, &[k, n], &mut rng, 1.0),
        );
        let c = Tensor::empty(&client, DType::F32, &[m, n]).unwrap();
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        // Tunes on the first call (outside the timing), then reads the cache.
        matmul::matmul(&a, &b, false, Epilogue::default()).unwrap();
        g.bench_function(BenchmarkId::new("kiln tuned", &id), |bch| {
            bch.iter(|| {
                matmul::matmul(&a, &b, false, Epilogue::default()).unwrap();
                client.sync().unwrap();
            })
        });
        let first = matmul::candidates_for(&a, &b, false, Epilogue::default()).unwrap()[0];
        g.bench_function(BenchmarkId::new("kiln first config", &id), |bch| {
            bch.iter(|| {
                matmul::matmul_with(&a, &b, false, Epilogue::default(), first).unwrap();
                client.sync().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("cubek-matmul Auto", &id), |bch| {
            bch.iter(|| {
                cubek(&client, &a, &b, &c, (m, n, k));
                client.sync().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
