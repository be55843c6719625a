//! The structure S²FT relies on: exact co-permutation (in place and out of place), the
//! permuted FFN and grouped-query attention computing the same function, and the selection
//! strategies.

use super::*;

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

    // Grouped-query attention: a unit (a KV group) is 2 rows of W_v but 3 heads x 2 =
    // 6 columns of W_o; the row unit's height comes from W_v's rows.
    let (g, hd) = (3, 2);
    let rw = f32s(&mut rng, u * hd * c, 1.0);
    let cw = f32s(&mut rng, c * u * g * hd, 1.0);
    let p = s2ft_select(
        u,
        g * hd,
        2,
        4,
        &Strategy::WeightNorm {
            row_weight: &t32(&[u * hd, c], &rw),
            col_weight: &t32(&[c, u * g * hd], &cw),
        },
    )
    .unwrap();
    let row_norm: Vec<f64> = (0..u)
        .map(|k| rw[k * hd * c..(k + 1) * hd * c].iter().map(|x| x * x).sum())
        .collect();
    let col_norm: Vec<f64> = (0..u)
        .map(|k| {
            (0..c)
                .flat_map(|i| (0..g * hd).map(move |j| (i, j)))
                .map(|(i, j)| cw[i * u * g * hd + k * g * hd + j].powi(2))
                .sum()
        })
        .collect();
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
fn verification_fails_on_a_nan_or_infinity_on_one_side_only() {
    use kiln::kernels::s2ft::VerifyReport;
    let t = |v: &[f64]| up(DType::F32, &[v.len()], v);
    let nan = f64::NAN;
    let inf = f64::INFINITY;
    let report = |a: &[f64], b: &[f64]| VerifyReport::of(t(a), t(b), 4).unwrap();
    assert!(report(&[1.0, 2.0], &[1.0, 2.0]).passed());
    assert!(!report(&[1.0, 2.0], &[1.0, nan]).passed());
    assert!(!report(&[1.0, 2.0], &[nan, nan]).passed());
    assert!(!report(&[1.0, 2.0], &[1.0, inf]).passed());
    // The same non-finite values on both sides agree.
    assert!(report(&[1.0, inf, nan], &[1.0, inf, nan]).passed());
}
