//! FRUGAL's kernels: expanding chosen rows or columns into coordinates, packing a
//! redrawn subset into its sorted indices and mask, and the step in two passes over up
//! to `SLOTS` tensors a launch: signSGD where the mask is clear, then Adam over the
//! subset's state slots (on a SIMD machine one masked pass ran both sides for nearly
//! every group of lanes).

use super::super::topk::unit_layout;
use super::*;
use kiln_dsl::linear_unit;

/// Position of the first of `indices[at .. at + k]` (increasing) that is `>= e`, counted
/// from `at`.
#[cube]
fn lower_bound(indices: &Array<i32>, at: u32, k: u32, e: u32) -> u32 {
    let mut lo = 0u32;
    let mut hi = k;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if u32::cast_from(indices[(at + mid) as usize]) < e {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Packs one tensor's subset: copies `picked[..k]` (sorted) to `indices[indices_at ..]`
/// and sets bit `b` of `mask[mask_at + w]` where `32 w + b` is in it (unit `w` finds its
/// word's entries by binary search: one writer per word, no atomics). `units` =
/// `max(words, k)`.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(units.div_ceil(UNITS)), cube = UNITS)]
pub fn frugal_mask(
    picked: &Array<i32>,
    indices: &mut Array<i32>,
    mask: &mut Array<u32>,
    k: u32,
    words: u32,
    units: u32,
    indices_at: u32,
    mask_at: u32,
) {
    let w = linear_unit() as u32;
    if w < units {
        if w < k {
            indices[(indices_at + w) as usize] = picked[w as usize];
        }
        if w < words {
            let mut j = lower_bound(picked, 0, k, w * 32);
            let mut bits = 0u32;
            while j < k {
                let i = u32::cast_from(picked[j as usize]);
                if i >= w * 32 + 32 {
                    break;
                }
                bits |= 1u32 << (i - w * 32);
                j += 1;
            }
            mask[(mask_at + w) as usize] = bits;
        }
    }
}

/// Expands the `taken` chosen lines (`lines`, increasing) of a `[rows, cols]` matrix into
/// their `k` coordinates, increasing: with `columns`, row `r`'s entry of every chosen
/// column (`k = rows · taken`, position `r · taken + c`); else every entry of each chosen
/// row (`k = taken · cols`). Row-major order keeps the subset sorted, as the mask's
/// binary search wants it.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(k.div_ceil(UNITS)), cube = UNITS)]
pub fn frugal_lines(
    lines: &Array<i32>,
    picked: &mut Array<i32>,
    k: u32,
    taken: u32,
    cols: u32,
    columns: u32,
) {
    let u = linear_unit() as u32;
    if u < k {
        let mut at = 0u32;
        if columns == 1u32 {
            at = (u / taken) * cols + u32::cast_from(lines[(u % taken) as usize]);
        } else {
            at = u32::cast_from(lines[(u / cols) as usize]) * cols + u % cols;
        }
        picked[u as usize] = i32::cast_from(at);
    }
}

/// One slot's entry of a FRUGAL step's table (see [`frugal_sign_step`]).
#[derive(CubeType, Clone, Copy)]
struct FrugalSlot {
    /// The slot (0..slots).
    b: u32,
    first_cube: u32,
    n: u32,
    k: u32,
    indices_at: u32,
    mask_at: u32,
    /// `m`'s offset in the moments (a multiple of 4; `v` at `+ k` rounded up to 4).
    state_at: u32,
    /// The master copy's offset in the masters.
    master_at: u32,
    /// The tensor's first element in its binding (a span launch's offset; else 0).
    data_at: u32,
}

/// `cube`'s slot and its table entry, read before any branch (uniform in the cube: a CPU
/// adapter loads each word once; inside control flow it would gather per lane). With
/// `spans`, among the table's `nslots` by a binary search.
#[cube]
fn frugal_slot(
    table: &Array<u32>,
    cube: u32,
    nslots: u32,
    #[comptime] slots: u32,
    #[comptime] spans: bool,
) -> FrugalSlot {
    let mut b = 0u32;
    if comptime!(spans) {
        b = segment_of(table, cube, nslots);
    }
    if comptime!(!spans) {
        b = slot_of(table, cube, slots);
    }
    let t = b * comptime!(SLOT_WORDS as u32);
    FrugalSlot {
        b,
        first_cube: table[t as usize],
        n: table[(t + 1) as usize],
        k: table[(t + 2) as usize],
        indices_at: table[(t + 3) as usize],
        mask_at: table[(t + 4) as usize],
        state_at: table[(t + 5) as usize],
        master_at: table[(t + 6) as usize],
        data_at: table[(t + 7) as usize],
    }
}

slot_kernel! {
    /// FRUGAL's state-free part over up to six tensors (slots; the table's words per slot:
    /// first cube, `n`, `k`, subset, mask, moments and master offsets, the tensor's offset
    /// in its binding; with `spans` any number, all in `w0` / `g0`), each unit `PER`
    /// `N`-wide vectors of coordinates, `UNITS` apart or with `contiguous` consecutive
    /// (`topk::UnitLayout`; `N` = 4 where every slot's length is a multiple of 4, else 1),
    /// each cube within one slot: where the mask is clear,
    /// decoupled decay and `p -= lr_free sign(g)`; coordinates with state keep their value
    /// here and are [`frugal_adam_step`]'s, which runs after (a whole tensor with state
    /// has no cubes here). Branch-free over a vector's lanes (the vector shares one mask
    /// word). With `master` the slot's f32 master copy (in `masters`) is the
    /// parameter and the weight receives its rounding. In place: one configuration.
    #[kernel(
        tune(UNITS = [256], PER = [4]),
        vector = [4, 1],
        key(len = pow2, dtype),
        grid = cubes(cubes),
        cube = UNITS,
        domain(slots = 1..=6)
    )]
    pub fn frugal_sign_step(
        mask: &Array<u32>,
        masters: &mut Array<f32>,
        width: &Array<Vector<f32, N>>,
        table: &Array<u32>,
        len: u32,
        cubes: u32,
        nslots: u32,
        contiguous: u32,
        lr_free: f32,
        decay: f32,
        #[comptime] master: bool,
        #[comptime] slots: u32,
        #[comptime] spans: bool,
    ) {
        // `width`'s length caps the launch's vector width.
        let _ = width[0];
        let nw = N::value().comptime() as u32;
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        let slot = frugal_slot(table, cube, nslots, slots, spans);
        // The tensor's first vector in its binding.
        let data_v = slot.data_at / nw;
        if cube < cubes {
            let (unit_step, rep_step) = unit_layout(contiguous, PER, UNITS);
            let v0 = (cube - slot.first_cube) * comptime!(UNITS * PER) + UNIT_POS * unit_step;
            // Contiguous: the unit's `PER · nw` coordinates (16 or 4, from a multiple of
            // that) lie in one mask word, loaded once (on a CPU adapter every load is a
            // loop over the SIMD lanes: 35 -> 32 ms for 4M coordinates on lavapipe).
            let mut unit_word = 0u32;
            if contiguous != 0u32 && slot.k > 0u32 && v0 * nw < slot.n {
                unit_word = mask[(slot.mask_at + v0 * nw / 32) as usize];
            }
            #[unroll]
            for rep in 0..PER {
                let v = v0 + rep * rep_step;
                if v * nw < slot.n {
                    let e0 = v * nw;
                    let gv = select_slot(g0, g1, g2, g3, g4, g5, slot.b, data_v + v, slots);
                    let mut out = Vector::<F, N>::new(F::new(0.0));
                    if comptime!(!master) {
                        out = select_slot(w0, w1, w2, w3, w4, w5, slot.b, data_v + v, slots);
                    }
                    let mut word = unit_word;
                    if contiguous == 0u32 && slot.k > 0u32 {
                        word = mask[(slot.mask_at + e0 / 32) as usize];
                    }
                    #[unroll]
                    for l in 0..nw {
                        let e = e0 + l;
                        let g = f32::cast_from(gv[l as usize]);
                        let master_at = slot.master_at + e;
                        let mut p = f32::cast_from(out[l as usize]);
                        if comptime!(master) {
                            p = masters[master_at as usize];
                        }
                        // sign(0) = 0: a zero gradient leaves the coordinate alone; sign(NaN)
                        // is NaN, as torch.sign and the reference give.
                        let s = kiln_dsl::sign_keep_nan(g);
                        let with_state = ((word >> (e % 32)) & 1u32) == 1u32;
                        let q = select(with_state, p, p * decay - lr_free * s);
                        if comptime!(master) {
                            masters[master_at as usize] = q;
                        }
                        out[l as usize] = F::cast_from(q);
                    }
                    store_slot(w0, w1, w2, w3, w4, w5, slot.b, data_v + v, out, slots);
                }
            }
        }
    }
}

