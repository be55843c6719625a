//! Quantized GEMMs (spec: `shared/specs/qgemm.md`): weight-only int4 (GPTQ and AWQ
//! checkpoints), int8 x int8, int8 weights viewed at 8/6/4/2 bits (Double Rounding),
//! and FlexRound's fake quantization for training.
//!
//! - [`w4a16`]: `y = x @ W_hat`, `W_hat[k, n] = (q[k, n] - z[g, n]) s[g, n]` with
//!   `g = k / G` (or `g_idx[k]`). Reads GPTQ (v1 stores z - 1, v2 z) and AWQ
//!   checkpoints as they are by repacking them first ([`w4a16_repack`], a pass over
//!   the weight); repack once and call [`w4a16_packed`] to skip it. x f32/f16/bf16,
//!   f32 accumulation, y in x's dtype.
//! - [`w8a8`]: `y = sx sw (xq @ wq^T) + bias`, exact i32 accumulation; with
//!   [`quantize_per_token`] to turn float activations into `(xq, sx)`.
//! - [`w8_bits`]: int8 `q8` `[K, N]` with per-channel `s8`, used at 8, 6, 4 or 2 bits.
//! - [`flexround`] / [`flexround_backward`]: element-wise fake quantization and its
//!   straight-through gradients.
//!
//! Rounding is round-half-to-even everywhere (the per-token quantizer, Double
//! Rounding's shift, FlexRound), identically on every backend. Dequantization happens
//! inside the GEMM's main loop; few rows take a split-K GEMV kernel, many rows a
//! register-tiled one, chosen by the autotuner.

mod dequant;
mod flexround;
mod int8;
pub mod reference;
mod registry;

pub use dequant::{awq_slot, dequant_i8, QgemmGemv, QgemmTiled, W4a16Repack, TILE_K};
pub use flexround::{
    FlexroundBackwardCols, FlexroundBackwardRows, FlexroundBackwardTotal, FlexroundForward,
};
pub use int8::{TokenQuantize, TokenScale, W8a8Gemm, W8a8Gemv, INT8_TILE_K};
pub use registry::{
    FLEXROUND, FLEXROUND_BACKWARD, KERNELS, QUANTIZE_PER_TOKEN, W4A16, W4A16_REPACK, W8A8, W8_BITS,
};

use crate::launch::{absent, check_input, expect_shape, shape_err};
use kiln_runtime::tune::{Autotuner, TuneKey};
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// Group sizes W4A16 accepts (`-1`: one group per column, G = K).
pub const GROUP_SIZES: [i64; 4] = [32, 64, 128, -1];
/// Bit widths [`w8_bits`] serves from one int8 weight.
pub const SWITCH_BITS: [u32; 4] = [8, 6, 4, 2];
/// Rows up to which the autotuner also tries the GEMV kernel.
pub const GEMV_MAX_ROWS: usize = 64;

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
    /// f32 `[K/G, N]` (true zero points, 8 for symmetric checkpoints).
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
    /// Zero points (shape and dtype per [`W4Format`]); `None`: symmetric, z = 8.
    /// Required for [`W4Format::Kiln`].
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

