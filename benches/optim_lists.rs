//! The multi-tensor step over a list of 200 tensors of mixed sizes (1 .. 64K elements)
//! against one launch per tensor, interleaved (see `support/interleaved.rs`): AdamW, with
//! the list as drawn (three in four tensors of a length that is not a multiple of 4) and
//! rounded up to multiples of 4, beside one tensor of all their elements, the drawn
//! tensors as views of one flat buffer (`FlatLayout`: each at a 256-byte boundary)
//! stepped as one tensor and as a list of views (span launches), LAMB and FRUGAL over the
//! tensors and over the views, and a 4-wide copy of the bytes (7 f32 streams).
//!
//! `cargo bench -p kiln-benches --bench optim_lists`.

use kiln::check::Rng;
use kiln::kernels::optim::{Block, Frugal, FrugalConfig, Hyper, MultiTensorStep, Rule};
use kiln::{Client, DType, Device, FlatLayout, HostTensor, Tensor};
use std::cell::RefCell;

#[path = "support/copy.rs"]
mod copy;
#[path = "support/data.rs"]
mod data;
#[path = "support/interleaved.rs"]
mod interleaved;
use interleaved::{interleaved, Variant};

/// A list of tensors with their gradients, one optimizer over all of them and one per
/// tensor.
struct List {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    multi: RefCell<MultiTensorStep>,
    single: RefCell<Vec<MultiTensorStep>>,
}

impl List {
    fn new(client: &Client, sizes: &[usize], rng: &mut Rng) -> List {
        let make = |rng: &mut Rng| -> Vec<Tensor> {
            sizes
                .iter()
                .map(|&s| data::normals(client, &[1, s], rng, 1.0))
                .collect()
        };
        List::of_list(make(rng), make(rng), Rule::AdamW)
    }

    /// One tensor (a flat buffer) and its gradient.
    fn of(param: Tensor, grad: Tensor) -> List {
        List::of_list(vec![param], vec![grad], Rule::AdamW)
    }

    fn of_list(params: Vec<Tensor>, grads: Vec<Tensor>, rule: Rule) -> List {
        let h = Hyper::defaults(rule);
        let list: Vec<(&Tensor, Block)> = params.iter().map(|p| (p, Block::whole(1))).collect();
        let multi = MultiTensorStep::new(rule, h, &list).unwrap();
        let single = params
            .iter()
            .map(|p| MultiTensorStep::new(rule, h, &[(p, Block::whole(1))]).unwrap())
            .collect();
        List {
            params,
            grads,
            multi: RefCell::new(multi),
            single: RefCell::new(single),
        }
    }

    fn step_multi(&self) {
        let p: Vec<&Tensor> = self.params.iter().collect();
        let g: Vec<&Tensor> = self.grads.iter().collect();
        self.multi.borrow_mut().step(&p, &g).unwrap();
    }

    fn step_each(&self) {
        let mut single = self.single.borrow_mut();
        for (o, (p, g)) in single.iter_mut().zip(self.params.iter().zip(&self.grads)) {
            o.step(&[p], &[g]).unwrap();
        }
    }
}

