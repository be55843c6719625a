//! The forward block: flash-style attention that also returns the log-sum-exp.
//!
//! One cube per (sequence, tile of `BQ` query rows, head, tile of `BV` value columns)
//! walks the sequence's keys in tiles of `BK`: scores `S = Q K^T` (f32, register tiles
//! over depth chunks of `BD`), masked (past the sequence, and causally), an online
//! softmax per row (running max `m` and sum `l`; the accumulator is rescaled by
//! `exp(m_old - m_new) <= 1`), and `O += P V`. Nothing of size `Sq x Sk` leaves the cube.
//! Causal cubes stop at the last key their last row sees.

use super::problem::{check, Problem};
use super::rows::{AttentionFwdRows, AttentionFwdRowsArgs, AttentionFwdRowsProblem};
use super::tensor_core::{AttentionFwdCmma, AttentionFwdCmmaArgs, AttentionFwdCmmaProblem};
use super::tile::{query_tile, write_lse};
use super::*;
use crate::launch::absent;
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, tile_product_nt, v4_tile_col, V4};
use kiln_runtime::tune::{Choice, Tolerance};
use kiln_runtime::{AdapterType, Client, DType, Error, Result, Tensor};

/// How far two candidates' outputs may differ (the autotuner's per-element relative
/// measure, floored at 1e-3 of the largest output) for `max_k` keys. Candidates sum
/// each score in another order and rescale the accumulator at other key-tile
/// boundaries: f32 roundings that grow like the square root of the keys summed, and
/// that an output element cancelling to near the floor magnifies (measured: 2.5e-4
/// between the two kernels at 2048 keys of normal inputs).
fn tolerance(max_k: usize) -> f64 {
    (2e-5 * (max_k as f64).sqrt()).max(1e-4)
}

/// [`tolerance`], or where the tensor-core kernel takes part: it rounds `P` to the
/// operand dtype before `P V`, an absolute error in `out` of about one rounding of the
/// rows' magnitude, which an element that cancels to near zero magnifies without bound
/// in a relative measure. So the measure is floored at the output's largest magnitude
/// (differences against it) and bounded by four roundings of the operand dtype. A
/// kernel that drops or repeats a key tile, or misplaces a row, differs by a sizeable
/// fraction of it.
fn tolerance_with(p: &Problem, kernels: &[ForwardKernel]) -> Tolerance {
    let base = tolerance(Problem::longest(&p.bounds_k));
    match kernels.contains(&ForwardKernel::TensorCore) {
        true => Tolerance {
            rel: base.max(4.0 * p.dtype.epsilon()),
            floor: 1.0,
        },
        false => base.into(),
    }
}

/// Attention of `q` over `k`, `v` with the options' mask, scale and temperature:
/// `out` `[B, Sq, H, Dv]` (`out_dtype`) and `lse` `[B, H, Sq]` f32.
pub fn attention(inp: &AttentionInputs<'_>, opts: &AttentionOptions) -> Result<AttentionOutput> {
    let p = check(inp, opts)?;
    let client = inp.q.client();
    let out = Tensor::empty(client, p.out_dtype, &p.out_shape())?;
    let lse = Tensor::empty(client, DType::F32, &p.lse_shape())?;
    forward_into(inp, &p, &out, &lse)?;
    Ok(AttentionOutput { out, lse })
}

/// The forward kernels: the autotuner picks one per device and bucketed shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ForwardKernel {
    /// `attention_fwd`: query and key tiles staged in shared memory, the scores' tile
    /// shared by the cube (any `D`, `Dv`).
    Staged,
    /// `attention_fwd_rows`: a unit owns whole query rows and the cube walks the keys in
    /// lockstep, reading them straight from global memory (`D`, `Dv` multiples of 4;
    /// `rows.rs` says why).
    Rows,
    /// `attention_fwd_cmma`: `Q K^T` and `P V` on tensor cores (f16/bf16 inputs, on
    /// devices that report them: CUDA), in two passes over the keys (`tensor_core.rs`).
    TensorCore,
}

