//! Edges: gates of -inf (full forgetting) in every form, and no tokens at all.

use super::*;

/// A gate of -inf is the log of a zero decay: the state is wiped at that step. Every
/// form agrees with the recurrence (no `-inf - -inf = NaN` in the chunked cumsums),
/// forward and backward, for a whole row of -inf and for single and consecutive -inf
/// elements, with chunks that start before, at and after them.
fn minus_infinity_gates(chunk: usize) {
    let (h, dk, dv, t) = (2usize, 16usize, 12usize, 50usize);
    let mut c = case(
        DType::F32,
        2,
        t,
        h,
        dk,
        dv,
        true,
        true,
        None,
        70 + chunk as u64,
    );
    for e in &mut c.g[7 * h * dk..8 * h * dk] {
        *e = f64::NEG_INFINITY;
    }
    c.g[(t + 20) * h * dk + 3] = f64::NEG_INFINITY;
    c.g[(t + 21) * h * dk + 3] = f64::NEG_INFINITY;
    c.g[(t + 33) * h * dk + dk + 5] = f64::NEG_INFINITY;
    check_case(&c, chunk, 1e-5, 1e-5, &format!("-inf gates, chunk {chunk}"));
}

#[test]
fn minus_infinity_gates_are_full_forgetting_chunk_16() {
    minus_infinity_gates(16);
}

#[test]
fn minus_infinity_gates_are_full_forgetting_chunk_64() {
    minus_infinity_gates(64);
}

#[test]
fn no_tokens_gives_an_empty_output_and_the_initial_state() {
    // T = 0: nothing to tune or launch over time; the state passes through unchanged.
    let c = case(DType::F32, 2, 0, 2, 8, 4, true, false, None, 80);
    let d = upload(&c);
    let inp = inputs(&d, &c);
    let out = gla(
        &inp,
        &GlaOptions {
            output_final_state: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(out.o.shape(), &[2, 0, 2, 4]);
    assert_eq!(down(out.ht.as_ref().unwrap()), c.h0.clone().unwrap());
    // A batch of empty sequences past MAX_EMPTY_BATCH with no state to match is refused
    // by name (its host offsets would size gigabytes), not allocated.
    let e = up(DType::F32, &[1 << 21, 0, 1, 8], &[]);
    let err = gla(
        &GlaInputs {
            q: &e,
            k: &e,
            v: &e,
            g: &e,
            h0: None,
            cu_seqlens: None,
        },
        &GlaOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`q`") && err.contains("1048576"), "{err}");
    // Empty, but with H K V past usize (2^66 state elements): refused as too large,
    // not an overflow; and the parameters are checked as for T > 0.
    let wide = up(DType::F32, &[1, 0, 1 << 22, 1 << 22], &[]);
    let wide_inputs = GlaInputs {
        q: &wide,
        k: &wide,
        v: &wide,
        g: &wide,
        h0: None,
        cu_seqlens: None,
    };
    let err = gla(&wide_inputs, &GlaOptions::default()).err().unwrap();
    assert!(matches!(err, kiln::Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("2^32"), "{err}");
    let err = gla(
        &inp,
        &GlaOptions {
            chunk_size: Some(100),
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("chunk_size") && err.contains("100"), "{err}");
}
