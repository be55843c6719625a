//! The backward block (FlashAttention-2's, without atomics: WGSL has no float atomics).
//!
//! With `L_i` the natural log-sum-exp of row `i`'s scores `c s_ij` (`c = scale / T`,
//! recovered from the recorded `lse` as `(lse - ln S) / T`), `p_ij = exp(c s_ij - L_i)`
//! and `delta_i = sum_e do_ie out_ie`:
//! `dv_j = sum_i p_ij do_i`, `ds_ij = p_ij (do_i . v_j - delta_i)`,
//! `dq_i = c sum_j ds_ij k_j`, `dk_j = c sum_i ds_ij q_i`.
//!
//! Three kernels: `attention_bwd_prep` (delta and `L`, once per row), `attention_bwd_dq`
//! (one cube per query tile and head, walking the keys) and `attention_bwd_dkv` (one
//! cube per key tile and KV head, walking every query head of its group and the query
//! tiles that see it: dk and dv are summed over the group in registers, written once).
//! Each recomputes `p` from `L`, so nothing of size `Sq x Sk` is stored. Passing the
//! global `out` and `lse` of a ring (instead of the block's own) gives that block's
//! share of the whole gradient.
//!
//! Longer than most files: the host side and the kernels of one backward pass (`delta`,
//! then dq and dk/dv), which share the recomputation of `p` from `lse`.
#![allow(clippy::manual_div_ceil)] // kernel code: `(a + b - 1) / b` is what the emitted code does, written as such

use super::backward_tc::{
    AttentionBwdDkvCmma, AttentionBwdDkvCmmaArgs, AttentionBwdDkvCmmaProblem, AttentionBwdDqCmma,
    AttentionBwdDqCmmaArgs, AttentionBwdDqCmmaProblem,
};
use super::problem::{check, Problem};
use super::tile::{key_tile, lse_index, query_stats, query_tile, row_lse};
use super::*;
use crate::launch::{absent, expect_shape};
use cubecl::prelude::*;
use kiln_dsl::{linear_unit, load_tile_v4, reg_tile_mma_v4, tile_product_nt, v4_tile_col, V4};
use kiln_runtime::tune::{Choice, Tolerance};
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// Candidates differ in tile shapes only, never in the order of a sum over a tile.
const TOLERANCE: f64 = 1e-4;

/// The backward's extra inputs.
#[derive(Clone, Copy)]
pub struct AttentionGradInputs<'a> {
    /// The forward's output `[B, Sq, H, Dv]`, q's dtype or f32 (for a ring: the merged
    /// whole-sequence output).
    pub out: &'a Tensor,
    /// The forward's log-sum-exp `[B, H, Sq]` f32 (for a ring: the merged one).
    pub lse: &'a Tensor,
    /// dL/dout `[B, Sq, H, Dv]`, q's dtype.
    pub d_o: &'a Tensor,
}

/// The backward's results, in the dtypes and shapes of q, k, v.
pub struct AttentionGrads {
    /// `[B, Sq, H, D]`.
    pub dq: Tensor,
    /// `[B, Sk, Hkv, D]`, summed over each KV head's query-head group.
    pub dk: Tensor,
    /// `[B, Sk, Hkv, Dv]`, summed likewise.
    pub dv: Tensor,
}

/// Gradients of `sum(do * out)` with respect to q, k and v for the attention of
/// `inp` with `opts` (the options of the forward that made `out` and `lse`).
pub fn attention_backward(
    inp: &AttentionInputs<'_>,
    grad: &AttentionGradInputs<'_>,
    opts: &AttentionOptions,
) -> Result<AttentionGrads> {
    attention_backward_with(inp, grad, opts, None)
}

