//! The row-per-unit forward block: each unit owns `TQ` query rows whole (their `q` in
//! registers, their running max and sum, their output accumulator of `BV` value
//! columns), and every unit of a cube walks the same keys in lockstep, `TK` at a time,
//! reading `k` and `v` as 4-wide vectors straight from global memory. No shared memory,
//! no barriers.
//!
//! Why a second forward kernel: on a CPU adapter (lavapipe) a barrier splits the
//! shader into coroutines and every storage read is a loop over the SIMD lanes, even
//! where the address is the same in every lane (measured on Mesa 22.3: docs/moe.md,
//! "Why combine sits at 0.75"). Here every unit reads the same keys and values, so
//! with `SHARE = 8` (planes of 8 with shuffles: lavapipe) each lane of a plane reads an
//! eighth of a key's vectors and receives the others by `plane_shuffle`: 1.11 -> 0.39 s
//! at 1 x 2048 x 8 x 64 on lavapipe. The unit's `q` rows are read once per cube and its
//! output rows written once. On a GPU the `k`/`v` reads are broadcasts within a warp
//! (`SHARE = 1`). The autotuner picks between this kernel and the staged one
//! (`forward.rs`) per device and shape; it needs `D` and `Dv` multiples of 4.
//!
//! Numerics are the staged kernel's: f32 scores and accumulators, masked keys scored
//! `lowest` and given `p = 0` by an explicit test, the accumulator rescaled by
//! `exp(m_old - m_new) <= 1` once per `TK` keys, an empty row's `l = 0` giving `out = 0`
//! and `lse = -inf`.

use super::tile::{query_tile, write_lse};
use cubecl::prelude::*;
use kiln_dsl::{plane_broadcast_v4, V4};
use kiln_runtime::AdapterType;

