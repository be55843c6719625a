//! Many tensors in one flat buffer (`FlatLayout`, `Tensor::view`): views read and write
//! exactly their elements in any kernel (vector loads included), an element-wise
//! optimizer over the whole buffer is one tensor's step and matches the f64 reference
//! per tensor with the gaps left zero, a fused step over views of one buffer (LAMB's
//! per-tensor norms) matches it too, and bad input is one clear line.

use crate::common::{self, assert_clear, client, down, up};
use crate::optim::{hyper, zero_state};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::elementwise;
use kiln::kernels::matmul::{self, Epilogue};
use kiln::kernels::optim::{reference, Block, Frugal, Hyper, MultiTensorStep, Rule};
use kiln::kernels::rows::copy_rows;
use kiln::{DType, FlatLayout, HostTensor, Tensor};

/// Ragged sizes (not multiples of 4 or of the 64-element alignment), an empty tensor,
/// a matrix, and one past a page of 4096.
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![3],
        vec![64],
        vec![0],
        vec![37, 29],
        vec![1],
        vec![4099],
        vec![2, 65],
    ]
}

fn host(dtype: DType, shape: &[usize], rng: &mut Rng) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f64(dtype, shape.to_vec(), &rng.normals(n, 1.0)).unwrap()
}

#[test]
fn views_read_and_write_exactly_their_elements() {
    for dtype in [DType::F32, DType::F16] {
        if common::refused(dtype) {
            continue;
        }
        let mut rng = Rng::new(11);
        let layout = FlatLayout::new(dtype, &shapes()).unwrap();
        let align = kiln::VIEW_ALIGN_BYTES / dtype.size();
        assert!(layout.offsets().iter().all(|o| o % align == 0));
        let hosts: Vec<HostTensor> = shapes().iter().map(|s| host(dtype, s, &mut rng)).collect();
        let flat = layout.upload(client(), &hosts).unwrap();
        let views = layout.views(&flat).unwrap();
        // The layout downloads every tensor at once, and each view its own; the gaps
        // between them are zero.
        let back = layout.download(&flat).unwrap();
        assert!(back
            .iter()
            .zip(&hosts)
            .all(|(b, h)| b.shape == h.shape && b.data == h.data));
        for (v, h) in views.iter().zip(&hosts) {
            assert_eq!(v.shape(), &h.shape[..]);
            assert_eq!(v.download().unwrap().data, h.data, "{dtype} {:?}", h.shape);
        }
        let all = down(&flat);
        let owned = |i: usize| {
            layout
                .offsets()
                .iter()
                .zip(layout.shapes())
                .any(|(&o, s)| (o..o + s.iter().product::<usize>()).contains(&i))
        };
        assert!((0..all.len()).filter(|&i| !owned(i)).all(|i| all[i] == 0.0));
        // A kernel reads a view as a tensor of its own (silu, 4-wide where it can).
        for (v, h) in views.iter().zip(&hosts) {
            let got = down(&elementwise::silu(v).unwrap());
            let want = elementwise::reference::silu(&h.to_f64());
            let tol = if dtype == DType::F16 { 2e-3 } else { 1e-6 };
            assert!(
                max_rel_error(&got, &want, 1.0) <= tol,
                "{dtype} {:?}",
                h.shape
            );
        }
        // A matmul with a view as `b` ([37, 29] at a 256-byte boundary: vector loads).
        let a = host(dtype, &[5, 37], &mut rng);
        let c = matmul::matmul(
            &Tensor::upload(client(), &a).unwrap(),
            &views[3],
            false,
            Epilogue::default(),
        )
        .unwrap();
        let want = matmul::reference::matmul(
            &a.to_f64(),
            &hosts[3].to_f64(),
            5,
            29,
            37,
            false,
            None,
            "none",
            None,
        );
        let tol = if dtype == DType::F16 { 2e-2 } else { 1e-5 };
        assert!(
            max_rel_error(&down(&c), &want, 1.0) <= tol,
            "{dtype} matmul"
        );
        // Writing through a view changes its elements of the buffer and nothing else.
        let new = host(dtype, &[2, 65], &mut rng);
        let src = Tensor::upload(client(), &new).unwrap();
        copy_rows(&src, 0, 0, &views[6], 0, 2).unwrap();
        let before = all;
        let after = down(&flat);
        let (o, n) = (layout.offsets()[6], 130);
        for i in 0..after.len() {
            match (o..o + n).contains(&i) {
                true => assert_eq!(after[i], new.to_f64()[i - o]),
                false => assert_eq!(after[i].to_bits(), before[i].to_bits(), "element {i}"),
            }
        }
    }
}

