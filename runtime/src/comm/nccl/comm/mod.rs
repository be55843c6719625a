//! [`NcclComm`]: the [`Communicator`] on NVIDIA GPUs, over NCCL.
//!
//! **Ordering with kernel launches.** cubecl 0.10 launches each thread's kernels on a
//! CUDA stream of its own and exposes neither the stream nor an event hook, so NCCL
//! cannot be put on that stream or made to wait on an event recorded there. NcclComm
//! therefore orders each call on the host: it waits for the rank's queued kernels
//! (`Client::sync`: they write the inputs, and the memory of the outputs may still be
//! read by them), posts NCCL on a stream of its own, and waits for that stream before
//! returning (so the next launches read the result). Two host waits per call; kernels
//! queued before the call still run back to back. cubecl's own collectives (all-reduce
//! and send/recv between devices of one process) use events between its compute and
//! communication streams; the day cubecl exposes its stream, `post` puts NCCL there
//! and both waits go.
//!
//! **Agreement and errors.** Before any data moves, the ranks exchange the operation,
//! dtype and shape (an `all_gather` of a few words, or a header between the pair for
//! point-to-point), and check them as [`HostComm`](super::super::HostComm) does: a
//! disagreement is the same error on every rank, never a hang. Every wait polls the
//! stream and NCCL's asynchronous error, with a timeout (30 s by default); on a
//! timeout or an error the communicator is aborted (`ncclCommAbort`, which unblocks
//! its kernels) and every later call says so.

use super::super::{check_agreement, check_reducible, check_send_rows, rank1, Agree};
use super::ffi::{self, dtype as nccl_dtype, Nccl, RawComm, Stream, UniqueId};
use super::{NcclId, RankEnv};
use crate::comm::Communicator;
use crate::{Client, ClientInner, DType, Error, Result, Tensor};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod collectives;
mod header;

use header::{Header, HEADER};

/// A live `ncclComm_t`.
struct RawHandle(RawComm);
// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the
// `Communicator` trait is `Send` but not `Sync`, and every call takes `&self` of the
// one owner.
unsafe impl Send for RawHandle {}

/// One rank of an NCCL communicator over kiln tensors on a CUDA device (see the
/// module docs for ordering and errors). Call a rank's operations from the thread that
/// launches its kernels.
pub struct NcclComm {
    nccl: &'static Nccl,
    comm: RawHandle,
    rank: usize,
    world: usize,
    client: Client,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    timeout: Duration,
    aborted: AtomicBool,
}

/// The CUDA device index of a client, or an error naming the rank.
fn cuda_index(client: &Client, rank: usize) -> Result<usize> {
    let index = match &client.inner {
        ClientInner::Cuda(_) => client
            .report()
            .selector
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok()),
        ClientInner::Wgpu(_) => None,
    };
    index.ok_or_else(|| {
        Error::Device(format!(
            "NcclComm: rank {rank}'s device `{}` ({}) is not a CUDA device; use HostComm there",
            client.name(),
            client.report().selector
        ))
    })
}

fn driver(e: cudarc::driver::DriverError) -> Error {
    Error::Device(format!("CUDA: {e}"))
}

impl NcclComm {
    /// One process driving several GPUs: rank `i` on `clients[i]` (CUDA devices;
    /// `ncclCommInitAll`). Run each rank's calls on its own thread.
    pub fn from_devices(clients: &[Client]) -> Result<Vec<NcclComm>> {
        let nccl = ffi::nccl().map_err(Error::Device)?;
        let devices = clients
            .iter()
            .enumerate()
            .map(|(r, c)| cuda_index(c, r).map(|i| i as c_int))
            .collect::<Result<Vec<_>>>()?;
        if devices.is_empty() {
            return Err(Error::Param {
                param: "clients".into(),
                expected: "at least one CUDA client".into(),
                found: "none".into(),
            });
        }
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device.
        let rc = unsafe {
            (nccl.comm_init_all)(comms.as_mut_ptr(), devices.len() as c_int, devices.as_ptr())
        };
        nccl.check(rc, &format!("ncclCommInitAll on devices {devices:?}"))
            .map_err(Error::Device)?;
        let world = clients.len();
        let mut out = Vec::with_capacity(world);
        for (rank, (client, comm)) in clients.iter().zip(comms).enumerate() {
            out.push(Self::wrap(nccl, comm, rank, world, client)?);
        }
        Ok(out)
    }