pinnable_by_name!(ForwardKernel, "kernel", {
    Staged => "staged",
    Rows => "rows",
    TensorCore => "tensor_cores",
});

impl ForwardKernel {
    /// The kernels that take a problem on this device, in preference order: the rows
    /// kernel needs `D`, `Dv` multiples of 4, and on a GPU `D <= 64`; the tensor-core
    /// one f16 or bf16 inputs and a device with tensor cores.
    fn fitting(client: &Client, p: &Problem) -> Vec<ForwardKernel> {
        let mut kernels = vec![ForwardKernel::Staged];
        let rows = AttentionFwdRowsProblem {
            dk: p.dk as u32,
            dv: p.dv as u32,
            ..Default::default()
        };
        if !AttentionFwdRows::space(client, &rows).is_empty() {
            kernels.push(ForwardKernel::Rows);
        }
        let cmma = AttentionFwdCmmaProblem {
            dk: p.dk as u32,
            dv: p.dv as u32,
            ..Default::default()
        };
        if matches!(p.dtype, DType::F16 | DType::BF16)
            && !AttentionFwdCmma::space(client, &cmma).is_empty()
        {
            kernels.push(ForwardKernel::TensorCore);
        }
        kernels
    }

    /// The autotuner's ranking on this device (relative times). On a CPU adapter the
    /// rows kernel ran 3.0x faster than the staged one (S = 2048, H = 8, D = 64, f32,
    /// both tuned, lavapipe): the staged kernel is not timed there. On a GPU both are.
    fn cost(client: &Client) -> impl Fn(&ForwardKernel) -> f64 + 'static {
        let cpu = client.report().adapter_type == AdapterType::Cpu;
        move |k| match (k, cpu) {
            // Offered on GPUs only.
            (ForwardKernel::TensorCore, _) => 0.5,
            (ForwardKernel::Rows, true) | (ForwardKernel::Staged, false) => 1.0,
            (ForwardKernel::Rows, false) => 1.5,
            (ForwardKernel::Staged, true) => 3.0,
        }
    }
}

/// [`attention`] with the forward kernel given instead of tuned (each kernel's own tile
/// configuration is still tuned; `kiln run attention --set kernel=..`). A kernel that
/// cannot take the problem is refused by name: tensor cores as unsupported (no tensor
/// cores, or f32 inputs), the rows kernel as a parameter.
pub fn attention_with(
    inp: &AttentionInputs<'_>,
    opts: &AttentionOptions,
    kernel: ForwardKernel,
) -> Result<AttentionOutput> {
    let p = check(inp, opts)?;
    let client = inp.q.client();
    let fitting = ForwardKernel::fitting(client, &p);
    if !fitting.contains(&kernel) {
        let names: Vec<&str> = fitting.iter().map(|k| k.name()).collect();
        if kernel == ForwardKernel::TensorCore {
            let report = client.report();
            return Err(Error::Unsupported {
                device: report.name.clone(),
                feature: format!(
                    "tensor cores for attention (kernel=tensor_cores needs f16 or bf16 q, k, v; \
                     found {} on a device that reports {}tensor cores; this problem's \
                     kernels: {})",
                    p.dtype,
                    if report.tensor_cores { "" } else { "no " },
                    names.join(" | ")
                ),
            });
        }
        return Err(Error::Param {
            param: "kernel".into(),
            expected: format!(
                "auto, or a kernel this problem has: {} (rows needs D and Dv multiples of \
                 4, and D <= 64 on a GPU)",
                names.join(" | ")
            ),
            found: format!("{} with D = {}, Dv = {}", kernel.name(), p.dk, p.dv),
        });
    }
    let out = Tensor::empty(client, p.out_dtype, &p.out_shape())?;
    let lse = Tensor::empty(client, DType::F32, &p.lse_shape())?;
    if p.sq * p.batch > 0 {
        launch(kernel, inp, &p, &out, &lse)?;
    }
    Ok(AttentionOutput { out, lse })
}

