//! The fused step's kernels: `optim_step` (every rule, one pass or LAMB's and
//! AdaGrad-Norm's two), `optim_slot_norms` (the per-slot sums of those two rules, in a
//! fixed order) and `optim_advance_step` (the device step counter). The host side, the
//! state layout and the numerics: `super::multi`.
#![allow(clippy::manual_div_ceil)] // kernel code: `(a + b - 1) / b` is what the emitted code does, written as such

use super::adam::{adam_constants, adam_direction_of, advance_moments, one_minus_pow};
use super::rules::Rule;
use super::slots::{segment_of, select_slot, slot_kernel, slot_of, store_slot, SLOTS, SLOT_WORDS};
use cubecl::prelude::*;
use kiln_dsl::cube_sum;

/// Units per cube of the step kernel (its one configuration, `UNITS = [256]`).
pub(super) const STEP_UNITS: usize = 256;
/// Vectors per unit of the step kernel (its one configuration, `PER = [4]`).
pub(super) const STEP_PER: usize = 4;
/// The norms pass with a partial sum per unit (`Sums::PerUnit`, CPU adapters) takes this
/// many times `PER` vectors a unit: four times fewer partials for the slot reduction to
/// add (one cube per slot) and fewer stores (lavapipe, AdaGrad-Norm on 4M: the reduction
/// 4.5 -> 1.8 ms; the update pass keeps `PER`, where more vectors a unit ran slower).
pub(super) const NORMS_REPS: usize = 4;

kiln_runtime::comptime_enum! {
    /// Which pass of the step kernel runs (a `#[comptime]` specialisation).
    pub enum Phase {
        /// The update (every rule; for LAMB and AdaGrad-Norm with the slot's norms).
        Update = "update",
        /// LAMB and AdaGrad-Norm's first pass: per-cube partial sums of squares.
        Norms = "norms",
    }
}

kiln_runtime::comptime_enum! {
    /// Where the norms pass of LAMB and AdaGrad-Norm leaves its partial sums of squares
    /// (a `#[comptime]` specialisation; the slot reduction adds them in a fixed order
    /// either way, so both are deterministic).
    pub enum Sums {
        /// One pair per cube, from a cube reduction (three barriers): GPUs, where a
        /// barrier is cheap and 256 times fewer partials keep the one-cube-per-slot
        /// reduction short.
        PerCube = "per_cube",
        /// One pair per unit, no barrier: CPU adapters, where a barrier switches every
        /// SIMD slice of the cube (lavapipe, 4M elements: LAMB 30.3 -> 23.7 ms,
        /// AdaGrad-Norm 20.3 -> 13.7 ms, docs/optim.md).
        PerUnit = "per_unit",
    }
}

impl Sums {
    /// `PerUnit` on a CPU adapter, else `PerCube`.
    pub fn for_device(client: &kiln_runtime::Client) -> Sums {
        match client.report().adapter_type == kiln_runtime::AdapterType::Cpu {
            true => Sums::PerUnit,
            false => Sums::PerCube,
        }
    }
}

/// The sum of a vector's lanes.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let width = N::value().comptime() as u32;
    let mut s = 0.0f32;
    #[unroll]
    for l in 0..width {
        s += v[l as usize];
    }
    s
}