fn check_w4(w: &W4Weights<'_>, client: &Client) -> Result<W4Dims> {
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
        (W4Format::Kiln, None) => {
            return Err(Error::MissingTensor {
                op: "w4a16".into(),
                tensor: "qzeros".into(),
                expected: format!("f32 [{groups}, {n}] (format kiln)"),
            })
        }
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
            qzeros: w.qzeros.cloned().ok_or_else(|| Error::MissingTensor {
                op: "w4a16_repack".into(),
                tensor: "qzeros".into(),
                expected: "f32 [K/G, N]".into(),
            })?,
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
        &w.qweight.as_words(),
        &zeros_in,
        w.scales,
        &qweight.as_words(),
        &scales,
        &qzeros,
        d.n as u32,
        words as u32,
        group_cols as u32,
        words.max(group_cols) as u32,
        zero_offset,
        w.format == W4Format::Awq,
        w.qzeros.is_some(),
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
/// dtype. Non-kiln formats are repacked first (see [`w4a16_repack`]).
pub fn w4a16(x: &Tensor, w: &W4Weights<'_>) -> Result<Tensor> {
    let packed = w4a16_repack(w)?;
    w4a16_packed(x, &packed)
}

/// `y = x @ dequant(W)` for a weight in kiln's layout.
pub fn w4a16_packed(x: &Tensor, w: &PackedW4) -> Result<Tensor> {
    let client = x.client();
    check_w4(&w.weights(), client)?;
    let (m, y) = gemm_output(x, w.k, w.n)?;
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
            wkind: 0,
            act_order,
        };
        operands.run()?;
    }
    Ok(y)
}

/// `y = x @ (double_round(q8, bits) s8 2^(8 - bits))`: x `[..., K]`, `q8` i8 `[K, N]`,
/// `s8` f32 `[N]`; y in x's dtype. `bits` in 8, 6, 4, 2.
pub fn w8_bits(x: &Tensor, q8: &Tensor, s8: &Tensor, bits: u32) -> Result<Tensor> {
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
    if m > 0 && n > 0 {
        let unused = absent(client)?;
        Operands {
            x,
            qweight: q8.as_words(),
            scales: s8,
            zeros: &unused,
            g_idx: &unused.as_words(),
            y: &y,
            dims: [m, n, k.max(1), k.max(1)],
            shift: 8 - bits,
            wkind: 1,
            act_order: false,
        }
        .run()?;
    }
    Ok(y)
}

/// Checks x `[..., K]` and allocates y `[..., N]`; returns the row count M.
fn gemm_output(x: &Tensor, k: usize, n: usize) -> Result<(usize, Tensor)> {
    check_input("x", x, x.client())?;
    let Some((&xk, lead)) = x.shape().split_last() else {
        return Err(shape_err("x", format!("[..., {k}]"), x.shape()));
    };
    if xk != k {
        return Err(shape_err(
            "x",
            format!("[..., {k}] (K of the weight)"),
            x.shape(),
        ));
    }
    let mut shape = lead.to_vec();
    shape.push(n);
    let m = lead.iter().product();
    Ok((m, Tensor::empty(x.client(), x.dtype(), &shape)?))
}

/// The arguments of the dequantizing GEMM kernels.
struct Operands<'a> {
    x: &'a Tensor,
    qweight: Tensor,
    scales: &'a Tensor,
    zeros: &'a Tensor,
    g_idx: &'a Tensor,
    y: &'a Tensor,
    /// M, N, K, group size.
    dims: [usize; 4],
    shift: u32,
    wkind: u32,
    act_order: bool,
}

/// Which kernel computes a dequantizing GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Path {
    Gemv,
    Tiled,
}

/// The GEMV and tiled kernels sum in different orders: a sanity bound.
const PATH_TOLERANCE: f64 = 1e-2;
/// Candidates of one kernel differ in the split of K: a sanity bound.
const KERNEL_TOLERANCE: f64 = 1e-2;

impl Operands<'_> {
    fn run(&self) -> Result<()> {
        let [m, n, k, _] = self.dims;
        let source = [QgemmGemv::SOURCE_HASH, QgemmTiled::SOURCE_HASH].concat();
        let extra = format!(";wkind={};act_order={}", self.wkind, self.act_order);
        let path = choose_path(self.y, "qgemm_path", &source, [m, n, k], &extra, |p| {
            self.launch(p).map(|_| self.y.clone())
        })?;
        self.launch(path)
    }

    fn launch(&self, path: Path) -> Result<()> {
        let client = self.x.client();
        let [m, n, k, g] = self.dims.map(|d| d as u32);
        match path {
            Path::Gemv => QgemmGemv::tuned(
                client,
                KERNEL_TOLERANCE,
                self.x,
                &self.qweight,
                self.scales,
                self.zeros,
                self.g_idx,
                self.y,
                m,
                n,
                k,
                g,
                self.shift,
                m.next_power_of_two().min(8),
                self.wkind,
                self.act_order,
            )
            .map(drop),
            Path::Tiled => QgemmTiled::tuned(
                client,
                KERNEL_TOLERANCE,
                self.x,
                &self.qweight,
                self.scales,
                self.zeros,
                self.g_idx,
                self.y,
                m,
                n,
                k,
                g,
                self.shift,
                self.wkind,
                self.act_order,
            )
            .map(drop),
        }
    }
}