/// [`attention_backward`] with the pair of gradient kernels given (`None`: the
/// autotuner's choice; `kiln run attention_backward --set kernel=..`), each still tuned
/// among its tiles. Tensor cores where the device or dtype lacks them are refused as
/// unsupported.
pub fn attention_backward_with(
    inp: &AttentionInputs<'_>,
    grad: &AttentionGradInputs<'_>,
    opts: &AttentionOptions,
    kernel: Option<BackwardKernel>,
) -> Result<AttentionGrads> {
    let p = check(inp, opts)?;
    let client = inp.q.client();
    check_grad_inputs(grad, &p)?;
    let dq = Tensor::empty(client, p.dtype, inp.q.shape())?;
    let dk = Tensor::empty(client, p.dtype, inp.k.shape())?;
    let dv = Tensor::empty(client, p.dtype, inp.v.shape())?;
    backward_into(inp, grad, &p, &dq, &dk, &dv, kernel)?;
    Ok(AttentionGrads { dq, dk, dv })
}

pub(super) fn check_grad_inputs(grad: &AttentionGradInputs<'_>, p: &Problem) -> Result<()> {
    let client = grad.out.client();
    crate::launch::check_input("do", grad.d_o, client)?;
    crate::launch::check_input("out", grad.out, client)?;
    grad.d_o.expect_dtype("do", &[p.dtype])?;
    grad.out.expect_dtype("out", &[p.dtype, DType::F32])?;
    expect_shape("do", grad.d_o, &p.out_shape(), "[B, Sq, H, Dv] of q and v")?;
    expect_shape("out", grad.out, &p.out_shape(), "[B, Sq, H, Dv] of q and v")?;
    grad.lse.expect_usable("lse", client)?;
    grad.lse.expect_dtype("lse", &[DType::F32])?;
    expect_shape("lse", grad.lse, &p.lse_shape(), "[B, H, Sq] of q")
}

/// Runs the three backward kernels of a checked problem into dq, dk, dv (all in q's
/// dtype, or all f32: the partial gradients a ring sums).
pub(super) fn backward_into(
    inp: &AttentionInputs<'_>,
    grad: &AttentionGradInputs<'_>,
    p: &Problem,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    kernel: Option<BackwardKernel>,
) -> Result<()> {
    let client = inp.q.client();
    // A pinned pair the problem lacks is refused before anything runs.
    let fitting = BackwardKernel::fitting(client, p);
    if let Some(k) = kernel.filter(|k| !fitting.contains(k)) {
        return Err(BackwardKernel::refusal(client, p, k, &fitting));
    }
    let (bounds_q, bounds_k) = p.upload_bounds(client)?;
    let rows = p.batch * p.sq * p.heads;
    // delta and L in lse's layout.
    let delta = Tensor::empty(client, DType::F32, &p.lse_shape())?;
    let lse_n = Tensor::empty(client, DType::F32, &p.lse_shape())?;
    if rows > 0 {
        let out_f32 = grad.out.dtype() != p.dtype;
        let placeholder = match out_f32 {
            true => Tensor::empty(client, p.dtype, &[1])?,
            false => absent(client)?,
        };
        let (o, o32) = if out_f32 {
            (&placeholder, grad.out)
        } else {
            (grad.out, &placeholder)
        };
        AttentionBwdPrep::tuned(
            client,
            0.0,
            &AttentionBwdPrepArgs {
                d_o: grad.d_o,
                out: o,
                out32: o32,
                lse: grad.lse,
                delta: &delta,
                lse_n: &lse_n,
                rows: rows as u32,
                heads: p.heads as u32,
                sq: p.sq as u32,
                dv: p.dv as u32,
                temperature: p.temperature as f32,
                log_lse_scale: p.lse_scale.ln() as f32,
                out_f32,
                varlen: p.varlen,
            },
        )?;
    }
    let grad_f32 = dq.dtype() == DType::F32 && p.dtype != DType::F32;
    let grads = Grads {
        inp,
        p,
        bounds: (&bounds_q, &bounds_k),
        d_o: grad.d_o,
        lse_n: &lse_n,
        delta: &delta,
        grad_f32,
    };
    let kernel = match kernel {
        Some(k) => k,
        None if fitting.len() == 1 => fitting[0],
        None => Choice::new("attention_bwd_kernel")
            .sources([
                AttentionBwdDq::source_hash(),
                AttentionBwdDkv::source_hash(),
                AttentionBwdDqCmma::source_hash(),
                AttentionBwdDkvCmma::source_hash(),
            ])
            .dim("n_seq", p.n_seq())
            .dim("max_q", Problem::longest(&p.bounds_q))
            .dim("max_k", Problem::longest(&p.bounds_k))
            .dim("heads", p.heads)
            .dim("kv_heads", p.kv_heads)
            .dim("dk", p.dk)
            .dim("dv", p.dv)
            .exact("dtype", p.dtype)
            .exact("causal", p.causal)
            .exact("varlen", p.varlen)
            .candidates(fitting.clone())
            .tune(
                client,
                grads.tolerance(&fitting),
                |k| k.name().into(),
                |&k| {
                    // Fresh outputs per candidate: the tuner compares them.
                    let fresh = |t: &Tensor| Tensor::empty(client, t.dtype(), t.shape());
                    let (dq, dk, dv) = (fresh(dq)?, fresh(dk)?, fresh(dv)?);
                    grads.launch(k, &dq, &dk, &dv)?;
                    Ok(vec![dq, dk, dv])
                },
            )?,
    };
    grads.launch(kernel, dq, dk, dv)
}

