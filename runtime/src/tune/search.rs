//! The search: running, validating and timing a decision's candidates ([`Autotuner::tune`],
//! [`Autotuner::tune_ranked`]), and the cost-model ranking that decides which run. The
//! module's documentation (in `mod.rs`) describes the rules.

use super::*;

impl Autotuner {
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
        tolerance: impl Into<Tolerance>,
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
        tolerance: impl Into<Tolerance>,
        cost: Option<&dyn Fn(&C) -> f64>,
    ) -> Result<C>
    where
        C: Clone + PartialEq + Serialize + DeserializeOwned,
    {
        let ranking = cost.map(Ranking::new);
        self.tune_warmed(
            client, key, candidates, label, run, tolerance, ranking, None,
        )
    }

    /// [`Autotuner::tune_ranked`] with the decision's own [`Ranking`] (how many
    /// finalists its cost model deserves) and a warm-up: `warm` compiles a candidate by
    /// launching the same kernel on little work (a `#[kiln::kernel]` kernel's `warm_up`:
    /// the grid's first cube alone), returning `false` where it cannot (e.g. a library
    /// GEMM that picks its kernel by shape).
    /// A warmed candidate's first run on the real problem is then no longer compilation
    /// plus a run thrown away but its first timed sample (where it takes at least
    /// [`SAMPLE_FLOOR`]), and candidates clearly slower than the best are cut before
    /// the timing rounds: one run of each fewer. On lavapipe, which compiles a shader at
    /// its first dispatch, this is the only way to tell compilation from the run.
    #[allow(clippy::too_many_arguments)]
    pub fn tune_warmed<C>(
        &self,
        client: &Client,
        key: &TuneKey,
        candidates: &[C],
        label: impl Fn(&C) -> String,
        run: impl Fn(&C) -> Result<Vec<Tensor>>,
        tolerance: impl Into<Tolerance>,
        ranking: Option<Ranking<'_, C>>,
        warm: Option<WarmUp<'_, C>>,
    ) -> Result<C>
    where
        C: Clone + PartialEq + Serialize + DeserializeOwned,
    {
        let tolerance: Tolerance = tolerance.into();
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
        if Self::is_untuned() {
            done(&first, Decision::Check, Spent::default());
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

        // The order candidates run in (with the model's estimates), and how many valid
        // ones end the search.
        let (order, estimates, finalists) = match ranking {
            Some(r) if search == Search::Ranked => {
                let mut ranked = rank(candidates, r.cost);
                let most = r.finalists.unwrap_or(self.finalists);
                let finalists = finalist_count(&ranked, most, r.ties);
                // The declared first, where it is a finalist, runs first: its outputs
                // are then the reference the others are checked against (a finalist the
                // model liked better could otherwise be the reference and have the
                // trusted configuration marked wrong).
                if let Some(at) = ranked[..finalists.min(ranked.len())]
                    .iter()
                    .position(|&(i, _)| i == 0)
                {
                    let trusted = ranked.remove(at);
                    ranked.insert(0, trusted);
                }
                let (order, estimates) = ranked.into_iter().map(|(i, e)| (i, Some(e))).unzip();
                (order, estimates, finalists)
            }
            _ => (
                (0..candidates.len()).collect::<Vec<_>>(),
                vec![None; candidates.len()],
                candidates.len(),
            ),
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
        // them is valid. A timed first run can confirm the model: a finalist over the cut
        // (clearly slower than the best so far) that the model also put over 10 % above
        // the best is a confirmed loser, and finalists estimated no better than it are
        // not run (their compilation is most of a ranked search's time).
        let mut reference: Option<Vec<HostTensor>> = None;
        let mut spent = Spent::default();
        let mut status: Vec<Option<CandidateStatus>> = vec![None; order.len()];
        let mut valid: Vec<(usize, Duration, Option<Duration>)> = Vec::new();
        // Timed first runs so far, (time, estimate): a run over the cut of the best that the
        // model also put over 10 % above the best's estimate confirms the model, in
        // whichever order they ran (the declared first may run before a faster finalist).
        let mut samples: Vec<(Duration, f64)> = Vec::new();
        let mut loser_estimate = f64::INFINITY;
        for (pos, &i) in order.iter().enumerate() {
            let c = &candidates[i];
            if valid.len() >= finalists || estimates[pos].is_some_and(|e| e >= loser_estimate) {
                status[pos] = Some(CandidateStatus::NotTimed { rank: pos + 1 });
                continue;
            }
            spent.run += 1;
            let started = Instant::now();
            let checked = self.first_run(client, c, &run, warm, &mut reference, tolerance);
            let first_run = started.elapsed();
            spent.first_runs += first_run;
            self.emit(TuneEvent::FirstRun { label: label(c) });
            match checked {
                Ok(sample) => {
                    if let (Some(t), Some(e)) = (sample, estimates[pos]) {
                        samples.push((t, e));
                        let (best, best_e) =
                            *samples.iter().min_by_key(|(t, _)| *t).unwrap_or(&(t, e));
                        loser_estimate = samples
                            .iter()
                            .filter(|(t, e)| {
                                t.as_secs_f64() > cut * best.as_secs_f64() && *e > 1.1 * best_e
                            })
                            .map(|&(_, e)| e)
                            .fold(f64::INFINITY, f64::min);
                    }
                    valid.push((pos, first_run, sample))
                }
                Err(failed) => status[pos] = Some(failed),
            }
        }
        // A lone valid candidate that is not the declared first (a ranked search whose
        // model left one finalist) is checked against the declared first, the trusted
        // configuration that runs untuned: otherwise nothing it computed was compared
        // with anything. It runs once, untimed (its status stays `NotTimed`); where the
        // two disagree the trusted one is the decision and the other a `Mismatch`.
        if let [(lone, _, _)] = valid[..] {
            let trusted = order.iter().position(|&i| i == 0);
            if let Some(first) = trusted.filter(|&f| {
                f != lone && matches!(status[f], Some(CandidateStatus::NotTimed { .. }))
            }) {
                spent.run += 1;
                let started = Instant::now();
                // Decisions nested in the check (a path's kernel tiles) are not tuned.
                let checked = Self::untuned(|| {
                    self.first_run(
                        client,
                        &candidates[0],
                        &run,
                        warm,
                        &mut reference,
                        tolerance,
                    )
                });
                let first_run = started.elapsed();
                spent.first_runs += first_run;
                self.emit(TuneEvent::FirstRun {
                    label: label(&candidates[0]),
                });
                match checked {
                    Err(CandidateStatus::Mismatch(why)) => {
                        status[lone] = Some(CandidateStatus::Mismatch(format!(
                            "{why}, checked against the first configuration ({})",
                            label(&candidates[0])
                        )));
                        status[first] = None;
                        valid = vec![(first, first_run, None)];
                    }
                    Err(failed) => status[first] = Some(failed),
                    Ok(_) => {}
                }
            }
        }
        // A lone valid candidate has nothing to be timed against: its first run decides.
        let times = if let [(pos, first_run, sample)] = valid[..] {
            vec![(pos, Ok(vec![sample.unwrap_or(first_run)]))]
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
        // Where nothing ran, the error carries the first failure's reason on one line (a
        // compiler's log spans many; every reason goes to the tuning events whole).
        let first_failure = status.iter().enumerate().find_map(|(pos, s)| match s {
            Some(CandidateStatus::Failed(why) | CandidateStatus::Mismatch(why)) => {
                let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
                Some(format!("{}: {why}", label(&candidates[order[pos]])))
            }
            _ => None,
        });
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
                message: match first_failure {
                    Some(why) => {
                        format!("every candidate configuration failed; the first failure: {why}")
                    }
                    None => "every candidate configuration failed".into(),
                },
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

    /// Runs `c` once (compiling it, or after `warm` compiled it) and checks its outputs
    /// against the reference's (the first candidate's to get here becomes the
    /// reference). `Ok`: valid, with the run as a timing sample where it was warmed and
    /// took at least [`SAMPLE_FLOOR`].
    fn first_run<C>(
        &self,
        client: &Client,
        c: &C,
        run: &impl Fn(&C) -> Result<Vec<Tensor>>,
        warm: Option<WarmUp<'_, C>>,
        reference: &mut Option<Vec<HostTensor>>,
        tolerance: Tolerance,
    ) -> std::result::Result<Option<Duration>, CandidateStatus> {
        let failed = |e: Error| CandidateStatus::Failed(e.to_string());
        // A warm-up that fails only leaves the first run untimed: the real run shows
        // whether the candidate works.
        let warmed = warm.is_some_and(|warm| {
            warm(c)
                .and_then(|w| client.sync().map(|()| w))
                .unwrap_or(false)
        });
        let start = Instant::now();
        let outputs = in_check_run(true, || run(c)).and_then(|o| client.sync().map(|()| o));
        let took = start.elapsed();
        let outputs = outputs
            .and_then(|o| o.iter().map(Tensor::download).collect::<Result<Vec<_>>>())
            .map_err(failed)?;
        match reference {
            None => *reference = Some(outputs),
            Some(r) => {
                if let Some(why) = disagreement(r, &outputs, tolerance) {
                    return Err(CandidateStatus::Mismatch(why));
                }
            }
        }
        Ok((warmed && took >= SAMPLE_FLOOR).then_some(took))
    }

    /// Times the `valid` candidates (positions in `order`, each with the sample its
    /// warmed first run gave, if any) in rounds, one sample of each per round (one run,
    /// or a batch where the last sample was under [`BATCH_BELOW`]), so that the
    /// machine's drift is shared among them. Before each round, a candidate whose
    /// fastest run is over `cut` times the best median so far drops out. Rounds end
    /// when every candidate left has [`Autotuner::samples`], when one is left, or when
    /// the next round would end past the budget ([`TIME_BUDGET`] per valid candidate;
    /// the first round always runs). Each candidate's run times, or why a run failed.
    fn time_rounds<C>(
        &self,
        client: &Client,
        candidates: &[C],
        order: &[usize],
        valid: &[(usize, Duration, Option<Duration>)],
        run: &impl Fn(&C) -> Result<Vec<Tensor>>,
        cut: f64,
    ) -> Vec<(usize, std::result::Result<Vec<Duration>, String>)> {
        let mut times: Vec<(usize, std::result::Result<Vec<Duration>, String>)> = valid
            .iter()
            .map(|&(pos, _, sample)| (pos, Ok(sample.into_iter().collect())))
            .collect();
        let mut alive = vec![true; valid.len()];
        let budget = TIME_BUDGET * valid.len() as u32;
        let started = Instant::now();
        let mut round: Option<Duration> = None;
        let median = |t: &[Duration]| {
            let mut t = t.to_vec();
            t.sort();
            t[t.len() / 2]
        };
        loop {
            let best = times
                .iter()
                .zip(&alive)
                .filter_map(|((_, t), &a)| t.as_ref().ok().filter(|t| a && !t.is_empty()))
                .map(|t| median(t))
                .min();
            if let Some(best) = best {
                for (v, (_, t)) in times.iter().enumerate() {
                    if let Ok(t) = t {
                        let fastest = t.iter().min().copied().unwrap_or_default();
                        if fastest.as_secs_f64() > cut * best.as_secs_f64() {
                            alive[v] = false;
                        }
                    }
                }
            }
            let left = times
                .iter()
                .zip(&alive)
                .filter(|((_, t), &a)| a && t.is_ok())
                .map(|((_, t), _)| t.as_ref().map_or(0, Vec::len));
            let (count, fewest) = left.fold((0, usize::MAX), |(n, f), l| (n + 1, f.min(l)));
            // A round takes about as long as the last; after the first (which always
            // runs), one that would end past the budget is not started.
            let over = round.is_some_and(|r| started.elapsed() + r > budget);
            if count <= 1 || fewest >= self.samples.max(1) || over {
                break;
            }
            let round_start = Instant::now();
            for (v, (pos, result)) in times.iter_mut().enumerate() {
                let Ok(samples) = result else { continue };
                if !alive[v] {
                    continue;
                }
                // A short run is timed as several back to back and one sync, as a
                // model runs them (and `kiln bench` times them): alone, the sync's cost
                // and its jitter are a large part of it.
                let reps = batch(samples.last().copied());
                let c = &candidates[order[*pos]];
                let start = Instant::now();
                let ran = in_check_run(false, || (0..reps).try_for_each(|_| run(c).map(drop)))
                    .and_then(|()| client.sync());
                match ran {
                    Ok(()) => samples.push(start.elapsed() / reps),
                    Err(e) => {
                        *result = Err(e.to_string());
                        alive[v] = false;
                    }
                }
            }
            round = Some(round_start.elapsed());
        }
        times
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
/// sure they lose), plus any within `ties` (relative) of the last one kept (estimates
/// that close are not a ranking). At least one.
fn finalist_count(ranked: &[(usize, f64)], most: usize, ties: f64) -> usize {
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
    ranked
        .iter()
        .filter(|(_, e)| *e <= last * (1.0 + ties))
        .count()
}

/// A decision's cost model and how far a ranked search trusts it ([`Search::Ranked`]).
pub struct Ranking<'a, C> {
    /// A candidate's estimated time, in any unit (lower is better).
    pub cost: &'a dyn Fn(&C) -> f64,
    /// How many of the model's best a ranked search times; `None`: the tuner's
    /// [`Autotuner::finalists`]. A model validated against exhaustive searches of its
    /// decision may ask for fewer (each finalist's compilation is most of a search).
    pub finalists: Option<usize>,
    /// Candidates whose estimate is within this fraction of the last finalist's are
    /// timed too ([`Ranking::DEFAULT_TIES`] unless the model is finer).
    pub ties: f64,
}

impl<'a, C> Ranking<'a, C> {
    /// Estimates within 10 % of each other are not a ranking (unless a model says so).
    pub const DEFAULT_TIES: f64 = 0.10;

    /// `cost` with the tuner's finalist count and [`Ranking::DEFAULT_TIES`].
    pub fn new(cost: &'a dyn Fn(&C) -> f64) -> Self {
        Ranking {
            cost,
            finalists: None,
            ties: Self::DEFAULT_TIES,
        }
    }
}

impl<C> Clone for Ranking<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<C> Copy for Ranking<'_, C> {}

/// The shortest warmed first run that counts as a timing sample: below it, what only a
/// first run pays (allocating the outputs, the first download) is not negligible.
pub const SAMPLE_FLOOR: Duration = Duration::from_millis(10);

/// A timing sample shorter than this is taken again as a batch of calls run back to
/// back before one sync, the batch about this long (at most [`MAX_BATCH`] calls). On the
/// H200 a sync cost about 20 us, and at 128 x 4096 x 4096 f16 (about 0.3 ms a call) the
/// tuner picked a tensor-core tile that `kiln bench`, timing calls back to back, then
/// measured 60 % slower than the cubek pick of an earlier run.
pub const BATCH_BELOW: Duration = Duration::from_millis(1);

/// The most calls in one timing sample (see [`BATCH_BELOW`]).
pub const MAX_BATCH: u32 = 32;

/// How many calls the next sample of a candidate whose last sample took `last` runs.
fn batch(last: Option<Duration>) -> u32 {
    match last {
        Some(t) if t < BATCH_BELOW => {
            let ratio = BATCH_BELOW.as_secs_f64() / t.as_secs_f64().max(1e-7);
            (ratio.ceil() as u32).clamp(1, MAX_BATCH)
        }
        _ => 1,
    }
}

/// A candidate the cost model estimates at more than this many times the best one is
/// not timed.
const CONFIDENT: f64 = 2.0;

/// `None` when every output agrees within `tolerance`, else what differs.
fn disagreement(
    reference: &[HostTensor],
    got: &[HostTensor],
    tolerance: Tolerance,
) -> Option<String> {
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
                    (a - b).abs() / (a.abs() + tolerance.floor * scale + 1e-6)
                }
            })
            .fold(
                0.0f64,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            );
        if worst > tolerance.rel {
            return Some(format!(
                "output {i} differs from the reference config by {worst:.2e} (relative)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_under_a_millisecond_are_batched_to_about_one() {
        let us = Duration::from_micros;
        // No sample yet, or one of a millisecond or more: one call.
        assert_eq!(batch(None), 1);
        assert_eq!(batch(Some(BATCH_BELOW)), 1);
        assert_eq!(batch(Some(us(30_000))), 1);
        // Shorter: as many calls as fill a millisecond (rounded up), at most MAX_BATCH.
        assert_eq!(batch(Some(us(300))), 4);
        assert_eq!(batch(Some(us(999))), 2);
        assert_eq!(batch(Some(us(50))), 20);
        assert_eq!(batch(Some(us(8))), MAX_BATCH);
        assert_eq!(batch(Some(Duration::ZERO)), MAX_BATCH);
    }
}
