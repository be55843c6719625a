//! Selftest cases of the quantized GEMMs: small, ragged, through the checkpoint
//! formats (built by the reference's packer), against dequantize-then-multiply in f64.

use super::reference::{self as qr, W4Codes};
use kiln_runtime::check::Rng;
use kiln_runtime::selftest::{Case, CaseInputs as Inputs};
use kiln_runtime::HostTensor;
use std::collections::BTreeMap;

const M: usize = 3;
const N: usize = 40;
const K: usize = 96;
const G: usize = 32;

fn words(v: Vec<i32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

/// The codes of a random [K, N] weight, scales rounded to f16 (as checkpoints store).
fn w4_codes(rng: &mut Rng) -> W4Codes {
    let mut c = W4Codes::quantize(&rng.normals(K * N, 0.05), K, N, G);
    for s in &mut c.s {
        *s = kiln_runtime::f16_from_f64(*s).to_f64();
    }
    c
}

/// x [3, 96] and a GPTQ v1 checkpoint (G = 32) of a [96, 40] weight.
fn gptq_inputs(rng: &mut Rng) -> Inputs {
    gptq_inputs_of(rng, M)
}

/// Rows of the tensor-core cases' x: ragged against their 32- and 64-row tiles.
const M_TC: usize = 37;

/// x [37, 96] and the GPTQ weight of [`gptq_inputs`].
fn gptq_tc_inputs(rng: &mut Rng) -> Inputs {
    gptq_inputs_of(rng, M_TC)
}

fn gptq_inputs_of(rng: &mut Rng, m: usize) -> Inputs {
    let c = w4_codes(rng);
    vec![
        ("x", vec![m, K], rng.normals(m * K, 1.0)),
        ("qweight", vec![K / 8, N], words(c.gptq_qweight())),
        ("scales", vec![K / G, N], c.s.clone()),
        ("qzeros", vec![K / G, N / 8], words(c.qzeros("gptq", 1))),
    ]
}

/// The same weight as AWQ tensors.
fn awq_inputs(rng: &mut Rng) -> Inputs {
    let c = w4_codes(rng);
    vec![
        ("qweight", vec![K, N / 8], words(c.awq_qweight())),
        ("scales", vec![K / G, N], c.s.clone()),
        ("qzeros", vec![K / G, N / 8], words(c.qzeros("awq", 0))),
    ]
}

/// Unpacks GPTQ v1 tensors (independently of the kernels' unpacking), `[K, N]` with K
/// and N from `qweight`'s shape (`[K / 8, N]`) and the group from `scales` (`[K / G, N]`):
/// the references apply to any shape the operator accepts, as the property tests use
/// them.
fn gptq_weight(i: &BTreeMap<String, HostTensor>) -> Vec<f64> {
    let qw = i["qweight"].to_f64();
    let qz = i["qzeros"].to_f64();
    let s = i["scales"].to_f64();
    let (k, n) = (i["qweight"].shape[0] * 8, i["qweight"].shape[1]);
    let g_size = k / i["scales"].shape[0];
    let nib = |w: f64, slot: usize| ((w as i64 as u32 >> (4 * slot)) & 15) as f64;
    let mut w = vec![0.0; k * n];
    for r in 0..k {
        for c in 0..n {
            let g = r / g_size;
            let z = nib(qz[g * n.div_ceil(8) + c / 8], c % 8) + 1.0;
            w[r * n + c] = (nib(qw[(r / 8) * n + c], r % 8) - z) * s[g * n + c];
        }
    }
    w
}

/// The W4A16 reference on a case's own inputs with `m` rows.
fn gptq_reference(i: &BTreeMap<String, HostTensor>, m: usize) -> Vec<f64> {
    case_dims(i, "x", (m, K));
    case_dims(i, "qweight", (K / 8, N));
    qr::matmul(&i["x"].to_f64(), &gptq_weight(i), m, K, N)
}

/// The tensor-core paths' GEMM: the dequantized weight `w` rounded to x's dtype, as
/// `qgemm_cmma` stages it in shared memory for the fragments (Marlin does the same),
/// then multiplied exactly. Rounding `w` costs each of the K products half an epsilon,
/// which adds up to several epsilons of `y` where the products cancel: 3.5 epsilons
/// in the `w8_bits` case against a bound computed from `y` alone (the CUDA emulator,
/// 2026-12-06), hence a reference that models it and one rounding for `y`.
fn staged_reference(
    i: &BTreeMap<String, HostTensor>,
    w: &[f64],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let staged = HostTensor::from_f64(i["x"].dtype, vec![k, n], w)
        .expect("the weight has k x n elements")
        .to_f64();
    qr::matmul(&i["x"].to_f64(), &staged, m, k, n)
}

/// `(rows, cols)` of a matrix input.
fn dims(i: &BTreeMap<String, HostTensor>, name: &str) -> (usize, usize) {
    let shape = &i[name].shape;
    (shape[0], shape[1])
}

/// `(rows, cols)` of a GEMM input, which must be the case's own: the GEMM cases'
/// tolerances are set for their own inputs (K and the scales' size bound the f32
/// rounding), so on other shapes the reference refuses (panics), and the property
/// tests then ask only for a result or a typed error, as for every reference written
/// for its own shapes.
fn case_dims(i: &BTreeMap<String, HostTensor>, name: &str, case: (usize, usize)) -> (usize, usize) {
    let got = dims(i, name);
    assert_eq!(
        got, case,
        "`{name}`: the case's reference applies to its own shape"
    );
    got
}

fn ints(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.uniform() * 255.0).floor() - 127.0)
        .collect()
}

