//! The autotuner: pick the fastest valid configuration of a kernel for a device and a
//! bucketed problem shape, and remember it in a cache kiln controls.
//!
//! For each candidate (already pruned by the caller for device limits and constraints):
//! run it once (this also compiles it), compare its outputs with those of the first
//! candidate that ran, and only then time it (warm-up, then the median of several runs,
//! each ended by a device sync). A candidate that fails or disagrees scores +inf and is
//! reported, never fatal. The winner is stored in a JSON file keyed by device (name,
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
        match std::env::var("KILN_AUTOTUNE").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("on") => Ok(TuneMode::On),
            Ok("cache") => Ok(TuneMode::CacheOnly),
            Ok("off") => Ok(TuneMode::Off),
            Ok(other) => Err(Error::Param {
                param: "KILN_AUTOTUNE".into(),
                expected: "on | cache | off".into(),
                found: other.into(),
            }),
        }
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
    },
    /// One candidate finished.
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
    },
}

/// Timing budget per candidate after its first (validated) run.
const TIME_BUDGET: Duration = Duration::from_millis(500);

/// The autotuner and its cache file.
pub struct Autotuner {
    path: PathBuf,
    mode: TuneMode,
    /// Entries as last read or written; `None` until first needed.
    cache: Mutex<Option<CacheFile>>,
    observer: Mutex<Option<Box<dyn Fn(&TuneEvent) + Send>>>,
    /// Whether a problem with the file was already reported (warn once per process).
    warned: std::sync::atomic::AtomicBool,
    /// Why the last write of the cache failed, if it did (`kiln tune` reports it).
    store_error: Mutex<Option<String>>,
    /// Samples timed per candidate after the warm-up.
    pub samples: usize,
}

impl Autotuner {
    /// A tuner with its cache at `dir/autotune.json`.
    pub fn new(dir: impl AsRef<Path>, mode: TuneMode) -> Self {
        Self {
            path: dir.as_ref().join("autotune.json"),
            mode,
            cache: Mutex::new(None),
            observer: Mutex::new(None),
            warned: Default::default(),
            store_error: Mutex::new(None),
            samples: 5,
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
            Autotuner::new(default_cache_dir(), mode)
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mode.
    pub fn mode(&self) -> TuneMode {
        self.mode
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
    /// of 1e-3 of the output's largest magnitude plus 1e-6).
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
        let first = candidates.first().cloned().ok_or_else(|| Error::Kernel {
            kernel: key.kernel.into(),
            message: "no configuration fits this device and shape".into(),
        })?;
        let done = |winner: &C, how: Decision| {
            self.emit(TuneEvent::Done {
                kernel: key.kernel.into(),
                winner: label(winner),
                how,
            })
        };
        if candidates.len() == 1 {
            done(&first, Decision::OnlyCandidate);
            return Ok(first);
        }
        if self.mode == TuneMode::Off {
            done(&first, Decision::Mode);
            return Ok(first);
        }
        let ekey = Self::entry_key(client, key);
        let cached = self.with_cache(|c| c.entries.get(&ekey).cloned());
        if let Some(entry) = cached {
            if let Ok(config) = serde_json::from_value::<C>(entry.config) {
                if candidates.contains(&config) {
                    done(&config, Decision::Cached);
                    return Ok(config);
                }
            }
        }
        if self.mode == TuneMode::CacheOnly {
            done(&first, Decision::Mode);
            return Ok(first);
        }

        self.emit(TuneEvent::Start {
            kernel: key.kernel.into(),
            shape: key.shape.clone(),
            candidates: candidates.len(),
        });
        let mut reference: Option<Vec<HostTensor>> = None;
        let mut best: Option<(Duration, &C)> = None;
        for c in candidates {
            let status = self.measure(
                client,
                c,
                &run,
                &mut reference,
                tolerance,
                best.map(|b| b.0),
            );
            if let CandidateStatus::Timed(t) = status {
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, c));
                }
            }
            self.emit(TuneEvent::Candidate {
                label: label(c),
                status,
            });
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
        };
        self.persist(BTreeMap::from([(ekey, entry)]));
        done(winner, Decision::Tuned);
        Ok(winner.clone())
    }

    fn measure<C>(
        &self,
        client: &Client,
        c: &C,
        run: &impl Fn(&C) -> Result<Vec<Tensor>>,
        reference: &mut Option<Vec<HostTensor>>,
        tolerance: f64,
        best: Option<Duration>,
    ) -> CandidateStatus {
        // The first run compiles the candidate; its outputs are what is validated.
        let outputs =
            match run(c).and_then(|o| o.iter().map(Tensor::download).collect::<Result<Vec<_>>>()) {
                Ok(o) => o,
                Err(e) => return CandidateStatus::Failed(e.to_string()),
            };
        match reference {
            None => *reference = Some(outputs),
            Some(r) => {
                if let Some(msg) = disagreement(r, &outputs, tolerance) {
                    return CandidateStatus::Mismatch(msg);
                }
            }
        }
        let mut times = Vec::with_capacity(self.samples);
        let started = Instant::now();
        for _ in 0..self.samples.max(1) {
            let start = Instant::now();
            if let Err(e) = run(c).and_then(|_| client.sync()) {
                return CandidateStatus::Failed(e.to_string());
            }
            let t = start.elapsed();
            times.push(t);
            // Slow kernels get fewer samples: a clear loser (3x the best so far) or a
            // spent time budget ends the candidate early.
            if best.is_some_and(|b| t > 3 * b) || started.elapsed() > TIME_BUDGET {
                break;
            }
        }
        times.sort();
        CandidateStatus::Timed(times[times.len() / 2])
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
