//! Launching a dequantizing GEMM: the output, the operands, and the autotuned choice
//! between the GEMV, the tiled and the direct kernel (shared by W4A16, `w8_bits` and,
//! GEMV or tiled, W8A8).

use super::*;
use crate::launch::{check_input, shape_err};
use kiln_runtime::tune::Choice;
use kiln_runtime::{DType, Result, Tensor};

/// One path's kernel (a `#[kiln::kernel]` host type) with its arguments and cost model
/// (`|config| estimate`): with `estimate_only` the model's estimate of its best
/// configuration for these arguments, else its launch, tuned (ranked by the model where
/// it applies: `cost::applies`); `Ok(0.0)` then.
macro_rules! launch_or_estimate {
    ($kernel:ident, $client:expr, $tolerance:expr, $args:expr, $cost:expr, $estimate_only:expr) => {{
        let (client, args, cost) = ($client, $args, $cost);
        if $estimate_only {
            let space = $kernel::space(client, &args.problem());
            Ok($crate::qgemm::cost::best(space.iter().map(&cost)))
        } else {
            let modelled = $crate::qgemm::cost::applies(client.report());
            let ranked: Option<&dyn Fn(&_) -> f64> = modelled.then_some(&cost);
            $kernel::tuned_ranked(client, $tolerance, &args, ranked).map(|_| 0.0)
        }
    }};
}
pub(super) use launch_or_estimate;

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
    /// The caller's path (`None`: the autotuner's choice).
    pub(super) path: Option<Path>,
}

/// Which kernel computes a quantized GEMM (the autotuner's `qgemm_path` / `w8a8_path`
/// decision, or the caller's: `kiln run w4a16|w8_bits|w8a8 --set path=..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Path {
    /// Few rows: split-K GEMV (`qgemm_gemv`, `w8a8_gemv`; M <= [`GEMV_MAX_ROWS`]).
    Gemv,
    /// Shared-memory tiles (`qgemm_tiled`, `w8a8_gemm`).
    Tiled,
    /// Register tiles from global memory (`qgemm_direct`, `w8a8_direct`).
    Direct,
    /// Tensor cores (`qgemm_cmma`: f16/bf16 activations, W4A16 and `w8_bits`;
    /// `w8a8_cmma`: int8 tensor cores, K a multiple of 16), on devices that have them.
    TensorCore,
}

pinnable_by_name!(Path, "path", {
    Gemv => "gemv",
    Tiled => "tiled",
    Direct => "direct",
    TensorCore => "tensor_cores",
});

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
            self.path,
            |p| self.estimate(p),
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

    /// Whether int8 columns are read four to a word (`qgemm_direct`'s `col_words`: rows
    /// of the weight start on a word).
    fn col_words(&self) -> bool {
        self.wkind == WeightKind::Int8Bits && self.dims[1].is_multiple_of(4)
    }

    /// The problem as the cost model sees it.
    fn cost_shape(&self) -> cost::Shape {
        cost::Shape {
            m: self.dims[0],
            n: self.dims[1],
            x_bytes: self.x.dtype().size() as f64,
            weights: (self.wkind, self.act_order, self.col_words()).into(),
        }
    }

    pub(super) fn launch(&self, path: Path) -> Result<()> {
        self.launch_or_estimate(path, false).map(drop)
    }

    /// The cost model's estimate of `path` (its best configuration's).
    fn estimate(&self, path: Path) -> f64 {
        self.launch_or_estimate(path, true).unwrap_or(f64::INFINITY)
    }

    /// Launches `path`'s kernel, tuned (ranked by the cost model where it applies), or
    /// with `estimate_only` returns the model's estimate of its best configuration.
    fn launch_or_estimate(&self, path: Path, estimate_only: bool) -> Result<f64> {
        let client = self.x.client();
        let device = client.report();
        let s = self.cost_shape();
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
        macro_rules! path {
            ($kernel:ident, $args:expr, $cost:expr) => {
                launch_or_estimate!(
                    $kernel,
                    client,
                    KERNEL_TOLERANCE,
                    $args,
                    $cost,
                    estimate_only
                )
            };
        }
        match path {
            Path::Gemv => {
                let mt = m.next_power_of_two().min(8);
                path!(QgemmGemv, args!(QgemmGemvArgs { mt }), |c: &_| {
                    cost::qgemm_gemv(c, mt, &s, device)
                })
            }
            Path::Direct => path!(
                QgemmDirect,
                args!(QgemmDirectArgs {
                    col_words: self.col_words(),
                }),
                |c: &_| cost::qgemm_direct(c, &s, device)
            ),
            Path::Tiled => path!(QgemmTiled, args!(QgemmTiledArgs {}), |c: &_| {
                cost::qgemm_tiled(c, &s, device)
            }),
            // Tensor cores exist on GPUs only, where the model does not apply.
            Path::TensorCore => path!(QgemmCmma, args!(QgemmCmmaArgs {}), |_: &_| 0.0),
        }
    }
}

