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

use crate::launch::{
    begin, check_input, config_dtype, finish, input_array, output_array, register_float,
    scalar_u32, with_float, DTYPE_PARAM,
};
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, silu};
use kiln_runtime::{
    dispatch, shape_str,
    tune::{fnv1a_hex, Autotuner, TuneKey},
    Client, Error, KernelConfig, KernelSpec, OpArgs, OpSpec, Outputs, ParamSpec, Result, Tensor,
    TensorSpec,
};
use serde::{Deserialize, Serialize};

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

/// One tile configuration (the autotuner's search space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileConfig {
    /// Rows of `c` per cube.
    pub bm: u32,
    /// Columns of `c` per cube.
    pub bn: u32,
    /// Depth of each shared-memory K slice.
    pub bk: u32,
    /// Rows per unit.
    pub tm: u32,
    /// Columns per unit.
    pub tn: u32,
    /// Stage K slices in shared memory (`true`, the GPU path) or have each unit read
    /// its fragments straight from global memory (`false`: no barriers, which wins on
    /// CPU adapters, where shared memory is ordinary cached memory anyway).
    pub stage: bool,
}

impl TileConfig {
    /// Units per cube.
    pub fn units(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }
    /// Shared memory per cube, bytes (two f32 slices).
    pub fn shared_bytes(&self) -> usize {
        if self.stage {
            ((self.bm + self.bn) * self.bk * 4) as usize
        } else {
            0
        }
    }
    fn label(&self) -> String {
        if self.stage {
            format!(
                "BM={} BN={} BK={} TM={} TN={}",
                self.bm, self.bn, self.bk, self.tm, self.tn
            )
        } else {
            format!(
                "BM={} BN={} TM={} TN={} direct",
                self.bm, self.bn, self.tm, self.tn
            )
        }
    }
    /// Structural validity: tiles divide, and every unit loads whole slices.
    fn valid(&self) -> bool {
        self.bm % self.tm == 0 && self.bn % self.tn == 0 && self.units() > 0
    }
}

/// The declared space: a lean list (each candidate costs a shader compile, ~0.1 s on
/// lavapipe) spanning small tiles for skinny problems to large register tiles.
#[rustfmt::skip]
pub const SPACE: &[TileConfig] = &[
    TileConfig { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, stage: true },
    TileConfig { bm: 64, bn: 64, bk: 8, tm: 8, tn: 8, stage: true },
    TileConfig { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8, stage: true },
    TileConfig { bm: 64, bn: 128, bk: 16, tm: 4, tn: 8, stage: true },
    TileConfig { bm: 16, bn: 64, bk: 32, tm: 1, tn: 4, stage: true },
    TileConfig { bm: 32, bn: 32, bk: 1, tm: 4, tn: 4, stage: false },
    TileConfig { bm: 64, bn: 64, bk: 1, tm: 8, tn: 8, stage: false },
    TileConfig { bm: 32, bn: 128, bk: 1, tm: 4, tn: 8, stage: false },
    TileConfig { bm: 4, bn: 256, bk: 1, tm: 1, tn: 4, stage: false },
    TileConfig { bm: 1, bn: 256, bk: 1, tm: 1, tn: 4, stage: false },
    TileConfig { bm: 1, bn: 64, bk: 1, tm: 1, tn: 1, stage: false },
];

/// The candidates for a problem on a device: the declared space pruned by device limits
/// (units per cube, shared memory), then by the shape: tiles more than twice the matrix
/// (over 3/4 of the tile idle) are dropped, unless that leaves nothing, in which case
/// the least wasteful tiles stay.
pub fn candidates(client: &Client, m: usize, n: usize) -> Vec<TileConfig> {
    let r = client.report();
    let fits: Vec<TileConfig> = SPACE
        .iter()
        .copied()
        .filter(|c| c.valid())
        .filter(|c| c.units() <= r.max_units_per_cube && c.shared_bytes() <= r.max_shared_memory)
        .collect();
    let waste = |c: &TileConfig| {
        let rows = (c.bm as usize).div_ceil(m.max(1)).max(1);
        let cols = (c.bn as usize).div_ceil(n.max(1)).max(1);
        rows * cols
    };
    let snug: Vec<TileConfig> = fits
        .iter()
        .copied()
        .filter(|c| (c.bm as usize) <= 2 * m && (c.bn as usize) <= 2 * n)
        .collect();
    if !snug.is_empty() {
        return snug;
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
    let cfg = Autotuner::global().tune(
        client,
        &key,
        &candidates(client, p.m, p.n),
        TileConfig::label,
        |c| launch(a, b, &p, &ep, *c).map(|t| vec![t]),
        tolerance,
    )?;
    launch(a, b, &p, &ep, cfg)
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
    if !cfg.valid() {
        return Err(Error::Param {
            param: "tile".into(),
            expected: "BM % TM == 0 and BN % TN == 0".into(),
            found: cfg.label(),
        });
    }
    launch(a, b, &p, &ep, cfg)
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
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        fnv1a_hex(concat!(
            include_str!("matmul.rs"),
            include_str!("../../dsl/src/activation.rs")
        ))
    })
    .clone()
}

