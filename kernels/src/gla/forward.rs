//! The chunkwise forward: the chunk-parallel pipeline (cumsum, state pass, scores,
//! output), the fused kernel, and the autotuned choice of `mode` and `chunk_size`.

use super::problem::*;
use super::*;
use crate::gla::fused::GlaFusedFwdConfig;
use crate::launch::{or_absent, upload_u32};
use kiln_runtime::tune::Choice;
use kiln_runtime::{Client, DType, Error, Result, Tensor};

/// gc, the per-chunk states and the final state of the forward pass.
pub(super) struct ForwardStates {
    pub(super) gc: Tensor,
    pub(super) hs: Tensor,
    pub(super) ht: Tensor,
}

pub(super) fn forward_states(
    inp: &GlaInputs<'_>,
    p: &Problem,
    c: &Chunks,
    chunk: usize,
) -> Result<ForwardStates> {
    let client = inp.q.client();
    let (h, dk, dv) = (p.heads, p.dk, p.dv);
    let gc = Tensor::empty(client, DType::F32, &[p.rows(), h, dk])?;
    if c.count > 0 {
        GlaCumsum::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaCumsumArgs {
                g: inp.g,
                chunks: &c.table,
                gc: &gc,
                n_chunks: c.count as u32,
                heads: h as u32,
                dk: dk as u32,
            },
        )?;
    }
    let hs = Tensor::empty(client, DType::F32, &[c.count.max(1), h, dk, dv])?;
    let ht = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let init = or_absent(client, inp.h0)?;
    GlaStatePass::tuned(
        client,
        CHUNK_TOLERANCE,
        &GlaStatePassArgs {
            x: inp.k,
            y: inp.v,
            gc: &gc,
            chunks: &c.table,
            seq_chunks: &c.seq_chunks,
            init: &init,
            states: &hs,
            last: &ht,
            n_seq: p.n_seq() as u32,
            heads: h as u32,
            dk: dk as u32,
            dv: dv as u32,
            scale: p.scale,
            chunk: chunk as u32,
            reverse: false,
            has_init: inp.h0.is_some(),
        },
    )?;
    Ok(ForwardStates { gc, hs, ht })
}

/// The chunkwise forward: `o` (and `ht` when `opts.output_final_state`), by the
/// algorithm `opts.mode` names (autotuned by default).
pub fn gla(inp: &GlaInputs<'_>, opts: &GlaOptions) -> Result<GlaOutput> {
    let p = check(inp, opts.scale)?;
    // The parameters are checked whatever T is (an empty batch included).
    if matches!(opts.mode, GlaMode::FusedChunk) {
        check_fused(inp, &p, opts.chunk_size)?;
    }
    if let Some(c) = opts.chunk_size {
        check_chunk(c)?;
    }
    if p.rows() == 0 {
        // No tokens (T = 0): nothing to tune; `o` is empty and the state passes through.
        let (o, ht) = forward_chunked(inp, &p, opts.chunk_size.unwrap_or(64))?;
        return Ok(GlaOutput {
            o,
            ht: opts.output_final_state.then_some(ht),
        });
    }
    let fused = match (opts.mode, opts.chunk_size) {
        (GlaMode::FusedChunk, _) => true,
        (GlaMode::Auto, None) => forward_mode_is_fused(inp, &p)?,
        _ => false,
    };
    // An empty batch has nothing to fuse (the chunked path handles it).
    let (o, ht) = if fused && p.rows() > 0 {
        forward_fused(inp, &p)?
    } else {
        let chunk = chunk_size(inp, &p, opts.chunk_size)?;
        forward_chunked(inp, &p, chunk)?
    };
    Ok(GlaOutput {
        o,
        ht: opts.output_final_state.then_some(ht),
    })
}

/// `mode=fused_chunk`'s conditions: its own chunk size (or auto), and a problem the
/// fused kernel takes on this device; errors name `chunk_size` or `mode`.
fn check_fused(inp: &GlaInputs<'_>, p: &Problem, chunk_size: Option<usize>) -> Result<()> {
    if let Some(c) = chunk_size.filter(|&c| c != FUSED_CHUNK as usize) {
        return Err(Error::Param {
            param: "chunk_size".into(),
            expected: format!("{FUSED_CHUNK} (or auto) with mode=fused_chunk"),
            found: c.to_string(),
        });
    }
    if !fused_fits(inp.q.client(), p) {
        return Err(Error::Param {
            param: "mode".into(),
            expected: format!(
                "chunk or auto unless K <= {FUSED_MAX_K}, K and V are multiples of 4 \
                 (fused_chunk keeps the state in registers and reads 4-wide vectors), \
                 and the device allows a tile of it (CUDA: K <= 112)"
            ),
            found: format!("fused_chunk with K = {}, V = {}", p.dk, p.dv),
        });
    }
    Ok(())
}

/// The widest key dimension the fused kernel takes.
pub(super) const FUSED_MAX_K: usize = 128;