/// Runs the forward kernel of a checked problem into `out` and `lse`: the autotuner's
/// choice of kernel (validated against the staged one, which takes every problem).
pub(super) fn forward_into(
    inp: &AttentionInputs<'_>,
    p: &Problem,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    let client = inp.q.client();
    if p.sq * p.batch == 0 {
        return Ok(());
    }
    let kernels = ForwardKernel::fitting(client, p);
    let kernel = Choice::new("attention_fwd_kernel")
        .sources([
            AttentionFwd::source_hash(),
            AttentionFwdRows::source_hash(),
            AttentionFwdCmma::source_hash(),
        ])
        .dim("n_seq", p.n_seq())
        .dim("max_q", Problem::longest(&p.bounds_q))
        .dim("max_k", Problem::longest(&p.bounds_k))
        .dim("heads", p.heads)
        .dim("dk", p.dk)
        .dim("dv", p.dv)
        .exact("dtype", p.dtype)
        .exact("causal", p.causal)
        .exact("varlen", p.varlen)
        .candidates(kernels.clone())
        .cost(ForwardKernel::cost(client))
        .tune(
            client,
            tolerance_with(p, &kernels),
            |k| k.name().into(),
            |&k| {
                // Fresh outputs per candidate: the tuner compares them.
                let out = Tensor::empty(client, p.out_dtype, &p.out_shape())?;
                let lse = Tensor::empty(client, DType::F32, &p.lse_shape())?;
                launch(k, inp, p, &out, &lse)?;
                Ok(vec![out, lse])
            },
        )?;
    launch(kernel, inp, p, out, lse)
}

/// Launches one forward kernel (its tile configuration tuned) into `out` and `lse`.
fn launch(
    kernel: ForwardKernel,
    inp: &AttentionInputs<'_>,
    p: &Problem,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    let client = inp.q.client();
    let (bounds_q, bounds_k) = p.upload_bounds(client)?;
    // The output the kernel does not write is bound to a one-element placeholder of
    // its dtype.
    let out_f32 = p.out_dtype == DType::F32 && p.dtype != DType::F32;
    let placeholder = match out_f32 {
        true => Tensor::empty(client, p.dtype, &[1])?,
        false => absent(client)?,
    };
    let (o, o32) = if out_f32 {
        (&placeholder, out)
    } else {
        (out, &placeholder)
    };
    macro_rules! args {
        ($args:ident) => {
            attention_args!($args, inp, p, &bounds_q, &bounds_k, {
                out: o,
                out32: o32,
                lse,
                temperature: p.temperature as f32,
                log_lse_scale: p.lse_scale.ln() as f32,
                out_f32,
            })
        };
    }
    let tol = tolerance_with(p, &[kernel]);
    match kernel {
        ForwardKernel::Staged => {
            AttentionFwd::tuned(client, tol, &args!(AttentionFwdArgs)).map(drop)
        }
        ForwardKernel::Rows => {
            AttentionFwdRows::tuned(client, tol, &args!(AttentionFwdRowsArgs)).map(drop)
        }
        ForwardKernel::TensorCore => {
            AttentionFwdCmma::tuned(client, tol, &args!(AttentionFwdCmmaArgs)).map(drop)
        }
    }
}

