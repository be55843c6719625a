//! Validation of GLA inputs (shapes, dtypes, varlen offsets) into a `Problem`, and the
//! chunk tables the chunked kernels read.

use super::*;
use crate::launch::{check_batch, check_input, check_offsets, expect_shape, shape_err, upload_u32};
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// Validated dimensions.
pub(super) struct Problem {
    pub(super) dk: usize,
    pub(super) dv: usize,
    pub(super) heads: usize,
    /// Sequence bounds in rows (`N + 1`).
    pub(super) bounds: Vec<usize>,
    pub(super) dtype: DType,
    pub(super) scale: f32,
}

impl Problem {
    pub(super) fn n_seq(&self) -> usize {
        self.bounds.len() - 1
    }
    pub(super) fn rows(&self) -> usize {
        *self.bounds.last().unwrap_or(&0)
    }
    pub(super) fn state_shape(&self) -> [usize; 4] {
        [self.n_seq(), self.heads, self.dk, self.dv]
    }
    pub(super) fn dims(&self) -> reference::Dims {
        reference::Dims {
            heads: self.heads,
            dk: self.dk,
            dv: self.dv,
            bounds: self.bounds.clone(),
        }
    }
}

/// The largest `|scale|` taken: 2^60, so `scale q k` of inputs within the f16 range
/// and K <= 4096 stays below f32's maximum (65504^2 x 4096 x 2^60 ~ 2e31 < 3.4e38); a
/// larger scale overflows the f32 scores to inf and, with both signs, to NaN.
pub(super) const MAX_SCALE: f64 = 1_152_921_504_606_846_976.0;

/// How the allowed scales read in errors and `kiln ops gla`.
pub(super) const SCALE_RANGE: &str = "a finite number with |scale| <= 2^60 (~1.15e18)";

pub(super) fn check(inp: &GlaInputs<'_>, scale: Option<f64>) -> Result<Problem> {
    let client = inp.q.client();
    for (name, t) in [("q", inp.q), ("k", inp.k), ("v", inp.v), ("g", inp.g)] {
        check_input(name, t, client)?;
    }
    let &[b, t, heads, dk] = inp.q.shape() else {
        return Err(shape_err("q", "[B, T, H, K]".into(), inp.q.shape()));
    };
    expect_shape("k", inp.k, inp.q.shape(), "q's shape")?;
    expect_shape("g", inp.g, inp.q.shape(), "q's shape")?;
    let dv = match inp.v.shape() {
        &[vb, vt, vh, dv] if (vb, vt, vh) == (b, t, heads) => dv,
        other => {
            return Err(shape_err(
                "v",
                format!("[{b}, {t}, {heads}, V] (B, T, H of q)"),
                other,
            ))
        }
    };
    if dk == 0 || dv == 0 || heads == 0 {
        return Err(shape_err(
            "q",
            "H, K and V of at least 1".into(),
            inp.q.shape(),
        ));
    }
    let dtype = inp.q.dtype();
    inp.k.expect_dtype("k", &[dtype])?;
    inp.v.expect_dtype("v", &[dtype])?;
    inp.g.expect_dtype("g", &[DType::F32, dtype])?;
    let bounds = match inp.cu_seqlens {
        None => {
            let largest = inp.q.numel().max(inp.h0.map_or(0, Tensor::numel));
            check_batch("q", b, largest, inp.q.shape())?;
            (0..=b).map(|i| i * t).collect::<Vec<_>>()
        }
        Some(cu) => {
            if b != 1 {
                return Err(shape_err(
                    "q",
                    "[1, T, H, K] with cu_seqlens (B = 1)".to_string(),
                    inp.q.shape(),
                ));
            }
            check_offsets("cu_seqlens", cu, t, "T")?
        }
    };
    let n_seq = bounds.len() - 1;
    if let Some(h0) = inp.h0 {
        h0.expect_usable("h0", client)?;
        h0.expect_dtype("h0", &[DType::F32])?;
        expect_shape("h0", h0, &[n_seq, heads, dk, dv], "[N, H, K, V]")?;
    }
    let scale = scale.unwrap_or(1.0 / (dk as f64).sqrt());
    if !(scale.is_finite() && scale.abs() <= MAX_SCALE) {
        return Err(Error::Param {
            param: "scale".into(),
            expected: SCALE_RANGE.into(),
            found: scale.to_string(),
        });
    }
    Ok(Problem {
        dk,
        dv,
        heads,
        bounds,
        dtype,
        scale: scale as f32,
    })
}

/// The host-side chunk table, on the device.
pub(super) struct Chunks {
    pub(super) count: usize,
    /// `(first row, rows)` per chunk.
    pub(super) table: Tensor,
    /// First chunk of each sequence, `N + 1` entries.
    pub(super) seq_chunks: Tensor,
    /// Sequence bounds, `N + 1` entries.
    pub(super) bounds: Tensor,
}

pub(super) fn chunk_table(client: &Client, p: &Problem, chunk: usize) -> Result<Chunks> {
    let mut table = Vec::new();
    let mut seq_chunks = vec![0u32];
    for w in p.bounds.windows(2) {
        let mut r = w[0];
        while r < w[1] {
            let len = chunk.min(w[1] - r);
            table.extend([r as u32, len as u32]);
            r += len;
        }
        seq_chunks.push((table.len() / 2) as u32);
    }
    let count = table.len() / 2;
    // In u128 factor by factor: an empty batch may have H K V past usize.
    let wide = |dims: &[usize]| dims.iter().map(|&d| d as u128).product::<u128>();
    let states = wide(&[count.max(p.n_seq()), p.heads, p.dk, p.dv]);
    if states > u32::MAX as u128 || wide(&[p.rows(), p.heads, p.dk.max(p.dv)]) > u32::MAX as u128 {
        return Err(Error::Unsupported {
            device: client.report().name.clone(),
            feature: format!("GLA problems over 2^32 state or token elements ({count} chunks)"),
        });
    }
    let bounds: Vec<u32> = p.bounds.iter().map(|&b| b as u32).collect();
    Ok(Chunks {
        count,
        table: upload_u32(client, "chunks", &table)?,
        seq_chunks: upload_u32(client, "seq_chunks", &seq_chunks)?,
        bounds: upload_u32(client, "cu_seqlens", &bounds)?,
    })
}

pub(super) fn check_chunk(chunk: usize) -> Result<()> {
    if CHUNK_SIZES.contains(&chunk) {
        Ok(())
    } else {
        Err(Error::Param {
            param: "chunk_size".into(),
            expected: "16 | 32 | 64".into(),
            found: chunk.to_string(),
        })
    }
}

/// Candidates of the chunked kernels differ only in which unit computes what, never in
/// summation order: they must agree to the last bit, up to this.
pub(super) const CHUNK_TOLERANCE: f64 = 1e-5;
/// Chunk sizes change the summation order of everything: a sanity bound.
pub(super) const CHUNK_SIZE_TOLERANCE: f64 = 1e-2;
/// Recurrent candidates split the K sum differently (KG): a sanity bound.
pub(super) const RECURRENT_TOLERANCE: f64 = 1e-2;