/// The autotuner's choice between the GEMV and the tiled kernel of a GEMM writing `y`
/// (both tried for M <= [`GEMV_MAX_ROWS`], tiled only above), keyed by the kernels'
/// sources, bucketed M, N, K, y's dtype and `extra`. `run` launches one path.
fn choose_path(
    y: &Tensor,
    kernel: &'static str,
    source: &str,
    [m, n, k]: [usize; 3],
    extra: &str,
    run: impl Fn(Path) -> Result<Tensor>,
) -> Result<Path> {
    let paths: &[Path] = if m <= GEMV_MAX_ROWS {
        &[Path::Gemv, Path::Tiled]
    } else {
        &[Path::Tiled]
    };
    let key = TuneKey {
        kernel,
        source_hash: kiln_runtime::tune::fnv1a_hex(source),
        shape: format!(
            "m={};n={};k={};dtype={}{extra}",
            m.next_power_of_two(),
            n.next_power_of_two(),
            k.next_power_of_two(),
            y.dtype(),
        ),
    };
    Autotuner::global().tune(
        y.client(),
        &key,
        paths,
        |p| format!("{p:?}").to_lowercase(),
        |&p| Ok(vec![run(p)?]),
        PATH_TOLERANCE,
    )
}

/// Output dtypes [`w8a8`] can write.
pub const W8A8_OUT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `y[m, n] = sx[m] sw[n] sum_k xq[m, k] wq[n, k] (+ bias[n])`: `xq` i8 `[M, K]`,
/// `sx` f32 `[M]`, `wq` i8 `[N, K]`, `sw` f32 `[N]`, `bias` f32 `[N]`; y `[M, N]` in
/// `out_dtype` (f32, f16, or bf16 where the device has it).
pub fn w8a8(
    xq: &Tensor,
    sx: &Tensor,
    wq: &Tensor,
    sw: &Tensor,
    bias: Option<&Tensor>,
    out_dtype: DType,
) -> Result<Tensor> {
    let client = xq.client();
    for (name, t, dt) in [
        ("xq", xq, DType::I8),
        ("sx", sx, DType::F32),
        ("wq", wq, DType::I8),
        ("sw", sw, DType::F32),
    ] {
        t.expect_usable(name, client)?;
        t.expect_dtype(name, &[dt])?;
    }
    let &[m, k] = xq.shape() else {
        return Err(shape_err("xq", "[M, K]".into(), xq.shape()));
    };
    let n = match wq.shape() {
        &[n, wk] if wk == k => n,
        other => return Err(shape_err("wq", format!("[N, {k}] (K of xq)"), other)),
    };
    expect_shape("sx", sx, &[m], "[M], M of xq")?;
    expect_shape("sw", sw, &[n], "[N], N of wq")?;
    if let Some(b) = bias {
        b.expect_usable("bias", client)?;
        b.expect_dtype("bias", &[DType::F32])?;
        expect_shape("bias", b, &[n], "[N], N of wq")?;
    }
    if !W8A8_OUT_DTYPES.contains(&out_dtype) {
        return Err(Error::Param {
            param: "out_dtype".into(),
            expected: "f32 | f16 | bf16".into(),
            found: out_dtype.name().into(),
        });
    }
    client.require_dtype("y", out_dtype)?;
    let y = Tensor::empty(client, out_dtype, &[m, n])?;
    if m > 0 && n > 0 {
        let placeholder = absent(client)?;
        let (xw, ww) = (xq.as_words(), wq.as_words());
        let b = bias.unwrap_or(&placeholder);
        let (mu, nu, ku) = (m as u32, n as u32, k as u32);
        let launch = |path: Path| match path {
            Path::Gemv => W8a8Gemv::tuned(
                client,
                0.0,
                &xw,
                sx,
                &ww,
                sw,
                b,
                &y,
                mu,
                nu,
                ku,
                mu.next_power_of_two().min(8),
                bias.is_some(),
            )
            .map(drop),
            Path::Tiled => W8a8Gemm::tuned(
                client,
                0.0,
                &xw,
                sx,
                &ww,
                sw,
                b,
                &y,
                mu,
                nu,
                ku,
                bias.is_some(),
            )
            .map(drop),
        };
        let source = [W8a8Gemv::SOURCE_HASH, W8a8Gemm::SOURCE_HASH].concat();
        let path = choose_path(&y, "w8a8_path", &source, [m, n, k], "", |p| {
            launch(p).map(|_| y.clone())
        })?;
        launch(path)?;
    }
    Ok(y)
}

