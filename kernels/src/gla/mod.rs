//! Gated Linear Attention (spec: `shared/specs/gla.md`; Yang et al., arXiv 2312.06635).
//!
//! Per (sequence, head), with the state `S` a `K x V` matrix:
//! `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`, `ht = S_T`.
//! Tensors (BTHD): q, k, g `[B, T, H, K]`; v `[B, T, H, V]`; h0, ht `[B, H, K, V]`
//! (f32); o `[B, T, H, V]` in q's dtype. `g` is the log decay (<= 0), f32 or q's dtype,
//! upcast to f32. Varlen batches: `B = 1` and `cu_seqlens` (N + 1 row offsets), each
//! sequence starting from its own `h0` row (or zero); states are then `[N, H, K, V]`.
//!
//! - [`gla`]: the chunkwise-parallel forward (chunks of `chunk_size` rows; state pass
//!   over chunks, intra-chunk scores in f32 with every exponent `<= 0`).
//! - [`gla_recurrent`]: the step-by-step forward (short sequences, cross-check).
//! - [`gla_step`]: one decode step against a device-resident state, updated in place.
//! - [`gla_backward`]: chunked backward. Gradients come back in the dtype of their
//!   input (dq, dk, dv in q's dtype, dg in g's dtype), dh0 in f32; every
//!   intermediate is f32.
//!
//! Accumulation is f32 for every input dtype. Chunk sizes 16, 32 and 64 are supported
//! (64 by default, as fla). Sequence offsets, chunk tables and all indices are 32-bit:
//! problems whose per-chunk states exceed 2^32 elements are refused.

mod chunk;
mod fused;
mod recurrent;
pub mod reference;
mod registry;

pub use chunk::{GlaBwdDg, GlaBwdDqk, GlaChunkOut, GlaCumsum, GlaScores, GlaStatePass};
pub use fused::{GlaFusedFwd, FUSED_CHUNK};
pub use recurrent::{steps_per_round, GlaRecurrent, ToF32};
pub use registry::{GLA, GLA_BACKWARD, GLA_RECURRENT, GLA_STEP, KERNELS};

use crate::launch::{absent, check_input, expect_shape, shape_err};
use kiln_runtime::tune::{Autotuner, TuneKey};
use kiln_runtime::{Client, DType, Error, HostTensor, Result, Tensor};

/// Chunk lengths the chunked kernels support.
pub const CHUNK_SIZES: [usize; 3] = [16, 32, 64];

/// The forward's algorithm (fla's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GlaMode {
    /// The autotuner times both algorithms per device and shape (`fused_chunk` only
    /// where K <= 128), unless `chunk_size` is given, which means `Chunk`.
    #[default]
    Auto,
    /// The chunk-parallel kernels: cumsum, state pass, scores, output (parallel over
    /// chunks; what a GPU wants).
    Chunk,
    /// One kernel walking each sequence in chunks of 16 rows with the state in
    /// registers (parallel over sequences, heads and V tiles only; what a CPU adapter
    /// wants). Needs K <= 128.
    FusedChunk,
}

/// Options of the forward and backward operators.
#[derive(Clone, Debug)]
pub struct GlaOptions {
    /// Score scale; `None` means `K^-1/2`.
    pub scale: Option<f64>,
    /// Whether the forward returns the final state `ht`.
    pub output_final_state: bool,
    /// Rows per chunk of the chunked kernels: 16, 32 or 64; `None` lets the autotuner
    /// pick among them (per device and bucketed shape, like a kernel tunable).
    pub chunk_size: Option<usize>,
    /// The forward's algorithm (the backward is always chunk-parallel).
    pub mode: GlaMode,
}

impl Default for GlaOptions {
    fn default() -> Self {
        Self {
            scale: None,
            output_final_state: false,
            chunk_size: None,
            mode: GlaMode::Auto,
        }
    }
}

