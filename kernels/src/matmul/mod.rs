//! Fused GEMM: `c = epilogue(a @ b)`.
//!
//! Spec: `a` [M, K], `b` [K, N] row-major (or [N, K] with `trans_b`), f32 or f16 (bf16
//! where the device has it), accumulation in f32. Epilogue, fused before the single
//! store: `+ bias[n]`, then an activation (none, silu, gelu-tanh), then `+ residual[m, n]`.
//! Output `c` [M, N] in a's dtype.
//!
//! Kernel: one cube computes a BM x BN tile of `c`; each of its (BM/TM)(BN/TN) units keeps a
//! TM x TN register tile (rows and columns strided across units, see the kernel). The K loop stages BK-deep slices of `a` (stored k-major) and `b` in
//! shared memory, zero-filled past the matrix edges, so ragged M, N, K need no special
//! cases. This is the scalar-FMA path every device runs (lavapipe has no tensor cores);
//! BM, BN, BK, TM, TN are chosen by the autotuner per device and bucketed shape.

pub mod selftest;

use crate::launch::check_input;
use serde::{Deserialize, Serialize};

mod cmma;
pub mod reference;
mod registry;
mod tiled;
mod vec4;
pub use cmma::{
    MatmulCmma, MatmulCmmaArgs, MatmulCmmaConfig, MatmulCmmaProblem, MATMUL_CMMA_KERNEL,
};
use kiln_runtime::{shape_str, tune::Choice, Client, DType, Error, Result, Tensor};
pub use registry::MATMUL;
use tiled::{clamped_strided, store_epilogue};
pub use tiled::{
    MatmulTiled, MatmulTiledArgs, MatmulTiledConfig, MatmulTiledProblem, MATMUL_TILED_KERNEL,
};
pub use vec4::{
    MatmulVec4, MatmulVec4Args, MatmulVec4Config, MatmulVec4Problem, MATMUL_VEC4_KERNEL,
};

/// The arguments every `matmul` kernel takes (their `*Args` structs have the same
/// fields): `c` allocated, absent epilogue tensors bound to `a` and never read (their
/// flag is off).
macro_rules! matmul_args {
    ($args:ident, $a:expr, $b:expr, $c:expr, $p:expr, $ep:expr) => {
        $args {
            a: $a,
            b: $b,
            bias: $ep.bias.unwrap_or($a),
            residual: $ep.residual.unwrap_or($a),
            c: $c,
            m: $p.m as u32,
            n: $p.n as u32,
            k: $p.k as u32,
            trans_b: $p.trans_b,
            has_bias: $ep.bias.is_some(),
            has_residual: $ep.residual.is_some(),
            act: $ep.activation,
        }
    };
}

/// The problem every `matmul` kernel's `space` reads (their `*Problem` structs have the
/// same fields).
macro_rules! matmul_problem {
    ($problem:ident, $p:expr, $ep:expr) => {
        $problem {
            m: $p.m as u32,
            n: $p.n as u32,
            k: $p.k as u32,
            trans_b: $p.trans_b,
            has_bias: $ep.bias.is_some(),
            has_residual: $ep.residual.is_some(),
            act: $ep.activation,
        }
    };
}

// ---------------------------------------------------------------- host API

kiln_runtime::comptime_enum! {
    /// The activation applied in the epilogue, after the bias (a `#[comptime]`
    /// specialisation of the matmul kernels).
    pub enum Activation {
        None = "none",
        /// `x * sigmoid(x)`.
        Silu = "silu",
        /// GELU, tanh approximation.
        Gelu = "gelu",
    }
}

impl Activation {
    /// Parses `none`, `silu` or `gelu`; the error names the `activation` parameter.
    pub fn parse(s: &str) -> Result<Self> {
        s.parse().map_err(|_| Error::Param {
            param: "activation".into(),
            expected: <Activation as kiln_runtime::ComptimeParam>::VALUES.into(),
            found: s.into(),
        })
    }
}

