//! The `kiln` tool end to end: exit codes and one-line errors that name the tensor or
//! parameter.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

#[path = "../../tests/common/mod.rs"]
mod common;

mod support;

use kiln::{load_safetensors, save_safetensors, HostTensor};
use std::collections::BTreeMap;
use support::{assert_clear_error, kiln, kiln_in_cache, run_op, stdout, tmp, tmpdir};

#[test]
fn devices_reports_the_adapter_and_backend() {
    let o = kiln(&["devices"]);
    assert!(o.status.success());
    let s = stdout(&o);
    assert!(s.contains("auto picks"), "{s}");
    assert!(s.contains("backend:"), "{s}");
    let j = kiln(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert!(v["auto"]["name"].is_string(), "{v}");
}

#[test]
fn ops_lists_the_library_and_describes_one() {
    let s = stdout(&kiln(&["ops"]));
    for op in ["add", "mul", "silu", "gelu", "softmax", "logsumexp"] {
        assert!(s.lines().any(|l| l.starts_with(op)), "{op} missing: {s}");
    }
    let s = stdout(&kiln(&["ops", "add"]));
    assert!(
        s.contains("inputs:") && s.contains("y") && s.contains("outputs:") && s.contains("out"),
        "{s}"
    );
    // Columns line up whatever the longest name (`d_dispatched`, `batch_prioritized`).
    for (op, params) in [("moe_gate", 4), ("moe_dispatch_backward", 0)] {
        let s = stdout(&kiln(&["ops", op]));
        let column = |l: &str, at: &str| l.find(at).unwrap();
        let shapes: Vec<usize> = s
            .lines()
            .filter(|l| l.starts_with("  ") && l.contains('['))
            .map(|l| column(l, "["))
            .collect();
        let defaults: Vec<usize> = s
            .lines()
            .filter(|l| l.contains(" default "))
            .map(|l| column(l, " default "))
            .collect();
        assert_eq!(
            (shapes.len() >= 4, defaults.len()),
            (true, params),
            "{op}\n{s}"
        );
        for c in [&shapes, &defaults] {
            assert!(c.iter().all(|&x| x == c[0]), "{op}: {c:?}\n{s}");
        }
    }
    assert_clear_error(
        &kiln(&["ops", "sofmax"]),
        &["unknown operator `sofmax`", "softmax"],
    );
}

#[test]
fn run_softmax_on_a_pytorch_file() {
    let out = tmp("softmax_out.safetensors");
    let input = common::data("softmax_f32.safetensors");
    let o = run_op("softmax", &input, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_safetensors(&out).unwrap();
    let want = load_safetensors(&input).unwrap();
    let e = kiln::check::max_rel_error(&got["out"].to_f64(), &want["expected_out"].to_f64(), 0.0);
    assert!(e < 1e-6, "{e:e}");
}

#[test]
fn run_errors_name_the_tensor() {
    // A file with `x` but no `y` for `add`.
    let f = tmp("only_x.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "x".to_string(),
        HostTensor::from_f32(vec![2, 3], &[1.0; 6]).unwrap(),
    );
    save_safetensors(&f, &m).unwrap();
    let out = tmp("o.safetensors");
    let (fi, fo) = (f.to_str().unwrap(), out.to_str().unwrap());
    assert_clear_error(
        &kiln(&["run", "add", "--input", fi, "--output", fo]),
        &["missing input tensor `y`", "add"],
    );

    // Wrong shape for `y`.
    m.insert(
        "y".to_string(),
        HostTensor::from_f32(vec![2], &[1.0; 2]).unwrap(),
    );
    save_safetensors(&f, &m).unwrap();
    assert_clear_error(
        &kiln(&["run", "add", "--input", fi, "--output", fo]),
        &["tensor `y`", "[2, 3]", "found [2]"],
    );

    // Wrong dtype for `x`.
    let mut m = BTreeMap::new();
    m.insert(
        "x".to_string(),
        HostTensor::from_f64(kiln::DType::I32, vec![4], &[1.0; 4]).unwrap(),
    );
    save_safetensors(&f, &m).unwrap();
    assert_clear_error(
        &kiln(&["run", "softmax", "--input", fi, "--output", fo]),
        &["tensor `x`", "expected dtype", "found i32"],
    );

    // Unknown parameter, unknown op, bad device, missing file, not safetensors.
    assert_clear_error(
        &kiln(&[
            "run", "softmax", "--input", fi, "--output", fo, "--set", "dim=0",
        ]),
        &["no parameter `dim`"],
    );
    assert_clear_error(
        &kiln(&[
            "run", "softmax", "--input", fi, "--output", fo, "--set", "dim",
        ]),
        &["KEY=VALUE"],
    );
    assert_clear_error(
        &kiln(&["run", "nope", "--input", fi, "--output", fo]),
        &["unknown operator `nope`"],
    );
    assert_clear_error(
        &kiln(&[
            "run", "softmax", "--input", fi, "--output", fo, "--device", "tpu",
        ]),
        &["parameter `device`", "found `tpu`"],
    );
    assert_clear_error(
        &kiln(&[
            "run",
            "softmax",
            "--input",
            "/nonexistent.safetensors",
            "--output",
            fo,
        ]),
        &["/nonexistent.safetensors"],
    );
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert_clear_error(
        &kiln(&[
            "run",
            "softmax",
            "--input",
            junk.to_str().unwrap(),
            "--output",
            fo,
        ]),
        &["not a valid safetensors file"],
    );
}

#[test]
fn emit_prints_cuda_and_wgsl_without_a_device() {
    let cuda = kiln(&["emit", "row_reduce", "--target", "cuda"]);
    assert!(cuda.status.success());
    assert!(stdout(&cuda).contains("__global__"));
    let wgsl = kiln(&["emit", "row_reduce", "--target", "wgsl"]);
    assert!(wgsl.status.success());
    assert!(stdout(&wgsl).contains("@compute"));
    let m = kiln(&[
        "emit",
        "row_reduce",
        "--target",
        "cuda",
        "--manifest",
        "--config",
        "UNITS=64",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(v["cube_dim"][0], 64);
    assert_eq!(v["shared_memory_bytes"], 64 * 4);
    assert_clear_error(
        &kiln(&["emit", "row_reduce", "--target", "ptx"]),
        &["unknown target `ptx`"],
    );
    assert_clear_error(
        &kiln(&["emit", "row_reduce", "--config", "UNITS=48"]),
        &["parameter `UNITS`", "48"],
    );
    assert_clear_error(
        &kiln(&["emit", "elementwise_binary", "--config", "tile=4"]),
        &["no parameter `tile`"],
    );
    assert_clear_error(
        &kiln(&["emit", "elementwise_binary", "--config", "dtype=bf16"]),
        &["bf16"],
    );
    assert_clear_error(
        &kiln(&["emit", "elementwise_binary", "--config", "dtype=bfloat16"]),
        &["bf16"],
    );
    assert_clear_error(
        &kiln(&["emit", "elementwise_binary", "--config", "dtype=i8"]),
        &["parameter `dtype`", "f32 | f16 | bf16", "i8"],
    );
}

#[test]
fn run_never_overwrites_its_input() {
    let f = tmp("in_place.safetensors");
    let mut m = BTreeMap::new();
    m.insert(
        "x".to_string(),
        HostTensor::from_f32(vec![2, 3], &[1.0; 6]).unwrap(),
    );
    save_safetensors(&f, &m).unwrap();
    let before = std::fs::read(&f).unwrap();
    let p = f.to_str().unwrap();
    assert_clear_error(
        &kiln(&["run", "softmax", "--input", p, "--output", p]),
        &["--output", "other than --input"],
    );
    assert_eq!(std::fs::read(&f).unwrap(), before);
}

#[test]
fn run_ignores_other_tensors_of_any_dtype() {
    // An f64 tensor beside the input, as a PyTorch script might leave: not an error.
    use safetensors::{tensor::TensorView, Dtype};
    let f = tmp("with_f64.safetensors");
    let x: Vec<u8> = [0.5f32, -1.0, 2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let junk: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("x", TensorView::new(Dtype::F32, vec![3], &x).unwrap()),
        (
            "expected_f64",
            TensorView::new(Dtype::F64, vec![2], &junk).unwrap(),
        ),
    ];
    std::fs::write(&f, safetensors::serialize(views, &None).unwrap()).unwrap();
    let out = tmp("with_f64_out.safetensors");
    let (fi, fo) = (f.to_str().unwrap(), out.to_str().unwrap());
    let o = kiln(&["run", "silu", "--input", fi, "--output", fo]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_safetensors(&out).unwrap()["out"].to_f64();
    let want = kiln::kernels::elementwise::reference::silu(&[0.5, -1.0, 2.0]);
    assert!(kiln::check::max_rel_error(&got, &want, 1e-6) < 1e-6);
}

#[test]
fn kiln_tune_twice_hits_the_cache() {
    let dir = tmpdir("cli");
    let kiln = |args: &[&str]| kiln_in_cache(&dir, args);
    let first = kiln(&["tune", "softmax", "--shape", "64x300"]);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        out.contains("UNITS=") && out.contains("tuned now") && out.contains("median"),
        "{out}"
    );
    let second = kiln(&["tune", "softmax", "--shape", "64x300"]);
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains("from the cache") && !out.contains("median"),
        "{out}"
    );
    // A truncated cache file: a warning, then a fresh tune.
    std::fs::write(dir.join("autotune.json"), "{\"version\": 1, \"entr").unwrap();
    let third = kiln(&["tune", "softmax", "--shape", "64x300"]);
    assert!(third.status.success());
    assert!(String::from_utf8_lossy(&third.stderr).contains("corrupt"));
    assert!(String::from_utf8_lossy(&third.stdout).contains("tuned now"));
    let bad = kiln(&["tune", "softmax", "--shape", "64xQ"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--shape"));
    // Dimensions past 32-bit indexing, and shapes whose product is: refused before any
    // input is built on the host.
    for shape in ["4294967296x4294967296", "100000x100000"] {
        let bad = kiln(&["bench", "softmax", "--shape", shape]);
        assert_eq!(bad.status.code(), Some(2), "{shape}");
        let err = String::from_utf8_lossy(&bad.stderr).to_string();
        assert!(
            err.contains("--shape") || err.contains("2147483647"),
            "{shape}: {err}"
        );
    }
}

/// `kiln bench` times an optimizer step in place (set up once, the step repeated, as in
/// training: the out-of-place `run` would time its copies of every state) and says so;
/// other operators it times through `run`.
#[test]
fn kiln_bench_times_optimizer_steps_in_place() {
    let dir = tmpdir("bench");
    for (op, shape, in_place) in [
        ("adamw", "4099", true),
        ("perturb", "4099", true),
        ("softmax", "4x40", false),
    ] {
        let o = kiln_in_cache(&dir, &["bench", op, "--shape", shape, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON line");
        assert_eq!(v["op"], op);
        assert_eq!(v["in_place"], in_place, "{v}");
        assert!(v["median_ms"].as_f64().is_some_and(|t| t > 0.0), "{v}");
        // Calls back to back then one sync, as many as make a sample of 10 ms by the
        // fastest latency (one call with its sync), at most 200: a call of under 5 ms
        // is timed several to a sample.
        let reps = v["calls_per_sample"].as_u64().expect("calls_per_sample");
        assert!((1..=200).contains(&reps), "{v}");
        let latency = v["latency_ms"].as_f64().expect("latency_ms");
        assert!(latency > 0.0, "{v}");
        if latency < 5.0 {
            assert!(reps >= 2, "{v}");
        }
        let text = kiln_in_cache(&dir, &["bench", op, "--shape", shape, "--samples", "1"]);
        assert_eq!(
            stdout(&text).contains("in place"),
            in_place,
            "{}",
            stdout(&text)
        );
    }
}

/// A parameter that decides an input's layout shapes `kiln bench`'s example inputs:
/// matmul with `trans_b=true` gets `b` as `[N, K]`, w4a16 its weight in the `format` and
/// `group_size` given (each was built in the default layout and refused).
#[test]
fn kiln_bench_shapes_inputs_by_their_layout_parameters() {
    let dir = tmpdir("bench-layouts");
    for (op, shape, set) in [
        ("matmul", "24x40x56", "trans_b=false"),
        ("matmul", "24x40x56", "trans_b=true"),
        ("w4a16", "16x64x256", "format=awq"),
        ("w4a16", "16x64x256", "format=kiln"),
        ("w4a16", "16x64x256", "group_size=32"),
        ("w4a16", "16x64x200", "group_size=-1"),
        ("w4a16_repack", "64x256", "format=awq"),
    ] {
        let o = kiln_in_cache(
            &dir,
            &[
                "bench",
                op,
                "--shape",
                shape,
                "--set",
                set,
                "--samples",
                "1",
                "--json",
            ],
        );
        assert!(
            o.status.success(),
            "{op} {set}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON line");
        assert_eq!(v["op"], op, "{v}");
    }
    let bad = kiln_in_cache(
        &dir,
        &[
            "bench",
            "w4a16",
            "--shape",
            "16x60x256",
            "--set",
            "format=awq",
        ],
    );
    assert_clear_error(&bad, &["--shape", "multiple of 8", "N = 60"]);
    // `kiln tune` takes the same parameters: the transposed layout tunes its own key.
    let tuned = kiln_in_cache(
        &dir,
        &[
            "tune",
            "matmul",
            "--shape",
            "24x40x56",
            "--set",
            "trans_b=true",
        ],
    );
    assert!(
        tuned.status.success(),
        "{}",
        String::from_utf8_lossy(&tuned.stderr)
    );
    assert!(stdout(&tuned).contains("matmul: "), "{}", stdout(&tuned));
    let bad = kiln_in_cache(
        &dir,
        &["tune", "matmul", "--shape", "8x8x8", "--set", "trans_c=1"],
    );
    assert_clear_error(&bad, &["trans_c", "trans_b"]);
    let spec = ::kiln::kernels::op("matmul").expect("matmul");
    let params = [("trans_b".to_string(), "true".to_string())].into();
    let shapes = (spec.example_inputs)(&[24, 40, 56], &params).unwrap();
    assert_eq!(shapes, vec![("a", vec![24, 56]), ("b", vec![40, 56])]);
}

#[test]
fn kiln_tune_matmul_times_the_cost_models_finalists() {
    let dir = tmpdir("ranked");
    let ranked = kiln_in_cache(&dir, &["tune", "matmul", "--shape", "96x80x64"]);
    let out = stdout(&ranked);
    assert!(
        ranked.status.success(),
        "{}",
        String::from_utf8_lossy(&ranked.stderr)
    );
    assert!(
        out.contains("tuned now")
            && out.contains("not run (cost model rank")
            && out.contains("candidate(s) run:")
            && out.contains("s timing"),
        "{out}"
    );
    let timed = |out: &str| out.lines().filter(|l| l.ends_with("  ok")).count();
    assert!((1..=6).contains(&timed(&out)), "{out}");
    // --exhaustive does not trust the ranked decision: every candidate runs.
    let all = kiln_in_cache(
        &dir,
        &["tune", "matmul", "--shape", "96x80x64", "--exhaustive"],
    );
    let out_all = stdout(&all);
    assert!(
        out_all.contains("tuned now") && !out_all.contains("not run"),
        "{out_all}"
    );
    assert!(timed(&out_all) > timed(&out), "{out_all}");
    // On a CPU adapter, where a compilation is most of a search, a compute-bound shape
    // times the model's best 2; a memory-bound one (few rows: every tile estimates alike)
    // times 3 and their ties.
    if out.contains("llvmpipe") {
        let square = kiln_in_cache(&dir, &["tune", "matmul", "--shape", "256x256x256"]);
        assert_eq!(timed(&stdout(&square)), 2, "{}", stdout(&square));
        let few_rows = kiln_in_cache(&dir, &["tune", "matmul", "--shape", "16x1024x1024"]);
        assert!(timed(&stdout(&few_rows)) >= 3, "{}", stdout(&few_rows));
    }
}

#[test]
fn first_use_tuning_is_announced_once_on_stderr() {
    let dir = tmpdir("first-use");
    let input = common::data("softmax_f32.safetensors");
    let out = tmp("first_use_out.safetensors");
    let run = || {
        kiln_in_cache(
            &dir,
            &[
                "run",
                "softmax",
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
        )
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("on first use")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for needle in [
        "`softmax` is tuning",
        "candidates",
        "autotune.json",
        "kiln tune softmax --shape",
        "KILN_AUTOTUNE=off",
    ] {
        assert!(
            lines[0].contains(needle),
            "`{needle}` missing: {}",
            lines[0]
        );
    }
    // The decision is cached: the second run tunes nothing and says nothing of it.
    let second = run();
    assert!(second.status.success());
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("on first use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
}

#[test]
fn run_ring_attention_zigzag_over_three_ranks() {
    // The command: the whole sequence in, three ranks in this process, the
    // whole result out, equal to PyTorch's whole-sequence attention.
    let out = tmp("ring_out.safetensors");
    let input = common::data("ring_attention_causal_f32.safetensors");
    let o = run_op(
        "ring_attention",
        &input,
        &out,
        &[
            "--set",
            "causal=true",
            "--set",
            "world_size=3",
            "--set",
            "schedule=zigzag",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_safetensors(&out).unwrap();
    let want = load_safetensors(&input).unwrap();
    for name in ["out", "lse"] {
        let e = kiln::check::rms_relative(
            &got[name].to_f64(),
            &want[&format!("expected_{name}")].to_f64(),
        );
        assert!(e < 1e-5, "{name}: {e:e}");
    }
    // Only q, k, v (no note about unused tensors before the error line).
    let qkv = tmp("ring_qkv.safetensors");
    let only: BTreeMap<String, HostTensor> = want
        .into_iter()
        .filter(|(k, _)| ["q", "k", "v"].contains(&k.as_str()))
        .collect();
    save_safetensors(&qkv, &only).unwrap();
    assert_clear_error(
        &run_op("ring_attention", &qkv, &out, &["--set", "world_size=0"]),
        &["world_size", "1 ..= 1024", "0"],
    );
}

#[test]
fn run_moe_layer_expert_parallel_over_two_ranks() {
    // The command: the whole batch in, experts sharded over two ranks in this
    // process, the whole result out, equal to the PyTorch layer (routing included).
    let out = tmp("moe_out.safetensors");
    let input = common::data("moe_layer_silu_f32.safetensors");
    let o = run_op(
        "moe_layer",
        &input,
        &out,
        &[
            "--set",
            "top_k=2",
            "--set",
            "capacity_factor=1",
            "--set",
            "world_size=2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_safetensors(&out).unwrap();
    let want = load_safetensors(&input).unwrap();
    for name in ["y", "l_aux"] {
        let e = kiln::check::max_rel_error(
            &got[name].to_f64(),
            &want[&format!("expected_{name}")].to_f64(),
            1.0,
        );
        assert!(e < 1e-6, "{name}: {e:e}");
    }
    for name in ["expert_ids", "locations"] {
        assert_eq!(got[name].to_f64(), want[name].to_f64(), "{name}");
    }
    // Four experts do not split over three ranks: one clear line naming world_size.
    let layer_in = tmp("moe_layer_in.safetensors");
    let only: BTreeMap<String, HostTensor> = want
        .into_iter()
        .filter(|(k, _)| ["x", "w_gate", "w1", "w2"].contains(&k.as_str()))
        .collect();
    save_safetensors(&layer_in, &only).unwrap();
    assert_clear_error(
        &run_op("moe_layer", &layer_in, &out, &["--set", "world_size=3"]),
        &["world_size", "divisor", "3"],
    );
}

#[test]
fn run_s2ft_select_then_permute_then_verify() {
    // Another program's flow through files: pick units, permute an FFN with the
    // returned `perm`, check the permuted layer; then one clear line for a bad head_dim.
    let mut rng = kiln::check::Rng::new(4);
    let (t, d, f) = (5usize, 8usize, 12usize);
    let host = |shape: Vec<usize>, rng: &mut kiln::check::Rng| {
        let n = shape.iter().product();
        HostTensor::from_f64(kiln::DType::F32, shape, &rng.normals(n, 0.3)).unwrap()
    };
    let mut ffn: BTreeMap<String, HostTensor> = BTreeMap::new();
    ffn.insert("x".into(), host(vec![t, d], &mut rng));
    ffn.insert("w_up".into(), host(vec![f, d], &mut rng));
    ffn.insert("w_gate".into(), host(vec![f, d], &mut rng));
    ffn.insert("w_down".into(), host(vec![d, f], &mut rng));
    let (weights, selected) = (tmp("s2ft_ffn.safetensors"), tmp("s2ft_perm.safetensors"));
    save_safetensors(&weights, &ffn).unwrap();
    let o = run_op(
        "s2ft_select",
        &weights,
        &selected,
        &[
            "--set",
            "num_units=12",
            "--set",
            "count_a=3",
            "--set",
            "count_b=2",
            "--set",
            "seed=9",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sel = load_safetensors(&selected).unwrap();
    let perm: Vec<f64> = sel["perm"].to_f64();
    let mut sorted = perm.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(sorted, (0..f).map(|u| u as f64).collect::<Vec<_>>());
    assert_eq!(sel["row_block"].to_f64(), vec![0.0, 3.0]);
    ffn.insert("perm".into(), sel["perm"].clone());
    save_safetensors(&weights, &ffn).unwrap();
    let permuted = tmp("s2ft_permuted.safetensors");
    let o = run_op("s2ft_permute", &weights, &permuted, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = load_safetensors(&permuted).unwrap();
    let (up, up_p) = (ffn["w_up"].to_f64(), p["w_up"].to_f64());
    for (row, &u) in perm.iter().enumerate() {
        let u = u as usize;
        assert_eq!(
            up_p[row * d..(row + 1) * d],
            up[u * d..(u + 1) * d],
            "row {row}"
        );
    }
    let verified = tmp("s2ft_verified.safetensors");
    let o = run_op("s2ft_verify", &weights, &verified, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = load_safetensors(&verified).unwrap();
    assert!(v["max_abs_diff"].to_f64()[0] <= v["bound"].to_f64()[0]);
    let mut attn: BTreeMap<String, HostTensor> = BTreeMap::new();
    attn.insert(
        "perm".into(),
        HostTensor::from_f64(kiln::DType::I32, vec![2], &[1.0, 0.0]).unwrap(),
    );
    attn.insert("w_k".into(), host(vec![10, d], &mut rng));
    save_safetensors(&weights, &attn).unwrap();
    assert_clear_error(
        &run_op(
            "s2ft_permute",
            &weights,
            &permuted,
            &["--set", "head_dim=3"],
        ),
        &["head_dim", "w_k", "10"],
    );
    // Nothing to permute, and explicit units with a count that disagrees: refused.
    let mut only_perm: BTreeMap<String, HostTensor> = BTreeMap::new();
    only_perm.insert("perm".into(), attn["perm"].clone());
    save_safetensors(&weights, &only_perm).unwrap();
    assert_clear_error(
        &run_op("s2ft_permute", &weights, &permuted, &[]),
        &["at least one matrix", "w_up"],
    );
    let explicit = [
        "--set",
        "num_units=12",
        "--set",
        "strategy=explicit",
        "--set",
        "units_a=4",
        "--set",
        "units_b=1,2",
    ];
    let nothing = tmp("s2ft_nothing.safetensors");
    save_safetensors(&nothing, &BTreeMap::new()).unwrap();
    let o = run_op("s2ft_select", &nothing, &selected, &explicit);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let with_count: Vec<&str> = explicit
        .iter()
        .copied()
        .chain(["--set", "count_a=5"])
        .collect();
    assert_clear_error(
        &run_op("s2ft_select", &nothing, &selected, &with_count),
        &["count_a", "5", "units_a"],
    );
}

#[test]
fn run_topk_ef_exact_and_radix_agree_past_the_bracket() {
    // 2^19 + 3 elements: `method=exact` takes the sampled bracket, `method=radix` the
    // select over every key; the same indices, values and error, bit for bit.
    let n = 524_291;
    let mut rng = kiln::check::Rng::new(8);
    let mut inputs: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, scale) in [("grad", 1.0), ("error", 0.3)] {
        let v = rng.normals(n, scale);
        inputs.insert(
            name.into(),
            HostTensor::from_f64(kiln::DType::F32, vec![n], &v).unwrap(),
        );
    }
    let input = tmp("topk_in.safetensors");
    save_safetensors(&input, &inputs).unwrap();
    let outputs: Vec<_> = ["exact", "radix"]
        .iter()
        .map(|method| {
            let out = tmp(&format!("topk_{method}.safetensors"));
            let set = format!("method={method}");
            let o = run_op("topk_ef", &input, &out, &["--set", "k=5243", "--set", &set]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            load_safetensors(&out).unwrap()
        })
        .collect();
    for name in ["indices", "values", "error"] {
        let bits = |t: &HostTensor| t.to_f64().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&outputs[0][name]), bits(&outputs[1][name]), "{name}");
    }
}
