//! Bad input to every S²FT entry point: one clear line naming the tensor or parameter.

use super::*;

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
        &["perm", "permutation", "perm[1] = 0, repeated"],
    );
    // The fields are public: a permutation built or changed by hand is checked before
    // any kernel reads it (a repeated or out-of-range unit, an `inverse` that is not
    // one, set sizes past the units).
    let w5 = t32(&[10, 4], &[0.5; 40]);
    let mut bad = S2ftPermutation::from_perm(vec![1, 0, 2, 3, 4]).unwrap();
    bad.perm[0] = 7;
    one_line(
        s2ft_permute("w_k", &w5, &bad, 2, Axis::Rows, "head_dim").unwrap_err(),
        &["perm[0] = 7, out of range"],
    );
    let mut bad = S2ftPermutation::from_perm(vec![1, 0, 2, 3, 4]).unwrap();
    bad.inverse.swap(2, 3);
    one_line(
        s2ft_permute("w_k", &w5, &bad, 2, Axis::Rows, "head_dim").unwrap_err(),
        &["S2ftPermutation", "inverse"],
    );
    let mut bad = S2ftPermutation::from_perm(vec![1, 0, 2, 3, 4]).unwrap();
    bad.a_only = 6;
    one_line(
        s2ft_permute("w_k", &w5, &bad, 2, Axis::Rows, "head_dim").unwrap_err(),
        &["S2ftPermutation", "a_only + shared + b_only"],
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
    // Past usize: an error naming start, not an overflow.
    one_line(
        s2ft_merge(&w, &deltas, 0, true, usize::MAX, false).unwrap_err(),
        &["start"],
    );
    // Unit counts past 32-bit indexing (the permutation is i32): refused before any
    // allocation; num_units x unit_size past usize too.
    one_line(
        s2ft_select(1 << 40, 1, 1, 1, &Strategy::Random { seed: 0 }).unwrap_err(),
        &["num_units"],
    );
    one_line(
        s2ft_select(2, usize::MAX / 2 + 1, 1, 1, &Strategy::Random { seed: 0 }).unwrap_err(),
        &["unit_size"],
    );
    one_line(
        S2ftPermutation::from_sets(1 << 40, &[0], &[1]).unwrap_err(),
        &["num_units"],
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
