//! The chunkwise-parallel kernels, part 3: the backward (dq, dk from the states and
//! scores; dg from the products of the forward and backward quantities). Layouts and
//! numerics as in `chunk_state`.

use super::chunk_state::chunk_at;
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4_rows, V4};
use kiln_runtime::AdapterType;

/// dq and dk of a chunk's rows for one K tile (one cube per (chunk, head, K tile), a
/// register tile of each per unit, four consecutive rows x TN keys held as 4-wide
/// vectors of consecutive keys),
/// and `dgt = q * dq - k * dk` (f32) for the gate gradient:
/// `dq = scale exp(b) (do h_n^T) + sum_{j <= i} dA_ij k_j exp(b_i - b_j)`,
/// `dk = exp(Gamma - b) (v dh_{n+1}^T) + sum_{i >= j} dA_ij q_i exp(b_i - b_j)`.
/// The intra-chunk sums run in f32 with every exponent <= 0, factorised at two levels
/// (fla's secondary chunking, as `gla_scores` does for the forward, carried one level
/// down): pairs across the chunk's four sub-chunks as products of factorised tiles the
/// cube forms once, pairs inside a sub-chunk across the edges of a unit's four rows with
/// one exponential per operand element serving the four rows, and only the 4 x 4 block
/// on the diagonal element-wise. One shared
/// buffer of vectors ([`V4`]: on a CPU adapter each access with a per-unit address is a
/// loop over the SIMD lanes, so four values an access) serves both phases: the
/// inter-chunk operands, then dA, the q, k, b tiles and the factorised tile.
#[kiln_macros::kernel(
    // BK = 8: half the cube and three quarters of its shared memory (more cubes
    // resident); 32 and 64 (where shared memory allows: chunks of 16 and 32) read do,
    // v and dA once for all of K instead of once per K tile. No form spills on CUDA
    // (docs/cuda-registers.md).
    // TN: a unit's columns, one value per device so the tuning space does not grow:
    // 16 on a CPU adapter (four vectors a row: fewer operand reads per product, every
    // read being a loop over the SIMD lanes there; 580 -> 452 ms at 1 x 4096 x 4 x 64),
    // 4 elsewhere (16 takes 237-254 registers on CUDA, in cubes of 16-32 units).
    tune(BK = [16, 8, 32, 64], TN = [4, 16]),
    require(
        TN == match device.adapter_type == AdapterType::Cpu {
            true => 16,
            false => 4,
        },
        TN <= BK,
        chunk * chunk + 4 * chunk * BK <= device.max_shared_memory as u32 / 4
    ),
    key(n_chunks = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
    grid = (n_chunks, heads, dk.div_ceil(BK)),
    cube = (chunk / 4) * (BK / TN),
    domain(chunk = [16, 32, 64]),
    defaults(chunk = 64)
)]
pub fn gla_bwd_dqk<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    hs: &Array<f32>,
    dhs: &Array<f32>,
    da: &Array<f32>,
    dq: &mut Array<F>,
    dk_out: &mut Array<F>,
    dgt: &mut Array<f32>,
    n_chunks: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    #[comptime] chunk: u32,
) {
    let at = chunk_at(chunks);
    let (c, h, start, len) = (at.c, at.h, at.start, at.len);
    let k0 = CUBE_POS_Z * BK;
    let units = comptime!((chunk / 4) * (BK / TN));
    // Vectors in a row of a K tile and of dA; the unit's column vectors are
    // `tx + jv * cstep` for `jv < tnv`.
    let kv = comptime!(BK / 4);
    let cv = comptime!(chunk / 4);
    let tnv = comptime!(TN / 4);
    let cstep = comptime!(BK / TN);
    // The chunk's four sub-chunks of `sub_rows` rows; the unit owns the four
    // consecutive rows `r0..r0 + 4` (one sub-chunk, `sub`, starting at row `lo`), so
    // that each operand read in the intra-chunk sums serves four rows.
    let sub_rows = comptime!(chunk / 4);
    let r0 = (UNIT_POS / cstep) * 4;
    let tx = UNIT_POS % cstep;
    let sub = r0 / sub_rows;
    let lo = sub * sub_rows;
    let kvalid = dk - min(k0, dk);
    let zero = V4::new(0.0f32);
    let mut sm = SharedMemory::<V4>::new(comptime!((cv * chunk + 4 * chunk * kv) as usize));
    let tile = comptime!(chunk * kv);

    let mut acc_q = Array::<V4>::new(comptime!((4 * tnv) as usize));
    let mut acc_k = Array::<V4>::new(comptime!((4 * tnv) as usize));
    #[unroll]
    for e in 0..4 * tnv {
        acc_q[e as usize] = zero;
        acc_k[e as usize] = zero;
    }

    // Inter-chunk parts: do h_n^T and v dh_{n+1}^T over V in tiles of `bd` = 16 (for
    // every chunk and BK >= 8 these four tiles take no more of the buffer than the
    // intra-chunk phase). do and v as they lie (depth along the vectors); the states
    // transposed, (v, k) with k along them.
    let bd = comptime!(16u32);
    let x2 = comptime!(chunk * bd / 4);
    let y1 = comptime!(chunk * bd / 2);
    let y2 = comptime!(chunk * bd / 2 + bd * kv);
    let state_base = ((c * heads + h) * dk + k0) * dv;
    let mut v0 = 0u32;
    while v0 < dv {
        let row_base = (start * heads + h) * dv + v0;
        let vvalid = dv - v0;
        load_tile_v4::<F>(
            &mut sm,
            0,
            d_o,
            row_base,
            heads * dv,
            1,
            len,
            vvalid,
            chunk,
            bd,
            units,
        );
        load_tile_v4::<F>(
            &mut sm,
            x2,
            v,
            row_base,
            heads * dv,
            1,
            len,
            vvalid,
            chunk,
            bd,
            units,
        );
        load_tile_v4::<f32>(
            &mut sm,
            y1,
            hs,
            state_base + v0,
            1,
            dv,
            vvalid,
            kvalid,
            bd,
            BK,
            units,
        );
        load_tile_v4::<f32>(
            &mut sm,
            y2,
            dhs,
            state_base + v0,
            1,
            dv,
            vvalid,
            kvalid,
            bd,
            BK,
            units,
        );
        sync_cube();
        reg_tile_mma_v4_rows(
            &mut acc_q,
            &sm,
            0,
            &sm,
            y1,
            r0,
            1u32,
            tx,
            BK,
            bd,
            4u32,
            TN,
            local_scalars,
        );
        reg_tile_mma_v4_rows(
            &mut acc_k,
            &sm,
            x2,
            &sm,
            y2,
            r0,
            1u32,
            tx,
            BK,
            bd,
            4u32,
            TN,
            local_scalars,
        );
        sync_cube();
        v0 += bd;
    }

    // Intra-chunk parts: dA [chunk][chunk], then the q, k, b tiles [chunk][BK] and the
    // factorised tile, all as they lie (columns along the vectors). dA[i][r0..r0 + 4]
    // is one vector, `sm[i * cv + r0 / 4]`.
    let qo = comptime!(cv * chunk);
    let ko = comptime!(cv * chunk + tile);
    let bo = comptime!(cv * chunk + 2 * tile);
    let so = comptime!(cv * chunk + 3 * tile);
    let row_base = (start * heads + h) * dk + k0;
    load_tile_v4::<f32>(
        &mut sm,
        0,
        da,
        (c * heads + h) * chunk * chunk,
        chunk,
        1,
        chunk,
        chunk,
        chunk,
        chunk,
        units,
    );
    load_tile_v4::<F>(
        &mut sm,
        qo,
        q,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    load_tile_v4::<F>(
        &mut sm,
        ko,
        k,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    load_tile_v4::<f32>(
        &mut sm,
        bo,
        gc,
        row_base,
        heads * dk,
        1,
        len,
        kvalid,
        chunk,
        BK,
        units,
    );
    sync_cube();

    // Every exponent below is <= 0 for rows inside the chunk (b does not increase);
    // rows past a short chunk's end read b = 0, operands 0 and are never written, and
    // the `min`s keep their exponents from overflowing.
    // 1. The inter-chunk parts in their final scale.
    #[unroll]
    for jv in 0..tnv {
        let col = tx + jv * cstep;
        let gamma = sm[(bo + (max(len, 1u32) - 1) * kv + col) as usize];
        #[unroll]
        for i in 0..4u32 {
            let b_r = sm[(bo + (r0 + i) * kv + col) as usize];
            let e = (i * tnv + jv) as usize;
            acc_q[e] = acc_q[e] * V4::exp(b_r) * V4::new(scale);
            acc_k[e] = acc_k[e] * V4::exp(gamma - b_r);
        }
    }

    // 2. The pairs across sub-chunks, factorised as fla does ("secondary chunking"): at
    // the boundary before sub-chunk `si`, with `ref = b` at the row before it,
    // `exp(b_i - b_j) = exp(b_i - ref) exp(ref - b_j)` for `j < edge <= i`, both
    // exponents <= 0, so `k~ = k exp(ref - b)` (rows before the boundary) and
    // `q~ = q exp(b - ref)` (rows from it) are formed once per element into one tile
    // and the pairs are plain products: dq of sub-chunk `si`'s rows, dk of sub-chunk
    // `si - 1`'s. A short last chunk takes `ref` at its last row (every later row is 0
    // in the tile). Only the units of those sub-chunks take part (a plane whose units
    // all skip a branch skips it on lavapipe).
    let mut part = Array::<V4>::new(comptime!((4 * tnv) as usize));
    // A run-time loop: unrolled, its three bodies doubled llvmpipe's compile time
    // (24 against 11.7 s at chunk 64) for 2-3 % of the kernel's run time at most.
    for si in 1..4u32 {
        let edge = si * sub_rows;
        let ref_row = min(edge, len) - 1;
        // The previous boundary's products are done with the tile.
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < tile {
            // No branch (a CPU adapter runs both sides): one operand read at a selected
            // address.
            let before = idx / kv < edge;
            let d = sm[(bo + ref_row * kv + idx % kv) as usize] - sm[(bo + idx) as usize];
            let x = sm[(select(before, ko, qo) + idx) as usize];
            sm[(so + idx) as usize] = x * V4::exp(min(select(before, d, zero - d), zero));
            idx += units;
        }
        sync_cube();
        if sub == si {
            // dq of the unit's rows: sum over j < edge of dA_ij k~_j (four j a load of
            // each row of dA), times exp(b_i - ref).
            #[unroll]
            for e in 0..4 * tnv {
                part[e as usize] = zero;
            }
            for s4 in 0..edge / 4 {
                let mut a = Array::<V4>::new(4usize);
                #[unroll]
                for i in 0..4u32 {
                    a[i as usize] = sm[((r0 + i) * cv + s4) as usize];
                }
                #[unroll]
                for e in 0..4u32 {
                    let row = so + (s4 * 4 + e) * kv + tx;
                    #[unroll]
                    for jv in 0..tnv {
                        let y = sm[(row + jv * cstep) as usize];
                        #[unroll]
                        for i in 0..4u32 {
                            let ai = a[i as usize];
                            part[(i * tnv + jv) as usize] += V4::new(ai[e as usize]) * y;
                        }
                    }
                }
            }
            add_rescaled(
                &mut acc_q, &part, &sm, zero, bo, ref_row, r0, tx, kv, tnv, cstep, true,
            );
        }
        if sub + 1 == si {
            // dk of the unit's rows: sum over i >= edge of dA_ij q~_i (the unit's four
            // dA_ij one load), times exp(ref - b_j).
            #[unroll]
            for e in 0..4 * tnv {
                part[e as usize] = zero;
            }
            for s in edge..len {
                let a = sm[(s * cv + r0 / 4) as usize];
                #[unroll]
                for jv in 0..tnv {
                    let y = sm[(so + s * kv + tx + jv * cstep) as usize];
                    #[unroll]
                    for i in 0..4u32 {
                        part[(i * tnv + jv) as usize] += V4::new(a[i as usize]) * y;
                    }
                }
            }
            add_rescaled(
                &mut acc_k, &part, &sm, zero, bo, ref_row, r0, tx, kv, tnv, cstep, false,
            );
        }
    }

    // 3. The pairs inside the unit's sub-chunk, factorised the same way at the unit's
    // own edges: rows `lo..r0` against the unit's rows with `ref` = b at row `r0 - 1`
    // (dq), the unit's rows against rows `r0 + 4..` of the sub-chunk with `ref` = b at
    // row `r0 + 3` (dk); each operand row's exponential serves the four rows. Then the
    // 4 x 4 block on the diagonal element-wise, each exponential serving dq and dk.
    let hi = min(lo + sub_rows, len);
    let ref_q = max(min(r0, len), 1u32) - 1;
    let ref_k = max(min(r0 + 4, len), 1u32) - 1;
    #[unroll]
    for e in 0..4 * tnv {
        part[e as usize] = zero;
    }
    for s4 in lo / 4..r0 / 4 {
        let mut a = Array::<V4>::new(4usize);
        #[unroll]
        for i in 0..4u32 {
            a[i as usize] = sm[((r0 + i) * cv + s4) as usize];
        }
        #[unroll]
        for e in 0..4u32 {
            let j = s4 * 4 + e;
            #[unroll]
            for jv in 0..tnv {
                let col = tx + jv * cstep;
                let d = sm[(bo + ref_q * kv + col) as usize] - sm[(bo + j * kv + col) as usize];
                let y = sm[(ko + j * kv + col) as usize] * V4::exp(min(d, zero));
                #[unroll]
                for i in 0..4u32 {
                    let ai = a[i as usize];
                    part[(i * tnv + jv) as usize] += V4::new(ai[e as usize]) * y;
                }
            }
        }
    }
    let mut part_k = Array::<V4>::new(comptime!((4 * tnv) as usize));
    #[unroll]
    for e in 0..4 * tnv {
        part_k[e as usize] = zero;
    }
    for s in r0 + 4..hi {
        let a = sm[(s * cv + r0 / 4) as usize];
        #[unroll]
        for jv in 0..tnv {
            let col = tx + jv * cstep;
            let d = sm[(bo + s * kv + col) as usize] - sm[(bo + ref_k * kv + col) as usize];
            let y = sm[(qo + s * kv + col) as usize] * V4::exp(min(d, zero));
            #[unroll]
            for i in 0..4u32 {
                part_k[(i * tnv + jv) as usize] += V4::new(a[i as usize]) * y;
            }
        }
    }
    // The unit's dA block: `diag[i]` holds dA[r0 + i][r0..r0 + 4].
    let mut diag = Array::<V4>::new(4usize);
    #[unroll]
    for i in 0..4u32 {
        diag[i as usize] = sm[((r0 + i) * cv + r0 / 4) as usize];
    }
    #[unroll]
    for jv in 0..tnv {
        let col = tx + jv * cstep;
        let mut qr = Array::<V4>::new(4usize);
        let mut kr = Array::<V4>::new(4usize);
        let mut br = Array::<V4>::new(4usize);
        #[unroll]
        for i in 0..4u32 {
            let at = (r0 + i) * kv + col;
            qr[i as usize] = sm[(qo + at) as usize];
            kr[i as usize] = sm[(ko + at) as usize];
            br[i as usize] = sm[(bo + at) as usize];
        }
        let b_q = sm[(bo + ref_q * kv + col) as usize];
        let b_k = sm[(bo + ref_k * kv + col) as usize];
        let mut dq_v = Array::<V4>::new(4usize);
        let mut dk_v = Array::<V4>::new(4usize);
        #[unroll]
        for i in 0..4u32 {
            let e = (i * tnv + jv) as usize;
            let b_i = br[i as usize];
            dq_v[i as usize] = acc_q[e] + part[e] * V4::exp(min(b_i - b_q, zero));
            dk_v[i as usize] = acc_k[e] + part_k[e] * V4::exp(min(b_k - b_i, zero));
        }
        #[unroll]
        for i in 0..4u32 {
            let row = diag[i as usize];
            #[unroll]
            for j in 0..comptime!(i + 1) {
                let a = V4::new(row[j as usize]);
                let w = a * V4::exp(min(br[i as usize] - br[j as usize], zero));
                dq_v[i as usize] += w * kr[j as usize];
                dk_v[j as usize] += w * qr[i as usize];
            }
        }
        // The outputs of the unit's rows inside the chunk.
        #[unroll]
        for i in 0..4u32 {
            let r = r0 + i;
            if r < len {
                let (dqv, dkv) = (dq_v[i as usize], dk_v[i as usize]);
                let g = qr[i as usize] * dqv - kr[i as usize] * dkv;
                #[unroll]
                for j in 0..4u32 {
                    let kk = col * 4 + j;
                    if kk < kvalid {
                        let gi = (row_base + r * heads * dk + kk) as usize;
                        dq[gi] = F::cast_from(dqv[j as usize]);
                        dk_out[gi] = F::cast_from(dkv[j as usize]);
                        dgt[gi] = g[j as usize];
                    }
                }
            }
        }
    }
}

/// `acc += part * exp(min(b_row - b_ref, 0))` (`row_minus_ref`, dq's factor) or
/// `exp(min(b_ref - b_row, 0))` (dk's) for the unit's four rows `r0..r0 + 4` and its
/// `tnv` column vectors `tx + jv * cstep`: the rescaling of a factorised product
/// (`b` the cumulative log-gates at `bo` in the shared buffer, `kv` vectors a row) from
/// the reference row to each of the unit's rows, its exponent <= 0. `zero` is the
/// kernel's own (the emitted code is then the same as written inline).
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_rescaled(
    acc: &mut Array<V4>,
    part: &Array<V4>,
    sm: &SharedMemory<V4>,
    zero: V4,
    bo: u32,
    ref_row: u32,
    r0: u32,
    tx: u32,
    #[comptime] kv: u32,
    #[comptime] tnv: u32,
    #[comptime] cstep: u32,
    #[comptime] row_minus_ref: bool,
) {
    #[unroll]
    for jv in 0..tnv {
        let col = tx + jv * cstep;
        let b_ref = sm[(bo + ref_row * kv + col) as usize];
        #[unroll]
        for i in 0..4u32 {
            let b_row = sm[(bo + (r0 + i) * kv + col) as usize];
            let e = (i * tnv + jv) as usize;
            acc[e] += part[e]
                * V4::exp(min(
                    if comptime!(row_minus_ref) {
                        b_row - b_ref
                    } else {
                        b_ref - b_row
                    },
                    zero,
                ));
        }
    }
}

/// The gate gradient: `dg_t = sum_{t' >= t in its sequence} dgt_t'` plus, from the
/// final state, `rowsum_V(ht * dht)` (with `has_dht`); one unit per (sequence, head,
/// key), walking its sequence backwards. `bounds` holds the `N + 1` sequence bounds.
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(dk = pow2, dtype),
    grid = (n_seq * heads, dk.div_ceil(UNITS)),
    cube = UNITS,
)]
pub fn gla_bwd_dg<F: Float>(
    dgt: &Array<f32>,
    ht: &Array<f32>,
    dht: &Array<f32>,
    bounds: &Array<u32>,
    dg: &mut Array<F>,
    n_seq: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    #[comptime] has_dht: bool,
) {
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let kk = CUBE_POS_Y * UNITS + UNIT_POS;
    if kk < dk {
        let mut acc = 0.0f32;
        if comptime!(has_dht) {
            let base = ((n * heads + h) * dk + kk) * dv;
            for vv in 0..dv {
                acc += ht[(base + vv) as usize] * dht[(base + vv) as usize];
            }
        }
        let bos = bounds[n as usize];
        let mut t = bounds[(n + 1) as usize];
        while t > bos {
            t -= 1;
            let i = ((t * heads + h) * dk + kk) as usize;
            acc += dgt[i];
            dg[i] = F::cast_from(acc);
        }
    }
}