/// Dynamic per-token int8 quantization of x `[M, K]` (any float dtype): returns `xq`
/// i8 `[M, K]` and `sx` f32 `[M]` with `sx = max_k |x| / 127` and
/// `xq = clamp(round(x / sx), -127, 127)` (ties to even; 0 for an all-zero row).
pub fn quantize_per_token(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let client = x.client();
    check_input("x", x, client)?;
    let &[m, k] = x.shape() else {
        return Err(shape_err("x", "[M, K]".into(), x.shape()));
    };
    let xq = Tensor::empty(client, DType::I8, &[m, k])?;
    let sx = Tensor::empty(client, DType::F32, &[m])?;
    if m > 0 && k > 0 {
        TokenScale::tuned(client, 0.0, x, &sx, m as u32, k as u32)?;
        let len = m * k;
        TokenQuantize::tuned(
            client,
            0.0,
            x,
            &sx,
            &xq.as_words(),
            len as u32,
            k as u32,
            len.div_ceil(4) as u32,
        )?;
    }
    Ok((xq, sx))
}

/// FlexRound's inputs: `w` and `s2` `[rows, cols]`, `s1` one element, `s3` `[rows]`,
/// `s4` `[cols]`, all of w's dtype; codes are clamped to `[qmin, qmax]`.
#[derive(Clone, Copy)]
pub struct FlexRoundInputs<'a> {
    /// The weight `[rows, cols]` (output channels x input channels).
    pub w: &'a Tensor,
    /// Per-tensor scale, one element.
    pub s1: &'a Tensor,
    /// Per-element divisor `[rows, cols]`.
    pub s2: &'a Tensor,
    /// Per-output-channel divisor `[rows]`.
    pub s3: &'a Tensor,
    /// Per-input-channel divisor `[cols]`.
    pub s4: &'a Tensor,
    /// Smallest code (e.g. -8 for signed 4-bit).
    pub qmin: f64,
    /// Largest code (e.g. 7).
    pub qmax: f64,
}

/// FlexRound's gradients, in w's dtype.
pub struct FlexRoundGrads {
    /// dL/dw `[rows, cols]`.
    pub dw: Tensor,
    /// dL/ds1 `[1]`.
    pub ds1: Tensor,
    /// dL/dS2 `[rows, cols]`.
    pub ds2: Tensor,
    /// dL/ds3 `[rows]`.
    pub ds3: Tensor,
    /// dL/ds4 `[cols]`.
    pub ds4: Tensor,
}