attention_fwd_kernel! {
    /// Attention forward with log-sum-exp, one unit per `TQ` query rows (see the module
    /// docs); the same arguments and results as `attention_fwd`, with `q`, `k`, `v` as
    /// 4-wide vectors (`D % 4 == 0`, `Dv % 4 == 0`). `DQ` is the number of 4-wide `q`
    /// vectors a unit holds per row (`D <= 4 DQ`, the smallest that fits), `BV` the value
    /// columns of a cube (`Dv > BV` takes several cubes, each recomputing the scores).
    #[kernel(
        tune(
            (BQ, TQ, TK) = [
                (64, 4, 2), (32, 2, 2), (16, 1, 2),
                (128, 16, 2), (64, 8, 2), (32, 4, 2),
                (128, 1, 2),
            ],
            (DQ, BV) = [(16, 64), (32, 128), (64, 256)],
            SHARE = [1, 8]
        ),
        // On a CPU adapter, two tiles per head dim for its wide SIMD (each key's loads
        // feed TQ rows of every unit): first, TQ = 64 / DQ rows in 16 units, which
        // llvmpipe compiles in seconds (what untuned runs use); then the fast one,
        // TQ = 256 / DQ rows in 8 units (one SIMD batch; q and accumulator ~2048 floats
        // per unit; ~30 s to compile, so offered from 4 tiles of rows: a smaller problem
        // runs in milliseconds). Measured on lavapipe at D = 64, S = 2048: TQ = 16
        // took 0.30-0.41 s, 8: 0.40-0.47 s, 32: 0.37-0.39 s for 15x the compile time
        // (docs/attention.md). These spill on CUDA (thousands of bytes per thread). On
        // other devices one row per unit for D <= 64, which fits a GPU's registers
        // (168-220 on sm_80/sm_90a, no spill).
        // SHARE = 8 where planes are 8 lanes with shuffles (lavapipe): the units of a
        // plane read the same key and value vectors, so each reads an eighth of them and
        // receives the rest by `plane_shuffle` (every read is a loop over the lanes
        // there); one value per device, so the tuning space does not grow.
        require(
            SHARE == match device.plane_shuffle && device.plane_size == (8, 8) {
                true => 8,
                false => 1,
            },
            dk % 4 == 0,
            dv % 4 == 0,
            dk <= 4 * DQ,
            DQ == 16 || dk > 2 * DQ,
            match device.adapter_type == AdapterType::Cpu {
                true => (TQ * DQ == 64 && BQ == 16 * TQ) || (TQ * DQ == 256 && BQ == 8 * TQ),
                false => TQ == 1 && DQ == 16 && BQ == 128,
            },
            TQ * DQ <= 64 || max_q >= 4 * BQ
        ),
        grid = (n_seq * max_q.div_ceil(BQ), heads, dv.div_ceil(BV)),
        cube = BQ / TQ,
    )]
    attention_fwd_rows<[Vector<F, Const<4>>]> {
        let lowest = f32::min_value();
        let zero = V4::new(0.0f32);
        let tile = query_tile(bounds_q, bounds_k, max_q, max_k, group, shift, BQ, causal);
        let (i0, h, hk) = (tile.i0, tile.h, tile.hk);
        let (bos_q, bos_k, rows, kmax) = (tile.bos_q, tile.bos_k, tile.rows, tile.kmax);
        let kv_heads = heads / group;
        let dkv = dk / 4;
        let dvv = dv / 4;
        let bvv = comptime!(BV / 4);
        let row_step = comptime!(BQ / TQ);
        // The cube's first value vector and how many of its BV / 4 exist.
        let v0 = CUBE_POS_Z * bvv;
        let cols = select(v0 < dvv, min(dvv - v0, bvv), 0u32);

        // The unit's rows UNIT_POS + i row_step, clamped to the tile's last row (computed,
        // never stored), and their q in registers (zeros past D).
        let last = max(rows, 1u32) - 1;
        let mut qr = Array::<V4>::new(comptime!((TQ * DQ) as usize));
        #[unroll]
        for e in 0..TQ * DQ {
            qr[e as usize] = zero;
        }
        if rows > 0 {
            #[unroll]
            for i in 0..TQ {
                let r = min(UNIT_POS + i * row_step, last);
                let base = ((bos_q + i0 + r) * heads + h) * dkv;
                #[unroll]
                for d in 0..DQ {
                    if d < dkv {
                        qr[(i * DQ + d) as usize] = V4::cast_from(q[(base + d) as usize]);
                    }
                }
            }
        }
        let mut acc = Array::<V4>::new(comptime!((TQ * bvv) as usize));
        #[unroll]
        for e in 0..TQ * bvv {
            acc[e as usize] = zero;
        }
        let mut m_run = Array::<f32>::new(comptime!(TQ as usize));
        let mut l_run = Array::<f32>::new(comptime!(TQ as usize));
        #[unroll]
        for i in 0..TQ {
            m_run[i as usize] = lowest;
            l_run[i as usize] = 0.0f32;
        }
        let mut s = Array::<f32>::new(comptime!((TQ * TK) as usize));
        let mut part = Array::<V4>::new(comptime!(TQ as usize));
        let mut rescale = Array::<f32>::new(comptime!(TQ as usize));
        let mut vt = Array::<V4>::new(comptime!(TK as usize));

        // Vector offsets of key 0 of this KV head in `k` and of the cube's first value
        // vector in `v`, and of one key to the next.
        let k_base = (bos_k * kv_heads + hk) * dkv;
        let k_step = kv_heads * dkv;
        let v_base = (bos_k * kv_heads + hk) * dvv + v0;
        let v_step = kv_heads * dvv;
        let mut j0 = 0u32;
        while j0 < kmax {
            // 1. Scores of the unit's rows against keys j0..j0 + TK. Keys past kmax read
            //    key kmax - 1 (the address stays uniform and in bounds) and are masked.
            #[unroll]
            for t in 0..TK {
                let kb = k_base + min(j0 + t, kmax - 1) * k_step;
                #[unroll]
                for i in 0..TQ {
                    part[i as usize] = zero;
                }
                if comptime!(SHARE > 1) {
                    // Lane l reads the key's vectors l, l + 8, ..; vector d comes from
                    // lane d % 8 (the branches are uniform: every lane shuffles).
                    let mut mine = Array::<V4>::new(comptime!((DQ / SHARE) as usize));
                    #[unroll]
                    for qv in 0..DQ / SHARE {
                        let d = min(qv * SHARE + UNIT_POS_PLANE, dkv - 1);
                        mine[qv as usize] = V4::cast_from(k[(kb + d) as usize]);
                    }
                    #[unroll]
                    for d in 0..DQ {
                        if d < dkv {
                            let kv = shuffled_at(&mine, 0u32, d, SHARE);
                            #[unroll]
                            for i in 0..TQ {
                                part[i as usize] += qr[(i * DQ + d) as usize] * kv;
                            }
                        }
                    }
                } else {
                    #[unroll]
                    for d in 0..DQ {
                        if d < dkv {
                            let kv = V4::cast_from(k[(kb + d) as usize]);
                            #[unroll]
                            for i in 0..TQ {
                                part[i as usize] += qr[(i * DQ + d) as usize] * kv;
                            }
                        }
                    }
                }
                #[unroll]
                for i in 0..TQ {
                    let p = part[i as usize];
                    let mut seen = j0 + t < kmax;
                    if comptime!(causal) {
                        let r = min(UNIT_POS + i * row_step, last);
                        seen = seen && i32::cast_from(j0 + t) <= i32::cast_from(i0 + r) + shift;
                    }
                    s[(i * TK + t) as usize] =
                        select(seen, (p[0] + p[1] + p[2] + p[3]) * scale, lowest);
                }
            }
            // 2. Online softmax of each row over the TK keys. Masked scores (exactly
            //    `lowest`) give p = 0, also while the row has seen nothing else (m =
            //    lowest, where exp(0) would be 1). A NaN score gives NaN p, so l and the
            //    row become NaN, as in PyTorch.
            #[unroll]
            for i in 0..TQ {
                let mut tmax = lowest;
                #[unroll]
                for t in 0..TK {
                    tmax = max(tmax, s[(i * TK + t) as usize]);
                }
                let m_new = max(m_run[i as usize], tmax);
                let alpha = f32::exp(m_run[i as usize] - m_new);
                let mut sum = 0.0f32;
                #[unroll]
                for t in 0..TK {
                    let x = s[(i * TK + t) as usize];
                    let p = select(x == lowest, 0.0f32, f32::exp(x - m_new));
                    s[(i * TK + t) as usize] = p;
                    sum += p;
                }
                l_run[i as usize] = l_run[i as usize] * alpha + sum;
                m_run[i as usize] = m_new;
                rescale[i as usize] = alpha;
            }
            // 3. O = alpha O + P V over the same keys (a masked key's p is 0), one
            //    accumulator vector at a time: it stays in a register across the TK keys
            //    (the accumulators of TQ rows do not fit in registers on a CPU).
            // With SHARE, each lane first reads its eighth of the TK keys' value vectors.
            let per_lane = comptime!(if SHARE > 1 { bvv / SHARE } else { 1 });
            let mut vmine = Array::<V4>::new(comptime!((TK * per_lane) as usize));
            if comptime!(SHARE > 1) {
                if cols > 0 {
                    #[unroll]
                    for t in 0..TK {
                        let key = min(j0 + t, kmax - 1);
                        #[unroll]
                        for qv in 0..per_lane {
                            let c = min(qv * SHARE + UNIT_POS_PLANE, cols - 1);
                            vmine[(t * per_lane + qv) as usize] =
                                V4::cast_from(v[(v_base + key * v_step + c) as usize]);
                        }
                    }
                }
            }
            #[unroll]
            for c in 0..bvv {
                if c < cols {
                    #[unroll]
                    for t in 0..TK {
                        if comptime!(SHARE > 1) {
                            vt[t as usize] = shuffled_at(&vmine, t * per_lane, c, SHARE);
                        } else {
                            let key = min(j0 + t, kmax - 1);
                            vt[t as usize] =
                                V4::cast_from(v[(v_base + key * v_step + c) as usize]);
                        }
                    }
                    #[unroll]
                    for i in 0..TQ {
                        let x = (i * bvv + c) as usize;
                        let mut a = acc[x] * V4::new(rescale[i as usize]);
                        #[unroll]
                        for t in 0..TK {
                            a += V4::new(s[(i * TK + t) as usize]) * vt[t as usize];
                        }
                        acc[x] = a;
                    }
                }
            }
            j0 += TK;
        }

        // Each row's log-sum-exp (an empty row: l = 0, lse = -inf through ln(0)) and its
        // output, divided by l (by 1 for an empty row, whose accumulator is 0).
        #[unroll]
        for i in 0..TQ {
            let r = UNIT_POS + i * row_step;
            if r < rows {
                let l = l_run[i as usize];
                let t = bos_q + i0 + r;
                if CUBE_POS_Z == 0 {
                    write_lse(lse, &tile, r, heads, lse_rows, m_run[i as usize], l, temperature, log_lse_scale, varlen);
                }
                let denom = V4::new(select(l == 0.0, 1.0f32, l));
                let o_base = (t * heads + h) * dv + v0 * 4;
                #[unroll]
                for c in 0..bvv {
                    if c < cols {
                        let x = acc[(i * bvv + c) as usize] / denom;
                        #[unroll]
                        for e in 0..4u32 {
                            let at = (o_base + c * 4 + e) as usize;
                            if comptime!(out_f32) {
                                out32[at] = x[e as usize];
                            } else {
                                out[at] = F::cast_from(x[e as usize]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Vector `d` of the row starting at `mine[first]`, whose vectors the plane's lanes hold
/// `share` apart (lane `d % share` holds it in `mine[first + d / share]`), received by a
/// shuffle per component.
#[cube]
fn shuffled_at(
    mine: &Array<V4>,
    #[comptime] first: u32,
    #[comptime] d: u32,
    #[comptime] share: u32,
) -> V4 {
    plane_broadcast_v4(
        mine[comptime!((first + d / share) as usize)],
        comptime!(d % share),
    )
}
