//! Packed variable-length sequences (each restarts from its own state) and decode steps
//! that reproduce the whole sequence.

use super::*;

/// Four packed sequences, one empty, one shorter than a chunk, one spanning three
/// chunks (of 64), with h0; at chunk 64 also without h0.
fn varlen_sequences(chunk: usize) {
    let cu = vec![0, 37, 37, 190, 200];
    let c = case(
        DType::F32,
        1,
        200,
        2,
        48,
        40,
        true,
        true,
        Some(cu.clone()),
        50,
    );
    check_case(&c, chunk, 1e-5, 1e-5, &format!("varlen chunk {chunk}"));
    if chunk == 64 {
        let c = case(DType::F32, 1, 200, 2, 48, 40, false, false, Some(cu), 51);
        check_case(&c, 64, 1e-5, 1e-5, "varlen without h0");
    }
}

#[test]
fn varlen_sequences_restart_from_their_own_state_chunk_64() {
    varlen_sequences(64);
}

#[test]
fn varlen_sequences_restart_from_their_own_state_chunk_16() {
    varlen_sequences(16);
}

#[test]
fn decode_steps_reproduce_the_sequence() {
    // T steps of gla_step from h0 give the recurrent outputs and the final state.
    let (b, t, h, dk, dv) = (3usize, 9usize, 2usize, 20usize, 12usize);
    let c = case(DType::F32, b, t, h, dk, dv, true, false, None, 60);
    let scale = 0.3;
    let (o_ref, ht_ref) =
        reference::forward(&c.q, &c.k, &c.v, &c.g, c.h0.as_deref(), &c.dims, scale);
    let state = up(DType::F32, &[b, h, dk, dv], c.h0.as_ref().unwrap());
    let before = down(&state);
    let mut o = vec![0.0; b * t * h * dv];
    let slice = |x: &[f64], step: usize, w: usize| -> Vec<f64> {
        (0..b)
            .flat_map(|bi| x[((bi * t + step) * h) * w..((bi * t + step) * h + h) * w].to_vec())
            .collect()
    };
    for step in 0..t {
        let q = up(DType::F32, &[b, 1, h, dk], &slice(&c.q, step, dk));
        let k = up(DType::F32, &[b, 1, h, dk], &slice(&c.k, step, dk));
        let v = up(DType::F32, &[b, 1, h, dv], &slice(&c.v, step, dv));
        let g = up(DType::F32, &[b, 1, h, dk], &slice(&c.g, step, dk));
        let out = down(&gla_step(&q, &k, &v, &g, &state, Some(scale)).unwrap());
        for bi in 0..b {
            let dst = ((bi * t + step) * h) * dv;
            o[dst..dst + h * dv].copy_from_slice(&out[bi * h * dv..(bi + 1) * h * dv]);
        }
    }
    assert_ne!(down(&state), before, "the state is updated in place");
    let eo = rms_relative(&o, &o_ref);
    let eh = rms_relative(&down(&state), &ht_ref);
    assert!(eo < 1e-6 && eh < 1e-6, "decode: o {eo:.2e}, state {eh:.2e}");
}
