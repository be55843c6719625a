//! W8A8's host side: `w8a8` (int8 x int8, exact i32 accumulation) and the per-token
//! activation quantizer.

use super::gemm::{choose_path, launch_or_estimate, Path};
use super::*;
use crate::launch::{absent, check_input, expect_shape, shape_err};
use kiln_runtime::{DType, Error, Result, Tensor};

/// Output dtypes [`w8a8`] can write.
pub const W8A8_OUT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `y[m, n] = sx[m] sw[n] sum_k xq[m, k] wq[n, k] (+ bias[n])`: `xq` i8 `[M, K]`,
/// `sx` f32 `[M]`, `wq` i8 `[N, K]`, `sw` f32 `[N]`, `bias` f32 `[N]`; y `[M, N]` in
/// `out_dtype` (f32, f16, or bf16 where the device has it). The kernel is the
/// autotuner's choice ([`w8a8_on`] picks one).
pub fn w8a8(
    xq: &Tensor,
    sx: &Tensor,
    wq: &Tensor,
    sw: &Tensor,
    bias: Option<&Tensor>,
    out_dtype: DType,
) -> Result<Tensor> {
    w8a8_on(xq, sx, wq, sw, bias, out_dtype, None)
}

/// [`w8a8`] on the caller's `path` (`None`: the autotuner's choice). A path the problem
/// does not have is refused by name (tensor cores on a device without int8 ones, or K not
/// a multiple of 16: `Error::Unsupported`; the direct kernel where K is not a multiple of
/// 4, the GEMV past 64 rows: `Error::Param`). An empty product (M or N of 0) runs no
/// kernel and returns its empty `y` whatever the path.
pub fn w8a8_on(
    xq: &Tensor,
    sx: &Tensor,
    wq: &Tensor,
    sw: &Tensor,
    bias: Option<&Tensor>,
    out_dtype: DType,
    path: Option<Path>,
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
    // Products of int8 codes are at most 2^14 in magnitude: their i32 sum is exact (and
    // cannot wrap) for K < 2^17.
    if k >= MAX_W8A8_K {
        return Err(shape_err(
            "xq",
            format!("[M, K] with K < {MAX_W8A8_K} (the i32 accumulator of int8 products)"),
            xq.shape(),
        ));
    }
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
        // The fields every W8A8 kernel's arguments share, then its own.
        macro_rules! args {
            ($args:ident { $($own:tt)* }) => {
                $args {
                    xq: &xw,
                    sx,
                    wq: &ww,
                    sw,
                    bias: b,
                    y: &y,
                    m: mu,
                    n: nu,
                    k: ku,
                    has_bias: bias.is_some(),
                    $($own)*
                }
            };
        }
        let device = client.report();
        let shape = cost::Shape {
            m,
            n,
            x_bytes: 1.0,
            weights: cost::Weights::W8a8,
        };
        let s = &shape;
        // A path's estimate (`estimate_only`) or its tuned launch.
        let run_path = |path: Path, estimate_only: bool| match path {
            Path::Gemv => {
                let mt = mu.next_power_of_two().min(8);
                launch_or_estimate!(
                    W8a8Gemv,
                    client,
                    0.0,
                    args!(W8a8GemvArgs { mt }),
                    |c: &_| cost::w8a8_gemv(c, mt, s, device),
                    estimate_only
                )
            }
            Path::Tiled => launch_or_estimate!(
                W8a8Gemm,
                client,
                0.0,
                args!(W8a8GemmArgs {}),
                |c: &_| cost::w8a8_gemm(c, s, device),
                estimate_only
            ),
            Path::Direct => launch_or_estimate!(
                W8a8Direct,
                client,
                0.0,
                args!(W8a8DirectArgs {}),
                |c: &_| cost::w8a8_direct(c, s, device),
                estimate_only
            ),
            // Tensor cores exist on GPUs only, where the model does not apply.
            Path::TensorCore => launch_or_estimate!(
                W8a8Cmma,
                client,
                0.0,
                args!(W8a8CmmaArgs {}),
                |_: &_| 0.0,
                estimate_only
            ),
        };
        let launch = |p: Path| run_path(p, false).map(drop);
        let sources = [
            W8a8Gemv::source_hash(),
            W8a8Gemm::source_hash(),
            W8a8Direct::source_hash(),
            W8a8Cmma::source_hash(),
        ];
        // The direct kernel reads whole words of a row: rows must start on one. Its
        // presence is part of the key (K is bucketed, so K = 4094 and 4096 share one),
        // and so is the int8 tensor-core kernel's (K a multiple of 16, and the device's
        // s8 fragments).
        let aligned = k % 4 == 0;
        let problem = W8a8CmmaProblem {
            m: mu,
            n: nu,
            k: ku,
            has_bias: bias.is_some(),
        };
        let tensor_cores = !W8a8Cmma::space(client, &problem).is_empty();
        let mut more = Vec::new();
        if aligned {
            more.push(Path::Direct);
        }
        if tensor_cores {
            more.push(Path::TensorCore);
        }
        let extra = [
            ("k_words", aligned.to_string()),
            ("int8_tensor_cores", tensor_cores.to_string()),
        ];
        let estimate = |p| run_path(p, true).unwrap_or(f64::INFINITY);
        let path = choose_path(
            &y,
            "w8a8_path",
            &sources,
            [m, n, k],
            &extra,
            &more,
            path,
            estimate,
            |p| launch(p).map(|_| y.clone()),
        )?;
        launch(path)?;
    }
    Ok(y)
}

/// W8A8's K is below this: `K 2^14 <= 2^31` keeps its i32 sums exact.
pub const MAX_W8A8_K: usize = 1 << 17;

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
    if k == 0 {
        // Every row is empty: scale 0, as for an all-zero row.
        return Ok((xq, Tensor::zeros(client, DType::F32, &[m])?));
    }
    let sx = Tensor::empty(client, DType::F32, &[m])?;
    if m > 0 && k > 0 {
        TokenScale::tuned(
            client,
            0.0,
            &TokenScaleArgs {
                x,
                sx: &sx,
                rows: m as u32,
                cols: k as u32,
            },
        )?;
        let len = m * k;
        TokenQuantize::tuned(
            client,
            0.0,
            &TokenQuantizeArgs {
                x,
                sx: &sx,
                xq: &xq.as_words(),
                len: len as u32,
                cols: k as u32,
                words: len.div_ceil(4) as u32,
            },
        )?;
    }
    Ok((xq, sx))
}