fn check_flexround(p: &FlexRoundInputs<'_>) -> Result<(usize, usize)> {
    let client = p.w.client();
    check_input("w", p.w, client)?;
    let &[rows, cols] = p.w.shape() else {
        return Err(shape_err("w", "[rows, cols]".into(), p.w.shape()));
    };
    let dt = p.w.dtype();
    for (name, t) in [("s1", p.s1), ("s2", p.s2), ("s3", p.s3), ("s4", p.s4)] {
        check_input(name, t, client)?;
        t.expect_dtype(name, &[dt])?;
    }
    if p.s1.numel() != 1 {
        return Err(shape_err("s1", "one element".into(), p.s1.shape()));
    }
    expect_shape("s2", p.s2, &[rows, cols], "w's shape")?;
    if p.s3.numel() != rows || p.s3.shape().last() != Some(&rows) && rows > 0 {
        return Err(shape_err(
            "s3",
            format!("[{rows}] (rows of w)"),
            p.s3.shape(),
        ));
    }
    if p.s4.numel() != cols || p.s4.shape().last() != Some(&cols) && cols > 0 {
        return Err(shape_err(
            "s4",
            format!("[{cols}] (cols of w)"),
            p.s4.shape(),
        ));
    }
    if !(p.qmin.is_finite() && p.qmax.is_finite() && p.qmin <= p.qmax) {
        return Err(Error::Param {
            param: "qmin, qmax".into(),
            expected: "finite, qmin <= qmax".into(),
            found: format!("{}, {}", p.qmin, p.qmax),
        });
    }
    Ok((rows, cols))
}

/// `wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)` (ties to even), w's dtype.
pub fn flexround(p: &FlexRoundInputs<'_>) -> Result<Tensor> {
    let (rows, cols) = check_flexround(p)?;
    let client = p.w.client();
    let wq = Tensor::empty(client, p.w.dtype(), p.w.shape())?;
    if rows * cols > 0 {
        FlexroundForward::tuned(
            client,
            0.0,
            p.w,
            p.s1,
            p.s2,
            p.s3,
            p.s4,
            &wq,
            (rows * cols) as u32,
            cols as u32,
            p.qmin as f32,
            p.qmax as f32,
        )?;
    }
    Ok(wq)
}

/// The straight-through backward of [`flexround`] for the upstream gradient `grad`
/// (w's shape and dtype).
pub fn flexround_backward(p: &FlexRoundInputs<'_>, grad: &Tensor) -> Result<FlexRoundGrads> {
    let (rows, cols) = check_flexround(p)?;
    let client = p.w.client();
    check_input("grad", grad, client)?;
    grad.expect_dtype("grad", &[p.w.dtype()])?;
    expect_shape("grad", grad, p.w.shape(), "w's shape")?;
    let dt = p.w.dtype();
    let g = FlexRoundGrads {
        dw: Tensor::empty(client, dt, &[rows, cols])?,
        ds1: Tensor::empty(client, dt, &[1])?,
        ds2: Tensor::empty(client, dt, &[rows, cols])?,
        ds3: Tensor::empty(client, dt, &[rows])?,
        ds4: Tensor::empty(client, dt, &[cols])?,
    };
    let p1 = Tensor::empty(client, DType::F32, &[rows.max(1)])?;
    let (r, c, lo, hi) = (rows as u32, cols as u32, p.qmin as f32, p.qmax as f32);
    if rows > 0 {
        FlexroundBackwardRows::tuned(
            client, 1e-4, p.w, p.s1, p.s2, p.s3, p.s4, grad, &g.dw, &g.ds2, &g.ds3, &p1, r, c, lo,
            hi,
        )?;
    }
    if cols > 0 {
        FlexroundBackwardCols::tuned(
            client, 0.0, p.w, p.s1, p.s2, p.s3, p.s4, grad, &g.ds4, r, c, lo, hi,
        )?;
    }
    FlexroundBackwardTotal::tuned(client, 0.0, &p1, &g.ds1, r)?;
    Ok(g)
}