/// What is fused after the product.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// `[N]`, added to every row.
    pub bias: Option<&'a Tensor>,
    /// Applied after the bias.
    pub activation: Activation,
    /// `[M, N]`, added last.
    pub residual: Option<&'a Tensor>,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Epilogue {
            bias: None,
            activation: Activation::None,
            residual: None,
        }
    }
}

/// One tile configuration (the autotuner's search space): `BM x BN` of `c` per cube,
/// `TM x TN` per unit, `BK`-deep K slices staged in shared memory (`STAGE = 1`, the GPU
/// path), staged with b's slice and the accumulators as 4-wide vectors (`STAGE = 2`,
/// `VEC = 4`: vector loads and vector FMAs), or read by each unit straight from global
/// memory (`STAGE = 0`: no barriers; `STAGE = 3`: the same with 4-wide vector
/// accumulators). With `STAGE = 1`, `VEC` is how many consecutive elements a unit
/// stages per step.
pub type TileConfig = MatmulTiledConfig;

/// Units per cube of a configuration.
pub fn units(c: &TileConfig) -> u32 {
    (c.BM / c.TM) * (c.BN / c.TN)
}

/// Every configuration of the kernel's declared list that fits `client`'s device.
pub fn space(client: &Client) -> Vec<TileConfig> {
    // The declared list pruned by the device alone: the smallest problem, plain epilogue.
    let smallest = MatmulTiledProblem {
        m: 1,
        n: 1,
        k: 1,
        ..Default::default()
    };
    MatmulTiled::space(client, &smallest)
}

/// The candidates for a problem on a device: the declared configurations pruned by
/// device limits (units per cube, shared memory, in the kernel's `require`), then by
/// the shape: tiles more than twice the matrix (over 3/4 of the tile idle) are dropped,
/// unless that leaves nothing, in which case the least wasteful tiles stay.
pub fn candidates(client: &Client, m: usize, n: usize) -> Vec<TileConfig> {
    snug(space(client), |c| (c.BM, c.BN), m, n)
}

/// Tiles (`BM x BN` by `tile`) at most twice the matrix, or the least wasteful ones.
fn snug<T: Copy>(fits: Vec<T>, tile: impl Fn(&T) -> (u32, u32), m: usize, n: usize) -> Vec<T> {
    let waste = |c: &T| {
        let (bm, bn) = tile(c);
        let rows = (bm as usize).div_ceil(m.max(1)).max(1);
        let cols = (bn as usize).div_ceil(n.max(1)).max(1);
        rows * cols
    };
    let close: Vec<T> = fits
        .iter()
        .copied()
        .filter(|c| {
            let (bm, bn) = tile(c);
            (bm as usize) <= 2 * m && (bn as usize) <= 2 * n
        })
        .collect();
    if !close.is_empty() {
        return close;
    }
    let least = fits.iter().map(waste).min().unwrap_or(0);
    fits.into_iter().filter(|c| waste(c) <= least * 2).collect()
}

