//! Validation of attention inputs and parameters into a `Problem`.

use super::*;
use crate::launch::{check_batch, check_input, check_offsets, shape_err, upload_u32};
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// The largest `|scale|` taken (as GLA's): `scale q k` of f16-range inputs stays finite.
pub(super) const MAX_SCALE: f64 = 1_152_921_504_606_846_976.0;
/// How the allowed scales read in errors and `kiln ops attention`.
pub(super) const SCALE_RANGE: &str = "a finite number with |scale| <= 2^60 (~1.15e18)";
/// Largest position offset: causal comparisons run in 32-bit signed integers.
pub(super) const MAX_OFFSET: usize = (i32::MAX / 2) as usize;

/// Validated dimensions and parameters.
#[derive(Clone, Debug)]
pub(super) struct Problem {
    pub(super) batch: usize,
    pub(super) sq: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) dk: usize,
    pub(super) dv: usize,
    /// Sequence bounds in query rows and in keys (`N + 1` each, over the flattened
    /// token axis `B * Sq` / `B * Sk`).
    pub(super) bounds_q: Vec<usize>,
    pub(super) bounds_k: Vec<usize>,
    pub(super) varlen: bool,
    pub(super) dtype: DType,
    pub(super) out_dtype: DType,
    pub(super) scale: f64,
    pub(super) causal: bool,
    /// `q_offset - k_offset`: query `i` sees key `j` iff `j <= i + shift`.
    pub(super) shift: i64,
    pub(super) temperature: f64,
    pub(super) lse_scale: f64,
}

impl Problem {
    pub(super) fn n_seq(&self) -> usize {
        self.bounds_q.len() - 1
    }
    pub(super) fn longest(bounds: &[usize]) -> usize {
        bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }
    /// `[B, H, Sq]` of the log-sum-exp.
    pub(super) fn lse_shape(&self) -> [usize; 3] {
        [self.batch, self.heads, self.sq]
    }
    pub(super) fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.sq, self.heads, self.dv]
    }
    /// The scale applied inside the kernels: `scale / T`.
    pub(super) fn score_scale(&self) -> f32 {
        (self.scale / self.temperature) as f32
    }
    /// The sequence bounds on the device.
    pub(super) fn upload_bounds(&self, client: &Client) -> Result<(Tensor, Tensor)> {
        let u = |b: &[usize]| b.iter().map(|&x| x as u32).collect::<Vec<_>>();
        Ok((
            upload_u32(client, "cu_seqlens_q", &u(&self.bounds_q))?,
            upload_u32(client, "cu_seqlens_k", &u(&self.bounds_k))?,
        ))
    }
}

fn positive(name: &str, x: f64) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(Error::Param {
            param: name.into(),
            expected: "a finite number > 0".into(),
            found: x.to_string(),
        })
    }
}