/// The backward's pair of gradient kernels: FMA tiles, or tensor cores
/// (`backward_tc.rs`: f16/bf16 on devices that report them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackwardKernel {
    /// `attention_bwd_dq` and `attention_bwd_dkv` (any dtype, any device).
    Fma,
    /// `attention_bwd_dq_cmma` and `attention_bwd_dkv_cmma`.
    TensorCore,
}

pinnable_by_name!(BackwardKernel, "kernel", {
    Fma => "fma",
    TensorCore => "tensor_cores",
});

impl BackwardKernel {
    /// The pairs that take the problem on this device (the FMA pair first: the
    /// tuner's reference).
    fn fitting(client: &Client, p: &Problem) -> Vec<BackwardKernel> {
        let mut kernels = vec![BackwardKernel::Fma];
        let dims = |dk: usize, dv: usize| (dk as u32, dv as u32);
        let (dk, dv) = dims(p.dk, p.dv);
        let dq = AttentionBwdDqCmmaProblem {
            dk,
            dv,
            ..Default::default()
        };
        let dkv = AttentionBwdDkvCmmaProblem {
            dk,
            dv,
            ..Default::default()
        };
        if matches!(p.dtype, DType::F16 | DType::BF16)
            && !AttentionBwdDqCmma::space(client, &dq).is_empty()
            && !AttentionBwdDkvCmma::space(client, &dkv).is_empty()
        {
            kernels.push(BackwardKernel::TensorCore);
        }
        kernels
    }

    /// Why `kernel` does not take the problem: tensor cores as unsupported (the
    /// self-test's cue), by name otherwise.
    fn refusal(client: &Client, p: &Problem, kernel: BackwardKernel, fitting: &[Self]) -> Error {
        let names: Vec<&str> = fitting.iter().map(|k| k.name()).collect();
        let report = client.report();
        match kernel {
            BackwardKernel::TensorCore => Error::Unsupported {
                device: report.name.clone(),
                feature: format!(
                    "tensor cores for the attention backward (kernel=tensor_cores needs f16 \
                     or bf16 q, k, v; found {} on a device that reports {}tensor cores; this \
                     problem's kernels: {})",
                    p.dtype,
                    if report.tensor_cores { "" } else { "no " },
                    names.join(" | ")
                ),
            },
            BackwardKernel::Fma => Error::Param {
                param: "kernel".into(),
                expected: names.join(" | "),
                found: kernel.name().into(),
            },
        }
    }
}

/// What the gradient kernels share: the inputs, the problem, the uploaded bounds, and
/// `delta` and `L` from `attention_bwd_prep`.
struct Grads<'a> {
    inp: &'a AttentionInputs<'a>,
    p: &'a Problem,
    bounds: (&'a Tensor, &'a Tensor),
    d_o: &'a Tensor,
    lse_n: &'a Tensor,
    delta: &'a Tensor,
    grad_f32: bool,
}

