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

mod host;

pub use host::HostComm;

use crate::{DType, Result, Tensor};

/// Collective and point-to-point transfers of kiln tensors among `world_size` ranks.
/// Every tensor moves along its first dimension (rows); the rest of the shape travels
/// with it.
pub trait Communicator: Send {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
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
