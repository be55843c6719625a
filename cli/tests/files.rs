//! What `kiln` does with files and odd requests: no input destroyed, no special file
//! replaced, nothing left behind, no panic, several processes sharing one tune cache
//! (issue 13's reproductions, each a regression test).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod support;

use kiln::{load_safetensors, save_safetensors, HostTensor};
use std::collections::BTreeMap;
use std::path::Path;
use support::{assert_clear_error, kiln, kiln_in_cache, run_op, tmpdir};

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let m: BTreeMap<String, HostTensor> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), HostTensor::from_f32(s.clone(), v).unwrap()))
        .collect();
    save_safetensors(path, &m).unwrap();
}

fn softmax_input(path: &Path) {
    write(
        path,
        &[("x", vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 1.0])],
    );
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".kiln-") || n.ends_with(".tmp") && !n.starts_with("t."))
        .collect()
}

#[test]
fn an_input_named_like_a_temporary_file_survives() {
    let d = tmpdir("tmpname");
    let input = d.join("t.safetensors.tmp");
    softmax_input(&input);
    let before = std::fs::read(&input).unwrap();
    let o = run_op("softmax", &input, &d.join("t.safetensors"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input is intact"
    );
    assert!(load_safetensors(d.join("t.safetensors"))
        .unwrap()
        .contains_key("out"));
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

#[cfg(unix)]
#[test]
fn special_files_are_refused_and_symlinks_followed() {
    use std::os::unix::fs::FileTypeExt;
    let d = tmpdir("special");
    let input = d.join("in.safetensors");
    softmax_input(&input);
    let run = |out: &str| run_op("softmax", &input, Path::new(out), &[]);
    // An input that is a device (read without end) or a directory: refused before
    // anything is read.
    for bad_input in ["/dev/zero", d.to_str().unwrap()] {
        assert_clear_error(
            &run_op(
                "softmax",
                Path::new(bad_input),
                &d.join("o.safetensors"),
                &[],
            ),
            &[bad_input, "not a regular file"],
        );
    }
    // A character device stays one.
    assert_clear_error(
        &run("/dev/full"),
        &["/dev/full", "character device", "not a regular file"],
    );
    assert!(std::fs::metadata("/dev/full")
        .unwrap()
        .file_type()
        .is_char_device());
    // A FIFO is refused (opening it for writing would block or feed a reader).
    let fifo = d.join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        assert_clear_error(&run(fifo.to_str().unwrap()), &["FIFO"]);
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }
    // A directory: refused, nothing left behind in it or beside it.
    let dir_out = d.join("adir");
    std::fs::create_dir(&dir_out).unwrap();
    assert_clear_error(&run(dir_out.to_str().unwrap()), &["is a directory"]);
    assert!(leftovers(&d).is_empty() && leftovers(&dir_out).is_empty());
    // A symlink is followed: the file it names is replaced, the link stays a link.
    let target = d.join("real.safetensors");
    std::fs::write(&target, b"old").unwrap();
    let link = d.join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = run(link.to_str().unwrap());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(load_safetensors(&target).unwrap().contains_key("out"));
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

#[test]
fn empty_dimensions_are_results_not_panics() {
    let d = tmpdir("empty");
    // matmul with K = 0: the epilogue of a zero product.
    let mm = d.join("k0.safetensors");
    write(
        &mm,
        &[
            ("a", vec![3, 0], vec![]),
            ("b", vec![0, 5], vec![]),
            ("bias", vec![5], vec![1.0, -2.0, 0.5, 0.0, 3.0]),
        ],
    );
    let out = d.join("k0.out.safetensors");
    let o = run_op("matmul", &mm, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = load_safetensors(&out).unwrap()["c"].to_f64();
    assert_eq!(c, [1.0, -2.0, 0.5, 0.0, 3.0].repeat(3));
    // gla with T = 0: an empty output.
    let g = d.join("t0.safetensors");
    let e = |n| (n, vec![1, 0, 2, 8], vec![]);
    write(&g, &[e("q"), e("k"), e("v"), e("g")]);
    let out = d.join("t0.out.safetensors");
    let o = run_op("gla", &g, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(load_safetensors(&out).unwrap()["o"].shape, vec![1, 0, 2, 8]);
}

#[test]
fn emit_refuses_knobs_outside_their_domain() {
    for (kernel, knob, words) in [
        ("gla_fused_fwd", "kp=0", "16 | 32 | 48"),
        ("gla_fused_fwd", "kp=3", "16 | 32 | 48"),
        ("gla_fused_fwd", "kp=4294967295", "16 | 32 | 48"),
        ("gla_fused_fwd", "kp=100000", "16 | 32 | 48"),
        ("gla_recurrent", "dk=4294967295", "1..=1024"),
        (
            "gla_recurrent",
            "init_mode=99",
            "zero | from_init | in_place",
        ),
        ("gla_scores", "chunk=0", "16 | 32 | 64"),
        ("gla_scores", "chunk=3", "16 | 32 | 64"),
        ("matmul_staged", "act=99", "none | silu | gelu"),
        ("qgemm_gemv", "mt=0", "1 | 2 | 4 | 8"),
        ("qgemm_gemv", "mt=1000", "1 | 2 | 4 | 8"),
    ] {
        let param = knob.split('=').next().unwrap();
        assert_clear_error(
            &kiln(&["emit", kernel, "--config", knob]),
            &[&format!("parameter `{param}`"), words],
        );
    }
    assert_clear_error(
        &kiln(&[
            "emit",
            "matmul_cmma",
            "--target",
            "cuda",
            "--config",
            "dtype=f32",
        ]),
        &["f16 | bf16", "matmul_cmma"],
    );
}

#[test]
fn ambiguous_or_unused_arguments_are_reported() {
    let d = tmpdir("args");
    let input = d.join("in.safetensors");
    // `Bias` is not `bias`: it is not used, and kiln says so.
    write(
        &input,
        &[
            ("a", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            ("b", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("Bias", vec![2], vec![5.0, 5.0]),
        ],
    );
    let out = d.join("out.safetensors");
    let o = run_op("matmul", &input, &out, &[]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not used by `matmul`") && err.contains("Bias"),
        "{err}"
    );
    // A repeated --set is an error naming both values.
    let o = run_op("softmax", &input, &out, &["--set", "x=1", "--set", "x=2"]);
    assert_clear_error(&o, &["each key once", "x=1", "x=2"]);
    // --samples 0 is refused by the parser (exit 2), not silently 1.
    let o = kiln(&["bench", "softmax", "--shape", "4x4", "--samples", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--samples"));
    // tune needs a shape (no default fits every operator's problem).
    let o = kiln(&["tune", "softmax"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shape"));
    // A shape past the device's buffer limit is refused before its inputs are built
    // (4 GB of f32 here, 8 GB of f64 on the host before).
    assert_clear_error(
        &kiln(&["tune", "softmax", "--shape", "20000x50000"]),
        &["buffer", "`x`"],
    );
    // tune --export takes no operator (it would silently skip tuning).
    let o = kiln(&[
        "tune",
        "softmax",
        "--export",
        d.join("e.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}

#[cfg(unix)]
#[test]
fn tune_says_when_nothing_was_stored() {
    // A cache "directory" that is a file: nothing can be stored, and tune says so and
    // fails (exit 2: storing is its job), as `--import` does.
    let d = tmpdir("unwritable");
    let blocker = d.join("cache");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let o = kiln_in_cache(&blocker, &["tune", "softmax", "--shape", "8x40"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("NOT stored"), "{out}");
    assert!(!out.contains("; cache "), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("error: ") && err.contains("NOT stored"),
        "{err}"
    );
}

#[test]
fn processes_tuning_into_one_cache_keep_every_entry() {
    // Four processes tune different shapes into one cache at once: the lock around the
    // cache's read-merge-write keeps all their entries.
    let d = tmpdir("concurrent");
    let shapes = ["16x40", "16x300", "64x40", "64x1000"];
    let children: Vec<_> = shapes
        .iter()
        .map(|s| {
            std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["tune", "softmax", "--shape", s])
                .env("KILN_CACHE_DIR", &d)
                .env("XDG_RUNTIME_DIR", std::env::temp_dir())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let text = std::fs::read_to_string(d.join("autotune.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<String> = v["entries"].as_object().unwrap().keys().cloned().collect();
    // rows x cols is bucketed to powers of two in the key: 16x64, 16x512, 64x64, 64x1024.
    for want in [
        "rows=16;cols=64",
        "rows=16;cols=512",
        "rows=64;cols=64",
        "rows=64;cols=1024",
    ] {
        assert!(
            keys.iter().any(|k| k.contains(want)),
            "{want} missing from {keys:?}"
        );
    }
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

#[test]
fn a_reader_that_goes_away_is_not_an_internal_error() {
    // `kiln emit --list | head`: stdout's reader closes early. kiln stops quietly (exit 0,
    // nothing on stderr) instead of reporting an internal error.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["emit", "--list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("internal error"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}

#[test]
fn a_full_stdout_is_a_clear_error_not_an_internal_one() {
    // Linux's /dev/full: every write fails with ENOSPC.
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return;
    };
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["ops", "matmul"])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("internal error"), "{err}");
    assert!(
        err.contains("could not write the output to stdout"),
        "{err}"
    );
    assert_eq!(o.status.code(), Some(2), "{err}");
}
