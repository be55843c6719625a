//! The autotuner: pick the fastest valid configuration of a kernel for a device and a
//! bucketed problem shape, and remember it in a cache kiln controls.
//!
//! For each candidate (already pruned by the caller for device limits and constraints):
//! run it once (this also compiles it and is its warm-up), compare its outputs with
//! those of the first candidate that ran, and only then time it: the valid candidates
//! run in rounds, one run of each per round (each ended by a device sync), so that the
//! machine's drift is shared among them; a candidate's time is the median of its runs.
//! A candidate that fails or disagrees scores +inf and is reported, never fatal.
//!
//! How many candidates run ([`Search`]): by default (`ranked`), a decision that comes
//! with a cost model ([`Choice::cost`]) runs candidates in the model's order and times
//! only its finalists: the best [`Autotuner::finalists`] (4), less those estimated at
//! over twice the best (the model is sure they lose), plus any within 10 % of the last
//! one kept (estimates that close are not a ranking); it goes on down the ranking while
//! none is valid. A lone finalist is run once (it must work) and not timed. After each
//! round, a candidate whose fastest run is over 1.5x the best median drops out. `KILN_TUNE_SEARCH=exhaustive` (or `kiln tune --exhaustive`) times
//! every candidate fully, cutting only at 3x, as kiln did before it had cost models, and
//! re-tunes keys a ranked search decided.
//! Candidates compile one after another: wgpu and CUDA compile on the launching thread,
//! and compiling beside a timed run would perturb its time on a machine with few cores. The winner is stored in a JSON file keyed by device (name,
//! backend, driver), kernel, kernel source hash, kiln version and the shape key; the file
//! is written atomically, and a corrupt or unreadable one is ignored (with a warning)
//! and rewritten.
//!
//! Location: `$KILN_CACHE_DIR/autotune.json`, else the user's cache directory
//! (`$XDG_CACHE_HOME/kiln`, `~/.cache/kiln`, `~/Library/Caches/kiln`,
//! `%LOCALAPPDATA%\kiln`). Mode: `KILN_AUTOTUNE=on` (default: tune on first use),
//! `cache` (use cached winners, else the first candidate, never time), `off` (always
//! the first candidate).

mod cache;
mod choice;
pub use cache::default_cache_dir;
use cache::{device_prefix, write_atomic, CacheFile, Entry, CACHE_VERSION};
pub use choice::Choice;

use crate::{Client, Error, HostTensor, Result, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// When the tuner times candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuneMode {
    /// Tune on first use of a key, then use the cache.
    On,
    /// Use cached winners; without one, the first candidate. Never times.
    CacheOnly,
    /// Always the first candidate.
    Off,
}

impl TuneMode {
    /// `KILN_AUTOTUNE`: `on` (default), `cache` or `off`.
    pub fn from_env() -> Result<TuneMode> {
        env_choice(
            "KILN_AUTOTUNE",
            &[
                ("on", TuneMode::On),
                ("cache", TuneMode::CacheOnly),
                ("off", TuneMode::Off),
            ],
        )
    }
}

/// The value of environment variable `var` among `choices` (the first is the default,
/// for an unset or empty variable); anything else is an error naming the variable.
fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)]) -> Result<T> {
    let value = std::env::var(var).unwrap_or_default();
    let value = value.trim();
    if value.is_empty() {
        return Ok(choices[0].1);
    }
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|&(_, t)| t)
        .ok_or_else(|| Error::Param {
            param: var.into(),
            expected: choices.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "),
            found: value.into(),
        })
}

/// How many candidates the tuner times (`KILN_TUNE_SEARCH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// With a cost model, time only the best-ranked finalists; cut clear losers after
    /// one run (the default).
    Ranked,
    /// Time every candidate fully (cut only at 3x the best), ignoring cost models.
    Exhaustive,
}

impl Search {
    /// `KILN_TUNE_SEARCH`: `ranked` (default) or `exhaustive`.
    pub fn from_env() -> Result<Search> {
        env_choice(
            "KILN_TUNE_SEARCH",
            &[
                ("ranked", Search::Ranked),
                ("exhaustive", Search::Exhaustive),
            ],
        )
    }
}

/// What identifies one tuning decision, besides the device.
#[derive(Clone, Debug)]
pub struct TuneKey {
    /// The kernel's registered name.
    pub kernel: &'static str,
    /// Hash of the kernel's source: an edited kernel is tuned anew.
    pub source_hash: String,
    /// The bucketed problem key, e.g. `rows=2048;cols=2048;dtype=f32`.
    pub shape: String,
}

