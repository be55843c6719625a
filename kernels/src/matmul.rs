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

use crate::launch::check_input;
use serde::{Deserialize, Serialize};

mod cmma;
mod vec4;
pub use cmma::{MatmulCmma, MatmulCmmaConfig, MATMUL_CMMA_KERNEL};
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, silu};
use kiln_runtime::{
    shape_str,
    tune::{fnv1a_hex, Autotuner, TuneKey},
    Client, DType, Error, OpArgs, OpSpec, Outputs, ParamSpec, Result, Tensor, TensorSpec,
};
pub use vec4::{MatmulVec4, MatmulVec4Config, MATMUL_VEC4_KERNEL};

// ---------------------------------------------------------------- host API

/// The activation applied in the epilogue, after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// `x * sigmoid(x)`.
    Silu,
    /// GELU, tanh approximation.
    Gelu,
}

impl Activation {
    /// Parses `none`, `silu` or `gelu`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Activation::None),
            "silu" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            _ => Err(Error::Param {
                param: "activation".into(),
                expected: "none | silu | gelu".into(),
                found: s.into(),
            }),
        }
    }
    fn code(self) -> u32 {
        self as u32
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
    MatmulTiled::space(client, 1, 1, 1, false, false, false, 0)
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
    let key = TuneKey {
        kernel: "matmul",
        source_hash: source_hash(),
        shape: format!(
            "m={};n={};k={};dtype={};trans_b={trans_b}",
            p.m.next_power_of_two(),
            p.n.next_power_of_two(),
            p.k.next_power_of_two(),
            a.dtype()
        ),
    };
    // Configurations differ in summation order only: a few roundings of the sum of |a||b|.
    let tolerance = 8.0 * a.dtype().epsilon() * (p.k as f64).sqrt().max(1.0);
    // The scalar-FMA tiles first (the reference every candidate is checked against),
    // then the 4-wide vector tiles where K and N are multiples of 4, then the
    // tensor-core kernel where the device has tensor cores and the dtype is half.
    let mut all: Vec<Candidate> = candidates(client, p.m, p.n)
        .into_iter()
        .map(Candidate::Fma)
        .collect();
    let (has_bias, has_res, act) = (
        ep.bias.is_some(),
        ep.residual.is_some(),
        ep.activation.code(),
    );
    let vec4 = MatmulVec4::space(
        client, p.m as u32, p.n as u32, p.k as u32, trans_b, has_bias, has_res, act,
    );
    all.extend(
        snug(vec4, |c| (c.BM, c.BN), p.m, p.n)
            .into_iter()
            .map(Candidate::Vec4),
    );
    if matches!(a.dtype(), DType::F16 | DType::BF16) {
        all.extend(
            MatmulCmma::space(
                client, p.m as u32, p.n as u32, p.k as u32, trans_b, has_bias, has_res, act,
            )
            .into_iter()
            .map(Candidate::Cmma),
        );
    }
    let cfg = Autotuner::global().tune(
        client,
        &key,
        &all,
        Candidate::label,
        |c| c.launch(a, b, &p, &ep).map(|t| vec![t]),
        tolerance,
    )?;
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
            Candidate::Cmma(cfg) => launch_into(a, b, p, ep, cfg, MatmulCmma::launch),
            Candidate::Vec4(cfg) => launch_into(a, b, p, ep, cfg, MatmulVec4::launch),
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
    launch_into(a, b, &p, &ep, &cfg, MatmulVec4::launch)
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

fn source_hash() -> String {
    fnv1a_hex(
        &[
            MatmulTiled::SOURCE_HASH,
            MatmulCmma::SOURCE_HASH,
            MatmulVec4::SOURCE_HASH,
            include_str!("../../dsl/src/activation.rs"),
        ]
        .concat(),
    )
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
    launch_into(a, b, p, ep, &cfg, MatmulTiled::launch)
}

/// The launch function of a `matmul` kernel (every one takes the same arguments).
type LaunchFn<C> = fn(
    &Client,
    &C,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    &Tensor,
    u32,
    u32,
    u32,
    bool,
    bool,
    bool,
    u32,
) -> Result<()>;

/// Allocates `c` and launches `kernel` on the operands and the epilogue. Absent epilogue
/// tensors are bound to `a` and never read (their flag is off).
fn launch_into<C>(
    a: &Tensor,
    b: &Tensor,
    p: &Problem,
    ep: &Epilogue<'_>,
    cfg: &C,
    kernel: LaunchFn<C>,
) -> Result<Tensor> {
    let c = Tensor::empty(a.client(), a.dtype(), &[p.m, p.n])?;
    kernel(
        a.client(),
        cfg,
        a,
        b,
        ep.bias.unwrap_or(a),
        ep.residual.unwrap_or(a),
        &c,
        p.m as u32,
        p.n as u32,
        p.k as u32,
        p.trans_b,
        ep.bias.is_some(),
        ep.residual.is_some(),
        ep.activation.code(),
    )?;
    Ok(c)
}

// ---------------------------------------------------------------- kernel

/// `c = epilogue(a @ b)`, the scalar-FMA path every device runs. The declared
/// configurations span small tiles for skinny problems to large register tiles; each
/// costs a shader compile (~0.1 s on lavapipe) when tuned, so the list is lean.
#[kiln_macros::kernel(
    tune(
        (BM, BN, BK, TM, TN, STAGE, VEC) = [
            (64, 64, 16, 4, 4, 1, 1),
            (64, 64, 8, 8, 8, 1, 1),
            (128, 128, 8, 8, 8, 1, 1),
            (64, 128, 16, 4, 8, 1, 1),
            (16, 64, 32, 1, 4, 1, 1),
            (64, 64, 16, 4, 4, 1, 4),
            (128, 128, 8, 8, 8, 1, 4),
            (64, 64, 16, 4, 4, 2, 4),
            (64, 64, 8, 8, 8, 2, 4),
            (128, 128, 8, 8, 8, 2, 4),
            (128, 128, 16, 8, 8, 2, 4),
            (64, 64, 1, 8, 8, 3, 4),
            (32, 128, 1, 4, 8, 3, 4),
            (4, 256, 1, 1, 4, 3, 4),
            (32, 32, 1, 4, 4, 0, 1),
            (64, 64, 1, 8, 8, 0, 1),
            (32, 128, 1, 4, 8, 0, 1),
            (4, 256, 1, 1, 4, 0, 1),
            (1, 256, 1, 1, 4, 0, 1),
            (1, 64, 1, 1, 1, 0, 1),
        ]
    ),
    require(
        BM % TM == 0,
        BN % TN == 0,
        STAGE == 3 || BK % VEC == 0,
        BN % VEC == 0,
        STAGE < 2 || (VEC == 4 && TN % 4 == 0),
        STAGE == 0 || STAGE == 3 || (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory
    ),
    key(m = pow2, n = pow2, k = pow2, dtype),
    grid = (n.div_ceil(BN), m.div_ceil(BM)),
    cube = ((BM / TM) * (BN / TN)),
    name = "matmul",
    defaults(act = 0)
)]
pub fn matmul_tiled<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    c: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] trans_b: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: u32,
) {
    let (bm, bn, bk, tm, tn) = comptime!((BM, BN, BK, TM, TN));
    let units = comptime!((bm / tm) * (bn / tn));
    let cols_of_units = comptime!(bn / tn);
    let rows_of_units = comptime!(bm / tm);
    let row0 = CUBE_POS_Y * bm;
    let col0 = CUBE_POS_X * bn;
    let ty = UNIT_POS / cols_of_units;
    let tx = UNIT_POS % cols_of_units;

    let mut acc = Array::<f32>::new(comptime!((tm * tn) as usize));
    #[unroll]
    for i in 0..tm * tn {
        acc[i as usize] = 0.0;
    }
    let mut a_frag = Array::<f32>::new(comptime!(tm as usize));
    let mut b_frag = Array::<f32>::new(comptime!(tn as usize));

    if comptime!(STAGE == 1) {
        // The a slice is stored k-major ([bk][bm]), like b's ([bk][bn]).
        let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
        let mut b_s = SharedMemory::<f32>::new(comptime!((bk * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            // Cooperative, bounds-masked loads: zeros past the edges keep the FMAs uniform.
            // Each unit stages VEC consecutive elements per step.
            let mut idx = UNIT_POS;
            while idx < comptime!(bm * bk / VEC) {
                // Consecutive units read consecutive k of one row of a (coalesced).
                let r = idx / comptime!(bk / VEC);
                let kv = (idx % comptime!(bk / VEC)) * VEC;
                #[unroll]
                for e in 0..VEC {
                    let kk = kv + e;
                    let (gr, gk) = (row0 + r, k0 + kk);
                    let mut v = 0.0f32;
                    if gr < m && gk < k {
                        v = f32::cast_from(a[(gr * k + gk) as usize]);
                    }
                    a_s[(kk * bm + r) as usize] = v;
                }
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!(bk * bn / VEC) {
                #[unroll]
                for e in 0..VEC {
                    let mut v = 0.0f32;
                    if comptime!(trans_b) {
                        // b is [N, K]: consecutive units read consecutive k of one column.
                        let cc = idx / comptime!(bk / VEC);
                        let kk = (idx % comptime!(bk / VEC)) * VEC + e;
                        let (gk, gc) = (k0 + kk, col0 + cc);
                        if gk < k && gc < n {
                            v = f32::cast_from(b[(gc * k + gk) as usize]);
                        }
                        b_s[(kk * bn + cc) as usize] = v;
                    } else {
                        let kk = idx / comptime!(bn / VEC);
                        let cc = (idx % comptime!(bn / VEC)) * VEC + e;
                        let (gk, gc) = (k0 + kk, col0 + cc);
                        if gk < k && gc < n {
                            v = f32::cast_from(b[(gk * n + gc) as usize]);
                        }
                        b_s[(kk * bn + cc) as usize] = v;
                    }
                }
                idx += units;
            }
            sync_cube();

            #[unroll]
            for kk in 0..bk {
                // A unit owns rows ty + i * rows_of_units and columns tx + j * cols_of_units:
                // neighbouring units read neighbouring shared addresses (no bank conflicts
                // on GPUs, contiguous SIMD loads on CPU adapters) and store neighbouring
                // columns of c (coalesced).
                #[unroll]
                for i in 0..tm {
                    a_frag[i as usize] = a_s[(kk * bm + ty + i * rows_of_units) as usize];
                }
                #[unroll]
                for j in 0..tn {
                    b_frag[j as usize] = b_s[(kk * bn + tx + j * cols_of_units) as usize];
                }
                #[unroll]
                for i in 0..tm {
                    #[unroll]
                    for j in 0..tn {
                        acc[(i * tn + j) as usize] += a_frag[i as usize] * b_frag[j as usize];
                    }
                }
            }
            sync_cube();
            k0 += bk;
        }
    } else if comptime!(STAGE == 2) {
        // Staged, with b's slice and the accumulators as 4-wide vectors: a unit owns
        // TN / 4 groups of 4 adjacent columns (groups strided across units), so each
        // step is one vector load of b and TM x TN / 4 vector FMAs (a's value splat).
        let tnv = comptime!(tn / 4);
        let bnv = comptime!(bn / 4);
        let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
        let mut b_s = SharedMemory::<Vector<f32, Const<4>>>::new(comptime!((bk * bnv) as usize));
        let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
        #[unroll]
        for e in 0..tm * tnv {
            accv[e as usize] = Vector::new(0.0f32);
        }
        let mut k0 = 0u32;
        while k0 < k {
            let mut idx = UNIT_POS;
            while idx < comptime!(bm * bk) {
                let r = idx / bk;
                let kk = idx % bk;
                let (gr, gk) = (row0 + r, k0 + kk);
                let mut v = 0.0f32;
                if gr < m && gk < k {
                    v = f32::cast_from(a[(gr * k + gk) as usize]);
                }
                a_s[(kk * bm + r) as usize] = v;
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!(bk * bnv) {
                let kk = idx / bnv;
                let cv = idx % bnv;
                let gk = k0 + kk;
                let mut v = Vector::<f32, Const<4>>::empty();
                #[unroll]
                for e in 0..4u32 {
                    let gc = col0 + cv * 4 + e;
                    let mut x = 0.0f32;
                    if gk < k && gc < n {
                        if comptime!(trans_b) {
                            x = f32::cast_from(b[(gc * k + gk) as usize]);
                        } else {
                            x = f32::cast_from(b[(gk * n + gc) as usize]);
                        }
                    }
                    v[e as usize] = x;
                }
                b_s[idx as usize] = v;
                idx += units;
            }
            sync_cube();
            #[unroll]
            for kk in 0..bk {
                #[unroll]
                for i in 0..tm {
                    a_frag[i as usize] = a_s[(kk * bm + ty + i * rows_of_units) as usize];
                }
                #[unroll]
                for jv in 0..tnv {
                    let bv = b_s[(kk * bnv + tx + jv * cols_of_units) as usize];
                    #[unroll]
                    for i in 0..tm {
                        let e = (i * tnv + jv) as usize;
                        accv[e] += Vector::new(a_frag[i as usize]) * bv;
                    }
                }
            }
            sync_cube();
            k0 += bk;
        }
        // Into the scalar layout the epilogue reads (column j of the unit is lane j % 4
        // of its group j / 4).
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    } else if comptime!(STAGE == 3) {
        // Direct, with 4-wide vector accumulators: a unit owns TN / 4 groups of 4
        // adjacent columns, reads them from global memory as one vector per step and
        // does TM x TN / 4 vector FMAs. Clamped rows and columns as in the scalar path.
        let tnv = comptime!(tn / 4);
        let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
        #[unroll]
        for e in 0..tm * tnv {
            accv[e as usize] = Vector::new(0.0f32);
        }
        let mut rows = Array::<u32>::new(comptime!(tm as usize));
        let mut cols = Array::<u32>::new(comptime!(tn as usize));
        clamped_strided(&mut rows, row0 + ty, rows_of_units, m - 1, tm);
        #[unroll]
        for j in 0..tn {
            cols[j as usize] = min(col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4, n - 1);
        }
        let mut kk = 0u32;
        while kk < k {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
            }
            #[unroll]
            for jv in 0..tnv {
                let mut bv = Vector::<f32, Const<4>>::empty();
                #[unroll]
                for e in 0..4u32 {
                    let cj = cols[(jv * 4 + e) as usize];
                    if comptime!(trans_b) {
                        bv[e as usize] = f32::cast_from(b[(cj * k + kk) as usize]);
                    } else {
                        bv[e as usize] = f32::cast_from(b[(kk * n + cj) as usize]);
                    }
                }
                #[unroll]
                for i in 0..tm {
                    let e = (i * tnv + jv) as usize;
                    accv[e] += Vector::new(a_frag[i as usize]) * bv;
                }
            }
            kk += 1;
        }
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    } else {
        // Each unit reads its own fragments from global memory, K exactly (no padding,
        // so no zero fill). Rows and columns past the edge are clamped to the last one:
        // computed, never stored.
        let mut rows = Array::<u32>::new(comptime!(tm as usize));
        let mut cols = Array::<u32>::new(comptime!(tn as usize));
        clamped_strided(&mut rows, row0 + ty, rows_of_units, m - 1, tm);
        clamped_strided(&mut cols, col0 + tx, cols_of_units, n - 1, tn);
        let mut kk = 0u32;
        while kk < k {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
            }
            #[unroll]
            for j in 0..tn {
                if comptime!(trans_b) {
                    b_frag[j as usize] = f32::cast_from(b[(cols[j as usize] * k + kk) as usize]);
                } else {
                    b_frag[j as usize] = f32::cast_from(b[(kk * n + cols[j as usize]) as usize]);
                }
            }
            #[unroll]
            for i in 0..tm {
                #[unroll]
                for j in 0..tn {
                    acc[(i * tn + j) as usize] += a_frag[i as usize] * b_frag[j as usize];
                }
            }
            kk += 1;
        }
    }

    // Epilogue, in f32, then one rounding to F.
    #[unroll]
    for i in 0..tm {
        let r = row0 + ty + i * rows_of_units;
        #[unroll]
        for j in 0..tn {
            let mut col = col0 + tx + j * cols_of_units;
            if comptime!(STAGE >= 2) {
                col = col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4;
            }
            if r < m && col < n {
                store_epilogue::<F>(
                    c,
                    bias,
                    residual,
                    acc[(i * tn + j) as usize],
                    r,
                    col,
                    n,
                    has_bias,
                    has_residual,
                    act,
                );
            }
        }
    }
}

/// `idx[i] = min(first + i * step, last)` for `i < count`: a unit's strided rows or
/// columns, clamped to the last valid one (computed, never stored), so the main loops
/// of the direct kernels need no branch.
#[cube]
pub(crate) fn clamped_strided(
    idx: &mut Array<u32>,
    first: u32,
    step: u32,
    last: u32,
    #[comptime] count: u32,
) {
    #[unroll]
    for i in 0..count {
        idx[i as usize] = min(first + i * step, last);
    }
}

/// The fused epilogue of every `matmul` kernel for one element `v` (f32) of row `r`,
/// column `col`: `+ bias[col]`, the activation, `+ residual[r, col]`, then one rounding
/// to F into `c[r, col]`. The caller masks `r < m`, `col < n`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_epilogue<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    v: f32,
    r: u32,
    col: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: u32,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[col as usize]);
    }
    if comptime!(act == 1) {
        v = silu::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(act == 2) {
        v = gelu_tanh::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(has_residual) {
        v += f32::cast_from(residual[(r * n + col) as usize]);
    }
    c[(r * n + col) as usize] = F::cast_from(v);
}

// ---------------------------------------------------------------- reference

/// f64 reference, written from the spec.
pub mod reference {
    /// `epilogue(a @ b)`: `a` [m, k], `b` [k, n] or [n, k] (`trans_b`), `activation`
    /// one of `none`, `silu`, `gelu`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        a: &[f64],
        b: &[f64],
        m: usize,
        n: usize,
        k: usize,
        trans_b: bool,
        bias: Option<&[f64]>,
        activation: &str,
        residual: Option<&[f64]>,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                    s += a[i * k + p] * bv;
                }
                if let Some(bias) = bias {
                    s += bias[j];
                }
                s = match activation {
                    "silu" => crate::elementwise::reference::silu(&[s])[0],
                    "gelu" => crate::elementwise::reference::gelu(&[s])[0],
                    _ => s,
                };
                if let Some(r) = residual {
                    s += r[i * n + j];
                }
                c[i * n + j] = s;
            }
        }
        c
    }
}

