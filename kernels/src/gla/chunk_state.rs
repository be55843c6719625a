//! The chunkwise-parallel kernels, part 1: the chunk-local cumulative gates and the
//! state pass over chunks (the other parts: `chunk_output`, `chunk_backward`). Every kernel sees the batch
//! as `N` sequences of rows back to back (`[B, T]` flattened, or a varlen batch) cut
//! into chunks of at most `chunk` rows that never cross a sequence boundary; the
//! host's chunk table `chunks` holds `(first row, rows)` per chunk and `seq_chunks` the
//! first chunk of each sequence (`N + 1` entries).
//!
//! Layouts: q, k, g, gc `[rows, H, K]`; v, o, do `[rows, H, V]`; per-chunk states
//! `[chunks, H, K, V]` (f32); scores `[chunks, H, chunk, chunk]` (f32).
//!
//! Numerics (spec, "secondary chunking"): every exponential here has an argument
//! `<= 0` (`b` is a non-increasing cumulative sum of gates <= 0, and only
//! `b_i - b_j` with `j <= i`, `Gamma - b` and `b` itself are exponentiated), so no
//! intermediate overflows whatever the gates; the intra-chunk scores are formed
//! element-wise in f32 ("log space"), never as `exp(b) * exp(-b)`.

use cubecl::prelude::*;
use kiln_dsl::{floor_log_gate, load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::AdapterType;

/// Where a chunk-parallel cube works: chunk `c` (`CUBE_POS_X`) of the chunk table
/// (`chunks[2c]` its first token, `chunks[2c + 1]` its length) and head `h`
/// (`CUBE_POS_Y`).
#[derive(CubeType, Clone, Copy)]
pub(super) struct ChunkAt {
    pub c: u32,
    pub h: u32,
    pub start: u32,
    pub len: u32,
}

/// This cube's [`ChunkAt`].
#[cube]
pub(super) fn chunk_at(chunks: &Array<u32>) -> ChunkAt {
    let c = CUBE_POS_X;
    ChunkAt {
        c,
        h: CUBE_POS_Y,
        start: chunks[(2 * c) as usize],
        len: chunks[(2 * c + 1) as usize],
    }
}

/// `gc` = the chunk-local inclusive cumulative sum of `g` over time, in f32 (the `b`
/// of the spec), one cube per (chunk, head).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(dk = pow2, dtype),
    grid = (n_chunks, heads),
    cube = UNITS,
)]
pub fn gla_cumsum<F: Float>(
    g: &Array<F>,
    chunks: &Array<u32>,
    gc: &mut Array<f32>,
    n_chunks: u32,
    heads: u32,
    dk: u32,
) {
    let at = chunk_at(chunks);
    let (c, h, start, len) = (at.c, at.h, at.start, at.len);
    let mut kk = UNIT_POS;
    while kk < dk {
        let mut acc = 0.0f32;
        for t in 0..len {
            let i = ((start + t) * heads + h) * dk + kk;
            // Floored: a -inf gate (full forgetting) keeps later differences finite.
            acc += floor_log_gate(f32::cast_from(g[i as usize]));
            gc[i as usize] = acc;
        }
        kk += UNITS;
    }
}