/// The autotuner's choice among the GEMV, the tiled and the caller's `more` paths
/// (direct, tensor cores: those it has for this problem) of a GEMM writing `y` (the
/// GEMV tried for M <= [`GEMV_MAX_ROWS`] only), keyed by the kernels' sources, bucketed M, N, K, y's
/// dtype and `extra` key parts. `estimate` is the cost model's estimate of a path (its
/// best configuration's), used where the model applies (`cost::applies`); `run` launches
/// one path. `forced`: the caller's path instead (no tuning of the path), refused by name
/// where this problem does not have it.
#[allow(clippy::too_many_arguments)]
pub(super) fn choose_path(
    y: &Tensor,
    name: &'static str,
    sources: &[String],
    [m, n, k]: [usize; 3],
    extra: &[(&str, String)],
    more: &[Path],
    forced: Option<Path>,
    estimate: impl Fn(Path) -> f64,
    run: impl Fn(Path) -> Result<Tensor>,
) -> Result<Path> {
    let mut paths = Vec::new();
    if m <= GEMV_MAX_ROWS {
        paths.push(Path::Gemv);
    }
    paths.push(Path::Tiled);
    paths.extend_from_slice(more);
    if let Some(p) = forced {
        return forced_path(y, name, p, &paths, [m, n, k]);
    }
    let mut choice = Choice::new(name)
        .sources(sources)
        .dim("m", m)
        .dim("n", n)
        .dim("k", k)
        .exact("dtype", y.dtype());
    for (part, value) in extra {
        choice = choice.exact(part, value);
    }
    if cost::applies(y.client().report()) {
        let estimates: Vec<(Path, f64)> = paths.iter().map(|&p| (p, estimate(p))).collect();
        choice = choice.cost(move |p| {
            estimates
                .iter()
                .find(|(q, _)| q == p)
                .map_or(f64::INFINITY, |&(_, e)| e)
        });
    }
    choice.candidates(paths).tune(
        y.client(),
        PATH_TOLERANCE,
        |p| p.name().to_string(),
        |&p| Ok(vec![run(p)?]),
    )
}

/// The caller's `path` where the problem has it. Else tensor cores are refused as
/// unsupported (the self-test's cue that the device lacks them), the others by name
/// with the paths there are.
fn forced_path(
    y: &Tensor,
    decision: &str,
    p: Path,
    paths: &[Path],
    [m, n, k]: [usize; 3],
) -> Result<Path> {
    if paths.contains(&p) {
        return Ok(p);
    }
    let names: Vec<&str> = paths.iter().map(|q| q.name()).collect();
    if p == Path::TensorCore {
        // W8A8 runs on int8 fragments (K a multiple of 16), the dequantizing GEMMs on
        // f16/bf16 ones (half-precision activations).
        let report = y.client().report();
        let (kind, has, needs) = match decision == "w8a8_path" {
            true => ("int8 ", report.int8_tensor_cores, "K a multiple of 16"),
            false => ("", report.tensor_cores, "f16 or bf16 activations"),
        };
        return Err(kiln_runtime::Error::Unsupported {
            device: report.name.clone(),
            feature: format!(
                "{kind}tensor cores for this GEMM (path=tensor_cores needs {needs}; found \
                 M = {m}, N = {n}, K = {k} on a device that reports {}{kind}tensor cores; \
                 this problem's paths: {})",
                if has { "" } else { "no " },
                names.join(" | ")
            ),
        });
    }
    Err(kiln_runtime::Error::Param {
        param: "path".into(),
        expected: format!("auto, or a path this problem has: {}", names.join(" | ")),
        found: format!("{} (M = {m}, N = {n}, K = {k})", p.name()),
    })
}
