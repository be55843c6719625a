//! [`HostComm`]: P ranks in one process, one thread per rank, each with its own
//! [`Client`]; every transfer goes device -> host -> device. A collective is built from
//! point-to-point messages between every pair, each carrying the operation, dtype and
//! shape, so every rank sees every other's view and a disagreement fails everywhere.
//! A rank whose own arguments are wrong still takes part in the collective's round,
//! sending its refusal in place of data, so its peers fail at once (not after the
//! timeout) and every queue stays matched for the next call. Collective messages carry
//! the sender's call number, so that after a timeout no call pairs with another round's
//! data: a late message of a round this rank left is discarded, and a peer already in a
//! later round is an error (the next call pairs again).
//!
//! Point-to-point messages pair in order. A `send` or `send_recv` that fails takes its
//! message back if no one took it yet, so a failed call's data is not delivered later;
//! a `send`'s verdict names the send it answers, so a late verdict never confirms a
//! later send; a `send` message taken by anything but a `recv` is answered with a
//! refusal, so its sender fails at once. A `send_recv` that succeeded does not wait for
//! its receiver: if that peer's own call failed (a timeout on its other side), the
//! message waits for the peer's next receive.

use super::{check_agreement, check_reducible, check_send_rows, rank1, Agree, Communicator};
use crate::{Client, DType, Error, HostTensor, Result, Tensor};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One message between a pair of ranks.
#[derive(Clone)]
struct Msg {
    op: &'static str,
    tag: Tag,
    payload: Payload,
}

/// What a message pairs with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tag {
    /// A collective's round: the sender's count of collective calls before this one
    /// (every rank makes the same collective calls in the same order).
    Round(u64),
    /// A point-to-point message: the sender's count of point-to-point messages to this
    /// receiver before this one (pairs in order; the number names it for a verdict or
    /// a withdrawal).
    P2p(u64),
}

#[derive(Clone)]
enum Payload {
    Tensor(HostTensor),
    /// The receiver's verdict on the `send` numbered `.0`: `Ok`, or why it refused it.
    Ack(u64, std::result::Result<(), String>),
    /// The sender refused its own arguments to a collective (the error, as text).
    Refused(String),
}

/// What a [`HostComm::take`] waits for.
#[derive(Clone, Copy)]
enum Want {
    /// The message of a collective's round.
    Round(u64),
    /// The next point-to-point data message.
    Data,
    /// The verdict on this rank's `send` with this number.
    Ack(u64),
}

#[derive(Default)]
struct State {
    /// Messages in flight, per (from, to), in posting order.
    queues: BTreeMap<(usize, usize), VecDeque<Msg>>,
    /// Ranks that were dropped (their `HostComm` went away).
    gone: Vec<bool>,
}

struct Hub {
    state: Mutex<State>,
    /// One per rank, signalled when a message for it arrives (or a peer drops out):
    /// a post wakes its receiver only, not every waiting rank.
    changed: Vec<Condvar>,
    timeout: Duration,
}

/// One rank of a host-staged communicator (see the module docs). Create all ranks
/// together with [`HostComm::create`]; dropping a rank makes its peers' waits on it
/// fail at once instead of timing out.
pub struct HostComm {
    rank: usize,
    world: usize,
    client: Client,
    hub: Arc<Hub>,
    /// Collective calls this rank has made (the next round's number).
    rounds: AtomicU64,
    /// Point-to-point messages this rank has posted to each peer (the next one's number).
    posted: Vec<AtomicU64>,
}

impl HostComm {
    /// The ranks of one communicator, rank `i` on `clients[i]` (the same device may
    /// appear several times), with waits bounded by 30 s.
    pub fn create(clients: Vec<Client>) -> Vec<HostComm> {
        Self::with_timeout(clients, Duration::from_secs(30))
    }

