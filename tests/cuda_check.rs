//! The CUDA build check, in the test suite: every registered kernel x dtype x tuning
//! configuration compiles with NVRTC for sm_80 and sm_90a, and none the autotuner may
//! pick there spills. Needs NVRTC and the CUDA headers (no GPU): `scripts/test`
//! installs NVIDIA's Python packages first (`scripts/install-cuda-toolkit`). Where they
//! cannot be installed, `KILN_SKIP_CUDA_CHECK=1` skips the compile test, loudly.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

use kiln::codegen::cuda_check::{
    check, job_count, stale_entries, Compile, CompileRecord, Plan, Row, Verdict,
};
use kiln::codegen::{emit, Target};
use kiln::runtime::{CudaArch, KernelConfig};
use std::collections::{BTreeMap, BTreeSet};

fn archs() -> Vec<CudaArch> {
    ["sm_80", "sm_90a"]
        .iter()
        .map(|a| CudaArch::parse(a).expect("arch"))
        .collect()
}

/// The check is split into parts of about equal work, so that no test runs for minutes;
/// together they cover every kernel.
const PARTS: usize = 8;

macro_rules! cuda_check_parts {
    ($($name:ident = $part:expr),* $(,)?) => {$(
        #[test]
        fn $name() {
            check_part($part);
        }
    )*};
}

cuda_check_parts!(
    every_kernel_compiles_for_cuda_without_spills_part_1 = 0,
    every_kernel_compiles_for_cuda_without_spills_part_2 = 1,
    every_kernel_compiles_for_cuda_without_spills_part_3 = 2,
    every_kernel_compiles_for_cuda_without_spills_part_4 = 3,
    every_kernel_compiles_for_cuda_without_spills_part_5 = 4,
    every_kernel_compiles_for_cuda_without_spills_part_6 = 5,
    every_kernel_compiles_for_cuda_without_spills_part_7 = 6,
    every_kernel_compiles_for_cuda_without_spills_part_8 = 7,
);

/// The kernels of part `part`: every registered kernel in exactly one part, the parts
/// balanced by their number of compiles (heaviest kernel first, to the lightest part).
fn part_kernels(plan: &Plan, part: usize) -> Vec<&'static kiln::runtime::KernelSpec> {
    let mut weighted: Vec<(usize, &'static kiln::runtime::KernelSpec)> = kiln::kernels::kernels()
        .iter()
        .map(|&k| (job_count(k, plan).expect("configurations"), k))
        .collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(b.1.name)));
    let mut load = [0usize; PARTS];
    let mut mine = Vec::new();
    for (w, k) in weighted {
        let lightest = (0..PARTS).min_by_key(|&p| (load[p], p)).unwrap_or(0);
        load[lightest] += w.max(1);
        if lightest == part {
            mine.push(k);
        }
    }
    mine
}

