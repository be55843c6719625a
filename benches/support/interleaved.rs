//! Variants timed in interleaved rounds (each variant in turn, every round), so that a
//! busy machine slows all of them alike: per variant the minimum and the median over
//! `ROUNDS` rounds of the mean time of `STEPS` launches.

use kiln::Client;

/// Rounds of every variant in turn.
pub const ROUNDS: usize = 20;
/// Launches per variant per round (one synchronisation after them).
pub const STEPS: usize = 10;

/// A named closure that launches one variant (without synchronising).
pub type Variant<'a> = (String, Box<dyn Fn() + 'a>);

/// `(minimum, median)` in ms per launch of each variant over `ROUNDS` interleaved rounds.
pub fn interleaved(client: &Client, variants: &[Variant<'_>]) -> Vec<(f64, f64)> {
    // One warm-up launch each (compiles, and tunes where a kernel tunes).
    for (_, f) in variants {
        f();
        client.sync().expect("a device sync");
    }
    let mut all = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in variants.iter().enumerate() {
            let t = std::time::Instant::now();
            for _ in 0..STEPS {
                f();
            }
            client.sync().expect("a device sync");
            all[i].push(t.elapsed().as_secs_f64() * 1e3 / STEPS as f64);
        }
    }
    all.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        })
        .collect()
}