    /// As [`create`](Self::create), with every blocking wait bounded by `timeout`.
    pub fn with_timeout(clients: Vec<Client>, timeout: Duration) -> Vec<HostComm> {
        let world = clients.len();
        let hub = Arc::new(Hub {
            state: Mutex::new(State {
                queues: BTreeMap::new(),
                gone: vec![false; world],
            }),
            changed: (0..world).map(|_| Condvar::new()).collect(),
            timeout,
        });
        clients
            .into_iter()
            .enumerate()
            .map(|(rank, client)| HostComm {
                rank,
                world,
                client,
                hub: hub.clone(),
                rounds: AtomicU64::new(0),
                posted: (0..world).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect()
    }

    /// Runs `body` on every rank of a new communicator over `clients` (waits bounded
    /// by `timeout`), one scoped thread per rank, and returns each rank's result in rank
    /// order (`Err` with the panic payload where a rank's thread panicked; its peers'
    /// waits on it then fail at once).
    pub fn run<T: Send>(
        clients: Vec<Client>,
        timeout: Duration,
        body: impl Fn(&HostComm) -> T + Sync,
    ) -> Vec<std::thread::Result<T>> {
        let comms = Self::with_timeout(clients, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let body = &body;
                    s.spawn(move || body(&c))
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        })
    }

    fn err(&self, op: &str, peer: usize, message: impl Into<String>) -> Error {
        Error::Comm {
            op: op.into(),
            rank: self.rank,
            peer: Some(peer),
            message: message.into(),
        }
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.world {
            return Err(self.err(
                op,
                peer,
                format!("no such rank (world size {})", self.world),
            ));
        }
        Ok(())
    }

    fn post(&self, to: usize, msg: Msg) {
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        self.post_locked(&mut s, to, msg);
    }

    fn post_locked(&self, s: &mut State, to: usize, msg: Msg) {
        s.queues.entry((self.rank, to)).or_default().push_back(msg);
        self.hub.changed[to].notify_all();
    }

    /// Posts a point-to-point message to `to`; returns its number.
    fn post_p2p(&self, to: usize, op: &'static str, h: HostTensor) -> u64 {
        let n = self.posted[to].fetch_add(1, Ordering::Relaxed);
        let tag = Tag::P2p(n);
        self.post(
            to,
            Msg {
                op,
                tag,
                payload: Payload::Tensor(h),
            },
        );
        n
    }

    /// Takes back this rank's point-to-point message `n` to `to` if no one took it yet;
    /// whether it did.
    fn withdraw(&self, to: usize, n: u64) -> bool {
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        withdraw_locked(&mut s, self.rank, to, n)
    }

    /// Answers a `send` message this rank took without accepting it (`why`), so its
    /// sender fails at once instead of after the timeout. Other messages need no answer.
    fn refuse_locked(&self, s: &mut State, from: usize, m: &Msg, why: &str) {
        if let ("send", Tag::P2p(n), Payload::Tensor(_)) = (m.op, m.tag, &m.payload) {
            let ack = Msg {
                op: "send",
                tag: Tag::P2p(n),
                payload: Payload::Ack(n, Err(why.to_string())),
            };
            self.post_locked(s, from, ack);
        }
    }

    fn refuse(&self, from: usize, m: &Msg, why: &str) {
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refuse_locked(&mut s, from, m, why);
    }

    /// The next message from `from` to this rank that `want` asks for, waiting at most
    /// the timeout. A verdict this rank no longer waits for is discarded wherever it is
    /// found. In a collective's round `r`, a message of an earlier round (one this rank
    /// left on a timeout) is discarded, and one of a later round is left in place for
    /// this rank's next call: `Ok(Err(..))`, this call failing (the peer made a
    /// collective call this rank did not). Waiting for a verdict, a `send` from the same
    /// peer (both sent at once) is taken and refused, this rank's own message taken
    /// back, and the call fails: `Ok(Err(..))`. `Err` where the peer dropped out or
    /// timed out.
    fn take(&self, op: &str, from: usize, want: Want) -> Result<Result<Msg>> {
        // A timeout past what `Instant` can hold waits without a deadline.
        let deadline = Instant::now().checked_add(self.hub.timeout);
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(found) = self.find(&mut s, op, from, want) {
                return Ok(found);
            }
            if s.gone[from] {
                return Err(self.err(op, from, "the peer dropped out"));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(self.err(
                    op,
                    from,
                    format!(
                        "no message within {:?} (the peer did not take part)",
                        self.hub.timeout
                    ),
                ));
            }
            s = self.hub.changed[self.rank]
                .wait_timeout(s, deadline.map_or(Duration::from_secs(3600), |d| d - now))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// [`Self::take`]'s look at the queue from `from` (under the lock): `None` where
    /// nothing there answers `want` yet.
    fn find(&self, s: &mut State, op: &str, from: usize, want: Want) -> Option<Result<Msg>> {
        let queue = s.queues.entry((from, self.rank)).or_default();
        if let Want::Ack(n) = want {
            // Verdicts and data travel in the same queue: look past the peer's data.
            let mut i = 0;
            while i < queue.len() {
                match (&queue[i].payload, queue[i].op) {
                    (Payload::Ack(of, _), _) if *of == n => return queue.remove(i).map(Ok),
                    (Payload::Ack(..), _) => {
                        queue.remove(i);
                    }
                    (Payload::Tensor(_), "send") => {
                        let theirs = queue.remove(i)?;
                        let why = format!(
                            "rank {} and rank {from} sent to each other at once (use send_recv)",
                            self.rank
                        );
                        self.refuse_locked(s, from, &theirs, &why);
                        withdraw_locked(s, self.rank, from, n);
                        return Some(Err(self.err(op, from, why)));
                    }
                    _ => i += 1,
                }
            }
            return None;
        }
        // A verdict at the head answers a send that has ended.
        while matches!(
            queue.front(),
            Some(Msg {
                payload: Payload::Ack(..),
                ..
            })
        ) {
            queue.pop_front();
        }
        let head = queue.front().map(|m| (m.op, m.tag));
        if let (Want::Round(mine), Some((their_op, Tag::Round(theirs)))) = (want, head) {
            if theirs < mine {
                queue.pop_front();
                return self.find(s, op, from, want);
            }
            if theirs > mine {
                return Some(Err(self.err(
                    op,
                    from,
                    format!(
                        "the peer is already in a later collective (`{their_op}`, its call {}; this is this rank's call {}): it made a collective call this rank did not",
                        theirs + 1,
                        mine + 1
                    ),
                )));
            }
        }
        queue.pop_front().map(Ok)
    }

    /// The next point-to-point data message from `from`.
    fn take_data(&self, op: &'static str, from: usize) -> Result<Msg> {
        self.take(op, from, Want::Data)?
    }

    /// The tensor of a message that should be `op`'s (a `send` taken otherwise is
    /// refused, see [`Self::refuse`]).
    fn open(&self, op: &'static str, from: usize, m: Msg) -> Result<HostTensor> {
        match m.payload {
            Payload::Tensor(h) if m.op == op => Ok(h),
            Payload::Refused(why) if m.op == op => {
                Err(self.err(op, from, format!("the peer refused its arguments: {why}")))
            }
            _ => {
                self.refuse(from, &m, &format!("the receiver was in `{op}`"));
                Err(self.err(op, from, format!("the peer is in `{}`", m.op)))
            }
        }
    }

    /// One round of a collective: posts `parts[peer]` to every other rank (or, where
    /// this rank refused its own arguments, the refusal), then takes one message from
    /// every other rank; returns every rank's part in rank order. Every rank posts
    /// before it takes, so no round deadlocks. A refusal, or a peer in another
    /// operation, fails every rank of the round after the whole round, so the queues
    /// stay matched for the next call; a peer that dropped out or timed out ends the
    /// round at once (its late message, and those of the peers not yet taken, are
    /// discarded by round number when they arrive).
    fn round(&self, op: &'static str, parts: Result<Vec<HostTensor>>) -> Result<Vec<HostTensor>> {
        let round = self.rounds.fetch_add(1, Ordering::Relaxed);
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            let payload = match &parts {
                Ok(parts) => Payload::Tensor(parts[peer].clone()),
                Err(e) => Payload::Refused(e.to_string()),
            };
            self.post(
                peer,
                Msg {
                    op,
                    tag: Tag::Round(round),
                    payload,
                },
            );
        }
        let mut got: Vec<Option<HostTensor>> = vec![None; self.world];
        let mut first_error = None;
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            match self.take(op, peer, Want::Round(round)) {
                Ok(Ok(m)) => match self.open(op, peer, m) {
                    Ok(h) => got[peer] = Some(h),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
        let mut parts = parts?;
        if let Some(e) = first_error {
            return Err(e);
        }
        got[self.rank] = Some(parts.swap_remove(self.rank));
        Ok(got.into_iter().flatten().collect())
    }

    /// Every rank's host tensor for a collective (this rank's own included), after
    /// checking that they agree on dtype and on the trailing shape (`all_rows`: the
    /// first dimension too). `mine` is `Err` where this rank's arguments are wrong: it
    /// still takes part (see [`Self::round`]). Every rank sees the same messages, so
    /// all fail together.
    fn exchange(
        &self,
        op: &'static str,
        mine: Result<HostTensor>,
        all_rows: bool,
    ) -> Result<Vec<HostTensor>> {
        let all = self.round(op, mine.map(|h| vec![h; self.world]))?;
        let views: Vec<_> = all.iter().map(|h| (h.dtype, h.shape.as_slice())).collect();
        let agree = if all_rows {
            Agree::Whole
        } else {
            Agree::Trailing
        };
        check_agreement(op, self.rank, &views, agree)?;
        Ok(all)
    }

    fn upload(&self, h: &HostTensor) -> Result<Tensor> {
        Tensor::upload(&self.client, h)
    }
}

impl Drop for HostComm {
    fn drop(&mut self) {
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        s.gone[self.rank] = true;
        for c in &self.hub.changed {
            c.notify_all();
        }
    }
}

/// Takes `from`'s point-to-point message `n` to `to` out of its queue if it is still
/// there (under the lock); whether it was.
fn withdraw_locked(s: &mut State, from: usize, to: usize, n: u64) -> bool {
    let Some(queue) = s.queues.get_mut(&(from, to)) else {
        return false;
    };
    let before = queue.len();
    queue.retain(|m| !(m.tag == Tag::P2p(n) && matches!(m.payload, Payload::Tensor(_))));
    queue.len() < before
}

/// Rows `[start, start + n)` of a row-major host tensor.
fn rows(h: &HostTensor, start: usize, n: usize) -> Result<HostTensor> {
    let row_bytes = h.dtype.size() * h.shape.iter().skip(1).product::<usize>();
    let mut shape = h.shape.clone();
    shape[0] = n;
    HostTensor::from_bytes(
        h.dtype,
        shape,
        h.data[start * row_bytes..(start + n) * row_bytes].to_vec(),
    )
}

/// Host tensors with equal trailing shapes stacked along the first dimension.
fn concat(parts: &[HostTensor], like: &HostTensor) -> Result<HostTensor> {
    let mut shape = like.shape.clone();
    shape[0] = parts.iter().map(|p| p.shape[0]).sum();
    let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
    HostTensor::from_bytes(like.dtype, shape, data)
}

impl Communicator for HostComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn client(&self) -> &Client {
        &self.client
    }

    fn send(&self, t: &Tensor, peer: usize) -> Result<()> {
        self.check_peer("send", peer)?;
        let n = self.post_p2p(peer, "send", t.download()?);
        // Wait for the receiver's verdict, so a mismatch fails here too.
        let m = match self.take("send", peer, Want::Ack(n)) {
            Ok(verdict) => verdict?,
            // Not taken: the message goes back, so no later `recv` gets it. Taken as
            // the wait ended: its verdict is on its way.
            Err(e) if self.withdraw(peer, n) => return Err(e),
            Err(_) => self.take("send", peer, Want::Ack(n))??,
        };
        match m.payload {
            Payload::Ack(_, Ok(())) => Ok(()),
            Payload::Ack(_, Err(why)) => Err(self.err("send", peer, why)),
            _ => Err(self.err("send", peer, format!("the peer is in `{}`", m.op))),
        }
    }

    fn recv(&self, peer: usize, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.check_peer("recv", peer)?;
        let m = self.take_data("recv", peer)?;
        let tag = m.tag;
        // Only a `send`'s message opens as "send", and those are point-to-point.
        let h = self.open("send", peer, m)?;
        let Tag::P2p(n) = tag else {
            return Err(self.err("recv", peer, "the peer is in a collective"));
        };
        let verdict = if h.dtype == dtype && h.shape == shape {
            Ok(())
        } else {
            Err(format!(
                "sent {} {:?}, the receiver expected {dtype} {shape:?}",
                h.dtype, h.shape
            ))
        };
        self.post(
            peer,
            Msg {
                op: "send",
                tag: Tag::P2p(n),
                payload: Payload::Ack(n, verdict.clone()),
            },
        );
        verdict.map_err(|why| self.err("recv", peer, why))?;
        self.upload(&h)
    }

    fn send_recv(&self, t: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        self.check_peer("send_recv", to)?;
        self.check_peer("send_recv", from)?;
        let mine = t.download()?;
        let dtype = mine.dtype;
        let n = self.post_p2p(to, "send_recv", mine);
        let got = self
            .take_data("send_recv", from)
            .and_then(|m| match (&m.payload, m.op) {
                (Payload::Tensor(_), "send_recv") => self.open("send_recv", from, m),
                _ => {
                    // Refused and taken back in one step: a peer woken by the refusal
                    // never finds this call's message still queued.
                    let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
                    withdraw_locked(&mut s, self.rank, to, n);
                    self.refuse_locked(&mut s, from, &m, "the receiver was in `send_recv`");
                    Err(self.err("send_recv", from, format!("the peer is in `{}`", m.op)))
                }
            })
            .and_then(|got| {
                if got.dtype == dtype {
                    Ok(got)
                } else {
                    Err(self.err(
                        "send_recv",
                        from,
                        format!("received {}, sending {dtype}", got.dtype),
                    ))
                }
            });
        if got.is_err() {
            // This call failed: its message goes back if `to` has not taken it yet.
            self.withdraw(to, n);
        }
        self.upload(&got?)
    }

    fn all_to_all(&self, t: &Tensor, send_rows: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let op = "all_to_all";
        let mine = rank1(t, op)
            .and_then(|()| check_send_rows(self.world, t, send_rows))
            .and_then(|()| t.download());
        let parts = mine.and_then(|mine| {
            let mut start = 0;
            send_rows
                .iter()
                .map(|&n| {
                    let part = rows(&mine, start, n);
                    start += n;
                    part
                })
                .collect::<Result<Vec<_>>>()
        });
        let parts = self.round(op, parts)?;
        let views: Vec<_> = parts
            .iter()
            .map(|p| (p.dtype, p.shape.as_slice()))
            .collect();
        check_agreement(op, self.rank, &views, Agree::Trailing)?;
        let counts = parts.iter().map(|p| p.shape[0]).collect();
        Ok((self.upload(&concat(&parts, &parts[self.rank])?)?, counts))
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        let mine = check_reducible(t).and_then(|()| t.download());
        let all = self.exchange("all_reduce", mine, true)?;
        let mine = &all[self.rank];
        let mut sum = vec![0f64; mine.shape.iter().product()];
        for h in &all {
            for (s, v) in sum.iter_mut().zip(h.to_f64()) {
                *s += v;
            }
        }
        self.upload(&HostTensor::from_f64(mine.dtype, mine.shape.clone(), &sum)?)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let mine = rank1(t, "all_gather").and_then(|()| t.download());
        let all = self.exchange("all_gather", mine, false)?;
        self.upload(&concat(&all, &all[self.rank])?)
    }

    fn barrier(&self) -> Result<()> {
        let token = HostTensor::from_bytes(DType::U8, vec![0], vec![])?;
        self.exchange("barrier", Ok(token), true).map(|_| ())
    }
}
