//! Property tests over the registries (proptest, stable Rust): every operator on random
//! shapes (0, 1, primes, tile edges) and dtypes either matches its f64 reference within
//! its self-test bar or returns a typed error; with special values (+-0, +-inf, NaN,
//! subnormals, f16 extremes) it never panics or hangs, and keeps NaN where the
//! reference has NaN (docs/numerics.md says where a kernel may add NaN); `kiln emit` over every kernel's declared configuration domain
//! (and values outside it) returns source or a typed error, never a panic.
//!
//! Operators tune on first use of a shape bucket; here every case would be a new one, so
//! this binary runs untuned (`common::UNTUNED`; the tuning path has its own tests).
//!
//! The seed is fixed, so CI runs the same cases every time. Run longer with
//! `KILN_PROPTEST_CASES=200 cargo test --test properties` (default 6 per operator).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::client;
use kiln::check::example_inputs_seeded;
use kiln::codegen::{emit, Target};
use kiln::runtime::{KernelConfig, OpSpec};
use kiln::selftest::{run_case_on, Case, Outcome};
use kiln::{DType, HostTensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Dimensions that find edge cases: empty, one, primes, and both sides of tile edges.
const DIMS: &[usize] = &[0, 1, 2, 3, 5, 7, 13, 16, 17, 31, 32, 33, 64, 65];

/// The longest one case may take (a hang fails the test instead of stalling CI).
const CASE_LIMIT: Duration = Duration::from_secs(60);

fn cases() -> u32 {
    std::env::var("KILN_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

fn runner(salt: u64) -> TestRunner {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(0x6b69_6c6e_7072_6f70u64 ^ salt).to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    )
}

/// How many dimensions the operator's problem shape has (what `kiln tune --shape`
/// takes), found by asking its `example_inputs`.
fn arity(op: &OpSpec) -> Option<usize> {
    (1..=4).find(|&n| {
        [2usize, 16, 128]
            .iter()
            .any(|&d| (op.example_inputs)(&vec![d; n], &Default::default()).is_ok())
    })
}

fn float_dtypes() -> Vec<DType> {
    DType::FLOATS
        .into_iter()
        .filter(|d| client().supports(*d))
        .collect()
}

/// The case's reference on these inputs, or `None` where it is written for its own
/// shapes only (it panics on others).
fn reference(case: &Case, hosts: &BTreeMap<String, HostTensor>) -> Option<Vec<f64>> {
    let r = case.reference;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r(hosts))).ok()
}

