//! S²FT against the f64 reference written from the spec: three S²FT steps of a SwiGLU
//! FFN against masked full fine-tuning of the unpermuted model (within 1e-6), exact
//! co-permutation, the layer check for the FFN and grouped-query attention, selection
//! strategies, partial backprop at ragged sizes in f32 and f16, the multi-block AdamW
//! (and PyTorch's AdamW vector), serving many fine-tunes, and bad input.

use crate::common::{self, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::s2ft::{
    ffn_forward, reference as rf, s2ft_adapter_forward, s2ft_merge, s2ft_partial_backward,
    s2ft_permute, s2ft_permute_ffn, s2ft_permute_in_place, s2ft_save_slice, s2ft_select,
    s2ft_verify_attention, s2ft_verify_ffn, swiglu_backward, AdamWConfig, AttentionWeights, Axis,
    Block, FfnWeights, HeadLayout, S2ftAdamW, S2ftPermutation, Strategy,
};
use kiln::{DType, HostTensor, Tensor};

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
    common::client()
}

fn weight(rng: &mut Rng, r: usize, c: usize) -> Vec<f64> {
    let v = rng.normals(r * c, 1.0 / (c as f64).sqrt());
    HostTensor::from_f64(DType::F32, vec![r * c], &v)
        .unwrap()
        .to_f64()
}

fn f32s(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    let v = rng.normals(n, scale);
    HostTensor::from_f64(DType::F32, vec![n], &v)
        .unwrap()
        .to_f64()
}

fn t32(shape: &[usize], v: &[f64]) -> Tensor {
    up(DType::F32, shape, v)
}

#[test]
fn three_s2ft_steps_match_masked_full_fine_tuning_of_the_unpermuted_ffn() {
    let (t, d, f) = (13, 16, 24);
    let mut rng = Rng::new(0x5253);
    let x = f32s(&mut rng, t * d, 1.0);
    let target = f32s(&mut rng, t * d, 0.5);
    let ffn0 = rf::Ffn {
        d,
        f,
        w_up: weight(&mut rng, f, d),
        w_gate: weight(&mut rng, f, d),
        w_down: weight(&mut rng, d, f),
    };
    let perm = s2ft_select(f, 1, 5, 6, &Strategy::Random { seed: 7 }).unwrap();
    assert!(perm.shared + perm.a_only == 5 && perm.shared + perm.b_only == 6);
    let a: Vec<usize> = perm.perm[perm.row_block()].to_vec();
    let b: Vec<usize> = perm.perm[perm.col_block()].to_vec();
    let cfg = AdamWConfig {
        lr: 0.02,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };

    // kiln: permute, then three steps of partial backprop + in-place AdamW.
    let (wu, wg, wd) = (
        t32(&[f, d], &ffn0.w_up),
        t32(&[f, d], &ffn0.w_gate),
        t32(&[d, f], &ffn0.w_down),
    );
    let orig = FfnWeights {
        w_up: &wu,
        w_gate: &wg,
        w_down: &wd,
    };
    let [pu, pg, pd] = s2ft_permute_ffn(&orig, &perm).unwrap();
    let r = perm.row_block().end;
    let (s, e) = (perm.col_block().start, perm.col_block().end);
    let rows = Block::Rows { start: 0, end: r };
    let cols = Block::Columns { start: s, end: e };
    let mut opt = S2ftAdamW::new(&[(&pu, rows), (&pg, rows), (&pd, cols)], cfg).unwrap();
    let xt = t32(&[t, d], &x);
    for _ in 0..3 {
        let w = FfnWeights {
            w_up: &pu,
            w_gate: &pg,
            w_down: &pd,
        };
        let (y, acts) = ffn_forward(&xt, &w).unwrap();
        let h_slice = s2ft_save_slice(&acts.h, s, e).unwrap();
        drop(acts.h); // only the slice is kept for the down projection
        let dy: Vec<f64> = down(&y)
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b) / t as f64)
            .collect();
        let dy = t32(&[t, d], &dy);
        let (d_down, dh) = s2ft_partial_backward(&dy, &h_slice, Some(&pd), cols).unwrap();
        let (d_gate, d_up) = swiglu_backward(&dh.unwrap(), &acts.gate, &acts.up).unwrap();
        let (d_wu, _) = s2ft_partial_backward(&d_up, &xt, None, rows).unwrap();
        let (d_wg, _) = s2ft_partial_backward(&d_gate, &xt, None, rows).unwrap();
        opt.step(&[&pu, &pg, &pd], &[&d_wu, &d_wg, &d_down])
            .unwrap();
    }
    let inv = perm.inverted();
    let back = FfnWeights {
        w_up: &pu,
        w_gate: &pg,
        w_down: &pd,
    };
    let [bu, bg, bd] = s2ft_permute_ffn(&back, &inv).unwrap();

    // Reference: masked full fine-tuning of the unpermuted FFN in f64.
    let mut ffn = ffn0.clone();
    rf::masked_fine_tune(&mut ffn, &x, &target, t, &a, &b, 3, &cfg);
    for (name, got, want) in [
        ("w_up", &bu, &ffn.w_up),
        ("w_gate", &bg, &ffn.w_gate),
        ("w_down", &bd, &ffn.w_down),
    ] {
        let err = max_rel_error(&down(got), want, 1.0);
        assert!(err <= 1e-6, "{name}: {err:.2e}");
    }
    // Untrained weights are bitwise untouched.
    let got_up = down(&bu);
    for row in (0..f).filter(|u| !a.contains(u)) {
        assert_eq!(
            got_up[row * d..(row + 1) * d],
            ffn0.w_up[row * d..(row + 1) * d],
            "row {row}"
        );
    }
    let (y_ref, ..) = ffn.forward(&x, t);
    let w = FfnWeights {
        w_up: &pu,
        w_gate: &pg,
        w_down: &pd,
    };
    let (y, _) = ffn_forward(&xt, &w).unwrap();
    let err = max_rel_error(&down(&y), &y_ref, 1.0);
    assert!(err <= 1e-6, "outputs: {err:.2e}");
}