/// `c = epilogue(a @ b)` with `b` [K, N] (`trans_b = false`) or [N, K] (`true`).
pub fn matmul(a: &Tensor, b: &Tensor, trans_b: bool, ep: Epilogue<'_>) -> Result<Tensor> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    let client = a.client();
    if p.m == 0 || p.n == 0 {
        return Tensor::empty(client, a.dtype(), &[p.m, p.n]);
    }
    // Configurations differ in summation order only: a few roundings of the sum of |a||b|.
    let tolerance = 8.0 * a.dtype().epsilon() * (p.k as f64).sqrt().max(1.0);
    // The scalar-FMA tiles first (the reference every candidate is checked against),
    // then the 4-wide vector tiles where K and N are multiples of 4, then the
    // tensor-core kernel where the device has tensor cores and the dtype is half.
    let vec4 = MatmulVec4::space(client, &matmul_problem!(MatmulVec4Problem, p, ep));
    let cmma = if matches!(a.dtype(), DType::F16 | DType::BF16) {
        MatmulCmma::space(client, &matmul_problem!(MatmulCmmaProblem, p, ep))
    } else {
        Vec::new()
    };
    let cfg = Choice::new("matmul")
        .sources([
            MatmulTiled::source_hash(),
            MatmulCmma::source_hash(),
            MatmulVec4::source_hash(),
        ])
        .dim("m", p.m)
        .dim("n", p.n)
        .dim("k", p.k)
        .exact("dtype", a.dtype())
        .exact("trans_b", trans_b)
        .candidates(candidates(client, p.m, p.n).into_iter().map(Candidate::Fma))
        .candidates(
            snug(vec4, |c| (c.BM, c.BN), p.m, p.n)
                .into_iter()
                .map(Candidate::Vec4),
        )
        .candidates(cmma.into_iter().map(Candidate::Cmma))
        .tune(client, tolerance, Candidate::label, |c| {
            c.launch(a, b, &p, &ep).map(|t| vec![t])
        })?;
    cfg.launch(a, b, &p, &ep)
}

/// A candidate of the `matmul` autotuner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Candidate {
    /// The scalar-FMA register-tile kernel.
    Fma(TileConfig),
    /// The tensor-core kernel.
    Cmma(MatmulCmmaConfig),
    /// The 4-wide vector kernel (K and N multiples of 4).
    Vec4(MatmulVec4Config),
}

impl Candidate {
    fn label(&self) -> String {
        match self {
            Candidate::Fma(c) => MatmulTiled::label(c),
            Candidate::Cmma(c) => format!("cmma {}", MatmulCmma::label(c)),
            Candidate::Vec4(c) => format!("vec4 {}", MatmulVec4::label(c)),
        }
    }

    fn launch(&self, a: &Tensor, b: &Tensor, p: &Problem, ep: &Epilogue<'_>) -> Result<Tensor> {
        match self {
            Candidate::Fma(cfg) => launch(a, b, p, ep, *cfg),
            Candidate::Cmma(cfg) => launch_into(a, b, p, ep, cfg),
            Candidate::Vec4(cfg) => launch_into(a, b, p, ep, cfg),
        }
    }
}

/// `matmul` with a fixed tile configuration (no tuning): for benchmarks and tests.
pub fn matmul_with(
    a: &Tensor,
    b: &Tensor,
    trans_b: bool,
    ep: Epilogue<'_>,
    cfg: TileConfig,
) -> Result<Tensor> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    if !space(a.client()).contains(&cfg) {
        return Err(Error::Param {
            param: "tile".into(),
            expected: "one of matmul's declared configurations that fits the device".into(),
            found: MatmulTiled::label(&cfg),
        });
    }
    launch(a, b, &p, &ep, cfg)
}

/// `matmul` with a fixed configuration of the 4-wide vector kernel (K and N multiples
/// of 4; no tuning): for benchmarks and tests.
pub fn matmul_vec4_with(
    a: &Tensor,
    b: &Tensor,
    trans_b: bool,
    ep: Epilogue<'_>,
    cfg: MatmulVec4Config,
) -> Result<Tensor> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    launch_into(a, b, &p, &ep, &cfg)
}

struct Problem {
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
}