    /// One rank of a communicator spread over processes (and machines): every rank
    /// passes the same `id` (made once, by [`NcclId::new`] or `kiln nccl-id`).
    /// Blocks until all `world_size` ranks have joined.
    pub fn from_rank(
        client: &Client,
        id: &NcclId,
        rank: usize,
        world_size: usize,
    ) -> Result<NcclComm> {
        if rank >= world_size {
            return Err(Error::Param {
                param: "rank".into(),
                expected: format!("a rank in 0..{world_size}"),
                found: rank.to_string(),
            });
        }
        let nccl = ffi::nccl().map_err(Error::Device)?;
        let index = cuda_index(client, rank)?;
        let ctx = CudaContext::new(index).map_err(driver)?;
        ctx.bind_to_thread().map_err(driver)?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: writes one communicator; the device's context is current.
        let rc = unsafe {
            (nccl.comm_init_rank)(
                &mut comm,
                world_size as c_int,
                UniqueId { internal: id.0 },
                rank as c_int,
            )
        };
        nccl.check(
            rc,
            &format!("ncclCommInitRank (rank {rank} of {world_size})"),
        )
        .map_err(Error::Device)?;
        Self::wrap(nccl, comm, rank, world_size, client)
    }

    /// [`from_rank`](Self::from_rank) with `KILN_NCCL_ID`, `KILN_RANK` and
    /// `KILN_WORLD_SIZE` (see [`RankEnv`]).
    pub fn from_env(client: &Client) -> Result<NcclComm> {
        let env = RankEnv::from_env()?;
        Self::from_rank(client, &env.id, env.rank, env.world_size)
    }

    fn wrap(
        nccl: &'static Nccl,
        comm: RawComm,
        rank: usize,
        world: usize,
        client: &Client,
    ) -> Result<NcclComm> {
        let handle = RawHandle(comm);
        // The primary context, which cubecl-cuda uses too: device pointers agree.
        let ctx = CudaContext::new(cuda_index(client, rank)?).map_err(driver)?;
        let stream = ctx.new_stream().map_err(driver)?;
        Ok(NcclComm {
            nccl,
            comm: handle,
            rank,
            world,
            client: client.clone(),
            ctx,
            stream,
            timeout: Duration::from_secs(30),
            aborted: AtomicBool::new(false),
        })
    }