#[test]
fn co_permutation_is_exact_and_in_place_equals_out_of_place() {
    let mut rng = Rng::new(11);
    let (rows, cols) = (4 * 6, 10);
    let w = t32(&[rows, cols], &f32s(&mut rng, rows * cols, 1.0));
    let perm = S2ftPermutation::from_sets(4, &[2], &[3, 2]).unwrap();
    assert_eq!(perm.perm, vec![2, 3, 0, 1]);
    for axis in [Axis::Rows, Axis::Columns] {
        let (unit, w) = match axis {
            Axis::Rows => (6, w.clone()),
            Axis::Columns => (1, t32(&[cols, 4], &down(&w)[..cols * 4])),
        };
        let p = s2ft_permute("w", &w, &perm, unit, axis, "unit_size").unwrap();
        let back = s2ft_permute("w", &p, &perm.inverted(), unit, axis, "unit_size").unwrap();
        assert_eq!(down(&back), down(&w), "{axis:?}: inverse restores bitwise");
        let inplace = t32(w.shape(), &down(&w));
        s2ft_permute_in_place("w", &inplace, &perm, unit, axis, "unit_size").unwrap();
        assert_eq!(down(&inplace), down(&p), "{axis:?}: in place");
    }
    // A GEMM whose output dimension is permuted gives bitwise the permuted output.
    let x = t32(&[7, cols], &f32s(&mut rng, 7 * cols, 1.0));
    let p = s2ft_permute("w", &w, &perm, 6, Axis::Rows, "unit_size").unwrap();
    let mm = |w: &Tensor| kiln::kernels::matmul::matmul(&x, w, true, Default::default()).unwrap();
    let (y, yp) = (down(&mm(&w)), down(&mm(&p)));
    let want = rf::permute(&y, 7, rows, &perm.perm, 6, true);
    assert_eq!(yp, want);
}