/// xq [5, 77] (rows not word-aligned), wq [37, 77], positive scales, bias.
fn w8a8_inputs(rng: &mut Rng) -> Inputs {
    w8a8_inputs_of(rng, W8A8)
}

/// (M, N, K) of the W8A8 case: K = 77, rows not word-aligned.
const W8A8: (usize, usize, usize) = (5, 37, 77);

/// The W8A8 reference on a case's own inputs of `(m, n, k)`, with its bias.
fn w8a8_reference(i: &BTreeMap<String, HostTensor>, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
    let f = |name: &str| i[name].to_f64();
    case_dims(i, "xq", (m, k));
    case_dims(i, "wq", (n, k));
    qr::w8a8(
        &f("xq"),
        &f("sx"),
        &f("wq"),
        &f("sw"),
        Some(&f("bias")),
        m,
        n,
        k,
    )
}

/// The tensor-core case's: M and N ragged against every tile, K a multiple of 16 but
/// not of the 32- and 64-deep steps.
fn w8a8_tc_inputs(rng: &mut Rng) -> Inputs {
    w8a8_inputs_of(rng, W8A8_TC)
}

/// (M, N, K) of the tensor-core W8A8 case.
const W8A8_TC: (usize, usize, usize) = (37, 72, 96);

fn w8a8_inputs_of(rng: &mut Rng, (m, n, k): (usize, usize, usize)) -> Inputs {
    vec![
        ("xq", vec![m, k], ints(rng, m * k)),
        (
            "sx",
            vec![m],
            (0..m).map(|_| 0.01 + 0.01 * rng.uniform()).collect(),
        ),
        ("wq", vec![n, k], ints(rng, n * k)),
        (
            "sw",
            vec![n],
            (0..n).map(|_| 0.01 + 0.01 * rng.uniform()).collect(),
        ),
        ("bias", vec![n], rng.normals(n, 1.0)),
    ]
}

/// x [4, 51] with an all-zero row and an outlier.
fn token_inputs(rng: &mut Rng) -> Inputs {
    let (m, k) = (4, 51);
    let mut x = rng.normals(m * k, 2.0);
    x[k..2 * k].fill(0.0);
    x[2 * k + 3] = 300.0;
    vec![("x", vec![m, k], x)]
}

