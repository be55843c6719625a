//! The autotuner: validation before timing, failures scored +inf, the persistent
//! cache (hits, corruption, source-hash and mode handling), export/import, and the
//! `kiln tune` command end to end.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::client;
use kiln::kernels::rowwise;
use kiln::runtime::tune::{
    Autotuner, CandidateStatus, Decision, Ranking, Search, Tolerance, TuneEvent, TuneKey, TuneMode,
};
use kiln::{DType, Error, HostTensor, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn key(hash: &str) -> TuneKey {
    TuneKey {
        kernel: "test",
        source_hash: hash.into(),
        shape: "n=256".into(),
    }
}

fn input() -> Tensor {
    let v: Vec<f64> = (0..256 * 256)
        .map(|i| ((i % 97) as f64 - 48.0) * 0.1)
        .collect();
    Tensor::upload(
        client(),
        &HostTensor::from_f64(DType::F32, vec![256, 256], &v).unwrap(),
    )
    .unwrap()
}

/// Candidates: 0 = slow (30 softmax launches and a 100 ms pause: slow by construction,
/// so that other tests sharing the 2 cores cannot make it look fast), 1 = fast (one),
/// 2 = fastest but wrong (scaled output), 3 = fails. The tuner must pick 1.
fn run_candidate(x: &Tensor, c: u32, calls: &AtomicUsize) -> kiln::Result<Vec<Tensor>> {
    calls.fetch_add(1, Ordering::Relaxed);
    match c {
        0 => {
            let mut out = rowwise::softmax(x)?;
            for _ in 0..29 {
                out = rowwise::softmax(x)?;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            Ok(vec![out])
        }
        1 => Ok(vec![rowwise::softmax(x)?]),
        2 => {
            let two = Tensor::upload(client(), &HostTensor::from_f32(vec![1], &[2.0]).unwrap())?;
            Ok(vec![kiln::kernels::elementwise::mul(
                &rowwise::softmax(x)?,
                &two,
            )?])
        }
        _ => Err(Error::Kernel {
            kernel: "test".into(),
            message: "launch failed".into(),
        }),
    }
}

/// Where every candidate fails, the error says why: the first failure's label and reason
/// (a matmul too tall for any grid said only "every candidate configuration failed").
#[test]
fn when_every_candidate_fails_the_error_gives_the_first_reason() {
    let dir = tmpdir("all-fail");
    let tuner = Autotuner::new(&dir, TuneMode::On);
    let x = input();
    let calls = AtomicUsize::new(0);
    let err = tuner
        .tune(
            client(),
            &key("all-fail"),
            &[3u32, 4],
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap_err()
        .to_string();
    for words in [
        "every candidate configuration failed",
        "c3: ",
        "launch failed",
    ] {
        assert!(err.contains(words), "`{words}` not in: {err}");
    }
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn picks_the_fastest_valid_candidate_and_caches_it() {
    let dir = tmpdir("pick");
    let tuner = Autotuner::new(&dir, TuneMode::On);
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = Arc::clone(&events);
    tuner.observe(move |e| e2.lock().unwrap().push(e.clone()));
    let x = input();
    let calls = AtomicUsize::new(0);
    let cands = [0u32, 1, 2, 3];
    let won = tuner
        .tune(
            client(),
            &key("h1"),
            &cands,
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap();
    assert_eq!(won, 1);
    let ev = events.lock().unwrap().clone();
    let status = |label: &str| {
        ev.iter()
            .find_map(|e| match e {
                TuneEvent::Candidate { label: l, status } if l == label => Some(status.clone()),
                _ => None,
            })
            .unwrap()
    };
    use kiln::runtime::tune::CandidateStatus::*;
    assert!(matches!(status("c0"), Timed(_)));
    assert!(matches!(status("c1"), Timed(_)));
    assert!(
        matches!(status("c2"), Mismatch(_)),
        "a wrong result must never win"
    );
    assert!(matches!(status("c3"), Failed(m) if m.contains("launch failed")));

    // Same key again, a new tuner on the same file (a new process): no candidate runs.
    let again = Autotuner::new(&dir, TuneMode::On);
    let calls = AtomicUsize::new(0);
    let won = again
        .tune(
            client(),
            &key("h1"),
            &cands,
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap();
    assert_eq!((won, calls.load(Ordering::Relaxed)), (1, 0));

    // Another source hash is another kernel: tuned anew.
    let won = again
        .tune(
            client(),
            &key("h2"),
            &cands,
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap();
    assert_eq!(won, 1);
    assert!(calls.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_corrupt_cache_is_ignored_and_rewritten() {
    let dir = tmpdir("corrupt");
    let x = input();
    let calls = AtomicUsize::new(0);
    let cands = [1u32, 0];
    let t = Autotuner::new(&dir, TuneMode::On);
    t.tune(
        client(),
        &key("h"),
        &cands,
        |c| format!("c{c}"),
        |&c| run_candidate(&x, c, &calls),
        1e-5,
    )
    .unwrap();
    let path = dir.join("autotune.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let t = Autotuner::new(&dir, TuneMode::On);
    let won = t
        .tune(
            client(),
            &key("h"),
            &cands,
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap();
    assert_eq!(won, 1);
    let rewritten: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(rewritten["entries"].as_object().unwrap().len(), 1);
}

#[test]
fn modes_off_and_cache_only_never_time() {
    let x = input();
    let calls = AtomicUsize::new(0);
    let cands = [0u32, 1];
    for mode in [TuneMode::Off, TuneMode::CacheOnly] {
        let t = Autotuner::new(tmpdir(&format!("{mode:?}")), mode);
        let won = t
            .tune(
                client(),
                &key("h"),
                &cands,
                |c| format!("c{c}"),
                |&c| run_candidate(&x, c, &calls),
                1e-5,
            )
            .unwrap();
        assert_eq!(won, 0, "{mode:?} takes the first candidate");
    }
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    let t = Autotuner::new(tmpdir("empty"), TuneMode::On);
    let none: [u32; 0] = [];
    let r = t.tune(
        client(),
        &key("h"),
        &none,
        |c| format!("c{c}"),
        |&c| run_candidate(&x, c, &calls),
        1e-5,
    );
    assert!(
        matches!(r, Err(Error::Kernel { message, .. }) if message.contains("no configuration"))
    );
}

#[test]
fn export_then_import_moves_winners() {
    let x = input();
    let calls = AtomicUsize::new(0);
    let src = Autotuner::new(tmpdir("src"), TuneMode::On);
    src.tune(
        client(),
        &key("h"),
        &[1u32, 0],
        |c| format!("c{c}"),
        |&c| run_candidate(&x, c, &calls),
        1e-5,
    )
    .unwrap();
    let file = tmpdir("exp").join("tuned.json");
    assert_eq!(src.export(client(), &file).unwrap(), 1);
    let dst = Autotuner::new(tmpdir("dst"), TuneMode::CacheOnly);
    let imported = dst.import(&file).unwrap();
    assert_eq!((imported.entries, imported.other_version), (1, 0));
    assert_eq!(imported.devices.len(), 1);
    assert!(
        imported.devices[0].starts_with(client().name()),
        "{imported:?}"
    );
    // The imported winner (1) beats the first candidate (0) in cache-only mode.
    let won = dst
        .tune(
            client(),
            &key("h"),
            &[0u32, 1],
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
        )
        .unwrap();
    assert_eq!(won, 1);
}

/// Tunes `cands` with a cost model (`cost[c]`), returning the winner, each candidate's
/// status by label, and the `Start` event's finalist count (`None`: nothing ran).
fn tune_ranked(
    t: &Autotuner,
    hash: &str,
    cands: &[u32],
    cost: &[f64],
) -> (u32, Vec<(String, CandidateStatus)>, Option<usize>) {
    tune_trusting(t, hash, cands, cost, None, Ranking::<u32>::DEFAULT_TIES)
}

/// [`tune_ranked`] with the decision's own finalist count and ties ([`Ranking`]).
fn tune_trusting(
    t: &Autotuner,
    hash: &str,
    cands: &[u32],
    cost: &[f64],
    finalists: Option<usize>,
    ties: f64,
) -> (u32, Vec<(String, CandidateStatus)>, Option<usize>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = Arc::clone(&events);
    t.observe(move |e| e2.lock().unwrap().push(e.clone()));
    let x = input();
    let calls = AtomicUsize::new(0);
    let model = |c: &u32| cost[*c as usize];
    let won = t
        .tune_warmed(
            client(),
            &key(hash),
            cands,
            |c| format!("c{c}"),
            |&c| run_candidate(&x, c, &calls),
            1e-5,
            Some(Ranking {
                cost: &model,
                finalists,
                ties,
            }),
            None,
        )
        .unwrap();
    let ev = events.lock().unwrap().clone();
    let statuses = ev
        .iter()
        .filter_map(|e| match e {
            TuneEvent::Candidate { label, status } => Some((label.clone(), status.clone())),
            _ => None,
        })
        .collect();
    let finalists = ev.iter().find_map(|e| match e {
        TuneEvent::Start { finalists, .. } => Some(*finalists),
        _ => None,
    });
    (won, statuses, finalists)
}

#[test]
fn a_ranked_search_times_only_the_cost_models_finalists() {
    use CandidateStatus::*;
    let mut t = Autotuner::new(tmpdir("ranked"), TuneMode::On);
    t.finalists = 1;
    // The model ranks c1 first: only c1 is timed, the rest are reported with their rank
    // (c0, the declared first, runs once untimed to check the lone finalist).
    let (won, st, finalists) = tune_ranked(&t, "r1", &[0, 1, 2, 3], &[3.0, 1.0, 2.0, 4.0]);
    assert_eq!((won, finalists), (1, Some(1)));
    assert_eq!(st[0].0, "c1");
    assert!(matches!(st[0].1, Timed(_)));
    let not_timed: Vec<(&str, usize)> = st[1..]
        .iter()
        .map(|(l, s)| match s {
            NotTimed { rank } => (l.as_str(), *rank),
            other => panic!("{l} should not run: {other:?}"),
        })
        .collect();
    assert_eq!(not_timed, [("c2", 2), ("c0", 3), ("c3", 4)]);

    // The best-ranked fails: the search goes on down the ranking until one is valid,
    // never erring where an exhaustive search would not.
    let (won, st, _) = tune_ranked(&t, "r2", &[0, 1, 2, 3], &[3.0, 2.0, 4.0, 1.0]);
    assert_eq!(won, 1);
    assert!(matches!(st[0], (ref l, Failed(_)) if l == "c3"));
    assert!(matches!(st[1], (ref l, Timed(_)) if l == "c1"));
    assert!(st[2..].iter().all(|(_, s)| matches!(s, NotTimed { .. })));

    // Estimates within 10 % of the last finalist's are not a ranking: both run.
    let (_, st, finalists) = tune_ranked(&t, "r3", &[0, 1, 2, 3], &[1.05, 1.0, 2.0, 3.0]);
    assert_eq!(finalists, Some(2));
    assert!(matches!(st[0].1, Timed(_)) && matches!(st[1].1, Timed(_)));
    assert!(matches!(st[2].1, NotTimed { rank: 3 }));

    // Over twice the best estimate, the model is sure: even with room for four
    // finalists, only the best runs.
    t.finalists = 4;
    let (won, st, finalists) = tune_ranked(&t, "r4", &[0, 1, 2, 3], &[2.5, 1.0, 3.0, 4.0]);
    assert_eq!((won, finalists), (1, Some(1)));
    assert_eq!(st.iter().filter(|(_, s)| matches!(s, Timed(_))).count(), 1);

    // A lone finalist is checked against the declared first configuration: c2, ranked
    // first by the model, computes twice the softmax, and c0 is the decision.
    t.finalists = 1;
    let (won, st, _) = tune_ranked(&t, "r8", &[0, 1, 2, 3], &[3.0, 4.0, 1.0, 5.0]);
    assert_eq!(won, 0, "{st:?}");
    let status = |l: &str| st.iter().find(|(x, _)| x == l).unwrap().1.clone();
    assert!(
        matches!(status("c2"), Mismatch(ref why) if why.contains("first configuration (c0)")),
        "{st:?}"
    );
    assert!(matches!(status("c0"), Timed(_)), "{st:?}");
    // With two finalists, c2 first in the model's order and c0 second: c0 runs first
    // and is the reference, so c2 is the mismatch, not the trusted configuration.
    t.finalists = 2;
    let (won, st, _) = tune_ranked(&t, "r9", &[0, 1, 2, 3], &[1.5, 4.0, 1.0, 5.0]);
    assert_ne!(won, 2, "{st:?}");
    let status = |l: &str| st.iter().find(|(x, _)| x == l).unwrap().1.clone();
    assert!(matches!(status("c2"), Mismatch(_)), "{st:?}");
    assert!(matches!(status("c0"), Timed(_)), "{st:?}");
    t.finalists = 4;

    // A decision's own ranking overrides the tuner's count and the 10 % ties: two
    // finalists, the third (4 % above the second) timed only with ties of 5 %.
    let costs = [1.0, 1.5, 1.56, 1.7];
    let (_, _, finalists) = tune_trusting(&t, "r5", &[0, 1, 2, 3], &costs, Some(2), 0.05);
    assert_eq!(finalists, Some(3));
    let (_, st, finalists) = tune_trusting(&t, "r6", &[0, 1, 2, 3], &costs, Some(2), 0.03);
    assert_eq!(finalists, Some(2));
    assert!(matches!(st[2].1, NotTimed { rank: 3 }), "{st:?}");
    // The tuner's default (4, 10 %) would time all four.
    let (_, _, finalists) = tune_ranked(&t, "r7", &[0, 1, 2, 3], &costs);
    assert_eq!(finalists, Some(4));
}

/// The declared first configuration's run that checks a lone finalist is a check, not a
/// candidate: a decision nested in it (a quantized GEMM path's kernel tiles) takes its
/// first candidate without running or caching anything ([`Decision::Check`]); the same
/// nested decision reached by a finalist's run is tuned.
#[test]
fn decisions_nested_in_the_check_of_a_lone_finalist_are_not_tuned() {
    let t = Autotuner::new(tmpdir("nested"), TuneMode::On);
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = Arc::clone(&events);
    t.observe(move |e| e2.lock().unwrap().push(e.clone()));
    let x = input();
    let inner_runs = AtomicUsize::new(0);
    let calls = AtomicUsize::new(0);
    // The inner decision: c0 slow, c1 fast (tuning picks c1).
    let inner = |outer: u32| {
        let inner_key = TuneKey {
            kernel: "inner",
            source_hash: format!("inner-of-{outer}"),
            shape: "n=256".into(),
        };
        t.tune(
            client(),
            &inner_key,
            &[0u32, 1],
            |c| format!("i{c}"),
            |&c| {
                inner_runs.fetch_add(1, Ordering::Relaxed);
                run_candidate(&x, c, &calls)
            },
            1e-5,
        )
    };
    let model = |c: &u32| [5.0, 1.0][*c as usize];
    // c1 alone is a finalist (c0 estimated at 5x): c1 runs (its inner decision is
    // tuned), then c0 runs once to check it (its inner decision is not).
    let won = t
        .tune_ranked(
            client(),
            &key("nested"),
            &[0u32, 1],
            |c| format!("c{c}"),
            |&c| {
                let picked = inner(c)?;
                run_candidate(&x, picked, &calls)
            },
            1e-5,
            Some(&model),
        )
        .unwrap();
    assert_eq!(won, 1);
    let done: Vec<(String, Decision)> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            TuneEvent::Done {
                kernel,
                winner,
                how,
                ..
            } if kernel == "inner" => Some((winner.clone(), *how)),
            _ => None,
        })
        .collect();
    assert_eq!(
        done,
        [
            ("i1".to_string(), Decision::Tuned),
            ("i0".to_string(), Decision::Check)
        ],
        "the finalist's inner decision tuned, the check's untuned"
    );
    // Only the tuned inner decision ran candidates (each once at least).
    let tuned_runs = inner_runs.load(Ordering::Relaxed);
    assert!((2..=12).contains(&tuned_runs), "{tuned_runs}");
    // Outside the check, the same thread tunes again (the flag does not leak).
    let again = inner(7).unwrap();
    assert_eq!(again, 1);
    assert!(inner_runs.load(Ordering::Relaxed) > tuned_runs);
}

#[test]
fn an_exhaustive_search_times_everything_and_retunes_ranked_decisions() {
    use CandidateStatus::*;
    let dir = tmpdir("exhaustive");
    let mut t = Autotuner::new(&dir, TuneMode::On);
    t.finalists = 1;
    let costs = [3.0, 1.0, 2.0, 4.0];
    let (_, st, _) = tune_ranked(&t, "e", &[0, 1, 2, 3], &costs);
    assert_eq!(st.iter().filter(|(_, s)| matches!(s, Timed(_))).count(), 1);
    // Ranked again: the cached decision stands (no candidate runs).
    let (won, st, finalists) = tune_ranked(&t, "e", &[0, 1, 2, 3], &costs);
    assert_eq!((won, st.len(), finalists), (1, 0, None));
    // Exhaustive: the ranked decision is not trusted; every candidate runs.
    t.set_search(Search::Exhaustive);
    let (won, st, finalists) = tune_ranked(&t, "e", &[0, 1, 2, 3], &costs);
    assert_eq!((won, finalists), (1, Some(4)));
    assert_eq!(
        st.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["c0", "c1", "c2", "c3"],
        "declaration order, the model ignored"
    );
    assert!(matches!(st[2].1, Mismatch(_)) && matches!(st[3].1, Failed(_)));
    // ...and its decision is trusted by a later exhaustive search.
    let (won, st, finalists) = tune_ranked(&t, "e", &[0, 1, 2, 3], &costs);
    assert_eq!((won, st.len(), finalists), (1, 0, None), "cached: {st:?}");
}

#[test]
fn a_choice_reports_its_cost_models_ranking() {
    use kiln::runtime::Choice;
    let choice = Choice::new("ranking")
        .candidates([0u32, 1, 2, 3])
        .cost(|c: &u32| [3.0, 1.0, f64::NAN, 1.0][*c as usize]);
    // Best first; ties keep the declaration order; NaN counts as +inf.
    let order: Vec<u32> = choice.ranking().into_iter().map(|(c, _)| c).collect();
    assert_eq!(order, [1, 3, 0, 2]);
    let plain = Choice::new("plain").candidates([5u32, 4]);
    assert_eq!(plain.ranking(), [(5, None), (4, None)]);
}

/// With a warm-up ([`Autotuner::tune_warmed`]), a candidate's first run on the real
/// problem is its first timed sample: a clear loser (c0, 6x c1) drops out before any
/// timing round and runs once. The warm-up runs once per candidate, before its first
/// run. Without a warm-up, or with one that fails or declines, the first run is not
/// timed and the loser runs again in the first round. (Pauses stand for long kernels,
/// above `SAMPLE_FLOOR`.)
#[test]
#[allow(clippy::type_complexity)]
fn a_warmed_first_run_is_timed_and_clear_losers_skip_the_rounds() {
    let x = input();
    let log = Mutex::new(Vec::<String>::new());
    let run = |&c: &u32| {
        log.lock().unwrap().push(format!("r{c}"));
        std::thread::sleep(std::time::Duration::from_millis(if c == 0 {
            120
        } else {
            20
        }));
        Ok(vec![rowwise::softmax(&x)?])
    };
    let tune = |name: &str, warm: Option<&dyn Fn(&u32) -> kiln::Result<bool>>| {
        log.lock().unwrap().clear();
        let t = Autotuner::new(tmpdir(name), TuneMode::On);
        let won = t
            .tune_warmed(
                client(),
                &key("w"),
                &[0u32, 1],
                |c| format!("c{c}"),
                run,
                1e-5,
                None,
                warm,
            )
            .unwrap();
        assert_eq!(won, 1);
        log.lock().unwrap().clone()
    };
    let warm = |&c: &u32| {
        log.lock().unwrap().push(format!("w{c}"));
        Ok(true)
    };
    assert_eq!(tune("warmed", Some(&warm)), ["w0", "r0", "w1", "r1"]);
    assert_eq!(tune("cold", None), ["r0", "r1", "r0", "r1"]);
    let declines = |_: &u32| Ok(false);
    assert_eq!(tune("declined", Some(&declines)), ["r0", "r1", "r0", "r1"]);
    let fails = |_: &u32| -> kiln::Result<bool> {
        Err(Error::Kernel {
            kernel: "test".into(),
            message: "warm-up failed".into(),
        })
    };
    assert_eq!(tune("failed", Some(&fails)), ["r0", "r1", "r0", "r1"]);

    // Ranked: c1 (fast) ranked first, c0 (6x slower) second, c2 (as fast as c1) third;
    // c0, the declared first and a finalist, runs first (it is the reference). c0 over
    // the cut of c1 with an estimate 50 % above c1's confirms the model, so c2,
    // estimated no better than c0, is not run. With c0's estimate within 10 % of c1's,
    // the model did not tell them apart: c2 runs.
    let ranked = |name: &str, cost: [f64; 3]| {
        log.lock().unwrap().clear();
        let events = Arc::new(Mutex::new(Vec::new()));
        let e2 = Arc::clone(&events);
        let t = Autotuner::new(tmpdir(name), TuneMode::On);
        t.observe(move |e| e2.lock().unwrap().push(e.clone()));
        let model = |c: &u32| cost[*c as usize];
        t.tune_warmed(
            client(),
            &key("w"),
            &[0u32, 1, 2],
            |c| format!("c{c}"),
            run,
            1e-5,
            Some(Ranking::new(&model)),
            Some(&warm),
        )
        .unwrap();
        let not_run = events.lock().unwrap().iter().any(|e| {
            matches!(e, TuneEvent::Candidate { label, status: CandidateStatus::NotTimed { rank: 3 } } if label == "c2")
        });
        (log.lock().unwrap().clone(), not_run)
    };
    let (runs, not_run) = ranked("confirmed", [1.5, 1.0, 1.6]);
    assert_eq!(
        (runs, not_run),
        (
            vec!["w0".to_string(), "r0".into(), "w1".into(), "r1".into()],
            true
        )
    );
    let (runs, not_run) = ranked("unconfirmed", [1.05, 1.0, 1.6]);
    assert!(runs.contains(&"r2".to_string()) && !not_run, "{runs:?}");
}

#[test]
fn a_tolerance_floored_at_the_output_scale_rejects_zeros() {
    // c0 the softmax, c1 all zeros. A relative bound over 1 (the MoE path's half bound
    // until 2026-12-05) lets zeros through; one on the output's scale does not.
    let x = input();
    let run = |&c: &u32| -> kiln::Result<Vec<Tensor>> {
        let y = rowwise::softmax(&x)?;
        Ok(vec![match c {
            0 => y,
            _ => Tensor::zeros(client(), DType::F32, y.shape())?,
        }])
    };
    let decide = |name: &str, tolerance: Tolerance| {
        let t = Autotuner::new(tmpdir(name), TuneMode::On);
        let events = Arc::new(Mutex::new(Vec::new()));
        let e2 = Arc::clone(&events);
        t.observe(move |e| e2.lock().unwrap().push(e.clone()));
        t.tune(
            client(),
            &key("z"),
            &[0u32, 1],
            |c| format!("c{c}"),
            run,
            tolerance,
        )
        .unwrap();
        let ev = events.lock().unwrap().clone();
        ev.iter().any(|e| {
            matches!(e, TuneEvent::Candidate { label, status: CandidateStatus::Mismatch(_) } if label == "c1")
        })
    };
    assert!(
        !decide("loose", 2.0.into()),
        "a relative bound of 2 rejected zeros"
    );
    assert!(decide(
        "scaled",
        Tolerance {
            rel: 0.01,
            floor: 1.0
        }
    ));
}

/// In a candidate's check run (its one compared run), and only there, `Tensor::empty`
/// gives poison: a candidate that writes nothing into the output it allocates fails the
/// check, whatever buffer the memory pool hands it (the one the candidate before it
/// wrote and freed would hold the right answer).
#[test]
fn outputs_allocated_in_a_check_run_are_poison() {
    use kiln::runtime::tune::is_check_run;
    let x = input();
    let flags = Mutex::new(vec![Vec::new(); 3]);
    let run = |&c: &u32| -> kiln::Result<Vec<Tensor>> {
        flags.lock().unwrap()[c as usize].push(is_check_run());
        let y = rowwise::softmax(&x)?;
        if c < 2 {
            return Ok(vec![y]);
        }
        let shape = y.shape().to_vec();
        drop(y);
        let out = Tensor::empty(client(), DType::F32, &shape)?;
        assert!(out.download()?.to_f64().iter().all(|v| v.is_nan()));
        Ok(vec![out])
    };
    let t = Autotuner::new(tmpdir("poison"), TuneMode::On);
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = Arc::clone(&events);
    t.observe(move |e| e2.lock().unwrap().push(e.clone()));
    t.tune(
        client(),
        &key("poison"),
        &[0u32, 1, 2],
        |c| format!("c{c}"),
        run,
        1e-5,
    )
    .unwrap();
    let ev = events.lock().unwrap().clone();
    assert!(
        ev.iter().any(|e| matches!(e, TuneEvent::Candidate { label, status: CandidateStatus::Mismatch(_) } if label == "c2")),
        "{ev:?}"
    );
    // Each candidate's first run is its check; the timed runs after it are not.
    for (c, f) in flags.lock().unwrap().iter().enumerate() {
        assert_eq!(f.first(), Some(&true), "c{c}: {f:?}");
        assert!(f[1..].iter().all(|&on| !on), "c{c}: {f:?}");
    }
    assert!(!is_check_run());
}

/// `Tensor::poisoned` is NaN in every float dtype the device has, and an unlikely
/// integer in the others.
#[test]
fn poison_is_nan_in_every_float_dtype() {
    for dtype in DType::ALL {
        let Ok(t) = Tensor::poisoned(client(), dtype, &[3, 5]) else {
            assert!(!client().supports(dtype), "{dtype}");
            continue;
        };
        let v = t.download().unwrap().to_f64();
        assert_eq!(v.len(), 15);
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => {
                assert!(v.iter().all(|x| x.is_nan()), "{dtype}")
            }
            DType::I32 | DType::U32 => assert!(v.iter().all(|&x| x == 2_147_146_669.0), "{dtype}"),
            DType::I8 => assert!(v.iter().all(|&x| x == -83.0), "{dtype}"),
            DType::U8 => assert!(v.iter().all(|&x| x == 173.0), "{dtype}"),
        }
    }
}

/// `--import` keeps only entries kiln can use: a kernel's configuration must be one it
/// declares, and a timing a time; the rest are skipped, each with why.
#[test]
fn import_skips_configurations_a_kernel_does_not_declare() {
    let key = |cfg: &str| format!("dev|Vulkan|drv|attention_merge|0123|kiln-0.1.0|{cfg}");
    let entry = |config: &str, median: f64| {
        format!(
            r#"{{"config": {config}, "label": "x", "median_us": {median}, "exhaustive": true}}"#
        )
    };
    let text = format!(
        r#"{{"version": 1, "entries": {{"{}": {}, "{}": {}, "{}": {}, "{}": {}}}}}"#,
        key("a"),
        entry(r#"{"UNITS": 64}"#, 1.0),
        key("b"),
        entry(r#"{"UNITS": 7}"#, 1.0),
        key("c"),
        entry(r#"{"UNITS": 64}"#, -1.0),
        // Another decision than a kernel's configuration: checked at use, kept.
        "dev|Vulkan|drv|matmul|0123|kiln-0.1.0|d",
        entry(r#"{"Direct": {"BM": 4}}"#, 1.0),
    );
    let file = tmpdir("imp").join("tuned.json");
    std::fs::write(&file, text).unwrap();
    let dst = Autotuner::new(tmpdir("imp-dst"), TuneMode::CacheOnly);
    let imported = dst.import(&file).unwrap();
    assert_eq!(imported.entries, 2, "{imported:?}");
    assert_eq!(imported.skipped.len(), 2, "{imported:?}");
    assert!(
        imported
            .skipped
            .iter()
            .any(|s| s.contains("UNITS: 64") && s.contains("attention_merge")),
        "{imported:?}"
    );
    assert!(
        imported.skipped.iter().any(|s| s.contains("not a time")),
        "{imported:?}"
    );
}