/// The sequential pass over chunks, parallel over (sequence, head, K tile, V tile);
/// a `TT x TT` register tile of the state per unit, held as 4-wide vectors
/// ([`reg_tile_mma_v4`]). Forward (`reverse = false`, `x = k`, `y = v`):
/// `h_{n+1} = diag(exp(Gamma)) h_n + (k * exp(Gamma - b))^T v`; backward
/// (`reverse = true`, `x = q`, `y = do`, chunks in reverse):
/// `dh_n = diag(exp(Gamma)) dh_{n+1} + scale (q * exp(b))^T do`. `states[c]` receives
/// the state entering chunk `c` (h_n, or dh_{n+1} going backward) and `last` the
/// final one (ht, or dh0). The state starts from `init` when `has_init`, else 0.
#[kiln_macros::kernel(
    // TT: 8 everywhere; 16 on CPU adapters, where every operand read is a loop over the
    // SIMD lanes and a 16 x 16 tile reads half as many per product (the pass 115-147 ->
    // 73-102 ms at 1 x 4096 x 4 x 64); 4 elsewhere (4 always lost to 8 on lavapipe, by
    // 1.1-2x, and 16 would spill on CUDA).
    tune(BK = [32, 16], BV = [64, 32], TT = [8, 4, 16]),
    require(
        TT != 16 || device.adapter_type == AdapterType::Cpu,
        TT != 4 || device.adapter_type != AdapterType::Cpu,
        TT <= BK
    ),
    key(n_seq = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_seq * heads, dk.div_ceil(BK), dv.div_ceil(BV)),
    cube = (BK / TT) * (BV / TT),
    // On CUDA, keep a quarter of an SM's threads resident: the 8 x 8 register tiles
    // (212-251 registers, 8-32 units a cube) are dropped there by kernels/cuda-budget.txt.
    occupancy = 0.25,
    domain(chunk = [16, 32, 64]),
    defaults(chunk = 64)
)]
pub fn gla_state_pass<F: Float>(
    x: &Array<F>,
    y: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    seq_chunks: &Array<u32>,
    init: &Array<f32>,
    states: &mut Array<f32>,
    last: &mut Array<f32>,
    n_seq: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] chunk: u32,
    #[comptime] reverse: bool,
    #[comptime] has_init: bool,
) {
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let k0 = CUBE_POS_Y * BK;
    let v0 = CUBE_POS_Z * BV;
    let units = comptime!((BK / TT) * (BV / TT));
    let row_step = comptime!(BK / TT);
    let tnv = comptime!(TT / 4);
    let ty = UNIT_POS / comptime!(BV / TT);
    let tx = UNIT_POS % comptime!(BV / TT);
    // xs: the k operand, rows k and the chunk's time along its vectors; ys: [t][v].
    let mut xs = SharedMemory::<V4>::new(comptime!((BK * chunk / 4) as usize));
    let mut ys = SharedMemory::<V4>::new(comptime!((chunk * BV / 4) as usize));
    let mut decay = SharedMemory::<f32>::new(comptime!(BK as usize));

    let seq_base = (n * heads + h) * dk;
    // The state tile: element (i, j) is lane j % 4 of s[i * TT / 4 + j / 4].
    let mut s = Array::<V4>::new(comptime!((TT * tnv) as usize));
    let mut acc = Array::<V4>::new(comptime!((TT * tnv) as usize));
    let mut rows = Array::<u32>::new(comptime!(TT as usize));
    #[unroll]
    for i in 0..TT {
        rows[i as usize] = k0 + ty + i * row_step;
    }
    load_state_tile(
        &mut s, init, seq_base, &rows, tx, v0, dk, dv, has_init, TT, BV, TT,
    );
    let c_first = seq_chunks[n as usize];
    let c_end = seq_chunks[(n + 1) as usize];
    for step in 0..c_end - c_first {
        let mut c = c_first + step;
        if comptime!(reverse) {
            c = c_end - 1 - step;
        }
        let start = chunks[(2 * c) as usize];
        let len = chunks[(2 * c + 1) as usize];
        let last_row = start + len - 1;

        // x weighted by its decay to the chunk's end (forward) or from its start
        // (backward): both exponents <= 0. Zero past the chunk's rows. Consecutive
        // units take consecutive k (coalesced), each four consecutive rows.
        let mut idx = UNIT_POS;
        while idx < comptime!(BK * chunk / 4) {
            let kl = idx % BK;
            let t0 = (idx / BK) * 4;
            let kg = k0 + kl;
            let mut gamma = 0.0f32;
            if comptime!(!reverse) {
                if kg < dk {
                    gamma = gc[((last_row * heads + h) * dk + kg) as usize];
                }
            }
            let mut w = V4::empty();
            #[unroll]
            for e in 0..4u32 {
                let t = t0 + e;
                let mut value = 0.0f32;
                if t < len && kg < dk {
                    let gi = ((start + t) * heads + h) * dk + kg;
                    let b = gc[gi as usize];
                    let xv = f32::cast_from(x[gi as usize]);
                    if comptime!(reverse) {
                        value = xv * f32::exp(b) * scale;
                    } else {
                        value = xv * f32::exp(gamma - b);
                    }
                }
                w[e as usize] = value;
            }
            xs[(kl * comptime!(chunk / 4) + t0 / 4) as usize] = w;
            idx += units;
        }
        load_tile_v4::<F>(
            &mut ys,
            0,
            y,
            (start * heads + h) * dv + v0,
            heads * dv,
            1,
            len,
            dv - min(v0, dv),
            chunk,
            BV,
            units,
        );
        let mut kl = UNIT_POS;
        while kl < BK {
            let kg = k0 + kl;
            let mut d = 1.0f32;
            if kg < dk {
                d = f32::exp(gc[((last_row * heads + h) * dk + kg) as usize]);
            }
            decay[kl as usize] = d;
            kl += units;
        }
        sync_cube();

        store_state_tile(
            &s,
            states,
            (c * heads + h) * dk,
            &rows,
            tx,
            v0,
            dk,
            dv,
            TT,
            BV,
            TT,
        );
        #[unroll]
        for e in 0..TT * tnv {
            acc[e as usize] = V4::new(0.0f32);
        }
        reg_tile_mma_v4(
            &mut acc,
            &xs,
            0,
            &ys,
            0,
            ty,
            tx,
            BK,
            BV,
            chunk,
            TT,
            TT,
            local_scalars,
        );
        #[unroll]
        for i in 0..TT {
            let d = V4::new(decay[(ty + i * row_step) as usize]);
            #[unroll]
            for jv in 0..tnv {
                let e = (i * tnv + jv) as usize;
                s[e] = d * s[e] + acc[e];
            }
        }
        sync_cube();
    }
    store_state_tile(&s, last, seq_base, &rows, tx, v0, dk, dv, TT, BV, TT);
}