impl Grads<'_> {
    /// The FMA kernels' [`TOLERANCE`], or where the tensor-core pair takes part (it
    /// rounds `P` and `dS` to the operand dtype before their products: an absolute error
    /// of about one rounding of a row's magnitude), four roundings of the operand dtype
    /// against the output's largest magnitude (the measure's floor).
    fn tolerance(&self, kernels: &[BackwardKernel]) -> Tolerance {
        match kernels.contains(&BackwardKernel::TensorCore) {
            true => Tolerance {
                rel: TOLERANCE.max(4.0 * self.p.dtype.epsilon()),
                floor: 1.0,
            },
            false => TOLERANCE.into(),
        }
    }

    /// Launches `kernel`'s pair (each tuned among its tiles) into dq, dk, dv.
    fn launch(&self, kernel: BackwardKernel, dq: &Tensor, dk: &Tensor, dv: &Tensor) -> Result<()> {
        let (inp, p) = (self.inp, self.p);
        let (bounds_q, bounds_k) = self.bounds;
        let client = inp.q.client();
        let grad_f32 = self.grad_f32;
        let tol = self.tolerance(&[kernel]);
        // The outputs the kernels do not write are bound to one-element placeholders.
        let ph_f = Tensor::empty(client, p.dtype, &[1])?;
        let ph_32 = absent(client)?;
        let pick = |t: &'_ Tensor| -> (Tensor, Tensor) {
            match grad_f32 {
                true => (ph_f.clone(), t.clone()),
                false => (t.clone(), ph_32.clone()),
            }
        };
        let ((dq_f, dq_32), (dk_f, dk_32), (dv_f, dv_32)) = (pick(dq), pick(dk), pick(dv));
        if p.batch * p.sq * p.heads > 0 {
            macro_rules! dq_args {
                ($args:ident) => {
                    attention_args!($args, inp, p, bounds_q, bounds_k, {
                        d_o: self.d_o,
                        lse_n: self.lse_n,
                        delta: self.delta,
                        dq: &dq_f,
                        dq32: &dq_32,
                        grad_f32,
                    })
                };
            }
            match kernel {
                BackwardKernel::Fma => {
                    AttentionBwdDq::tuned(client, tol, &dq_args!(AttentionBwdDqArgs)).map(drop)?
                }
                BackwardKernel::TensorCore => {
                    AttentionBwdDqCmma::tuned(client, tol, &dq_args!(AttentionBwdDqCmmaArgs))
                        .map(drop)?
                }
            }
        }
        if Problem::longest(&p.bounds_k) > 0 {
            macro_rules! dkv_args {
                ($args:ident) => {
                    attention_args!($args, inp, p, bounds_q, bounds_k, {
                        d_o: self.d_o,
                        lse_n: self.lse_n,
                        delta: self.delta,
                        dk_out: &dk_f,
                        dv_out: &dv_f,
                        dk32: &dk_32,
                        dv32: &dv_32,
                        grad_f32,
                    })
                };
            }
            match kernel {
                BackwardKernel::Fma => {
                    AttentionBwdDkv::tuned(client, tol, &dkv_args!(AttentionBwdDkvArgs))
                        .map(drop)?
                }
                BackwardKernel::TensorCore => {
                    AttentionBwdDkvCmma::tuned(client, tol, &dkv_args!(AttentionBwdDkvCmmaArgs))
                        .map(drop)?
                }
            }
        }
        Ok(())
    }
}