#[test]
fn views_overlap_only_where_they_share_elements() {
    let flat = Tensor::zeros(client(), DType::F32, &[512]).unwrap();
    let a = flat.view(0, &[64]).unwrap();
    let b = flat.view(64, &[2, 32]).unwrap();
    let c = flat.view(0, &[128]).unwrap();
    let other = Tensor::zeros(client(), DType::F32, &[512]).unwrap();
    assert!(!a.overlaps(&b) && !b.overlaps(&a));
    assert!(a.overlaps(&c) && b.overlaps(&c) && c.overlaps(&flat));
    assert!(a.overlaps(&a) && a.overlaps(&a.clone()));
    assert!(!a.overlaps(&other.view(0, &[64]).unwrap()));
    // A view of a view starts where the two offsets add up.
    let d = flat.view(128, &[256]).unwrap().view(64, &[64]).unwrap();
    assert!(d.overlaps(&flat.view(192, &[1]).unwrap()));
    assert!(!d.overlaps(&flat.view(256, &[64]).unwrap()));
    assert!(!flat.view(0, &[0]).unwrap().overlaps(&flat));
}

/// `Tensor::written_overlap` (a sweep) against the pairwise definition, over random
/// lists of views of two buffers, some identical, some overlapping in part.
#[test]
fn written_overlap_finds_a_pair_exactly_where_one_exists() {
    let bufs = [
        Tensor::zeros(client(), DType::F32, &[1024]).unwrap(),
        Tensor::zeros(client(), DType::F32, &[1024]).unwrap(),
    ];
    let mut rng = Rng::new(3);
    let pick = |rng: &mut Rng, n: usize| (rng.normals(1, 1.0)[0].abs() * 1e6) as usize % n;
    let view = |rng: &mut Rng| {
        let b = &bufs[pick(rng, 2)];
        let at = 64 * pick(rng, 12);
        b.view(at, &[1 + pick(rng, 200)]).unwrap()
    };
    let mut outcomes = [0usize; 2];
    for case in 0..400 {
        let count = 1 + pick(&mut rng, 6);
        let written: Vec<Tensor> = (0..count).map(|_| view(&mut rng)).collect();
        let read: Vec<Tensor> = (0..count)
            .map(|i| match pick(&mut rng, 3) {
                0 => written[i].clone(),
                _ => view(&mut rng),
            })
            .collect();
        let (w, r): (Vec<&Tensor>, Vec<&Tensor>) =
            (written.iter().collect(), read.iter().collect());
        let own = |i: usize| !r[i].overlaps_partly(w[i]) && r[i].overlaps(w[i]);
        // A read tensor that is exactly its own written tensor's elements is not counted
        // (another weight overlapping it is stepped in another launch).
        let brute = (0..count).any(|j| !own(j) && (0..count).any(|i| w[i].overlaps(r[j])));
        let found = Tensor::written_overlap(&w, &r);
        assert_eq!(found.is_some(), brute, "case {case}");
        outcomes[brute as usize] += 1;
        if let Some((i, j)) = found {
            assert!(w[i].overlaps(r[j]) && !own(j), "case {case}: ({i}, {j})");
        }
    }
    // Both outcomes, many times each.
    assert!(outcomes.iter().all(|&n| n >= 40), "{outcomes:?}");
}

/// Five steps of an element-wise rule over the whole flat buffer as one tensor (one
/// slot, one launch a step) against the reference stepped per tensor; the gaps (zero
/// weights, zero gradients) stay exactly zero.
#[test]
fn one_step_over_a_flat_buffer_is_every_tensors_step() {
    for rule in [Rule::AdamW, Rule::Adan, Rule::AdaBelief, Rule::AdaGrad] {
        let h = hyper(rule);
        let mut rng = Rng::new(5 + rule as u64);
        let layout = FlatLayout::new(DType::F32, &shapes()).unwrap();
        let hosts: Vec<HostTensor> = shapes()
            .iter()
            .map(|s| host(DType::F32, s, &mut rng))
            .collect();
        let mut params: Vec<Vec<f64>> = hosts.iter().map(|h| h.to_f64()).collect();
        let flat = layout.upload(client(), &hosts).unwrap();
        let weight = flat.reshape(&[1, layout.len()]).unwrap();
        let mut opt = MultiTensorStep::new(rule, h, &[(&weight, Block::whole(1))]).unwrap();
        let mut state: Vec<Vec<Vec<f64>>> =
            params.iter().map(|p| zero_state(rule, p.len())).collect();
        for t in 1..=5u64 {
            let grads: Vec<HostTensor> = shapes()
                .iter()
                .map(|s| host(DType::F32, s, &mut rng))
                .collect();
            let g = layout.upload(client(), &grads).unwrap();
            let g = g.reshape(&[1, layout.len()]).unwrap();
            opt.step(&[&weight], &[&g]).unwrap();
            // One launch (the layout's length is 4-aligned: no tail) and the counter's.
            assert_eq!(opt.launches(), 2, "{rule:?}");
            for (i, gi) in grads.iter().enumerate() {
                reference::step(rule, &h, t, &mut params[i], &gi.to_f64(), &mut state[i]);
            }
        }
        let all = down(&flat);
        for (i, v) in layout.views(&flat).unwrap().iter().enumerate() {
            let floor = params[i].iter().fold(1e-30f64, |a, b| a.max(b.abs()));
            let err = max_rel_error(&down(v), &params[i], floor);
            assert!(err <= 1e-6, "{rule:?} tensor {i}: {err:.2e}");
        }
        let owned: usize = shapes().iter().map(|s| s.iter().product::<usize>()).sum();
        let zeros = all.iter().filter(|&&x| x == 0.0).count();
        assert!(zeros >= layout.len() - owned, "{rule:?}: a gap moved");
    }
}

