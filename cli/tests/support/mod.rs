//! Helpers shared by the command-line test files: running the binary, reading its
//! output, and the shape of a clear user error.

#![allow(dead_code)]

use std::process::{Command, Output};

pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("kiln binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a user error: exit status 2 (not a panic's 101), exactly one line on
/// stderr, containing every `needle`, and no panic text.
pub fn assert_clear_error(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected a user error, stderr: {err}"
    );
    assert!(
        !err.contains("panicked")
            && !err.contains("internal error")
            && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A fresh directory for one test.
pub fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `kiln` with its tune cache in `dir`.
pub fn kiln_in_cache(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_CACHE_DIR", dir)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("kiln binary runs")
}

/// `kiln run OP --input IN --output OUT EXTRA...`.
pub fn run_op(
    op: &str,
    input: &std::path::Path,
    output: &std::path::Path,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "run",
        op,
        "--input",
        input.to_str().expect("utf-8 path"),
        "--output",
        output.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}
