//! W8A8: `y[m, n] = sx[m] sw[n] sum_k xq[m, k] wq[n, k] (+ bias[n])` with an i32
//! accumulator, and the per-token quantizer that feeds it.
//!
//! int8 tensors are read as the bytes of 32-bit words (`kiln_dsl::load_i8`), so any K
//! works, aligned or not.

use super::dequant::tile_rows;
use crate::matmul::{row_first, shift_rows};
use cubecl::prelude::*;
use kiln_dsl::{
    block_boundary, cube_max, cube_sum, i8_bits, load_i8, reg_tile_mma, round_half_even,
    rows_per_block, unpack_i8,
};

/// Declares a W8A8 kernel: `xq` `[M, K]` and `wq` `[N, K]` int8 (K-contiguous rows, read
/// as the bytes of u32 words), their scales `sx` `[M]` and `sw` `[N]`, the optional
/// `bias` `[N]` (`has_bias`), the output `y` `[M, N]` in `F`, and `m`, `n`, `k`; keyed by
/// their power-of-two buckets and the dtype. The caller gives the rest of the attribute
/// (tunables, requirements, grid, cube) and the body.
macro_rules! w8a8_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(key(m = pow2, n = pow2, k = pow2, dtype), $($attr)*)]
        pub fn $name<F: Float>(
            xq: &Array<u32>,
            sx: &Array<f32>,
            wq: &Array<u32>,
            sw: &Array<f32>,
            bias: &Array<f32>,
            y: &mut Array<F>,
            m: u32,
            n: u32,
            k: u32,
            #[comptime] has_bias: bool,
        ) $body
    };
}

/// Depth of a K step of the W8A8 kernel.
pub const INT8_TILE_K: u32 = 32;

w8a8_kernel! {
    /// Both operands are K-contiguous (`xq` `[M, K]`, `wq` `[N, K]`): each K step stages
    /// them depth-major as i32, multiplies exactly in i32, and the epilogue scales once.
    #[kernel(
        tune((BM, BN, TM, TN) = [(64, 64, 4, 4), (64, 64, 8, 8), (128, 64, 8, 8), (32, 64, 4, 4), (32, 32, 4, 4)]),
        require((BM / TM) * (BN / TN) <= 1024, BM <= m.next_power_of_two().max(32)),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = (BN / TN, BM / TM),
    )]
    w8a8_gemm {
        let units = comptime!((BM / TM) * (BN / TN));
        let tx = UNIT_POS_X;
        let ty = UNIT_POS_Y;
        let m0 = CUBE_POS_Y * BM;
        let n0 = CUBE_POS_X * BN;
        let mut xs = SharedMemory::<i32>::new(comptime!((BM * INT8_TILE_K) as usize));
        let mut ws = SharedMemory::<i32>::new(comptime!((BN * INT8_TILE_K) as usize));
        let mut acc = Array::<i32>::new(comptime!((TM * TN) as usize));
        #[unroll]
        for e in 0..TM * TN {
            acc[e as usize] = 0;
        }
        let mut k0 = 0u32;
        while k0 < k {
            // Consecutive units read consecutive bytes of a row; stored depth-major.
            let mut idx = UNIT_POS;
            while idx < comptime!(BM * INT8_TILE_K) {
                let r = idx / INT8_TILE_K;
                let d = idx % INT8_TILE_K;
                let mut v = 0i32;
                if m0 + r < m && k0 + d < k {
                    v = load_i8(xq, (m0 + r) * k + k0 + d);
                }
                xs[(d * BM + r) as usize] = v;
                idx += units;
            }
            let mut idx = UNIT_POS;
            while idx < comptime!(BN * INT8_TILE_K) {
                let c = idx / INT8_TILE_K;
                let d = idx % INT8_TILE_K;
                let mut v = 0i32;
                if n0 + c < n && k0 + d < k {
                    v = load_i8(wq, (n0 + c) * k + k0 + d);
                }
                ws[(d * BN + c) as usize] = v;
                idx += units;
            }
            sync_cube();
            reg_tile_mma::<i32>(
                &mut acc,
                &xs,
                0,
                &ws,
                0,
                ty,
                tx,
                BM,
                BN,
                INT8_TILE_K,
                TM,
                TN,
            );
            sync_cube();
            k0 += INT8_TILE_K;
        }
        store_scaled_tile::<F>(
            y,
            &mut acc,
            sx,
            sw,
            bias,
            m0 + ty,
            n0 + tx,
            m,
            n,
            BM,
            BN,
            TM,
            TN,
            has_bias,
            local_scalars,
        );
    }
}

