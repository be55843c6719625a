//! The autotuner: pick the fastest valid configuration of a kernel for a device and a
//! bucketed problem shape, and remember it in a cache kiln controls.
//!
//! For each candidate (already pruned by the caller for device limits and constraints):
//! run it once (this also compiles it and is its warm-up), compare its outputs with
//! those of the first candidate that ran, and only then time it: the valid candidates
//! run in rounds, one run of each per round (each ended by a device sync), so that the
//! machine's drift is shared among them; a candidate's time is the median of its runs.
//! A candidate whose last sample took under [`BATCH_BELOW`] (1 ms) is sampled next as a
//! batch of calls back to back and one sync (about 1 ms of them, at most [`MAX_BATCH`]),
//! its time per call: how a model runs it and `kiln bench` times it, without the sync's
//! cost and jitter in every sample (on a GPU, where most kernels take under 1 ms).
//! A candidate that fails or disagrees scores +inf and is reported, never fatal. Its
//! checked run writes memory that holds no earlier result ([`is_check_run`]: poisoned
//! fresh outputs), so that one that skips an element disagrees instead of showing what
//! the candidate before it left there.
//!
//! How many candidates run ([`Search`]): by default (`ranked`), a decision that comes
//! with a cost model ([`Choice::cost`]) runs candidates in the model's order and times
//! only its finalists: the best [`Autotuner::finalists`] (4), less those estimated at
//! over twice the best (the model is sure they lose), plus any within 10 % of the last
//! one kept (estimates that close are not a ranking); it goes on down the ranking while
//! none is valid. A decision whose model was checked against exhaustive searches gives
//! its own count and tie window ([`Ranking`], [`Choice::finalists`]). A lone finalist
//! is run once (it must work) and not timed; where it is not the declared first
//! configuration, that one runs once to check it, and decisions nested in that check
//! take their first candidate untuned ([`Autotuner::untuned`]). Before each round, a
//! candidate whose fastest run is over 1.5x the best median drops out; a round that
//! would end past the timing budget is not started.
//!
//! Where the operator can compile a candidate before its first run
//! ([`Autotuner::tune_warmed`]: every `#[kiln::kernel]` kernel's `tuned` and `matmul`
//! launch the grid's first cube alone), that first run is its first timed sample: clear losers drop out before any round, and a clear loser the
//! model also put over 10 % above the best confirms the ranking there: finalists it
//! estimates no better are not run at all (compiling them is most of a ranked search's
//! time on lavapipe, 1-2 s for a 32 x 32 register tile).
//!
//! `KILN_TUNE_SEARCH=exhaustive` (or `kiln tune --exhaustive`) times every candidate
//! fully, cutting only at 3x, as kiln did before it had cost models, and re-tunes keys a
//! ranked search decided. Candidates compile one after another: wgpu and CUDA compile
//! on the launching thread (lavapipe at the first dispatch), and compiling beside a
//! timed run would perturb its time on a machine with few cores. The winner is stored
//! in a JSON file keyed by device (name, backend, driver), kernel, kernel source hash,
//! kiln version and the shape key; the file is written atomically, and a corrupt or
//! unreadable one is ignored (with a warning) and rewritten.
//!
//! Location: `$KILN_CACHE_DIR/autotune.json`, else the user's cache directory
//! (`$XDG_CACHE_HOME/kiln`, `~/.cache/kiln`, `~/Library/Caches/kiln`,
//! `%LOCALAPPDATA%\kiln`). Mode: `KILN_AUTOTUNE=on` (default: tune on first use),
//! `cache` (use cached winners, else the first candidate, never time), `off` (always
//! the first candidate).

mod cache;
mod choice;
mod search;
pub use cache::default_cache_dir;
use cache::{device_prefix, write_atomic, CacheFile, Entry, CACHE_DIR, CACHE_VERSION};
pub use choice::Choice;
pub use search::{Ranking, BATCH_BELOW, MAX_BATCH, SAMPLE_FLOOR};

use crate::{Client, Error, HostTensor, Result, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A warm-up for [`Autotuner::tune_warmed`]: compiles a candidate by launching the same
/// kernel on little work (e.g. the grid's first cube alone); `false` where it cannot.
pub type WarmUp<'a, C> = &'a dyn Fn(&C) -> Result<bool>;

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

/// The value of environment variable `var` among `choices`, in any letter case (the
/// first is the default, for an unset or empty variable); anything else is an error
/// naming the variable.
fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)]) -> Result<T> {
    let value = match std::env::var(var) {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(Error::Param {
                param: var.into(),
                expected: choices.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "),
                found: format!("{v:?} (not UTF-8)"),
            })
        }
    };
    let value = value.trim();
    if value.is_empty() {
        return Ok(choices[0].1);
    }
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
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
    /// Not run: the cost model ranked it `rank`-th (1-based), below the finalists, or
    /// no better than a finalist whose timed first run confirmed it a clear loser.
    NotTimed {
        /// Its place in the cost model's ranking.
        rank: usize,
    },
}