fn main() {
    let client = Client::open(&Device::from_env().unwrap()).expect("a device");
    eprintln!("{}", client.report());
    let mut rng = Rng::new(1);
    let drawn: Vec<usize> = (0..200).map(|i| 1 + (i * 7919) % 65_536).collect();
    let rounded: Vec<usize> = drawn.iter().map(|s| s.next_multiple_of(4)).collect();
    let total: usize = rounded.iter().sum();
    let ragged = List::new(&client, &drawn, &mut rng);
    let aligned = List::new(&client, &rounded, &mut rng);
    let one = List::new(&client, &[total], &mut rng);
    // The drawn tensors' values packed in one flat buffer each (params, grads).
    let shapes: Vec<Vec<usize>> = drawn.iter().map(|&s| vec![1, s]).collect();
    let layout = FlatLayout::new(DType::F32, &shapes).unwrap();
    let pack = |ts: &[Tensor]| {
        let hosts: Vec<HostTensor> = ts.iter().map(|t| t.download().unwrap()).collect();
        let flat = layout.upload(&client, &hosts).unwrap();
        flat.reshape(&[1, layout.len()]).unwrap()
    };
    let flat = List::of(pack(&ragged.params), pack(&ragged.grads));
    // The same two buffers' views as a list of 200 tensors: one span launch per kind
    // (the 4-wide bodies, the ragged tails).
    let view = |t: &Tensor| layout.views(&t.reshape(&[layout.len()]).unwrap()).unwrap();
    let views = List::of_list(view(&flat.params[0]), view(&flat.grads[0]), Rule::AdamW);
    // LAMB (per-tensor norms: three launches per group) over the same tensors, as 200
    // tensors of their own and as the views.
    let copies = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter()
            .map(|t| Tensor::upload(&client, &t.download().unwrap()).unwrap())
            .collect()
    };
    let lamb = List::of_list(copies(&ragged.params), copies(&ragged.grads), Rule::Lamb);
    let lamb_views = List::of_list(view(&flat.params[0]), view(&flat.grads[0]), Rule::Lamb);
    // FRUGAL (density 0.25, no redraw while timed) over the tensors and over the views.
    let frugal = |ts: Vec<Tensor>, gs: Vec<Tensor>| {
        let c = FrugalConfig {
            update_gap: 1 << 31,
            ..Default::default()
        };
        let refs: Vec<&Tensor> = ts.iter().collect();
        let f = Frugal::new_multi(&refs, Hyper::defaults(Rule::AdamW), c).unwrap();
        (ts, gs, RefCell::new(f))
    };
    let step_frugal = |(ts, gs, f): &(Vec<Tensor>, Vec<Tensor>, RefCell<Frugal>)| {
        let (p, g): (Vec<&Tensor>, Vec<&Tensor>) = (ts.iter().collect(), gs.iter().collect());
        f.borrow_mut().step_multi(&p, &g).unwrap();
    };
    let frugal_own = frugal(copies(&ragged.params), copies(&ragged.grads));
    let frugal_views = frugal(view(&flat.params[0]), view(&flat.grads[0]));
    let (src, dst) = (
        Tensor::empty(&client, DType::F32, &[total * 7 / 2 / 4 * 4]).unwrap(),
        Tensor::empty(&client, DType::F32, &[total * 7 / 2 / 4 * 4]).unwrap(),
    );
    let variants: Vec<Variant<'_>> = vec![
        (
            "copy of 7 streams".into(),
            Box::new(|| copy::copy(&src, &dst)),
        ),
        (
            "one tensor of all elements".into(),
            Box::new(|| one.step_multi()),
        ),
        (
            "drawn sizes: multi-tensor".into(),
            Box::new(|| ragged.step_multi()),
        ),
        (
            "drawn sizes: one flat buffer (1 launch)".into(),
            Box::new(|| flat.step_multi()),
        ),
        (
            "drawn sizes: views of one flat buffer, multi-tensor".into(),
            Box::new(|| views.step_multi()),
        ),
        (
            "drawn sizes: one launch per tensor".into(),
            Box::new(|| ragged.step_each()),
        ),
        (
            "LAMB, drawn sizes: multi-tensor".into(),
            Box::new(|| lamb.step_multi()),
        ),
        (
            "LAMB, drawn sizes: views of one flat buffer, multi-tensor".into(),
            Box::new(|| lamb_views.step_multi()),
        ),
        (
            "FRUGAL, drawn sizes: multi-tensor".into(),
            Box::new(|| step_frugal(&frugal_own)),
        ),
        (
            "FRUGAL, drawn sizes: views of one flat buffer, multi-tensor".into(),
            Box::new(|| step_frugal(&frugal_views)),
        ),
        (
            "sizes rounded to 4: multi-tensor".into(),
            Box::new(|| aligned.step_multi()),
        ),
        (
            "sizes rounded to 4: one launch per tensor".into(),
            Box::new(|| aligned.step_each()),
        ),
    ];
    let times = interleaved(&client, &variants);
    println!("AdamW over 200 tensors, {total} elements (rounded sizes)");
    println!("| variant | min | median | the copy's min / min |");
    println!("|---|---|---|---|");
    for (i, (name, _)) in variants.iter().enumerate() {
        let (min, median) = times[i];
        println!(
            "| {name} | {min:.2} ms | {median:.2} ms | {:.2} |",
            times[0].0 / min
        );
    }
}