/// The inputs of the forward (and of the backward, with [`GlaGradInputs`]).
#[derive(Clone, Copy)]
pub struct GlaInputs<'a> {
    /// Queries `[B, T, H, K]`.
    pub q: &'a Tensor,
    /// Keys `[B, T, H, K]`, q's dtype.
    pub k: &'a Tensor,
    /// Values `[B, T, H, V]`, q's dtype.
    pub v: &'a Tensor,
    /// Log decays `[B, T, H, K]`, <= 0, f32 or q's dtype.
    pub g: &'a Tensor,
    /// Initial states `[N, H, K, V]` f32 (N = B, or the number of varlen sequences).
    pub h0: Option<&'a Tensor>,
    /// Varlen row offsets (N + 1 entries, 0 first, T last, non-decreasing); needs B = 1.
    pub cu_seqlens: Option<&'a [i32]>,
}

/// The forward's results.
pub struct GlaOutput {
    /// `[B, T, H, V]`, q's dtype.
    pub o: Tensor,
    /// `[N, H, K, V]` f32, when asked for.
    pub ht: Option<Tensor>,
}

/// The backward's extra inputs.
#[derive(Clone, Copy)]
pub struct GlaGradInputs<'a> {
    /// dL/do `[B, T, H, V]`, q's dtype.
    pub d_o: &'a Tensor,
    /// dL/dht `[N, H, K, V]` f32.
    pub dht: Option<&'a Tensor>,
}

/// The backward's results.
pub struct GlaGrads {
    /// `[B, T, H, K]`, q's dtype.
    pub dq: Tensor,
    /// `[B, T, H, K]`, q's dtype.
    pub dk: Tensor,
    /// `[B, T, H, V]`, q's dtype.
    pub dv: Tensor,
    /// `[B, T, H, K]`, g's dtype.
    pub dg: Tensor,
    /// `[N, H, K, V]` f32, when `h0` was given.
    pub dh0: Option<Tensor>,
}

/// Validated dimensions.
struct Problem {
    dk: usize,
    dv: usize,
    heads: usize,
    /// Sequence bounds in rows (`N + 1`).
    bounds: Vec<usize>,
    dtype: DType,
    scale: f32,
}

impl Problem {
    fn n_seq(&self) -> usize {
        self.bounds.len() - 1
    }
    fn rows(&self) -> usize {
        *self.bounds.last().unwrap_or(&0)
    }
    fn state_shape(&self) -> [usize; 4] {
        [self.n_seq(), self.heads, self.dk, self.dv]
    }
    fn dims(&self) -> reference::Dims {
        reference::Dims {
            heads: self.heads,
            dk: self.dk,
            dv: self.dv,
            bounds: self.bounds.clone(),
        }
    }
}

fn check(inp: &GlaInputs<'_>, scale: Option<f64>) -> Result<Problem> {
    let client = inp.q.client();
    for (name, t) in [("q", inp.q), ("k", inp.k), ("v", inp.v), ("g", inp.g)] {
        check_input(name, t, client)?;
    }
    let &[b, t, heads, dk] = inp.q.shape() else {
        return Err(shape_err("q", "[B, T, H, K]".into(), inp.q.shape()));
    };
    expect_shape("k", inp.k, inp.q.shape(), "q's shape")?;
    expect_shape("g", inp.g, inp.q.shape(), "q's shape")?;
    let dv = match inp.v.shape() {
        &[vb, vt, vh, dv] if (vb, vt, vh) == (b, t, heads) => dv,
        other => {
            return Err(shape_err(
                "v",
                format!("[{b}, {t}, {heads}, V] (B, T, H of q)"),
                other,
            ))
        }
    };
    if dk == 0 || dv == 0 || heads == 0 {
        return Err(shape_err(
            "q",
            "H, K and V of at least 1".into(),
            inp.q.shape(),
        ));
    }
    let dtype = inp.q.dtype();
    inp.k.expect_dtype("k", &[dtype])?;
    inp.v.expect_dtype("v", &[dtype])?;
    inp.g.expect_dtype("g", &[DType::F32, dtype])?;
    let bounds = match inp.cu_seqlens {
        None => (0..=b).map(|i| i * t).collect::<Vec<_>>(),
        Some(cu) => {
            if b != 1 {
                return Err(shape_err(
                    "q",
                    format!("[1, T, H, K] with cu_seqlens (B = 1)"),
                    inp.q.shape(),
                ));
            }
            let bad = |why: &str| Error::Param {
                param: "cu_seqlens".into(),
                expected: format!("N + 1 >= 2 offsets from 0 to T = {t}, non-decreasing"),
                found: format!("{why}: {cu:?}"),
            };
            if cu.len() < 2 {
                return Err(bad("fewer than 2 entries"));
            }
            if cu[0] != 0 {
                return Err(bad("does not start at 0"));
            }
            if cu.windows(2).any(|w| w[1] < w[0]) {
                return Err(bad("decreasing"));
            }
            if *cu.last().unwrap_or(&0) as usize != t || cu.iter().any(|&c| c < 0) {
                return Err(bad("does not end at T"));
            }
            cu.iter().map(|&c| c as usize).collect()
        }
    };
    let n_seq = bounds.len() - 1;
    if let Some(h0) = inp.h0 {
        h0.expect_usable("h0", client)?;
        h0.expect_dtype("h0", &[DType::F32])?;
        expect_shape("h0", h0, &[n_seq, heads, dk, dv], "[N, H, K, V]")?;
    }
    let scale = scale.unwrap_or(1.0 / (dk as f64).sqrt());
    if !scale.is_finite() {
        return Err(Error::Param {
            param: "scale".into(),
            expected: "a finite number".into(),
            found: scale.to_string(),
        });
    }
    Ok(Problem {
        dk,
        dv,
        heads,
        bounds,
        dtype,
        scale: scale as f32,
    })
}