#[test]
fn the_permuted_ffn_and_gqa_attention_compute_the_same_function() {
    let mut rng = Rng::new(3);
    let (t, d, f) = (19, 32, 43);
    let x = t32(&[t, d], &f32s(&mut rng, t * d, 1.0));
    let (wu, wg, wd) = (
        t32(&[f, d], &weight(&mut rng, f, d)),
        t32(&[f, d], &weight(&mut rng, f, d)),
        t32(&[d, f], &weight(&mut rng, d, f)),
    );
    let perm = s2ft_select(f, 1, 4, 3, &Strategy::Random { seed: 1 }).unwrap();
    let ffn = FfnWeights {
        w_up: &wu,
        w_gate: &wg,
        w_down: &wd,
    };
    let r = s2ft_verify_ffn(&ffn, &perm, &x).unwrap();
    assert!(r.passed(), "ffn: {} > {}", r.max_abs_diff, r.bound);

    // 8 query heads over 2 KV heads of 8: units are KV groups.
    let heads = HeadLayout {
        heads: 8,
        kv_heads: 2,
        head_dim: 8,
    };
    let (q, kv) = (8 * 8, 2 * 8);
    let (wq, wk, wv, wo) = (
        t32(&[q, d], &weight(&mut rng, q, d)),
        t32(&[kv, d], &weight(&mut rng, kv, d)),
        t32(&[kv, d], &weight(&mut rng, kv, d)),
        t32(&[d, q], &weight(&mut rng, d, q)),
    );
    let w = AttentionWeights {
        w_q: &wq,
        w_k: &wk,
        w_v: &wv,
        w_o: &wo,
    };
    let perm = S2ftPermutation::from_sets(2, &[1], &[1]).unwrap();
    assert_eq!(perm.perm, vec![1, 0]);
    for causal in [false, true] {
        let r = s2ft_verify_attention(&w, &heads, &perm, &x, causal).unwrap();
        assert!(
            r.passed(),
            "attention causal={causal}: {} > {}",
            r.max_abs_diff,
            r.bound
        );
    }
}

#[test]
fn selection_strategies_pick_what_the_spec_says() {
    // Random: reproducible, distinct, the right counts.
    let p = s2ft_select(50, 1, 7, 9, &Strategy::Random { seed: 42 }).unwrap();
    assert_eq!(
        p,
        s2ft_select(50, 1, 7, 9, &Strategy::Random { seed: 42 }).unwrap()
    );
    assert_ne!(
        p,
        s2ft_select(50, 1, 7, 9, &Strategy::Random { seed: 43 }).unwrap()
    );
    assert_eq!((p.a_only + p.shared, p.shared + p.b_only), (7, 9));
    let mut sorted = p.perm.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    for (u, &pos) in p.inverse.iter().enumerate() {
        assert_eq!(p.perm[pos], u);
    }

    // Explicit: the order A-only, shared, B-only, rest.
    let p = s2ft_select(
        8,
        1,
        3,
        2,
        &Strategy::Explicit {
            a: &[6, 1, 3],
            b: &[3, 0],
        },
    )
    .unwrap();
    assert_eq!(p.perm, vec![1, 6, 3, 0, 2, 4, 5, 7]);
    assert_eq!((p.row_block(), p.col_block()), (0..3, 2..4));

    // Weight norm over units of 3 rows / columns, against host norms.
    let mut rng = Rng::new(5);
    let (u, unit, c) = (9, 3, 11);
    let rw = f32s(&mut rng, u * unit * c, 1.0);
    let cw = f32s(&mut rng, c * u * unit, 1.0);
    let rt = t32(&[u * unit, c], &rw);
    let ct = t32(&[c, u * unit], &cw);
    let p = s2ft_select(
        u,
        unit,
        2,
        4,
        &Strategy::WeightNorm {
            row_weight: &rt,
            col_weight: &ct,
        },
    )
    .unwrap();
    let row_norm: Vec<f64> = (0..u)
        .map(|k| {
            rw[k * unit * c..(k + 1) * unit * c]
                .iter()
                .map(|x| x * x)
                .sum()
        })
        .collect();
    let col_norm: Vec<f64> = (0..u)
        .map(|k| {
            (0..c)
                .flat_map(|i| (0..unit).map(move |j| (i, j)))
                .map(|(i, j)| cw[i * u * unit + k * unit + j].powi(2))
                .sum()
        })
        .collect();
    let top = |s: &[f64], n: usize| {
        let mut o: Vec<usize> = (0..s.len()).collect();
        o.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        o.truncate(n);
        o
    };
    assert_eq!(p.perm, rf::order(u, &top(&row_norm, 2), &top(&col_norm, 4)));

    // Activation: mean |a| per unit of a calibration batch, both sets.
    let act = f32s(&mut rng, 20 * u * unit, 1.0);
    let at = t32(&[20, u * unit], &act);
    let p = s2ft_select(u, unit, 3, 2, &Strategy::Activation { activations: &at }).unwrap();
    let score: Vec<f64> = (0..u)
        .map(|k| {
            (0..20)
                .flat_map(|i| (0..unit).map(move |j| (i, j)))
                .map(|(i, j)| act[i * u * unit + k * unit + j].abs())
                .sum()
        })
        .collect();
    assert_eq!(p.perm, rf::order(u, &top(&score, 3), &top(&score, 2)));
    assert_eq!(p.shared, 2);
}

