//! The weight-only GEMMs' host side: W4A16 weights (formats, validation, repacking to
//! kiln's layout) and `w8_bits`, both run by the dequantizing kernels.

use super::gemm::{gemm_output, Operands};
use super::*;
use crate::launch::{absent, expect_shape, shape_err};
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// A W4A16 weight's storage layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4Format {
    /// GPTQ: `qweight` i32 `[K/8, N]` packed along K (least-significant nibble
    /// first), `qzeros` i32 `[K/G, N/8]` packed along N; version 1 stores `z - 1`,
    /// version 2 stores `z`.
    Gptq {
        /// 1 or 2.
        version: u32,
    },
    /// AWQ: `qweight` i32 `[K, N/8]` and `qzeros` i32 `[K/G, N/8]`, packed along N in
    /// the column order [0, 2, 4, 6, 1, 3, 5, 7].
    Awq,
    /// kiln's repacked layout: `qweight` i32 `[K/8, N]` as GPTQ, `scales` and `qzeros`
    /// f32 `[K/G, N]` (true zero points, 8 for symmetric checkpoints; absent: 8).
    Kiln,
}

impl W4Format {
    /// `gptq` (with `gptq_version` 1 or 2), `awq` or `kiln`.
    pub fn parse(format: &str, gptq_version: u32) -> Result<W4Format> {
        match (format, gptq_version) {
            ("gptq", 1 | 2) => Ok(W4Format::Gptq {
                version: gptq_version,
            }),
            ("gptq", v) => Err(Error::Param {
                param: "gptq_version".into(),
                expected: "1 (zeros stored as z - 1) or 2 (zeros stored as z)".into(),
                found: v.to_string(),
            }),
            ("awq", _) => Ok(W4Format::Awq),
            ("kiln", _) => Ok(W4Format::Kiln),
            (other, _) => Err(Error::Param {
                param: "format".into(),
                expected: "gptq | awq | kiln".into(),
                found: other.into(),
            }),
        }
    }
}

/// A W4A16 weight as stored by a checkpoint (or repacked).
#[derive(Clone, Copy)]
pub struct W4Weights<'a> {
    /// The layout of the tensors below.
    pub format: W4Format,
    /// Packed codes, i32 (shape per [`W4Format`]).
    pub qweight: &'a Tensor,
    /// Scales `[K/G, N]`: any float dtype (f32 for [`W4Format::Kiln`]).
    pub scales: &'a Tensor,
    /// Zero points (shape and dtype per [`W4Format`]); `None`: symmetric, z = 8 (for
    /// [`W4Format::Kiln`] too).
    pub qzeros: Option<&'a Tensor>,
    /// Act-order group of each row, i32 `[K]` in `0..K/G`; `None`: `k / G`.
    pub g_idx: Option<&'a Tensor>,
    /// Rows per group: 32, 64, 128, or -1 (per channel, G = K).
    pub group_size: i64,
}

/// A W4A16 weight in kiln's layout ([`W4Format::Kiln`]), ready for [`w4a16_packed`].
#[derive(Clone, Debug)]
pub struct PackedW4 {
    /// i32 `[K/8, N]`, eight rows per word, least-significant nibble first.
    pub qweight: Tensor,
    /// f32 `[K/G, N]`.
    pub scales: Tensor,
    /// f32 `[K/G, N]`, the true zero points.
    pub qzeros: Tensor,
    /// i32 `[K]`, when the checkpoint is act-order.
    pub g_idx: Option<Tensor>,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Rows per group (K for per-channel).
    pub group_size: usize,
}

impl PackedW4 {
    /// The same weight as [`W4Weights`] (format `kiln`).
    pub fn weights(&self) -> W4Weights<'_> {
        W4Weights {
            format: W4Format::Kiln,
            qweight: &self.qweight,
            scales: &self.scales,
            qzeros: Some(&self.qzeros),
            g_idx: self.g_idx.as_ref(),
            group_size: self.group_size as i64,
        }
    }
}

/// K, N and the group size of a W4A16 weight, checked.
struct W4Dims {
    k: usize,
    n: usize,
    group_size: usize,
}