/// Every rule over views of one buffer, more than six of them, ragged and 4-aligned,
/// f32 and f16 (with master copies): with the gradients views of one buffer at the same
/// offsets one launch takes them all (a span launch; LAMB's and AdaGrad-Norm's norms per
/// tensor), with the gradients laid out otherwise six to a launch; five steps, each
/// tensor within 1e-6 of the reference stepped alone (f16: of its rounding).
#[test]
fn a_fused_step_over_views_of_one_buffer_matches_each_tensors_step() {
    for (rule, dtype, same_layout) in Rule::ALL.into_iter().flat_map(|r| {
        [
            (r, DType::F32, true),
            (r, DType::F32, false),
            (r, DType::F16, true),
        ]
    }) {
        if common::refused(dtype) {
            continue;
        }
        let h = hyper(rule);
        let mut rng = Rng::new(23 + rule as u64);
        let shapes: Vec<Vec<usize>> = (0..9).map(|i| vec![1, 61 * i + 4 * (i % 2) + 3]).collect();
        let layout = FlatLayout::new(dtype, &shapes).unwrap();
        let hosts: Vec<HostTensor> = shapes.iter().map(|s| host(dtype, s, &mut rng)).collect();
        let mut params: Vec<Vec<f64>> = hosts.iter().map(|h| h.to_f64()).collect();
        let flat = layout.upload(client(), &hosts).unwrap();
        let views = layout.views(&flat).unwrap();
        let list: Vec<(&Tensor, Block)> = views.iter().map(|v| (v, Block::whole(1))).collect();
        let mut opt = MultiTensorStep::new(rule, h, &list).unwrap();
        let mut state: Vec<Vec<Vec<f64>>> =
            params.iter().map(|p| zero_state(rule, p.len())).collect();
        // The gradients' buffer: the same layout, or the list reversed (other offsets).
        let mut g_shapes = shapes.clone();
        if !same_layout {
            g_shapes.reverse();
        }
        let g_layout = FlatLayout::new(dtype, &g_shapes).unwrap();
        for t in 1..=5u64 {
            let grads: Vec<HostTensor> = shapes.iter().map(|s| host(dtype, s, &mut rng)).collect();
            let mut g_hosts = grads.clone();
            if !same_layout {
                g_hosts.reverse();
            }
            let g_flat = g_layout.upload(client(), &g_hosts).unwrap();
            let mut g_views = g_layout.views(&g_flat).unwrap();
            if !same_layout {
                g_views.reverse();
            }
            opt.step(
                &views.iter().collect::<Vec<_>>(),
                &g_views.iter().collect::<Vec<_>>(),
            )
            .unwrap();
            // Span launches: one (three with per-tensor norms) per vector width, and the
            // counter's; six to a launch otherwise, at least five launches for the nine.
            let per = if rule.needs_norms() { 3 } else { 1 };
            match same_layout {
                true => assert!(opt.launches() <= 1 + 2 * per, "{rule:?} {}", opt.launches()),
                false => assert!(opt.launches() >= 3, "{rule:?} {}", opt.launches()),
            }
            for (i, g) in grads.iter().enumerate() {
                reference::step(rule, &h, t, &mut params[i], &g.to_f64(), &mut state[i]);
            }
        }
        for (i, v) in views.iter().enumerate() {
            let want = HostTensor::from_f64(dtype, shapes[i].clone(), &params[i])
                .unwrap()
                .to_f64();
            let floor = want.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
            let tol = if dtype == DType::F16 { 1e-3 } else { 1e-6 };
            let err = max_rel_error(&down(v), &want, floor);
            assert!(
                err <= tol,
                "{rule:?} {dtype} same layout {same_layout}, tensor {i}: {err:.2e}"
            );
        }
    }
}

