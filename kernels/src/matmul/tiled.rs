//! The scalar-FMA `matmul` kernel every device runs, and the pieces all three `matmul`
//! kernels share: the fused epilogue and clamped strided indices.

use super::Activation;
use cubecl::prelude::*;
use kiln_dsl::{gelu_tanh, silu};

/// `c = epilogue(a @ b)`, the scalar-FMA path every device runs. The declared
/// configurations span small tiles for skinny problems to large register tiles; each
/// costs a shader compile (~0.1 s on lavapipe) when tuned, so the list is lean.
#[kiln_macros::kernel(
    tune(
        (BM, BN, BK, TM, TN, STAGE, VEC) = [
            (64, 64, 16, 4, 4, 1, 1),
            (64, 64, 8, 8, 8, 1, 1),
            (128, 128, 8, 8, 8, 1, 1),
            (64, 128, 16, 4, 8, 1, 1),
            (16, 64, 32, 1, 4, 1, 1),
            (64, 64, 16, 4, 4, 1, 4),
            (128, 128, 8, 8, 8, 1, 4),
            (64, 64, 16, 4, 4, 2, 4),
            (64, 64, 8, 8, 8, 2, 4),
            (128, 128, 8, 8, 8, 2, 4),
            (128, 128, 16, 8, 8, 2, 4),
            (64, 64, 1, 8, 8, 3, 4),
            (32, 128, 1, 4, 8, 3, 4),
            (4, 256, 1, 1, 4, 3, 4),
            (32, 32, 1, 4, 4, 0, 1),
            (64, 64, 1, 8, 8, 0, 1),
            (32, 128, 1, 4, 8, 0, 1),
            (4, 256, 1, 1, 4, 0, 1),
            (1, 256, 1, 1, 4, 0, 1),
            (1, 64, 1, 1, 1, 0, 1),
        ]
    ),
    require(
        BM % TM == 0,
        BN % TN == 0,
        STAGE == 3 || BK % VEC == 0,
        BN % VEC == 0,
        STAGE < 2 || (VEC == 4 && TN % 4 == 0),
        STAGE == 0 || STAGE == 3 || (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory
    ),
    key(m = pow2, n = pow2, k = pow2, dtype),
    grid = (n.div_ceil(BN), m.div_ceil(BM)),
    cube = ((BM / TM) * (BN / TN)),
    name = "matmul"
)]
pub fn matmul_tiled<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    c: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] trans_b: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    let (bm, bn, bk, tm, tn) = comptime!((BM, BN, BK, TM, TN));
    let units = comptime!((bm / tm) * (bn / tn));
    let cols_of_units = comptime!(bn / tn);
    let rows_of_units = comptime!(bm / tm);
    let row0 = CUBE_POS_Y * bm;
    let col0 = CUBE_POS_X * bn;
    let ty = UNIT_POS / cols_of_units;
    let tx = UNIT_POS % cols_of_units;

    let mut acc = Array::<f32>::new(comptime!((tm * tn) as usize));
    #[unroll]
    for i in 0..tm * tn {
        acc[i as usize] = 0.0;
    }
    let mut a_frag = Array::<f32>::new(comptime!(tm as usize));
    let mut b_frag = Array::<f32>::new(comptime!(tn as usize));

    if comptime!(STAGE == 1) {
        // The a slice is stored k-major ([bk][bm]), like b's ([bk][bn]).
        let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
        let mut b_s = SharedMemory::<f32>::new(comptime!((bk * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            // Cooperative, bounds-masked loads: zeros past the edges keep the FMAs uniform.
            // Each unit stages VEC consecutive elements per step.
            let mut idx = UNIT_POS;
            while idx < comptime!(bm * bk / VEC) {
                // Consecutive units read consecutive k of one row of a (coalesced).
                let r = idx / comptime!(bk / VEC);
                let kv = (idx % comptime!(bk / VEC)) * VEC;
                #[unroll]
                for e in 0..VEC {
                    let kk = kv + e;
                    let (gr, gk) = (row0 + r, k0 + kk);
                    let mut v = 0.0f32;
                    if gr < m && gk < k {
                        v = f32::cast_from(a[(gr * k + gk) as usize]);
                    }
                    a_s[(kk * bm + r) as usize] = v;
                }
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!(bk * bn / VEC) {
                #[unroll]
                for e in 0..VEC {
                    let mut v = 0.0f32;
                    if comptime!(trans_b) {
                        // b is [N, K]: consecutive units read consecutive k of one column.
                        let cc = idx / comptime!(bk / VEC);
                        let kk = (idx % comptime!(bk / VEC)) * VEC + e;
                        let (gk, gc) = (k0 + kk, col0 + cc);
                        if gk < k && gc < n {
                            v = f32::cast_from(b[(gc * k + gk) as usize]);
                        }
                        b_s[(kk * bn + cc) as usize] = v;
                    } else {
                        let kk = idx / comptime!(bn / VEC);
                        let cc = (idx % comptime!(bn / VEC)) * VEC + e;
                        let (gk, gc) = (k0 + kk, col0 + cc);
                        if gk < k && gc < n {
                            v = f32::cast_from(b[(gk * n + gc) as usize]);
                        }
                        b_s[(kk * bn + cc) as usize] = v;
                    }
                }
                idx += units;
            }
            sync_cube();

            #[unroll]
            for kk in 0..bk {
                // A unit owns rows ty + i * rows_of_units and columns tx + j * cols_of_units:
                // neighbouring units read neighbouring shared addresses (no bank conflicts
                // on GPUs, contiguous SIMD loads on CPU adapters) and store neighbouring
                // columns of c (coalesced).
                #[unroll]
                for i in 0..tm {
                    a_frag[i as usize] = a_s[(kk * bm + ty + i * rows_of_units) as usize];
                }
                #[unroll]
                for j in 0..tn {
                    b_frag[j as usize] = b_s[(kk * bn + tx + j * cols_of_units) as usize];
                }
                #[unroll]
                for i in 0..tm {
                    #[unroll]
                    for j in 0..tn {
                        acc[(i * tn + j) as usize] += a_frag[i as usize] * b_frag[j as usize];
                    }
                }
            }
            sync_cube();
            k0 += bk;
        }
    } else if comptime!(STAGE == 2) {
        // Staged, with b's slice and the accumulators as 4-wide vectors: a unit owns
        // TN / 4 groups of 4 adjacent columns (groups strided across units), so each
        // step is one vector load of b and TM x TN / 4 vector FMAs (a's value splat).
        let tnv = comptime!(tn / 4);
        let bnv = comptime!(bn / 4);
        let mut a_s = SharedMemory::<f32>::new(comptime!((bk * bm) as usize));
        let mut b_s = SharedMemory::<Vector<f32, Const<4>>>::new(comptime!((bk * bnv) as usize));
        let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
        #[unroll]
        for e in 0..tm * tnv {
            accv[e as usize] = Vector::new(0.0f32);
        }
        let mut k0 = 0u32;
        while k0 < k {
            let mut idx = UNIT_POS;
            while idx < comptime!(bm * bk) {
                let r = idx / bk;
                let kk = idx % bk;
                let (gr, gk) = (row0 + r, k0 + kk);
                let mut v = 0.0f32;
                if gr < m && gk < k {
                    v = f32::cast_from(a[(gr * k + gk) as usize]);
                }
                a_s[(kk * bm + r) as usize] = v;
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!(bk * bnv) {
                let kk = idx / bnv;
                let cv = idx % bnv;
                let gk = k0 + kk;
                let mut v = Vector::<f32, Const<4>>::empty();
                #[unroll]
                for e in 0..4u32 {
                    let gc = col0 + cv * 4 + e;
                    let mut x = 0.0f32;
                    if gk < k && gc < n {
                        if comptime!(trans_b) {
                            x = f32::cast_from(b[(gc * k + gk) as usize]);
                        } else {
                            x = f32::cast_from(b[(gk * n + gc) as usize]);
                        }
                    }
                    v[e as usize] = x;
                }
                b_s[idx as usize] = v;
                idx += units;
            }
            sync_cube();
            #[unroll]
            for kk in 0..bk {
                #[unroll]
                for i in 0..tm {
                    a_frag[i as usize] = a_s[(kk * bm + ty + i * rows_of_units) as usize];
                }
                #[unroll]
                for jv in 0..tnv {
                    let bv = b_s[(kk * bnv + tx + jv * cols_of_units) as usize];
                    #[unroll]
                    for i in 0..tm {
                        let e = (i * tnv + jv) as usize;
                        accv[e] += Vector::new(a_frag[i as usize]) * bv;
                    }
                }
            }
            sync_cube();
            k0 += bk;
        }
        // Into the scalar layout the epilogue reads (column j of the unit is lane j % 4
        // of its group j / 4).
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    } else if comptime!(STAGE == 3) {
        // Direct, with 4-wide vector accumulators: a unit owns TN / 4 groups of 4
        // adjacent columns, reads them from global memory as one vector per step and
        // does TM x TN / 4 vector FMAs. Clamped rows and columns as in the scalar path.
        let tnv = comptime!(tn / 4);
        let mut accv = Array::<Vector<f32, Const<4>>>::new(comptime!((tm * tnv) as usize));
        #[unroll]
        for e in 0..tm * tnv {
            accv[e as usize] = Vector::new(0.0f32);
        }
        let mut rows = Array::<u32>::new(comptime!(tm as usize));
        let mut cols = Array::<u32>::new(comptime!(tn as usize));
        clamped_strided(&mut rows, row0 + ty, rows_of_units, m - 1, tm);
        #[unroll]
        for j in 0..tn {
            cols[j as usize] = min(col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4, n - 1);
        }
        let mut kk = 0u32;
        while kk < k {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
            }
            #[unroll]
            for jv in 0..tnv {
                let mut bv = Vector::<f32, Const<4>>::empty();
                #[unroll]
                for e in 0..4u32 {
                    let cj = cols[(jv * 4 + e) as usize];
                    if comptime!(trans_b) {
                        bv[e as usize] = f32::cast_from(b[(cj * k + kk) as usize]);
                    } else {
                        bv[e as usize] = f32::cast_from(b[(kk * n + cj) as usize]);
                    }
                }
                #[unroll]
                for i in 0..tm {
                    let e = (i * tnv + jv) as usize;
                    accv[e] += Vector::new(a_frag[i as usize]) * bv;
                }
            }
            kk += 1;
        }
        #[unroll]
        for i in 0..tm {
            #[unroll]
            for j in 0..tn {
                acc[(i * tn + j) as usize] = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
            }
        }
    } else {
        // Each unit reads its own fragments from global memory, K exactly (no padding,
        // so no zero fill). Rows and columns past the edge are clamped to the last one:
        // computed, never stored.
        let mut rows = Array::<u32>::new(comptime!(tm as usize));
        let mut cols = Array::<u32>::new(comptime!(tn as usize));
        clamped_strided(&mut rows, row0 + ty, rows_of_units, m - 1, tm);
        clamped_strided(&mut cols, col0 + tx, cols_of_units, n - 1, tn);
        let mut kk = 0u32;
        while kk < k {
            #[unroll]
            for i in 0..tm {
                a_frag[i as usize] = f32::cast_from(a[(rows[i as usize] * k + kk) as usize]);
            }
            #[unroll]
            for j in 0..tn {
                if comptime!(trans_b) {
                    b_frag[j as usize] = f32::cast_from(b[(cols[j as usize] * k + kk) as usize]);
                } else {
                    b_frag[j as usize] = f32::cast_from(b[(kk * n + cols[j as usize]) as usize]);
                }
            }
            #[unroll]
            for i in 0..tm {
                #[unroll]
                for j in 0..tn {
                    acc[(i * tn + j) as usize] += a_frag[i as usize] * b_frag[j as usize];
                }
            }
            kk += 1;
        }
    }

    // Epilogue, in f32, then one rounding to F.
    #[unroll]
    for i in 0..tm {
        let r = row0 + ty + i * rows_of_units;
        #[unroll]
        for j in 0..tn {
            let mut col = col0 + tx + j * cols_of_units;
            if comptime!(STAGE >= 2) {
                col = col0 + (tx + (j / 4) * cols_of_units) * 4 + j % 4;
            }
            if r < m && col < n {
                store_epilogue::<F>(
                    c,
                    bias,
                    residual,
                    acc[(i * tn + j) as usize],
                    r,
                    col,
                    n,
                    has_bias,
                    has_residual,
                    act,
                );
            }
        }
    }
}

/// `idx[i] = min(first + i * step, last)` for `i < count`: a unit's strided rows or
/// columns, clamped to the last valid one (computed, never stored), so the main loops
/// of the direct kernels need no branch.
#[cube]
pub(crate) fn clamped_strided(
    idx: &mut Array<u32>,
    first: u32,
    step: u32,
    last: u32,
    #[comptime] count: u32,
) {
    #[unroll]
    for i in 0..count {
        idx[i as usize] = min(first + i * step, last);
    }
}

/// The fused epilogue of every `matmul` kernel for one element `v` (f32) of row `r`,
/// column `col`: `+ bias[col]`, the activation, `+ residual[r, col]`, then one rounding
/// to F into `c[r, col]`. The caller masks `r < m`, `col < n`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_epilogue<F: Float>(
    c: &mut Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    v: f32,
    r: u32,
    col: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] has_residual: bool,
    #[comptime] act: Activation,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[col as usize]);
    }
    if comptime!(act == Activation::Silu) {
        v = silu::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(act == Activation::Gelu) {
        v = gelu_tanh::<Const<1>>(Vector::new(v))[0];
    }
    if comptime!(has_residual) {
        v += f32::cast_from(residual[(r * n + col) as usize]);
    }
    c[(r * n + col) as usize] = F::cast_from(v);
}
