//! S²FT steps against masked full fine-tuning of the unpermuted model (f64 reference), for
//! the SwiGLU FFN and the whole LLaMA block.

use super::*;

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
    // An FFN permutation of the wrong unit count is refused before any weight is
    // permuted in place: the attention weights are as they were given.
    let wrong_ffn = s2ft_select(f - 1, 1, 4, 5, &Strategy::Random { seed: 3 }).unwrap();
    let w_q_before = down(&weights.w_q);
    let kept = LlamaWeights {
        w_q: weights.w_q.clone(),
        w_k: weights.w_k.clone(),
        w_v: weights.w_v.clone(),
        w_o: weights.w_o.clone(),
        w_up: weights.w_up.clone(),
        w_gate: weights.w_gate.clone(),
        w_down: weights.w_down.clone(),
    };
    let e = LlamaTrainer::s2ft(kept, heads, &attn, &wrong_ffn, cfg)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("w_up"), "{e}");
    assert_eq!(
        down(&weights.w_q),
        w_q_before,
        "w_q permuted before the refusal"
    );
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