attention_fwd_kernel! {
    /// Attention forward with log-sum-exp; see the module docs. Inputs token-major (`q`
    /// row `t` at `(t H + h) D`, `k`/`v` at `(t Hkv + h / group) D`), sequence `n` spans
    /// query rows `bounds_q[n]..bounds_q[n + 1]` and keys `bounds_k[n]..bounds_k[n + 1]`.
    /// Query `i` sees key `j` (positions within the sequence) iff `!causal || j <= i +
    /// shift`. Masked keys score the lowest finite f32 (WGSL has no infinity literal),
    /// which is also the running max before any key. `scale` is `scale / T`; `lse = T (m
    /// + ln l) + log_lse_scale`. `out` is written in F, or in f32 to `out32` when
    /// `out_f32`.
    #[kernel(
        tune(
            (BQ, BK, TQ, TK) = [(32, 32, 4, 4), (64, 32, 8, 4), (16, 32, 2, 4)],
            BV = [64, 32, 128],
            BD = [32]
        ),
        require(
            BV % (4 * (BK / TK)) == 0,
            BK / TK >= TQ,
            BV <= 32 || dv > BV / 2,
            (BQ * BD + BD * BK + BQ * BK + BK * BV + 2 * BQ) as usize * 4 <= device.max_shared_memory
        ),
        grid = (n_seq * max_q.div_ceil(BQ), heads, dv.div_ceil(BV)),
        cube = (BQ / TQ) * (BK / TK),
    )]
    attention_fwd<[F]> {
        let units = comptime!((BQ / TQ) * (BK / TK));
        let lowest = f32::min_value();
        let tile = query_tile(bounds_q, bounds_k, max_q, max_k, group, shift, BQ, causal);
        let (i0, h, hk) = (tile.i0, tile.h, tile.hk);
        let (bos_q, sq, bos_k, sk) = (tile.bos_q, tile.sq, tile.bos_k, tile.sk);
        let (rows, kmax) = (tile.rows, tile.kmax);
        let kv_heads = heads / group;
        let v0 = CUBE_POS_Z * BV;

        let bdv = comptime!(BD / 4);
        let bkv = comptime!(BK / 4);
        let bvv = comptime!(BV / 4);
        let mut qs = SharedMemory::<V4>::new(comptime!((BQ * bdv) as usize));
        let mut kt = SharedMemory::<V4>::new(comptime!((BD * bkv) as usize));
        let mut ps = SharedMemory::<V4>::new(comptime!((BQ * bkv) as usize));
        let mut vs = SharedMemory::<V4>::new(comptime!((BK * bvv) as usize));
        // Per row: the rescale factor of the current tile, then the final denominator.
        let mut stat = SharedMemory::<f32>::new(comptime!(BQ as usize));

        let ux = comptime!(BK / TK);
        let ty = UNIT_POS / ux;
        let tx = UNIT_POS % ux;
        let row_step = comptime!(BQ / TQ);
        let tkv = comptime!(TK / 4);
        let tv = comptime!(BV / (BK / TK));
        let tvv = comptime!(tv / 4);
        let mut acc_s = Array::<V4>::new(comptime!((TQ * tkv) as usize));
        let mut acc_o = Array::<V4>::new(comptime!((TQ * tvv) as usize));
        let zero = V4::new(0.0f32);
        #[unroll]
        for e in 0..TQ * tvv {
            acc_o[e as usize] = zero;
        }
        // The running (max, sum) of row UNIT_POS (< BQ), kept by that unit.
        let mut m_run = lowest;
        let mut l_run = 0.0f32;

        let q_base = ((bos_q + i0) * heads + h) * dk;
        let k_base = (bos_k * kv_heads + hk) * dk;
        let v_base = (bos_k * kv_heads + hk) * dv + v0;
        let mut k0 = 0u32;
        while k0 < kmax {
            let keys = min(kmax - k0, BK);
            // 1. S = Q K^T over depth chunks (K staged transposed: depth rows, key columns).
            tile_product_nt::<F>(
                &mut acc_s,
                &mut qs,
                &mut kt,
                q,
                q_base,
                heads * dk,
                rows,
                k,
                k_base + k0 * kv_heads * dk,
                kv_heads * dk,
                keys,
                dk,
                ty,
                tx,
                BQ,
                BK,
                BD,
                TQ,
                TK,
                units,
                local_scalars,
            );
            // 2. Scaled, masked scores into `ps`; stage the V tile.
            #[unroll]
            for i in 0..TQ {
                let r = ty + i * row_step;
                let pos = i32::cast_from(i0 + r) + shift;
                #[unroll]
                for jv in 0..tkv {
                    let cv = tx + jv * ux;
                    let mut s = acc_s[(i * tkv + jv) as usize] * V4::new(scale);
                    #[unroll]
                    for e in 0..4u32 {
                        let j = cv * 4 + e;
                        let mut seen = j < keys;
                        if comptime!(causal) {
                            seen = seen && i32::cast_from(k0 + j) <= pos;
                        }
                        s[e as usize] = select(seen, s[e as usize], lowest);
                    }
                    ps[(r * bkv + cv) as usize] = s;
                }
            }
            let cols = select(v0 < dv, min(dv - v0, BV), 0u32);
            load_tile_v4::<F>(
                &mut vs,
                0,
                v,
                v_base + k0 * kv_heads * dv,
                kv_heads * dv,
                1,
                keys,
                cols,
                BK,
                BV,
                units,
            );
            sync_cube();
            // 3. Online softmax: unit r owns row r. Masked scores (lowest) give p = 0, also
            //    while the row has seen nothing else (m = lowest, where exp(0) would be 1).
            //    A NaN score gives NaN p, so l and the row become NaN, as in PyTorch
            //    (`max` may drop NaN, the exponential and the sum do not).
            if UNIT_POS < BQ {
                let r = UNIT_POS;
                let mut tmax = lowest;
                for jv in 0..bkv {
                    let s = ps[(r * bkv + jv) as usize];
                    #[unroll]
                    for e in 0..4u32 {
                        tmax = max(tmax, s[e as usize]);
                    }
                }
                let m_new = max(m_run, tmax);
                let alpha = f32::exp(m_run - m_new);
                let mut sum = 0.0f32;
                for jv in 0..bkv {
                    let s = ps[(r * bkv + jv) as usize];
                    let mut pv = V4::exp(s - V4::new(m_new));
                    #[unroll]
                    for e in 0..4u32 {
                        // Masked keys hold exactly `lowest`; NaN scores are kept (as NaN p).
                        pv[e as usize] = select(s[e as usize] == lowest, 0.0f32, pv[e as usize]);
                        sum += pv[e as usize];
                    }
                    ps[(r * bkv + jv) as usize] = pv;
                }
                l_run = l_run * alpha + sum;
                m_run = m_new;
                stat[r as usize] = alpha;
            }
            sync_cube();
            // 4. O = alpha O + P V.
            #[unroll]
            for i in 0..TQ {
                let alpha = V4::new(stat[(ty + i * row_step) as usize]);
                #[unroll]
                for jv in 0..tvv {
                    let x = (i * tvv + jv) as usize;
                    acc_o[x] = acc_o[x] * alpha;
                }
            }
            reg_tile_mma_v4(&mut acc_o, &ps, 0, &vs, 0, ty, tx, BQ, BV, BK, TQ, tv, local_scalars);
            k0 += BK;
        }

        // Every unit has read the last tile's rescale factors from `stat` (step 4) before
        // they are overwritten with the denominators. Without this barrier a unit that
        // finished its tile early overwrote rows that others had still to read: found by
        // the CUDA emulator (tools/cuda-emu), wrong from column 4 on in 78 % of `out`
        // there; a GPU's warps mostly kept pace and hid it.
        sync_cube();
        // The row's log-sum-exp and denominator (an empty row: l = 0, lse = -inf through
        // ln(0), and 1 as the denominator of an all-zero accumulator).
        if UNIT_POS < BQ {
            let r = UNIT_POS;
            stat[r as usize] = select(l_run == 0.0, 1.0f32, l_run);
            if CUBE_POS_Z == 0 && r < rows {
                write_lse(lse, &tile, r, heads, lse_rows, m_run, l_run, temperature, log_lse_scale, varlen);
            }
        }
        sync_cube();
        #[unroll]
        for i in 0..TQ {
            let r = ty + i * row_step;
            let denom = stat[r as usize];
            let o_base = ((bos_q + i0 + r) * heads + h) * dv + v0;
            #[unroll]
            for j in 0..tv {
                let c = v4_tile_col(tx, j, BV, tv);
                if r < rows && v0 + c < dv {
                    let value = acc_o[(i * tvv + j / 4) as usize][(j % 4) as usize] / denom;
                    if comptime!(out_f32) {
                        out32[(o_base + c) as usize] = value;
                    } else {
                        out[(o_base + c) as usize] = F::cast_from(value);
                    }
                }
            }
        }
    }
}