/// The W8A8 epilogue of a unit's `tm x tn` i32 accumulators `acc` (row-major):
/// `y[row, col] = acc sx[row] sw[col] (+ bias[col])` in `F`, row `i` of the tile at
/// `row0 + i (bm / tm)` and column `j` at `col0 + j (bn / tn)`, skipping what falls
/// outside `[m, n]`. With `rows_loop` (a CPU adapter) a loop over the rows that
/// consumes `acc` (`shift_rows`), else unrolled.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_scaled_tile<F: Float>(
    y: &mut Array<F>,
    acc: &mut Array<i32>,
    sx: &Array<f32>,
    sw: &Array<f32>,
    bias: &Array<f32>,
    row0: u32,
    col0: u32,
    m: u32,
    n: u32,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] has_bias: bool,
    #[comptime] rows_loop: bool,
) {
    let row_step = comptime!(bm / tm);
    #[unroll(!rows_loop)]
    for i in 0..tm {
        store_scaled_row::<F>(
            y,
            acc,
            row_first(i, tn, rows_loop),
            row0 + i * row_step,
            sx,
            sw,
            bias,
            col0,
            m,
            n,
            bn,
            tn,
            has_bias,
        );
        if comptime!(rows_loop) {
            shift_rows(acc, tm, tn);
        }
    }
}

/// Row `row` of [`store_scaled_tile`], from `acc[first ..]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_scaled_row<F: Float>(
    y: &mut Array<F>,
    acc: &Array<i32>,
    first: u32,
    row: u32,
    sx: &Array<f32>,
    sw: &Array<f32>,
    bias: &Array<f32>,
    col0: u32,
    m: u32,
    n: u32,
    #[comptime] bn: u32,
    #[comptime] tn: u32,
    #[comptime] has_bias: bool,
) {
    #[unroll]
    for j in 0..tn {
        let col = col0 + j * comptime!(bn / tn);
        if row < m && col < n {
            let mut v =
                f32::cast_from(acc[(first + j) as usize]) * sx[row as usize] * sw[col as usize];
            if comptime!(has_bias) {
                v += bias[col as usize];
            }
            y[(row * n + col) as usize] = F::cast_from(v);
        }
    }
}