impl Problem {
    fn check(a: &Tensor, b: &Tensor, trans_b: bool, ep: &Epilogue<'_>) -> Result<Problem> {
        let client = a.client();
        check_input("a", a, client)?;
        check_input("b", b, client)?;
        let (&[m, k], rank_b) = (a.shape(), b.rank()) else {
            return Err(Error::Shape {
                tensor: "a".into(),
                expected: "[M, K]".into(),
                found: shape_str(a.shape()),
            });
        };
        let same_dtype = |name: &str, t: &Tensor| {
            if t.dtype() == a.dtype() {
                Ok(())
            } else {
                Err(Error::DType {
                    tensor: name.into(),
                    expected: format!("{} (a's dtype)", a.dtype()),
                    found: t.dtype().name().into(),
                })
            }
        };
        same_dtype("b", b)?;
        let n = match (b.shape(), trans_b) {
            (&[kb, n], false) if kb == k => n,
            (&[n, kb], true) if kb == k => n,
            _ => {
                let want = if trans_b {
                    format!("[N, {k}] (trans_b)")
                } else {
                    format!("[{k}, N]")
                };
                let _ = rank_b;
                return Err(Error::Shape {
                    tensor: "b".into(),
                    expected: want,
                    found: shape_str(b.shape()),
                });
            }
        };
        if let Some(bias) = ep.bias {
            check_input("bias", bias, client)?;
            same_dtype("bias", bias)?;
            if bias.shape() != [n] {
                return Err(Error::Shape {
                    tensor: "bias".into(),
                    expected: format!("[{n}]"),
                    found: shape_str(bias.shape()),
                });
            }
        }
        if let Some(res) = ep.residual {
            check_input("residual", res, client)?;
            same_dtype("residual", res)?;
            if res.shape() != [m, n] {
                return Err(Error::Shape {
                    tensor: "residual".into(),
                    expected: format!("[{m}, {n}]"),
                    found: shape_str(res.shape()),
                });
            }
        }
        if m * n > crate::launch::MAX_ELEMENTS {
            return Err(Error::Shape {
                tensor: "c".into(),
                expected: "at most 2^31 - 1 elements".into(),
                found: format!("[{m}, {n}]"),
            });
        }
        Ok(Problem { m, n, k, trans_b })
    }
}

fn launch(
    a: &Tensor,
    b: &Tensor,
    p: &Problem,
    ep: &Epilogue<'_>,
    cfg: TileConfig,
) -> Result<Tensor> {
    let gx = p.n.div_ceil(cfg.BN as usize);
    let gy = p.m.div_ceil(cfg.BM as usize);
    if gx > 65_535 || gy > 65_535 {
        return Err(Error::Shape {
            tensor: "c".into(),
            expected: format!("at most 65535 tiles of {}x{} per dimension", cfg.BM, cfg.BN),
            found: format!("[{}, {}]", p.m, p.n),
        });
    }
    launch_into(a, b, p, ep, &cfg)
}

/// Allocates `c` and launches one of the `matmul` kernels with `cfg` on the operands
/// and the epilogue.
fn launch_into<C: KernelChoice>(
    a: &Tensor,
    b: &Tensor,
    p: &Problem,
    ep: &Epilogue<'_>,
    cfg: &C,
) -> Result<Tensor> {
    let c = Tensor::empty(a.client(), a.dtype(), &[p.m, p.n])?;
    cfg.launch(a.client(), a, b, &c, p, ep)?;
    Ok(c)
}

/// A configuration of one of the `matmul` kernels, which launches that kernel.
trait KernelChoice {
    fn launch(
        &self,
        client: &Client,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        p: &Problem,
        ep: &Epilogue<'_>,
    ) -> Result<()>;
}

/// `KernelChoice` for a kernel's configuration type: it launches that kernel.
macro_rules! kernel_choice {
    ($($config:ty => $kernel:ident, $args:ident;)*) => {$(
        impl KernelChoice for $config {
            fn launch(
                &self,
                client: &Client,
                a: &Tensor,
                b: &Tensor,
                c: &Tensor,
                p: &Problem,
                ep: &Epilogue<'_>,
            ) -> Result<()> {
                $kernel::launch(client, self, &matmul_args!($args, a, b, c, p, ep))
            }
        }
    )*};
}

kernel_choice! {
    TileConfig => MatmulTiled, MatmulTiledArgs;
    MatmulCmmaConfig => MatmulCmma, MatmulCmmaArgs;
    MatmulVec4Config => MatmulVec4, MatmulVec4Args;
}