/// FRUGAL over views of one buffer (gradients at the same offsets: one launch per pass
/// and vector width) across a redraw: bit for bit what the same optimizer gives over
/// tensors of their own (six per launch), and within 1e-6 of the reference.
#[test]
fn frugal_over_views_of_one_buffer_is_frugal_over_the_tensors() {
    let (h, c) = (crate::frugal::hyper(), crate::frugal::list_config());
    let mut rng = Rng::new(41);
    let shapes: Vec<Vec<usize>> = (0..9).map(|i| vec![61 * i + 4 * (i % 2) + 3]).collect();
    let layout = FlatLayout::new(DType::F32, &shapes).unwrap();
    let hosts: Vec<HostTensor> = shapes
        .iter()
        .map(|s| host(DType::F32, s, &mut rng))
        .collect();
    let mut p: Vec<Vec<f64>> = hosts.iter().map(|h| h.to_f64()).collect();
    let flat = layout.upload(client(), &hosts).unwrap();
    let views = layout.views(&flat).unwrap();
    let own: Vec<Tensor> = hosts
        .iter()
        .map(|h| Tensor::upload(client(), h).unwrap())
        .collect();
    let (vr, or): (Vec<&Tensor>, Vec<&Tensor>) = (views.iter().collect(), own.iter().collect());
    let mut on_views = Frugal::new_multi(&vr, h, c).unwrap();
    let mut on_own = Frugal::new_multi(&or, h, c).unwrap();
    let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); shapes.len()];
    for step in 1..=5u64 {
        let grads: Vec<HostTensor> = shapes
            .iter()
            .map(|s| host(DType::F32, s, &mut rng))
            .collect();
        let g_flat = layout.upload(client(), &grads).unwrap();
        let g_views = layout.views(&g_flat).unwrap();
        let g_own: Vec<Tensor> = grads
            .iter()
            .map(|g| Tensor::upload(client(), g).unwrap())
            .collect();
        on_views
            .step_multi(&vr, &g_views.iter().collect::<Vec<_>>())
            .unwrap();
        on_own
            .step_multi(&or, &g_own.iter().collect::<Vec<_>>())
            .unwrap();
        // Two passes per vector width (of two) and the counter's, against two per six
        // tensors of a width.
        assert!(on_views.launches() <= 5, "{}", on_views.launches());
        assert!(
            on_own.launches() > on_views.launches(),
            "{}",
            on_own.launches()
        );
        let g: Vec<Vec<f64>> = grads.iter().map(|g| g.to_f64()).collect();
        reference::frugal_step_list(&h, &c, step, &shapes, &mut p, &g, &mut refstate);
    }
    for i in 0..shapes.len() {
        let got = down(&views[i]);
        assert_eq!(got, down(&own[i]), "tensor {i}: views and tensors differ");
        let floor = p[i].iter().fold(1e-30f64, |a, b| a.max(b.abs()));
        let err = max_rel_error(&got, &p[i], floor);
        assert!(err <= 1e-6, "tensor {i}: {err:.2e}");
    }
}

/// Two views of the same elements in one list are stepped one after the other (two
/// launches), each with its own state, as two listed tensors are; in one launch the
/// two bindings would race and one update would be lost.
#[test]
fn overlapping_views_in_one_list_are_stepped_in_turn() {
    let rule = Rule::AdamW;
    let h = Hyper {
        lr: 0.01,
        ..Hyper::defaults(rule)
    };
    let mut rng = Rng::new(31);
    let n = 4096;
    let mut p = rng.normals(n, 1.0);
    let flat = up(DType::F32, &[n], &p);
    let (a, b) = (
        flat.view(0, &[1, n]).unwrap(),
        flat.view(0, &[1, n]).unwrap(),
    );
    let mut opt =
        MultiTensorStep::new(rule, h, &[(&a, Block::whole(1)), (&b, Block::whole(1))]).unwrap();
    let g: Vec<Vec<f64>> = (0..2).map(|_| rng.normals(n, 1.0)).collect();
    let gt: Vec<Tensor> = g.iter().map(|g| up(DType::F32, &[1, n], g)).collect();
    opt.step(&[&a, &b], &[&gt[0], &gt[1]]).unwrap();
    for gi in &g {
        let mut state: Vec<Vec<f64>> = (0..2).map(|_| vec![0.0; n]).collect();
        reference::step(rule, &h, 1, &mut p, gi, &mut state);
    }
    let err = max_rel_error(&down(&flat), &p, 1.0);
    assert!(err <= 1e-6, "{err:.2e}");
}