/// How one candidate fared.
#[derive(Clone, Debug, PartialEq)]
pub enum CandidateStatus {
    /// Valid; median time.
    Timed(Duration),
    /// Ran, but its outputs disagree with the reference candidate's.
    Mismatch(String),
    /// Failed to run.
    Failed(String),
    /// Not run: the cost model ranked it `rank`-th (1-based), below the finalists.
    NotTimed {
        /// Its place in the cost model's ranking.
        rank: usize,
    },
}

/// How a tuning decision was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Candidates were timed now.
    Tuned,
    /// Read from the cache: no candidate was run.
    Cached,
    /// Only one candidate fits.
    OnlyCandidate,
    /// The mode (`off`, or `cache` without an entry) chose the first candidate.
    Mode,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Tuned => "tuned now",
            Decision::Cached => "from the cache, no candidate timed",
            Decision::OnlyCandidate => "the only candidate for this device and shape",
            Decision::Mode => "first candidate, as KILN_AUTOTUNE says",
        })
    }
}

/// Something for a progress display to show.
#[derive(Clone, Debug)]
pub enum TuneEvent {
    /// Tuning of `key` starts over `candidates` candidates.
    Start {
        /// The kernel.
        kernel: String,
        /// The shape key.
        shape: String,
        /// How many candidates.
        candidates: usize,
        /// How many of them will be run (the finalists of a ranked search, else all).
        finalists: usize,
    },
    /// A candidate's first run (compile, launch, check) is done; its result comes with
    /// [`TuneEvent::Candidate`] once every candidate is timed (for progress displays).
    FirstRun {
        /// Its label.
        label: String,
    },
    /// How one candidate fared (after all are timed, in the order they ran, those not
    /// run last).
    Candidate {
        /// Its label, e.g. `units=64`.
        label: String,
        /// How it fared.
        status: CandidateStatus,
    },
    /// A decision was made.
    Done {
        /// The kernel.
        kernel: String,
        /// The winner's label.
        winner: String,
        /// How it was decided.
        how: Decision,
        /// Where the time went (zero unless `how` is [`Decision::Tuned`]).
        spent: Spent,
    },
}

/// Where one tuning decision spent its time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    /// Candidates run (each at least once).
    pub run: usize,
    /// First runs: compilation, one launch, download and the check against the
    /// reference candidate.
    pub first_runs: Duration,
    /// Timed runs after them.
    pub timing: Duration,
}

/// Timing budget per valid candidate after the first runs.
const TIME_BUDGET: Duration = Duration::from_millis(400);

/// The autotuner and its cache file.
pub struct Autotuner {
    path: PathBuf,
    mode: Mutex<TuneMode>,
    /// Entries as last read or written; `None` until first needed.
    cache: Mutex<Option<CacheFile>>,
    observer: Mutex<Option<Box<dyn Fn(&TuneEvent) + Send>>>,
    /// Whether a problem with the file was already reported (warn once per process).
    warned: std::sync::atomic::AtomicBool,
    /// Why the last write of the cache failed, if it did (`kiln tune` reports it).
    store_error: Mutex<Option<String>>,
    /// Samples timed per candidate after the warm-up.
    pub samples: usize,
    /// Candidates a ranked search times (the cost model's best; at least 1).
    pub finalists: usize,
    search: Mutex<Search>,
}

impl Autotuner {
    /// A tuner with its cache at `dir/autotune.json`.
    pub fn new(dir: impl AsRef<Path>, mode: TuneMode) -> Self {
        Self {
            path: dir.as_ref().join("autotune.json"),
            mode: Mutex::new(mode),
            cache: Mutex::new(None),
            observer: Mutex::new(None),
            warned: Default::default(),
            store_error: Mutex::new(None),
            samples: 5,
            finalists: 4,
            search: Mutex::new(Search::Ranked),
        }
    }