    /// Bounds every wait by `timeout` (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> NcclComm {
        self.timeout = timeout;
        self
    }

    fn err(&self, op: &str, peer: Option<usize>, message: impl Into<String>) -> Error {
        Error::Comm {
            op: op.into(),
            rank: self.rank,
            peer,
            message: message.into(),
        }
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.world {
            return Err(self.err(
                op,
                Some(peer),
                format!("no such rank (world size {})", self.world),
            ));
        }
        Ok(())
    }

    /// Runs `post` (NCCL calls on this communicator's stream) ordered after the rank's
    /// queued kernels, and waits for it (see the module docs).
    fn run(
        &self,
        op: &str,
        peer: Option<usize>,
        post: impl FnOnce(&Nccl, RawComm, Stream) -> std::result::Result<(), String>,
    ) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(self.err(
                op,
                peer,
                "the communicator was aborted by an earlier failure",
            ));
        }
        self.client.sync()?;
        self.ctx.bind_to_thread().map_err(driver)?;
        post(self.nccl, self.comm.0, self.stream.cu_stream())
            .map_err(|m| self.fail(op, peer, m))?;
        // A timeout past what `Instant` can hold waits without a deadline.
        let deadline = Instant::now().checked_add(self.timeout);
        let mut pause = Duration::from_micros(5);
        loop {
            // SAFETY: the stream is this communicator's own and alive.
            let q = unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) };
            match q {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(op, peer, format!("CUDA stream: {e:?}"))),
            }
            if let Err(m) = self.nccl.async_error(self.comm.0) {
                return Err(self.fail(op, peer, m));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.fail(
                    op,
                    peer,
                    format!(
                        "no completion within {:?} (a peer did not take part); the communicator was aborted",
                        self.timeout
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Aborts the communicator (unblocking its kernels) and makes the error.
    fn fail(&self, op: &str, peer: Option<usize>, message: String) -> Error {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: the communicator is live; abort frees it and unblocks its work.
            unsafe { (self.nccl.comm_abort)(self.comm.0) };
        }
        self.err(op, peer, message)
    }

    /// Device addresses of tensors on this rank's device, with what keeps each
    /// allocation alive until the call has waited for its stream.
    fn addresses(&self, op: &str, ts: &[&Tensor]) -> Result<(Vec<u64>, impl Sized)> {
        let ClientInner::Cuda(c) = &self.client.inner else {
            return Err(Error::Device(format!(
                "{op}: NcclComm's client is not a CUDA device"
            )));
        };
        let mut keep = Vec::with_capacity(ts.len());
        let mut ptrs = Vec::with_capacity(ts.len());
        for t in ts {
            self.check_local(op, t)?;
            let r = c
                .get_resource(t.handle().clone())
                .map_err(|e| Error::Device(format!("{op}: {e:?}")))?;
            ptrs.push(r.resource().ptr);
            keep.push(r);
        }
        Ok((ptrs, keep))
    }

    /// A tensor this rank can hand to NCCL: contiguous, on this rank's CUDA device. The
    /// collectives check their input with it before the header exchange (a refusal
    /// there fails the peers at once; after it they would wait inside NCCL).
    pub(super) fn check_local(&self, op: &str, t: &Tensor) -> Result<()> {
        if !t.is_contiguous()
            || !matches!(t.client().inner, ClientInner::Cuda(_))
            || t.client().report().selector != self.client.report().selector
        {
            return Err(Error::Device(format!(
                "{op}: the tensor must be contiguous and on {} (this rank's device); it is on {}",
                self.client.report().selector,
                t.client().report().selector
            )));
        }
        Ok(())
    }

    /// Every rank's header for a collective (an all-gather of the words), after checking
    /// that all ranks are in the same operation. The header is `HEADER` words on every
    /// rank whatever the operation (NCCL's all-gather needs equal counts: ranks in
    /// different operations must still read each other's headers and report it), so
    /// per-operation words travel after the agreement ([`Self::agree`]).
    fn exchange(&self, mine: &Header) -> Result<Vec<Header>> {
        let words = mine.encode()?;
        debug_assert_eq!(
            words.len(),
            HEADER,
            "a collective header has no extra words"
        );
        let all = self.all_gather_words(mine.op, &words)?;
        self.decode_all(mine.op, &all, words.len())
    }

    /// Every rank's `words` (the same count on every rank), in rank order.
    fn all_gather_words(&self, op: &'static str, words: &[u64]) -> Result<Vec<u64>> {
        let n = words.len();
        let send = self.stream.clone_htod(words).map_err(driver)?;
        let mut recv = self
            .stream
            .alloc_zeros::<u64>(n * self.world)
            .map_err(driver)?;
        {
            let (s, _s) = send.device_ptr(&self.stream);
            let (r, _r) = recv.device_ptr_mut(&self.stream);
            self.run(op, None, |nccl, comm, stream| {
                // SAFETY: `s` holds n words, `r` n words per rank, both on this device.
                let rc = unsafe {
                    (nccl.all_gather)(s as _, r as _, n * 8, nccl_dtype::UINT8, comm, stream)
                };
                nccl.check(rc, "ncclAllGather")
            })?;
        }
        self.stream.clone_dtoh(&recv).map_err(driver)
    }

    /// A collective's headers from every rank, checked like HostComm's: all in `op`, with
    /// agreeing dtypes and shapes (`agree`). `local` is this rank's check of its own
    /// arguments: where it failed, the rank still sends a header, marked refused, and
    /// returns its error; its peers then fail at once, naming it, instead of waiting
    /// inside NCCL for data that never comes.
    fn agree(
        &self,
        op: &'static str,
        local: Result<()>,
        dtype: DType,
        shape: &[usize],
        extra: Vec<u64>,
        agree: Agree,
    ) -> Result<Vec<Header>> {
        let mine = Header {
            op,
            dtype,
            shape: shape.to_vec(),
            extra: vec![],
            refused: false,
        };
        let local = local.and_then(|()| mine.encode().map(drop));
        let sent = match local {
            Ok(()) => mine,
            Err(_) => Header {
                op,
                dtype,
                shape: vec![],
                extra: vec![],
                refused: true,
            },
        };
        // This rank's own error first, whatever the exchange met.
        let exchanged = self.exchange(&sent);
        local?;
        let mut all = exchanged?;
        if let Some(peer) = all.iter().position(|h| h.refused) {
            return Err(self.err(
                op,
                Some(peer),
                "the peer refused its arguments (its own error says why)",
            ));
        }
        let views: Vec<_> = all.iter().map(|h| (h.dtype, h.shape.as_slice())).collect();
        check_agreement(op, self.rank, &views, agree)?;
        // Every rank is in `op` now: its per-operation words (all_to_all's rows per
        // rank, `world` words on every rank) have one count everywhere.
        if !extra.is_empty() {
            let words = self.all_gather_words(op, &extra)?;
            for (h, w) in all.iter_mut().zip(words.chunks(extra.len())) {
                h.extra = w.to_vec();
            }
        }
        Ok(all)
    }

    fn decode_all(&self, op: &str, words: &[u64], n: usize) -> Result<Vec<Header>> {
        let mut out = Vec::with_capacity(self.world);
        for (peer, w) in words.chunks(n).enumerate() {
            let h = Header::decode(w)
                .ok_or_else(|| self.err(op, Some(peer), "the peer sent an unreadable header"))?;
            if h.op != op {
                return Err(self.err(op, Some(peer), format!("the peer is in `{}`", h.op)));
            }
            out.push(h);
        }
        Ok(out)
    }

    /// Point-to-point header exchange in one group: send `mine` to `to` (if any),
    /// receive `n` words from `from` (if any).
    fn swap_words(
        &self,
        op: &str,
        mine: Option<(&[u64], usize)>,
        from: Option<(usize, usize)>,
    ) -> Result<Option<Vec<u64>>> {
        let send = match mine {
            Some((w, _)) => Some(self.stream.clone_htod(w).map_err(driver)?),
            None => None,
        };
        let mut recv = match from {
            Some((_, n)) => Some(self.stream.alloc_zeros::<u64>(n).map_err(driver)?),
            None => None,
        };
        {
            let s = send.as_ref().map(|b| b.device_ptr(&self.stream));
            let r = recv.as_mut().map(|b| b.device_ptr_mut(&self.stream));
            let sends: Vec<_> = s
                .iter()
                .zip(mine)
                .map(|((p, _), (w, to))| (*p, w.len() * 8, to))
                .collect();
            let recvs: Vec<_> = r
                .iter()
                .zip(from)
                .map(|((p, _), (f, n))| (*p, n * 8, f))
                .collect();
            let peer = mine.map(|m| m.1).or(from.map(|f| f.0));
            self.move_bytes(op, peer, &sends, &recvs)?;
        }
        match recv {
            Some(b) => Ok(Some(self.stream.clone_dtoh(&b).map_err(driver)?)),
            None => Ok(None),
        }
    }

    /// Moves bytes in one NCCL group: `sends` (address, bytes, peer) and `recvs`.
    fn move_bytes(
        &self,
        op: &str,
        peer: Option<usize>,
        sends: &[(u64, usize, usize)],
        recvs: &[(u64, usize, usize)],
    ) -> Result<()> {
        self.run(op, peer, |nccl, comm, stream| {
            group(nccl, || {
                for &(p, bytes, to) in sends.iter().filter(|s| s.1 > 0) {
                    // SAFETY: `p` addresses `bytes` bytes of a live tensor on this device.
                    let rc = unsafe {
                        (nccl.send)(p as _, bytes, nccl_dtype::UINT8, to as c_int, comm, stream)
                    };
                    nccl.check(rc, "ncclSend")?;
                }
                for &(p, bytes, from) in recvs.iter().filter(|r| r.1 > 0) {
                    // SAFETY: `p` has room for `bytes` bytes of a live tensor on this device.
                    let rc = unsafe {
                        (nccl.recv)(
                            p as _,
                            bytes,
                            nccl_dtype::UINT8,
                            from as c_int,
                            comm,
                            stream,
                        )
                    };
                    nccl.check(rc, "ncclRecv")?;
                }
                Ok(())
            })
        })
    }

    /// `send`'s and `recv`'s handshake: each side sends its header (what it sends, or
    /// what it expects) and receives the other's in one group, and both check that what
    /// is sent is what is expected, so a mismatch fails both sides.
    fn handshake(
        &self,
        op: &'static str,
        peer: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<()> {
        self.check_peer(op, peer)?;
        let sending = op == "send";
        let mine = Header {
            op,
            dtype,
            shape: shape.to_vec(),
            extra: vec![],
            refused: false,
        }
        .encode()?;
        let theirs = self
            .swap_words(op, Some((&mine, peer)), Some((peer, HEADER)))?
            .unwrap_or_default();
        let theirs = Header::decode(&theirs)
            .ok_or_else(|| self.err(op, Some(peer), "the peer sent an unreadable header"))?;
        if theirs.op != if sending { "recv" } else { "send" } {
            return Err(self.err(op, Some(peer), format!("the peer is in `{}`", theirs.op)));
        }
        let (mine, theirs) = ((dtype, shape), (theirs.dtype, theirs.shape.as_slice()));
        let (sent, expected) = if sending {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        if sent != expected {
            return Err(self.err(
                op,
                Some(peer),
                format!(
                    "sent {} {:?}, the receiver expected {} {:?}",
                    sent.0, sent.1, expected.0, expected.1
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of one row of `shape` (its first dimension moves).
    fn row_bytes(dtype: DType, shape: &[usize]) -> usize {
        dtype.size() * shape.iter().skip(1).product::<usize>()
    }
}

/// Runs `body` between `ncclGroupStart` and `ncclGroupEnd` (closing the group even
/// when `body` fails).
fn group(
    nccl: &Nccl,
    body: impl FnOnce() -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    // SAFETY: group calls have no arguments.
    nccl.check(unsafe { (nccl.group_start)() }, "ncclGroupStart")?;
    let r = body();
    // SAFETY: as above.
    let end = nccl.check(unsafe { (nccl.group_end)() }, "ncclGroupEnd");
    r.and(end)
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::Acquire) {
            // SAFETY: the communicator is live and used by nobody else now.
            unsafe { (self.nccl.comm_destroy)(self.comm.0) };
        }
    }
}
