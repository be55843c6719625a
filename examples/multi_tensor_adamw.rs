//! AdamW over a list of tensors of mixed sizes, as a model's parameters are: kiln's
//! multi-tensor step (`MultiTensorStep` over the whole list: one launch per six tensors)
//! against one `MultiTensorStep` per tensor (one launch each), against the same tensors
//! as views of one flat buffer (`FlatLayout`: each at a 256-byte boundary) stepped as one
//! tensor (one launch) and as a list of views (one launch per vector width), and against
//! one tensor of all their elements, timed in interleaved rounds (minimum and median over 20 rounds of
//! the mean of 10 steps). The sizes are PyTorch's `AdamW(fused=True)` line of
//! `scripts/gpu-torch.py`: tensor `i` has `1 + (7919 i mod 65536)` f32 elements.
//!
//! ```text
//! cargo run --release --example multi_tensor_adamw                 # 200 tensors
//! cargo run --release --example multi_tensor_adamw -- --tensors 50
//! ```
//! The device is `$KILN_DEVICE` or the default one. GB/s counts the seven f32 streams
//! a step must move (parameter, `m`, `v` read and written; gradient read).

#[path = "../benches/support/interleaved.rs"]
mod interleaved;

use interleaved::{interleaved, Variant};
use kiln::check::Rng;
use kiln::kernels::optim::{Block, Hyper, MultiTensorStep, Rule};
use kiln::{Client, DType, FlatLayout, HostTensor, Tensor};
use std::cell::RefCell;

/// Tensors of `[1, size]` for each of `sizes` (a row each: `Block::whole(1)`), drawn
/// from `rng`.
fn tensors(client: &Client, sizes: &[usize], rng: &mut Rng) -> kiln::Result<Vec<Tensor>> {
    sizes
        .iter()
        .map(|&s| {
            Tensor::upload(
                client,
                &HostTensor::from_f64(DType::F32, vec![1, s], &rng.normals(s, 1.0))?,
            )
        })
        .collect()
}

/// AdamW (PyTorch's defaults) over `params`, as one list or one optimizer per tensor.
fn optimizers(params: &[Tensor], per_tensor: bool) -> kiln::Result<Vec<MultiTensorStep>> {
    let h = Hyper::defaults(Rule::AdamW);
    let list: Vec<(&Tensor, Block)> = params.iter().map(|p| (p, Block::whole(1))).collect();
    match per_tensor {
        false => Ok(vec![MultiTensorStep::new(Rule::AdamW, h, &list)?]),
        true => list
            .iter()
            .map(|e| MultiTensorStep::new(Rule::AdamW, h, std::slice::from_ref(e)))
            .collect(),
    }
}

/// One step of every optimizer in `opts` over its share of `params` and `grads`, in order.
fn step(opts: &RefCell<Vec<MultiTensorStep>>, params: &[Tensor], grads: &[Tensor]) {
    let mut opts = opts.borrow_mut();
    let per = params.len() / opts.len();
    for (i, o) in opts.iter_mut().enumerate() {
        let p: Vec<&Tensor> = params[i * per..(i + 1) * per].iter().collect();
        let g: Vec<&Tensor> = grads[i * per..(i + 1) * per].iter().collect();
        o.step(&p, &g).expect("an AdamW step");
    }
}

fn main() -> kiln::Result<()> {
    let mut count = 200usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next().and_then(|v| v.parse().ok())) {
            ("--tensors", Some(n)) if n > 0 => count = n,
            _ => {
                eprintln!("usage: multi_tensor_adamw [--tensors N (>= 1)]");
                std::process::exit(2);
            }
        }
    }
    let client = Client::from_env()?;
    eprintln!("{}", client.report());
    let sizes: Vec<usize> = (0..count).map(|i| 1 + (i * 7919) % 65_536).collect();
    let total: usize = sizes.iter().sum();
    let mut rng = Rng::new(1);
    let (params, grads) = (
        tensors(&client, &sizes, &mut rng)?,
        tensors(&client, &sizes, &mut rng)?,
    );
    let (one_p, one_g) = (
        tensors(&client, &[total], &mut rng)?,
        tensors(&client, &[total], &mut rng)?,
    );
    // The same values in one flat buffer each: what a model keeps its parameters in to
    // step them in one launch (its layers use the views).
    let shapes: Vec<Vec<usize>> = sizes.iter().map(|&s| vec![1, s]).collect();
    let layout = FlatLayout::new(DType::F32, &shapes)?;
    let pack = |ts: &[Tensor]| -> kiln::Result<Vec<Tensor>> {
        let hosts = ts
            .iter()
            .map(|t| t.download())
            .collect::<kiln::Result<Vec<_>>>()?;
        Ok(vec![layout
            .upload(&client, &hosts)?
            .reshape(&[1, layout.len()])?])
    };
    let (flat_p, flat_g) = (pack(&params)?, pack(&grads)?);
    let flat = RefCell::new(optimizers(&flat_p, false)?);
    // The flat buffers' views as a list: one span launch per vector width.
    let views = |t: &Tensor| layout.views(&t.reshape(&[layout.len()])?);
    let (view_p, view_g) = (views(&flat_p[0])?, views(&flat_g[0])?);
    let spans = RefCell::new(optimizers(&view_p, false)?);
    let multi = RefCell::new(optimizers(&params, false)?);
    let each = RefCell::new(optimizers(&params, true)?);
    let one = RefCell::new(optimizers(&one_p, false)?);
    let variants: Vec<Variant<'_>> = vec![
        (
            "multi-tensor (one list)".into(),
            Box::new(|| step(&multi, &params, &grads)),
        ),
        (
            "one launch per tensor".into(),
            Box::new(|| step(&each, &params, &grads)),
        ),
        (
            "one flat buffer of all tensors (views)".into(),
            Box::new(|| step(&flat, &flat_p, &flat_g)),
        ),
        (
            "views of one flat buffer (multi-tensor)".into(),
            Box::new(|| step(&spans, &view_p, &view_g)),
        ),
        (
            "one tensor of all elements".into(),
            Box::new(|| step(&one, &one_p, &one_g)),
        ),
    ];
    let times = interleaved(&client, &variants);
    let bytes = 7.0 * 4.0 * total as f64;
    println!(
        "kiln AdamW f32 over {count} tensors of mixed sizes, {total} elements, on {}",
        client.report().selector
    );
    println!("| variant | min | median | GB/s (min) |");
    println!("|---|---|---|---|");
    for ((name, _), (min, median)) in variants.iter().zip(&times) {
        println!(
            "| {name} | {min:.3} ms | {median:.3} ms | {:.1} |",
            bytes / min / 1e6
        );
    }
    println!(
        "multi-tensor against one launch per tensor: {:.2}x (minima)",
        times[1].0 / times[0].0
    );
    println!(
        "one flat buffer against one launch per tensor: {:.2}x (minima)",
        times[1].0 / times[2].0
    );
    println!(
        "views of one flat buffer against one launch per tensor: {:.2}x (minima)",
        times[1].0 / times[3].0
    );
    Ok(())
}
