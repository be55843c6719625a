//! Per-launch kernel timing, to find where an operator's time goes. With
//! `KILN_PROFILE=1` in the environment, every `#[kiln::kernel]` launch synchronises the
//! device before and after itself and prints one line to stderr:
//! `kiln profile: <kernel> [<config>] <milliseconds> ms`. Off by default: it serialises
//! the queue (about 0.1 ms per launch on lavapipe), so totals exceed unprofiled runs.

use crate::{Client, Result};
use std::sync::OnceLock;
use std::time::Instant;

/// Whether `KILN_PROFILE` is set (to anything but `0`); read once per process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("KILN_PROFILE").is_some_and(|v| v != "0"))
}

/// Before a launch: drains the queue and starts the clock (`None` when profiling is off).
pub fn start(client: &Client) -> Result<Option<Instant>> {
    if !enabled() {
        return Ok(None);
    }
    client.sync()?;
    Ok(Some(Instant::now()))
}

/// After a launch: waits for it and prints its time (nothing when profiling is off).
pub fn finish(
    client: &Client,
    started: Option<Instant>,
    kernel: &str,
    label: impl FnOnce() -> String,
) -> Result<()> {
    if let Some(t0) = started {
        client.sync()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eprintln!("kiln profile: {kernel} [{}] {ms:.3} ms", label());
    }
    Ok(())
}
