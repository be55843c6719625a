//! Fused GEMM: `c = epilogue(a @ b)`.
//!
//! Spec: `a` [M, K], `b` [K, N] row-major (or [N, K] with `trans_b`), f32 or f16 (bf16
//! where the device has it), accumulation in f32. Epilogue, fused before the single
//! store: `+ bias[n]`, then an activation (none, silu, gelu-tanh), then `+ residual[m, n]`.
//! Output `c` [M, N] in a's dtype.
//!
//! Kernels, all with the same arguments and the same fused epilogue, chosen per device
//! and bucketed shape by the autotuner ([`MatmulConfig`], one `Choice`):
//! - the register-tiled FMA kernels every device runs: `matmul_staged` and
//!   `matmul_staged_v4` (K slices staged in shared memory, zero-filled past the edges:
//!   the GPU path), `matmul_direct` and `matmul_direct_v4` (fragments read straight from
//!   global memory, edges clamped: the CPU-adapter path); see `tiled`;
//! - `matmul_vec4`: `a` and `b` read as 4-wide vectors (K and N multiples of 4);
//! - `matmul_gemv`: few rows (M <= 16), K split across a cube's units (see `gemv`);
//! - `matmul_cmma`: tensor cores (`wmma`), only where the device reports them.
//!
//! Ragged M, N, K need no special cases in any of them.
//!
//! Longer than most files: the host API, the candidate space over the four kernels and
//! cubek-matmul, and validation, in the order a call goes through them; each kernel is in
//! its own file.

pub mod selftest;
#[macro_use]
mod signature;

use crate::launch::check_input;
use serde::{Deserialize, Serialize};

mod cmma;
mod cost;
#[cfg(feature = "cubek")]
mod cubek;
mod direct;
mod gemv;
mod grouped_sums;
mod grouped_tn;
pub mod reference;
mod registry;
mod staged;
mod tiled;
mod vec4;
mod vec4_plane;
pub(crate) use cmma::cmma_product;
pub use cmma::{
    MatmulCmma, MatmulCmmaArgs, MatmulCmmaConfig, MatmulCmmaProblem, MATMUL_CMMA_KERNEL,
};
pub use direct::{
    MatmulDirect, MatmulDirectArgs, MatmulDirectConfig, MatmulDirectProblem, MatmulDirectV4,
    MatmulDirectV4Args, MatmulDirectV4Config, MatmulDirectV4Problem, MATMUL_DIRECT_KERNEL,
    MATMUL_DIRECT_V4_KERNEL,
};
pub use gemv::{
    MatmulGemv, MatmulGemvArgs, MatmulGemvConfig, MatmulGemvProblem, GEMV_MAX_ROWS,
    MATMUL_GEMV_KERNEL,
};
pub(crate) use grouped_sums::sum_columns_by_group;
pub use grouped_sums::{
    grouped_column_sums_with, GroupedColumnSums, GroupedColumnSumsArgs, GroupedColumnSumsConfig,
    GroupedColumnSumsProblem,
};
pub use grouped_tn::{
    grouped_matmul_tn_with, GroupedMatmulTn, GroupedMatmulTnArgs, GroupedMatmulTnConfig,
    GroupedMatmulTnProblem, GroupedMatmulTnV4, GroupedMatmulTnV4Args, GroupedMatmulTnV4Config,
    GroupedMatmulTnV4Problem, GroupedTnConfig,
};
pub(crate) use grouped_tn::{grouped_tn_product, load_v4, ColumnWindow, RowGroups};
use kiln_runtime::{shape_str, tune::Choice, Client, DType, Error, Result, Tensor};
pub use registry::MATMUL;
pub use staged::{
    MatmulStaged, MatmulStagedArgs, MatmulStagedConfig, MatmulStagedProblem, MatmulStagedV4,
    MatmulStagedV4Args, MatmulStagedV4Config, MatmulStagedV4Problem, MATMUL_STAGED_KERNEL,
    MATMUL_STAGED_V4_KERNEL,
};
pub(crate) use tiled::{
    activate, activate_vector, clamped_strided, row_first, shift_rows, zero_tile_v4,
};
use tiled::{store_epilogue, store_epilogue_v4};
pub(crate) use vec4::{dot_k_quad, fma_k_quad, pack_v4};
pub use vec4::{
    MatmulVec4, MatmulVec4Args, MatmulVec4Config, MatmulVec4Problem, MATMUL_VEC4_KERNEL,
};
pub(crate) use vec4_plane::{plane_rows, shares_rows};
pub use vec4_plane::{
    MatmulVec4Plane, MatmulVec4PlaneArgs, MatmulVec4PlaneConfig, MatmulVec4PlaneProblem,
    MATMUL_VEC4_PLANE_KERNEL,
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
        /// `max(x, 0)`.
        Relu = "relu",
    }
}