/// Whether the fused kernel takes this problem on `client`'s device: K <= 128, K and V
/// multiples of 4 (it reads and writes rows as 4-wide vectors), and a tile the device
/// allows (on CUDA every tile spills at K > 112: kernels/cuda-budget.txt).
pub(super) fn fused_fits(client: &Client, p: &Problem) -> bool {
    let shape_fits = p.dk <= FUSED_MAX_K && p.dk.is_multiple_of(4) && p.dv.is_multiple_of(4);
    // Without this, `auto` timed the modes on CUDA at K = 128: the chunked pipeline was
    // the lone valid candidate and its first run (tuning its chunk size and every
    // kernel's tiles) was recorded as its time, 30 s on the H200.
    shape_fits
        && !GlaFusedFwd::space(
            client,
            &GlaFusedFwdProblem {
                kp: p.dk.next_multiple_of(16) as u32,
                dk: p.dk as u32,
                dv: p.dv as u32,
                heads: p.heads as u32,
                n_seq: p.n_seq() as u32,
                ..Default::default()
            },
        )
        .is_empty()
}

/// Whether the autotuner picks the fused kernel over the chunk-parallel ones (each
/// at its tuned chunk size) for this device and bucketed shape.
pub(super) fn forward_mode_is_fused(inp: &GlaInputs<'_>, p: &Problem) -> Result<bool> {
    let client = inp.q.client();
    if !fused_fits(client, p) {
        return Ok(false);
    }
    // The first candidate is what runs untuned (`KILN_AUTOTUNE=off`): the fused kernel
    // on a CPU adapter, where it is several times faster, the chunk-parallel pipeline
    // on a GPU, which needs the parallelism.
    let cpu = client.report().adapter_type == kiln_runtime::AdapterType::Cpu;
    let order = if cpu {
        [GlaMode::FusedChunk, GlaMode::Chunk]
    } else {
        [GlaMode::Chunk, GlaMode::FusedChunk]
    };
    let mode = forward_choice("gla_mode", inp, p)
        .sources([GlaFusedFwd::source_hash()])
        .candidates(order)
        // On a CPU adapter the fused kernel measured 4.2-5.9x faster than the chunked
        // pipeline at its best chunk size (docs/gla.md): ranked search does not run the
        // pipeline there (which would tune its chunk size and every kernel's tiles).
        // On a GPU both are timed.
        .cost(move |&m| match (cpu, m) {
            (true, GlaMode::Chunk) => 4.0,
            _ => 1.0,
        })
        .tune(
            client,
            CHUNK_SIZE_TOLERANCE,
            |m| format!("mode={m}"),
            |&m| {
                let (o, ht) = if m == GlaMode::FusedChunk {
                    forward_fused(inp, p)?
                } else {
                    forward_chunked(inp, p, chunk_size(inp, p, None)?)?
                };
                Ok(vec![o, ht])
            },
        )?;
    Ok(mode == GlaMode::FusedChunk)
}

/// `o` and the final states by the fused kernel.
pub(super) fn forward_fused(inp: &GlaInputs<'_>, p: &Problem) -> Result<(Tensor, Tensor)> {
    let client = inp.q.client();
    let g = gates_f32(inp.g)?;
    let bounds: Vec<u32> = p.bounds.iter().map(|&b| b as u32).collect();
    let bounds = upload_u32(client, "cu_seqlens", &bounds)?;
    let o = Tensor::empty(client, p.dtype, inp.v.shape())?;
    let ht = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let init = or_absent(client, inp.h0)?;
    if p.n_seq() > 0 {
        // On a CPU adapter a cost model ranks the value tiles, so that a first call
        // compiles only those it cannot rule out (each is seconds of LLVM); a GPU times
        // every one.
        let cores = kiln_runtime::host_threads();
        let cost = |cfg: &GlaFusedFwdConfig| fused_cost_cpu(cfg.BV, p, cores);
        let cpu = client.report().adapter_type == kiln_runtime::AdapterType::Cpu;
        let ranked: Option<&dyn Fn(&GlaFusedFwdConfig) -> f64> = cpu.then_some(&cost);
        GlaFusedFwd::tuned_ranked(
            client,
            CHUNK_TOLERANCE,
            &GlaFusedFwdArgs {
                q: inp.q,
                k: inp.k,
                v: inp.v,
                g: &g,
                bounds: &bounds,
                init: &init,
                o: &o,
                ht: &ht,
                n_seq: p.n_seq() as u32,
                heads: p.heads as u32,
                dk: p.dk as u32,
                dv: p.dv as u32,
                scale: p.scale,
                kp: p.dk.next_multiple_of(16) as u32,
                has_init: inp.h0.is_some(),
            },
            ranked,
        )?;
    }
    Ok((o, ht))
}

