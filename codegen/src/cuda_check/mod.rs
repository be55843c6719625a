//! The CUDA build check (`kiln check-cuda`): every registered kernel, in every dtype it
//! accepts, in every configuration the autotuner may pick on an architecture, emitted
//! as CUDA C++, compiled by NVRTC and assembled by ptxas, with ptxas's register, spill
//! and shared-memory report. No GPU is needed: NVRTC and the headers come from a CUDA
//! toolkit or NVIDIA's Python packages (see `kiln_runtime::toolkit`).
//!
//! A row fails on a compile or assembly error, on a spill, on more registers than a
//! cube of its size can have on one SM (65,536 per SM), or on a register occupancy below
//! what the kernel declares (`occupancy = ..`), unless the configuration is
//! refused by name for that dtype (never emitted) or dropped from the tuning space on
//! that architecture (`kiln_runtime::budget`).
//!
//! With a [`CompileRecord`] (`Plan::record`), a row whose emitted source the record
//! holds takes its report from there instead of compiling (see [`record`]).

use crate::{emit, Target};
use kiln_runtime::{budget, CudaArch, DeviceReport, Error, KernelConfig, KernelSpec, KernelUsage};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub mod record;
pub use record::{source_key, CompileRecord};

/// Registers of one SM: a cube of `units` threads needs `units x registers` of them.
pub const REGISTERS_PER_SM: u32 = 65_536;

/// Resident threads of one SM (sm_80 and sm_90 alike).
pub const THREADS_PER_SM: u32 = 2048;

/// The fraction of an SM's threads resident at once as far as registers allow (ptxas
/// allocates per warp in units of 256 registers), for `registers` per thread and
/// cubes of `units`: what a kernel's register use costs in latency hiding.
pub fn register_occupancy(registers: u32, units: u32) -> f64 {
    if registers == 0 || units == 0 {
        return 0.0;
    }
    let warps = units.div_ceil(32);
    let per_warp = (registers * 32).div_ceil(256) * 256;
    let cubes = REGISTERS_PER_SM / (per_warp * warps);
    let threads = (cubes * warps * 32).min(THREADS_PER_SM);
    threads as f64 / THREADS_PER_SM as f64
}

/// One kernel x dtype x configuration x architecture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// The kernel's registered name.
    pub kernel: String,
    /// Element type (`-` for kernels without a float generic).
    pub dtype: String,
    /// Every knob that is not the default (comptime values) and every tunable.
    pub config: String,
    /// The architecture compiled for.
    pub arch: String,
    /// Every `#[comptime]` value and tunable as `key=value` words (what budget entries
    /// are matched against).
    #[serde(skip)]
    pub description: String,
    /// Units per cube.
    pub units: u32,
    /// ptxas's report, when it compiled.
    pub usage: Option<KernelUsage>,
    /// Where the report came from.
    #[serde(skip)]
    pub compile: Compile,
    /// The record's key of the emitted source ([`source_key`]), when it was emitted.
    #[serde(skip)]
    pub source_key: Option<String>,
    /// What the check concluded.
    pub verdict: Verdict,
}

/// The check's conclusion for a row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "verdict", content = "why", rename_all = "lowercase")]
pub enum Verdict {
    /// Compiled, no spill, fits an SM.
    Ok,
    /// Refused by name for this dtype or device (never emitted): the reason.
    Refused(String),
    /// Spills or cannot launch, and the tuning space drops it on this architecture.
    Dropped(String),
    /// A compile error, or a spill the autotuner could pick.
    Fail(String),
}

/// Where a row's report came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compile {
    /// Nothing was compiled (refused, or emission failed).
    #[default]
    None,
    /// NVRTC compiled it now; the record (if any) did not hold its source.
    Fresh,
    /// From the record: the same source compiled earlier with the same NVRTC.
    Recorded,
    /// NVRTC compiled it now and the record held the same report (`verify_record`).
    Verified,
}

impl Row {
    /// Whether this row fails the check.
    pub fn failed(&self) -> bool {
        matches!(self.verdict, Verdict::Fail(_))
    }
}

/// What to check.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Architectures to compile for.
    pub archs: Vec<CudaArch>,
    /// Also vary each `#[comptime]` knob (and vector width) over its values, one at a
    /// time, with every declared configuration.
    pub all_configs: bool,
    /// Worker threads (NVRTC compiles independent programs concurrently).
    pub jobs: usize,
    /// Reports of earlier compiles to use for unchanged sources (made by the same NVRTC
    /// version: the caller checks).
    pub record: Option<CompileRecord>,
    /// With a record: still compile the first row of every kernel, and fail the row
    /// when the record disagrees with NVRTC.
    pub verify_record: bool,
}