fn params(case: &Case) -> BTreeMap<String, String> {
    case.params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An error that is a panic in disguise (a caught panic's text) is not a typed error.
fn is_typed(message: &str) -> bool {
    !message.contains("panicked") && !message.contains("internal error")
}

/// The operator families the random-shape property runs as separate tests (each
/// compiles its own kernels: one test over every operator took over a minute). An
/// operator no family below claims is in `core`, so a new one is never skipped.
const FAMILIES: &[&str] = &[
    "core",
    "gla",
    "gla_backward",
    "quantized",
    "attention",
    "moe",
    "s2ft",
    "optim",
];

fn family_of(name: &str) -> &'static str {
    const QUANTIZED: &[&str] = &[
        "flexround",
        "quantize_per_token",
        "w4a16",
        "w8_bits",
        "w8a8",
    ];
    const OPTIM: &[&str] = &[
        "adabelief",
        "adagrad",
        "adamw",
        "adan",
        "econtrol",
        "frugal",
        "lamb",
        "perturb",
        "randk",
        "topk_ef",
        "zo_update",
    ];
    let stem = name.split("_backward").next().unwrap_or(name);
    if name == "gla_backward" {
        "gla_backward"
    } else if name.starts_with("gla") {
        "gla"
    } else if QUANTIZED.iter().any(|q| stem.starts_with(q)) {
        "quantized"
    } else if name.contains("attention") {
        "attention"
    } else if name.starts_with("moe_") {
        "moe"
    } else if name.starts_with("s2ft_") {
        "s2ft"
    } else if OPTIM.iter().any(|o| stem.starts_with(o)) {
        "optim"
    } else {
        "core"
    }
}

/// The operators whose problem shape is just sizes: each must be checked by value at
/// least once (a pass on an empty output does not count). The others' self-test
/// references are written for their cases' shapes, so on random shapes they are checked
/// for results or typed errors only: the quantized GEMMs and `quantize_per_token`,
/// `topk_ef`, `econtrol`, `frugal`, `zo_update`, `s2ft_merge`, `s2ft_adapter_forward`
/// (each has its own value tests under tests/).
const VALUE_CHECKED: &[&str] = &[
    "add",
    "silu",
    "softmax",
    "logsumexp",
    "matmul",
    "gla",
    "gla_recurrent",
    "flexround",
    "attention",
    "attention_backward",
    "attention_merge",
    "ring_attention",
    "ring_attention_backward",
    "moe_gate",
    "moe_gate_backward",
    "moe_dispatch",
    "moe_combine",
    "moe_dispatch_backward",
    "moe_combine_backward",
    "moe_expert_ffn",
    "moe_layer",
    "moe_layer_backward",
    "s2ft_permute",
    "s2ft_verify",
    "s2ft_partial_backward",
    "s2ft_adamw_step",
    "adamw",
    "adan",
    "adabelief",
    "adagrad",
    "mul",
    "gelu",
    "gla_backward",
    "gla_step",
    "lamb",
    "adagrad_norm",
    "perturb",
    "randk",
    "flexround_backward",
    "s2ft_select",
];

/// Every operator of `family` on random shapes and dtypes: it matches its reference
/// within its self-test bar, or returns a typed error.
fn every_operator_of(family: &str) {
    let mut checked = BTreeMap::new();
    for op in kiln::kernels::ops()
        .iter()
        .filter(|op| family_of(op.name) == family)
    {
        let Some(n) = arity(op) else {
            panic!("`{}`: no problem shape of 1 to 4 dims is accepted", op.name)
        };
        let case = (op.selftest)()
            .into_iter()
            .next()
            .expect("every op has a case");
        let strategy = (
            proptest::collection::vec(proptest::sample::select(DIMS), n),
            proptest::sample::select(float_dtypes()),
            any::<u64>(),
        );
        let values_checked = std::cell::Cell::new(0usize);
        runner(op.name.len() as u64)
            .run(&strategy, |(dims, dtype, seed)| {
                let Ok(hosts) = example_inputs_seeded(op, &dims, &Default::default(), dtype, seed)
                else {
                    return Ok(()); // a shape the operator's problem does not have
                };
                let start = Instant::now();
                // Some self-test references are written for their case's shapes only:
                // where the reference does not apply, the operator must still return
                // a result or a typed error.
                if reference(&case, &hosts).is_none() {
                    if let Err(e) = op.call_host(client(), &hosts, params(&case)) {
                        prop_assert!(is_typed(&e.to_string()), "{} {dims:?}: {e}", op.name);
                    }
                    return Ok(());
                }
                let outcome = run_case_on(client(), &case, dtype, hosts);
                prop_assert!(
                    start.elapsed() < CASE_LIMIT,
                    "{} {dims:?} took {:?}",
                    op.name,
                    start.elapsed()
                );
                match outcome {
                    // An empty output checks no value.
                    Outcome::Pass(..) if dims.contains(&0) => {}
                    Outcome::Pass(..) => values_checked.set(values_checked.get() + 1),
                    Outcome::Broken(m) => prop_assert!(false, "{} {dims:?}: {m}", op.name),
                    Outcome::Refused(_) | Outcome::Unavailable(_) => {}
                    Outcome::Fail(e, t) => {
                        prop_assert!(
                            false,
                            "{} {dims:?} {dtype}: error {e:.2e} > {t:.1e}",
                            op.name
                        )
                    }
                    Outcome::Error(m) => prop_assert!(is_typed(&m), "{} {dims:?}: {m}", op.name),
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        checked.insert(op.name, values_checked.get());
    }
    eprintln!("{family}: value-checked cases per operator: {checked:?}");
    assert!(!checked.is_empty(), "no operator in family `{family}`");
    for op in VALUE_CHECKED.iter().filter(|op| family_of(op) == family) {
        assert!(
            checked.get(op).is_some_and(|&n| n > 0),
            "`{op}` never ran: {checked:?}"
        );
    }
}

#[test]
fn families_cover_the_value_checked_operators() {
    let names: Vec<&str> = kiln::kernels::ops().iter().map(|op| op.name).collect();
    for op in VALUE_CHECKED {
        assert!(names.contains(op), "`{op}` is not a registered operator");
        assert!(FAMILIES.contains(&family_of(op)));
    }
}

#[test]
fn every_core_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("core");
}

#[test]
fn every_gla_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("gla");
}

#[test]
fn every_gla_backward_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("gla_backward");
}

#[test]
fn every_quantized_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("quantized");
}

