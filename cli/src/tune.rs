//! `kiln tune`: autotune an operator's kernels for one shape with a progress bar and a
//! final table; `--export` / `--import` move a device's stored winners between machines.

use indicatif::{ProgressBar, ProgressStyle};
use kiln::check::example_inputs;
use kiln::runtime::tune::{Autotuner, CandidateStatus, Decision, TuneEvent};
use kiln::{Client, DType, Device, Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// What the observer saw during one `kiln tune`.
#[derive(Default)]
struct Seen {
    bar: Option<ProgressBar>,
    rows: Vec<(String, CandidateStatus)>,
    decisions: Vec<(String, String, Decision)>,
}

/// Parses `2048x2048` (or `2048,2048`) into dimensions.
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Option<Vec<usize>> = s
        .split(['x', 'X', ','])
        .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
        .collect();
    match dims {
        Some(d) if !d.is_empty() => Ok(d),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: "positive dimensions like 2048x2048".into(),
            found: s.into(),
        }),
    }
}

pub fn run(
    op: Option<&str>,
    shape: &str,
    dtype: &str,
    device: Option<String>,
    export: Option<PathBuf>,
    import: Option<PathBuf>,
) -> Result<ExitCode> {
    let tuner = Autotuner::global();
    if let Some(file) = import {
        let n = tuner.import(&file)?;
        println!(
            "imported {n} tuned configuration(s) from {} into {}",
            file.display(),
            tuner.path().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let device = match device {
        Some(d) => Device::parse(&d)?,
        None => Device::from_env()?,
    };
    let client = Client::open(&device)?;
    if let Some(file) = export {
        let n = tuner.export(&client, &file)?;
        println!(
            "exported {n} tuned configuration(s) for {} to {}",
            client.name(),
            file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let spec = kiln::kernels::op(op.unwrap_or_default())?;
    let dims = parse_shape(shape)?;
    let dtype = DType::parse(dtype)?;
    client.require_dtype("x", dtype)?;

    let hosts = example_inputs(spec, &dims, dtype)?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = Arc::clone(&seen);
    tuner.observe(move |e| {
        let Ok(mut s) = s2.lock() else { return };
        match e {
            TuneEvent::Start {
                kernel,
                shape,
                candidates,
            } => {
                let bar = ProgressBar::new(*candidates as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} candidates")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(format!("tuning {kernel} ({shape})"));
                s.bar = Some(bar);
            }
            TuneEvent::Candidate { label, status } => {
                if let Some(b) = &s.bar {
                    b.inc(1);
                }
                s.rows.push((label.clone(), status.clone()));
            }
            TuneEvent::Done {
                kernel,
                winner,
                how,
            } => {
                if let Some(b) = s.bar.take() {
                    b.finish_and_clear();
                }
                s.decisions.push((kernel.clone(), winner.clone(), *how));
            }
        }
    });
    spec.call_host(&client, &hosts, BTreeMap::new())?;

    let seen = seen
        .lock()
        .map_err(|_| Error::Device("progress state poisoned".into()))?;
    println!(
        "{} on {} ({:?}), x {dims:?} {dtype}",
        spec.name,
        client.name(),
        client.report().backend
    );
    // Configurations the tuning spaces left out on this device, and why (CUDA register
    // budgets from `kiln check-cuda`).
    for note in kiln::runtime::budget::take_notes() {
        println!("{note}");
    }
    if seen.decisions.is_empty() {
        println!("`{}` has no tunable kernel: nothing to tune", spec.name);
        return Ok(ExitCode::SUCCESS);
    }
    if !seen.rows.is_empty() {
        println!("\n{:<16} {:>12}  status", "config", "median");
        for (label, status) in &seen.rows {
            let (time, text) = match status {
                CandidateStatus::Timed(t) => {
                    (format!("{:.1} us", t.as_secs_f64() * 1e6), "ok".to_string())
                }
                CandidateStatus::Mismatch(m) => ("inf".into(), format!("rejected: {m}")),
                CandidateStatus::Failed(m) => ("inf".into(), format!("failed: {m}")),
            };
            println!("{label:<16} {time:>12}  {text}");
        }
        println!();
    }
    let stored = match tuner.store_error() {
        None => format!("cache {}", tuner.path().display()),
        Some(e) => format!("NOT stored ({e})"),
    };
    for (kernel, winner, how) in &seen.decisions {
        println!("{kernel}: {winner} ({how}); {stored}");
    }
    Ok(ExitCode::SUCCESS)
}