slot_kernel! {
    /// The fused step over up to six slots (see the module doc): each unit updates one
    /// `N`-wide vector of one slot's elements (`N` = 4 when every slot of the launch is
    /// 4-aligned: lengths, columns, row strides and offsets; else 1: the `width` array's
    /// length caps it), each cube within one slot. Table entries are in elements.
    /// `t = counter[0] + 1`. f32 arithmetic throughout; with `master` the state's master
    /// copy is the parameter and the weight receives its rounding. In place: one
    /// configuration, so the autotuner never runs it twice. `phase` = `Norms` (LAMB,
    /// AdaGrad-Norm) writes the cube's sums of squares to `partials` (past `2 SLOTS`
    /// words) instead of the weight; LAMB's update reads the slot's norms at
    /// `partials[2 slot ..]` (the slot reduction's `totals`, bound in its place).
    /// `spans`: every slot is a whole tensor in the one weight binding `w0` (views of one
    /// flat buffer, at the table's offsets) with its gradient at the same offset in `g0`;
    /// `nslots` slots, as many as the table holds, found by a binary search.
    #[kernel(
        tune(UNITS = [256], PER = [4]),
        vector = [4, 1],
        key(len = pow2, dtype),
        grid = cubes(cubes),
        cube = UNITS,
        domain(slots = 1..=6)
    )]
    pub fn optim_step(
        state: &mut Array<Vector<f32, N>>,
        width: &Array<Vector<f32, N>>,
        table: &Array<u32>,
        counter: &Array<u32>,
        partials: &mut Array<f32>,
        len: u32,
        cubes: u32,
        nslots: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        beta3: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        one_minus_beta3: f32,
        ln_beta1: f32,
        ln_beta2: f32,
        ln_beta3: f32,
        eps: f32,
        weight_decay: f32,
        decay_before: f32,
        decay_after: f32,
        #[comptime] rule: Rule,
        #[comptime] master: bool,
        #[comptime] phase: Phase,
        #[comptime] slots: u32,
        #[comptime] strided: bool,
        #[comptime] sums: Sums,
        #[comptime] spans: bool,
    ) {
        let _ = width[0];
        let nw = N::value().comptime() as u32;
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        // The slot and its constants before any branch: the addresses are uniform in the
        // cube, so a CPU adapter loads each once (inside control flow it gathers per lane).
        let mut b = 0u32;
        if comptime!(spans) {
            b = segment_of(table, cube, nslots);
        }
        if comptime!(!spans) {
            b = slot_of(table, cube, slots);
        }
        let t = b * comptime!(SLOT_WORDS as u32);
        // The slot's first cube, its length in elements and vectors, its weight layout and
        // state base.
        let first_cube = table[t as usize];
        let n = table[(t + 1) as usize];
        let nv = n / nw;
        let cols = table[(t + 2) as usize];
        let ld = table[(t + 3) as usize];
        let w_off = table[(t + 4) as usize];
        let base = table[(t + 5) as usize];
        // Per-element states `stride` apart (the slot's length rounded up to 4); `start`:
        // where this part of the slot begins (a ragged slot's 4-wide body and its tail).
        let stride = table[(t + 6) as usize];
        let start = table[(t + 7) as usize];
        let sv = stride / nw;
        let step = counter[0];
        // Per-element states at base + j stride + e, scalars at base + K stride + j,
        // master after (all 4-aligned when N = 4: the host pads slot offsets and
        // strides, and refuses N = 4 for a master copy behind per-tensor scalars).
        let k = comptime!(rule.element_states() as u32);
        let scalars_at = base + k * stride;
        // The update's per-slot factors, here for the same reason: LAMB's trust ratio
        // from the slot's norms; AdaGrad-Norm's step size from its `b2` (advanced by the
        // slot reduction; it sits 4-aligned, lane 0, or alone when N = 1). Inside the
        // loop each would be one more gather per vector, as dear as a stream.
        let mut trust = 1.0f32;
        if comptime!(rule == Rule::Lamb && phase == Phase::Update) {
            let w_norm = f32::sqrt(partials[(2 * b) as usize]);
            let r_norm = f32::sqrt(partials[(2 * b + 1) as usize]);
            trust = select(w_norm > 0.0 && r_norm > 0.0, w_norm / r_norm, 1.0f32);
        }
        let mut b2_step = 0.0f32;
        if comptime!(rule == Rule::AdaGradNorm && phase == Phase::Update) {
            let b2 = state[(scalars_at / nw) as usize][0];
            b2_step = lr / (f32::sqrt(b2) + eps);
        }
        if cube < cubes {
            // A whole row-major weight (or a rows block): no division per vector. `strided`
            // (comptime: a column block in the launch) because lavapipe would compute the
            // division of an untaken branch anyway.
            let contiguous = ld == cols;
            let tf = f32::cast_from(step + 1);
            let moments = adam_constants(
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                ln_beta1,
                ln_beta2,
                eps,
                tf,
            );
            // Adan's other bias corrections, also once per unit.
            let mut adan_bc2 = 1.0f32;
            let mut adan_sqrt_bc3 = 1.0f32;
            if comptime!(rule == Rule::Adan) {
                adan_bc2 = one_minus_pow(ln_beta2, tf);
                adan_sqrt_bc3 = f32::sqrt(one_minus_pow(ln_beta3, tf));
            }
            let zero = Vector::<f32, N>::new(0.0);
            let wd = Vector::<f32, N>::new(weight_decay);
            let mut sq0 = 0.0f32;
            let mut sq1 = 0.0f32;
            // What this pass reads besides the states: LAMB's update has its direction from
            // m and v (no gradient), AdaGrad-Norm's norms pass needs the weight only for
            // its decay term. A stream not read is a stream of memory traffic saved
            // (uniform branches: no lane reads it).
            let reads_g = comptime!(!(phase == Phase::Update && rule == Rule::Lamb));
            let mut reads_p = true;
            if comptime!(phase == Phase::Norms && rule == Rule::AdaGradNorm) {
                reads_p = weight_decay != 0.0;
            }
            // Each unit updates PER vectors (NORMS_REPS times that in a per-unit norms pass),
            // UNITS apart (consecutive units touch consecutive vectors): the slot lookup and
            // the step's constants are paid once per unit.
            let per = comptime!(match phase == Phase::Norms && sums == Sums::PerUnit {
                true => PER * NORMS_REPS as u32,
                false => PER,
            });
            #[unroll]
            for rep in 0..per {
                let e = (cube - first_cube) * comptime!(UNITS * per) + rep * UNITS + UNIT_POS;
                let inside = e < nv;
                // Out-of-slot units read vector 0 (a slot has one, or no cube) and add nothing.
                let ei = select(inside, e, 0u32);
                let first = ei * nw;
                let mut w_at = (w_off + first) / nw;
                if comptime!(strided) {
                    if !contiguous {
                        w_at = (w_off + (first / cols) * ld + first % cols) / nw;
                    }
                }
                // A span's gradient sits where its weight does, in the other buffer.
                let mut g_at = start / nw + ei;
                if comptime!(spans) {
                    g_at = w_at;
                }
                let s_at = (base + start) / nw + ei;
                let master_at =
                    (scalars_at + comptime!(rule.scalar_states() as u32) + start) / nw + ei;
                let mut g = zero;
                let mut p = zero;
                if inside {
                    if comptime!(reads_g) {
                        g = Vector::<f32, N>::cast_from(select_slot(
                            g0, g1, g2, g3, g4, g5, b, g_at, slots,
                        ));
                    }
                    if reads_p {
                        if comptime!(master) {
                            p = state[master_at as usize];
                        }
                        if comptime!(!master) {
                            p = Vector::<f32, N>::cast_from(select_slot(
                                w0, w1, w2, w3, w4, w5, b, w_at, slots,
                            ));
                        }
                    }
                }
                if comptime!(phase == Phase::Norms) {
                    if inside {
                        if comptime!(rule == Rule::Lamb) {
                            let mv = advance_moments(state, s_at, sv, g, moments, false);
                            let r = adam_direction_of(mv.m, mv.v, moments) + wd * p;
                            sq0 += lane_sum(p * p);
                            sq1 += lane_sum(r * r);
                        }
                        if comptime!(rule == Rule::AdaGradNorm) {
                            let gg = g + wd * p;
                            sq0 += lane_sum(gg * gg);
                        }
                    }
                }
                if comptime!(phase == Phase::Update) {
                    if inside {
                        p *= Vector::<f32, N>::new(decay_before);
                        if comptime!(rule == Rule::AdamW || rule == Rule::AdaBelief) {
                            let belief = comptime!(rule == Rule::AdaBelief);
                            let mv = advance_moments(state, s_at, sv, g, moments, belief);
                            p -= Vector::<f32, N>::new(lr) * adam_direction_of(mv.m, mv.v, moments);
                        }
                        if comptime!(rule == Rule::Adan) {
                            // The difference is 0 at the first step (grad_prev is not yet a gradient).
                            let mut delta = g - state[(s_at + 3 * sv) as usize];
                            if step == 0 {
                                delta = zero;
                            }
                            let m = Vector::<f32, N>::new(beta1) * state[s_at as usize]
                                + Vector::<f32, N>::new(one_minus_beta1) * g;
                            let d = Vector::<f32, N>::new(beta2) * state[(s_at + sv) as usize]
                                + Vector::<f32, N>::new(one_minus_beta2) * delta;
                            let u = g + Vector::<f32, N>::new(beta2) * delta;
                            let nn = Vector::<f32, N>::new(beta3) * state[(s_at + 2 * sv) as usize]
                                + Vector::<f32, N>::new(one_minus_beta3) * u * u;
                            let den = Vector::sqrt(nn) / Vector::<f32, N>::new(adan_sqrt_bc3)
                                + Vector::<f32, N>::new(eps);
                            p -= Vector::<f32, N>::new(lr / moments.bc1) * m / den
                                + Vector::<f32, N>::new(lr * beta2 / adan_bc2) * d / den;
                            state[s_at as usize] = m;
                            state[(s_at + sv) as usize] = d;
                            state[(s_at + 2 * sv) as usize] = nn;
                            state[(s_at + 3 * sv) as usize] = g;
                        }
                        if comptime!(rule == Rule::AdaGrad) {
                            let gg = g + wd * p;
                            let v = state[s_at as usize] + gg * gg;
                            p -= Vector::<f32, N>::new(lr) * gg
                                / (Vector::sqrt(v) + Vector::<f32, N>::new(eps));
                            state[s_at as usize] = v;
                        }
                        if comptime!(rule == Rule::Lamb) {
                            // The moments were advanced by the norms pass; the same r again.
                            let r = adam_direction_of(
                                state[s_at as usize],
                                state[(s_at + sv) as usize],
                                moments,
                            ) + wd * p;
                            p -= Vector::<f32, N>::new(lr * trust) * r;
                        }
                        if comptime!(rule == Rule::AdaGradNorm) {
                            let gg = g + wd * p;
                            p -= Vector::<f32, N>::new(b2_step) * gg;
                        }
                        p *= Vector::<f32, N>::new(decay_after);
                        if comptime!(master) {
                            state[master_at as usize] = p;
                        }
                        let out = Vector::<F, N>::cast_from(p);
                        store_slot(w0, w1, w2, w3, w4, w5, b, w_at, out, slots);
                    }
                }
            }
            if comptime!(phase == Phase::Norms) {
                // Past `2 SLOTS` words (kept free so that every cube's sums start 4-aligned):
                // one pair per unit, or two per cube (the second zero), so that the slot
                // reduction reads them two pairs to a 4-wide vector.
                let totals = comptime!(2 * SLOTS as u32);
                if comptime!(sums == Sums::PerUnit) {
                    let at = totals + 2 * (cube * UNITS + UNIT_POS);
                    partials[at as usize] = sq0;
                    if comptime!(rule == Rule::Lamb) {
                        partials[(at + 1) as usize] = sq1;
                    }
                } else {
                    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
                    let total0 = cube_sum(&mut smem, sq0, UNITS);
                    let mut total1 = 0.0f32;
                    if comptime!(rule == Rule::Lamb) {
                        total1 = cube_sum(&mut smem, sq1, UNITS);
                    }
                    if UNIT_POS == 0 {
                        let at = totals + 4 * cube;
                        partials[at as usize] = total0;
                        partials[(at + 1) as usize] = total1;
                        partials[(at + 2) as usize] = 0.0;
                        partials[(at + 3) as usize] = 0.0;
                    }
                }
            }
        }
    }
}

