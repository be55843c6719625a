//! Bad input: each error names the tensor or parameter; a scale beyond f32 arithmetic is
//! refused by name.

use super::*;

#[test]
fn bad_inputs_are_named() {
    let f = |shape: &[usize]| up(DType::F32, shape, &vec![-0.5; shape.iter().product()]);
    let (q, v, g) = (f(&[2, 10, 3, 8]), f(&[2, 10, 3, 6]), f(&[2, 10, 3, 8]));
    let opts = GlaOptions::default();
    let run = |q: &Tensor,
               k: &Tensor,
               v: &Tensor,
               g: &Tensor,
               h0: Option<&Tensor>,
               cu: Option<&[i32]>| {
        gla(
            &GlaInputs {
                q,
                k,
                v,
                g,
                h0,
                cu_seqlens: cu,
            },
            &opts,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let expect = |msg: String, needles: &[&str]| {
        for n in needles {
            assert!(msg.contains(n), "`{msg}` should mention `{n}`");
        }
    };
    expect(
        run(&q, &f(&[2, 10, 3, 9]), &v, &g, None, None),
        &["`k`", "[2, 10, 3, 8]", "[2, 10, 3, 9]"],
    );
    expect(
        run(&q, &q, &f(&[2, 11, 3, 6]), &g, None, None),
        &["`v`", "[2, 11, 3, 6]"],
    );
    expect(run(&q, &q, &f(&[1, 10, 3, 6]), &g, None, None), &["`v`"]);
    expect(run(&q, &q, &v, &f(&[2, 10, 3, 7]), None, None), &["`g`"]);
    expect(
        run(&f(&[2, 10, 8]), &q, &v, &g, None, None),
        &["`q`", "[B, T, H, K]"],
    );
    expect(
        run(&q, &q, &v, &g, Some(&f(&[2, 3, 8, 5])), None),
        &["`h0`", "[2, 3, 8, 6]"],
    );
    let q1 = f(&[1, 10, 3, 8]);
    let v1 = f(&[1, 10, 3, 6]);
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[0, 6, 4, 10])),
        &["cu_seqlens", "decreasing"],
    );
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[0, 4, 9])),
        &["cu_seqlens", "end at T"],
    );
    expect(
        run(&q1, &q1, &v1, &q1, None, Some(&[1, 4, 10])),
        &["cu_seqlens", "start at 0"],
    );
    expect(
        run(&q, &q, &v, &g, None, Some(&[0, 10, 20])),
        &["`q`", "B = 1"],
    );
    let half = up(DType::F16, &[2, 10, 3, 8], &vec![0.5; 480]);
    expect(run(&q, &half, &v, &g, None, None), &["`k`", "f32", "f16"]);
    let bad_chunk = GlaOptions {
        chunk_size: Some(48),
        ..Default::default()
    };
    let msg = gla(
        &GlaInputs {
            q: &q,
            k: &q,
            v: &v,
            g: &g,
            h0: None,
            cu_seqlens: None,
        },
        &bad_chunk,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    expect(msg, &["chunk_size", "48"]);
    // fused_chunk: chunks of 16 rows only, K <= 128 and K, V multiples of 4 (V = 6 here).
    let fused = |chunk_size: Option<usize>, q: &Tensor, v: &Tensor, g: &Tensor| {
        gla(
            &GlaInputs {
                q,
                k: q,
                v,
                g,
                h0: None,
                cu_seqlens: None,
            },
            &GlaOptions {
                chunk_size,
                mode: GlaMode::FusedChunk,
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    expect(fused(None, &q, &v, &g), &["mode", "K = 8, V = 6"]);
    let (q8, v8) = (f(&[2, 10, 3, 8]), f(&[2, 10, 3, 8]));
    expect(fused(Some(32), &q8, &v8, &q8), &["chunk_size", "32"]);
    let wide = f(&[1, 4, 1, 132]);
    expect(
        fused(None, &wide, &f(&[1, 4, 1, 8]), &wide),
        &["mode", "K = 132"],
    );
    // The backward checks its own inputs too.
    let msg = gla_backward(
        &GlaInputs {
            q: &q,
            k: &q,
            v: &v,
            g: &g,
            h0: None,
            cu_seqlens: None,
        },
        &GlaGradInputs { d_o: &q, dht: None },
        &opts,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    expect(msg, &["`do`", "[2, 10, 3, 6]"]);
    // The decode step wants one token and names its state.
    let msg = gla_step(&q, &q, &v, &g, &f(&[2, 3, 8, 6]), None)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    expect(msg, &["`q`", "[B, 1, H, K]"]);
    let (q1t, v1t) = (f(&[2, 1, 3, 8]), f(&[2, 1, 3, 6]));
    let msg = gla_step(&q1t, &q1t, &v1t, &q1t, &f(&[2, 3, 8, 5]), None)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    expect(msg, &["`state`"]);
}

#[test]
fn a_scale_beyond_f32_arithmetic_is_refused_by_name() {
    // 1e38 is an f32 but `scale q k` overflows the scores to inf (and inf - inf to NaN);
    // 1e39 is not even an f32. Both are refused with the allowed range; 2^60 still runs.
    let c = case(DType::F32, 1, 9, 1, 8, 4, false, false, None, 90);
    let d = upload(&c);
    let inp = inputs(&d, &c);
    for scale in [1e38, 1e39, -1e38, f64::NAN, f64::INFINITY] {
        let e = gla(
            &inp,
            &GlaOptions {
                scale: Some(scale),
                ..Default::default()
            },
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(e.contains("`scale`") && e.contains("2^60"), "{scale}: {e}");
    }
    let o = gla(
        &inp,
        &GlaOptions {
            scale: Some(2f64.powi(60)),
            ..Default::default()
        },
    )
    .unwrap()
    .o;
    assert_eq!(o.shape(), &[1, 9, 1, 4]);
}