/// Every configuration of part `part`'s kernels compiles with NVRTC and assembles with
/// ptxas for sm_80 and sm_90a, with no spill except those the budget drops.
fn check_part(part: usize) {
    if std::env::var_os("KILN_SKIP_CUDA_CHECK").is_some() {
        eprintln!("SKIPPED: KILN_SKIP_CUDA_CHECK is set: the CUDA compile check did not run");
        return;
    }
    if let Err(e) = kiln::runtime::toolkit::find() {
        panic!("{e}\n(run scripts/install-cuda-toolkit and export KILN_CUDA_TOOLKIT=<its output>, or set KILN_SKIP_CUDA_CHECK=1)");
    }
    let record = record();
    let plan = Plan {
        archs: archs(),
        all_configs: false,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        verify_record: true,
        record,
    };
    let kernels = part_kernels(&plan, part);
    let rows = check(&kernels, &plan).expect("the check runs");
    let count = |c: Compile| rows.iter().filter(|r| r.compile == c).count();
    eprintln!(
        "part {}: {} rows: {} compiled ({} of them compared with the record), {} from the record",
        part + 1,
        rows.len(),
        count(Compile::Fresh) + count(Compile::Verified),
        count(Compile::Verified),
        count(Compile::Recorded)
    );
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.failed())
        .map(|r| {
            format!(
                "{} {} {} {}: {:?}",
                r.kernel, r.dtype, r.config, r.arch, r.verdict
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} failing rows:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let stale = stale_entries(&rows);
    assert!(stale.is_empty(), "{}", stale.join("\n"));

    // Every kernel was checked, and keeps a spill-free configuration per dtype and arch.
    let mut usable: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for r in &rows {
        let n = usable
            .entry((r.kernel.clone(), r.dtype.clone(), r.arch.clone()))
            .or_default();
        if r.verdict == Verdict::Ok {
            *n += 1;
        }
    }
    let none_left: Vec<_> = usable.iter().filter(|(_, n)| **n == 0).collect();
    assert!(
        none_left.is_empty(),
        "no spill-free configuration left: {none_left:?}"
    );
    let checked: BTreeSet<&str> = rows.iter().map(|r: &Row| r.kernel.as_str()).collect();
    let kernels: Vec<_> = kernels
        .into_iter()
        .filter(|k| {
            let never = NOT_ON_CUDA.contains(&k.name);
            if never {
                assert_eq!(
                    job_count(k, &plan).expect("configurations"),
                    0,
                    "`{}` is listed as never offered on CUDA but has CUDA configurations",
                    k.name
                );
            }
            !never
        })
        .collect();
    for k in &kernels {
        assert!(
            checked.contains(k.name),
            "kernel `{}` was not checked",
            k.name
        );
    }
    // Register counts are real numbers, not defaults.
    assert!(rows
        .iter()
        .filter_map(|r| r.usage.as_ref())
        .all(|u| u.registers > 0 && !u.entry.is_empty()));

    if plan.record.is_some() {
        // The record stands for compiles only where NVRTC agrees with it: one row of
        // every kernel was compiled and compared (a disagreement failed above).
        for k in &kernels {
            assert!(
                rows.iter()
                    .any(|r| r.kernel == k.name && r.compile == Compile::Verified),
                "kernel `{}`: no row compiled and compared with {RECORD}",
                k.name
            );
        }
        // Sources the record lacks compiled above (and passed); keep the record current
        // so that the next run need not compile them again.
        let fresh: Vec<String> = rows
            .iter()
            .filter(|r| r.compile == Compile::Fresh)
            .map(|r| format!("{} {} {} {}", r.kernel, r.dtype, r.config, r.arch))
            .collect();
        assert!(
            fresh.is_empty(),
            "{} rows compiled fine but their sources are not in {RECORD} (a kernel changed): \
             record them with `scripts/cuda-check --record`:\n{}",
            fresh.len(),
            fresh.join("\n")
        );
    }
}

/// Kernels the autotuner never offers on a CUDA device, so not compiled for it: each is
/// asserted above to have no configuration for the CUDA targets, so that this list
/// cannot hide a kernel that should be checked.
const NOT_ON_CUDA: &[&str] = &[
    // Shares `a`'s rows across planes of exactly 8 (lavapipe on 256-bit SIMD); CUDA's
    // planes are 32 and stage through shared memory instead.
    "matmul_vec4_plane",
];

/// The compile record, relative to the repository root.
const RECORD: &str = "kernels/cuda-compiled.txt";

/// The compile record when it was made by the NVRTC found here (else every row compiles).
fn record() -> Option<CompileRecord> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RECORD);
    let record = CompileRecord::read(&path).expect("the compile record parses")?;
    let nvrtc = kiln::runtime::nvrtc::version().expect("NVRTC's version");
    if record.nvrtc != nvrtc {
        eprintln!(
            "{RECORD} was made by NVRTC {}, this is NVRTC {nvrtc}: compiling every row",
            record.nvrtc
        );
        return None;
    }
    Some(record)
}

#[test]
fn architectures_parse_or_are_refused_by_name() {
    for (s, want) in [("sm_80", (8, 0)), ("90a", (9, 0)), ("8.6", (8, 6))] {
        let a = CudaArch::parse(s).expect(s);
        assert_eq!((a.major, a.minor), want, "{s}");
    }
    // Not a panic on a multi-byte character where the minor digit would be.
    for s in ["sm_9é", "é", "sm_", "sm_4"] {
        let e = CudaArch::parse(s).expect_err(s).to_string();
        assert!(e.contains("--arch"), "{s}: {e}");
    }
}

