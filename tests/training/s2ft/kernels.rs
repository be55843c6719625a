//! S²FT's kernels one by one: partial backprop at ragged sizes in f32 and f16, the
//! multi-block AdamW (and PyTorch's AdamW vector), serving many fine-tunes in one batch and
//! merging them.

use super::*;

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