impl Activation {
    /// Parses `none`, `silu`, `gelu` or `relu`; the error names the `activation` parameter.
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

/// A configuration of one of the `matmul` kernels: what the autotuner chooses among,
/// and what [`matmul_with`] runs. The register-tiled FMA kernels (every device) are
/// described in the `tiled` module; `Vec4` reads `a` and `b` as 4-wide vectors (K and N
/// multiples of 4); `Cmma` uses tensor cores (devices that have them, half precision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatmulConfig {
    /// `matmul_staged`: K slices staged in shared memory.
    Staged(MatmulStagedConfig),
    /// `matmul_staged_v4`: staged, b's slice and the accumulators 4-wide.
    StagedV4(MatmulStagedV4Config),
    /// `matmul_direct_v4`: from global memory, 4-wide accumulators.
    DirectV4(MatmulDirectV4Config),
    /// `matmul_direct`: from global memory.
    Direct(MatmulDirectConfig),
    /// `matmul_vec4`: 4-wide vector operands.
    Vec4(MatmulVec4Config),
    /// `matmul_vec4_plane`: 4-wide vector operands, `a`'s rows shared across a plane
    /// of 8 (lavapipe).
    Vec4Plane(MatmulVec4PlaneConfig),
    /// `matmul_cmma`: tensor cores.
    Cmma(MatmulCmmaConfig),
    /// `matmul_gemv`: few rows, K split across a cube's units.
    Gemv(MatmulGemvConfig),
    /// cubek-matmul 0.2's `Strategy::Auto` (cubecl's own GEMM; plain epilogue only;
    /// cargo feature `cubek`, on by default).
    Cubek,
}

impl MatmulConfig {
    /// The kernel and its tunables, e.g. `staged BM=64 BN=64 ...` (tune tables).
    pub fn label(&self) -> String {
        match self {
            MatmulConfig::Staged(c) => format!("staged {}", MatmulStaged::label(c)),
            MatmulConfig::StagedV4(c) => format!("staged_v4 {}", MatmulStagedV4::label(c)),
            MatmulConfig::DirectV4(c) => format!("direct_v4 {}", MatmulDirectV4::label(c)),
            MatmulConfig::Direct(c) => format!("direct {}", MatmulDirect::label(c)),
            MatmulConfig::Vec4(c) => format!("vec4 {}", MatmulVec4::label(c)),
            MatmulConfig::Vec4Plane(c) => format!("vec4_plane {}", MatmulVec4Plane::label(c)),
            MatmulConfig::Cmma(c) => format!("cmma {}", MatmulCmma::label(c)),
            MatmulConfig::Gemv(c) => format!("gemv {}", MatmulGemv::label(c)),
            MatmulConfig::Cubek => "cubek-matmul Auto".into(),
        }
    }

    /// The `BM x BN` tile of `c` one cube computes (cubek's own choice: `None`).
    pub fn tile(&self) -> Option<(u32, u32)> {
        Some(match self {
            MatmulConfig::Staged(c) => (c.BM, c.BN),
            MatmulConfig::StagedV4(c) => (c.BM, c.BN),
            MatmulConfig::DirectV4(c) => (c.BM, c.BN),
            MatmulConfig::Direct(c) => (c.BM, c.BN),
            MatmulConfig::Vec4(c) => (c.BM, c.BN),
            MatmulConfig::Vec4Plane(c) => (c.BM, c.BN),
            MatmulConfig::Cmma(c) => (16 * c.FRAGS_M * c.PLANES_M, 16 * c.FRAGS_N * c.PLANES_N),
            MatmulConfig::Gemv(c) => (c.MT, c.BN),
            MatmulConfig::Cubek => return None,
        })
    }