#[test]
fn every_attention_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("attention");
}

#[test]
fn every_moe_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("moe");
}

#[test]
fn every_s2ft_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("s2ft");
}

#[test]
fn every_optim_operator_matches_its_reference_on_random_shapes_or_refuses_clearly() {
    every_operator_of("optim");
}

/// Special values to plant: signed zeros, infinities, NaN, a subnormal, f16's extremes.
const SPECIAL: &[f64] = &[
    0.0,
    -0.0,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::NAN,
    1e-40,
    65504.0,
    -65504.0,
    6e-8,
];

#[test]
fn special_values_never_panic_and_nan_in_the_reference_is_nan_in_the_result() {
    for op in kiln::kernels::ops() {
        let Some(n) = arity(op) else { continue };
        let case = (op.selftest)()
            .into_iter()
            .next()
            .expect("every op has a case");
        let small: Vec<usize> = DIMS
            .iter()
            .copied()
            .filter(|&d| (1..=17).contains(&d))
            .collect();
        let strategy = (
            proptest::collection::vec(proptest::sample::select(small), n),
            any::<u64>(),
            proptest::collection::vec(
                (
                    any::<proptest::sample::Index>(),
                    proptest::sample::select(SPECIAL),
                ),
                1..4,
            ),
        );
        runner(0x5bec ^ op.name.len() as u64)
            .run(&strategy, |(dims, seed, plants)| {
                let Ok(mut hosts) =
                    example_inputs_seeded(op, &dims, &Default::default(), DType::F32, seed)
                else {
                    return Ok(());
                };
                // Plant the values in the float inputs.
                for (name, h) in hosts.iter_mut() {
                    if !h.dtype.is_float() || h.shape.iter().product::<usize>() == 0 {
                        continue;
                    }
                    let mut v = h.to_f64();
                    for (at, x) in &plants {
                        let i = at.index(v.len());
                        v[i] = *x;
                    }
                    *h = HostTensor::from_f64(h.dtype, h.shape.clone(), &v)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                }
                let start = Instant::now();
                let want = reference(&case, &hosts);
                let outs = op.call_host(client(), &hosts, params(&case));
                prop_assert!(
                    start.elapsed() < CASE_LIMIT,
                    "{} took {:?}",
                    op.name,
                    start.elapsed()
                );
                let outs = match outs {
                    Ok(o) => o,
                    Err(e) => {
                        prop_assert!(is_typed(&e.to_string()), "{}: {e}", op.name);
                        return Ok(());
                    }
                };
                // NaN in the reference is NaN in the result (a kernel never turns NaN
                // into a number). The reverse may happen within one block of work:
                // docs/numerics.md lists where (0 x NaN in masked products).
                // With an infinity planted, inf - inf and 0 x inf depend on how an
                // algorithm groups its sums (the chunked forms are not the recurrence):
                // such results may be inf or NaN where the reference has the other.
                let infinite = plants.iter().any(|(_, x)| x.is_infinite());
                if let (false, Some(want), Some(got)) = (infinite, want, outs.get(case.output)) {
                    let got = got.to_f64();
                    prop_assert_eq!(
                        got.len(),
                        want.len(),
                        "{} {:?}: `{}`",
                        op.name,
                        dims,
                        case.output
                    );
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        prop_assert!(
                            !w.is_nan() || g.is_nan(),
                            "{} {dims:?} with {plants:?}: `{}`[{i}] is {g}, the reference NaN",
                            op.name,
                            case.output
                        );
                    }
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A knob's values: its declared list or range, plus a few outside it.
fn knob_values(values: &str) -> Vec<String> {
    let mut out: Vec<String> = if let Some((a, b)) = values.split_once("..=") {
        let (a, b): (u32, u32) = (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0));
        vec![a, b, a + (b - a) / 2]
            .into_iter()
            .map(|x| x.to_string())
            .collect()
    } else {
        values.split('|').map(|v| v.trim().to_string()).collect()
    };
    out.extend(["0", "3", "4294967295", "100000", "-1", "x"].map(String::from));
    out
}

#[test]
fn emit_over_every_declared_domain_returns_source_or_a_typed_error() {
    for spec in kiln::kernels::kernels() {
        let knobs: Vec<(&str, Vec<String>)> = spec
            .config
            .iter()
            .map(|p| (p.name, knob_values(p.values)))
            .collect();
        let strategy: Vec<_> = knobs
            .iter()
            .map(|(_, vals)| proptest::sample::select(vals.clone()))
            .collect();
        runner(0xe317 ^ spec.name.len() as u64)
            .run(&(strategy, proptest::bool::ANY), |(chosen, cuda)| {
                let values: BTreeMap<String, String> = knobs
                    .iter()
                    .zip(&chosen)
                    .map(|((k, _), v)| (k.to_string(), v.clone()))
                    .collect();
                let target = if cuda { Target::Cuda } else { Target::Wgsl };
                let start = Instant::now();
                let result =
                    KernelConfig::new(spec, values.clone()).and_then(|c| emit(spec, target, &c));
                prop_assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{} {values:?}: emission took {:?}",
                    spec.name,
                    start.elapsed()
                );
                if let Err(e) = result {
                    prop_assert!(is_typed(&e.to_string()), "{} {values:?}: {e}", spec.name);
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn softmax_and_logsumexp_rows_with_nan_or_inf_are_nan_as_in_pytorch() {
    // Row 0: a NaN; row 1: +inf; row 2: -inf only in one place (fine); row 3: all -inf.
    let cols = 5;
    let inf = f64::INFINITY;
    let x = [
        [1.0, f64::NAN, 2.0, 0.0, -1.0],
        [1.0, inf, 2.0, 0.0, -1.0],
        [1.0, -inf, 2.0, 0.0, -1.0],
        [-inf, -inf, -inf, -inf, -inf],
    ]
    .concat();
    let hosts = BTreeMap::from([(
        "x".to_string(),
        HostTensor::from_f64(DType::F32, vec![4, cols], &x).unwrap(),
    )]);
    let run = |op: &str| {
        kiln::kernels::op(op)
            .unwrap()
            .call_host(client(), &hosts, BTreeMap::new())
            .unwrap()["out"]
            .to_f64()
    };
    let s = run("softmax");
    assert!(s[..2 * cols].iter().all(|v| v.is_nan()), "{s:?}");
    assert!(s[2 * cols..3 * cols].iter().all(|v| v.is_finite()) && s[2 * cols + 1] == 0.0);
    assert_eq!(&s[3 * cols..], &[0.0; 5]);
    let l = run("logsumexp");
    assert!(l[0].is_nan() && l[1].is_nan() && l[2].is_finite(), "{l:?}");
    assert_eq!(l[3], f64::NEG_INFINITY);
}
