//! `kiln check-cuda`: the CUDA build check (see `kiln::codegen::cuda_check`).

use kiln::codegen::cuda_check::{
    check, markdown, stale_entries, Compile, CompileRecord, Plan, Verdict,
};
use kiln::runtime::{budget, toolkit, CudaArch};
use kiln::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

pub fn run(
    archs: &[String],
    kernels: &[String],
    all_configs: bool,
    markdown_file: Option<PathBuf>,
    jobs: Option<usize>,
    record_file: Option<PathBuf>,
) -> Result<ExitCode> {
    let default_archs = archs == ["sm_80", "sm_90a"];
    let archs = archs
        .iter()
        .map(|a| CudaArch::parse(a))
        .collect::<Result<Vec<_>>>()?;
    let specs = if kernels.is_empty() {
        kiln::kernels::kernels().to_vec()
    } else {
        kernels
            .iter()
            .map(|k| kiln::kernels::kernel(k))
            .collect::<Result<Vec<_>>>()?
    };
    budget::check_tables().map_err(|e| Error::Param {
        param: "budget table".into(),
        expected: "`kernel sm_XX CONFIG : why` lines".into(),
        found: e,
    })?;
    let tk = toolkit::find().map_err(|e| Error::Unsupported {
        device: "this machine".into(),
        feature: format!("the CUDA check: {e}"),
    })?;
    eprintln!(
        "CUDA headers from {}; NVRTC {}",
        tk.found_by,
        tk.nvrtc
            .as_ref()
            .map_or("from the system library path".into(), |p| p
                .display()
                .to_string())
    );
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let nvrtc = kiln::runtime::nvrtc::version()?;
    let record = match &record_file {
        Some(path) => match CompileRecord::read(path)? {
            Some(r) if r.nvrtc == nvrtc => Some(r),
            Some(r) => {
                eprintln!(
                    "{}: made by NVRTC {}, this is NVRTC {nvrtc}: compiling everything",
                    path.display(),
                    r.nvrtc
                );
                None
            }
            None => None,
        },
        None => None,
    };
    let start = std::time::Instant::now();
    let rows = check(
        &specs,
        &Plan {
            archs,
            all_configs,
            jobs,
            record: record.clone(),
            verify_record: false,
        },
    )?;
    println!(
        "{:<24} {:<5} {:<40} {:<7} {:>5} {:>4} {:>11} {:>6}  result",
        "kernel", "dtype", "configuration", "arch", "units", "regs", "spill st/ld", "smem"
    );
    for r in &rows {
        let (regs, spill, smem) = match &r.usage {
            Some(u) => (
                u.registers.to_string(),
                format!("{}/{}", u.spill_stores, u.spill_loads),
                u.shared_bytes.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let verdict = match &r.verdict {
            Verdict::Ok => "ok".to_string(),
            Verdict::Refused(w) => format!("refused: {w}"),
            Verdict::Dropped(w) => format!("dropped: {w}"),
            Verdict::Fail(w) => format!("FAIL: {w}"),
        };
        println!(
            "{:<24} {:<5} {:<40} {:<7} {:>5} {:>4} {:>11} {:>6}  {verdict}",
            r.kernel, r.dtype, r.config, r.arch, r.units, regs, spill, smem
        );
    }
    let stale = stale_entries(&rows);
    for s in &stale {
        println!("STALE: {s}");
    }
    let count = |f: fn(&Verdict) -> bool| rows.iter().filter(|r| f(&r.verdict)).count();
    let failed = count(|v| matches!(v, Verdict::Fail(_)));
    println!(
        "\ncheck-cuda: {} kernel x dtype x configuration x arch: {} ok, {} refused by name, {} dropped by the budget, {failed} failed, {} stale budget entries in {:.1} s",
        rows.len(),
        count(|v| *v == Verdict::Ok),
        count(|v| matches!(v, Verdict::Refused(_))),
        count(|v| matches!(v, Verdict::Dropped(_))),
        stale.len(),
        start.elapsed().as_secs_f64()
    );
    if let Some(path) = record_file {
        // A run over every kernel and the default architectures is the whole record;
        // a narrower one updates its part.
        let mut out = match record {
            Some(r) if !kernels.is_empty() || !default_archs => r,
            _ => CompileRecord::new(&nvrtc),
        };
        out.add_rows(&rows);
        std::fs::write(&path, out.to_text()).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let compiled = rows.iter().filter(|r| r.compile == Compile::Fresh).count();
        eprintln!(
            "wrote {} ({} entries; {compiled} rows compiled now, {} from the record)",
            path.display(),
            out.len(),
            rows.iter()
                .filter(|r| r.compile == Compile::Recorded)
                .count()
        );
    }
    if let Some(path) = markdown_file {
        std::fs::write(&path, markdown(&rows)).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(if failed == 0 && stale.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