#[test]
fn bad_views_and_layouts_are_one_clear_line() {
    let flat = Tensor::zeros(client(), DType::F32, &[256]).unwrap();
    assert_clear(
        flat.view(3, &[4]).unwrap_err(),
        &["offset", "multiple of 64 f32 elements", "found `3 (byte 12"],
    );
    assert_clear(
        flat.view(192, &[65]).unwrap_err(),
        &["view", "within the tensor's 256", "elements 192..257"],
    );
    assert_clear(
        flat.view(usize::MAX, &[1]).unwrap_err(),
        &["view", "within the tensor's 256"],
    );
    let layout = FlatLayout::new(DType::F16, &[vec![3], vec![2, 2]]).unwrap();
    assert_eq!(layout.offsets(), &[0, 128]);
    assert_eq!(layout.len(), 256);
    assert_clear(
        layout.views(&flat).unwrap_err(),
        &["flat buffer", "f16", "f32"],
    );
    let f16 = Tensor::zeros(client(), DType::F16, &[100]).unwrap();
    assert_clear(
        layout.views(&f16).unwrap_err(),
        &["flat buffer", "[256]", "[100]"],
    );
    assert_clear(
        layout.download(&f16).unwrap_err(),
        &["flat buffer", "[256]", "[100]"],
    );
    let t = |dtype, shape: &[usize]| {
        HostTensor::from_f64(dtype, shape.to_vec(), &vec![0.0; shape.iter().product()]).unwrap()
    };
    assert_clear(
        layout.upload(client(), &[t(DType::F16, &[3])]).unwrap_err(),
        &["tensors", "one per shape of the layout, 2", "found `1`"],
    );
    assert_clear(
        layout
            .upload(client(), &[t(DType::F16, &[3]), t(DType::F16, &[4])])
            .unwrap_err(),
        &["tensors[1]", "[2, 2]", "[4]"],
    );
    assert_clear(
        layout
            .upload(client(), &[t(DType::F32, &[3]), t(DType::F16, &[2, 2])])
            .unwrap_err(),
        &["tensors[0]", "f16", "f32"],
    );
    assert_clear(
        FlatLayout::new(DType::F32, &[vec![1 << 30], vec![1 << 30]]).unwrap_err(),
        &["flat buffer", "32-bit indexing"],
    );
    // A kernel that writes one view and reads another overlapping it in part is refused
    // (every `#[kiln::kernel]` launch): a copy within one buffer; and an optimizer refuses
    // a gradient over a weight, in part or over another weight's exact elements.
    let (src, dst) = (
        flat.view(0, &[2, 64]).unwrap(),
        flat.view(64, &[2, 64]).unwrap(),
    );
    assert_clear(
        copy_rows(&src, 0, 0, &dst, 0, 2).unwrap_err(),
        &[
            "copy_rows",
            "`dst`",
            "overlaps `src` in part",
            "writes `dst`",
        ],
    );
    let w = flat.view(0, &[1, 128]).unwrap();
    let g = flat.view(64, &[1, 128]).unwrap();
    let mut opt = MultiTensorStep::new(
        Rule::AdamW,
        Hyper::defaults(Rule::AdamW),
        &[(&w, Block::whole(1))],
    )
    .unwrap();
    assert_clear(
        opt.step(&[&w], &[&g]).unwrap_err(),
        &[
            "grad",
            "no element shared with param",
            "same elements of one buffer",
        ],
    );
    // Two weights, the second's gradient exactly the first weight: refused too (the
    // first's launch would write what the second's reads); its own weight's exact
    // elements are allowed (a step by the weight itself).
    let (w0, w1) = (
        flat.view(0, &[1, 64]).unwrap(),
        flat.view(64, &[1, 64]).unwrap(),
    );
    let list = [(&w0, Block::whole(1)), (&w1, Block::whole(1))];
    let mut opt = MultiTensorStep::new(Rule::AdamW, Hyper::defaults(Rule::AdamW), &list).unwrap();
    assert_clear(
        opt.step(&[&w0, &w1], &[&w1, &w0]).unwrap_err(),
        &["grad[1]", "no element shared with param[0]"],
    );
    opt.step(&[&w0, &w1], &[&w0, &w1]).unwrap();
    // The same elements twice are an in-place binding, allowed.
    copy_rows(&src, 0, 0, &src.clone(), 0, 2).unwrap();
}
