//! The host-staged communicator on lavapipe, P = 1..4 ranks in threads sharing the
//! device: every collective against a host reference, uneven and empty all-to-all
//! splits, a ring of `send_recv` steps, and the error cases (a peer that drops out,
//! ranks that disagree), none of which may hang (bounded waits).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{client, down, up};
use kiln::runtime::comm::{Communicator, HostComm};
use kiln::{DType, Error, HostTensor, Tensor};
use std::time::Duration;

/// Runs `body(rank's communicator)` on every rank in its own thread; the results in
/// rank order.
fn on_ranks<T: Send>(p: usize, timeout: Duration, body: impl Fn(&HostComm) -> T + Sync) -> Vec<T> {
    HostComm::run(vec![client().clone(); p], timeout, body)
        .into_iter()
        .map(|r| r.expect("rank thread"))
        .collect()
}

/// Rank `r`'s example values: distinct per rank and element, exact in f16.
fn values(r: usize, n: usize) -> Vec<f64> {
    (0..n).map(|i| (r * 100 + i) as f64 * 0.25 - 3.0).collect()
}

const T: Duration = Duration::from_secs(20);

#[test]
fn all_reduce_and_all_gather_match_the_host_reference() {
    for p in 1..=4 {
        for dtype in [DType::F32, DType::F16] {
            let shape = [3, 5];
            let got = on_ranks(p, T, |c| {
                let t = up(dtype, &shape, &values(c.rank(), 15));
                let sum = down(&c.all_reduce(&t).unwrap());
                let gathered = c.all_gather(&t).unwrap();
                (sum, gathered.shape().to_vec(), down(&gathered))
            });
            let want_sum: Vec<f64> = (0..15)
                .map(|i| (0..p).map(|r| values(r, 15)[i]).sum())
                .collect();
            let want_gather: Vec<f64> = (0..p).flat_map(|r| values(r, 15)).collect();
            for (r, (sum, gshape, gathered)) in got.iter().enumerate() {
                assert_eq!(sum, &want_sum, "P={p} {dtype} rank {r} all_reduce");
                assert_eq!(gshape, &vec![3 * p, 5]);
                assert_eq!(gathered, &want_gather, "P={p} {dtype} rank {r} all_gather");
            }
        }
    }
}

#[test]
fn all_to_all_with_uneven_and_empty_splits() {
    for p in 1..=4 {
        // Rank r sends (r + j) % 3 rows to rank j: zero-size splits included.
        let split = |r: usize, j: usize| (r + j) % 3;
        let got = on_ranks(p, T, |c| {
            let r = c.rank();
            let counts: Vec<usize> = (0..p).map(|j| split(r, j)).collect();
            let n: usize = counts.iter().sum();
            let t = up(DType::F32, &[n, 2], &values(r, 2 * n));
            let (out, from) = c.all_to_all(&t, &counts).unwrap();
            (down(&out), from)
        });
        for (j, (out, from)) in got.iter().enumerate() {
            let mut want = Vec::new();
            for r in 0..p {
                let before: usize = (0..j).map(|k| split(r, k)).sum();
                want.extend_from_slice(&values(r, 2 * (before + split(r, j)))[2 * before..]);
            }
            assert_eq!(
                from,
                &(0..p).map(|r| split(r, j)).collect::<Vec<_>>(),
                "P={p} rank {j}"
            );
            assert_eq!(out, &want, "P={p} rank {j}");
        }
    }
}

#[test]
fn a_ring_of_send_recv_returns_every_block_to_its_owner() {
    for p in 1..=4 {
        let got = on_ranks(p, T, |c| {
            let (r, w) = (c.rank(), c.world_size());
            let mut block = up(DType::F32, &[4], &values(r, 4));
            for _ in 0..w {
                block = c.send_recv(&block, (r + 1) % w, (r + w - 1) % w).unwrap();
            }
            c.barrier().unwrap();
            down(&block)
        });
        for (r, b) in got.iter().enumerate() {
            assert_eq!(
                b,
                &values(r, 4),
                "P={p}: after P steps rank {r} has its own block"
            );
        }
    }
}