/// K and N of a weight from `qweight` in its format's layout, checked against the N of
/// `scales` (naming the other layout when the tensors are in it).
fn w4_layout(w: &W4Weights<'_>, client: &Client) -> Result<(usize, usize)> {
    let uses = |name: &str, t: &Tensor| t.expect_usable(name, client);
    uses("qweight", w.qweight)?;
    uses("scales", w.scales)?;
    w.qweight.expect_dtype("qweight", &[DType::I32])?;
    let &[rows, cols] = w.qweight.shape() else {
        return Err(shape_err("qweight", "rank 2".into(), w.qweight.shape()));
    };
    let (k, n) = match w.format {
        W4Format::Awq => (rows, cols * 8),
        _ => (rows * 8, cols),
    };
    if k == 0 || n == 0 {
        return Err(shape_err(
            "qweight",
            "K and N of at least 1".into(),
            w.qweight.shape(),
        ));
    }
    // N from `scales` [K/G, N] names the layout when qweight is in the other format's.
    if let &[_, scale_n] = w.scales.shape() {
        if scale_n != n {
            let (this, other, other_n) = match w.format {
                W4Format::Awq => ("AWQ's [K, N/8]", "GPTQ's [K/8, N] (format gptq)", cols),
                _ => (
                    "[K/8, N] (GPTQ and kiln)",
                    "AWQ's [K, N/8] (format awq)",
                    cols * 8,
                ),
            };
            let hint = if other_n == scale_n {
                format!(", which is {other}: check the `format` parameter")
            } else {
                String::new()
            };
            return Err(shape_err(
                "qweight",
                format!("{this} with N = {scale_n} from `scales`{hint}"),
                w.qweight.shape(),
            ));
        }
    }
    if k % 8 != 0 {
        // AWQ's [K, N/8] (GPTQ's K is 8 rows a word already): kiln's layout packs 8
        // rows of K a word.
        return Err(shape_err(
            "qweight",
            "AWQ's [K, N/8] with K a multiple of 8".into(),
            w.qweight.shape(),
        ));
    }
    Ok((k, n))
}

fn check_w4(w: &W4Weights<'_>, client: &Client) -> Result<W4Dims> {
    let uses = |name: &str, t: &Tensor| t.expect_usable(name, client);
    let (k, n) = w4_layout(w, client)?;
    let group_size = match w.group_size {
        -1 => k,
        g @ (32 | 64 | 128) => g as usize,
        g if g > 0 && g as usize == k => k, // per channel, spelled out
        g => {
            return Err(Error::Param {
                param: "group_size".into(),
                expected: "32, 64, 128, or -1 or K (per channel)".into(),
                found: g.to_string(),
            })
        }
    };
    if k % group_size != 0 {
        return Err(Error::Param {
            param: "group_size".into(),
            expected: format!("a divisor of K = {k} (K must be a multiple of the group size)"),
            found: group_size.to_string(),
        });
    }
    let groups = k / group_size;
    let scales_dtypes: &[DType] = match w.format {
        W4Format::Kiln => &[DType::F32],
        _ => &DType::FLOATS,
    };
    w.scales.expect_dtype("scales", scales_dtypes)?;
    client.require_dtype("scales", w.scales.dtype())?;
    expect_shape("scales", w.scales, &[groups, n], "[K/G, N]")?;
    match (w.format, w.qzeros) {
        (W4Format::Kiln, Some(z)) => {
            uses("qzeros", z)?;
            z.expect_dtype("qzeros", &[DType::F32])?;
            expect_shape("qzeros", z, &[groups, n], "[K/G, N], format kiln")?;
        }
        (_, Some(z)) => {
            uses("qzeros", z)?;
            z.expect_dtype("qzeros", &[DType::I32])?;
            if n % 8 != 0 {
                return Err(shape_err(
                    "scales",
                    "N a multiple of 8 (zeros pack 8 columns per int32)".into(),
                    w.scales.shape(),
                ));
            }
            expect_shape("qzeros", z, &[groups, n / 8], "[K/G, N/8]")?;
        }
        (_, None) => {}
    }
    if let Some(gi) = w.g_idx {
        uses("g_idx", gi)?;
        gi.expect_dtype("g_idx", &[DType::I32])?;
        expect_shape("g_idx", gi, &[k], "[K]")?;
        let values = gi.download()?.to_f64();
        if let Some((row, v)) = values
            .iter()
            .enumerate()
            .find(|(_, &v)| v < 0.0 || v >= groups as f64)
        {
            return Err(Error::Param {
                param: "g_idx".into(),
                expected: format!("group indices in 0..{groups}"),
                found: format!("{v} at row {row}"),
            });
        }
    }
    Ok(W4Dims { k, n, group_size })
}

