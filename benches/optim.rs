#![allow(missing_docs)]
//! Fused optimizer steps on the default device, side by side in one run:
//! - each rule's step on 4M f32 elements in GiB/s against a 4-wide copy of the bytes it
//!   must touch (goal: at least 0.9 of the copy);
//! - AdamW and FRUGAL over 200 tensors of mixed sizes (1 .. 64K elements): the
//!   multi-tensor step (six per launch) against one launch per tensor, and the same
//!   tensors as views of one flat buffer (`FlatLayout`: span launches, one per pass and
//!   vector width), for AdamW also the flat buffer stepped as one tensor;
//! - the seeded perturbation (one seed; MeZO's update with 8 seeds) and the gradient
//!   compressors (top-k and rand-k at k = n/100, with error feedback) on 4M elements
//!   against a copy of the bytes they must touch.
//!
//! `cargo bench -p kiln-benches --bench optim`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::check::Rng;
use kiln::kernels::optim::{
    perturb, randk, topk_ef, topk_ef_estimated, zo_update, Block, Frugal, FrugalConfig, Hyper,
    MultiTensorStep, Rule,
};
use kiln::{Client, DType, Device, FlatLayout, HostTensor, Tensor};

#[path = "support/copy.rs"]
mod copy;
#[path = "support/data.rs"]
mod data;