#[test]
fn send_and_recv_match_in_order_and_check_what_arrives() {
    let got = on_ranks(2, T, |c| {
        if c.rank() == 0 {
            c.send(&up(DType::F32, &[2], &[1.0, 2.0]), 1).unwrap();
            c.send(&up(DType::F32, &[1], &[3.0]), 1).unwrap();
            // The receiver expects [2] but gets [3]: an error on both sides.
            c.send(&up(DType::F32, &[3], &[4.0, 5.0, 6.0]), 1)
                .err()
                .map(|e| e.to_string())
        } else {
            let a = down(&c.recv(0, DType::F32, &[2]).unwrap());
            let b = down(&c.recv(0, DType::F32, &[1]).unwrap());
            assert_eq!((a, b), (vec![1.0, 2.0], vec![3.0]));
            c.recv(0, DType::F32, &[2]).err().map(|e| e.to_string())
        }
    });
    for (r, e) in got.iter().enumerate() {
        let e = e.as_ref().unwrap_or_else(|| panic!("rank {r} must fail"));
        assert!(
            e.contains("F32 [3]") || e.contains("f32 [3]"),
            "rank {r}: {e}"
        );
        assert!(
            e.contains(&format!("rank {r}:")) && e.contains("with rank"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn ranks_that_disagree_fail_together_and_name_the_peer() {
    for p in 2..=4 {
        let got = on_ranks(p, T, |c| {
            // The last rank brings one element too many.
            let n = if c.rank() == p - 1 { 5 } else { 4 };
            c.all_reduce(&up(DType::F32, &[n], &values(c.rank(), n)))
                .err()
        });
        for (r, e) in got.into_iter().enumerate() {
            let e = e.unwrap_or_else(|| panic!("P={p}: rank {r} must fail"));
            let Error::Comm { op, rank, .. } = &e else {
                panic!("{e}")
            };
            assert_eq!((op.as_str(), *rank), ("all_reduce", r));
            assert!(e.to_string().contains("ranks disagree"), "{e}");
        }
    }
}

#[test]
fn a_peer_that_drops_out_is_an_error_not_a_hang() {
    let start = std::time::Instant::now();
    let got = on_ranks(3, Duration::from_secs(60), |c| {
        if c.rank() == 2 {
            return None; // leaves without taking part; its HostComm is dropped after
        }
        c.all_gather(&up(DType::F32, &[1], &[c.rank() as f64]))
            .err()
    });
    // The survivors fail because rank 2 dropped out, long before the 60 s timeout.
    for e in got.into_iter().take(2) {
        let e = e.expect("must fail").to_string();
        assert!(
            e.contains("all_gather with rank 2") && e.contains("dropped out"),
            "{e}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    // And a peer that never arrives is a timeout naming it.
    let comms = HostComm::with_timeout(vec![client().clone(); 2], Duration::from_millis(300));
    let e = comms[0].barrier().unwrap_err().to_string();
    assert!(
        e.contains("barrier with rank 1") && e.contains("no message within"),
        "{e}"
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let comms = HostComm::create(vec![client().clone(); 2]);
    let t = up(DType::F32, &[3], &[1.0, 2.0, 3.0]);
    let e = comms[0].send(&t, 7).unwrap_err().to_string();
    assert!(e.contains("no such rank"), "{e}");
}

/// A rank whose own arguments are wrong fails with its typed error, and its peers fail
/// at once naming it (not after the 60 s timeout); the next collective then pairs
/// correctly on every rank (no message of the failed round is left behind).
#[test]
fn a_rank_that_refuses_its_arguments_fails_its_peers_at_once() {
    let start = std::time::Instant::now();
    let ints = || {
        Tensor::upload(
            client(),
            &HostTensor::from_f64(DType::I32, vec![2], &[1.0, 2.0]).unwrap(),
        )
        .unwrap()
    };
    for p in 2..=4 {
        let got = on_ranks(p, Duration::from_secs(60), |c| {
            let r = c.rank();
            let floats = up(DType::F32, &[2], &values(r, 2));
            // Rank 1 passes ints to all_reduce; the others are right.
            let reduce = if r == 1 {
                c.all_reduce(&ints())
            } else {
                c.all_reduce(&floats)
            };
            // Rank 0 gives a split that does not sum to its rows.
            let split = if r == 0 {
                vec![0; p]
            } else {
                vec![0; p - 1].into_iter().chain([2]).collect()
            };
            let to_all = c.all_to_all(&floats, &split);
            let gathered = c.all_gather(&floats).map(|t| down(&t));
            (reduce.err(), to_all.err(), gathered)
        });
        for (r, (reduce, to_all, gathered)) in got.into_iter().enumerate() {
            let reduce = reduce
                .unwrap_or_else(|| panic!("P={p} rank {r}: all_reduce must fail"))
                .to_string();
            if r == 1 {
                assert!(
                    reduce.contains("all_reduce input") && reduce.contains("i32"),
                    "{reduce}"
                );
            } else {
                assert!(
                    reduce.contains("with rank 1")
                        && reduce.contains("refused its arguments")
                        && reduce.contains("i32"),
                    "{reduce}"
                );
            }
            let to_all = to_all
                .unwrap_or_else(|| panic!("P={p} rank {r}: all_to_all must fail"))
                .to_string();
            if r == 0 {
                assert!(
                    to_all.contains("send_rows") && to_all.contains("summing to 2"),
                    "{to_all}"
                );
            } else {
                assert!(
                    to_all.contains("with rank 0") && to_all.contains("send_rows"),
                    "{to_all}"
                );
            }
            let want: Vec<f64> = (0..p).flat_map(|q| values(q, 2)).collect();
            assert_eq!(
                gathered.unwrap_or_else(|e| panic!("P={p} rank {r}: {e}")),
                want
            );
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

/// A rank that timed out waiting for a late peer discards that peer's message of the
/// failed round when it arrives, so the next collective pairs with the right data.
#[test]
fn a_round_left_on_a_timeout_does_not_shift_the_next_one() {
    let got = on_ranks(2, Duration::from_secs(4), |c| {
        let r = c.rank();
        if r == 1 {
            // Rank 0 gives up on the first round at 4 s and waits for the second until 8 s.
            std::thread::sleep(Duration::from_secs(6));
        }
        let first = c.all_gather(&up(DType::F32, &[1], &[(10 + r) as f64]));
        let second = c.all_gather(&up(DType::F32, &[1], &[(20 + r) as f64]));
        (first.err().map(|e| e.to_string()), second.map(|t| down(&t)))
    });
    let (first, second) = &got[0];
    let first = first.as_deref().expect("rank 0 times out");
    assert!(first.contains("no message within"), "{first}");
    assert_eq!(
        second.as_ref().expect("rank 0, second round"),
        &vec![20.0, 21.0]
    );
    // Rank 1 found rank 0's message of the first round waiting, and both of the second.
    assert_eq!(got[1].0, None);
    assert_eq!(
        got[1].1.as_ref().expect("rank 1, second round"),
        &vec![20.0, 21.0]
    );
}

/// Rank 0 is in `all_reduce` while rank 1 calls `recv`, which takes rank 0's message of
/// that round and fails. Rank 1's first `all_reduce` then completes rank 0's first (the
/// same round: both are each rank's first collective call), but rank 1 itself finds rank
/// 0's second round where its first's message was: an error, not a pairing with another
/// round's data. The next calls pair again.
#[test]
fn a_missed_collective_never_pairs_with_another_rounds_data() {
    let got = on_ranks(2, Duration::from_secs(5), |c| {
        let r = c.rank();
        let part = |v: f64| up(DType::F32, &[1], &[v]);
        if r == 0 {
            let first = c.all_reduce(&part(10.0)).map(|t| down(&t));
            let second = c.all_reduce(&part(20.0)).map(|t| down(&t));
            (None, first, second)
        } else {
            let recv = c.recv(0, DType::F32, &[1]).err().map(|e| e.to_string());
            let first = c.all_reduce(&part(101.0)).map(|t| down(&t));
            let second = c.all_reduce(&part(21.0)).map(|t| down(&t));
            (recv, first, second)
        }
    });
    let (_, first, second) = &got[0];
    assert_eq!(first.as_ref().expect("rank 0, call 1"), &vec![111.0]);
    assert_eq!(second.as_ref().expect("rank 0, call 2"), &vec![41.0]);
    let (recv, first, second) = &got[1];
    let recv = recv.as_deref().expect("rank 1's recv fails");
    assert!(recv.contains("the peer is in `all_reduce`"), "{recv}");
    let ahead = first
        .as_ref()
        .expect_err("rank 1's first collective fails")
        .to_string();
    assert!(ahead.contains("later collective"), "{ahead}");
    assert_eq!(second.as_ref().expect("rank 1, call 2"), &vec![41.0]);
}

/// A `send` that timed out takes its message back: the receiver, arriving late, gets the
/// sender's next message, not the one whose sender reported failure (with pairing by
/// order alone it got the old data, and its verdict confirmed the next send).
#[test]
fn a_send_left_on_a_timeout_is_never_received() {
    let got = on_ranks(2, Duration::from_secs(2), |c| {
        if c.rank() == 0 {
            let first = c.send(&up(DType::F32, &[1], &[1.0]), 1).err();
            let second = c.send(&up(DType::F32, &[1], &[2.0]), 1).err();
            (
                first.map(|e| e.to_string()),
                second.map(|e| e.to_string()),
                None,
            )
        } else {
            // Rank 0 gives up on its first send at 2 s; its second waits until 4 s.
            std::thread::sleep(Duration::from_secs(3));
            let got = c.recv(0, DType::F32, &[1]).map(|t| down(&t));
            (None, None, Some(got))
        }
    });
    let first = got[0].0.as_deref().expect("rank 0's first send times out");
    assert!(first.contains("no message within"), "{first}");
    assert_eq!(got[0].1, None, "rank 0's second send is received");
    let received = got[1]
        .2
        .as_ref()
        .unwrap()
        .as_ref()
        .expect("rank 1 receives");
    assert_eq!(received, &vec![2.0]);
}

/// Two ranks that `send` to each other at once both fail at once (each refuses the
/// other's message and takes its own back), and nothing of it is left behind: the next
/// `send`/`recv` pairs with the right data.
#[test]
fn ranks_that_send_to_each_other_fail_at_once_and_pair_again() {
    let start = std::time::Instant::now();
    let got = on_ranks(2, Duration::from_secs(20), |c| {
        let r = c.rank();
        let both = c.send(&up(DType::F32, &[1], &[r as f64]), 1 - r).err();
        let next = if r == 0 {
            c.send(&up(DType::F32, &[2], &[5.0, 6.0]), 1).map(|()| None)
        } else {
            c.recv(0, DType::F32, &[2]).map(|t| Some(down(&t)))
        };
        (both.map(|e| e.to_string()), next.map_err(|e| e.to_string()))
    });
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for (r, (both, _)) in got.iter().enumerate() {
        let e = both
            .as_deref()
            .unwrap_or_else(|| panic!("rank {r}'s send must fail"));
        assert!(e.contains("sent to each other at once"), "rank {r}: {e}");
    }
    assert_eq!(got[0].1, Ok(None));
    assert_eq!(got[1].1, Ok(Some(vec![5.0, 6.0])));
}

/// A `send` whose message a collective took fails at once with the receiver's refusal
/// (not after the timeout). Rank 1's failed `all_reduce` still posted its part, which
/// completes rank 0's first `all_reduce` (each rank's first collective call); both
/// ranks' next call pairs again.
#[test]
fn a_send_taken_by_a_collective_is_refused_at_once() {
    let start = std::time::Instant::now();
    let got = on_ranks(2, Duration::from_secs(20), |c| {
        let part = |v: f64| up(DType::F32, &[1], &[v]);
        let reduce = |v: f64| {
            c.all_reduce(&part(v))
                .map(|t| down(&t))
                .map_err(|e| e.to_string())
        };
        if c.rank() == 0 {
            let sent = c.send(&part(1.0), 1).err().map(|e| e.to_string());
            (sent, reduce(10.0), reduce(30.0))
        } else {
            let first = reduce(1.0);
            (None, first, reduce(20.0))
        }
    });
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let sent = got[0].0.as_deref().expect("rank 0's send fails");
    assert!(sent.contains("the receiver was in `all_reduce`"), "{sent}");
    assert_eq!(got[0].1, Ok(vec![11.0]));
    let reduced = got[1]
        .1
        .as_ref()
        .expect_err("rank 1's first all_reduce fails");
    assert!(reduced.contains("the peer is in `send`"), "{reduced}");
    assert_eq!(got[0].2, Ok(vec![50.0]));
    assert_eq!(got[1].2, Ok(vec![50.0]));
}

#[test]
fn the_library_check_that_comm_check_runs_passes_on_one_to_four_ranks() {
    // `kiln::runtime::comm::check::check_collectives` is what `kiln comm-check` (and
    // the GPU script, over NCCL) runs: it must pass over HostComm on every world size.
    for p in 1..=4 {
        let got = on_ranks(p, T, |c| kiln::runtime::comm::check::check_collectives(c));
        for (r, lines) in got.into_iter().enumerate() {
            let lines = lines.unwrap_or_else(|e| panic!("P={p} rank {r}: {e}"));
            assert!(
                lines.iter().any(|l| l.contains("all_to_all i32")),
                "{lines:?}"
            );
            assert_eq!(lines.last().map(String::as_str), Some("ok  barrier"));
        }
    }
}