#[test]
fn partial_backprop_at_ragged_sizes_in_f32_and_f16() {
    let mut rng = Rng::new(9);
    let (t, out, inp) = (37, 29, 23);
    for dtype in [DType::F32, DType::F16] {
        if crate::common::refused(dtype) {
            continue;
        }
        let r = |v: Vec<f64>| {
            HostTensor::from_f64(dtype, vec![v.len()], &v)
                .unwrap()
                .to_f64()
        };
        let dy = r(rng.normals(t * out, 1.0));
        let x = r(rng.normals(t * inp, 1.0));
        let w = r(rng.normals(out * inp, 1.0));
        let (dyt, xt, wt) = (
            up(dtype, &[t, out], &dy),
            up(dtype, &[t, inp], &x),
            up(dtype, &[out, inp], &w),
        );
        let tol = 4.0 * dtype.epsilon() * (t as f64).sqrt();
        // Row block 5..17.
        let (dd, dx) =
            s2ft_partial_backward(&dyt, &xt, Some(&wt), Block::Rows { start: 5, end: 17 }).unwrap();
        let want = rf::weight_grad(&rf::columns(&dy, t, out, 5, 17), &x, t, 12, inp);
        assert_eq!(dd.shape(), [12, inp]);
        let err = max_rel_error(&down(&dd), &want, 1.0);
        assert!(err <= tol, "{dtype} rows: {err:.2e}");
        let err = max_rel_error(
            &down(&dx.unwrap()),
            &rf::input_grad(&dy, &w, t, out, inp),
            1.0,
        );
        assert!(
            err <= 4.0 * dtype.epsilon() * (out as f64).sqrt(),
            "{dtype} dx: {err:.2e}"
        );
        // Column block 3..11 from the saved slice only.
        let slice = s2ft_save_slice(&xt, 3, 11).unwrap();
        assert_eq!(down(&slice), rf::columns(&x, t, inp, 3, 11));
        let (dd, dx) =
            s2ft_partial_backward(&dyt, &slice, None, Block::Columns { start: 3, end: 11 })
                .unwrap();
        assert!(dx.is_none());
        let want = rf::weight_grad(&dy, &rf::columns(&x, t, inp, 3, 11), t, out, 8);
        let err = max_rel_error(&down(&dd), &want, 1.0);
        assert!(err <= tol, "{dtype} columns: {err:.2e}");
    }
}