/// Per (token, head) row `r = t H + h`: `delta = sum_e do_e out_e` (f32) and the
/// natural log-sum-exp `L = (lse - log_lse_scale) / T`, both in lse's `[B, H, Sq]`
/// layout (`varlen`: `[1, H, T]`). `out` is read in F, or in f32 from `out32`.
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(rows = pow2, dv = pow2, dtype),
    grid = cubes(rows.div_ceil(UNITS)),
    cube = UNITS,
    defaults(out_f32 = false, varlen = false)
)]
pub fn attention_bwd_prep<F: Float>(
    d_o: &Array<F>,
    out: &Array<F>,
    out32: &Array<f32>,
    lse: &Array<f32>,
    delta: &mut Array<f32>,
    lse_n: &mut Array<f32>,
    rows: u32,
    heads: u32,
    sq: u32,
    dv: u32,
    temperature: f32,
    log_lse_scale: f32,
    #[comptime] out_f32: bool,
    #[comptime] varlen: bool,
) {
    let r = linear_unit() as u32;
    if r < rows {
        let t = r / heads;
        let h = r % heads;
        let mut li = (t / sq * heads + h) * sq + t % sq;
        if comptime!(varlen) {
            li = h * sq + t;
        }
        let mut acc = 0.0f32;
        for c in 0..dv {
            let i = (r * dv + c) as usize;
            let o = if comptime!(out_f32) {
                out32[i]
            } else {
                f32::cast_from(out[i])
            };
            acc += f32::cast_from(d_o[i]) * o;
        }
        delta[li as usize] = acc;
        // -inf (a row that saw no key) stays -inf.
        lse_n[li as usize] = (lse[li as usize] - log_lse_scale) / temperature;
    }
}

