//! `kiln comm-check`, `kiln nccl-id` and the NCCL line of `kiln devices`: the
//! communicator's checks over HostComm on this machine's device, and NCCL's loading
//! without a GPU (NVIDIA's `nvidia-nccl-cu12` package, which `scripts/install-cuda-toolkit`
//! puts in `KILN_CUDA_TOOLKIT`; the NCCL collectives themselves need a GPU:
//! `scripts/gpu-check`).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod support;

use std::process::{Command, Output};
use support::{assert_clear_error, kiln, stdout};

/// `kiln ARGS` with NCCL out of reach: no toolkit directory, no virtualenv, no Python.
fn kiln_without_nccl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("KILN_CUDA_TOOLKIT")
        .env_remove("KILN_NCCL_LIB")
        .env_remove("VIRTUAL_ENV")
        .env("KILN_PYTHON", "/nonexistent/python3")
        .output()
        .expect("kiln binary runs")
}

/// The toolkit directory with NCCL in it, or `None` (loudly) where the CUDA checks
/// are skipped on purpose.
fn toolkit() -> Option<String> {
    if std::env::var_os("KILN_SKIP_CUDA_CHECK").is_some() {
        eprintln!("SKIPPED: KILN_SKIP_CUDA_CHECK is set: NCCL's loading was not checked");
        return None;
    }
    let dir = std::env::var("KILN_CUDA_TOOLKIT").unwrap_or_else(|_| {
        panic!("KILN_CUDA_TOOLKIT is not set: run scripts/install-cuda-toolkit and export its output (scripts/test does), or set KILN_SKIP_CUDA_CHECK=1")
    });
    Some(dir)
}

fn with_toolkit(dir: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("KILN_CUDA_TOOLKIT", dir)
        .env_remove("KILN_NCCL_LIB")
        .output()
        .expect("kiln binary runs")
}

#[test]
fn comm_check_passes_every_collective_over_host_staging() {
    for ranks in ["1", "3"] {
        let o = kiln(&["comm-check", "--backend", "host", "--ranks", ranks]);
        let s = stdout(&o);
        assert!(
            o.status.success(),
            "{s}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            s.contains(&format!("{ranks} ranks: every collective matches")),
            "{s}"
        );
        for case in [
            "all_reduce f32",
            "all_gather uneven",
            "all_to_all i32",
            "send_recv ring",
            "barrier",
        ] {
            let n = s.lines().filter(|l| l.contains(case)).count();
            assert_eq!(n.to_string(), ranks, "{case}: one line per rank\n{s}");
        }
        assert!(!s.contains("FAILED"), "{s}");
    }
}

#[test]
fn comm_check_refuses_an_unknown_backend_and_a_device_for_nccl() {
    assert_clear_error(
        &kiln(&["comm-check", "--backend", "mpi"]),
        &["--backend", "host or nccl", "mpi"],
    );
    assert_clear_error(
        &kiln(&["comm-check", "--backend", "nccl", "--device", "wgpu"]),
        &["--device", "cuda:0..N-1", "wgpu"],
    );
    // More host ranks than the one device's queue serves in reasonable time.
    assert_clear_error(
        &kiln(&["comm-check", "--ranks", "200"]),
        &["--ranks", "1..=128", "200"],
    );
}

#[test]
fn without_nccl_every_entry_point_says_what_to_install() {
    let system = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libnccl.so.2"))
        .unwrap_or(false);
    if system {
        eprintln!("SKIPPED: this machine has a system libnccl.so.2; the missing-library error cannot be produced");
        return;
    }
    let hint = "pip install nvidia-nccl-cu12";
    assert_clear_error(
        &kiln_without_nccl(&["nccl-id"]),
        &["NCCL (libnccl.so.2) not found", hint],
    );
    // The NCCL check fails on the first thing missing here (NCCL, then a CUDA device),
    // in one line either way.
    assert_clear_error(
        &kiln_without_nccl(&["comm-check", "--backend", "nccl"]),
        &[hint],
    );
    let s = stdout(&kiln_without_nccl(&["devices"]));
    assert!(
        s.lines()
            .any(|l| l.starts_with("NCCL: none:") && l.contains(hint)),
        "{s}"
    );
    // A KILN_NCCL_LIB that names nothing is named.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("nccl-id")
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("KILN_NCCL_LIB", "/nonexistent/libnccl.so.2")
        .output()
        .expect("kiln runs");
    assert_clear_error(
        &o,
        &["KILN_NCCL_LIB=/nonexistent/libnccl.so.2: no such file"],
    );
}

#[test]
fn with_nvidias_package_devices_shows_nccls_version_and_ids_are_fresh() {
    let Some(dir) = toolkit() else { return };
    let s = stdout(&with_toolkit(&dir, &["devices"]));
    let line = s
        .lines()
        .find(|l| l.starts_with("NCCL:"))
        .unwrap_or_default();
    assert!(
        line.starts_with("NCCL: 2.26.2 (") && line.contains("nvidia/nccl/lib/libnccl.so.2"),
        "{s}"
    );
    let j = with_toolkit(&dir, &["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).expect("json");
    assert_eq!(v["nccl"]["version"], "2.26.2", "{v}");
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let o = with_toolkit(&dir, &["nccl-id"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            stdout(&o).trim().to_string()
        })
        .collect();
    for id in &ids {
        assert_eq!(id.len(), 256, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        kiln::runtime::comm::nccl::NcclId::parse(id).expect("the id parses back");
    }
    assert_ne!(ids[0], ids[1], "two calls, two ids");
}