slot_kernel! {
    /// FRUGAL's Adam part over up to six tensors (the table as [`frugal_sign_step`]'s, its
    /// first cubes counting groups of four state slots): each unit `PER` groups of four
    /// consecutive slots of a slot's `k`, `UNITS` groups apart: slot `s` is coordinate
    /// `indices[subset + s]` (`s` itself for a whole tensor), its moments at `s` and
    /// `k4 + s` of the tensor's moments (`k4` = `k` rounded up to 4), so a unit reads and
    /// writes its four slots' subset entries and moments as 4-wide vectors (on a CPU
    /// adapter each vector access costs about what a scalar one does) and gathers only `g`
    /// and `p`. Decoupled decay and AdamW's update, `t = counter[0] + 1` counting from the
    /// redraw (at `t = 1` the slots, which held other coordinates' state, start from zero).
    /// f32 arithmetic; `master` as in [`frugal_sign_step`]. In place: one configuration.
    #[kernel(
        tune(UNITS = [256], PER = [4]),
        vector = [1],
        key(len = pow2, dtype),
        grid = cubes(cubes),
        cube = UNITS,
        domain(slots = 1..=6)
    )]
    pub fn frugal_adam_step(
        indices: &Array<Vector<i32, Const<4>>>,
        state: &mut Array<Vector<f32, Const<4>>>,
        masters: &mut Array<f32>,
        table: &Array<u32>,
        counter: &Array<u32>,
        len: u32,
        cubes: u32,
        nslots: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        ln_beta1: f32,
        ln_beta2: f32,
        eps: f32,
        decay: f32,
        #[comptime] master: bool,
        #[comptime] slots: u32,
        #[comptime] spans: bool,
    ) {
        let cube = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
        let slot = frugal_slot(table, cube, nslots, slots, spans);
        let local = counter[0];
        let moments = adam_constants(
            beta1,
            beta2,
            one_minus_beta1,
            one_minus_beta2,
            ln_beta1,
            ln_beta2,
            eps,
            f32::cast_from(local + 1),
        );
        if cube < cubes {
            #[unroll]
            for rep in 0..PER {
                let quad = (cube - slot.first_cube) * comptime!(UNITS * PER) + rep * UNITS + UNIT_POS;
                let s0 = quad * 4u32;
                if s0 < slot.k {
                    // The four slots' coordinates (a whole tensor is its own subset).
                    let mut es = Vector::<u32, Const<4>>::new(s0);
                    #[unroll]
                    for l in 0..4u32 {
                        es[l as usize] = s0 + l;
                    }
                    if slot.k < slot.n {
                        es = Vector::<u32, Const<4>>::cast_from(
                            indices[(slot.indices_at / 4u32 + quad) as usize],
                        );
                    }
                    let zero = Vector::<f32, Const<4>>::new(0.0f32);
                    let mut g = zero;
                    let mut p = zero;
                    #[unroll]
                    for l in 0..4u32 {
                        // Lanes past `k` (the last group's padding) keep g = p = 0.
                        if s0 + l < slot.k {
                            let e = es[l as usize];
                            g[l as usize] = f32::cast_from(select_slot(g0, g1, g2, g3, g4, g5, slot.b, slot.data_at + e, slots)[0]);
                            if comptime!(master) {
                                p[l as usize] = masters[(slot.master_at + e) as usize];
                            }
                            if comptime!(!master) {
                                p[l as usize] = f32::cast_from(select_slot(w0, w1, w2, w3, w4, w5, slot.b, slot.data_at + e, slots)[0]);
                            }
                        }
                    }
                    let m_at = slot.state_at / 4u32 + quad;
                    // `v` is `ceil(k / 4)` vectors after `m`.
                    let v_at = m_at + ((slot.k + 3u32) >> 2u32);
                    let mut m = zero;
                    let mut v = zero;
                    if local != 0u32 {
                        m = state[m_at as usize];
                        v = state[v_at as usize];
                    }
                    let mv = adam_moments_of(m, v, g, moments, false);
                    state[m_at as usize] = mv.m;
                    state[v_at as usize] = mv.v;
                    let q = p * Vector::<f32, Const<4>>::new(decay)
                        - Vector::<f32, Const<4>>::new(lr) * adam_direction_of(mv.m, mv.v, moments);
                    #[unroll]
                    for l in 0..4u32 {
                        if s0 + l < slot.k {
                            let e = es[l as usize];
                            if comptime!(master) {
                                masters[(slot.master_at + e) as usize] = q[l as usize];
                            }
                            let out = Vector::<F, N>::new(F::cast_from(q[l as usize]));
                            store_slot(w0, w1, w2, w3, w4, w5, slot.b, slot.data_at + e, out, slots);
                        }
                    }
                }
            }
        }
    }
}