const FLAG_TRANS_B: u32 = 1;
const FLAG_BIAS: u32 = 2;
const FLAG_RESIDUAL: u32 = 4;

fn flags(p: &Problem, ep: &Epilogue<'_>) -> u32 {
    (if p.trans_b { FLAG_TRANS_B } else { 0 })
        | (if ep.bias.is_some() { FLAG_BIAS } else { 0 })
        | (if ep.residual.is_some() {
            FLAG_RESIDUAL
        } else {
            0
        })
}

fn launch(
    a: &Tensor,
    b: &Tensor,
    p: &Problem,
    ep: &Epilogue<'_>,
    cfg: TileConfig,
) -> Result<Tensor> {
    let client = a.client();
    let c = Tensor::empty(client, a.dtype(), &[p.m, p.n])?;
    let gx = p.n.div_ceil(cfg.bn as usize);
    let gy = p.m.div_ceil(cfg.bm as usize);
    if gx > 65_535 || gy > 65_535 {
        return Err(Error::Shape {
            tensor: "c".into(),
            expected: format!("at most 65535 tiles of {}x{} per dimension", cfg.bm, cfg.bn),
            found: format!("[{}, {}]", p.m, p.n),
        });
    }
    // Absent epilogue tensors are bound to `a` and never read (their flag is off).
    let bias = ep.bias.unwrap_or(a);
    let res = ep.residual.unwrap_or(a);
    let fl = flags(p, ep);
    let act = ep.activation.code();
    dispatch!(client, cc => with_float!(a.dtype(), F => {
        // SAFETY: every global read and write is guarded by m, n, k; bias and residual
        // are read only when their flag is set and then have shapes [N] and [M, N].
        unsafe {
            matmul_kernel::launch_unchecked::<F, _>(
                cc,
                CubeCount::Static(gx as u32, gy as u32, 1),
                CubeDim::new_1d(cfg.units()),
                ArrayArg::from_raw_parts(a.handle().clone(), a.numel()),
                ArrayArg::from_raw_parts(b.handle().clone(), b.numel()),
                ArrayArg::from_raw_parts(bias.handle().clone(), bias.numel()),
                ArrayArg::from_raw_parts(res.handle().clone(), res.numel()),
                ArrayArg::from_raw_parts(c.handle().clone(), c.numel()),
                p.m as u32,
                p.n as u32,
                p.k as u32,
                cfg.bm, cfg.bn, cfg.bk, cfg.tm, cfg.tn, cfg.stage, fl, act,
            )
        };
        Ok(())
    }))?;
    Ok(c)
}

// ---------------------------------------------------------------- kernel