w8a8_kernel! {
    /// W8A8 straight from global memory (no shared memory, no barriers; what a CPU adapter
    /// rewards, as `qgemm_direct` showed for W4A16): a unit owns `TM` rows (`BM / TM`
    /// apart) and `TN` columns (`BN / TN` apart) and, per 32-bit word of K (four bytes of
    /// each K-contiguous row of `xq` and `wq`), unpacks its `4 TM` and `4 TN` codes once and
    /// multiplies them all, exactly in i32. Needs `k % 4 == 0` (rows start on a word; the
    /// host offers this kernel only then).
    #[kernel(
        tune((BM, BN, TM, TN, SHARE) = [
            (64, 64, 8, 8, 1),
            (32, 128, 4, 8, 1),
            (16, 128, 4, 8, 1),
            (64, 128, 8, 16, 1),
            (128, 64, 16, 4, 1),
            (128, 128, 16, 16, 1),
            // Few rows: one unit row owns all of them (each word of x read once per 16
            // columns).
            (1, 256, 1, 16, 1),
            (4, 256, 4, 16, 1),
            // Past 16 x 16 outputs a unit (more multiplies per load, where the loads are
            // what a CPU adapter pays for), as `qgemm_direct`'s: 16 rows in one unit row
            // of a 16 x 512 cube, only where M and N fill it. At 16 and 64 x 4096 x 4096 on
            // a slow 2-core machine 35-43 and 128-132 ms against 100-102 and 215-260 ms
            // before (docs/performance.md). (The same tile in a 64 x 256 cube, as
            // `qgemm_direct` has, was no faster at M = 128 and 256 and costs llvmpipe over
            // half a minute to compile.)
            (16, 512, 16, 32, 1),
            // x's words shared across a plane of 8 (`SHARE = 8`, lavapipe): each unit reads
            // TM / 8 of its tile's rows and gets the others by shuffles (a word, unpacked
            // after), as `matmul_vec4_plane`; so the tiles can be tall.
            (64, 128, 64, 16, 8),
            (64, 64, 64, 8, 8),
            (32, 256, 32, 32, 8),
            (16, 256, 16, 32, 8),
            (16, 128, 16, 16, 8),
        ]),
        require(
            super::direct_tile_fits((BM, BN, TM, TN), m, n, k),
            crate::matmul::shares_rows(device, SHARE, BN, TM, TN),
        ),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = (BN / TN, BM / TM),
    )]
    w8a8_direct {
        let tx = UNIT_POS_X;
        let ty = UNIT_POS_Y;
        let m0 = CUBE_POS_Y * BM;
        let n0 = CUBE_POS_X * BN;
        let words = k / 4;
        // Out-of-range rows and columns read row m - 1 or column n - 1, never stored.
        // With `SHARE = 8`, the tile rows `lane`, `lane + 8`, ... are the ones this unit
        // reads for its plane (the plane is one unit row: BN / TN = 8).
        let plane = comptime!(SHARE == 8);
        let shared = comptime!(if plane { TM / 8 } else { 1 });
        let mut xrow = Array::<u32>::new(comptime!(TM as usize));
        let mut own = Array::<u32>::new(comptime!(shared as usize));
        let mut mine = Array::<u32>::new(comptime!(shared as usize));
        tile_rows(&mut xrow, &mut own, m0 + ty, m, words, TM, BM / TM, plane);
        let mut wrow = Array::<u32>::new(comptime!(TN as usize));
        #[unroll]
        for j in 0..TN {
            wrow[j as usize] = min(n0 + tx + j * comptime!(BN / TN), n - 1) * words;
        }
        let mut acc = Array::<i32>::new(comptime!((TM * TN) as usize));
        #[unroll]
        for e in 0..TM * TN {
            acc[e as usize] = 0;
        }
        let mut xv = Array::<i32>::new(comptime!((4 * TM) as usize));
        let mut wv = Array::<i32>::new(comptime!((4 * TN) as usize));
        let mut w = 0u32;
        while w < words {
            if comptime!(plane) {
                #[unroll]
                for s in 0..shared {
                    mine[s as usize] = xq[(own[s as usize] + w) as usize];
                }
            }
            #[unroll]
            for i in 0..TM {
                // With `SHARE = 8` row i's word from lane i % 8 (one shuffle a word, from a
                // constant lane: a vector permute on lavapipe).
                let word = if comptime!(plane) {
                    plane_shuffle(mine[(i / 8) as usize], i % 8)
                } else {
                    xq[(xrow[i as usize] + w) as usize]
                };
                #[unroll]
                for b in 0..4u32 {
                    xv[(i * 4 + b) as usize] = unpack_i8(word, b);
                }
            }
            #[unroll]
            for j in 0..TN {
                let word = wq[(wrow[j as usize] + w) as usize];
                #[unroll]
                for b in 0..4u32 {
                    wv[(j * 4 + b) as usize] = unpack_i8(word, b);
                }
            }
            if comptime!(local_scalars) {
                // A basic block per group of rows (`block_boundary`: llvmpipe's compile
                // time); its 1 is the step.
                let rows = comptime!(rows_per_block(TM, TN));
                let mut step = 1u32;
                #[unroll]
                for i in 0..TM {
                    if comptime!(i > 0 && i % rows == 0) {
                        step *= block_boundary(words);
                    }
                    row_dots(&mut acc, &xv, &wv, i, TN);
                }
                w += step;
            } else {
                #[unroll]
                for i in 0..TM {
                    row_dots(&mut acc, &xv, &wv, i, TN);
                }
                w += 1;
            }
        }
        store_scaled_tile::<F>(
            y,
            &mut acc,
            sx,
            sw,
            bias,
            m0 + ty,
            n0 + tx,
            m,
            n,
            BM,
            BN,
            TM,
            TN,
            has_bias,
            local_scalars,
        );
    }
}

/// Row `i` of a W8A8 tile's word of K: `acc[i, j] += Σ_b xv[i, b] wv[j, b]` over the word's
/// four bytes, exactly in i32.
#[cube]
fn row_dots(
    acc: &mut Array<i32>,
    xv: &Array<i32>,
    wv: &Array<i32>,
    #[comptime] i: u32,
    #[comptime] tn: u32,
) {
    #[unroll]
    for j in 0..tn {
        let mut dot = acc[(i * tn + j) as usize];
        #[unroll]
        for b in 0..4u32 {
            dot += xv[(i * 4 + b) as usize] * wv[(j * 4 + b) as usize];
        }
        acc[(i * tn + j) as usize] = dot;
    }
}