/// The host-side chunk table, on the device.
struct Chunks {
    count: usize,
    /// `(first row, rows)` per chunk.
    table: Tensor,
    /// First chunk of each sequence, `N + 1` entries.
    seq_chunks: Tensor,
    /// Sequence bounds, `N + 1` entries.
    bounds: Tensor,
}

fn upload_u32(client: &Client, name: &str, values: &[u32]) -> Result<Tensor> {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    // A zero-length buffer is not bindable everywhere: keep one element.
    let (shape, data) = if values.is_empty() {
        (vec![1], vec![0u8; 4])
    } else {
        (vec![values.len()], data)
    };
    Tensor::upload_named(
        client,
        name,
        &HostTensor::from_bytes(DType::U32, shape, data)?,
    )
}

fn chunk_table(client: &Client, p: &Problem, chunk: usize) -> Result<Chunks> {
    let mut table = Vec::new();
    let mut seq_chunks = vec![0u32];
    for w in p.bounds.windows(2) {
        let mut r = w[0];
        while r < w[1] {
            let len = chunk.min(w[1] - r);
            table.extend([r as u32, len as u32]);
            r += len;
        }
        seq_chunks.push((table.len() / 2) as u32);
    }
    let count = table.len() / 2;
    let states = count as u128 * (p.heads * p.dk * p.dv) as u128;
    if states > u32::MAX as u128
        || p.rows() as u128 * (p.heads * p.dk.max(p.dv)) as u128 > u32::MAX as u128
    {
        return Err(Error::Unsupported {
            device: client.report().name.clone(),
            feature: format!("GLA problems over 2^32 state or token elements ({count} chunks)"),
        });
    }
    let bounds: Vec<u32> = p.bounds.iter().map(|&b| b as u32).collect();
    Ok(Chunks {
        count,
        table: upload_u32(client, "chunks", &table)?,
        seq_chunks: upload_u32(client, "seq_chunks", &seq_chunks)?,
        bounds: upload_u32(client, "cu_seqlens", &bounds)?,
    })
}

fn check_chunk(chunk: usize) -> Result<()> {
    if CHUNK_SIZES.contains(&chunk) {
        Ok(())
    } else {
        Err(Error::Param {
            param: "chunk_size".into(),
            expected: "16 | 32 | 64".into(),
            found: chunk.to_string(),
        })
    }
}

/// A placeholder for an absent optional f32 input (kernels do not read it).

/// Candidates of the chunked kernels differ only in which unit computes what, never in
/// summation order: they must agree to the last bit, up to this.
const CHUNK_TOLERANCE: f64 = 1e-5;
/// Chunk sizes change the summation order of everything: a sanity bound.
const CHUNK_SIZE_TOLERANCE: f64 = 1e-2;
/// Recurrent candidates split the K sum differently (KG): a sanity bound.
const RECURRENT_TOLERANCE: f64 = 1e-2;

