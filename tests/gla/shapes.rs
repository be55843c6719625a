//! fla's test shapes (K = V = 100 and 300, with and without h0 and dht), every chunk size
//! with uneven K and V, half precision, bf16: every form against the f64 reference.

use super::*;

/// fla's T list with K = V = 100 (not a power of two), alternating h0 and dht: case
/// `i` of the list, in three tests so that none runs for minutes. B = H = 2, except
/// B = H = 1 at T = 2048, where the f64 reference (a debug build's, 4 steps of K x V
/// per token and head) was most of the suite's longest test.
fn fla_shape_k100(i: usize) {
    fla_shape_k100_parts(i, Parts::Both)
}

/// [`fla_shape_k100`]'s forward, backward or both.
fn fla_shape_k100_parts(i: usize, parts: Parts) {
    let t = [130usize, 146, 162, 178, 300, 2048][i];
    let bh = if t > 1000 { 1 } else { 2 };
    let c = case(
        DType::F32,
        bh,
        t,
        bh,
        100,
        100,
        i.is_multiple_of(2),
        i % 3 != 1,
        None,
        10 + i as u64,
    );
    check_parts(&c, 64, 1e-5, 1e-5, &format!("f32 T={t} K=V=100"), parts);
}

#[test]
fn fla_shapes_f32_k100_short() {
    (0..3).for_each(fla_shape_k100);
}

#[test]
fn fla_shapes_f32_k100_medium() {
    (3..5).for_each(fla_shape_k100);
}

/// T = 2048 (a shape bucket of its own: every kernel tunes again), forward and backward
/// in two tests.
#[test]
fn fla_shapes_f32_k100_long_forward() {
    fla_shape_k100_parts(5, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k100_long_backward() {
    fla_shape_k100_parts(5, Parts::Backward);
}

/// K = V = 300: wider than every tile, with h0 (T = 130) and with dht (T = 300); one
/// head (the reference's K x V steps dominate these tests); forward and backward in two
/// tests each.
fn fla_shape_k300(i: usize, parts: Parts) {
    let t = [130usize, 300][i];
    let c = case(
        DType::F32,
        1,
        t,
        1,
        300,
        300,
        i == 0,
        i == 1,
        None,
        20 + i as u64,
    );
    check_parts(&c, 64, 1e-5, 1e-5, &format!("f32 T={t} K=V=300"), parts);
}

#[test]
fn fla_shapes_f32_k300_with_h0_forward() {
    fla_shape_k300(0, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k300_with_h0_backward() {
    fla_shape_k300(0, Parts::Backward);
}

#[test]
fn fla_shapes_f32_k300_with_dht_forward() {
    fla_shape_k300(1, Parts::Forward);
}

#[test]
fn fla_shapes_f32_k300_with_dht_backward() {
    fla_shape_k300(1, Parts::Backward);
}

/// Every chunk size with K, V not multiples of the tiles (two tests per chunk size, the
/// forward and the backward: each compiles its own kernels).
fn chunk_size_with_uneven_k_v(chunk: usize, dk: usize, dv: usize, parts: Parts) {
    let c = case(
        DType::F32,
        2,
        77,
        3,
        dk,
        dv,
        true,
        true,
        None,
        30 + chunk as u64,
    );
    check_parts(
        &c,
        chunk,
        1e-5,
        1e-5,
        &format!("chunk {chunk} K={dk} V={dv}"),
        parts,
    );
}

#[test]
fn chunk_size_16_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(16, 24, 40, Parts::Forward);
}

#[test]
fn chunk_size_16_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(16, 24, 40, Parts::Backward);
}

#[test]
fn chunk_size_32_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(32, 64, 17, Parts::Forward);
}

#[test]
fn chunk_size_32_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(32, 64, 17, Parts::Backward);
}

#[test]
fn chunk_size_64_with_uneven_k_v_forward() {
    chunk_size_with_uneven_k_v(64, 7, 130, Parts::Forward);
}

#[test]
fn chunk_size_64_with_uneven_k_v_backward() {
    chunk_size_with_uneven_k_v(64, 7, 130, Parts::Backward);
}

/// f16 inputs (f32 accumulation) within fla's bars; forward and backward in two tests
/// (each compiles and tunes its own f16 kernels).
fn half_precision(parts: Parts) {
    let c = case(DType::F16, 2, 162, 2, 100, 100, true, true, None, 40);
    check_parts(&c, 64, 0.004, 0.005, "f16 T=162 K=V=100", parts);
}

#[test]
fn half_precision_forward_within_fla_bars() {
    half_precision(Parts::Forward);
}

#[test]
fn half_precision_backward_within_fla_bars() {
    half_precision(Parts::Backward);
}

#[test]
fn bf16_runs_or_is_refused_clearly() {
    let c = case(DType::BF16, 1, 70, 2, 32, 32, false, false, None, 41);
    if client().report().bf16 {
        check_case(&c, 64, 0.004, 0.005, "bf16 T=70 K=V=32");
    } else {
        let err = Tensor::upload(
            client(),
            &HostTensor::from_f64(DType::BF16, c.shape_k.clone(), &c.q).unwrap(),
        )
        .and_then(|q| {
            gla(
                &GlaInputs {
                    q: &q,
                    k: &q,
                    v: &q,
                    g: &q,
                    h0: None,
                    cu_seqlens: None,
                },
                &GlaOptions::default(),
            )
            .map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
}
