//! Launching a dequantizing GEMM: the output, the operands, and the autotuned choice
//! between the GEMV, the tiled and the direct kernel (shared by W4A16, `w8_bits` and,
//! GEMV or tiled, W8A8).

use super::*;
use crate::launch::{check_input, shape_err};
use kiln_runtime::tune::Choice;
use kiln_runtime::{DType, Result, Tensor};

/// Checks x `[..., K]` and allocates y `[..., N]`; returns the row count M.
pub(super) fn gemm_output(x: &Tensor, k: usize, n: usize) -> Result<(usize, Tensor)> {
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
pub(super) struct Operands<'a> {
    pub(super) x: &'a Tensor,
    pub(super) qweight: Tensor,
    pub(super) scales: &'a Tensor,
    pub(super) zeros: &'a Tensor,
    pub(super) g_idx: &'a Tensor,
    pub(super) y: &'a Tensor,
    /// M, N, K, group size.
    pub(super) dims: [usize; 4],
    pub(super) shift: u32,
    pub(super) wkind: WeightKind,
    pub(super) act_order: bool,
}

/// Which kernel computes a dequantizing GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum Path {
    Gemv,
    Tiled,
    /// Register tiles from global memory (`qgemm_direct`, `w8a8_direct`).
    Direct,
    /// Tensor cores (`qgemm_cmma`; devices that have them, f16/bf16 activations).
    TensorCore,
}

/// The GEMV and tiled kernels sum in different orders: a sanity bound.
pub(super) const PATH_TOLERANCE: f64 = 1e-2;
/// Candidates of one kernel differ in the split of K: a sanity bound.
pub(super) const KERNEL_TOLERANCE: f64 = 1e-2;

impl Operands<'_> {
    pub(super) fn run(&self) -> Result<()> {
        let [m, n, k, _] = self.dims;
        let sources = [
            QgemmGemv::source_hash(),
            QgemmTiled::source_hash(),
            QgemmDirect::source_hash(),
            QgemmCmma::source_hash(),
        ];
        // The direct kernel reads rows of x in 4-wide vectors: rows must start on one
        // (always for int4, whose K is a multiple of 8). Its presence is part of the key
        // (K is bucketed, so K = 4094 and 4096 share one).
        let aligned = k % 4 == 0;
        let extra = [
            ("wkind", self.wkind.to_string()),
            ("act_order", self.act_order.to_string()),
            ("k_vectors", aligned.to_string()),
        ];
        let mut more = match aligned {
            true => vec![Path::Direct],
            false => vec![],
        };
        if self.tensor_cores() {
            more.push(Path::TensorCore);
        }
        let path = choose_path(
            self.y,
            "qgemm_path",
            &sources,
            [m, n, k],
            &extra,
            &more,
            |p| self.launch(p).map(|_| self.y.clone()),
        )?;
        self.launch(path)
    }

    /// Whether the tensor-core kernel has a configuration for this device and the
    /// activations are half precision (its only dtypes).
    fn tensor_cores(&self) -> bool {
        if !matches!(self.x.dtype(), DType::F16 | DType::BF16) {
            return false;
        }
        let [m, n, k, g] = self.dims.map(|d| d as u32);
        let problem = QgemmCmmaProblem {
            m,
            n,
            k,
            group_size: g,
            shift: self.shift,
            wkind: self.wkind,
            act_order: self.act_order,
        };
        !QgemmCmma::space(self.x.client(), &problem).is_empty()
    }

    pub(super) fn launch(&self, path: Path) -> Result<()> {
        let client = self.x.client();
        let [m, n, k, g] = self.dims.map(|d| d as u32);
        // The fields every dequantizing kernel's arguments share, then its own.
        macro_rules! args {
            ($args:ident { $($own:tt)* }) => {
                $args {
                    x: self.x,
                    qweight: &self.qweight,
                    scales: self.scales,
                    zeros: self.zeros,
                    g_idx: self.g_idx,
                    y: self.y,
                    m,
                    n,
                    k,
                    group_size: g,
                    shift: self.shift,
                    wkind: self.wkind,
                    act_order: self.act_order,
                    $($own)*
                }
            };
        }
        match path {
            Path::Gemv => QgemmGemv::tuned(
                client,
                KERNEL_TOLERANCE,
                &args!(QgemmGemvArgs {
                    mt: m.next_power_of_two().min(8),
                }),
            )
            .map(drop),
            Path::Direct => {
                QgemmDirect::tuned(client, KERNEL_TOLERANCE, &args!(QgemmDirectArgs {})).map(drop)
            }
            Path::Tiled => {
                QgemmTiled::tuned(client, KERNEL_TOLERANCE, &args!(QgemmTiledArgs {})).map(drop)
            }
            Path::TensorCore => {
                QgemmCmma::tuned(client, KERNEL_TOLERANCE, &args!(QgemmCmmaArgs {})).map(drop)
            }
        }
    }
}

/// The autotuner's choice among the GEMV, the tiled and the caller's `more` paths
/// (direct, tensor cores: those it has for this problem) of a GEMM writing `y` (the
/// GEMV tried for M <= [`GEMV_MAX_ROWS`] only), keyed by the kernels' sources, bucketed M, N, K, y's
/// dtype and `extra` key parts. `run` launches one path.
pub(super) fn choose_path(
    y: &Tensor,
    name: &'static str,
    sources: &[String],
    [m, n, k]: [usize; 3],
    extra: &[(&str, String)],
    more: &[Path],
    run: impl Fn(Path) -> Result<Tensor>,
) -> Result<Path> {
    let mut paths = Vec::new();
    if m <= GEMV_MAX_ROWS {
        paths.push(Path::Gemv);
    }
    paths.push(Path::Tiled);
    paths.extend_from_slice(more);
    let mut choice = Choice::new(name)
        .sources(sources)
        .dim("m", m)
        .dim("n", n)
        .dim("k", k)
        .exact("dtype", y.dtype());
    for (part, value) in extra {
        choice = choice.exact(part, value);
    }
    choice.candidates(paths).tune(
        y.client(),
        PATH_TOLERANCE,
        |p| format!("{p:?}").to_lowercase(),
        |&p| Ok(vec![run(p)?]),
    )
}
