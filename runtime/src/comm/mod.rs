//! Moving tensors between devices: the [`Communicator`] trait that ring attention and
//! expert parallelism are written against, and [`HostComm`], its implementation for
//! any devices (several wgpu adapters in one process, or one device shared by several
//! ranks, as the tests on lavapipe do), staged through host memory.
//!
//! Semantics every implementation keeps (NCCL's):
//! - transfers between a pair of ranks are matched in the order they are posted;
//! - every rank of a collective calls it with the same dtype and, where the operation
//!   needs it, the same shape; a disagreement is an error on every rank, never a hang;
//! - every blocking wait has a timeout; a peer that dropped out or timed out is named
//!   in the error with the operation.
//!
//! Ordering with kernel launches: `HostComm` downloads a tensor (which waits for the
//! kernels that write it) and uploads what it receives, so each call is ordered with the
//! rank's launches by construction, at the price of a host round trip.

pub mod check;
mod host;
pub mod nccl;

pub use host::HostComm;
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;

use crate::{Client, DType, Error, Result, Tensor};

/// Collective and point-to-point transfers of kiln tensors among `world_size` ranks.
/// Every tensor moves along its first dimension (rows); the rest of the shape travels
/// with it.
pub trait Communicator: Send {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The device this rank's tensors live on.
    fn client(&self) -> &Client;
    /// Sends `t` to `peer` (blocks until `peer` has taken it, so a mismatch is an
    /// error on both sides).
    fn send(&self, t: &Tensor, peer: usize) -> Result<()>;
    /// Receives a tensor from `peer`, which must have `dtype` and `shape`.
    fn recv(&self, peer: usize, dtype: DType, shape: &[usize]) -> Result<Tensor>;
    /// Sends `t` to `to` and receives from `from` in one step (a ring's step: every
    /// rank posts both at once, so no ordering of sends deadlocks).
    fn send_recv(&self, t: &Tensor, to: usize, from: usize) -> Result<Tensor>;
    /// Sends rows `[offset_i, offset_i + send_rows[i])` of `t` to rank `i` (uneven and
    /// zero-size splits allowed; `send_rows` sums to `t`'s first dimension) and returns
    /// the rows received from every rank, in rank order, with how many came from each.
    fn all_to_all(&self, t: &Tensor, send_rows: &[usize]) -> Result<(Tensor, Vec<usize>)>;
    /// The element-wise sum of `t` over all ranks (f32, f16, bf16; summed in f64 in
    /// rank order, so every rank gets the same bits), on every rank.
    fn all_reduce(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` concatenated along the first dimension, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Which part of the shape the ranks of a collective must agree on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Agree {
    /// The whole shape (`all_reduce`, `barrier`).
    Whole,
    /// Every dimension but the first (`all_gather`, `all_to_all`: rows may differ).
    Trailing,
}

/// Checks every rank's (dtype, shape) of a collective against this rank's. Every rank
/// checks the same list, so a disagreement fails on all of them, naming the first
/// rank that differs from this one.
pub(crate) fn check_agreement(
    op: &str,
    rank: usize,
    views: &[(DType, &[usize])],
    agree: Agree,
) -> Result<()> {
    let (dtype, shape) = views[rank];
    for (peer, &(peer_dtype, peer_shape)) in views.iter().enumerate() {
        let shape_ok = match agree {
            Agree::Whole => peer_shape == shape,
            Agree::Trailing => {
                peer_shape.len() == shape.len() && peer_shape.get(1..) == shape.get(1..)
            }
        };
        if peer_dtype != dtype || !shape_ok {
            return Err(Error::Comm {
                op: op.into(),
                rank,
                peer: Some(peer),
                message: format!(
                    "ranks disagree: {dtype} {shape:?} here, {peer_dtype} {peer_shape:?} there"
                ),
            });
        }
    }
    Ok(())
}

/// Tensors move along their first dimension: rank 0 has none.
pub(crate) fn rank1(t: &Tensor, op: &str) -> Result<()> {
    if t.rank() == 0 {
        return Err(Error::Shape {
            tensor: format!("{op} input"),
            expected: "rank >= 1 (tensors move along their first dimension)".into(),
            found: "[]".into(),
        });
    }
    Ok(())
}

/// `all_to_all`'s split: one row count per rank, summing to the input's rows.
pub(crate) fn check_send_rows(world: usize, t: &Tensor, send_rows: &[usize]) -> Result<()> {
    let total = send_rows.iter().try_fold(0usize, |a, &r| a.checked_add(r));
    if send_rows.len() != world || total != Some(t.shape()[0]) {
        return Err(Error::Param {
            param: "send_rows".into(),
            expected: format!(
                "{world} counts (one per rank) summing to {} (the rows of the input)",
                t.shape()[0]
            ),
            found: format!("{send_rows:?}"),
        });
    }
    Ok(())
}

/// `all_reduce` sums floats only.
pub(crate) fn check_reducible(t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::DType {
            tensor: "all_reduce input".into(),
            expected: "f32, f16 or bf16".into(),
            found: t.dtype().name().into(),
        });
    }
    Ok(())
}
