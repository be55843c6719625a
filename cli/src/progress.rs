//! First-use tuning made visible: when an operator tunes a key it has no cached
//! decision for, one line on stderr says so (what, for which shape bucket, how many
//! candidates, where the winner is kept, how to pre-tune or skip), with a progress bar
//! while it runs when stderr is a terminal. Library users get the same events through
//! `Autotuner::observe`; the library itself never prints them.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln::runtime::tune::{Autotuner, TuneEvent};
use std::io::IsTerminal;

/// A bar over the candidates one tuning decision runs, drawn on stderr (hidden when
/// stderr is not a terminal).
pub fn candidate_bar(len: usize, message: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} candidates")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    bar
}

/// Reports first-use tuning of `op`'s kernels on stderr from now on.
pub fn announce_tuning(op: &str) {
    let tuner = Autotuner::global();
    let cache = tuner.path().display().to_string();
    let op = op.to_string();
    let bar = std::sync::Mutex::new(None::<ProgressBar>);
    tuner.observe(move |e| {
        let Ok(mut bar) = bar.lock() else { return };
        match e {
            TuneEvent::Start {
                kernel,
                shape,
                candidates,
                finalists,
            } => {
                let timed = if finalists < candidates {
                    format!("{finalists} of {candidates} candidates, ranked by its cost model")
                } else {
                    format!("{candidates} candidates")
                };
                eprintln!(
                    "kiln: `{op}` is tuning `{kernel}` on first use for {shape} ({timed}); \
                     the winner is cached in {cache}. Pre-tune with `kiln tune {op} --shape ...` \
                     or skip tuning with KILN_AUTOTUNE=off"
                );
                if std::io::stderr().is_terminal() {
                    *bar = Some(candidate_bar(*finalists, format!("  {kernel}")));
                }
            }
            TuneEvent::FirstRun { .. } => {
                if let Some(b) = bar.as_ref() {
                    b.inc(1);
                }
            }
            TuneEvent::Candidate { .. } => {}
            TuneEvent::Done { .. } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    });
}