/// Converts a checkpoint's W4A16 weight to kiln's layout (done once per model; a
/// [`W4Format::Kiln`] weight comes back as it is).
pub fn w4a16_repack(w: &W4Weights<'_>) -> Result<PackedW4> {
    let client = w.qweight.client();
    let d = check_w4(w, client)?;
    let groups = d.k / d.group_size;
    if w.format == W4Format::Kiln {
        return Ok(PackedW4 {
            qweight: w.qweight.clone(),
            scales: w.scales.clone(),
            // Absent zero points: a symmetric weight, z = 8 everywhere.
            qzeros: match w.qzeros {
                Some(z) => z.clone(),
                None => Tensor::upload(
                    client,
                    &kiln_runtime::HostTensor::from_f64(
                        DType::F32,
                        vec![groups, d.n],
                        &vec![8.0; groups * d.n],
                    )?,
                )?,
            },
            g_idx: w.g_idx.cloned(),
            k: d.k,
            n: d.n,
            group_size: d.group_size,
        });
    }
    let qweight = Tensor::empty(client, DType::I32, &[d.k / 8, d.n])?;
    let scales = Tensor::empty(client, DType::F32, &[groups, d.n])?;
    let qzeros = Tensor::empty(client, DType::F32, &[groups, d.n])?;
    let words = d.k / 8 * d.n;
    let group_cols = groups * d.n;
    let zero_offset = match w.format {
        W4Format::Gptq { version: 1 } if w.qzeros.is_some() => 1,
        _ => 0,
    };
    let placeholder = absent(client)?.as_words();
    let zeros_in = w.qzeros.map_or(placeholder, Tensor::as_words);
    W4a16Repack::tuned(
        client,
        0.0,
        &W4a16RepackArgs {
            qweight: &w.qweight.as_words(),
            qzeros: &zeros_in,
            scales: w.scales,
            out_q: &qweight.as_words(),
            out_s: &scales,
            out_z: &qzeros,
            n: d.n as u32,
            words: words as u32,
            group_cols: group_cols as u32,
            items: words.max(group_cols) as u32,
            zero_offset,
            awq: w.format == W4Format::Awq,
            has_zeros: w.qzeros.is_some(),
        },
    )?;
    Ok(PackedW4 {
        qweight,
        scales,
        qzeros,
        g_idx: w.g_idx.cloned(),
        k: d.k,
        n: d.n,
        group_size: d.group_size,
    })
}

/// `y = x @ dequant(W)` for a checkpoint's weight: x `[..., K]`, y `[..., N]` in x's
/// dtype. Non-kiln formats are repacked first (see [`w4a16_repack`]). The kernel is the
/// autotuner's choice ([`w4a16_on`] picks one).
pub fn w4a16(x: &Tensor, w: &W4Weights<'_>) -> Result<Tensor> {
    w4a16_on(x, w, None)
}

/// [`w4a16`] on the caller's `path` (`None`: the autotuner's choice), refused by name
/// where the problem lacks it: tensor cores without them or for f32 activations
/// (`Error::Unsupported`), the GEMV past [`GEMV_MAX_ROWS`] rows (`Error::Param`). An empty
/// product runs no kernel whatever the path.
pub fn w4a16_on(x: &Tensor, w: &W4Weights<'_>, path: Option<Path>) -> Result<Tensor> {
    // The weight's layout, then x's K against it, before anything about groups: a
    // mismatch is then named for what it is.
    let (k, _) = w4_layout(w, x.client())?;
    if let Some(&xk) = x.shape().last() {
        if xk != k {
            return Err(shape_err(
                "x",
                format!("[..., {k}] (K of the weight `qweight`)"),
                x.shape(),
            ));
        }
    }
    let packed = w4a16_repack(w)?;
    w4a16_packed_on(x, &packed, path)
}