/// How far a candidate's outputs may differ from the reference candidate's: each
/// element's `|a - b| / (|a| + floor max|a| + 1e-6)` at most `rel` (`floor` a fraction of
/// the output's largest finite magnitude, so that an element that cancels to near zero is
/// judged on the output's scale). A bare `f64` is `rel` with a floor of 1e-3.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// The largest relative difference allowed.
    pub rel: f64,
    /// The floor of each element's scale, as a fraction of the output's largest.
    pub floor: f64,
}

impl From<f64> for Tolerance {
    fn from(rel: f64) -> Self {
        Tolerance { rel, floor: 1e-3 }
    }
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
    /// The first candidate, untimed: the decision is nested in the run of a trusted
    /// configuration that checks another decision's lone finalist
    /// ([`Autotuner::untuned`]).
    Check,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Tuned => "tuned now",
            Decision::Cached => "from the cache, no candidate timed",
            Decision::OnlyCandidate => "the only candidate for this device and shape",
            Decision::Mode => "first candidate, as KILN_AUTOTUNE says",
            Decision::Check => "first candidate, untuned: part of a check of another decision",
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

thread_local! {
    /// Inside [`Autotuner::untuned`].
    static UNTUNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Inside a candidate's check run ([`is_check_run`]).
    static CHECK_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a candidate's check run: the one run of it whose
/// outputs the search compares with the reference candidate's (its timed runs are not).
/// What such a run writes must land in memory that holds no earlier result, or a
/// candidate that skips some elements would show the values the candidate before it
/// left there and pass. So while this holds, [`Tensor::empty`] gives tensors filled with
/// poison ([`Tensor::poisoned`]: NaN in every float dtype), and a `#[kiln::kernel]`'s
/// `tuned` launches the candidate on fresh poisoned outputs of the caller's shapes (the
/// caller's own are written once, by the winner, after the search).
pub fn is_check_run() -> bool {
    CHECK_RUN.with(std::cell::Cell::get)
}

/// Runs `f` with [`is_check_run`] set to `on` on this thread, then restores it (a
/// decision tuned inside a check run times its candidates outside one).
fn in_check_run<T>(on: bool, f: impl FnOnce() -> T) -> T {
    with_flag(&CHECK_RUN, on, f)
}

/// Runs `f` with the thread-local `flag` set to `on`, then restores its value (also when
/// `f` unwinds).
fn with_flag<T>(
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    on: bool,
    f: impl FnOnce() -> T,
) -> T {
    struct Reset(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _reset = Reset(flag, flag.with(|c| c.replace(on)));
    f()
}

/// Timing budget per valid candidate after the first runs.
const TIME_BUDGET: Duration = Duration::from_millis(400);

/// What [`Autotuner::observe`] registers: called with each tuning event.
type Observer = Box<dyn Fn(&TuneEvent) + Send>;

/// The autotuner and its cache file.
pub struct Autotuner {
    path: PathBuf,
    mode: Mutex<TuneMode>,
    /// Entries as last read or written; `None` until first needed.
    cache: Mutex<Option<CacheFile>>,
    observer: Mutex<Option<Observer>>,
    /// Whether a read failure, then a write failure, of the cache was reported (each
    /// once per process).
    warned: [std::sync::atomic::AtomicBool; 2],
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

    /// Runs `f` with every decision it reaches on this thread taking its first
    /// candidate, untimed and not cached ([`Decision::Check`]). The search runs the
    /// trusted configuration's check of a lone finalist this way: a decision nested in
    /// that run (a path's kernel tiles) is part of the check, not something to tune
    /// (lavapipe, W4A16 64 x 4096 x 4096: checking the direct path against the GEMV path
    /// tuned the GEMV's eight tiles, 29 s, for one run of 1.7 s).
    pub fn untuned<T>(f: impl FnOnce() -> T) -> T {
        with_flag(&UNTUNED, true, f)
    }

    /// Whether this thread is inside [`Autotuner::untuned`].
    pub(crate) fn is_untuned() -> bool {
        UNTUNED.with(std::cell::Cell::get)
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

    /// Reports a cache problem on stderr, once per process for each `kind` (0: read,
    /// 1: write).
    fn warn(&self, kind: usize, message: String) {
        if !self.warned[kind].swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("warning: {message}");
        }
    }

    fn read_file(&self) -> CacheFile {
        let text = match crate::fsio::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CacheFile::default(),
            Err(e) => {
                self.warn(
                    0,
                    format!(
                        "autotune cache {} unreadable ({e}); ignoring it",
                        self.path.display()
                    ),
                );
                return CacheFile::default();
            }
        };
        match serde_json::from_str::<CacheFile>(&text) {
            Ok(f) if f.version == CACHE_VERSION => f,
            Ok(f) => {
                self.warn(0, format!(
                    "autotune cache {} has version {}, kiln uses {CACHE_VERSION}; it will be rewritten",
                    self.path.display(),
                    f.version
                ));
                CacheFile::default()
            }
            Err(e) => {
                self.warn(
                    0,
                    format!(
                        "autotune cache {} is corrupt ({e}); it will be rewritten",
                        self.path.display()
                    ),
                );
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
        let written = lock.and_then(|_guard| write_atomic(&self.path, &file, CACHE_DIR));
        let error = written.err().map(|e| e.to_string());
        if let Some(e) = &error {
            self.warn(
                1,
                format!(
                    "could not write autotune cache {} (in KILN_CACHE_DIR or the default cache directory): {e}; the winners stay in this process only",
                    self.path.display()
                ),
            );
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
        write_atomic(file, &out, "the directory of the export file").map_err(|source| {
            Error::Io {
                path: file.display().to_string(),
                source,
            }
        })?;
        Ok(out.entries.len())
    }

    /// Merges the entries of an exported file into the cache. A file that is not a
    /// kiln autotune export (or has an entry whose key is not a kiln tune key) is an
    /// error. Returns what was merged.
    pub fn import(&self, file: &Path) -> Result<Imported> {
        let p = file.display().to_string();
        let text = crate::fsio::read_to_string(file).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        let format = |message: String| Error::Format {
            path: p.clone(),
            message,
        };
        let f: CacheFile = serde_json::from_str(&text)
            .map_err(|e| format(format!("not a kiln autotune file: {e}")))?;
        if f.version != CACHE_VERSION {
            return Err(format(format!(
                "autotune file version {}, kiln reads {CACHE_VERSION}",
                f.version
            )));
        }
        let this = format!("kiln-{}", env!("CARGO_PKG_VERSION"));
        let mut imported = Imported {
            entries: 0,
            devices: Vec::new(),
            other_version: 0,
            skipped: Vec::new(),
        };
        let mut keep = BTreeMap::new();
        for key in f.entries.keys() {
            // name|backend|driver|kernel|source hash|kiln-VERSION|shape (`entry_key`),
            // read from the right: a device name or driver may hold a `|`.
            let right: Vec<&str> = key.rsplitn(5, '|').collect();
            let device: Vec<&str> = right.get(4).map_or(vec![], |d| d.splitn(3, '|').collect());
            if right.len() < 5 || device.len() < 3 || !right[1].starts_with("kiln-") {
                return Err(format(format!(
                    "entry `{key}` is not a kiln tune key (device|backend|driver|kernel|source|kiln-VERSION|shape)"
                )));
            }
            if let Err(why) = check_imported(key, right[3], &f.entries[key]) {
                imported.skipped.push(why);
                continue;
            }
            keep.insert(key.clone(), f.entries[key].clone());
            let device = format!("{} ({})", device[0], device[1]);
            if !imported.devices.contains(&device) {
                imported.devices.push(device);
            }
            if right[1] != this {
                imported.other_version += 1;
            }
        }
        imported.entries = keep.len();
        self.persist(keep);
        Ok(imported)
    }
}

/// An imported entry's own check: a timing that is a time, and for a kernel declared
/// with `#[kiln::kernel]` a configuration of its declared tunables with declared values
/// (anything else is never used: it would be retuned on first use, silently). Entries
/// of other decisions (an operator's path, matmul's kernel family) are checked at use.
fn check_imported(key: &str, kernel: &str, entry: &Entry) -> std::result::Result<(), String> {
    if !(entry.median_us.is_finite() && entry.median_us >= 0.0) {
        return Err(format!(
            "entry `{key}`: median_us {} is not a time",
            entry.median_us
        ));
    }
    let Some(spec) = crate::registered_kernels()
        .into_iter()
        .find(|k| k.name == kernel)
    else {
        return Ok(());
    };
    let tunables: Vec<&crate::ParamSpec> =
        spec.config.iter().filter(|p| p.doc == "tunable").collect();
    let fields = entry.config.as_object();
    let ok = fields.is_some_and(|f| {
        f.len() == tunables.len()
            && tunables.iter().all(|t| {
                f.get(t.name).and_then(|v| v.as_u64()).is_some_and(|v| {
                    t.values
                        .split('|')
                        .any(|d| d.trim().parse::<u64>() == Ok(v))
                })
            })
    });
    if ok {
        return Ok(());
    }
    let declared: Vec<String> = tunables
        .iter()
        .map(|t| format!("{}: {}", t.name, t.values))
        .collect();
    Err(format!(
        "entry `{key}`: config {} is not a configuration of kernel `{kernel}` ({})",
        entry.config,
        declared.join("; ")
    ))
}

/// What [`Autotuner::import`] merged into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Entries merged.
    pub entries: usize,
    /// The devices they were tuned on (`name (backend)`), each once, in key order: an
    /// entry applies only on its device.
    pub devices: Vec<String>,
    /// Entries from another kiln version: kept, but never used by this one (its keys
    /// name its own version, and kernels change between versions), so those shapes
    /// tune again.
    pub other_version: usize,
    /// Entries left out, each with why: a timing that is not a time, or a configuration
    /// its kernel does not declare (never used: that shape would tune again).
    pub skipped: Vec<String>,
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