/// Checks the tensors and options of an attention call.
pub(super) fn check(inp: &AttentionInputs<'_>, opts: &AttentionOptions) -> Result<Problem> {
    let client = inp.q.client();
    for (name, t) in [("q", inp.q), ("k", inp.k), ("v", inp.v)] {
        check_input(name, t, client)?;
    }
    let &[b, sq, heads, dk] = inp.q.shape() else {
        return Err(shape_err("q", "[B, Sq, H, D]".into(), inp.q.shape()));
    };
    let (sk, kv_heads) = match inp.k.shape() {
        &[kb, sk, hkv, kd] if kb == b && kd == dk => (sk, hkv),
        other => {
            return Err(shape_err(
                "k",
                format!("[{b}, Sk, Hkv, {dk}] (B and D of q)"),
                other,
            ))
        }
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(shape_err(
            "k",
            format!("[{b}, {sk}, Hkv, {dk}] with Hkv dividing q's H = {heads}"),
            inp.k.shape(),
        ));
    }
    let dv = match inp.v.shape() {
        &[vb, vs, vh, dv] if (vb, vs, vh) == (b, sk, kv_heads) => dv,
        other => {
            return Err(shape_err(
                "v",
                format!("[{b}, {sk}, {kv_heads}, Dv] (B, Sk, Hkv of k)"),
                other,
            ))
        }
    };
    for (name, t, d) in [("q", inp.q, dk), ("v", inp.v, dv)] {
        if d == 0 || d > MAX_HEAD_DIM || heads == 0 {
            return Err(shape_err(
                name,
                format!("heads >= 1 and a head dimension in 1..={MAX_HEAD_DIM}"),
                t.shape(),
            ));
        }
    }
    let dtype = inp.q.dtype();
    inp.k.expect_dtype("k", &[dtype])?;
    inp.v.expect_dtype("v", &[dtype])?;
    let (bounds_q, bounds_k, varlen) = match (inp.cu_seqlens_q, inp.cu_seqlens_k) {
        (None, None) => {
            let largest = inp.q.numel().max(inp.k.numel()).max(inp.v.numel());
            check_batch("q", b, largest, inp.q.shape())?;
            (
                (0..=b).map(|i| i * sq).collect::<Vec<_>>(),
                (0..=b).map(|i| i * sk).collect::<Vec<_>>(),
                false,
            )
        }
        (Some(cq), Some(ck)) => {
            if b != 1 {
                return Err(shape_err(
                    "q",
                    "[1, Sq, H, D] with cu_seqlens_q / cu_seqlens_k (B = 1)".into(),
                    inp.q.shape(),
                ));
            }
            let bq = check_offsets("cu_seqlens_q", cq, sq, "Sq")?;
            let bk = check_offsets("cu_seqlens_k", ck, sk, "Sk")?;
            if bq.len() != bk.len() {
                return Err(Error::Param {
                    param: "cu_seqlens_k".into(),
                    expected: format!("{} offsets (as many as cu_seqlens_q)", bq.len()),
                    found: format!("{} offsets", bk.len()),
                });
            }
            (bq, bk, true)
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Param {
                param: if inp.cu_seqlens_q.is_some() {
                    "cu_seqlens_k"
                } else {
                    "cu_seqlens_q"
                }
                .into(),
                expected: "given together with the other cu_seqlens".into(),
                found: "absent".into(),
            })
        }
    };
    let scale = opts.scale.unwrap_or(1.0 / (dk as f64).sqrt());
    if !(scale.is_finite() && scale.abs() <= MAX_SCALE) {
        return Err(Error::Param {
            param: "scale".into(),
            expected: SCALE_RANGE.into(),
            found: scale.to_string(),
        });
    }
    for (name, off) in [("q_offset", opts.q_offset), ("k_offset", opts.k_offset)] {
        if off > MAX_OFFSET {
            return Err(Error::Param {
                param: name.into(),
                expected: format!("a position in 0..={MAX_OFFSET}"),
                found: off.to_string(),
            });
        }
    }
    let out_dtype = opts.out_dtype.unwrap_or(dtype);
    if out_dtype != dtype && out_dtype != DType::F32 {
        return Err(Error::Param {
            param: "out_dtype".into(),
            expected: format!("{dtype} (q's dtype) or f32"),
            found: out_dtype.to_string(),
        });
    }
    // Causal masks compare `row + q_offset - k_offset` (rows of a tile past the last
    // too) in 32-bit signed integers: the last query's position must leave a tile's
    // margin below i32::MAX.
    let longest_q = Problem::longest(&bounds_q);
    if opts.causal && longest_q + opts.q_offset + 1024 > i32::MAX as usize {
        return Err(Error::Param {
            param: "q_offset".into(),
            expected: format!(
                "Sq + q_offset <= {} with causal (positions are 32-bit in the kernels; longest query sequence {longest_q})",
                i32::MAX as usize - 1024
            ),
            found: opts.q_offset.to_string(),
        });
    }
    // Indices are 32-bit inside the kernels (the inputs are bounded by check_input).
    if kiln_runtime::indexable_product(&[b, sq, heads, dv]).is_none() {
        return Err(shape_err(
            "v",
            format!(
                "B Sq H Dv <= {} (out is indexed in 32 bits)",
                crate::launch::MAX_ELEMENTS
            ),
            inp.v.shape(),
        ));
    }
    Ok(Problem {
        batch: b,
        sq,
        heads,
        kv_heads,
        dk,
        dv,
        bounds_q,
        bounds_k,
        varlen,
        dtype,
        out_dtype,
        scale,
        causal: opts.causal,
        shift: opts.q_offset as i64 - opts.k_offset as i64,
        temperature: positive("temperature", opts.temperature)?,
        lse_scale: positive("lse_scale", opts.lse_scale)?,
    })
    .and_then(in_f32)
}

/// The kernels compute in f32: `T`, `scale / T` and `ln(lse_scale)` must be finite and
/// `T` normal there (else `out` and `lse` would come back inf or NaN).
fn in_f32(p: Problem) -> Result<Problem> {
    let normal = |x: f64| {
        let v = x as f32;
        v.is_finite() && v.abs() >= f32::MIN_POSITIVE
    };
    // `scale / T` is bounded as `scale` is: ring attention runs its blocks at that
    // scale with T = 1, and must accept what one device accepts.
    let scaled = p.scale / p.temperature;
    if !(normal(p.temperature) && scaled.abs() <= MAX_SCALE && (scaled as f32).is_finite()) {
        return Err(Error::Param {
            param: "temperature".into(),
            expected: format!(
                "a normal f32 > 0 with |scale / temperature| <= 2^60 (scale {})",
                p.scale
            ),
            found: p.temperature.to_string(),
        });
    }
    if !(p.lse_scale.ln() as f32).is_finite() {
        return Err(Error::Param {
            param: "lse_scale".into(),
            expected: "a number > 0 whose ln is finite in f32".into(),
            found: p.lse_scale.to_string(),
        });
    }
    Ok(p)
}