    /// The process-wide tuner operators use: [`default_cache_dir`] and
    /// `KILN_AUTOTUNE` (an invalid value warns and means `on`).
    pub fn global() -> &'static Autotuner {
        static GLOBAL: OnceLock<Autotuner> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let mode = TuneMode::from_env().unwrap_or_else(|e| {
                eprintln!("warning: {e}; tuning on first use");
                TuneMode::On
            });
            let t = Autotuner::new(default_cache_dir(), mode);
            t.set_search(Search::from_env().unwrap_or_else(|e| {
                eprintln!("warning: {e}; ranked search");
                Search::Ranked
            }));
            t
        })
    }

    /// How many candidates tuning times from now on. `Exhaustive` also re-tunes keys
    /// whose cached decision came from a ranked search.
    pub fn set_search(&self, search: Search) {
        *self.search.lock().unwrap_or_else(|p| p.into_inner()) = search;
    }

    /// The search in force.
    pub fn search(&self) -> Search {
        *self.search.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mode.
    pub fn mode(&self) -> TuneMode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the mode from now on (e.g. `kiln selftest` checks operators untuned).
    pub fn set_mode(&self, mode: TuneMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Shows tuning progress to `f` (replaces any earlier observer).
    pub fn observe(&self, f: impl Fn(&TuneEvent) + Send + 'static) {
        if let Ok(mut o) = self.observer.lock() {
            *o = Some(Box::new(f));
        }
    }

    fn emit(&self, e: TuneEvent) {
        if let Ok(o) = self.observer.lock() {
            if let Some(f) = o.as_ref() {
                f(&e);
            }
        }
    }

    fn warn(&self, message: String) {
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("warning: {message}");
        }
    }

    fn read_file(&self) -> CacheFile {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CacheFile::default(),
            Err(e) => {
                self.warn(format!(
                    "autotune cache {} unreadable ({e}); ignoring it",
                    self.path.display()
                ));
                return CacheFile::default();
            }
        };
        match serde_json::from_str::<CacheFile>(&text) {
            Ok(f) if f.version == CACHE_VERSION => f,
            Ok(f) => {
                self.warn(format!(
                    "autotune cache {} has version {}, kiln uses {CACHE_VERSION}; it will be rewritten",
                    self.path.display(),
                    f.version
                ));
                CacheFile::default()
            }
            Err(e) => {
                self.warn(format!(
                    "autotune cache {} is corrupt ({e}); it will be rewritten",
                    self.path.display()
                ));
                CacheFile::default()
            }
        }
    }

    fn with_cache<T>(&self, f: impl FnOnce(&mut CacheFile) -> T) -> T {
        let mut guard = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let cache = guard.get_or_insert_with(|| self.read_file());
        f(cache)
    }

    /// Merges `entries` into the file on disk (re-read first, so other processes'
    /// entries survive) and replaces it atomically. Failure to write is a warning.
    fn persist(&self, new: BTreeMap<String, Entry>) {
        // Processes tuning into one cache take turns (an exclusive lock on a file
        // beside it), so no read-merge-write loses another's entries.
        let lock = cache::lock(&self.path);
        let mut file = self.read_file();
        file.version = CACHE_VERSION;
        file.entries.extend(new);
        let written = lock.and_then(|_guard| write_atomic(&self.path, &file));
        let error = written.err().map(|e| e.to_string());
        if let Some(e) = &error {
            self.warn(format!(
                "could not write autotune cache {}: {e}",
                self.path.display()
            ));
        }
        if let Ok(mut s) = self.store_error.lock() {
            *s = error;
        }
        self.with_cache(|c| *c = file);
    }

    /// Why the last write of the cache file failed (`None`: it was written, or nothing
    /// was written yet).
    pub fn store_error(&self) -> Option<String> {
        self.store_error.lock().ok().and_then(|s| s.clone())
    }

    fn entry_key(client: &Client, key: &TuneKey) -> String {
        let r = client.report();
        format!(
            "{}|{:?}|{}|{}|{}|kiln-{}|{}",
            r.name,
            r.backend,
            r.driver,
            key.kernel,
            key.source_hash,
            env!("CARGO_PKG_VERSION"),
            key.shape
        )
    }

    /// Picks a configuration among `candidates` (non-empty, in preference order) for
    /// `key` on `client`'s device. `run` launches one candidate and returns its
    /// outputs; `tolerance` bounds the max relative difference allowed between a
    /// candidate's outputs and the reference candidate's (each element's, with a floor
    /// of 1e-3 of the output's largest magnitude plus 1e-6). Without a cost model every
    /// candidate runs (see [`Autotuner::tune_ranked`]).
    pub fn tune<C>(
        &self,
        client: &Client,
        key: &TuneKey,
        candidates: &[C],
        label: impl Fn(&C) -> String,
        run: impl Fn(&C) -> Result<Vec<Tensor>>,
        tolerance: f64,
    ) -> Result<C>
    where
        C: Clone + PartialEq + Serialize + DeserializeOwned,
    {
        self.tune_ranked(client, key, candidates, label, run, tolerance, None)
    }

    /// [`Autotuner::tune`] with a cost model: `cost` estimates a candidate's time in
    /// any unit (lower is better). A ranked search runs candidates in the model's order,
    /// the first that runs being the reference the others are checked against, and
    /// stops after [`Autotuner::finalists`] valid ones; the rest are reported as
    /// [`CandidateStatus::NotTimed`]. An exhaustive search ignores the model.
    #[allow(clippy::too_many_arguments)]
    pub fn tune_ranked<C>(
        &self,
        client: &Client,
        key: &TuneKey,
        candidates: &[C],
        label: impl Fn(&C) -> String,
        run: impl Fn(&C) -> Result<Vec<Tensor>>,
        tolerance: f64,
        cost: Option<&dyn Fn(&C) -> f64>,
    ) -> Result<C>
    where
        C: Clone + PartialEq + Serialize + DeserializeOwned,
    {
        let first = candidates.first().cloned().ok_or_else(|| Error::Kernel {
            kernel: key.kernel.into(),
            message: "no configuration fits this device and shape".into(),
        })?;
        let done = |winner: &C, how: Decision, spent: Spent| {
            self.emit(TuneEvent::Done {
                kernel: key.kernel.into(),
                winner: label(winner),
                how,
                spent,
            })
        };
        if candidates.len() == 1 {
            done(&first, Decision::OnlyCandidate, Spent::default());
            return Ok(first);
        }
        let mode = self.mode();
        if mode == TuneMode::Off {
            done(&first, Decision::Mode, Spent::default());
            return Ok(first);
        }
        let search = self.search();
        let ekey = Self::entry_key(client, key);
        let cached = self.with_cache(|c| c.entries.get(&ekey).cloned());
        if let Some(entry) = cached {
            // An exhaustive search does not trust a ranked one's decision.
            let trusted = search == Search::Ranked || entry.exhaustive;
            if let Ok(config) = serde_json::from_value::<C>(entry.config) {
                if candidates.contains(&config) && (trusted || mode == TuneMode::CacheOnly) {
                    done(&config, Decision::Cached, Spent::default());
                    return Ok(config);
                }
            }
        }
        if mode == TuneMode::CacheOnly {
            done(&first, Decision::Mode, Spent::default());
            return Ok(first);
        }

        // The order candidates run in, and how many valid ones end the search.
        // The order candidates run in, and how many valid ones end the search.
        let (order, finalists) = match cost {
            Some(cost) if search == Search::Ranked => {
                let ranked = rank(candidates, cost);
                let finalists = finalist_count(&ranked, self.finalists);
                (ranked.into_iter().map(|(i, _)| i).collect(), finalists)
            }
            _ => ((0..candidates.len()).collect::<Vec<_>>(), candidates.len()),
        };
        let cut = if search == Search::Exhaustive {
            3.0
        } else {
            1.5
        };
        self.emit(TuneEvent::Start {
            kernel: key.kernel.into(),
            shape: key.shape.clone(),
            candidates: candidates.len(),
            finalists,
        });
        // First runs, in order: compile, launch, check against the reference (the first
        // candidate that ran). Past the finalists, a candidate runs only while none of
        // them is valid.
        let mut reference: Option<Vec<HostTensor>> = None;
        let mut spent = Spent::default();
        let mut status: Vec<Option<CandidateStatus>> = vec![None; order.len()];
        let mut valid: Vec<(usize, Duration)> = Vec::new();
        for (pos, &i) in order.iter().enumerate() {
            let c = &candidates[i];
            if valid.len() >= finalists {
                status[pos] = Some(CandidateStatus::NotTimed { rank: pos + 1 });
                continue;
            }
            spent.run += 1;
            let started = Instant::now();
            let checked = self.first_run(c, &run, &mut reference, tolerance);
            let first_run = started.elapsed();
            spent.first_runs += first_run;
            self.emit(TuneEvent::FirstRun { label: label(c) });
            match checked {
                None => valid.push((pos, first_run)),
                Some(failed) => status[pos] = Some(failed),
            }
        }
        // A lone valid candidate has nothing to be timed against: its first run decides.
        let times = if let [(pos, first_run)] = valid[..] {
            vec![(pos, Ok(vec![first_run]))]
        } else {
            let started = Instant::now();
            let times = self.time_rounds(client, candidates, &order, &valid, &run, cut);
            spent.timing = started.elapsed();
            times
        };
        let mut best: Option<(Duration, &C)> = None;
        for (pos, t) in times {
            let c = &candidates[order[pos]];
            status[pos] = Some(match t {
                Ok(mut t) => {
                    t.sort();
                    let median = t[t.len() / 2];
                    if best.is_none_or(|(bt, _)| median < bt) {
                        best = Some((median, c));
                    }
                    CandidateStatus::Timed(median)
                }
                Err(e) => CandidateStatus::Failed(e),
            });
        }
        for (pos, s) in status.into_iter().enumerate() {
            if let Some(status) = s {
                self.emit(TuneEvent::Candidate {
                    label: label(&candidates[order[pos]]),
                    status,
                });
            }
        }
        let Some((time, winner)) = best else {
            return Err(Error::Kernel {
                kernel: key.kernel.into(),
                message: "every candidate configuration failed".into(),
            });
        };
        let entry = Entry {
            config: serde_json::to_value(winner).map_err(|e| Error::Kernel {
                kernel: key.kernel.into(),
                message: format!("config not serializable: {e}"),
            })?,
            label: label(winner),
            median_us: time.as_secs_f64() * 1e6,
            exhaustive: finalists == candidates.len(),
        };
        self.persist(BTreeMap::from([(ekey, entry)]));
        done(winner, Decision::Tuned, spent);
        Ok(winner.clone())
    }

    /// Runs `c` once (compiling it) and checks its outputs against the reference's (the
    /// first candidate's to get here becomes the reference). `None`: valid.
    fn first_run<C>(
        &self,
        c: &C,
        run: &impl Fn(&C) -> Result<Vec<Tensor>>,
        reference: &mut Option<Vec<HostTensor>>,
        tolerance: f64,
    ) -> Option<CandidateStatus> {
        let outputs =
            match run(c).and_then(|o| o.iter().map(Tensor::download).collect::<Result<Vec<_>>>()) {
                Ok(o) => o,
                Err(e) => return Some(CandidateStatus::Failed(e.to_string())),
            };
        match reference {
            None => {
                *reference = Some(outputs);
                None
            }
            Some(r) => disagreement(r, &outputs, tolerance).map(CandidateStatus::Mismatch),
        }
    }

    /// Times the `valid` candidates (positions in `order`) in rounds, one run of each
    /// per round, so that the machine's drift is shared among them. After each round, a
    /// candidate whose fastest run is over `cut` times the best median so far drops
    /// out. Rounds end after [`Autotuner::samples`], when one candidate is left, or when
    /// the budget ([`TIME_BUDGET`] per valid candidate) is spent. Each candidate's run
    /// times, or why a run failed.
    fn time_rounds<C>(
        &self,
        client: &Client,
        candidates: &[C],
        order: &[usize],
        valid: &[(usize, Duration)],
        run: &impl Fn(&C) -> Result<Vec<Tensor>>,
        cut: f64,
    ) -> Vec<(usize, std::result::Result<Vec<Duration>, String>)> {
        let mut times: Vec<(usize, std::result::Result<Vec<Duration>, String>)> = valid
            .iter()
            .map(|&(pos, _)| (pos, Ok(Vec::new())))
            .collect();
        let mut alive = vec![true; valid.len()];
        let budget = TIME_BUDGET * valid.len() as u32;
        let started = Instant::now();
        let median = |t: &[Duration]| {
            let mut t = t.to_vec();
            t.sort();
            t[t.len() / 2]
        };
        for _ in 0..self.samples.max(1) {
            for (v, (pos, result)) in times.iter_mut().enumerate() {
                let Ok(samples) = result else { continue };
                if !alive[v] {
                    continue;
                }
                let start = Instant::now();
                match run(&candidates[order[*pos]]).and_then(|_| client.sync()) {
                    Ok(()) => samples.push(start.elapsed()),
                    Err(e) => {
                        *result = Err(e.to_string());
                        alive[v] = false;
                    }
                }
            }
            let best = times
                .iter()
                .zip(&alive)
                .filter_map(|((_, t), &a)| t.as_ref().ok().filter(|_| a))
                .map(|t| median(t))
                .min();
            let Some(best) = best else { break };
            for (v, (_, t)) in times.iter().enumerate() {
                if let Ok(t) = t {
                    let fastest = t.iter().min().copied().unwrap_or_default();
                    if fastest.as_secs_f64() > cut * best.as_secs_f64() {
                        alive[v] = false;
                    }
                }
            }
            if alive.iter().filter(|&&a| a).count() <= 1 || started.elapsed() > budget {
                break;
            }
        }
        times
    }

    /// Copies the cache entries of `client`'s device to `file` (for shipping tuned
    /// configurations with an application). Returns how many were written.
    pub fn export(&self, client: &Client, file: &Path) -> Result<usize> {
        let prefix = device_prefix(client);
        let mut out = CacheFile {
            version: CACHE_VERSION,
            ..Default::default()
        };
        out.entries = self.with_cache(|c| {
            c.entries
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        write_atomic(file, &out).map_err(|source| Error::Io {
            path: file.display().to_string(),
            source,
        })?;
        Ok(out.entries.len())
    }

    /// Merges the entries of an exported file into the cache. A file that is not a
    /// kiln autotune export is an error. Returns how many entries were merged.
    pub fn import(&self, file: &Path) -> Result<usize> {
        let p = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        let f: CacheFile = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: p.clone(),
            message: format!("not a kiln autotune file: {e}"),
        })?;
        if f.version != CACHE_VERSION {
            return Err(Error::Format {
                path: p,
                message: format!(
                    "autotune file version {}, kiln reads {CACHE_VERSION}",
                    f.version
                ),
            });
        }
        let n = f.entries.len();
        self.persist(f.entries);
        Ok(n)
    }
}