/// Loads a unit's `tm x tn` state tile, held as 4-wide vectors (element (i, j) in lane
/// `j % 4` of `s[i * tn / 4 + j / 4]`), from the `[K, V]` state at `src[base * V ..]`
/// (`base` = (sequence or chunk, head) times K): tile row i is state row `rows[i]`,
/// column j is `v0 + v4_tile_col(tx, j, cols, tn)`. Zero outside K x V, or everywhere
/// without `has_init`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn load_state_tile(
    s: &mut Array<V4>,
    src: &Array<f32>,
    base: u32,
    rows: &Array<u32>,
    tx: u32,
    v0: u32,
    dk: u32,
    dv: u32,
    #[comptime] has_init: bool,
    #[comptime] tm: u32,
    #[comptime] cols: u32,
    #[comptime] tn: u32,
) {
    let tnv = comptime!(tn / 4);
    #[unroll]
    for i in 0..tm {
        let kk = rows[i as usize];
        #[unroll]
        for jv in 0..tnv {
            let mut w = V4::new(0.0f32);
            if comptime!(has_init) {
                #[unroll]
                for e in 0..4u32 {
                    let vv = v0 + v4_tile_col(tx, jv * 4 + e, cols, tn);
                    let mut value = 0.0f32;
                    if kk < dk && vv < dv {
                        value = src[((base + kk) * dv + vv) as usize];
                    }
                    w[e as usize] = value;
                }
            }
            s[(i * tnv + jv) as usize] = w;
        }
    }
}

/// Stores a state tile laid out as [`load_state_tile`] reads it, inside K x V only.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_state_tile(
    s: &Array<V4>,
    dst: &mut Array<f32>,
    base: u32,
    rows: &Array<u32>,
    tx: u32,
    v0: u32,
    dk: u32,
    dv: u32,
    #[comptime] tm: u32,
    #[comptime] cols: u32,
    #[comptime] tn: u32,
) {
    let tnv = comptime!(tn / 4);
    #[unroll]
    for i in 0..tm {
        let kk = rows[i as usize];
        #[unroll]
        for j in 0..tn {
            let vv = v0 + v4_tile_col(tx, j, cols, tn);
            if kk < dk && vv < dv {
                dst[((base + kk) * dv + vv) as usize] =
                    s[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    }
}