/// Per-slot sums of the step kernel's partials (`Phase::Norms`; `per_cube` elements per
/// cube, `sums_per_cube` pairs per cube, read two pairs to a 4-wide vector: the pairs of
/// a slot start 4-aligned and are even in number), one cube per slot, in a fixed order:
/// LAMB's `||p||^2, ||r||^2` to `totals[2 slot ..]` (the update reads them there);
/// AdaGrad-Norm's `||g||^2` added to the slot's `b2`. Unused slots do nothing.
/// `nslots`: the table's slots ([`SLOTS`], or a span launch's count).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (nslots), cube = UNITS)]
pub fn optim_slot_norms(
    partials: &Array<Vector<f32, Const<4>>>,
    totals: &mut Array<f32>,
    state: &mut Array<f32>,
    table: &Array<u32>,
    nslots: u32,
    cubes: u32,
    per_cube: u32,
    sums_per_cube: u32,
    #[comptime] rule: Rule,
) {
    let t = CUBE_POS_X * comptime!(SLOT_WORDS as u32);
    let first = table[t as usize];
    if first < cubes {
        let n = table[(t + 1) as usize];
        let count = (n + per_cube - 1) / per_cube * sums_per_cube / 2;
        let base = (comptime!(2 * SLOTS as u32) + 2 * first * sums_per_cube) / 4;
        let mut s0 = 0.0f32;
        let mut s1 = 0.0f32;
        let mut i = UNIT_POS;
        while i < count {
            let v = partials[(base + i) as usize];
            s0 += v[0] + v[2];
            // AdaGrad-Norm has one sum (its second is never written).
            if comptime!(rule == Rule::Lamb) {
                s1 += v[1] + v[3];
            }
            i += UNITS;
        }
        let mut smem = SharedMemory::<f32>::new(UNITS as usize);
        let total0 = cube_sum(&mut smem, s0, UNITS);
        let mut total1 = 0.0f32;
        if comptime!(rule == Rule::Lamb) {
            total1 = cube_sum(&mut smem, s1, UNITS);
        }
        if UNIT_POS == 0 {
            if comptime!(rule == Rule::AdaGradNorm) {
                let at = table[(t + 5) as usize]
                    + comptime!(rule.element_states() as u32) * table[(t + 6) as usize];
                state[at as usize] += total0;
            }
            if comptime!(rule != Rule::AdaGradNorm) {
                totals[(2 * CUBE_POS_X) as usize] = total0;
                totals[(2 * CUBE_POS_X + 1) as usize] = total1;
            }
        }
    }
}

/// `counter[0] += 1`, one unit: ordered after the step's launches on the stream.
#[kiln_macros::kernel(tune(UNITS = [1]), grid = (1), cube = UNITS)]
pub fn optim_advance_step(counter: &mut Array<u32>) {
    if UNIT_POS == 0 {
        counter[0] = counter[0] + 1;
    }
}