#[test]
fn matmul_cmma_refuses_f32_by_name_instead_of_emitting_source_nvrtc_rejects() {
    let spec = kiln::kernels::kernel("matmul_cmma").expect("registered");
    let cfg = KernelConfig::new(spec, BTreeMap::from([("dtype".into(), "f32".into())]))
        .expect("dtype is a knob");
    let e = emit(spec, Target::Cuda, &cfg)
        .expect_err("f32 is refused")
        .to_string();
    assert!(
        e.contains("f16 | bf16") && e.contains("matmul_cmma") && e.contains("f32"),
        "{e}"
    );
    // The declared dtypes are what `kiln emit --list` and the check enumerate.
    let dtype = spec
        .config
        .iter()
        .find(|p| p.name == "dtype")
        .expect("dtype");
    assert_eq!((dtype.default, dtype.values), ("f16", "f16 | bf16"));
}

#[test]
fn on_cuda_the_tuning_space_drops_what_the_budget_lists_and_notes_why() {
    use kiln::runtime::{budget, DeviceReport};
    let spec = kiln::kernels::kernel("gla_fused_fwd").expect("registered");
    let cfg = KernelConfig::new(spec, BTreeMap::new()).expect("defaults");
    let sm90 = DeviceReport::cuda_target(CudaArch::parse("sm_90a").expect("arch"));
    // `declared` lists every configuration (what the check compiles)...
    let declared = (spec.declared)(&sm90, &cfg).expect("declared");
    assert_eq!(declared.len(), 3);
    // ...and the budget drops the spilling ones on CUDA, not on wgpu.
    assert!(budget::dropped_on(&sm90, "gla_fused_fwd", "BV=64").is_some());
    assert!(budget::dropped_on(&sm90, "gla_fused_fwd", "BV=16").is_none());
    // At K = 128 every tile spills: GLA's `auto` mode then runs the chunked pipeline
    // without timing the modes (on the H200 that timing took 30 s, the fused candidate
    // failing with "no configuration fits").
    for bv in [64, 32, 16] {
        let tile = format!("kp=128 BV={bv}");
        assert!(
            budget::dropped_on(&sm90, "gla_fused_fwd", &tile).is_some(),
            "{tile}"
        );
    }
    let mut wgpu_like = sm90.clone();
    wgpu_like.compute_capability = None;
    assert!(budget::dropped_on(&wgpu_like, "gla_fused_fwd", "BV=64").is_none());
    budget::check_tables().expect("kernels/cuda-budget.txt parses");
    // What `kiln tune` prints for a dropped configuration.
    let entry = budget::dropped_on(&sm90, "gla_fused_fwd", "BV=64").expect("listed");
    budget::note(&sm90, "gla_fused_fwd", "BV=64", entry);
    let notes = budget::take_notes();
    assert!(
        notes.iter().any(|n| n.starts_with(
            "gla_fused_fwd BV=64: dropped on generic sm_90a (from sm_80 up: 255 registers"
        )),
        "{notes:?}"
    );
}

/// The tensor-core tiles are the autotuner's on CUDA: every declared configuration of
/// `matmul_cmma` and `moe_grouped_matmul_cmma` is there on sm_90a, up to 128 x 256 per
/// cube, none dropped by the register budget (ptxas found no spill: the check above).
#[test]
fn on_cuda_every_tensor_core_tile_is_a_candidate() {
    use kiln::runtime::{budget, DeviceReport};
    let sm90 = DeviceReport::cuda_target(CudaArch::parse("sm_90a").expect("arch"));
    for (name, count) in [("matmul_cmma", 10), ("moe_grouped_matmul_cmma", 7)] {
        let spec = kiln::kernels::kernel(name).expect("registered");
        let cfg = KernelConfig::new(spec, BTreeMap::new()).expect("defaults");
        let declared = (spec.declared)(&sm90, &cfg).expect("declared");
        assert_eq!(declared.len(), count, "{name}");
        let labels: Vec<String> = declared
            .iter()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        for tile in &labels {
            assert!(
                budget::dropped_on(&sm90, name, tile).is_none(),
                "{name} {tile}"
            );
        }
        assert!(
            labels
                .iter()
                .any(|t| t == "PLANES_M=2 PLANES_N=4 FRAGS_M=4 FRAGS_N=4 BK=32"),
            "{name}: {labels:?}"
        );
    }
}
