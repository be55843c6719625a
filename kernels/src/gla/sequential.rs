//! The token-by-token forms: the recurrent forward and the in-place decode step.

use super::forward::gates_f32;
use super::problem::*;
use super::*;
use crate::launch::{absent, or_absent, shape_err};
use kiln_runtime::{DType, Error, Result, Tensor};

/// The recurrent forward: same contract as [`gla`] (`chunk_size` is ignored).
pub fn gla_recurrent(inp: &GlaInputs<'_>, opts: &GlaOptions) -> Result<GlaOutput> {
    let p = check(inp, opts.scale)?;
    let client = inp.q.client();
    let c = chunk_table(client, &p, 64)?;
    let g = gates_f32(inp.g)?;
    let state = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let o = Tensor::empty(client, p.dtype, inp.v.shape())?;
    let init = or_absent(client, inp.h0)?;
    GlaRecurrent::tuned(
        client,
        RECURRENT_TOLERANCE,
        &GlaRecurrentArgs {
            q: inp.q,
            k: inp.k,
            v: inp.v,
            g: &g,
            bounds: &c.bounds,
            init: &init,
            state: &state,
            o: &o,
            n_seq: p.n_seq() as u32,
            heads: p.heads as u32,
            scale: p.scale,
            dk: p.dk as u32,
            dv: p.dv as u32,
            init_mode: if inp.h0.is_some() {
                StateInit::FromInit
            } else {
                StateInit::Zero
            },
        },
    )?;
    Ok(GlaOutput {
        o,
        ht: opts.output_final_state.then_some(state),
    })
}

/// One decode step: q, k, g `[B, 1, H, K]`, v `[B, 1, H, V]`, `state` `[B, H, K, V]`
/// f32, which is **updated in place** to `diag(exp(g)) state + k^T v`; returns
/// `o = scale q state` `[B, 1, H, V]` in q's dtype. `scale` `None` means `K^-1/2`.
/// Runs the recurrent kernel's first configuration (an in-place kernel cannot be
/// tuned by re-running it).
pub fn gla_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    state: &Tensor,
    scale: Option<f64>,
) -> Result<Tensor> {
    if q.rank() != 4 || q.shape()[1] != 1 {
        return Err(shape_err(
            "q",
            "[B, 1, H, K] (one token per sequence)".into(),
            q.shape(),
        ));
    }
    let inp = GlaInputs {
        q,
        k,
        v,
        g,
        h0: Some(state),
        cu_seqlens: None,
    };
    let p = check(&inp, scale).map_err(|e| match e {
        // The state plays h0's part here: name it as the caller knows it.
        Error::Shape {
            tensor,
            expected,
            found,
        } if tensor == "h0" => Error::Shape {
            tensor: "state".into(),
            expected,
            found,
        },
        Error::DType {
            tensor,
            expected,
            found,
        } if tensor == "h0" => Error::DType {
            tensor: "state".into(),
            expected,
            found,
        },
        other => other,
    })?;
    let client = q.client();
    let c = chunk_table(client, &p, 64)?;
    let g = gates_f32(g)?;
    let o = Tensor::empty(client, p.dtype, v.shape())?;
    let (n, h) = (p.n_seq() as u32, p.heads as u32);
    let (dk, dv) = (p.dk as u32, p.dv as u32);
    let cfg = GlaRecurrent::space(
        client,
        &GlaRecurrentProblem {
            n_seq: n,
            heads: h,
            scale: p.scale,
            dk,
            dv,
            init_mode: StateInit::InPlace,
        },
    )
    .into_iter()
    .next()
    .ok_or_else(|| Error::Kernel {
        kernel: "gla_recurrent".into(),
        message: "no configuration fits this device".into(),
    })?;
    let dummy = absent(client)?;
    GlaRecurrent::launch(
        client,
        &cfg,
        &GlaRecurrentArgs {
            q,
            k,
            v,
            g: &g,
            bounds: &c.bounds,
            init: &dummy,
            state,
            o: &o,
            n_seq: n,
            heads: h,
            scale: p.scale,
            dk,
            dv,
            init_mode: StateInit::InPlace,
        },
    )?;
    Ok(o)
}