    /// Allocates `c` and launches this configuration's kernel.
    fn launch(&self, a: &Tensor, b: &Tensor, p: &Problem, ep: &Epilogue<'_>) -> Result<Tensor> {
        let (bm, bn) = self.tile().unwrap_or((65_535, 65_535));
        if p.n.div_ceil(bn as usize) > 65_535 || p.m.div_ceil(bm as usize) > 65_535 {
            return Err(Error::Shape {
                tensor: "c".into(),
                expected: format!("at most 65535 tiles of {bm}x{bn} per dimension"),
                found: format!("[{}, {}]", p.m, p.n),
            });
        }
        let c = Tensor::empty(a.client(), a.dtype(), &[p.m, p.n])?;
        self.dispatch(a, b, &c, p, ep, true)?;
        Ok(c)
    }

    /// Compiles this configuration for the autotuner (its kernel's `warm_up`: the first
    /// cube of the grid only), so that its next launch is its run alone. cubek-matmul
    /// picks its kernel by shape inside its launch: not warmed (`false`).
    fn warm_up(&self, a: &Tensor, b: &Tensor, p: &Problem, ep: &Epilogue<'_>) -> Result<bool> {
        let c = Tensor::empty(a.client(), a.dtype(), &[p.m, p.n])?;
        self.dispatch(a, b, &c, p, ep, false)
    }