/// x [5, 77], q8 [77, 37] containing every int8 code, s8 [37].
fn w8_bits_inputs(rng: &mut Rng) -> Inputs {
    w8_bits_inputs_of(rng, W8_BITS.0)
}

/// x [37, 77] and the weight of [`w8_bits_inputs`]: K ragged against the 16-deep
/// fragments.
fn w8_bits_tc_inputs(rng: &mut Rng) -> Inputs {
    w8_bits_inputs_of(rng, M_TC)
}

/// (M, N, K) of the `w8_bits` case.
const W8_BITS: (usize, usize, usize) = (5, 37, 77);

/// The `w8_bits` reference at 4 bits on a case's own inputs with `m` rows.
fn w8_bits_reference(i: &BTreeMap<String, HostTensor>, m: usize) -> Vec<f64> {
    let (_, n, k) = W8_BITS;
    qr::matmul(&i["x"].to_f64(), &w8_bits_weight(i, m), m, k, n)
}

/// The `w8_bits` case's weight at 4 bits, `[K, N]` row-major, checking the shapes.
fn w8_bits_weight(i: &BTreeMap<String, HostTensor>, m: usize) -> Vec<f64> {
    let (_, n, k) = W8_BITS;
    let q8: Vec<i8> = i["q8"].to_f64().iter().map(|&v| v as i8).collect();
    case_dims(i, "x", (m, k));
    case_dims(i, "q8", (k, n));
    qr::w8_bits_weight(&q8, &i["s8"].to_f64(), k, n, 4)
}

fn w8_bits_inputs_of(rng: &mut Rng, m: usize) -> Inputs {
    let (_, n, k) = W8_BITS;
    let mut q8 = ints(rng, k * n);
    for (i, v) in q8.iter_mut().take(256).enumerate() {
        *v = i as f64 - 128.0;
    }
    vec![
        ("x", vec![m, k], rng.normals(m * k, 1.0)),
        ("q8", vec![k, n], q8),
        (
            "s8",
            vec![n],
            (0..n).map(|_| 0.01 + 0.01 * rng.uniform()).collect(),
        ),
    ]
}

/// w [9, 31], positive divisors, upstream gradient.
fn flex_inputs(rng: &mut Rng) -> Inputs {
    let (r, c) = (9, 31);
    let pos = |rng: &mut Rng, n: usize| (0..n).map(|_| 0.8 + 0.4 * rng.uniform()).collect();
    vec![
        ("w", vec![r, c], rng.normals(r * c, 1.0)),
        ("s1", vec![1], vec![0.1875]),
        ("s2", vec![r, c], pos(rng, r * c)),
        ("s3", vec![r], pos(rng, r)),
        ("s4", vec![c], pos(rng, c)),
        ("grad", vec![r, c], rng.normals(r * c, 1.0)),
    ]
}

fn flex(i: &BTreeMap<String, HostTensor>) -> qr::FlexRound {
    let f = |n: &str| i[n].to_f64();
    qr::FlexRound {
        rows: i["w"].shape[0],
        cols: i["w"].shape[1],
        w: f("w"),
        s1: f("s1")[0],
        s2: f("s2"),
        s3: f("s3"),
        s4: f("s4"),
        qmin: -8.0,
        qmax: 7.0,
    }
}

