//! `kiln selftest` on kiln's CUDA emulator (`tools/cuda-emu`, `scripts/cuda-emu`): the
//! CUDA backend's kernels as cubecl emits them for a GPU, tensor-core (`wmma`) kernels
//! included, compiled by the host C++ compiler and run on the CPU, each case against its
//! f64 reference. Every case runs under two thread schedules, thread 0 first and the
//! last thread (and block) first: units of a cube that race between two barriers give a
//! wrong result in at least one (the attention forward's `stat` race was found so).
//! Shared memory starts as NaN in one run and as 3.4e38 in the other, locals as a
//! pattern, and UBSan reports what x86 and PTX define differently (shifts by 32 or
//! more, out-of-range float-to-int conversions, misaligned vector accesses).
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

/// Runs `kiln selftest --op ..` for `ops` on the emulator under `schedule`, shared
/// memory and fresh buffers filled with `poison` bytes; panics with the whole output
/// unless the device had (int8) tensor cores, every case passed, none but f32 ones on
/// tensor cores was skipped, and the sanitizers of the emulated kernels reported nothing.
fn emulated_selftest(ops: &[&str], schedule: &str, poison: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cuda-emu");
    let mut command = Command::new(script);
    command
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("selftest")
        .env("KEMU_SCHEDULE", schedule)
        .env("KEMU_POISON", poison)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        // The emulated device is compute capability 8.0 with the default compile flags.
        .env_remove("KEMU_ARCH")
        .env_remove("KEMU_CXXFLAGS")
        .env_remove("KILN_DEVICE")
        .env_remove("KILN_AUTOTUNE");
    for op in ops {
        command.args(["--op", op]);
    }
    let out = command.output().expect("scripts/cuda-emu runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("{ops:?}, {schedule} schedule, poison {poison}:\n{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the self-test failed on the CUDA emulator: {context}"
    );
    assert!(
        stdout.contains("kiln CUDA emulator") && stdout.contains("tensor cores:  yes (int8 yes)"),
        "not the emulator, or it reported no (int8) tensor cores: {context}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("selftest on "))
        .unwrap_or_else(|| panic!("no summary line: {context}"));
    assert!(
        summary.contains(" 0 failed") && !summary.contains(": 0 passed"),
        "not every case passed: {context}"
    );
    for line in stdout.lines().filter(|l| l.contains(" skip ")) {
        assert!(
            line.split_whitespace().nth(1) == Some("f32") && line.contains("tensor cores"),
            "only f32 cases on tensor cores may be skipped on the emulator, not:\n{line}\n{context}"
        );
    }
    assert!(
        !stderr.contains("runtime error"),
        "a kernel did what x86 and the GPU define differently (UBSan): {context}"
    );
}

fn check_shard(shard: usize) {
    let ops = shard_ops(shard);
    assert!(
        !ops.is_empty(),
        "shard {shard} of {SHARDS} has no operators"
    );
    // Shared memory NaN-filled (0xff) in one run, filled with 3.4e38 (0x7f, which
    // max() does not drop) in the other.
    emulated_selftest(&ops, "forward", "0xff");
    emulated_selftest(&ops, "reverse", "0x7f");
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
