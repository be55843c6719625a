//! The operator suite, written once: every self-test case of every registered operator
//! (`kiln::selftest`, each against its f64 reference), instantiated per device and dtype
//! by `testgen_ops!` (cubecl's `testgen` pattern) in the `ops` (f32) and `ops_half` (f16,
//! bf16) binaries. A dtype the device lacks must be refused with `Unsupported`, a device
//! the machine lacks with `Device`; both are asserted.

use crate::common;
use kiln::selftest::{cases, run_case, Outcome};
use kiln::{Client, DType};

fn run_op(client: &Client, op: &str, dtype: DType) {
    let mut ran = 0;
    // An operator none of whose inputs follows the float dtype (w8a8: int8 codes and
    // f32 scales) runs whatever the device lacks.
    let spec = kiln::kernels::op(op).unwrap();
    let dtype_free = spec.inputs.iter().all(|t| t.example_dtype(dtype) != dtype);
    for (i, case) in cases().iter().enumerate().filter(|(_, c)| c.op == op) {
        let outcome = run_case(client, case, dtype, 7 + i as u64);
        // A device with the dtype must pass; one without must refuse it, not compute.
        match (&outcome, client.supports(dtype) || dtype_free) {
            (Outcome::Pass(..), true) | (Outcome::Refused(_), false) => {}
            // Tensor-core cases: where they cannot run, a clear refusal naming them.
            (Outcome::Unavailable(m), _) if case_needs_tensor_cores(case) => {
                let report = client.report();
                // As runtime/src/selftest.rs: wmma fragments of 32-unit planes; W8A8's
                // int8 ones take any output dtype.
                let planes = report.plane_size.0 == 32;
                let has = match case.op == "w8a8" {
                    true => report.int8_tensor_cores && planes,
                    false => report.tensor_cores && planes && dtype != DType::F32,
                };
                assert!(
                    !has,
                    "{op} {dtype}: refused on a device with tensor cores: {m}"
                );
            }
            (o, has) => panic!(
                "{op} {dtype} ({}), device has {dtype}: {has}: {o:?}",
                case.what
            ),
        }
        ran += 1;
    }
    assert!(ran > 0, "no case for {op}");
}

/// Whether `case` asks for the tensor-core tiles (`matmul`'s and `moe_expert_ffn`'s
/// `kernel=tensor_cores`, W8A8's `path=tensor_cores`).
fn case_needs_tensor_cores(case: &kiln::selftest::Case) -> bool {
    case.params.contains(&("kernel", "tensor_cores"))
        || case.params.contains(&("path", "tensor_cores"))
}

/// The suite for the given devices and dtypes: `device::dtype::op` for the operators
/// listed here (one test each), and `device::dtype::every_other_op_N_of_6` for every
/// registered operator not listed, so a new operator is tested from its registration
/// alone. Each device is opened by its selector; one this machine lacks must be refused
/// with a clear `Device` error (asserted), like a dtype the device lacks. `ops`
/// instantiates it for f32, `ops_half` for f16 and bf16, from this one list.
macro_rules! testgen_ops {
    (devices: $devices:tt, dtypes: $dtypes:tt) => {
        testgen_ops!(
            devices: $devices,
            dtypes: $dtypes,
            ops: [
                add, mul, silu, gelu, softmax, logsumexp, matmul,
                gla, gla_recurrent, gla_step, gla_backward,
                w4a16, w4a16_repack, w8a8, quantize_per_token, w8_bits, flexround, flexround_backward,
            ]
        );
    };
    (devices: [$($device:ident => $selector:expr),*], dtypes: $dtypes:tt, ops: $ops:tt) => {
        testgen_ops!(@names $ops);
        $(mod $device {
            use super::*;
            testgen_ops!(@dtypes $selector, $dtypes, $ops);
        })*
    };
    (@names [$($op:ident),* $(,)?]) => {
        /// The operators the suite instantiates (checked against the registry).
        const TESTED: &[&str] = &[$(stringify!($op)),*];
    };
    (@dtypes $selector:expr, [$($module:ident => $dtype:expr),*], $ops:tt) => {
        $(mod $module {
            use super::*;
            testgen_ops!(@ops $selector, $dtype, $ops);
        })*
    };
    (@ops $selector:expr, $dtype:expr, [$($op:ident),* $(,)?]) => {
        $(#[test] fn $op() { run_op_on($selector, stringify!($op), $dtype) })*
        #[test]
        fn every_other_op_1_of_6() { every_other_op($selector, $dtype, 0) }
        #[test]
        fn every_other_op_2_of_6() { every_other_op($selector, $dtype, 1) }
        #[test]
        fn every_other_op_3_of_6() { every_other_op($selector, $dtype, 2) }
        #[test]
        fn every_other_op_4_of_6() { every_other_op($selector, $dtype, 3) }
        #[test]
        fn every_other_op_5_of_6() { every_other_op($selector, $dtype, 4) }
        #[test]
        fn every_other_op_6_of_6() { every_other_op($selector, $dtype, 5) }
    };
}

/// Tests run in parallel (and each under a minute, cold): the operators the list does
/// not name are dealt into [`SHARDS`] tests ([`dealt`]).
const SHARDS: usize = 6;

/// The operators of `ops` that fall to `shard`: dealt round-robin, the ones that compile
/// many kernels (backward passes, ring attention, GLA, a whole MoE layer) first, so that
/// they spread over the shards.
fn dealt(
    ops: impl Iterator<Item = &'static kiln::runtime::OpSpec>,
    shard: usize,
) -> Vec<&'static kiln::runtime::OpSpec> {
    let heavy = |name: &str| {
        ["backward", "ring_", "gla", "layer"]
            .iter()
            .any(|w| name.contains(w))
    };
    let mut ops: Vec<_> = ops.collect();
    ops.sort_by_key(|o| !heavy(o.name));
    ops.into_iter().skip(shard).step_by(SHARDS).collect()
}

/// `shard` of the operators the list does not name, on `selector`'s device.
pub fn every_other_op(selector: &str, dtype: DType, shard: usize) {
    let unlisted = kiln::kernels::ops()
        .iter()
        .copied()
        .filter(|o| !crate::TESTED.contains(&o.name));
    for op in dealt(unlisted, shard) {
        run_op_on(selector, op.name, dtype);
    }
}

/// Runs `op`'s cases on the device `selector` names; on a machine without that device,
/// `client_for` has asserted that it is refused with a clear `Device` error.
pub fn run_op_on(selector: &str, op: &str, dtype: DType) {
    if let Ok(c) = common::client_for(selector) {
        run_op(c, op, dtype)
    }
}