// ---------------------------------------------------------------- registry

fn run_matmul(client: &Client, args: &OpArgs) -> Result<Outputs> {
    let (a, b) = (args.tensor("a")?, args.tensor("b")?);
    a.expect_usable("a", client)?;
    let ep = Epilogue {
        bias: args.optional_tensor("bias"),
        activation: Activation::parse(&args.param("activation")?)?,
        residual: args.optional_tensor("residual"),
    };
    let trans_b = args.param_choice("trans_b", &["false", "true"])? == "true";
    Ok(vec![("c", matmul(a, b, trans_b, ep)?)])
}

/// `matmul`: `c = epilogue(a @ b)`.
pub static MATMUL: OpSpec = OpSpec {
    name: "matmul",
    summary: "c = act(a @ b + bias) + residual, f32 accumulation, autotuned tiles",
    inputs: &[
        TensorSpec {
            name: "a",
            shape: "[M, K]",
            dtypes: "f32 | f16 | bf16",
            optional: false,
            doc: "left operand",
        },
        TensorSpec {
            name: "b",
            shape: "[K, N] ([N, K] with trans_b)",
            dtypes: "a's dtype",
            optional: false,
            doc: "right operand",
        },
        TensorSpec {
            name: "bias",
            shape: "[N]",
            dtypes: "a's dtype",
            optional: true,
            doc: "added to every row",
        },
        TensorSpec {
            name: "residual",
            shape: "[M, N]",
            dtypes: "a's dtype",
            optional: true,
            doc: "added after the activation",
        },
    ],
    outputs: &[TensorSpec {
        name: "c",
        shape: "[M, N]",
        dtypes: "a's dtype",
        optional: false,
        doc: "result",
    }],
    params: &[
        ParamSpec {
            name: "activation",
            default: "none",
            values: "none | silu | gelu",
            doc: "applied after the bias",
        },
        ParamSpec {
            name: "trans_b",
            default: "false",
            values: "false | true",
            doc: "b is [N, K]",
        },
    ],
    run: run_matmul,
    cost: |d, e| match *d {
        [m, n, k] => (
            2.0 * (m * n * k) as f64,
            ((m * k + k * n + m * n) * e) as f64,
        ),
        _ => (0.0, 0.0),
    },
    problem: "M x N x K",
    example_inputs: matmul_inputs,
};

fn matmul_inputs(dims: &[usize]) -> Result<Vec<(&'static str, Vec<usize>)>> {
    match *dims {
        [m, n, k] => Ok(vec![("a", vec![m, k]), ("b", vec![k, n])]),
        _ => Err(Error::Param {
            param: "--shape".into(),
            expected: "M x N x K".into(),
            found: format!("{dims:?}"),
        }),
    }
}