/// gc, the per-chunk states and the final state of the forward pass.
struct ForwardStates {
    gc: Tensor,
    hs: Tensor,
    ht: Tensor,
}

fn forward_states(
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
            inp.g,
            &c.table,
            &gc,
            c.count as u32,
            h as u32,
            dk as u32,
        )?;
    }
    let hs = Tensor::empty(client, DType::F32, &[c.count.max(1), h, dk, dv])?;
    let ht = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let init = match inp.h0 {
        Some(t) => t.clone(),
        None => absent(client)?,
    };
    GlaStatePass::tuned(
        client,
        CHUNK_TOLERANCE,
        inp.k,
        inp.v,
        &gc,
        &c.table,
        &c.seq_chunks,
        &init,
        &hs,
        &ht,
        p.n_seq() as u32,
        h as u32,
        dk as u32,
        dv as u32,
        p.scale,
        chunk as u32,
        false,
        inp.h0.is_some(),
    )?;
    Ok(ForwardStates { gc, hs, ht })
}

/// The chunkwise forward: `o` (and `ht` when `opts.output_final_state`), by the
/// algorithm `opts.mode` names (autotuned by default).
pub fn gla(inp: &GlaInputs<'_>, opts: &GlaOptions) -> Result<GlaOutput> {
    let p = check(inp, opts.scale)?;
    let fused = match (opts.mode, opts.chunk_size) {
        (GlaMode::FusedChunk, Some(c)) if c != FUSED_CHUNK as usize => {
            return Err(Error::Param {
                param: "chunk_size".into(),
                expected: format!("{FUSED_CHUNK} (or auto) with mode=fused_chunk"),
                found: c.to_string(),
            })
        }
        (GlaMode::FusedChunk, _) => {
            if !fused_fits(&p) {
                return Err(Error::Param {
                    param: "mode".into(),
                    expected: format!(
                        "chunk or auto unless K <= {FUSED_MAX_K} and K, V are multiples of 4 \
                         (fused_chunk keeps the state in registers and reads 4-wide vectors)"
                    ),
                    found: format!("fused_chunk with K = {}, V = {}", p.dk, p.dv),
                });
            }
            true
        }
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

/// The widest key dimension the fused kernel takes.
const FUSED_MAX_K: usize = 128;

/// Whether the fused kernel takes this problem: K <= 128, and K and V multiples of 4
/// (it reads and writes rows as 4-wide vectors).
fn fused_fits(p: &Problem) -> bool {
    p.dk <= FUSED_MAX_K && p.dk % 4 == 0 && p.dv % 4 == 0
}

/// Whether the autotuner picks the fused kernel over the chunk-parallel ones (each
/// at its tuned chunk size) for this device and bucketed shape.
fn forward_mode_is_fused(inp: &GlaInputs<'_>, p: &Problem) -> Result<bool> {
    if !fused_fits(p) {
        return Ok(false);
    }
    let client = inp.q.client();
    let hashes = [
        GlaFusedFwd::SOURCE_HASH,
        GlaCumsum::SOURCE_HASH,
        GlaStatePass::SOURCE_HASH,
        GlaScores::SOURCE_HASH,
        GlaChunkOut::SOURCE_HASH,
    ];
    let key = TuneKey {
        kernel: "gla_mode",
        source_hash: kiln_runtime::tune::fnv1a_hex(&hashes.concat()),
        shape: shape_bucket(inp, p),
    };
    // 1 = fused_chunk, 0 = chunk (at its own tuned chunk size). The first is what runs
    // untuned (`KILN_AUTOTUNE=off`): the fused kernel on a CPU adapter, where it is
    // several times faster, the chunk-parallel pipeline on a GPU, which needs the
    // parallelism.
    let cpu = client.report().adapter_type == kiln_runtime::AdapterType::Cpu;
    let order: [u32; 2] = if cpu { [1, 0] } else { [0, 1] };
    let fused = Autotuner::global().tune(
        client,
        &key,
        &order,
        |&m| {
            if m == 1 {
                "mode=fused_chunk".into()
            } else {
                "mode=chunk".into()
            }
        },
        |&m| {
            let (o, ht) = if m == 1 {
                forward_fused(inp, p)?
            } else {
                forward_chunked(inp, p, chunk_size(inp, p, None)?)?
            };
            Ok(vec![o, ht])
        },
        CHUNK_SIZE_TOLERANCE,
    )?;
    Ok(fused == 1)
}

/// `o` and the final states by the fused kernel.
fn forward_fused(inp: &GlaInputs<'_>, p: &Problem) -> Result<(Tensor, Tensor)> {
    let client = inp.q.client();
    let g = gates_f32(inp.g)?;
    let bounds: Vec<u32> = p.bounds.iter().map(|&b| b as u32).collect();
    let bounds = upload_u32(client, "cu_seqlens", &bounds)?;
    let o = Tensor::empty(client, p.dtype, inp.v.shape())?;
    let ht = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let init = match inp.h0 {
        Some(t) => t.clone(),
        None => absent(client)?,
    };
    if p.n_seq() > 0 {
        GlaFusedFwd::tuned(
            client,
            CHUNK_TOLERANCE,
            inp.q,
            inp.k,
            inp.v,
            &g,
            &bounds,
            &init,
            &o,
            &ht,
            p.n_seq() as u32,
            p.heads as u32,
            p.dk as u32,
            p.dv as u32,
            p.scale,
            p.dk.next_multiple_of(16) as u32,
            inp.h0.is_some(),
        )?;
    }
    Ok((o, ht))
}

/// The chunk size: the caller's (checked), or the autotuner's pick among
/// [`CHUNK_SIZES`] by timing the whole forward (its kernels tuned inside).
fn chunk_size(inp: &GlaInputs<'_>, p: &Problem, given: Option<usize>) -> Result<usize> {
    if let Some(chunk) = given {
        check_chunk(chunk)?;
        return Ok(chunk);
    }
    let client = inp.q.client();
    let hashes = [
        GlaCumsum::SOURCE_HASH,
        GlaStatePass::SOURCE_HASH,
        GlaScores::SOURCE_HASH,
        GlaChunkOut::SOURCE_HASH,
    ];
    let key = TuneKey {
        kernel: "gla_chunk_size",
        source_hash: kiln_runtime::tune::fnv1a_hex(&hashes.concat()),
        shape: shape_bucket(inp, p),
    };
    let candidates: Vec<u32> = CHUNK_SIZES.iter().rev().map(|&c| c as u32).collect();
    let chunk = Autotuner::global().tune(
        client,
        &key,
        &candidates,
        |c| format!("chunk_size={c}"),
        |&c| {
            let (o, ht) = forward_chunked(inp, p, c as usize)?;
            Ok(vec![o, ht])
        },
        CHUNK_SIZE_TOLERANCE,
    )?;
    Ok(chunk as usize)
}

/// The bucketed shape of the forward's algorithm-level tune keys.
fn shape_bucket(inp: &GlaInputs<'_>, p: &Problem) -> String {
    format!(
        "n_seq={};rows={};heads={};dk={};dv={};dtype={};h0={}",
        p.n_seq().next_power_of_two(),
        p.rows().next_power_of_two(),
        p.heads.next_power_of_two(),
        p.dk.next_power_of_two(),
        p.dv.next_power_of_two(),
        p.dtype,
        inp.h0.is_some()
    )
}

/// `o` and the final states of the chunked forward at one chunk size.
fn forward_chunked(inp: &GlaInputs<'_>, p: &Problem, chunk: usize) -> Result<(Tensor, Tensor)> {
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
            inp.q,
            inp.k,
            &st.gc,
            &c.table,
            &a,
            c.count as u32,
            h,
            dk,
            p.scale,
            chunk as u32,
            true,
        )?;
        GlaChunkOut::tuned(
            client,
            CHUNK_TOLERANCE,
            inp.q,
            inp.v,
            &st.gc,
            &c.table,
            &st.hs,
            &a,
            &o,
            c.count as u32,
            h,
            dk,
            dv,
            p.scale,
            chunk as u32,
            false,
        )?;
    }
    Ok((o, st.ht))
}

