//! The step-by-step (recurrent) form: the decode step, and the recurrent forward used
//! for short sequences and as a cross-check of the chunked kernels.
//!
//! One cube per (sequence, head, V tile) of `BV x KG` units: unit (v, kg) owns the
//! state column `v` at rows `kg, kg + KG, ...` in registers, so a step costs it
//! `2 K / KG` FMAs and one exponential-free update; the cube stages `TS` steps of
//! `q * scale`, `k` and `exp(g)` in shared memory at a time (one exponential per
//! element, not per unit) and sums the `KG` partial outputs of each step there.

use cubecl::prelude::*;

/// Steps staged per shared-memory round: the most of 16, 8, 4, 2, 1 whose tiles fit
/// in 24 KiB (`3 TS K'` staged inputs plus `TS KG BV` partial outputs, f32).
pub fn steps_per_round(dk_padded: u32, kg: u32, bv: u32) -> u32 {
    [16u32, 8, 4, 2, 1]
        .into_iter()
        .find(|ts| (3 * ts * dk_padded + ts * kg * bv) * 4 <= 24 * 1024)
        .unwrap_or(1)
}

kiln_runtime::comptime_enum! {
    /// Where the recurrent kernel's initial state comes from.
    pub enum StateInit {
        /// A zero state.
        Zero = "zero",
        /// The `init` argument (`h0`).
        FromInit = "from_init",
        /// `state` itself: the in-place decode step.
        InPlace = "in_place",
    }
}

/// `S = diag(exp(g_t)) S + k_t^T v_t; o_t = scale q_t S` over each sequence's rows
/// (`bounds`, `N + 1` entries), `g` in f32. The state comes from `init_mode` (zero,
/// `init`, or `state` itself), and the final state is written to `state`
/// `[N, H, K, V]`. `dk`, `dv` are comptime: a unit's state rows live in registers.
#[kiln_macros::kernel(
    tune(BV = [32, 64, 16], KG = [8, 4]),
    require(BV <= dv.next_power_of_two().max(16)),
    key(n_seq = pow2, dtype),
    grid = (n_seq * heads, dv.div_ceil(BV)),
    cube = (BV, KG),
    // A unit keeps ceil(dk / KG) state rows in registers.
    domain(dk = 1..=1024, dv = 1..=1024),
    defaults(dk = 64, dv = 64)
)]
pub fn gla_recurrent<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<f32>,
    bounds: &Array<u32>,
    init: &Array<f32>,
    state: &mut Array<f32>,
    o: &mut Array<F>,
    n_seq: u32,
    heads: u32,
    scale: f32,
    #[comptime] dk: u32,
    #[comptime] dv: u32,
    #[comptime] init_mode: StateInit,
) {
    let rows = comptime!(dk.div_ceil(KG));
    let kp = comptime!(rows * KG);
    let ts = comptime!(steps_per_round(rows * KG, KG, BV));
    let units = comptime!(BV * KG);
    let n = CUBE_POS_X / heads;
    let h = CUBE_POS_X % heads;
    let vl = UNIT_POS_X;
    let kg = UNIT_POS_Y;
    let v0 = CUBE_POS_Y * BV;
    let vv = v0 + vl;

    let mut qs = SharedMemory::<f32>::new(comptime!((ts * kp) as usize));
    let mut ks = SharedMemory::<f32>::new(comptime!((ts * kp) as usize));
    let mut ds = SharedMemory::<f32>::new(comptime!((ts * kp) as usize));
    let mut po = SharedMemory::<f32>::new(comptime!((ts * KG * BV) as usize));

    let mut s = Array::<f32>::new(comptime!(rows as usize));
    let state_base = (n * heads + h) * comptime!(dk * dv);
    #[unroll]
    for r in 0..rows {
        let kk = kg + r * KG;
        let mut init_v = 0.0f32;
        if kk < comptime!(dk) && vv < comptime!(dv) {
            if comptime!(init_mode == StateInit::FromInit) {
                init_v = init[(state_base + kk * comptime!(dv) + vv) as usize];
            }
            if comptime!(init_mode == StateInit::InPlace) {
                init_v = state[(state_base + kk * comptime!(dv) + vv) as usize];
            }
        }
        s[r as usize] = init_v;
    }

    let bos = bounds[n as usize];
    let eos = bounds[(n + 1) as usize];
    let mut t0 = bos;
    while t0 < eos {
        // Stage TS steps; padding rows and steps past the end decay by 1 and add 0.
        let mut idx = UNIT_POS;
        while idx < comptime!(ts * kp) {
            let st = idx / kp;
            let kk = idx % kp;
            let t = t0 + st;
            let mut qv = 0.0f32;
            let mut kv = 0.0f32;
            let mut dv_ = 1.0f32;
            if t < eos && kk < comptime!(dk) {
                let i = ((t * heads + h) * comptime!(dk) + kk) as usize;
                qv = f32::cast_from(q[i]) * scale;
                kv = f32::cast_from(k[i]);
                dv_ = f32::exp(g[i]);
            }
            qs[idx as usize] = qv;
            ks[idx as usize] = kv;
            ds[idx as usize] = dv_;
            idx += units;
        }
        sync_cube();
        for st in 0..ts {
            let t = t0 + st;
            let mut val = 0.0f32;
            if t < eos && vv < comptime!(dv) {
                val = f32::cast_from(v[((t * heads + h) * comptime!(dv) + vv) as usize]);
            }
            let mut acc = 0.0f32;
            let base = st * kp + kg;
            #[unroll]
            for r in 0..rows {
                let i = (base + r * KG) as usize;
                let sr = ds[i] * s[r as usize] + ks[i] * val;
                s[r as usize] = sr;
                acc += qs[i] * sr;
            }
            po[((st * KG + kg) * BV + vl) as usize] = acc;
        }
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < comptime!(ts * BV) {
            let st = idx / BV;
            let vl2 = idx % BV;
            let t = t0 + st;
            if t < eos && v0 + vl2 < comptime!(dv) {
                let mut sum = 0.0f32;
                #[unroll]
                for j in 0..KG {
                    sum += po[((st * KG + j) * BV + vl2) as usize];
                }
                o[((t * heads + h) * comptime!(dv) + v0 + vl2) as usize] = F::cast_from(sum);
            }
            idx += units;
        }
        sync_cube();
        t0 += ts;
    }

    #[unroll]
    for r in 0..rows {
        let kk = kg + r * KG;
        if kk < comptime!(dk) && vv < comptime!(dv) {
            state[(state_base + kk * comptime!(dv) + vv) as usize] = s[r as usize];
        }
    }
}

/// `out = f32(x)`: gates given in half precision are upcast once before the
/// recurrent kernels read them.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    grid = cubes(len.div_ceil(UNITS)),
    cube = UNITS,
    name = "gla_upcast"
)]
pub fn to_f32<F: Float>(x: &Array<F>, out: &mut Array<f32>, len: u32) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if i < len {
        out[i as usize] = f32::cast_from(x[i as usize]);
    }
}