/// `y = x @ dequant(W)` for a weight in kiln's layout.
pub fn w4a16_packed(x: &Tensor, w: &PackedW4) -> Result<Tensor> {
    w4a16_packed_on(x, w, None)
}

/// [`w4a16_packed`] on the caller's `path` (as [`w4a16_on`]).
pub fn w4a16_packed_on(x: &Tensor, w: &PackedW4, path: Option<Path>) -> Result<Tensor> {
    let client = x.client();
    let d = check_w4(&w.weights(), client)?;
    // The struct's fields are public: they must describe its tensors.
    if (d.k, d.n, d.group_size) != (w.k, w.n, w.group_size) {
        return Err(Error::Param {
            param: "PackedW4".into(),
            expected: format!(
                "k, n, group_size of its tensors: {}, {}, {} (qweight {}, scales {})",
                d.k,
                d.n,
                d.group_size,
                kiln_runtime::shape_str(w.qweight.shape()),
                kiln_runtime::shape_str(w.scales.shape())
            ),
            found: format!("{}, {}, {}", w.k, w.n, w.group_size),
        });
    }
    let (m, y) = gemm_output(x, d.k, d.n)?;
    if m > 0 {
        let act_order = w.g_idx.is_some();
        let g_idx = match &w.g_idx {
            Some(t) => t.as_words(),
            None => absent(client)?.as_words(),
        };
        let operands = Operands {
            x,
            qweight: w.qweight.as_words(),
            scales: &w.scales,
            zeros: &w.qzeros,
            g_idx: &g_idx,
            y: &y,
            dims: [m, w.n, w.k, w.group_size],
            shift: 0,
            wkind: WeightKind::Int4,
            act_order,
            path,
        };
        operands.run()?;
    }
    Ok(y)
}

/// `y = x @ (double_round(q8, bits) s8 2^(8 - bits))`: x `[..., K]`, `q8` i8 `[K, N]`,
/// `s8` f32 `[N]`; y in x's dtype. `bits` in 8, 6, 4, 2. The kernel is the autotuner's
/// choice ([`w8_bits_on`] picks one).
pub fn w8_bits(x: &Tensor, q8: &Tensor, s8: &Tensor, bits: u32) -> Result<Tensor> {
    w8_bits_on(x, q8, s8, bits, None)
}

/// [`w8_bits`] on the caller's `path` (as [`w4a16_on`]; the direct kernel also needs K a
/// multiple of 4). K = 0 returns zeros whatever the path.
pub fn w8_bits_on(
    x: &Tensor,
    q8: &Tensor,
    s8: &Tensor,
    bits: u32,
    path: Option<Path>,
) -> Result<Tensor> {
    let client = x.client();
    if !SWITCH_BITS.contains(&bits) {
        return Err(Error::Param {
            param: "bits".into(),
            expected: "8, 6, 4 or 2".into(),
            found: bits.to_string(),
        });
    }
    q8.expect_usable("q8", client)?;
    q8.expect_dtype("q8", &[DType::I8])?;
    let &[k, n] = q8.shape() else {
        return Err(shape_err("q8", "[K, N]".into(), q8.shape()));
    };
    s8.expect_usable("s8", client)?;
    s8.expect_dtype("s8", &[DType::F32])?;
    expect_shape("s8", s8, &[n], "[N], N of q8")?;
    let (m, y) = gemm_output(x, k, n)?;
    if k == 0 {
        // An empty sum: zeros (the kernels would read x and q8 past their empty ends).
        return Tensor::zeros(client, x.dtype(), y.shape());
    }
    if m > 0 && n > 0 {
        let unused = absent(client)?;
        Operands {
            x,
            qweight: q8.as_words(),
            scales: s8,
            zeros: &unused,
            g_idx: &unused.as_words(),
            y: &y,
            dims: [m, n, k, k],
            shift: 8 - bits,
            wkind: WeightKind::Int8Bits,
            act_order: false,
            path,
        }
        .run()?;
    }
    Ok(y)
}
