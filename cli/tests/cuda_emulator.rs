//! `kiln selftest` on kiln's CUDA emulator (`tools/cuda-emu`, `scripts/cuda-emu`): the
//! CUDA backend's kernels as cubecl emits them for a GPU, tensor-core (`wmma`) kernels
//! included, compiled by the host C++ compiler and run on the CPU, each case against its
//! f64 reference. Every case runs under two thread schedules, thread 0 first and the
//! last thread (and block) first: units of a cube that race between two barriers give a
//! wrong result in at least one (the attention forward's `stat` race was found so).
//!
//! The operators are split into [`SHARDS`] tests of about equal case counts, families
//! kept together (they share kernels, which are compiled once per machine and cached in
//! `target/cuda-emu/cache`), so that no test runs for minutes and a new operator is
//! covered without a change here.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

use std::process::Command;

/// How many tests the operators are split into.
const SHARDS: usize = 8;

/// The operators of shard `shard`: all operators with self-test cases, sorted by name
/// (families are contiguous), cut where the running case count crosses a multiple of
/// `total / SHARDS`.
fn shard_ops(shard: usize) -> Vec<&'static str> {
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    let mut cases: Vec<&'static str> = kiln::selftest::cases().iter().map(|c| c.op).collect();
    cases.sort_unstable();
    for op in cases {
        match counts.last_mut() {
            Some((last, n)) if *last == op => *n += 1,
            _ => counts.push((op, 1)),
        }
    }
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let mut before = 0;
    let mut ops = Vec::new();
    for (op, n) in counts {
        if (before * SHARDS / total).min(SHARDS - 1) == shard {
            ops.push(op);
        }
        before += n;
    }
    ops
}

/// Runs `kiln selftest --op ..` for `ops` on the emulator under `schedule`; panics with
/// the whole output unless every case passed (or was skipped as f32 on tensor cores).
fn emulated_selftest(ops: &[&str], schedule: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cuda-emu");
    let mut command = Command::new(script);
    command
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("selftest")
        .env("KEMU_SCHEDULE", schedule)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("KILN_DEVICE");
    for op in ops {
        command.args(["--op", op]);
    }
    let out = command.output().expect("scripts/cuda-emu runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the self-test of {ops:?} failed on the CUDA emulator ({schedule} schedule):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("kiln CUDA emulator") && stdout.contains(" 0 failed"),
        "not a run on the emulator, or not every case passed:\n{stdout}\n{stderr}"
    );
}

fn check_shard(shard: usize) {
    let ops = shard_ops(shard);
    assert!(
        !ops.is_empty(),
        "shard {shard} of {SHARDS} has no operators"
    );
    for schedule in ["forward", "reverse"] {
        emulated_selftest(&ops, schedule);
    }
}

#[test]
fn shards_cover_every_operator_once() {
    let mut all: Vec<&str> = (0..SHARDS).flat_map(shard_ops).collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "an operator in two shards");
    let mut want: Vec<&str> = kiln::selftest::cases().iter().map(|c| c.op).collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(all, want);
}

#[test]
fn selftest_shard_0_on_the_cuda_emulator() {
    check_shard(0);
}

#[test]
fn selftest_shard_1_on_the_cuda_emulator() {
    check_shard(1);
}

#[test]
fn selftest_shard_2_on_the_cuda_emulator() {
    check_shard(2);
}

#[test]
fn selftest_shard_3_on_the_cuda_emulator() {
    check_shard(3);
}

#[test]
fn selftest_shard_4_on_the_cuda_emulator() {
    check_shard(4);
}

#[test]
fn selftest_shard_5_on_the_cuda_emulator() {
    check_shard(5);
}

#[test]
fn selftest_shard_6_on_the_cuda_emulator() {
    check_shard(6);
}

#[test]
fn selftest_shard_7_on_the_cuda_emulator() {
    check_shard(7);
}
