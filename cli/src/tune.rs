//! `kiln tune`: autotune an operator's kernels for one shape with a progress bar and a
//! final table; `--export` / `--import` move a device's stored winners between machines.

use indicatif::ProgressBar;
use kiln::check::example_inputs;
use kiln::runtime::tune::{Autotuner, CandidateStatus, Decision, Search, Spent, TuneEvent};
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
    decisions: Vec<(String, String, Decision, Spent)>,
}

/// Seeded example inputs of `spec` at `dims` for `client`, after checking that every
/// input fits one of the device's buffers (before its values are built on the host: a
/// shape past the device's limit is an error, not gigabytes of host memory).
pub fn device_inputs(
    client: &Client,
    spec: &kiln::runtime::OpSpec,
    dims: &[usize],
    params: &BTreeMap<String, String>,
    dtype: DType,
) -> Result<BTreeMap<String, kiln::HostTensor>> {
    for (name, shape) in (spec.example_inputs)(dims, params)? {
        let t = spec
            .inputs
            .iter()
            .find(|t| t.name == name)
            .map_or(dtype, |t| t.example_dtype(dtype));
        let n = kiln::runtime::checked_numel(name, &shape, t)?;
        client.require_buffer(name, n * t.size())?;
    }
    example_inputs(spec, dims, params, dtype)
}

/// An error where the tuner could not write its cache (what `tune` and `--import` are
/// for; `kiln run` only warns).
fn not_stored(tuner: &Autotuner) -> Result<()> {
    match tuner.store_error() {
        None => Ok(()),
        Some(e) => Err(Error::Format {
            path: tuner.path().display().to_string(),
            message: format!("the tuned configurations were NOT stored: {e}"),
        }),
    }
}

/// Parses `2048x2048` (or `2048,2048`) into dimensions.
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Option<Vec<usize>> = s
        .split(['x', 'X', ','])
        .map(|d| {
            d.trim()
                .parse::<usize>()
                .ok()
                .filter(|&d| d > 0 && d <= kiln::MAX_ELEMENTS)
        })
        .collect();
    match dims {
        Some(d) if !d.is_empty() => Ok(d),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: format!(
                "positive dimensions like 2048x2048, each at most {}",
                kiln::MAX_ELEMENTS
            ),
            found: s.into(),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    op: Option<&str>,
    shape: &str,
    dtype: &str,
    device: Option<String>,
    export: Option<PathBuf>,
    import: Option<PathBuf>,
    exhaustive: bool,
    params: &BTreeMap<String, String>,
) -> Result<ExitCode> {
    let tuner = Autotuner::global();
    if exhaustive {
        tuner.set_search(Search::Exhaustive);
    }
    if let Some(file) = import {
        let imported = tuner.import(&file)?;
        not_stored(tuner)?;
        println!(
            "imported {} tuned configuration(s) from {} into {}{}",
            imported.entries,
            file.display(),
            tuner.path().display(),
            match imported.devices.as_slice() {
                [] => String::new(),
                devices => format!(", tuned on {}", devices.join(", ")),
            }
        );
        if let Some(first) = imported.skipped.first() {
            eprintln!(
                "warning: {} entr{} not imported (kiln would never use {}): {first}",
                imported.skipped.len(),
                if imported.skipped.len() == 1 {
                    "y"
                } else {
                    "ies"
                },
                if imported.skipped.len() == 1 {
                    "it"
                } else {
                    "them"
                },
            );
        }
        if imported.other_version > 0 {
            eprintln!(
                "warning: {} of them are from another kiln version than this one ({}): kept, but not used (those shapes tune again)",
                imported.other_version,
                env!("CARGO_PKG_VERSION")
            );
        }
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

    let hosts = device_inputs(&client, spec, &dims, params, dtype)?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = Arc::clone(&seen);
    tuner.observe(move |e| {
        let Ok(mut s) = s2.lock() else { return };
        match e {
            TuneEvent::Start {
                kernel,
                shape,
                candidates,
                finalists,
            } => {
                let bar = crate::progress::candidate_bar(
                    *finalists,
                    if finalists < candidates {
                        format!("tuning {kernel} ({shape}, the cost model's best {finalists} of {candidates})")
                    } else {
                        format!("tuning {kernel} ({shape})")
                    },
                );
                s.bar = Some(bar);
            }
            TuneEvent::FirstRun { .. } => {
                if let Some(b) = &s.bar {
                    b.inc(1);
                }
            }
            TuneEvent::Candidate { label, status } => {
                s.rows.push((label.clone(), status.clone()));
            }
            TuneEvent::Done {
                kernel,
                winner,
                how,
                spent,
            } => {
                if let Some(b) = s.bar.take() {
                    b.finish_and_clear();
                }
                s.decisions.push((kernel.clone(), winner.clone(), *how, *spent));
            }
        }
    });
    if let Err(e) = spec.call_host(&client, &hosts, params.clone()) {
        // A parameter named in the error was given with --set, has its default, or was
        // derived from --shape.
        if matches!(e, Error::Param { .. }) {
            eprintln!(
                "note: `kiln tune` runs `{}` on example inputs of --shape {} with the --set parameters and every other at its default (`kiln ops {}` lists them)",
                spec.name, shape, spec.name
            );
        }
        return Err(e);
    }

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
        let w = seen
            .rows
            .iter()
            .map(|(l, _)| l.len())
            .max()
            .unwrap_or(0)
            .max(6);
        println!("\n{:<w$} {:>12}  status", "config", "median");
        for (label, status) in &seen.rows {
            let (time, text) = match status {
                CandidateStatus::Timed(t) => {
                    (format!("{:.1} us", t.as_secs_f64() * 1e6), "ok".to_string())
                }
                CandidateStatus::Mismatch(m) => ("inf".into(), format!("rejected: {m}")),
                CandidateStatus::Failed(m) => ("inf".into(), format!("failed: {m}")),
                CandidateStatus::NotTimed { rank } => {
                    ("-".into(), format!("not run (cost model rank {rank})"))
                }
            };
            println!("{label:<w$} {time:>12}  {text}");
        }
        println!();
    }
    let stored = match tuner.store_error() {
        None => format!("cache {}", tuner.path().display()),
        Some(_) => "NOT stored".to_string(),
    };
    for (kernel, winner, how, spent) in &seen.decisions {
        println!("{kernel}: {winner} ({how}); {stored}");
        if *how == Decision::Tuned {
            println!(
                "  {} candidate(s) run: {:.2} s in first runs (compile, launch, check), {:.2} s timing",
                spent.run,
                spent.first_runs.as_secs_f64(),
                spent.timing.as_secs_f64()
            );
        }
    }
    // `kiln tune`'s job is the stored winners: a cache that could not be written is an
    // error (exit 2), after what was measured and decided.
    not_stored(tuner)?;
    Ok(ExitCode::SUCCESS)
}