struct Job {
    spec: &'static KernelSpec,
    knobs: BTreeMap<String, String>,
    tunables: Vec<(&'static str, u32)>,
    arch: CudaArch,
    /// Compile even when the record holds the source, and compare.
    verify: bool,
}

/// The knob values to check for one kernel: each dtype it accepts with the defaults,
/// and with `all_configs` each other value of each enumerable knob, one at a time
/// (`jobs` pairs a value that has no configuration alone with another change).
fn variants(spec: &KernelSpec, all_configs: bool) -> Vec<BTreeMap<String, String>> {
    let dtypes: Vec<&str> = match spec.config.iter().find(|p| p.name == "dtype") {
        Some(p) => p.values.split('|').map(str::trim).collect(),
        None => vec![""],
    };
    let mut out = Vec::new();
    for d in dtypes {
        let base: BTreeMap<String, String> = if d.is_empty() {
            BTreeMap::new()
        } else {
            BTreeMap::from([("dtype".to_string(), d.to_string())])
        };
        out.push(base.clone());
        if !all_configs {
            continue;
        }
        for p in spec.config {
            if p.name == "dtype" || p.doc == "tunable" {
                continue;
            }
            let values: Vec<String> = match range_domain(p.values) {
                Some(range) => range_samples(range),
                None if p.values.contains('|') => {
                    p.values.split('|').map(|v| v.trim().to_string()).collect()
                }
                None => continue,
            };
            for v in values.iter().filter(|v| v.as_str() != p.default) {
                let mut k = base.clone();
                k.insert(p.name.to_string(), v.to_string());
                out.push(k);
            }
        }
    }
    out
}

/// A `#[comptime] u32` declared as a range (`domain(dk = 1..=1024)`: values `1..=1024`).
fn range_domain(values: &str) -> Option<(u32, u32)> {
    let (lo, hi) = values.trim().split_once("..=")?;
    Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
}

/// The values of a range domain worth compiling: both ends and the powers of two
/// between (`1..=6`: 1, 2, 4, 6; `1..=1024`: 1, 2, 4, ..., 1024).
fn range_samples((lo, hi): (u32, u32)) -> Vec<String> {
    let mut v: Vec<u32> = std::iter::once(lo)
        .chain((0..32).map(|i| 1u32 << i).filter(|&p| p > lo && p < hi))
        .chain(std::iter::once(hi))
        .collect();
    v.dedup();
    v.into_iter().map(|x| x.to_string()).collect()
}

fn label(knobs: &BTreeMap<String, String>, tunables: &[(&str, u32)]) -> String {
    knobs
        .iter()
        .filter(|(k, _)| k.as_str() != "dtype")
        .map(|(k, v)| format!("{k}={v}"))
        .chain(tunables.iter().map(|(k, v)| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a budget entry is matched against, as the tuning space writes it: every
/// `#[comptime]` value (defaults filled in), then the tunables.
fn description(
    spec: &KernelSpec,
    knobs: &BTreeMap<String, String>,
    tunables: &[(&str, u32)],
) -> String {
    spec.config
        .iter()
        .filter(|p| p.doc == "kernel specialisation")
        .map(|p| {
            format!(
                "{}={}",
                p.name,
                knobs.get(p.name).map_or(p.default, String::as_str)
            )
        })
        .chain(std::iter::once(budget::config_label(tunables)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_refusal(e: &Error) -> bool {
    matches!(e, Error::Unsupported { .. })
}

fn check_one(job: &Job, record: Option<&CompileRecord>) -> Row {
    let spec = job.spec;
    let dtype = job
        .knobs
        .get("dtype")
        .cloned()
        .unwrap_or_else(|| "-".into());
    let mut row = Row {
        kernel: spec.name.into(),
        dtype,
        config: label(&job.knobs, &job.tunables),
        arch: job.arch.to_string(),
        description: description(spec, &job.knobs, &job.tunables),
        units: 0,
        usage: None,
        compile: Compile::None,
        source_key: None,
        verdict: Verdict::Ok,
    };
    let mut values = job.knobs.clone();
    values.extend(
        job.tunables
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let emitted = KernelConfig::new(spec, values).and_then(|c| emit(spec, Target::Cuda, &c));
    let emitted = match emitted {
        Ok(e) => e,
        Err(e) if is_refusal(&e) => {
            row.verdict = Verdict::Refused(e.to_string());
            return row;
        }
        Err(e) => {
            row.verdict = Verdict::Fail(format!("emission: {e}"));
            return row;
        }
    };
    let (x, y, z) = emitted.manifest.cube_dim;
    row.units = x * y * z;
    let shared_bytes = emitted.manifest.shared_memory_bytes as u32;
    let source = crate::canonical(&emitted.source);
    let key = source_key(&source);
    let recorded = record.and_then(|r| r.get(&row.arch, &key)).cloned();
    row.source_key = Some(key);
    let mut usage = match recorded {
        Some(usage) if !job.verify => {
            row.compile = Compile::Recorded;
            usage
        }
        _ => match kiln_runtime::nvrtc::compile(spec.name, &source, job.arch) {
            Ok(c) => {
                // The record holds reports as rows carry them (shared memory from the
                // layout, below): compare in that form.
                let mut fresh = c.usage;
                fresh.shared_bytes = fresh.shared_bytes.max(shared_bytes);
                row.compile = Compile::Fresh;
                if let Some(r) = recorded {
                    if r != fresh {
                        row.verdict = Verdict::Fail(format!(
                            "the compile record says {r:?}, NVRTC now reports {fresh:?} for the same source: the record is wrong (rewrite it: scripts/cuda-check --docs)"
                        ));
                        return row;
                    }
                    row.compile = Compile::Verified;
                }
                fresh
            }
            Err(e) => {
                row.verdict = Verdict::Fail(e.to_string());
                return row;
            }
        },
    };
    // cubecl declares shared memory dynamically: ptxas sees none, the layout says it.
    usage.shared_bytes = usage.shared_bytes.max(shared_bytes);
    let problem = if usage.spills() {
        Some(format!(
            "spills {} B stored / {} B loaded per thread",
            usage.spill_stores, usage.spill_loads
        ))
    } else if usage.registers * row.units > REGISTERS_PER_SM {
        Some(format!(
            "{} registers x {} units > {REGISTERS_PER_SM} per SM (cannot launch)",
            usage.registers, row.units
        ))
    } else if register_occupancy(usage.registers, row.units) < spec.min_occupancy {
        Some(format!(
            "{} registers x {} units keep {:.1}% of an SM's threads resident, below the declared {:.1}%",
            usage.registers,
            row.units,
            100.0 * register_occupancy(usage.registers, row.units),
            100.0 * spec.min_occupancy
        ))
    } else {
        None
    };
    row.usage = Some(usage);
    if let Some(problem) = problem {
        row.verdict = match budget::dropped(spec.name, &row.description, job.arch) {
            Some(entry) => Verdict::Dropped(format!("{problem}; {}", entry.reason)),
            None => Verdict::Fail(format!(
                "{problem}, and the autotuner may pick it on {} (fix the kernel or list it in kernels/cuda-budget.txt)",
                job.arch
            )),
        };
    }
    row
}

/// Runs the check over `kernels` (compiles in `plan.jobs` threads); rows come back in
/// kernel, dtype, configuration and architecture order.
pub fn check(kernels: &[&'static KernelSpec], plan: &Plan) -> Result<Vec<Row>, Error> {
    let mut jobs = jobs(kernels, plan)?;
    if plan.verify_record && plan.record.is_some() {
        mark_verified(&mut jobs, &plan.archs);
    }
    let record = plan.record.as_ref();
    let next = AtomicUsize::new(0);
    let rows: Mutex<Vec<(usize, Row)>> = Mutex::new(Vec::with_capacity(jobs.len()));
    std::thread::scope(|s| {
        for _ in 0..plan.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let row = check_one(job, record);
                if let Ok(mut r) = rows.lock() {
                    r.push((i, row));
                }
            });
        }
    });
    let mut rows = rows.into_inner().unwrap_or_default();
    rows.sort_by_key(|(i, _)| *i);
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}

/// How many compiles [`check`] runs for `spec` under `plan` (to split the work evenly).
pub fn job_count(spec: &'static KernelSpec, plan: &Plan) -> Result<usize, Error> {
    Ok(jobs(&[spec], plan)?.len())
}

/// One compile per kernel x knob variant x architecture x declared configuration.
fn jobs(kernels: &[&'static KernelSpec], plan: &Plan) -> Result<Vec<Job>, Error> {
    let mut jobs = Vec::new();
    for &spec in kernels {
        let all = variants(spec, plan.all_configs);
        for knobs in &all {
            for &arch in &plan.archs {
                let device = DeviceReport::cuda_target(arch);
                let declared = |knobs: &BTreeMap<String, String>| -> Result<_, Error> {
                    let cfg = KernelConfig::new(spec, knobs.clone())?;
                    (spec.declared)(&device, &cfg)
                };
                let mut knobs = knobs.clone();
                let mut configs = declared(&knobs)?;
                if configs.is_empty() && plan.all_configs {
                    // A knob value that needs another (`col_words` only with int8
                    // weights): with the first other single change under which it has
                    // configurations.
                    for other in &all {
                        let joint = joined(&knobs, other);
                        if joint.len() == knobs.len() + 1 {
                            let c = declared(&joint)?;
                            if !c.is_empty() {
                                (knobs, configs) = (joint, c);
                                break;
                            }
                        }
                    }
                }
                if configs.is_empty() {
                    // Nothing the autotuner may pick: e.g. a tensor-core kernel below sm_70.
                    continue;
                }
                for tunables in configs {
                    jobs.push(Job {
                        spec,
                        knobs: knobs.clone(),
                        tunables,
                        arch,
                        verify: false,
                    });
                }
            }
        }
    }
    Ok(jobs)
}

/// `a` with `b`'s knobs added where `a` lacks them (the same dtype: else `a` itself).
fn joined(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    if a.get("dtype") != b.get("dtype") {
        return a.clone();
    }
    let mut out = a.clone();
    for (k, v) in b {
        out.entry(k.clone()).or_insert_with(|| v.clone());
    }
    out
}

/// Marks one job per kernel to compile and compare with the record: its first job on
/// one architecture (the kernels take the architectures in turn), or its first job.
fn mark_verified(jobs: &mut [Job], archs: &[CudaArch]) {
    let mut kernels: Vec<&'static str> = Vec::new();
    for i in 0..jobs.len() {
        let name = jobs[i].spec.name;
        if kernels.contains(&name) {
            continue;
        }
        let arch = archs.get(kernels.len() % archs.len().max(1)).copied();
        kernels.push(name);
        let pick = (i..jobs.len())
            .take_while(|&j| jobs[j].spec.name == name)
            .find(|&j| Some(jobs[j].arch) == arch)
            .unwrap_or(i);
        jobs[pick].verify = true;
    }
}

/// Budget entries for the checked kernels and architectures that drop a configuration
/// which no longer fails (nothing to drop: remove the line), one message each. An entry
/// is judged only where its own architecture (`from-arch`) was checked: an `sm_80` entry
/// may spill on sm_80 alone and rightly drop (conservatively) on newer ones too, so a run
/// with `--arch sm_90a` cannot call it stale.
pub fn stale_entries(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for e in budget::entries() {
        let matching: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.kernel == e.kernel
                    && budget::dropped(
                        &r.kernel,
                        &r.description,
                        CudaArch::parse(&r.arch).unwrap_or(e.from),
                    )
                    .is_some_and(|d| d == e)
                    && CudaArch::parse(&r.arch).is_ok_and(|a| a >= e.from)
            })
            .collect();
        let own_arch_checked = matching
            .iter()
            .any(|r| CudaArch::parse(&r.arch).is_ok_and(|a| a == e.from));
        if own_arch_checked
            && !matching
                .iter()
                .any(|r| matches!(r.verdict, Verdict::Dropped(_)))
        {
            out.push(format!(
                "{} {} {}: listed in a budget table but no longer spills or overflows (remove the line)",
                e.kernel, e.from, e.config
            ));
        }
    }
    out
}

/// The rows as a Markdown table (what `docs/cuda-registers.md` holds).
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| kernel | dtype | configuration | arch | units | registers | occupancy | spill st/ld (B) | stack (B) | smem (B) | verdict |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let (regs, spill, stack, smem) = match &r.usage {
            Some(u) => (
                format!(
                    "{} | {:.0}%",
                    u.registers,
                    100.0 * register_occupancy(u.registers, r.units)
                ),
                format!("{}/{}", u.spill_stores, u.spill_loads),
                u.stack_frame.to_string(),
                u.shared_bytes.to_string(),
            ),
            None => ("- | -".into(), "-".into(), "-".into(), "-".into()),
        };
        let verdict = match &r.verdict {
            Verdict::Ok => "ok".to_string(),
            Verdict::Refused(w) => format!("refused: {w}"),
            Verdict::Dropped(w) => format!("dropped: {w}"),
            Verdict::Fail(w) => format!("FAIL: {w}"),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {regs} | {spill} | {stack} | {smem} | {} |\n",
            r.kernel,
            r.dtype,
            r.config.replace('|', "\\|"),
            r.arch,
            r.units,
            verdict.replace('|', "\\|")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::register_occupancy;

    #[test]
    fn occupancy_by_registers() {
        // 32 registers: the thread limit binds (full occupancy).
        assert_eq!(register_occupancy(32, 256), 1.0);
        // 255 registers (256 per thread allocated), 256 units: one cube of 8 warps.
        assert_eq!(register_occupancy(255, 256), 0.125);
        // 72 registers (2304 per warp) x 2 warps: 14 cubes, 896 of 2048 threads.
        assert!((register_occupancy(72, 64) - 0.4375).abs() < 1e-12);
    }
}