#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn matmul_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    c: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] bk: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] stage: bool,
    #[comptime] flags: u32,
    #[comptime] act: u32,
) {
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

    if comptime!(stage) {
        // The a slice is stored k-major ([bk][bm]), like b's ([bk][bn]).
        let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
        let mut b_s = SharedMemory::<f32>::new(comptime!((bk * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            // Cooperative, bounds-masked loads: zeros past the edges keep the FMAs uniform.
            let mut idx = UNIT_POS;
            while idx < comptime!(bm * bk) {
                // Consecutive units read consecutive k of one row of a (coalesced).
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
            while idx < comptime!(bk * bn) {
                let mut v = 0.0f32;
                if comptime!(flags & FLAG_TRANS_B != 0) {
                    // b is [N, K]: consecutive units read consecutive k of one column.
                    let cc = idx / bk;
                    let kk = idx % bk;
                    let (gk, gc) = (k0 + kk, col0 + cc);
                    if gk < k && gc < n {
                        v = f32::cast_from(b[(gc * k + gk) as usize]);
                    }
                    b_s[(kk * bn + cc) as usize] = v;
                } else {
                    let kk = idx / bn;
                    let cc = idx % bn;
                    let (gk, gc) = (k0 + kk, col0 + cc);
                    if gk < k && gc < n {
                        v = f32::cast_from(b[(gk * n + gc) as usize]);
                    }
                    b_s[(kk * bn + cc) as usize] = v;
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
    } else {
        // Each unit reads its own fragments from global memory, K exactly (no padding,
        // so no zero fill). Rows and columns past the edge are clamped to the last one:
        // computed, never stored.
        let mut rows = Array::<u32>::new(comptime!(tm as usize));
        let mut cols = Array::<u32>::new(comptime!(tn as usize));
        #[unroll]
        for i in 0..tm {
            rows[i as usize] = min(row0 + ty + i * rows_of_units, m - 1);
        }
        #[unroll]
        for j in 0..tn {
            cols[j as usize] = min(col0 + tx + j * cols_of_units, n - 1);
        }
        let mut kk = 0u32;
        while kk < k {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
            }
            #[unroll]
            for j in 0..tn {
                if comptime!(flags & FLAG_TRANS_B != 0) {
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
            let col = col0 + tx + j * cols_of_units;
            if r < m && col < n {
                let mut v = acc[(i * tn + j) as usize];
                if comptime!(flags & FLAG_BIAS != 0) {
                    v += f32::cast_from(bias[col as usize]);
                }
                if comptime!(act == 1) {
                    v = silu::<Const<1>>(Vector::new(v))[0];
                }
                if comptime!(act == 2) {
                    v = gelu_tanh::<Const<1>>(Vector::new(v))[0];
                }
                if comptime!(flags & FLAG_RESIDUAL != 0) {
                    v += f32::cast_from(residual[(r * n + col) as usize]);
                }
                c[(r * n + col) as usize] = F::cast_from(v);
            }
        }
    }
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

const TILE_PARAMS: &[ParamSpec] = &[
    DTYPE_PARAM,
    ParamSpec {
        name: "bm",
        default: "64",
        values: "multiple of tm",
        doc: "rows of c per cube",
    },
    ParamSpec {
        name: "bn",
        default: "64",
        values: "multiple of tn",
        doc: "columns of c per cube",
    },
    ParamSpec {
        name: "bk",
        default: "16",
        values: ">= 1",
        doc: "K slice depth",
    },
    ParamSpec {
        name: "tm",
        default: "4",
        values: ">= 1",
        doc: "rows per unit",
    },
    ParamSpec {
        name: "tn",
        default: "4",
        values: ">= 1",
        doc: "columns per unit",
    },
    ParamSpec {
        name: "stage",
        default: "true",
        values: "false | true",
        doc: "stage K slices in shared memory",
    },
    ParamSpec {
        name: "trans_b",
        default: "false",
        values: "false | true",
        doc: "b is [N, K]",
    },
    ParamSpec {
        name: "activation",
        default: "none",
        values: "none | silu | gelu",
        doc: "epilogue activation",
    },
    ParamSpec {
        name: "bias",
        default: "false",
        values: "false | true",
        doc: "fused bias",
    },
    ParamSpec {
        name: "residual",
        default: "false",
        values: "false | true",
        doc: "fused residual",
    },
];

fn define_matmul(mut b: KernelBuilder, cfg: &KernelConfig) -> Result<KernelDefinition> {
    let dtype = config_dtype(cfg)?;
    let tile = TileConfig {
        bm: cfg.get("bm")?,
        bn: cfg.get("bn")?,
        bk: cfg.get("bk")?,
        tm: cfg.get("tm")?,
        tn: cfg.get("tn")?,
        stage: cfg.get("stage")?,
    };
    if !tile.valid() || tile.bk == 0 || tile.units() > 1024 {
        return Err(Error::Param {
            param: "bm/bn/bk/tm/tn".into(),
            expected: "bm % tm == 0, bn % tn == 0, bk >= 1, at most 1024 units".into(),
            found: tile.label(),
        });
    }
    let act = Activation::parse(&cfg.get::<String>("activation")?)?.code();
    let flag =
        |name: &str, bit: u32| -> Result<u32> { Ok(if cfg.get::<bool>(name)? { bit } else { 0 }) };
    let fl = flag("trans_b", FLAG_TRANS_B)?
        | flag("bias", FLAG_BIAS)?
        | flag("residual", FLAG_RESIDUAL)?;
    with_float!(dtype, F => {
        begin(&mut b);
        register_float::<matmul_kernel::_F, F>(&mut b);
        let a = input_array::<matmul_kernel::F>(&mut b);
        let bb = input_array::<matmul_kernel::F>(&mut b);
        let bias = input_array::<matmul_kernel::F>(&mut b);
        let res = input_array::<matmul_kernel::F>(&mut b);
        let c = output_array::<matmul_kernel::F>(&mut b);
        let (m, n, k) = (scalar_u32(&mut b), scalar_u32(&mut b), scalar_u32(&mut b));
        matmul_kernel::expand::<matmul_kernel::F>(
            &mut b.scope, a, bb, bias, res, c, m, n, k, tile.bm, tile.bn, tile.bk, tile.tm, tile.tn, tile.stage, fl, act,
        );
        Ok(finish(b, format!("kiln_matmul_{dtype}_{}x{}x{}_{}x{}", tile.bm, tile.bn, tile.bk, tile.tm, tile.tn), tile.units()))
    })
}

/// Emission entry of the `matmul` kernel.
pub static MATMUL_KERNEL: KernelSpec = KernelSpec {
    name: "matmul",
    summary: MATMUL.summary,
    config: TILE_PARAMS,
    define: define_matmul,
};
