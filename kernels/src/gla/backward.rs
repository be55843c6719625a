//! The chunked backward: recomputed per-chunk states, then dq, dk, dv, dg and dh0.

use super::forward::{chunk_size, forward_states};
use super::problem::*;
use super::*;
use crate::launch::{check_input, expect_shape, or_absent};
use kiln_runtime::{DType, Result, Tensor};

/// The chunked backward of [`gla`]'s `o` (and `ht`, through `dht`).
pub fn gla_backward(
    inp: &GlaInputs<'_>,
    grad: &GlaGradInputs<'_>,
    opts: &GlaOptions,
) -> Result<GlaGrads> {
    let p = check(inp, opts.scale)?;
    let client = inp.q.client();
    check_input("do", grad.d_o, client)?;
    grad.d_o.expect_dtype("do", &[p.dtype])?;
    expect_shape("do", grad.d_o, inp.v.shape(), "v's shape")?;
    if let Some(dht) = grad.dht {
        dht.expect_usable("dht", client)?;
        dht.expect_dtype("dht", &[DType::F32])?;
        expect_shape("dht", dht, &p.state_shape(), "[N, H, K, V]")?;
    }
    // The forward's chunk size (tuned on the forward when not given).
    let chunk = chunk_size(inp, &p, opts.chunk_size)?;
    let c = chunk_table(client, &p, chunk)?;
    let st = forward_states(inp, &p, &c, chunk)?;
    let (h, dk, dv) = (p.heads as u32, p.dk as u32, p.dv as u32);
    let nc = c.count as u32;

    let dhs = Tensor::empty(client, DType::F32, &[c.count.max(1), p.heads, p.dk, p.dv])?;
    let dh0 = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let dht = or_absent(client, grad.dht)?;
    GlaStatePass::tuned(
        client,
        CHUNK_TOLERANCE,
        &GlaStatePassArgs {
            x: inp.q,
            y: grad.d_o,
            gc: &st.gc,
            chunks: &c.table,
            seq_chunks: &c.seq_chunks,
            init: &dht,
            states: &dhs,
            last: &dh0,
            n_seq: p.n_seq() as u32,
            heads: h,
            dk,
            dv,
            scale: p.scale,
            chunk: chunk as u32,
            reverse: true,
            has_init: grad.dht.is_some(),
        },
    )?;

    let dq = Tensor::empty(client, p.dtype, inp.q.shape())?;
    let dkt = Tensor::empty(client, p.dtype, inp.k.shape())?;
    let dvt = Tensor::empty(client, p.dtype, inp.v.shape())?;
    let dg = Tensor::empty(client, inp.g.dtype(), inp.g.shape())?;
    if c.count > 0 {
        let a = Tensor::empty(client, DType::F32, &[c.count, p.heads, chunk, chunk])?;
        let da = Tensor::empty(client, DType::F32, &[c.count, p.heads, chunk, chunk])?;
        GlaScores::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaScoresArgs {
                x: inp.q,
                y: inp.k,
                gc: &st.gc,
                chunks: &c.table,
                a: &a,
                n_chunks: nc,
                heads: h,
                dd: dk,
                scale: p.scale,
                chunk: chunk as u32,
                decay: true,
            },
        )?;
        GlaScores::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaScoresArgs {
                x: grad.d_o,
                y: inp.v,
                gc: &st.gc,
                chunks: &c.table,
                a: &da,
                n_chunks: nc,
                heads: h,
                dd: dv,
                scale: p.scale,
                chunk: chunk as u32,
                decay: false,
            },
        )?;
        GlaChunkOut::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaChunkOutArgs {
                x: inp.k,
                y: grad.d_o,
                gc: &st.gc,
                chunks: &c.table,
                states: &dhs,
                m: &a,
                out: &dvt,
                n_chunks: nc,
                heads: h,
                dk,
                dv,
                scale: p.scale,
                chunk: chunk as u32,
                backward: true,
            },
        )?;
        let dgt = Tensor::empty(client, DType::F32, &[p.rows(), p.heads, p.dk])?;
        GlaBwdDqk::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaBwdDqkArgs {
                q: inp.q,
                k: inp.k,
                v: inp.v,
                d_o: grad.d_o,
                gc: &st.gc,
                chunks: &c.table,
                hs: &st.hs,
                dhs: &dhs,
                da: &da,
                dq: &dq,
                dk_out: &dkt,
                dgt: &dgt,
                n_chunks: nc,
                heads: h,
                dk,
                dv,
                scale: p.scale,
                chunk: chunk as u32,
            },
        )?;
        GlaBwdDg::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaBwdDgArgs {
                dgt: &dgt,
                ht: &st.ht,
                dht: &dht,
                bounds: &c.bounds,
                dg: &dg,
                n_seq: p.n_seq() as u32,
                heads: h,
                dk,
                dv,
                has_dht: grad.dht.is_some(),
            },
        )?;
    }
    Ok(GlaGrads {
        dq,
        dk: dkt,
        dv: dvt,
        dg,
        dh0: inp.h0.is_some().then_some(dh0),
    })
}