/// `g` as f32 (a new tensor only when it is in half precision).
fn gates_f32(g: &Tensor) -> Result<Tensor> {
    if g.dtype() == DType::F32 {
        return Ok(g.clone());
    }
    let out = Tensor::empty(g.client(), DType::F32, g.shape())?;
    if g.numel() > 0 {
        ToF32::tuned(g.client(), 0.0, g, &out, g.numel() as u32)?;
    }
    Ok(out)
}

/// The recurrent forward: same contract as [`gla`] (`chunk_size` is ignored).
pub fn gla_recurrent(inp: &GlaInputs<'_>, opts: &GlaOptions) -> Result<GlaOutput> {
    let p = check(inp, opts.scale)?;
    let client = inp.q.client();
    let c = chunk_table(client, &p, 64)?;
    let g = gates_f32(inp.g)?;
    let state = Tensor::empty(client, DType::F32, &p.state_shape())?;
    let o = Tensor::empty(client, p.dtype, inp.v.shape())?;
    let init = match inp.h0 {
        Some(t) => t.clone(),
        None => absent(client)?,
    };
    GlaRecurrent::tuned(
        client,
        RECURRENT_TOLERANCE,
        inp.q,
        inp.k,
        inp.v,
        &g,
        &c.bounds,
        &init,
        &state,
        &o,
        p.n_seq() as u32,
        p.heads as u32,
        p.scale,
        p.dk as u32,
        p.dv as u32,
        u32::from(inp.h0.is_some()),
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
    let cfg = GlaRecurrent::space(client, n, h, p.scale, dk, dv, 2)
        .into_iter()
        .next()
        .ok_or_else(|| Error::Kernel {
            kernel: "gla_recurrent".into(),
            message: "no configuration fits this device".into(),
        })?;
    let dummy = absent(client)?;
    GlaRecurrent::launch(
        client, &cfg, q, k, v, &g, &c.bounds, &dummy, state, &o, n, h, p.scale, dk, dv, 2,
    )?;
    Ok(o)
}

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
    let dht = match grad.dht {
        Some(t) => t.clone(),
        None => absent(client)?,
    };
    GlaStatePass::tuned(
        client,
        CHUNK_TOLERANCE,
        inp.q,
        grad.d_o,
        &st.gc,
        &c.table,
        &c.seq_chunks,
        &dht,
        &dhs,
        &dh0,
        p.n_seq() as u32,
        h,
        dk,
        dv,
        p.scale,
        chunk as u32,
        true,
        grad.dht.is_some(),
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
            inp.q,
            inp.k,
            &st.gc,
            &c.table,
            &a,
            nc,
            h,
            dk,
            p.scale,
            chunk as u32,
            true,
        )?;
        GlaScores::tuned(
            client,
            CHUNK_TOLERANCE,
            grad.d_o,
            inp.v,
            &st.gc,
            &c.table,
            &da,
            nc,
            h,
            dv,
            p.scale,
            chunk as u32,
            false,
        )?;
        GlaChunkOut::tuned(
            client,
            CHUNK_TOLERANCE,
            inp.k,
            grad.d_o,
            &st.gc,
            &c.table,
            &dhs,
            &a,
            &dvt,
            nc,
            h,
            dk,
            dv,
            p.scale,
            chunk as u32,
            true,
        )?;
        let dgt = Tensor::empty(client, DType::F32, &[p.rows(), p.heads, p.dk])?;
        GlaBwdDqk::tuned(
            client,
            CHUNK_TOLERANCE,
            inp.q,
            inp.k,
            inp.v,
            grad.d_o,
            &st.gc,
            &c.table,
            &st.hs,
            &dhs,
            &da,
            &dq,
            &dkt,
            &dgt,
            nc,
            h,
            dk,
            dv,
            p.scale,
            chunk as u32,
        )?;
        GlaBwdDg::tuned(
            client,
            CHUNK_TOLERANCE,
            &dgt,
            &st.ht,
            &dht,
            &c.bounds,
            &dg,
            p.n_seq() as u32,
            h,
            dk,
            dv,
            grad.dht.is_some(),
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

/// The f64 reference dimensions of a checked problem (for tests and `kiln selftest`).
pub fn reference_dims(inp: &GlaInputs<'_>) -> Result<reference::Dims> {
    Ok(check(inp, None)?.dims())
}
