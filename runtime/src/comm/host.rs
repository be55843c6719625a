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
    /// A collective's round: the sender's count of collective calls before this one
    /// (every rank makes the same collective calls in the same order); `None` for a
    /// point-to-point message, which pairs by order alone.
    round: Option<u64>,
    payload: Payload,
}

#[derive(Clone)]
enum Payload {
    Tensor(HostTensor),
    /// The receiver took a `send`: `Ok` or why it refused it.
    Ack(std::result::Result<(), String>),
    /// The sender refused its own arguments to a collective (the error, as text).
    Refused(String),
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
    changed: Condvar,
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
            changed: Condvar::new(),
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
        s.queues.entry((self.rank, to)).or_default().push_back(msg);
        self.hub.changed.notify_all();
    }

    /// The next message from `from` to this rank, waiting at most the timeout. In a
    /// collective's round `round`, a message of an earlier round (one this rank left on
    /// a timeout) is discarded, and one of a later round is left in place for this
    /// rank's next call: `Ok(Err(..))`, this call failing (the peer made a collective
    /// call this rank did not). `Err` where the peer dropped out or timed out.
    fn take(&self, op: &str, from: usize, round: Option<u64>) -> Result<Result<Msg>> {
        // A timeout past what `Instant` can hold waits without a deadline.
        let deadline = Instant::now().checked_add(self.hub.timeout);
        let mut s = self.hub.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(queue) = s.queues.get_mut(&(from, self.rank)) {
                let head = queue.front().map(|m| (m.op, m.round));
                match (round, head) {
                    (Some(mine), Some((_, Some(theirs)))) if theirs < mine => {
                        queue.pop_front();
                        continue;
                    }
                    (Some(mine), Some((their_op, Some(theirs)))) if theirs > mine => {
                        return Ok(Err(self.err(
                            op,
                            from,
                            format!(
                                "the peer is already in a later collective (`{their_op}`, its call {}; this is this rank's call {}): it made a collective call this rank did not",
                                theirs + 1,
                                mine + 1
                            ),
                        )));
                    }
                    _ => {}
                }
                if let Some(m) = queue.pop_front() {
                    return Ok(Ok(m));
                }
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
            s = self
                .hub
                .changed
                .wait_timeout(s, deadline.map_or(Duration::from_secs(3600), |d| d - now))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The next point-to-point message from `from`.
    fn take_p2p(&self, op: &'static str, from: usize) -> Result<Msg> {
        self.take(op, from, None)?
    }

    fn take_tensor(&self, op: &'static str, from: usize) -> Result<HostTensor> {
        let m = self.take_p2p(op, from)?;
        self.open(op, from, m)
    }

    /// The tensor of a message that should be `op`'s.
    fn open(&self, op: &'static str, from: usize, m: Msg) -> Result<HostTensor> {
        match m.payload {
            Payload::Tensor(h) if m.op == op => Ok(h),
            Payload::Refused(why) if m.op == op => {
                Err(self.err(op, from, format!("the peer refused its arguments: {why}")))
            }
            _ => Err(self.err(op, from, format!("the peer is in `{}`", m.op))),
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
                    round: Some(round),
                    payload,
                },
            );
        }
        let mut got: Vec<Option<HostTensor>> = vec![None; self.world];
        let mut first_error = None;
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            match self.take(op, peer, Some(round)) {
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
        self.hub.changed.notify_all();
    }
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
        self.post(
            peer,
            Msg {
                op: "send",
                round: None,
                payload: Payload::Tensor(t.download()?),
            },
        );
        // Wait for the receiver's verdict, so a mismatch fails here too.
        let m = self.take_p2p("send", peer)?;
        match m.payload {
            Payload::Ack(Ok(())) => Ok(()),
            Payload::Ack(Err(why)) => Err(self.err("send", peer, why)),
            _ => Err(self.err("send", peer, format!("the peer is in `{}`", m.op))),
        }
    }

    fn recv(&self, peer: usize, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.check_peer("recv", peer)?;
        let h = self.take_tensor("send", peer)?;
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
                round: None,
                payload: Payload::Ack(verdict.clone()),
            },
        );
        verdict.map_err(|why| self.err("recv", peer, why))?;
        self.upload(&h)
    }

    fn send_recv(&self, t: &Tensor, to: usize, from: usize) -> Result<Tensor> {
        self.check_peer("send_recv", to)?;
        self.check_peer("send_recv", from)?;
        let mine = t.download()?;
        self.post(
            to,
            Msg {
                op: "send_recv",
                round: None,
                payload: Payload::Tensor(mine.clone()),
            },
        );
        let got = self.take_tensor("send_recv", from)?;
        if got.dtype != mine.dtype {
            return Err(self.err(
                "send_recv",
                from,
                format!("received {}, sending {}", got.dtype, mine.dtype),
            ));
        }
        self.upload(&got)
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