    /// Launches this configuration's kernel into `c`: the whole grid, or (not `whole`)
    /// its first cube only (see [`KernelChoice`]).
    fn dispatch(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        p: &Problem,
        ep: &Epilogue<'_>,
        whole: bool,
    ) -> Result<bool> {
        let client = a.client();
        match self {
            MatmulConfig::Staged(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::StagedV4(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::DirectV4(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Direct(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Vec4(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Vec4Plane(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Cmma(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Gemv(cfg) => cfg.launch(client, a, b, c, p, ep, whole),
            MatmulConfig::Cubek if whole => cubek_launch(a, b, c, p, ep).map(|()| true),
            MatmulConfig::Cubek => Ok(false),
        }
    }
}

/// cubek-matmul as a candidate: a plain epilogue only, and not f32 where it would round
/// the operands to TF32 (see `cubek.rs`).
fn cubek_launch(a: &Tensor, b: &Tensor, c: &Tensor, p: &Problem, ep: &Epilogue<'_>) -> Result<()> {
    if !cubek_fits(ep) {
        return Err(Error::Param {
            param: "config".into(),
            expected: "cubek-matmul only with a plain epilogue (no bias, activation or residual)"
                .into(),
            found: "an epilogue".into(),
        });
    }
    if !cubek_keeps_precision(a.client(), a.dtype()) {
        return Err(Error::Param {
            param: "config".into(),
            expected: "cubek-matmul only where it keeps f32 operands in f32 (on this device \
                       its tensor-core routines round them to TF32, a 10-bit mantissa)"
                .into(),
            found: "cubek-matmul with f32 operands".into(),
        });
    }
    #[cfg(feature = "cubek")]
    return cubek::launch(a, b, c, p);
    #[cfg(not(feature = "cubek"))]
    {
        let _ = (a, b, c, p);
        Err(Error::Unsupported {
            device: a.client().name().to_string(),
            feature: "cubek-matmul (kiln-kernels built without its `cubek` feature)".into(),
        })
    }
}

/// Whether cubek-matmul is offered: built in, and a plain epilogue.
fn cubek_fits(ep: &Epilogue<'_>) -> bool {
    cfg!(feature = "cubek")
        && ep.bias.is_none()
        && ep.residual.is_none()
        && ep.activation == Activation::None
}

/// Whether cubek-matmul computes `dtype` at kiln's precision on `client`'s device: not
/// f32 where the device has TF32. There cubek's Auto strategy stages f32 operands as TF32
/// (cubek-matmul 0.2, `adjust_dtypes`). As the first-ranked candidate it then became the
/// reference that kiln's exact f32 kernels were checked against, and they were rejected.
/// On the H200 an f32 4096 x 8 x 4096 product tuned to cubek alone.
fn cubek_keeps_precision(client: &Client, dtype: DType) -> bool {
    #[cfg(feature = "cubek")]
    return dtype != DType::F32 || !cubek::rounds_f32_to_tf32(client);
    #[cfg(not(feature = "cubek"))]
    {
        let _ = (client, dtype);
        true
    }
}

/// The register-tiled FMA kernels' configurations that fit `problem` on `client`'s
/// device, in declaration order (the first is what runs untuned).
fn fma_configs(client: &Client, p: &Problem, ep: &Epilogue<'_>) -> Vec<MatmulConfig> {
    let mut all: Vec<MatmulConfig> =
        MatmulStaged::space(client, &matmul_problem!(MatmulStagedProblem, p, ep))
            .into_iter()
            .map(MatmulConfig::Staged)
            .collect();
    all.extend(
        MatmulStagedV4::space(client, &matmul_problem!(MatmulStagedV4Problem, p, ep))
            .into_iter()
            .map(MatmulConfig::StagedV4),
    );
    all.extend(
        MatmulDirectV4::space(client, &matmul_problem!(MatmulDirectV4Problem, p, ep))
            .into_iter()
            .map(MatmulConfig::DirectV4),
    );
    all.extend(
        MatmulDirect::space(client, &matmul_problem!(MatmulDirectProblem, p, ep))
            .into_iter()
            .map(MatmulConfig::Direct),
    );
    all
}

/// Every configuration of the register-tiled FMA kernels that fits `client`'s device
/// (their requirements do not depend on the shape): the space the tests sweep.
pub fn space(client: &Client) -> Vec<MatmulConfig> {
    let smallest = Problem {
        m: 1,
        n: 1,
        k: 1,
        trans_b: false,
    };
    fma_configs(client, &smallest, &Epilogue::default())
}

/// The candidates for a problem on a device: every kernel's configurations that fit
/// the device and the problem (FMA tiles first, the reference the others are checked
/// against; then the 4-wide vector kernel's where K and N are multiples of 4; then the
/// tensor-core kernel's for half precision where the device has tensor cores), the
/// tiled ones pruned by the shape: tiles more than twice the matrix (over 3/4 of the
/// tile idle) are dropped, unless that leaves nothing.
fn candidates(client: &Client, p: &Problem, ep: &Epilogue<'_>, dtype: DType) -> Vec<MatmulConfig> {
    let mut all = snug(fma_configs(client, p, ep), p.m, p.n);
    all.extend(snug(vec4_configs(client, p, ep), p.m, p.n));
    if matches!(dtype, DType::F16 | DType::BF16) {
        all.extend(
            MatmulCmma::space(client, &matmul_problem!(MatmulCmmaProblem, p, ep))
                .into_iter()
                .map(MatmulConfig::Cmma),
        );
    }
    if p.m <= GEMV_MAX_ROWS {
        all.extend(gemv_configs(client, p, ep));
    }
    if cubek_fits(ep) && cubek_keeps_precision(client, dtype) {
        all.push(MatmulConfig::Cubek);
    }
    all
}

/// The 4-wide vector kernels' configurations that fit the device and the problem.
fn vec4_configs(client: &Client, p: &Problem, ep: &Epilogue<'_>) -> Vec<MatmulConfig> {
    let vec4 = MatmulVec4::space(client, &matmul_problem!(MatmulVec4Problem, p, ep));
    let plane = MatmulVec4Plane::space(client, &matmul_problem!(MatmulVec4PlaneProblem, p, ep));
    (vec4.into_iter().map(MatmulConfig::Vec4))
        .chain(plane.into_iter().map(MatmulConfig::Vec4Plane))
        .collect()
}

/// The split-K kernel's configurations that fit the device and the problem (any M;
/// `candidates` offers them up to [`GEMV_MAX_ROWS`] rows).
fn gemv_configs(client: &Client, p: &Problem, ep: &Epilogue<'_>) -> Vec<MatmulConfig> {
    MatmulGemv::space(client, &matmul_problem!(MatmulGemvProblem, p, ep))
        .into_iter()
        .map(MatmulConfig::Gemv)
        .collect()
}

/// Configurations whose tile is at most twice the matrix, or the least wasteful ones.
fn snug(fits: Vec<MatmulConfig>, m: usize, n: usize) -> Vec<MatmulConfig> {
    let waste = |c: &MatmulConfig| {
        let (bm, bn) = c.tile().unwrap_or((1, 1));
        let rows = (bm as usize).div_ceil(m.max(1)).max(1);
        let cols = (bn as usize).div_ceil(n.max(1)).max(1);
        rows * cols
    };
    let close: Vec<MatmulConfig> = fits
        .iter()
        .copied()
        .filter(|c| {
            let (bm, bn) = c.tile().unwrap_or((1, 1));
            (bm as usize) <= 2 * m && (bn as usize) <= 2 * n
        })
        .collect();
    if !close.is_empty() {
        return close;
    }
    let least = fits.iter().map(waste).min().unwrap_or(0);
    fits.into_iter().filter(|c| waste(c) <= least * 2).collect()
}

/// The configurations the autotuner times for these operands, in order (the first is
/// what runs untuned, and the reference the others are checked against).
pub fn candidates_for(
    a: &Tensor,
    b: &Tensor,
    trans_b: bool,
    ep: Epilogue<'_>,
) -> Result<Vec<MatmulConfig>> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    Ok(candidates(a.client(), &p, &ep, a.dtype()))
}

/// Which of `matmul`'s kernels the autotuner may choose among (`kiln run matmul`'s
/// `kernel` parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelFamily {
    /// Every kernel that fits the device and the problem (the default).
    #[default]
    Auto,
    /// Only the tensor-core tiles (`matmul_cmma`): f16/bf16, K (and N unless `trans_b`)
    /// a multiple of 8, on a device that reports tensor cores; refused elsewhere
    /// ([`Error::Unsupported`], its feature naming tensor cores).
    TensorCores,
    /// Only kiln's FMA kernels (register tiles, vector tiles, split-K): f32 accumulation
    /// in kiln's own order on every device, no tensor cores and no cubek.
    Fma,
}

impl KernelFamily {
    /// `auto`, `tensor_cores` or `fma`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KernelFamily::Auto),
            "tensor_cores" => Ok(KernelFamily::TensorCores),
            "fma" => Ok(KernelFamily::Fma),
            _ => Err(Error::Param {
                param: "kernel".into(),
                expected: "auto | tensor_cores | fma".into(),
                found: s.into(),
            }),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            KernelFamily::Auto => "auto",
            KernelFamily::TensorCores => "tensor_cores",
            KernelFamily::Fma => "fma",
        }
    }

    /// Whether `c` belongs to this family.
    fn admits(self, c: &MatmulConfig) -> bool {
        match self {
            KernelFamily::Auto => true,
            KernelFamily::TensorCores => matches!(c, MatmulConfig::Cmma(_)),
            KernelFamily::Fma => !matches!(c, MatmulConfig::Cmma(_) | MatmulConfig::Cubek),
        }
    }
}

/// `c = epilogue(a @ b)` with `b` [K, N] (`trans_b = false`) or [N, K] (`true`).
pub fn matmul(a: &Tensor, b: &Tensor, trans_b: bool, ep: Epilogue<'_>) -> Result<Tensor> {
    matmul_among(a, b, trans_b, ep, KernelFamily::Auto)
}

/// [`matmul`] with the autotuner choosing only among `family`'s kernels (tuned and
/// cached apart from the default's choice).
pub fn matmul_among(
    a: &Tensor,
    b: &Tensor,
    trans_b: bool,
    ep: Epilogue<'_>,
    family: KernelFamily,
) -> Result<Tensor> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    let client = a.client();
    // An output the device cannot hold is refused first: before the zeros of the K = 0
    // path are built, and before candidates fail one by one on their grids.
    client.require_buffer(
        "output",
        p.m.saturating_mul(p.n).saturating_mul(a.dtype().size()),
    )?;
    if p.m == 0 || p.n == 0 {
        return Tensor::empty(client, a.dtype(), &[p.m, p.n]);
    }
    if p.k == 0 {
        // An empty sum is 0, so c is the epilogue of zeros. The kernels bind every
        // operand and the backends refuse zero-length bindings: a K of one zero stands
        // in (exact: 0 x 0 = 0).
        let zeros = |shape: &[usize]| Tensor::zeros(client, a.dtype(), shape);
        // Eight: the tensor-core tiles read K in vectors of 8.
        let kz = if family == KernelFamily::TensorCores {
            8
        } else {
            1
        };
        let za = zeros(&[p.m, kz])?;
        let zb = zeros(&if trans_b { [p.n, kz] } else { [kz, p.n] })?;
        return matmul_among(&za, &zb, trans_b, ep, family);
    }
    // Configurations differ in summation order only: a few roundings of the sum of |a||b|.
    let tolerance = 8.0 * a.dtype().epsilon() * (p.k as f64).sqrt().max(1.0);
    let cands: Vec<MatmulConfig> = candidates(client, &p, &ep, a.dtype())
        .into_iter()
        .filter(|c| family.admits(c))
        .collect();
    if cands.is_empty() {
        return Err(Error::Unsupported {
            device: client.name().to_string(),
            feature: format!(
                "tensor cores for this matmul (kernel=tensor_cores: wmma tiles take f16 or bf16 \
                 with K{} a multiple of 8; found {} with K = {}, N = {}, on a device that \
                 reports {}tensor cores)",
                if trans_b { "" } else { " and N" },
                a.dtype(),
                p.k,
                p.n,
                if client.report().tensor_cores {
                    ""
                } else {
                    "no "
                }
            ),
        });
    }
    let mut choice = Choice::new("matmul");
    if family != KernelFamily::Auto {
        choice = choice.exact("kernel", family.name());
    }
    let cfg = choice
        .sources([
            MatmulStaged::source_hash(),
            MatmulStagedV4::source_hash(),
            MatmulDirectV4::source_hash(),
            MatmulDirect::source_hash(),
            MatmulVec4::source_hash(),
            MatmulVec4Plane::source_hash(),
            MatmulCmma::source_hash(),
            MatmulGemv::source_hash(),
        ])
        .dim("m", p.m)
        .dim("n", p.n)
        .dim("k", p.k)
        .exact("dtype", a.dtype())
        .exact("trans_b", trans_b)
        .candidates(cands.iter().copied())
        .cost(cost::model(client, &p, a.dtype().size(), &cands))
        .finalists(
            cost::finalists(client.report(), &p, a.dtype().size(), &cands),
            cost::TIES,
        )
        .tune_warmed(
            client,
            tolerance,
            MatmulConfig::label,
            Some(&|c| c.warm_up(a, b, &p, &ep)),
            |c| c.launch(a, b, &p, &ep).map(|t| vec![t]),
        )?;
    cfg.launch(a, b, &p, &ep)
}

/// `matmul` with a fixed configuration (no tuning): for benchmarks and tests. The
/// configuration must be one of its kernel's declared ones that fits the device and
/// the problem.
pub fn matmul_with(
    a: &Tensor,
    b: &Tensor,
    trans_b: bool,
    ep: Epilogue<'_>,
    cfg: MatmulConfig,
) -> Result<Tensor> {
    let p = Problem::check(a, b, trans_b, &ep)?;
    let client = a.client();
    let mut fits = fma_configs(client, &p, &ep);
    fits.extend(vec4_configs(client, &p, &ep));
    let cmma = MatmulCmma::space(client, &matmul_problem!(MatmulCmmaProblem, p, ep));
    fits.extend(cmma.into_iter().map(MatmulConfig::Cmma));
    fits.extend(gemv_configs(client, &p, &ep));
    if cubek_fits(&ep) {
        // Refused with its reason at launch where it would round f32 to TF32.
        fits.push(MatmulConfig::Cubek);
    }
    if !fits.contains(&cfg) {
        return Err(Error::Param {
            param: "config".into(),
            expected: "one of the matmul kernels' declared configurations that fits the device and the problem".into(),
            found: cfg.label(),
        });
    }
    cfg.launch(a, b, &p, &ep)
}

#[derive(Clone, Copy)]
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

/// A configuration of one of the `matmul` kernels, which launches that kernel: the
/// whole grid (`whole`), or its first cube only to compile it (its `warm_up`; `false`
/// where the grid is empty).
trait KernelChoice {
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        client: &Client,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        p: &Problem,
        ep: &Epilogue<'_>,
        whole: bool,
    ) -> Result<bool>;
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
                whole: bool,
            ) -> Result<bool> {
                let args = matmul_args!($args, a, b, c, p, ep);
                match whole {
                    true => $kernel::launch(client, self, &args).map(|()| true),
                    false => $kernel::warm_up(client, self, &args),
                }
            }
        }
    )*};
}

kernel_choice! {
    MatmulStagedConfig => MatmulStaged, MatmulStagedArgs;
    MatmulStagedV4Config => MatmulStagedV4, MatmulStagedV4Args;
    MatmulDirectV4Config => MatmulDirectV4, MatmulDirectV4Args;
    MatmulDirectConfig => MatmulDirect, MatmulDirectArgs;
    MatmulCmmaConfig => MatmulCmma, MatmulCmmaArgs;
    MatmulVec4Config => MatmulVec4, MatmulVec4Args;
    MatmulVec4PlaneConfig => MatmulVec4Plane, MatmulVec4PlaneArgs;
    MatmulGemvConfig => MatmulGemv, MatmulGemvArgs;
}