/// The fused forward's time at value tile `bv` on a CPU adapter with `cores` threads, in
/// relative units: every cube (a sequence, a head, a `bv`-wide slice of V) walks its
/// sequence's rows and recomputes their K side whatever its slice (1.25 times the work
/// of a full-width V side); the cubes share the cores, and none finishes before the
/// longest sequence's (varlen batches). Fitted on lavapipe (2 x 4096 x 4 x 64, 2 cores:
/// BV 64 / 32 / 16 took 0.63 / 0.98 / 1.67 s, the model 9 / 14 / 24 in units of 4096
/// rows), where it rules out BV = 16 (over twice the best), whose compilation was a
/// third of a first call.
fn fused_cost_cpu(bv: u32, p: &Problem, cores: usize) -> f64 {
    let bv = (bv as usize).min(p.dv);
    let slices = p.dv.div_ceil(bv);
    let rows = p.rows() as f64;
    let longest = p.bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as f64;
    let shared = rows * (p.heads * slices) as f64 / cores.max(1) as f64;
    shared.max(longest) * (1.25 + bv as f64 / p.dv as f64)
}

/// The chunk size: the caller's (checked), or the autotuner's pick among
/// [`CHUNK_SIZES`] by timing the whole forward (its kernels tuned inside).
pub(super) fn chunk_size(inp: &GlaInputs<'_>, p: &Problem, given: Option<usize>) -> Result<usize> {
    if let Some(chunk) = given {
        check_chunk(chunk)?;
        return Ok(chunk);
    }
    // The first candidate is what runs untuned (`KILN_AUTOTUNE=off`), in the forward and
    // the backward alike: 16 on a CPU adapter, which measured fastest there and is the
    // most precise under strong decay (docs/gla.md), 64 (fla's) on a GPU.
    let cpu = inp.q.client().report().adapter_type == kiln_runtime::AdapterType::Cpu;
    let mut order: Vec<u32> = CHUNK_SIZES.iter().map(|&c| c as u32).collect();
    if !cpu {
        order.reverse();
    }
    let chunk = forward_choice("gla_chunk_size", inp, p)
        .candidates(order)
        .tune(
            inp.q.client(),
            CHUNK_SIZE_TOLERANCE,
            |c| format!("chunk_size={c}"),
            |&c| {
                let (o, ht) = forward_chunked(inp, p, c as usize)?;
                Ok(vec![o, ht])
            },
        )?;
    Ok(chunk as usize)
}

/// A forward-level decision keyed on the chunk-parallel kernels' sources and the
/// bucketed problem.
pub(super) fn forward_choice<C>(name: &'static str, inp: &GlaInputs<'_>, p: &Problem) -> Choice<C>
where
    C: Clone + PartialEq + serde::Serialize + serde::de::DeserializeOwned,
{
    Choice::new(name)
        .sources([
            GlaCumsum::source_hash(),
            GlaStatePass::source_hash(),
            GlaScores::source_hash(),
            GlaChunkOut::source_hash(),
        ])
        .dim("n_seq", p.n_seq())
        .dim("rows", p.rows())
        .dim("heads", p.heads)
        .dim("dk", p.dk)
        .dim("dv", p.dv)
        .exact("dtype", p.dtype)
        .exact("h0", inp.h0.is_some())
}

/// `o` and the final states of the chunked forward at one chunk size.
pub(super) fn forward_chunked(
    inp: &GlaInputs<'_>,
    p: &Problem,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let client = inp.q.client();
    let c = chunk_table(client, p, chunk)?;
    let st = forward_states(inp, p, &c, chunk)?;
    let o = Tensor::empty(client, p.dtype, inp.v.shape())?;
    if c.count > 0 {
        let (h, dk, dv) = (p.heads as u32, p.dk as u32, p.dv as u32);
        let a = Tensor::empty(client, DType::F32, &[c.count, p.heads, chunk, chunk])?;
        GlaScores::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaScoresArgs {
                x: inp.q,
                y: inp.k,
                gc: &st.gc,
                chunks: &c.table,
                a: &a,
                n_chunks: c.count as u32,
                heads: h,
                dd: dk,
                scale: p.scale,
                chunk: chunk as u32,
                decay: true,
            },
        )?;
        GlaChunkOut::tuned(
            client,
            CHUNK_TOLERANCE,
            &GlaChunkOutArgs {
                x: inp.q,
                y: inp.v,
                gc: &st.gc,
                chunks: &c.table,
                states: &st.hs,
                m: &a,
                out: &o,
                n_chunks: c.count as u32,
                heads: h,
                dk,
                dv,
                scale: p.scale,
                chunk: chunk as u32,
                backward: false,
            },
        )?;
    }
    Ok((o, st.ht))
}

/// `g` as f32 (a new tensor only when it is in half precision).
pub(super) fn gates_f32(g: &Tensor) -> Result<Tensor> {
    if g.dtype() == DType::F32 {
        return Ok(g.clone());
    }
    let out = Tensor::empty(g.client(), DType::F32, g.shape())?;
    if g.numel() > 0 {
        ToF32::tuned(
            g.client(),
            0.0,
            &ToF32Args {
                x: g,
                out: &out,
                len: g.numel() as u32,
            },
        )?;
    }
    Ok(out)
}