attention_grad_kernel! {
    /// dq of one (sequence, query tile of `BQ`, head, dq column tile of `BC`): walks the
    /// keys the tile sees in tiles of `BK`; `ds` staged in shared memory for `dq += ds K`.
    #[kernel(
        tune(
            (BQ, BK, TQ, TK) = [(32, 32, 4, 4), (64, 32, 8, 4), (16, 32, 2, 4)],
            BC = [64, 32, 128],
            BD = [32]
        ),
        require(
            BC % (4 * (BK / TK)) == 0,
            BC <= 32 || dk > BC / 2,
            (BQ * BD + BD * BK + BQ * BK + BK * BC) as usize * 4 <= device.max_shared_memory
        ),
        grid = (n_seq * max_q.div_ceil(BQ), heads, dk.div_ceil(BC)),
        cube = (BQ / TQ) * (BK / TK),
    )]
    attention_bwd_dq(dq: &mut Array<F>, dq32: &mut Array<f32>) {
        let units = comptime!((BQ / TQ) * (BK / TK));
        let tile = query_tile(bounds_q, bounds_k, max_q, max_k, group, shift, BQ, causal);
        let (n, i0, h, hk) = (tile.n, tile.i0, tile.h, tile.hk);
        let (bos_q, sq, bos_k, sk) = (tile.bos_q, tile.sq, tile.bos_k, tile.sk);
        let (rows, kmax) = (tile.rows, tile.kmax);
        let kv_heads = heads / group;
        let c0 = CUBE_POS_Z * BC;

        let ux = comptime!(BK / TK);
        let ty = UNIT_POS / ux;
        let tx = UNIT_POS % ux;
        let row_step = comptime!(BQ / TQ);
        let tkv = comptime!(TK / 4);
        let bkv = comptime!(BK / 4);
        let tc = comptime!(BC / (BK / TK));
        let tcv = comptime!(tc / 4);
        let mut xs = SharedMemory::<V4>::new(comptime!((BQ * BD / 4) as usize));
        let mut yt = SharedMemory::<V4>::new(comptime!((BD * BK / 4) as usize));
        let mut ds_s = SharedMemory::<V4>::new(comptime!((BQ * bkv) as usize));
        let mut kc = SharedMemory::<V4>::new(comptime!((BK * BC / 4) as usize));
        let mut acc_s = Array::<V4>::new(comptime!((TQ * tkv) as usize));
        let mut acc_dp = Array::<V4>::new(comptime!((TQ * tkv) as usize));
        let mut acc = Array::<V4>::new(comptime!((TQ * tcv) as usize));
        #[unroll]
        for e in 0..TQ * tcv {
            acc[e as usize] = V4::new(0.0f32);
        }
        // The unit's rows' L and delta (rows past the tile: L = -inf through the flag).
        let mut lr = Array::<f32>::new(comptime!(TQ as usize));
        let mut dr = Array::<f32>::new(comptime!(TQ as usize));
        #[unroll]
        for i in 0..TQ {
            let r = ty + i * row_step;
            // Rows past the tile (or of an idle cube) read entry 0 and are flagged.
            let at = lse_index(n, heads, h, lse_rows, bos_q, i0 + r, varlen);
            let li = select(r < rows, at, 0u32) as usize;
            lr[i as usize] = row_lse(lse_n[li], r < rows);
            dr[i as usize] = delta[li];
        }

        let q_base = ((bos_q + i0) * heads + h) * dk;
        let o_base = ((bos_q + i0) * heads + h) * dv;
        let k_row = (bos_k * kv_heads + hk) * dk;
        let v_row = (bos_k * kv_heads + hk) * dv;
        let mut k0 = 0u32;
        while k0 < kmax {
            let keys = min(kmax - k0, BK);
            tile_product_nt::<F>(
                &mut acc_s,
                &mut xs,
                &mut yt,
                q,
                q_base,
                heads * dk,
                rows,
                k,
                k_row + k0 * kv_heads * dk,
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
            tile_product_nt::<F>(
                &mut acc_dp,
                &mut xs,
                &mut yt,
                d_o,
                o_base,
                heads * dv,
                rows,
                v,
                v_row + k0 * kv_heads * dv,
                kv_heads * dv,
                keys,
                dv,
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
            #[unroll]
            for i in 0..TQ {
                let r = ty + i * row_step;
                let pos = i32::cast_from(i0 + r) + shift;
                #[unroll]
                for jv in 0..tkv {
                    let cv = tx + jv * ux;
                    let x = (i * tkv + jv) as usize;
                    let mut ds = V4::new(0.0f32);
                    #[unroll]
                    for e in 0..4u32 {
                        let j = cv * 4 + e;
                        let mut ok = j < keys;
                        if comptime!(causal) {
                            ok = ok && i32::cast_from(k0 + j) <= pos;
                        }
                        // A masked key: p = 0, where the exponential would give inf or 1
                        // (a row that sees no key has `L` = f32::MAX: `row_lse`).
                        let pe = f32::exp(acc_s[x][e as usize] * scale - lr[i as usize]);
                        let pv = select(ok, pe, 0.0f32);
                        ds[e as usize] = pv * (acc_dp[x][e as usize] - dr[i as usize]);
                    }
                    ds_s[(r * bkv + cv) as usize] = ds;
                }
            }
            let cols = select(c0 < dk, min(dk - c0, BC), 0u32);
            load_tile_v4::<F>(
                &mut kc,
                0,
                k,
                k_row + k0 * kv_heads * dk + c0,
                kv_heads * dk,
                1,
                keys,
                cols,
                BK,
                BC,
                units,
            );
            sync_cube();
            reg_tile_mma_v4(&mut acc, &ds_s, 0, &kc, 0, ty, tx, BQ, BC, BK, TQ, tc, local_scalars);
            sync_cube();
            k0 += BK;
        }
        #[unroll]
        for i in 0..TQ {
            let r = ty + i * row_step;
            let base_out = ((bos_q + i0 + r) * heads + h) * dk + c0;
            #[unroll]
            for j in 0..tc {
                let c = v4_tile_col(tx, j, BC, tc);
                if r < rows && c0 + c < dk {
                    let value = acc[(i * tcv + j / 4) as usize][(j % 4) as usize] * scale;
                    if comptime!(grad_f32) {
                        dq32[(base_out + c) as usize] = value;
                    } else {
                        dq[(base_out + c) as usize] = F::cast_from(value);
                    }
                }
            }
        }
    }
}

attention_grad_kernel! {
    /// dk and dv of one (sequence, key tile of `BKR`, KV head, column tile of `BC` of both):
    /// walks the query heads of the group and the query tiles (of `BQC`) that see the keys.
    #[kernel(
        tune(
            (BKR, BQC, TR, TC) = [(32, 32, 4, 4), (64, 32, 8, 4), (16, 32, 2, 4)],
            BC = [64, 32, 128],
            BD = [32]
        ),
        require(
            BC % (4 * (BQC / TC)) == 0,
            BC <= 32 || dk > BC / 2 || dv > BC / 2,
            (BKR * BD + BD * BQC + 2 * BKR * BQC + BQC * BC + 2 * BQC) as usize * 4 <= device.max_shared_memory
        ),
        grid = (n_seq * max_k.div_ceil(BKR), heads / group, dk.max(dv).div_ceil(BC)),
        cube = (BKR / TR) * (BQC / TC),
    )]
    attention_bwd_dkv(
        dk_out: &mut Array<F>,
        dv_out: &mut Array<F>,
        dk32: &mut Array<f32>,
        dv32: &mut Array<f32>
    ) {
        let units = comptime!((BKR / TR) * (BQC / TC));
        let tile = key_tile(bounds_q, bounds_k, max_q, max_k, shift, BKR, causal);
        let (j0, hk, keys) = (tile.j0, tile.hk, tile.keys);
        let (bos_q, bos_k, qmin, qend) = (tile.bos_q, tile.bos_k, tile.qmin, tile.qend);
        let c0 = CUBE_POS_Z * BC;
        let kv_heads = heads / group;

        let ux = comptime!(BQC / TC);
        let ty = UNIT_POS / ux;
        let tx = UNIT_POS % ux;
        let row_step = comptime!(BKR / TR);
        let tcv_s = comptime!(TC / 4);
        let bqv = comptime!(BQC / 4);
        let tc = comptime!(BC / (BQC / TC));
        let tcv = comptime!(tc / 4);
        let mut xs = SharedMemory::<V4>::new(comptime!((BKR * BD / 4) as usize));
        let mut yt = SharedMemory::<V4>::new(comptime!((BD * BQC / 4) as usize));
        let mut pt = SharedMemory::<V4>::new(comptime!((BKR * bqv) as usize));
        let mut dst = SharedMemory::<V4>::new(comptime!((BKR * bqv) as usize));
        let mut yc = SharedMemory::<V4>::new(comptime!((BQC * BC / 4) as usize));
        let mut lcol = SharedMemory::<f32>::new(comptime!(BQC as usize));
        let mut dcol = SharedMemory::<f32>::new(comptime!(BQC as usize));
        let mut acc_s = Array::<V4>::new(comptime!((TR * tcv_s) as usize));
        let mut acc_dp = Array::<V4>::new(comptime!((TR * tcv_s) as usize));
        let mut acc_k = Array::<V4>::new(comptime!((TR * tcv) as usize));
        let mut acc_v = Array::<V4>::new(comptime!((TR * tcv) as usize));
        #[unroll]
        for e in 0..TR * tcv {
            acc_k[e as usize] = V4::new(0.0f32);
            acc_v[e as usize] = V4::new(0.0f32);
        }
        let k_base = ((bos_k + j0) * kv_heads + hk) * dk;
        let v_base = ((bos_k + j0) * kv_heads + hk) * dv;
        let dk_cols = select(c0 < dk, min(dk - c0, BC), 0u32);
        let dv_cols = select(c0 < dv, min(dv - c0, BC), 0u32);
        for g in 0..group {
            let h = hk * group + g;
            let mut i0 = qmin;
            while i0 < qend {
                let qs = min(qend - i0, BQC);
                // The tile's L and delta per query column (read before the first barrier).
                query_stats(&mut lcol, &mut dcol, lse_n, delta, &tile, heads, h, lse_rows, i0, qs, BQC, units, varlen);
                let q_base = ((bos_q + i0) * heads + h) * dk;
                let o_base = ((bos_q + i0) * heads + h) * dv;
                tile_product_nt::<F>(
                    &mut acc_s,
                    &mut xs,
                    &mut yt,
                    k,
                    k_base,
                    kv_heads * dk,
                    keys,
                    q,
                    q_base,
                    heads * dk,
                    qs,
                    dk,
                    ty,
                    tx,
                    BKR,
                    BQC,
                    BD,
                    TR,
                    TC,
                    units,
                    local_scalars,
                );
                tile_product_nt::<F>(
                    &mut acc_dp,
                    &mut xs,
                    &mut yt,
                    v,
                    v_base,
                    kv_heads * dv,
                    keys,
                    d_o,
                    o_base,
                    heads * dv,
                    qs,
                    dv,
                    ty,
                    tx,
                    BKR,
                    BQC,
                    BD,
                    TR,
                    TC,
                    units,
                    local_scalars,
                );
                #[unroll]
                for i in 0..TR {
                    let r = ty + i * row_step;
                    let key_pos = i32::cast_from(j0 + r);
                    #[unroll]
                    for jv in 0..tcv_s {
                        let cv = tx + jv * ux;
                        let x = (i * tcv_s + jv) as usize;
                        let mut p = V4::new(0.0f32);
                        let mut ds = V4::new(0.0f32);
                        #[unroll]
                        for e in 0..4u32 {
                            let col = cv * 4 + e;
                            let mut ok = r < keys && col < qs;
                            if comptime!(causal) {
                                ok = ok && key_pos <= i32::cast_from(i0 + col) + shift;
                            }
                            let l = lcol[col as usize];
                            let pe = f32::exp(acc_s[x][e as usize] * scale - l);
                            let pv = select(ok, pe, 0.0f32);
                            p[e as usize] = pv;
                            ds[e as usize] = pv * (acc_dp[x][e as usize] - dcol[col as usize]);
                        }
                        pt[(r * bqv + cv) as usize] = p;
                        dst[(r * bqv + cv) as usize] = ds;
                    }
                }
                // dv += P^T dO, then dk += dS^T Q (the column tile of each).
                load_tile_v4::<F>(
                    &mut yc,
                    0,
                    d_o,
                    o_base + c0,
                    heads * dv,
                    1,
                    qs,
                    dv_cols,
                    BQC,
                    BC,
                    units,
                );
                sync_cube();
                reg_tile_mma_v4(&mut acc_v, &pt, 0, &yc, 0, ty, tx, BKR, BC, BQC, TR, tc, local_scalars);
                sync_cube();
                load_tile_v4::<F>(
                    &mut yc,
                    0,
                    q,
                    q_base + c0,
                    heads * dk,
                    1,
                    qs,
                    dk_cols,
                    BQC,
                    BC,
                    units,
                );
                sync_cube();
                reg_tile_mma_v4(&mut acc_k, &dst, 0, &yc, 0, ty, tx, BKR, BC, BQC, TR, tc, local_scalars);
                sync_cube();
                i0 += BQC;
            }
        }
        #[unroll]
        for i in 0..TR {
            let r = ty + i * row_step;
            let kb = ((bos_k + j0 + r) * kv_heads + hk) * dk + c0;
            let vb = ((bos_k + j0 + r) * kv_heads + hk) * dv + c0;
            #[unroll]
            for j in 0..tc {
                let c = v4_tile_col(tx, j, BC, tc);
                let x = (i * tcv + j / 4) as usize;
                let gk = acc_k[x][(j % 4) as usize] * scale;
                let gv = acc_v[x][(j % 4) as usize];
                if r < keys && c < dk_cols {
                    if comptime!(grad_f32) {
                        dk32[(kb + c) as usize] = gk;
                    } else {
                        dk_out[(kb + c) as usize] = F::cast_from(gk);
                    }
                }
                if r < keys && c < dv_cols {
                    if comptime!(grad_f32) {
                        dv32[(vb + c) as usize] = gv;
                    } else {
                        dv_out[(vb + c) as usize] = F::cast_from(gv);
                    }
                }
            }
        }
    }
}
