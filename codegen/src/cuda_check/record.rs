//! A record of earlier compiles (`kernels/cuda-compiled.txt`): what NVRTC and ptxas
//! reported for each emitted CUDA source and architecture, keyed by a hash of the
//! canonical source. The check reads a row's report from the record when the row's
//! source is there byte for byte (same NVRTC version), and compiles it otherwise.
//!
//! Why: the check compiles ~1,200 kernel x dtype x configuration x architecture rows,
//! ~13 CPU-minutes of NVVM and ptxas, on every run, though most sources do not change
//! between commits. A source that changes is compiled again, so a change can never pass
//! on an old report; and the test suite compiles one row of every kernel afresh and
//! requires the record to agree with NVRTC (`Plan::verify_record`), so a wrong record
//! fails too. `kiln check-cuda --record FILE` writes it (compiling only what it lacks).
//!
//! Format: a `nvrtc MAJOR.MINOR` line, then one line per source and architecture:
//! `ARCH KEY REGISTERS SPILL_STORES SPILL_LOADS STACK_FRAME SHARED_BYTES ENTRY`, where
//! KEY is `fnv1a64-length` of the canonical source; `#` starts a comment.

use kiln_runtime::{Error, KernelUsage};
use std::collections::BTreeMap;
use std::path::Path;

/// The record's key of an emitted source: FNV-1a (64 bits) of the canonical text, and
/// its length in bytes.
pub fn source_key(canonical_source: &str) -> String {
    format!(
        "{}-{}",
        kiln_runtime::tune::fnv1a_hex(canonical_source),
        canonical_source.len()
    )
}

/// Reports of earlier compiles, by (architecture, source key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompileRecord {
    /// NVRTC's `major.minor` that produced every entry.
    pub nvrtc: String,
    entries: BTreeMap<(String, String), KernelUsage>,
}

impl CompileRecord {
    /// An empty record for NVRTC `nvrtc`.
    pub fn new(nvrtc: &str) -> CompileRecord {
        CompileRecord {
            nvrtc: nvrtc.into(),
            entries: BTreeMap::new(),
        }
    }

    /// The report recorded for `key` on `arch` (`sm_90a`).
    pub fn get(&self, arch: &str, key: &str) -> Option<&KernelUsage> {
        self.entries.get(&(arch.to_string(), key.to_string()))
    }

    /// Records `usage` for `key` on `arch`.
    pub fn insert(&mut self, arch: &str, key: &str, usage: KernelUsage) {
        self.entries
            .insert((arch.to_string(), key.to_string()), usage);
    }

    /// Records the report of every row of a check that has one.
    pub fn add_rows(&mut self, rows: &[super::Row]) {
        for r in rows {
            if let (Some(key), Some(usage)) = (&r.source_key, &r.usage) {
                self.insert(&r.arch, key, usage.clone());
            }
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses the text form (module docs); an error names the line.
    pub fn parse(text: &str) -> Result<CompileRecord, String> {
        let mut record = CompileRecord::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let bad = |what: &str| format!("line {}: {what}: `{raw}`", i + 1);
            match words.as_slice() {
                ["nvrtc", v] if record.nvrtc.is_empty() => record.nvrtc = v.to_string(),
                [arch, key, numbers @ .., entry] if numbers.len() == 5 => {
                    let n: Vec<u32> = numbers
                        .iter()
                        .map(|w| w.parse())
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("five whole numbers expected"))?;
                    record.insert(
                        arch,
                        key,
                        KernelUsage {
                            entry: entry.to_string(),
                            registers: n[0],
                            spill_stores: n[1],
                            spill_loads: n[2],
                            stack_frame: n[3],
                            shared_bytes: n[4],
                        },
                    );
                }
                _ => {
                    return Err(bad(
                        "expected `nvrtc X.Y` first, then `ARCH KEY REGS ST LD STACK SMEM ENTRY`",
                    ))
                }
            }
        }
        if record.nvrtc.is_empty() {
            return Err("no `nvrtc MAJOR.MINOR` line".into());
        }
        Ok(record)
    }

    /// The text form, one line per entry in (architecture, key) order.
    pub fn to_text(&self) -> String {
        let mut s = String::from(
            "# kiln's CUDA compile record: what NVRTC + ptxas reported for each emitted source\n\
             # (written by `scripts/cuda-check --record`; see codegen/src/cuda_check/record.rs).\n\
             # ARCH KEY(fnv1a64-bytes) REGISTERS SPILL_STORES SPILL_LOADS STACK_FRAME SHARED_BYTES ENTRY\n",
        );
        s.push_str(&format!("nvrtc {}\n", self.nvrtc));
        for ((arch, key), u) in &self.entries {
            s.push_str(&format!(
                "{arch} {key} {} {} {} {} {} {}\n",
                u.registers, u.spill_stores, u.spill_loads, u.stack_frame, u.shared_bytes, u.entry
            ));
        }
        s
    }

    /// Reads the record at `path`: `None` when there is no such file.
    pub fn read(path: &Path) -> Result<Option<CompileRecord>, Error> {
        let text = match kiln_runtime::fsio::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        CompileRecord::parse(&text)
            .map(Some)
            .map_err(|found| Error::Param {
                param: path.display().to_string(),
                expected: "a CUDA compile record (`kiln check-cuda --record`)".into(),
                found,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_lines() {
        let mut r = CompileRecord::new("12.9");
        let u = KernelUsage {
            entry: "kiln_x".into(),
            registers: 40,
            spill_stores: 8,
            spill_loads: 4,
            stack_frame: 16,
            shared_bytes: 0,
        };
        r.insert("sm_80", &source_key("a"), u.clone());
        r.insert("sm_90a", &source_key("a"), u.clone());
        let back = CompileRecord::parse(&r.to_text()).expect("parses");
        assert_eq!(back, r);
        assert_eq!(back.get("sm_80", &source_key("a")), Some(&u));
        assert_eq!(back.get("sm_80", &source_key("b")), None);
        // Same hash family, other length: a different key.
        assert_ne!(source_key("a"), source_key("a "));
        let e = CompileRecord::parse("nvrtc 12.9\nsm_80 k 1 2 x 4 5 e\n").unwrap_err();
        assert!(e.starts_with("line 2: five whole numbers"), "{e}");
        assert!(CompileRecord::parse("sm_80 k 1 2 3 4 5 e\n")
            .unwrap_err()
            .contains("nvrtc"));
    }
}
