//! Register budgets on CUDA: configurations that `kiln check-cuda` found to spill, or to
//! need more registers than an SM has for their cube, on an architecture. A crate lists
//! them in a text table it registers with [`register_budget!`](crate::register_budget);
//! a kernel's tuning space (`space`) leaves them out on a CUDA device of that
//! architecture or newer, and notes why ([`take_notes`], shown by `kiln tune`).
//!
//! One entry per line; `#` starts a comment:
//!
//! ```text
//! # kernel        from-arch  configuration : why
//! gla_fused_fwd   sm_80      BV=64         : 255 registers, 3.4 KB spilled per thread
//! matmul_vec4     sm_80      trans_b=true BM=64 BN=64 TM=8 TN=8 : 255 registers, ...
//! ```
//!
//! A configuration is its tunables and `#[comptime]` values as `key=value` words; an
//! entry drops every configuration that has all of its words (not the dtype: a tuning
//! space does not know it, so an entry applies to every dtype).
//!
//! The check fails on a spilling configuration that no entry drops, and on an entry
//! whose configuration no longer spills (see `kiln check-cuda`).

use crate::{CudaArch, DeviceReport};
use std::sync::Mutex;

/// A crate's table of dropped configurations (see the module docs).
pub struct BudgetTable {
    /// The table's text.
    pub text: &'static str,
    /// Where it came from, for messages.
    pub origin: &'static str,
}

inventory::collect!(BudgetTable);

/// Registers a budget table: `kiln_runtime::register_budget!("path/to/table.txt");`
/// (relative to the calling crate's manifest directory).
#[macro_export]
macro_rules! register_budget {
    ($path:literal) => {
        $crate::inventory::submit! {
            $crate::budget::BudgetTable {
                text: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)),
                origin: $path,
            }
        }
    };
}

/// One dropped configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The kernel's registered name.
    pub kernel: String,
    /// The oldest architecture it applies to (it applies to every newer one).
    pub from: CudaArch,
    /// The configuration's label, `BV=64` or `BM=64 BN=64 ...` as `label` writes it.
    pub config: String,
    /// Why (ptxas's numbers).
    pub reason: String,
}

/// Parses a table's text; a malformed line is an error naming it.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            format!(
                "{origin}:{}: expected `kernel sm_XX CONFIG : why`, found `{line}`",
                i + 1
            )
        };
        let (head, reason) = line.split_once(':').ok_or_else(bad)?;
        let mut words = head.split_whitespace();
        let kernel = words.next().ok_or_else(bad)?;
        let from = CudaArch::parse(words.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let config: Vec<&str> = words.collect();
        if config.is_empty() {
            return Err(bad());
        }
        out.push(Entry {
            kernel: kernel.into(),
            from,
            config: config.join(" "),
            reason: reason.trim().into(),
        });
    }
    Ok(out)
}

/// Every registered entry (tables that fail to parse are reported by
/// [`check_tables`] and otherwise ignored).
pub fn entries() -> &'static [Entry] {
    static ALL: std::sync::OnceLock<Vec<Entry>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        inventory::iter::<BudgetTable>
            .into_iter()
            .filter_map(|t| parse(t.text, t.origin).ok())
            .flatten()
            .collect()
    })
}

/// Parses every registered table: the first malformed line, if any.
pub fn check_tables() -> Result<(), String> {
    for t in inventory::iter::<BudgetTable> {
        parse(t.text, t.origin)?;
    }
    Ok(())
}

/// `BV=64`-style label of `(tunable, value)` pairs, as a kernel's `label` writes it.
pub fn config_label(tunables: &[(&str, u32)]) -> String {
    tunables
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether every `key=value` of `entry` is among the words of `description`.
fn matches(entry: &str, description: &str) -> bool {
    entry
        .split_whitespace()
        .all(|w| description.split_whitespace().any(|d| d == w))
}

/// The entry that drops `kernel`'s configuration on `arch`, if any. `description` is
/// the configuration's `#[comptime]` values and tunables as `key=value` words
/// (`trans_b=true BM=64 BN=64 TM=8 TN=8`); an entry matches when all its words are
/// there, so `BV=64` drops that tile whatever the comptime values.
pub fn dropped(kernel: &str, description: &str, arch: CudaArch) -> Option<&'static Entry> {
    entries()
        .iter()
        .filter(|e| e.kernel == kernel && e.from <= arch && matches(&e.config, description))
        .max_by_key(|e| e.from)
}

/// The entry that drops a configuration on `device` (CUDA devices only); `description`
/// as for [`dropped`].
pub fn dropped_on(
    device: &DeviceReport,
    kernel: &str,
    description: &str,
) -> Option<&'static Entry> {
    let (major, minor) = device.compute_capability?;
    dropped(kernel, description, CudaArch { major, minor })
}

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Notes that a tuning space left a configuration out (read by [`take_notes`]).
pub fn note(device: &DeviceReport, kernel: &str, config: &str, entry: &Entry) {
    let line = format!(
        "{kernel} {config}: dropped on {} (from {} up: {})",
        device.name, entry.from, entry.reason
    );
    if let Ok(mut n) = NOTES.lock() {
        if !n.contains(&line) {
            n.push(line);
        }
    }
}

/// The configurations tuning spaces left out since the last call, one line each.
pub fn take_notes() -> Vec<String> {
    NOTES
        .lock()
        .map(|mut n| std::mem::take(&mut *n))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_applies_from_its_architecture_up() {
        let t = "# comment\n\ngla_fused_fwd sm_90a BV=64 : 255 registers # trailing\nk sm_80 BM=64 BN=32 : why\n";
        let e = parse(t, "t.txt").expect("parses");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].config, "BV=64");
        assert_eq!(e[1].config, "BM=64 BN=32");
        assert_eq!(e[0].reason, "255 registers");
        let at = |s: &str| CudaArch::parse(s).expect("arch");
        let applies = |e: &Entry, a: &str| e.from <= at(a);
        assert!(!applies(&e[0], "sm_80") && applies(&e[0], "sm_90a") && applies(&e[0], "sm_100"));
        assert!(applies(&e[1], "sm_86"));
    }

    #[test]
    fn malformed_lines_are_named() {
        let e = parse("k sm_80 : no config\n", "t.txt").expect_err("no config");
        assert!(e.starts_with("t.txt:1:"), "{e}");
        assert!(parse("k sm_zz BV=1 : x", "t.txt").is_err());
        assert!(parse("k sm_80 BV=1", "t.txt").is_err());
    }

    #[test]
    fn entries_match_by_words() {
        assert!(matches("BV=64", "has_init=false BV=64"));
        assert!(matches(
            "trans_b=true BM=64",
            "trans_b=true act=none BM=64 BN=64"
        ));
        assert!(!matches(
            "trans_b=true BM=64",
            "trans_b=false act=none BM=64 BN=64"
        ));
        assert!(!matches("BM=64", "BM=640"));
    }

    #[test]
    fn a_wgpu_device_drops_nothing() {
        let mut d = DeviceReport::cuda_target(CudaArch { major: 9, minor: 0 });
        d.compute_capability = None;
        assert!(dropped_on(&d, "any", "BV=64").is_none());
    }
}