/// W8A8 for few rows: a cube owns `BN` columns and `mt` rows (comptime, <= 8); the
/// `KS` units of a column walk its K-contiguous bytes side by side (coalesced: four
/// neighbouring units share a word), each byte of `wq` read once for all `mt` rows,
/// products summed exactly in i32 and then across the `KS` units in shared memory.
#[kiln_macros::kernel(
    tune(KS = [32, 64], BN = [8, 4, 16]),
    require(BN * KS <= 1024, KS <= k.next_power_of_two().max(32)),
    key(m = pow2, n = pow2, k = pow2, dtype),
    grid = (n.div_ceil(BN), m.div_ceil(mt)),
    cube = (KS, BN),
    domain(mt = [1, 2, 4, 8]),
    defaults(mt = 1)
)]
pub fn w8a8_gemv<F: Float>(
    xq: &Array<u32>,
    sx: &Array<f32>,
    wq: &Array<u32>,
    sw: &Array<f32>,
    bias: &Array<f32>,
    y: &mut Array<F>,
    m: u32,
    n: u32,
    k: u32,
    #[comptime] mt: u32,
    #[comptime] has_bias: bool,
) {
    let kl = UNIT_POS_X;
    let cl = UNIT_POS_Y;
    let col = CUBE_POS_X * BN + cl;
    let row0 = CUBE_POS_Y * mt;
    let colc = min(col, n - 1);
    let mut acc = Array::<i32>::new(comptime!(mt as usize));
    let mut xrow = Array::<u32>::new(comptime!(mt as usize));
    #[unroll]
    for r in 0..mt {
        acc[r as usize] = 0;
        xrow[r as usize] = min(row0 + r, m - 1) * k;
    }
    let mut kk = kl;
    while kk < k {
        let w = load_i8(wq, colc * k + kk);
        #[unroll]
        for r in 0..mt {
            acc[r as usize] += load_i8(xq, xrow[r as usize] + kk) * w;
        }
        kk += KS;
    }
    let mut part = SharedMemory::<i32>::new(comptime!((KS * mt * BN) as usize));
    #[unroll]
    for r in 0..mt {
        part[((cl * mt + r) * KS + kl) as usize] = acc[r as usize];
    }
    sync_cube();
    let mut r = kl;
    while r < mt {
        let mut sum = 0i32;
        for j in 0..KS {
            sum += part[((cl * mt + r) * KS + j) as usize];
        }
        if col < n && row0 + r < m {
            let mut v = f32::cast_from(sum) * sx[(row0 + r) as usize] * sw[col as usize];
            if comptime!(has_bias) {
                v += bias[col as usize];
            }
            y[((row0 + r) * n + col) as usize] = F::cast_from(v);
        }
        r += KS;
    }
}

/// `sx[row] = max_k |x[row, k]| / 127`, one cube per row; NaN for a row holding a NaN.
#[kiln_macros::kernel(
    tune(UNITS = [256, 64]),
    require(UNITS <= cols.next_power_of_two().max(64)),
    key(rows = pow2, cols = pow2, dtype),
    grid = cubes(rows),
    cube = UNITS,
)]
pub fn token_scale<F: Float>(x: &Array<F>, sx: &mut Array<f32>, rows: u32, cols: u32) {
    let row = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    // Every unit of the cube takes part in the reduction; a row past the end reads row 0.
    let base = select(row < rows, row, 0) * cols;
    let mut m = 0.0f32;
    // `max` drops NaN on some backends (CUDA's fmaxf), a sum never does: NaNs are
    // summed apart (0, or NaN when the row holds one) and added to the scale.
    let mut nan = 0.0f32;
    let mut j = UNIT_POS;
    while j < cols {
        let a = f32::abs(f32::cast_from(x[(base + j) as usize]));
        nan += select(a.is_nan(), a, 0.0);
        m = max(m, select(a.is_nan(), 0.0, a));
        j += UNITS;
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let mx = cube_max(&mut smem, m, UNITS);
    let nan_sum = cube_sum(&mut smem, nan, UNITS);
    if UNIT_POS == 0 && row < rows {
        // A row with a NaN gets a NaN scale, so it dequantizes to NaN.
        sx[row as usize] = mx / 127.0 + nan_sum;
    }
}

/// `xq = clamp(round(x / sx[row]), -127, 127)`, ties to even (0 where the row is all
/// zeros or its scale is NaN; +-127 for +-inf). One unit per output word of four bytes, which may span two rows.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(words.div_ceil(UNITS)), cube = UNITS)]
pub fn token_quantize<F: Float>(
    x: &Array<F>,
    sx: &Array<f32>,
    xq: &mut Array<u32>,
    len: u32,
    cols: u32,
    words: u32,
) {
    let w = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if w < words {
        let mut word = 0u32;
        #[unroll]
        for b in 0..4u32 {
            let e = w * 4 + b;
            if e < len {
                let s = sx[(e / cols) as usize];
                let xv = f32::cast_from(x[e as usize]);
                let mut q = 0.0f32;
                // A NaN scale fails `s > 0` (codes 0). An infinite scale comes from an
                // infinity in the row, which keeps its sign at full scale (inf / inf
                // would be NaN); finite values round to 0.
                if s > 0.0 {
                    // |x| above f32::MAX: an infinity.
                    q = select(
                        f32::abs(xv) > 3.402_823_5e38,
                        select(xv > 0.0, 127.0, -127.0),
                        clamp(round_half_even(xv / s), -127.0, 127.0),
                    );
                }
                word |= i8_bits(i32::cast_from(q)) << (b * 8);
            }
        }
        xq[w as usize] = word;
    }
}
