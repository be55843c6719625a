//! cubecl's own GEMM (cubek-matmul 0.2, `Strategy::Auto`) as a candidate of kiln's
//! `matmul` autotuner, so that kiln's matmul is never slower than cubecl's on any device.
//! On NVIDIA its tensor-core pipelines are the strongest cubecl GEMMs; on lavapipe its
//! Auto strategy falls back to a unit-tiled kernel that kiln's own beat by 1.4-6x.
//!
//! Offered only with a plain epilogue (no bias, activation or residual: applying kiln's
//! epilogue after it would cost a second pass over `c`, which is slower than kiln's
//! fused kernels wherever cubek is not already far ahead), and validated against the
//! reference candidate like every other. Not offered for f32 where the device has TF32:
//! there its tensor-core routines round f32 operands to TF32 (a 10-bit mantissa).

use super::Problem;
use cubecl::prelude::*;
use cubek_matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek_matmul::launch::Strategy;
use cubek_std::InputBinding;
use kiln_runtime::{dispatch, Client, DType, Error, Result, Tensor};

/// Whether cubek's tensor-core routines would stage f32 operands as TF32 on `client`'s
/// device (cubek-matmul 0.2's `adjust_dtypes` does so wherever the device supports TF32:
/// NVIDIA from sm_80).
pub(super) fn rounds_f32_to_tf32(client: &Client) -> bool {
    let tf32 = cubecl::tf32::as_type_native_unchecked().storage_type();
    dispatch!(client, cc => cc.properties().supports_type(tf32))
}

/// A rank-3 (batch 1) binding of `t` with the given logical shape and strides.
fn binding<R: Runtime>(t: &Tensor, shape: [usize; 3], strides: [usize; 3]) -> TensorBinding<R> {
    TensorBinding {
        handle: t.handle().clone().binding(),
        strides: strides.to_vec().into(),
        shape: shape.to_vec().into(),
        runtime: std::marker::PhantomData,
    }
}

/// `c = a @ b` (or `a @ b^T`) through cubek-matmul's Auto strategy; `c` is [M, N].
pub(super) fn launch(a: &Tensor, b: &Tensor, c: &Tensor, p: &Problem) -> Result<()> {
    let storage = match a.dtype() {
        DType::F32 => f32::as_type_native_unchecked().storage_type(),
        DType::F16 => half::f16::as_type_native_unchecked().storage_type(),
        DType::BF16 => half::bf16::as_type_native_unchecked().storage_type(),
        other => {
            return Err(Error::Kernel {
                kernel: "cubek-matmul".into(),
                message: format!("no {other} path"),
            })
        }
    };
    let mut elems = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: storage,
        rhs: storage,
        out: storage,
    });
    let (m, n, k) = (p.m, p.n, p.k);
    // b is [K, N] row-major, or [N, K] read as its transpose (column-major [K, N]).
    let b_strides = if p.trans_b {
        [n * k, 1, k]
    } else {
        [k * n, n, 1]
    };
    // cubek may panic on a shape its setup did not foresee: a candidate that panics is
    // a failed candidate, never a crash of the caller.
    let launched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch!(a.client(), cc => cubek_matmul::launch::launch_ref(
            &Strategy::Auto,
            cc,
            InputBinding::Normal(binding(a, [1, m, k], [m * k, k, 1]), storage),
            InputBinding::Normal(binding(b, [1, k, n], b_strides), storage),
            binding(c, [1, m, n], [m * n, n, 1]),
            &mut elems,
        ))
    }));
    match launched {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Kernel {
            kernel: "cubek-matmul".into(),
            message: format!("{e:?}"),
        }),
        Err(_) => Err(Error::Kernel {
            kernel: "cubek-matmul".into(),
            message: "panicked during launch".into(),
        }),
    }
}