fn bench(cr: &mut Criterion) {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let mut rng = Rng::new(1);
    let n = 1usize << 22;
    let param = data::normals(&client, &[1, n], &mut rng, 1.0);
    let grad = data::normals(&client, &[1, n], &mut rng, 1.0);
    for rule in Rule::ALL {
        let k = rule.element_states();
        // Read: param, grad, the states; written: param, the states (4 bytes each). LAMB
        // and AdaGrad-Norm read some twice (norms, then update): not counted.
        let bytes = 4 * n * (3 + 2 * k);
        let mut opt =
            MultiTensorStep::new(rule, Hyper::defaults(rule), &[(&param, Block::whole(1))])
                .unwrap();
        opt.step(&[&param], &[&grad]).unwrap();
        let half = bytes / 8;
        let (src, dst) = (
            Tensor::empty(&client, DType::F32, &[half]).unwrap(),
            Tensor::empty(&client, DType::F32, &[half]).unwrap(),
        );
        let mut g = cr.benchmark_group(format!("optim {rule:?} f32 {n} elements"));
        g.sample_size(20);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function("copy (vector 4, baseline)", |b| {
            b.iter(|| {
                copy::copy(&src, &dst);
                client.sync().unwrap();
            })
        });
        g.bench_function("fused step", |b| {
            b.iter(|| {
                opt.step(&[&param], &[&grad]).unwrap();
                client.sync().unwrap();
            })
        });
        g.finish();
    }

    // Seeded perturbation and compressors, each against a copy of its minimal bytes.
    let error = data::normals(&client, &[1, n], &mut rng, 0.3);
    let seeds: Vec<u64> = (0..8).collect();
    let grads8 = vec![0.5; 8];
    type Run<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, usize, Run)> = vec![
        (
            "perturb (1 seed)",
            8 * n,
            Box::new(|| perturb(&[&param], 7, 1e-3).unwrap()),
        ),
        (
            "zo_update (8 seeds)",
            8 * n,
            Box::new(|| zo_update(&[&param], &seeds, &grads8, 1e-6).unwrap()),
        ),
        (
            "topk_ef (k = n/100)",
            12 * n,
            Box::new(|| drop(topk_ef(&grad, Some(&error), n / 100).unwrap())),
        ),
        (
            "topk_ef threshold estimate (k about n/100)",
            12 * n,
            Box::new(|| drop(topk_ef_estimated(&grad, Some(&error), n / 100, 65536, 7).unwrap())),
        ),
        (
            "randk (k = n/100)",
            12 * n,
            Box::new(|| drop(randk(&grad, Some(&error), n / 100, 3).unwrap())),
        ),
    ];
    for (name, bytes, run) in &cases {
        let half = bytes / 8;
        let (src, dst) = (
            Tensor::empty(&client, DType::F32, &[half]).unwrap(),
            Tensor::empty(&client, DType::F32, &[half]).unwrap(),
        );
        run();
        let mut g = cr.benchmark_group(format!("optim {name} f32 {n} elements"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(*bytes as u64));
        g.bench_function("copy (vector 4, baseline)", |b| {
            b.iter(|| {
                copy::copy(&src, &dst);
                client.sync().unwrap();
            })
        });
        g.bench_function("kiln", |b| {
            b.iter(|| {
                run();
                client.sync().unwrap();
            })
        });
        g.finish();
    }

    // 200 tensors of mixed sizes, AdamW.
    let sizes: Vec<usize> = (0..200).map(|i| 1 + (i * 7919) % 65_536).collect();
    let params: Vec<Tensor> = sizes
        .iter()
        .map(|&s| data::normals(&client, &[1, s], &mut rng, 1.0))
        .collect();
    let grads: Vec<Tensor> = sizes
        .iter()
        .map(|&s| data::normals(&client, &[1, s], &mut rng, 1.0))
        .collect();
    let h = Hyper::defaults(Rule::AdamW);
    let list: Vec<(&Tensor, Block)> = params.iter().map(|p| (p, Block::whole(1))).collect();
    let mut multi = MultiTensorStep::new(Rule::AdamW, h, &list).unwrap();
    let mut single: Vec<MultiTensorStep> = params
        .iter()
        .map(|p| MultiTensorStep::new(Rule::AdamW, h, &[(p, Block::whole(1))]).unwrap())
        .collect();
    let (pr, gr): (Vec<&Tensor>, Vec<&Tensor>) = (params.iter().collect(), grads.iter().collect());
    multi.step(&pr, &gr).unwrap();
    let mut g = cr.benchmark_group(format!(
        "optim AdamW 200 tensors, {} elements",
        sizes.iter().sum::<usize>()
    ));
    g.sample_size(20);
    g.bench_function("one launch per tensor (baseline)", |b| {
        b.iter(|| {
            for (o, (p, gr)) in single.iter_mut().zip(params.iter().zip(&grads)) {
                o.step(&[p], &[gr]).unwrap();
            }
            client.sync().unwrap();
        })
    });
    g.bench_function("multi-tensor (6 per launch)", |b| {
        b.iter(|| {
            multi.step(&pr, &gr).unwrap();
            client.sync().unwrap();
        })
    });
    // The same values in one flat buffer (each tensor at a 256-byte boundary): one
    // launch a step over all of it.
    let shapes: Vec<Vec<usize>> = sizes.iter().map(|&s| vec![1, s]).collect();
    let layout = FlatLayout::new(DType::F32, &shapes).unwrap();
    let pack = |ts: &[Tensor]| {
        let hosts: Vec<HostTensor> = ts.iter().map(|t| t.download().unwrap()).collect();
        let flat = layout.upload(&client, &hosts).unwrap();
        flat.reshape(&[1, layout.len()]).unwrap()
    };
    let (flat_p, flat_g) = (pack(&params), pack(&grads));
    let mut flat = MultiTensorStep::new(Rule::AdamW, h, &[(&flat_p, Block::whole(1))]).unwrap();
    flat.step(&[&flat_p], &[&flat_g]).unwrap();
    g.bench_function("one flat buffer (1 launch)", |b| {
        b.iter(|| {
            flat.step(&[&flat_p], &[&flat_g]).unwrap();
            client.sync().unwrap();
        })
    });
    // The flat buffers' views as a list of 200 tensors: span launches, one per width.
    let view = |t: &Tensor| layout.views(&t.reshape(&[layout.len()]).unwrap()).unwrap();
    let (vp, vg) = (view(&flat_p), view(&flat_g));
    let (vpr, vgr): (Vec<&Tensor>, Vec<&Tensor>) = (vp.iter().collect(), vg.iter().collect());
    let list: Vec<(&Tensor, Block)> = vp.iter().map(|p| (p, Block::whole(1))).collect();
    let mut on_views = MultiTensorStep::new(Rule::AdamW, h, &list).unwrap();
    on_views.step(&vpr, &vgr).unwrap();
    g.bench_function("views of one flat buffer (2 launches)", |b| {
        b.iter(|| {
            on_views.step(&vpr, &vgr).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();

    // The same 200 tensors, FRUGAL (density 0.25; no redraw while timing).
    let c = FrugalConfig {
        update_gap: 1 << 31,
        ..Default::default()
    };
    let mut multi = Frugal::new_multi(&pr, h, c).unwrap();
    let mut single: Vec<Frugal> = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let own = FrugalConfig {
                seed: c.seed_of(i),
                ..c
            };
            Frugal::new(p, h, own).unwrap()
        })
        .collect();
    multi.step_multi(&pr, &gr).unwrap();
    for (o, (p, gr)) in single.iter_mut().zip(params.iter().zip(&grads)) {
        o.step(p, gr).unwrap();
    }
    let mut g = cr.benchmark_group(format!(
        "optim FRUGAL 200 tensors, {} elements",
        sizes.iter().sum::<usize>()
    ));
    g.sample_size(20);
    g.bench_function("one launch per tensor (baseline)", |b| {
        b.iter(|| {
            for (o, (p, gr)) in single.iter_mut().zip(params.iter().zip(&grads)) {
                o.step(p, gr).unwrap();
            }
            client.sync().unwrap();
        })
    });
    g.bench_function("multi-tensor (6 per launch)", |b| {
        b.iter(|| {
            multi.step_multi(&pr, &gr).unwrap();
            client.sync().unwrap();
        })
    });
    let mut frugal_views = Frugal::new_multi(&vpr, h, c).unwrap();
    frugal_views.step_multi(&vpr, &vgr).unwrap();
    g.bench_function("views of one flat buffer (4 launches)", |b| {
        b.iter(|| {
            frugal_views.step_multi(&vpr, &vgr).unwrap();
            client.sync().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
