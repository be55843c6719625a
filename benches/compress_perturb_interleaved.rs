//! The gradient compressors and the seeded perturbation beside a 4-wide copy of the
//! bytes they must touch (compressors: the gradient and the error read, the error
//! written, three f32 streams; perturbation: the weight read and written, two),
//! interleaved: rounds of every variant in turn, so that a busy machine slows all alike;
//! per variant the minimum and the median over the rounds of the mean of `STEPS` calls.
//!
//! `cargo bench -p kiln-benches --bench compress_perturb_interleaved` (4M f32 elements,
//! k = n/100, `zo_update` over 8 seeds).

use kiln::check::Rng;
use kiln::kernels::optim::{perturb, randk, topk_ef, topk_ef_estimated, zo_update};
use kiln::{Client, DType, Device, Tensor};

#[path = "support/copy.rs"]
mod copy;
#[path = "support/data.rs"]
mod data;
#[path = "support/interleaved.rs"]
mod interleaved;

use interleaved::{interleaved, Variant};

fn main() {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let n = 1usize << 22;
    let k = n / 100;
    let mut rng = Rng::new(1);
    let grad = data::normals(&client, &[1, n], &mut rng, 1.0);
    let error = data::normals(&client, &[1, n], &mut rng, 0.3);
    let (grad, error) = (&grad, &error);
    let param = data::normals(&client, &[1, n], &mut rng, 1.0);
    let param = &param;
    let seeds: Vec<u64> = (0..8).collect();
    let grads8 = vec![0.5; 8];
    // A copy of s n / 2 elements reads and writes s n f32 in all (s streams).
    let buffers = |s: usize| {
        let t = || Tensor::empty(&client, DType::F32, &[s * n / 2]).unwrap();
        (t(), t())
    };
    let (src3, dst3) = buffers(3);
    let (src2, dst2) = buffers(2);
    let variants: Vec<Variant<'_>> = vec![
        (
            "copy of 3 streams".into(),
            Box::new(|| copy::copy(&src3, &dst3)),
        ),
        (
            "copy of 2 streams".into(),
            Box::new(|| copy::copy(&src2, &dst2)),
        ),
        (
            "topk_ef (exact)".into(),
            Box::new(|| drop(topk_ef(grad, Some(error), k).unwrap())),
        ),
        (
            "topk_ef threshold estimate".into(),
            Box::new(|| drop(topk_ef_estimated(grad, Some(error), k, 65536, 7).unwrap())),
        ),
        (
            "randk".into(),
            Box::new(|| drop(randk(grad, Some(error), k, 3).unwrap())),
        ),
        (
            "perturb (1 seed)".into(),
            Box::new(|| perturb(&[param], 7, 1e-3).unwrap()),
        ),
        (
            "zo_update (8 seeds)".into(),
            Box::new(|| zo_update(&[param], &seeds, &grads8, 1e-6).unwrap()),
        ),
    ];
    let times = interleaved(&client, &variants);
    println!("| variant | min | median | the copy's min / min |");
    println!("|---|---|---|---|");
    for (i, (name, _)) in variants.iter().enumerate() {
        let (min, median) = times[i];
        // The compressors against the 3-stream copy, the perturbations the 2-stream one.
        let ratio = match (i, name.contains("perturb") || name.contains("zo_update")) {
            (0 | 1, _) => String::new(),
            (_, true) => format!("{:.3}", times[1].0 / min),
            (_, false) => format!("{:.3}", times[0].0 / min),
        };
        println!("| {name} | {min:.2} ms | {median:.2} ms | {ratio} |");
    }
}
