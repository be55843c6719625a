//! Each fused optimizer step beside a 4-wide copy of the bytes it must touch, interleaved:
//! rounds of (copy, step, ...) in turn, so that a busy machine slows both alike; per
//! variant the minimum and the median over the rounds of the mean time of `STEPS`
//! launches. On a shared 2-core machine the minimum is the steadiest figure (criterion's
//! medians of `--bench optim` move 20-30 % between runs there).
//!
//! `cargo bench -p kiln-benches --bench optim_interleaved` (4M f32 elements; bytes as in
//! `--bench optim`: parameter and gradient read, parameter and per-element states read
//! and written; LAMB and AdaGrad-Norm read some twice, not counted).

use kiln::check::Rng;
use kiln::kernels::optim::{Block, Hyper, MultiTensorStep, Rule};
use kiln::{Client, DType, Device, Tensor};
use std::cell::RefCell;

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
    let mut rng = Rng::new(1);
    let param = data::normals(&client, &[1, n], &mut rng, 1.0);
    let grad = data::normals(&client, &[1, n], &mut rng, 1.0);
    let (param, grad) = (&param, &grad);
    // One copy per byte count (the f32 streams a rule must touch), then the rules.
    let streams = |r: Rule| 3 + 2 * r.element_states();
    let mut counts: Vec<usize> = Rule::ALL.iter().map(|&r| streams(r)).collect();
    counts.sort();
    counts.dedup();
    let copies: Vec<(usize, Tensor, Tensor)> = counts
        .iter()
        .map(|&k| {
            let t = || Tensor::empty(&client, DType::F32, &[n * k / 2]).unwrap();
            (k, t(), t())
        })
        .collect();
    let opts: Vec<(Rule, RefCell<MultiTensorStep>)> = Rule::ALL
        .iter()
        .map(|&r| {
            let list = [(param, Block::whole(1))];
            let opt = MultiTensorStep::new(r, Hyper::defaults(r), &list).unwrap();
            (r, RefCell::new(opt))
        })
        .collect();
    let mut variants: Vec<Variant<'_>> = Vec::new();
    for (k, src, dst) in &copies {
        variants.push((
            format!("copy of {k} streams"),
            Box::new(move || copy::copy(src, dst)),
        ));
    }
    for (r, opt) in &opts {
        variants.push((
            format!("{r:?} step ({} streams)", streams(*r)),
            Box::new(move || opt.borrow_mut().step(&[param], &[grad]).unwrap()),
        ));
    }
    let times = interleaved(&client, &variants);
    println!("| variant | min | median | the copy's min / min |");
    println!("|---|---|---|---|");
    for (i, (name, _)) in variants.iter().enumerate() {
        let (min, median) = times[i];
        let ratio = match i.checked_sub(copies.len()) {
            Some(j) => {
                let at = counts
                    .iter()
                    .position(|&k| k == streams(opts[j].0))
                    .unwrap();
                format!("{:.2}", times[at].0 / min)
            }
            None => String::new(),
        };
        println!("| {name} | {min:.2} ms | {median:.2} ms | {ratio} |");
    }
}
