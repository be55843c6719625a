//! The tune cache on disk: its file format, location and atomic writes.

use crate::Client;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Entry {
    pub(super) config: serde_json::Value,
    pub(super) label: String,
    pub(super) median_us: f64,
    /// Whether every candidate was timed (files from before ranked search: `false`).
    #[serde(default)]
    pub(super) exhaustive: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct CacheFile {
    pub(super) version: u32,
    pub(super) entries: BTreeMap<String, Entry>,
}

pub(super) const CACHE_VERSION: u32 = 1;

/// The default cache directory (see the module docs).
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("KILN_CACHE_DIR") {
        return d;
    }
    let base = if cfg!(target_os = "windows") {
        env("LOCALAPPDATA")
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|h| h.join("Library/Caches"))
    } else {
        env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")))
    };
    base.unwrap_or_else(std::env::temp_dir).join("kiln")
}

pub(super) fn device_prefix(client: &Client) -> String {
    let r = client.report();
    format!("{}|{:?}|{}|", r.name, r.backend, r.driver)
}

/// Takes the cache's lock: an exclusive lock on `<path>.lock`, held until the returned
/// file is dropped (several processes tuning into one cache take turns).
pub(super) fn lock(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir, CACHE_DIR)?;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::path::PathBuf::from(name))?;
    f.lock()?;
    Ok(f)
}

/// What the cache's directory is, for [`ensure_dir`]'s error.
pub(super) const CACHE_DIR: &str = "the cache directory is KILN_CACHE_DIR, or the default";

/// Writes JSON to a temporary file beside `path`, then renames it over `path`; `dir_role`
/// says what its directory is where that is not a directory.
pub(super) fn write_atomic(
    path: &Path,
    value: &impl Serialize,
    dir_role: &str,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir, dir_role)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    crate::fsio::replace_file(path, text.as_bytes())
}

/// Creates `dir` (and its parents) where missing. A path there that is not a directory
/// (a `KILN_CACHE_DIR` naming a file) is said as such, with `role` (what the directory
/// is), not as the "File exists" that creating it would report.
fn ensure_dir(dir: &Path, role: &str) -> std::io::Result<()> {
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.exists() {
            if !p.is_dir() {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory ({role})",
                    p.display()
                )));
            }
            break;
        }
        at = p.parent();
    }
    std::fs::create_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_directory_that_is_a_file_is_said_to_be_one() {
        let d = std::env::temp_dir().join(format!("kiln-cache-file-{}", std::process::id()));
        std::fs::write(&d, b"not a directory").unwrap();
        let e = lock(&d.join("autotune.json")).unwrap_err().to_string();
        assert!(
            e.contains("is not a directory") && e.contains("KILN_CACHE_DIR"),
            "{e}"
        );
        let e = write_atomic(&d.join("sub").join("autotune.json"), &1, CACHE_DIR)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let _ = std::fs::remove_file(&d);
    }
}