#[test]
fn adamw_updates_blocks_of_several_weights_in_place_like_the_reference() {
    let mut rng = Rng::new(21);
    let cfg = AdamWConfig {
        lr: 0.01,
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    // Seven blocks of six weights: rows, strided columns, a one-row block, two more f32
    // weights (six f32 blocks, one launch), a second block of weight 0 (the same
    // `&Tensor` again: a second launch), and an f16 weight with its f32 master copy.
    let shapes = [[7, 9], [5, 13], [3, 4], [4, 4], [9, 2], [6, 8]];
    let dtypes = [
        DType::F32,
        DType::F32,
        DType::F32,
        DType::F32,
        DType::F32,
        DType::F16,
    ];
    let blocks: [(usize, Block); 7] = [
        (0, Block::Rows { start: 2, end: 5 }),
        (1, Block::Columns { start: 4, end: 11 }),
        (2, Block::Rows { start: 2, end: 3 }),
        (3, Block::Columns { start: 0, end: 4 }),
        (4, Block::Columns { start: 1, end: 2 }),
        (0, Block::Rows { start: 5, end: 7 }),
        (5, Block::Columns { start: 1, end: 6 }),
    ];
    let mut master: Vec<Vec<f64>> = shapes
        .iter()
        .zip(&dtypes)
        .map(|(s, &dt)| {
            let v = rng.normals(s[0] * s[1], 1.0);
            HostTensor::from_f64(dt, vec![v.len()], &v)
                .unwrap()
                .to_f64()
        })
        .collect();
    let ws: Vec<Tensor> = master
        .iter()
        .zip(&shapes)
        .zip(&dtypes)
        .map(|((h, s), &dt)| up(dt, s, h))
        .collect();
    let list: Vec<(&Tensor, Block)> = blocks.iter().map(|&(w, b)| (&ws[w], b)).collect();
    let weights: Vec<&Tensor> = list.iter().map(|(w, _)| *w).collect();
    let mut opt = S2ftAdamW::new(&list, cfg).unwrap();
    let block_shape = |(w, b): &(usize, Block)| b.shape(shapes[*w][0], shapes[*w][1]);
    let mut m: Vec<Vec<f64>> = blocks
        .iter()
        .map(|wb| vec![0.0; block_shape(wb).iter().product()])
        .collect();
    let mut v = m.clone();
    for step in 1..=4u64 {
        let grads: Vec<Vec<f64>> = blocks
            .iter()
            .map(|wb| {
                let n = block_shape(wb).iter().product();
                // Step 2 has zero gradients: decay and momentum only.
                let g = if step == 2 {
                    vec![0.0; n]
                } else {
                    rng.normals(n, 1.0)
                };
                HostTensor::from_f64(dtypes[wb.0], vec![n], &g)
                    .unwrap()
                    .to_f64()
            })
            .collect();
        let gt: Vec<Tensor> = blocks
            .iter()
            .zip(&grads)
            .map(|(wb, g)| up(dtypes[wb.0], &block_shape(wb), g))
            .collect();
        opt.step(&weights, &gt.iter().collect::<Vec<_>>()).unwrap();
        for (i, &(w, b)) in blocks.iter().enumerate() {
            let cols = shapes[w][1];
            let (start, end) = b.range();
            let idx: Vec<usize> = match b {
                Block::Rows { .. } => (start * cols..end * cols).collect(),
                Block::Columns { .. } => (0..shapes[w][0])
                    .flat_map(|r| (start..end).map(move |c| r * cols + c))
                    .collect(),
            };
            let mut p: Vec<f64> = idx.iter().map(|&k| master[w][k]).collect();
            rf::adamw(&mut p, &grads[i], &mut m[i], &mut v[i], step, &cfg);
            for (k, val) in idx.iter().zip(p) {
                master[w][*k] = val;
            }
        }
    }
    for (w, t) in ws.iter().enumerate() {
        let want = HostTensor::from_f64(dtypes[w], vec![master[w].len()], &master[w])
            .unwrap()
            .to_f64();
        let err = max_rel_error(&down(t), &want, 1.0);
        let tol = if dtypes[w] == DType::F32 {
            1e-6
        } else {
            DType::F16.epsilon()
        };
        assert!(err <= tol, "weight {w}: {err:.2e}");
    }
    for i in 0..blocks.len() {
        let (mt, vt, mst) = opt.state_of(i).unwrap();
        assert!(max_rel_error(&down(&mt), &m[i], 0.1) <= 1e-6, "m {i}");
        assert!(max_rel_error(&down(&vt), &v[i], 1e-3) <= 1e-6, "v {i}");
        assert_eq!(mst.is_some(), dtypes[blocks[i].0] == DType::F16);
    }
    assert_eq!(opt.steps(), 4);
}

#[test]
fn one_adamw_step_matches_pytorch() {
    let hosts = kiln::load_safetensors(common::data("adamw_step5_f32.safetensors")).unwrap();
    let get = |n: &str| hosts[n].to_f64();
    let n = get("param").len();
    let w = t32(&[1, n], &get("param"));
    let (m, v) = (t32(&[1, n], &get("m")), t32(&[1, n], &get("v")));
    let g = t32(&[1, n], &get("grad"));
    let cfg = AdamWConfig {
        lr: 0.003,
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let block = Block::Rows { start: 0, end: 1 };
    let mut opt = S2ftAdamW::with_state(&[(&w, block)], cfg, &[Some((&m, &v, None))], 4).unwrap();
    opt.step(&[&w], &[&g]).unwrap();
    let (m, v, _) = opt.state_of(0).unwrap();
    // Relative to each value, with a floor of a tenth of the tensor's largest value: an
    // f32 sum of O(max) terms that cancels carries O(eps max) absolute error.
    for (name, got) in [("param", down(&w)), ("m", down(&m)), ("v", down(&v))] {
        let want = get(&format!("expected_{name}"));
        let floor = want.iter().fold(0.0f64, |a, b| a.max(b.abs())) / 10.0;
        let err = max_rel_error(&got, &want, floor);
        let worst = (0..n)
            .max_by(|&a, &b| {
                (got[a] - want[a])
                    .abs()
                    .total_cmp(&(got[b] - want[b]).abs())
            })
            .unwrap();
        assert!(
            err <= 1e-6,
            "{name}: {err:.2e} at {worst}: {} vs {}",
            got[worst],
            want[worst]
        );
    }
}

#[test]
fn many_fine_tunes_in_one_batch_and_merge_round_trip() {
    let mut rng = Rng::new(31);
    let (t, out, inp, a) = (33, 21, 19, 4);
    let x = f32s(&mut rng, t * inp, 1.0);
    let w0 = weight(&mut rng, out, inp);
    let ids: Vec<i64> = (0..t).map(|i| (i as i64 * 7 % 5) - 1).collect(); // -1 ..= 3
    let idt = up(
        DType::I32,
        &[t],
        &ids.iter().map(|&i| i as f64).collect::<Vec<_>>(),
    );
    let (xt, w0t) = (t32(&[t, inp], &x), t32(&[out, inp], &w0));
    for (rows, start, width) in [(true, 6, 5), (false, 2, 9)] {
        let shape = if rows {
            [a, width, inp]
        } else {
            [a, out, width]
        };
        let deltas = weight(&mut rng, a * shape[1], shape[2]);
        let dt = t32(&shape, &deltas);
        let y = s2ft_adapter_forward(&xt, &w0t, &dt, &idt, rows, start).unwrap();
        let want = rf::adapter_forward(&x, &w0, &deltas, &ids, t, out, inp, rows, start, width);
        let err = max_rel_error(&down(&y), &want, 1.0);
        assert!(err <= 1e-5, "rows={rows}: {err:.2e}");
        // Merging fine-tune 2 serves its tokens with the base path; unmerging restores W0.
        let merged = t32(&[out, inp], &w0);
        s2ft_merge(&merged, &dt, 2, rows, start, false).unwrap();
        let base = up(DType::I32, &[t], &vec![-1.0; t]);
        let y_merged = down(&s2ft_adapter_forward(&xt, &merged, &dt, &base, rows, start).unwrap());
        let y_two = down(
            &s2ft_adapter_forward(
                &xt,
                &w0t,
                &dt,
                &up(DType::I32, &[t], &vec![2.0; t]),
                rows,
                start,
            )
            .unwrap(),
        );
        assert!(
            max_rel_error(&y_merged, &y_two, 1.0) <= 1e-5,
            "rows={rows}: merged"
        );
        s2ft_merge(&merged, &dt, 2, rows, start, true).unwrap();
        assert!(
            max_rel_error(&down(&merged), &w0, 1.0) <= 1e-6,
            "rows={rows}: unmerged"
        );
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let one_line = |e: kiln::Error, words: &[&str]| {
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        for w in words {
            assert!(m.contains(w), "`{w}` not in: {m}");
        }
    };
    one_line(
        s2ft_select(6, 1, 7, 1, &Strategy::Random { seed: 0 }).unwrap_err(),
        &["count_a", "6", "7"],
    );
    one_line(
        s2ft_select(
            6,
            1,
            1,
            2,
            &Strategy::Explicit {
                a: &[9],
                b: &[0, 1],
            },
        )
        .unwrap_err(),
        &["units_a"],
    );
    let w = t32(&[10, 4], &[0.5; 40]);
    let perm = S2ftPermutation::from_perm(vec![1, 0, 2]).unwrap();
    one_line(
        s2ft_permute("w_k", &w, &perm, 3, Axis::Rows, "head_dim").unwrap_err(),
        &["head_dim", "w_k", "10"],
    );
    one_line(
        S2ftPermutation::from_perm(vec![0, 0, 1]).unwrap_err(),
        &["perm", "permutation"],
    );
    let heads = HeadLayout {
        heads: 6,
        kv_heads: 4,
        head_dim: 2,
    };
    let aw = AttentionWeights {
        w_q: &w,
        w_k: &w,
        w_v: &w,
        w_o: &w,
    };
    let x = t32(&[2, 4], &[0.1; 8]);
    one_line(
        s2ft_verify_attention(&aw, &heads, &perm, &x, false)
            .err()
            .unwrap(),
        &["kv_heads"],
    );
    let deltas = t32(&[2, 3, 4], &[0.0; 24]);
    let ids = up(DType::I32, &[2], &[0.0, 2.0]);
    one_line(
        s2ft_adapter_forward(&x, &w, &deltas, &ids, true, 0).unwrap_err(),
        &["adapter_ids", "2", "token 1"],
    );
    one_line(
        s2ft_merge(&w, &deltas, 5, true, 0, false).unwrap_err(),
        &["adapter", "5"],
    );
    one_line(
        s2ft_merge(&w, &deltas, 0, true, 8, false).unwrap_err(),
        &["start", "10"],
    );
    let dy = t32(&[2, 10], &[0.0; 20]);
    one_line(
        s2ft_partial_backward(&dy, &x, None, Block::Rows { start: 4, end: 12 }).unwrap_err(),
        &["12"],
    );
    let bad = AdamWConfig {
        beta2: 1.0,
        ..AdamWConfig::default()
    };
    one_line(
        S2ftAdamW::new(&[(&w, Block::Rows { start: 0, end: 1 })], bad)
            .err()
            .unwrap(),
        &["beta2"],
    );
}

#[test]
fn three_s2ft_steps_of_the_llama_block_match_masked_full_fine_tuning() {
    use kiln::kernels::s2ft::{LlamaTrainer, LlamaWeights};
    // d 16, 4 query heads over 2 KV heads of 4, FFN 20, 11 tokens.
    let (t, d, f) = (11, 16, 20);
    let heads = HeadLayout {
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
    };
    let weights = LlamaWeights::random(client(), d, f, &heads, DType::F32, 99).unwrap();
    let mut model = rf::Llama {
        heads: (4, 2, 4),
        w_q: down(&weights.w_q),
        w_k: down(&weights.w_k),
        w_v: down(&weights.w_v),
        w_o: down(&weights.w_o),
        ffn: rf::Ffn {
            d,
            f,
            w_up: down(&weights.w_up),
            w_gate: down(&weights.w_gate),
            w_down: down(&weights.w_down),
        },
    };
    let mut rng = Rng::new(8);
    let x = f32s(&mut rng, t * d, 1.0);
    let target = f32s(&mut rng, t * d, 1.0);
    // V rows of KV group 1, O columns of group 0 (so the order swaps the groups).
    let attn = s2ft_select(2, 1, 1, 1, &Strategy::Explicit { a: &[1], b: &[0] }).unwrap();
    let ffn = s2ft_select(f, 1, 4, 5, &Strategy::Random { seed: 3 }).unwrap();
    let cfg = AdamWConfig {
        lr: 0.01,
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let mut trainer = LlamaTrainer::s2ft(weights, heads, &attn, &ffn, cfg).unwrap();
    let xt = t32(&[t, d], &x);
    let mut losses = vec![];
    for _ in 0..3 {
        losses.push(trainer.step(&xt, &target).unwrap().loss);
    }
    let units = |p: &S2ftPermutation, r: std::ops::Range<usize>| p.perm[r].to_vec();
    let y_last = model.masked_fine_tune(
        &x,
        &target,
        t,
        (
            &units(&attn, attn.row_block()),
            &units(&attn, attn.col_block()),
        ),
        (&units(&ffn, ffn.row_block()), &units(&ffn, ffn.col_block())),
        3,
        &cfg,
    );
    let loss_ref = 0.5
        * y_last
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
        / t as f64;
    assert!(
        (losses[2] - loss_ref).abs() <= 1e-6 * loss_ref,
        "loss {} vs {loss_ref}",
        losses[2]
    );
    let w = &trainer.weights;
    let (ia, iff) = (attn.inverted(), ffn.inverted());
    let back = |name: &str, t: &Tensor, p: &S2ftPermutation, unit: usize, axis: Axis| {
        down(&s2ft_permute(name, t, p, unit, axis, "unit_size").unwrap())
    };
    for (name, got, want) in [
        ("w_q", back("w_q", &w.w_q, &ia, 8, Axis::Rows), &model.w_q),
        ("w_k", back("w_k", &w.w_k, &ia, 4, Axis::Rows), &model.w_k),
        ("w_v", back("w_v", &w.w_v, &ia, 4, Axis::Rows), &model.w_v),
        (
            "w_o",
            back("w_o", &w.w_o, &ia, 8, Axis::Columns),
            &model.w_o,
        ),
        (
            "w_up",
            back("w_up", &w.w_up, &iff, 1, Axis::Rows),
            &model.ffn.w_up,
        ),
        (
            "w_gate",
            back("w_gate", &w.w_gate, &iff, 1, Axis::Rows),
            &model.ffn.w_gate,
        ),
        (
            "w_down",
            back("w_down", &w.w_down, &iff, 1, Axis::Columns),
            &model.ffn.w_down,
        ),
    ] {
        let err = max_rel_error(&got, want, 1.0);
        assert!(err <= 1e-6, "{name}: {err:.2e}");
    }
    let y = down(&trainer.forward(&xt).unwrap());
    let (y_ref, _) = model.grads(&x, &target, t);
    let err = max_rel_error(&y, &y_ref, 1.0);
    assert!(err <= 1e-6, "outputs after the steps: {err:.2e}");
}