/// Candidate indices by estimated cost, best first (NaN counts as +inf; ties keep
/// the declaration order), each with its estimate.
pub(crate) fn rank<C>(candidates: &[C], cost: &dyn Fn(&C) -> f64) -> Vec<(usize, f64)> {
    let mut order: Vec<(usize, f64)> = candidates
        .iter()
        .map(cost)
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .enumerate()
        .collect();
    order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    order
}

/// How many of the `ranked` candidates (best first) a ranked search times: the best
/// `most`, less those the model puts over [`CONFIDENT`] times the best estimate (it is
/// sure they lose), plus any within 10 % of the last one kept (estimates that close are
/// not a ranking). At least one.
fn finalist_count(ranked: &[(usize, f64)], most: usize) -> usize {
    let Some(&(_, best)) = ranked.first() else {
        return 0;
    };
    let kept = ranked
        .iter()
        .take(most.max(1))
        .take_while(|(_, e)| *e <= CONFIDENT * best)
        .count()
        .max(1);
    let last = ranked[kept - 1].1;
    ranked.iter().filter(|(_, e)| *e <= last * 1.1).count()
}

/// A candidate the cost model estimates at more than this many times the best one is
/// not timed.
const CONFIDENT: f64 = 2.0;

/// `None` when every output agrees within `tolerance`, else what differs.
fn disagreement(reference: &[HostTensor], got: &[HostTensor], tolerance: f64) -> Option<String> {
    if reference.len() != got.len() {
        return Some(format!(
            "{} outputs, reference has {}",
            got.len(),
            reference.len()
        ));
    }
    for (i, (r, g)) in reference.iter().zip(got).enumerate() {
        if r.shape != g.shape || r.dtype != g.dtype {
            return Some(format!(
                "output {i}: {} {:?} vs {} {:?}",
                g.dtype, g.shape, r.dtype, r.shape
            ));
        }
        let want = r.to_f64();
        // Relative to each element, floored at 1e-3 of the output's largest magnitude:
        // an element that cancels to near zero is judged on the output's scale, not its
        // own (a different summation order moves it by an ulp of the scale).
        let scale = want
            .iter()
            .filter(|a| a.is_finite())
            .fold(0.0f64, |m, a| m.max(a.abs()));
        let worst = want
            .iter()
            .zip(g.to_f64())
            .map(|(&a, b)| {
                if a == b || (a.is_nan() && b.is_nan()) {
                    0.0
                } else {
                    (a - b).abs() / (a.abs() + 1e-3 * scale + 1e-6)
                }
            })
            .fold(
                0.0f64,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            );
        if worst > tolerance {
            return Some(format!(
                "output {i} differs from the reference config by {worst:.2e} (relative)"
            ));
        }
    }
    None
}

/// FNV-1a 64 of `text`, hex: for source hashes in tune keys.
pub fn fnv1a_hex(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