/// The quantized GEMMs' cases, in `kiln ops` order.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            op: "w4a16",
            params: &[("format", "gptq"), ("group_size", "32")],
            output: "y",
            what: "[3,96] @ GPTQ v1 int4 [96,40], G = 32",
            inputs: gptq_inputs,
            reference: |i| gptq_reference(i, M),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        // Tensor cores alone (skipped, saying so, where there are none and for f32).
        Case {
            op: "w4a16",
            params: &[
                ("format", "gptq"),
                ("group_size", "32"),
                ("path", "tensor_cores"),
            ],
            output: "y",
            what: "[37,96] @ GPTQ v1 int4 [96,40], G = 32, tensor cores",
            inputs: gptq_tc_inputs,
            reference: |i| {
                case_dims(i, "x", (M_TC, K));
                case_dims(i, "qweight", (K / 8, N));
                staged_reference(i, &gptq_weight(i), M_TC, K, N)
            },
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "w4a16_repack",
            params: &[("format", "awq"), ("group_size", "32")],
            output: "qzeros",
            what: "AWQ [96,40] G = 32 -> kiln layout, zero points",
            inputs: awq_inputs,
            reference: |i| {
                // Slot s of a word holds column AWQ_ORDER[s] of its group of eight.
                let qz = i["qzeros"].to_f64();
                let (groups, words) = dims(i, "qzeros");
                let n = words * 8;
                let mut z = vec![0.0; groups * n];
                for g in 0..groups {
                    for w in 0..words {
                        for (slot, &col) in qr::AWQ_ORDER.iter().enumerate() {
                            z[g * n + w * 8 + col] =
                                ((qz[g * words + w] as i64 as u32 >> (4 * slot)) & 15) as f64;
                        }
                    }
                }
                z
            },
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "w8a8",
            params: &[],
            output: "y",
            what: "int8 [5,77] @ int8 [37,77]^T + bias",
            inputs: w8a8_inputs,
            reference: |i| w8a8_reference(i, W8A8),
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        // Int8 tensor cores alone (skipped, saying so, where there are none: CPU
        // adapters; CUDA before 7.2).
        Case {
            op: "w8a8",
            params: &[("path", "tensor_cores")],
            output: "y",
            what: "int8 [37,96] @ int8 [72,96]^T + bias, int8 tensor cores",
            inputs: w8a8_tc_inputs,
            reference: |i| w8a8_reference(i, W8A8_TC),
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "quantize_per_token",
            params: &[],
            output: "xq",
            what: "[4,51] with a zero row and an outlier, codes exact",
            inputs: token_inputs,
            reference: |i| {
                let x: Vec<f32> = i["x"].to_f64().iter().map(|&v| v as f32).collect();
                let (m, k) = dims(i, "x");
                let (q, _) = qr::quantize_per_token(&x, m, k);
                q.into_iter().map(f64::from).collect()
            },
            roundings: 1.0,
            ulps: 0.0,
            floor: 1.0,
        },
        Case {
            op: "w8_bits",
            params: &[("bits", "4")],
            output: "y",
            what: "[5,77] @ int8 [77,37] viewed at 4 bits (every code)",
            inputs: w8_bits_inputs,
            reference: |i| w8_bits_reference(i, W8_BITS.0),
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "w8_bits",
            params: &[("bits", "4"), ("path", "tensor_cores")],
            output: "y",
            what: "[37,77] @ int8 [77,37] viewed at 4 bits, tensor cores",
            inputs: w8_bits_tc_inputs,
            reference: |i| {
                let (_, n, k) = W8_BITS;
                staged_reference(i, &w8_bits_weight(i, M_TC), M_TC, k, n)
            },
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
        Case {
            op: "flexround",
            params: &[],
            output: "wq",
            what: "[9,31] fake quantization to [-8, 7]",
            inputs: flex_inputs,
            reference: |i| flex(i).forward(),
            roundings: 1.0,
            ulps: 4.0,
            floor: 1.0,
        },
        Case {
            op: "flexround_backward",
            params: &[],
            output: "ds4",
            what: "[9,31] straight-through backward, ds4 (a column reduction)",
            inputs: flex_inputs,
            reference: |i| flex(i).backward(&i["grad"].to_f64()).ds4,
            roundings: 1.0,
            ulps: 64.0,
            floor: 1.0,
        },
    ]
}
