//! GEMMs with the weight dequantized inside the main loop: `y = x @ dequant(W)`.
//!
//! Two weight kinds (`wkind`, a comptime [`WeightKind`]) share the kernels:
//! - `int4`, in kiln's layout: `qweight` u32 `[K/8, N]`, eight consecutive k of one
//!   column per word, least-significant nibble first (GPTQ's packing); `scales` and
//!   `zeros` f32 `[K/G, N]`; `w = (q - z) s` with the group of row k being `k / G`, or
//!   `g_idx[k]` for act-order checkpoints (`act_order`).
//! - `int8_bits`, int8 with Double Rounding: `qweight` the bytes of `q8` `[K, N]`, `scales` the
//!   per-channel `s8` `[N]`; `w = clamp(round(q8 / 2^shift)) s8 2^shift`, ties to
//!   even, clamped to the `8 - shift`-bit signed range.
//!
//! Three shapes of kernel: [`qgemm_gemv`] for few rows (a cube owns `BN` columns and
//! splits K over `KS` unit rows, reducing in shared memory: every weight word is read
//! once per `mt` rows), [`qgemm_tiled`] for many rows (x and the dequantized weight
//! tile staged in shared memory, register-tiled FMA), and [`qgemm_direct`] (register
//! tiles fed straight from global memory, no barriers: what a CPU adapter rewards, as
//! `matmul_vec4` showed). The autotuner picks among them.
//!
//! Longer than most files: the three kernels share the dequantization helpers (group sums,
//! folded zero points, strided tile stores) defined beside them.

use crate::matmul::plane_rows;
use crate::matmul::{row_first, shift_rows};
use crate::split_k::{partials_sum, stage_partials};
use cubecl::prelude::*;
use kiln_dsl::{
    block_boundary, load_i8, load_tile, reg_tile_mma, rows_per_block, shift_round_half_even,
    unpack_i8, unpack_u4, V4,
};

kiln_runtime::comptime_enum! {
    /// How the dequantizing kernels read and decode `qweight` (one compiled variant each).
    pub enum WeightKind {
        /// int4 codes in kiln's layout, group scales and zero points.
        Int4 = "int4",
        /// int8 codes served at fewer bits by Double Rounding, per-channel scales.
        Int8Bits = "int8_bits",
    }
}

/// Depth of a K step of the tiled kernel (a multiple of 8: whole int4 words).
pub const TILE_K: u32 = 32;

/// Declares a dequantizing GEMM kernel: `x` `[M, K]`, the quantized weight `qweight`
/// with its `scales`, `zeros` and `g_idx` (see the module docs), `y` `[M, N]`, the shape
/// `m`, `n`, `k`, the int4 `group_size`, the int8 Double Rounding `shift`, the comptime
/// weight kind and act-order switch, then the kernel's own comptime arguments; keyed by
/// the shape's power-of-two buckets and the dtype. The caller gives the rest of the
/// attribute and the body.
macro_rules! qgemm_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident($($own:tt)*) $body:block
    ) => {
        qgemm_kernel! {
            $(#[doc = $doc])*
            #[kernel($($attr)*)]
            $name[Array<F>]($($own)*) $body
        }
    };
    // `x`'s type given: `Array<Vector<F, Const<4>>>` for a kernel reading 4-wide vectors.
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident[$($x:tt)*]($($own:tt)*) $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(key(m = pow2, n = pow2, k = pow2, dtype), $($attr)*)]
        pub fn $name<F: Float>(
            x: &$($x)*,
            qweight: &Array<u32>,
            scales: &Array<f32>,
            zeros: &Array<f32>,
            g_idx: &Array<u32>,
            y: &mut Array<F>,
            m: u32,
            n: u32,
            k: u32,
            group_size: u32,
            shift: u32,
            #[comptime] wkind: WeightKind,
            #[comptime] act_order: bool,
            $($own)*
        ) $body
    };
}

/// Stores a unit's `tm x tn` f32 accumulators `acc` (row-major) as `F` in `y` `[m, n]`:
/// row `i` of the tile at `row0 + i (bm / tm)`; the columns in runs of `span` adjacent
/// ones, run `r` at `col0 + r span (bn / tn)` (units of a cube interleave, so
/// neighbouring units write neighbouring runs; `col0` is the unit's first column),
/// skipping what falls outside the matrix. With `rows_loop` (a CPU adapter) a loop over
/// the rows that consumes `acc` (`shift_rows`), else unrolled.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_strided_tile<F: Float>(
    y: &mut Array<F>,
    acc: &mut Array<f32>,
    row0: u32,
    col0: u32,
    m: u32,
    n: u32,
    #[comptime] bm: u32,
    #[comptime] bn: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] span: u32,
    #[comptime] rows_loop: bool,
) {
    let row_step = comptime!(bm / tm);
    #[unroll(!rows_loop)]
    for i in 0..tm {
        let first = row_first(i, tn, rows_loop);
        store_strided_row::<F>(y, acc, first, row0 + i * row_step, col0, m, n, bn, tn, span);
        if comptime!(rows_loop) {
            shift_rows(acc, tm, tn);
        }
    }
}

/// Row `row` of [`store_strided_tile`], from `acc[first ..]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_strided_row<F: Float>(
    y: &mut Array<F>,
    acc: &Array<f32>,
    first: u32,
    row: u32,
    col0: u32,
    m: u32,
    n: u32,
    #[comptime] bn: u32,
    #[comptime] tn: u32,
    #[comptime] span: u32,
) {
    #[unroll]
    for j in 0..tn {
        let col = col0 + (j / comptime!(span)) * comptime!(span * (bn / tn)) + j % comptime!(span);
        if row < m && col < n {
            y[(row * n + col) as usize] = F::cast_from(acc[(first + j) as usize]);
        }
    }
}

/// Double Rounding: the int8 code at byte `index`, shifted right by `shift` bits with
/// ties to even, clamped to the signed `8 - shift`-bit range, times `scale 2^shift`.
#[cube]
pub(crate) fn dequant_i8(qweight: &Array<u32>, index: u32, scale: f32, shift: u32) -> f32 {
    dequant_i8_code(load_i8(qweight, index), scale, shift)
}

/// [`dequant_i8`] of an int8 code already loaded (sign-extended).
#[cube]
pub(crate) fn dequant_i8_code(code: i32, scale: f32, shift: u32) -> f32 {
    let q = shift_round_half_even(code, shift);
    // Only the top can overflow the `8 - shift`-bit range (127 / 2 rounds to 64): the
    // bottom, -128 / 2^shift, is an integer already.
    let qc = min(q, i32::cast_from(127u32 >> shift));
    // `scale 2^shift` is exact and the same for every weight of a column, so a kernel's
    // loop computes it once. Scaling by a power of two commutes with rounding, so this is
    // the product scaled by 2^shift afterwards, bit for bit, unless that product is
    // subnormal.
    f32::cast_from(qc) * (scale * f32::cast_from(1u32 << shift))
}

/// Stages rows `k0 .. k0 + tile_k` of the dequantized weight, columns
/// `n0 .. n0 + bn`, row-major in `ws` `[tile_k, bn]` as `T` (zero past K and N);
/// `units` units of the cube share the work (one int4 word, eight rows of a column,
/// per unit and step). `tile_k` is a multiple of 8 and `k0` of `tile_k`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_weight_tile<T: Float>(
    ws: &mut SharedMemory<T>,
    qweight: &Array<u32>,
    scales: &Array<f32>,
    zeros: &Array<f32>,
    g_idx: &Array<u32>,
    k0: u32,
    n0: u32,
    n: u32,
    k: u32,
    group_size: u32,
    shift: u32,
    #[comptime] tile_k: u32,
    #[comptime] bn: u32,
    #[comptime] units: u32,
    #[comptime] wkind: WeightKind,
    #[comptime] act_order: bool,
) {
    if comptime!(wkind == WeightKind::Int4) {
        // One unit per int4 word: eight rows of one column.
        let mut idx = UNIT_POS;
        while idx < comptime!(tile_k / 8 * bn) {
            let wl = idx / bn;
            let nl = idx % bn;
            let kw = k0 / 8 + wl;
            let col = n0 + nl;
            if kw * 8 < k && col < n {
                let word = qweight[(kw * n + col) as usize];
                let g = (kw * 8) / group_size;
                let mut s = scales[(g * n + col) as usize];
                let mut z = zeros[(g * n + col) as usize];
                #[unroll]
                for i in 0..8u32 {
                    if comptime!(act_order) {
                        let ga = g_idx[(kw * 8 + i) as usize];
                        s = scales[(ga * n + col) as usize];
                        z = zeros[(ga * n + col) as usize];
                    }
                    ws[((wl * 8 + i) * bn + nl) as usize] =
                        T::cast_from((f32::cast_from(unpack_u4(word, i)) - z) * s);
                }
            } else {
                #[unroll]
                for i in 0..8u32 {
                    ws[((wl * 8 + i) * bn + nl) as usize] = T::cast_from(0.0f32);
                }
            }
            idx += units;
        }
    } else {
        let mut idx = UNIT_POS;
        while idx < comptime!(tile_k * bn) {
            let kk = k0 + idx / bn;
            let col = n0 + idx % bn;
            let mut v = 0.0f32;
            if kk < k && col < n {
                v = dequant_i8(qweight, kk * n + col, scales[col as usize], shift);
            }
            ws[idx as usize] = T::cast_from(v);
            idx += units;
        }
    }
}

qgemm_kernel! {
    /// `y[m, n] = sum_k x[m, k] w[k, n]` for `mt` rows per cube (comptime) and `BN`
    /// columns, K split over `KS` unit rows. `x` `[M, K]`, `y` `[M, N]` in `F`.
    #[kernel(
        tune(BN = [64, 32, 128], KS = [4, 8, 16]),
        require(BN * KS <= 1024, BN <= n.next_power_of_two().max(32)),
        grid = (n.div_ceil(BN), m.div_ceil(mt)),
        cube = (BN, KS),
        domain(mt = [1, 2, 4, 8]),
        defaults(mt = 1),
    )]
    qgemm_gemv(#[comptime] mt: u32) {
        let nl = UNIT_POS_X;
        let ks = UNIT_POS_Y;
        let col = CUBE_POS_X * BN + nl;
        let row0 = CUBE_POS_Y * mt;
        // Out-of-range columns and rows read a valid address and are never stored.
        let colc = min(col, n - 1);
        let mut xrow = Array::<u32>::new(comptime!(mt as usize));
        let mut acc = Array::<f32>::new(comptime!(mt as usize));
        #[unroll]
        for r in 0..mt {
            xrow[r as usize] = min(row0 + r, m - 1) * k;
            acc[r as usize] = 0.0;
        }
        if comptime!(wkind == WeightKind::Int4) {
            let mut w = ks;
            while w < k / 8 {
                let word = qweight[(w * n + colc) as usize];
                if comptime!(act_order) {
                    #[unroll]
                    for i in 0..8u32 {
                        let kk = w * 8 + i;
                        let g = g_idx[kk as usize];
                        let wv = (f32::cast_from(unpack_u4(word, i)) - zeros[(g * n + colc) as usize])
                            * scales[(g * n + colc) as usize];
                        #[unroll]
                        for r in 0..mt {
                            acc[r as usize] += f32::cast_from(x[(xrow[r as usize] + kk) as usize]) * wv;
                        }
                    }
                } else {
                    // One group per word: sum x q and x over the word, then apply the scale
                    // and zero point once, s (sum x q - z sum x), instead of per element.
                    let g = (w * 8) / group_size;
                    let s = scales[(g * n + colc) as usize];
                    let z = zeros[(g * n + colc) as usize];
                    let mut xq = Array::<f32>::new(comptime!(mt as usize));
                    let mut xs = Array::<f32>::new(comptime!(mt as usize));
                    #[unroll]
                    for r in 0..mt {
                        xq[r as usize] = 0.0;
                        xs[r as usize] = 0.0;
                    }
                    #[unroll]
                    for i in 0..8u32 {
                        let q = f32::cast_from(unpack_u4(word, i));
                        #[unroll]
                        for r in 0..mt {
                            let xv = f32::cast_from(x[(xrow[r as usize] + w * 8 + i) as usize]);
                            xq[r as usize] += xv * q;
                            xs[r as usize] += xv;
                        }
                    }
                    #[unroll]
                    for r in 0..mt {
                        acc[r as usize] += s * (xq[r as usize] - z * xs[r as usize]);
                    }
                }
                w += KS;
            }
        } else {
            let s = scales[colc as usize];
            let mut kk = ks;
            while kk < k {
                let wv = dequant_i8(qweight, kk * n + colc, s, shift);
                #[unroll]
                for r in 0..mt {
                    acc[r as usize] += f32::cast_from(x[(xrow[r as usize] + kk) as usize]) * wv;
                }
                kk += KS;
            }
        }
        let mut part = SharedMemory::<f32>::new(comptime!((KS * mt * BN) as usize));
        stage_partials(&mut part, &acc, ks, nl, mt, BN);
        // Unit row ks sums the partials of output rows ks, ks + KS, ...
        let mut r = ks;
        while r < mt {
            let sum = partials_sum(&part, r, nl, mt, BN, KS);
            if col < n && row0 + r < m {
                y[((row0 + r) * n + col) as usize] = F::cast_from(sum);
            }
            r += KS;
        }
    }
}

qgemm_kernel! {
    /// `y = x @ w` with `BM x BN` output tiles per cube and `TM x TN` per unit: each K
    /// step stages x `[BM, 32]` and the dequantized weight `[32, BN]` in shared memory as
    /// f32, then multiplies from registers.
    #[kernel(
        tune((BM, BN, TM, TN) = [
            (64, 64, 4, 4),
            (64, 64, 8, 8),
            (128, 64, 8, 8),
            (32, 64, 4, 4),
            (32, 32, 4, 4),
        ]),
        require((BM / TM) * (BN / TN) <= 1024, BM <= m.next_power_of_two().max(32)),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = (BN / TN, BM / TM),
    )]
    qgemm_tiled() {
        let units = comptime!((BM / TM) * (BN / TN));
        let tx = UNIT_POS_X;
        let ty = UNIT_POS_Y;
        let m0 = CUBE_POS_Y * BM;
        let n0 = CUBE_POS_X * BN;
        let mut xs = SharedMemory::<f32>::new(comptime!((BM * TILE_K) as usize));
        let mut ws = SharedMemory::<f32>::new(comptime!((TILE_K * BN) as usize));
        let mut acc = Array::<f32>::new(comptime!((TM * TN) as usize));
        #[unroll]
        for e in 0..TM * TN {
            acc[e as usize] = 0.0;
        }
        let mut k0 = 0u32;
        while k0 < k {
            load_tile::<F>(
                &mut xs,
                0,
                x,
                m0 * k + k0,
                k,
                m - m0,
                k - k0,
                BM,
                TILE_K,
                true,
                units,
            );
            stage_weight_tile::<f32>(
                &mut ws,
                qweight,
                scales,
                zeros,
                g_idx,
                k0,
                n0,
                n,
                k,
                group_size,
                shift,
                TILE_K,
                BN,
                units,
                wkind,
                act_order,
            );
            sync_cube();
            reg_tile_mma::<f32>(&mut acc, &xs, 0, &ws, 0, ty, tx, BM, BN, TILE_K, TM, TN);
            sync_cube();
            k0 += TILE_K;
        }
        store_strided_tile::<F>(y, &mut acc, m0 + ty, n0 + tx, m, n, BM, BN, TM, TN, 1u32, local_scalars);
    }
}

qgemm_kernel! {
    /// `y = x @ w` straight from global memory (no shared memory, no barriers): a unit
    /// owns `TM` rows (`BM / TM` apart) and `TN` columns (`BN / TN` apart, so that
    /// neighbouring units read neighbouring columns) and, per step of eight rows of K
    /// (one int4 word per column), dequantizes its `8 x TN` weights once into registers
    /// for all its `TM` rows, reading `x` in 4-wide vectors (two per row and step: on a
    /// CPU adapter a vector costs about what one element does). Needs `k % 4 == 0` (rows
    /// start on a vector; int4 has K a multiple of 8). With `col_words` (int8, N a multiple
    /// of 4) a unit's columns come in runs of four adjacent ones, so that one load of an
    /// int8 word serves four columns (each column's bytes are a word apart: one load a
    /// weight otherwise).
    #[kernel(
        tune((BM, BN, TM, TN, SHARE) = [
            (64, 64, 8, 8, 1),
            (32, 128, 4, 8, 1),
            (64, 128, 8, 16, 1),
            (16, 128, 4, 8, 1),
            (128, 64, 16, 4, 1),
            (128, 128, 16, 16, 1),
            (64, 256, 8, 32, 1),
            // 16 rows in two or one unit rows: each weight serves 8 or 16 rows.
            (16, 256, 8, 16, 1),
            (16, 128, 16, 8, 1),
            // Few rows: one unit row owns all of them, so each x element is read
            // once per 16 columns (a GEMV that reads one column per unit reads it
            // once per column).
            (1, 256, 1, 16, 1),
            (4, 256, 4, 16, 1),
            // Past 16 x 16 outputs a unit (more FMAs per load, where the loads are what a
            // CPU adapter pays for, as matmul_vec4's): only where M and N fill a cube. At
            // 256 x 4096 x 4096 on a slow 2-core machine 742 ms against 1150 ms for 16 x 16
            // (and 816 ms for 32 x 32 in a 128 x 128 cube, left out: no faster, slower to
            // compile).
            (64, 256, 16, 32, 1),
            // The same 16 x 32 tile for 16 rows (one unit row, 16 units along N), where
            // M and N fill it, as `matmul_vec4`'s 16 x 512 cube.
            (16, 512, 16, 32, 1),
            // x's rows shared across a plane of 8 (`SHARE = 8`, lavapipe): each unit reads
            // TM / 8 of its tile's rows and gets the others by shuffles, as
            // `matmul_vec4_plane`; so the tiles can be tall. (32 x 32 in a 32 x 256 cube
            // and 32 x 16 in a 32 x 128 one were left out: at K = N = 4096 neither beat
            // 64 x 16 by more than noise, and the 32 x 32 body took llvmpipe 20 s to
            // compile even without LLVM's passes.)
            (64, 128, 64, 16, 8),
            (16, 256, 16, 32, 8),
            (16, 128, 16, 16, 8),
            (8, 256, 8, 32, 8),
        ]),
        require(
            super::direct_tile_fits((BM, BN, TM, TN), m, n, k),
            crate::matmul::shares_rows(device, SHARE, BN, TM, TN),
            !col_words || wkind == WeightKind::Int8Bits,
            !col_words || n % 4 == 0,
        ),
        defaults(col_words = false),
        grid = (n.div_ceil(BN), m.div_ceil(BM)),
        cube = (BN / TN, BM / TM),
    )]
    qgemm_direct[Array<Vector<F, Const<4>>>](#[comptime] col_words: bool) {
        let tx = UNIT_POS_X;
        let ty = UNIT_POS_Y;
        let m0 = CUBE_POS_Y * BM;
        let n0 = CUBE_POS_X * BN;
        // Out-of-range rows and columns read row m - 1 or column n - 1, never stored.
        // Rows of x in vectors.
        let kv = k / 4;
        let plane = comptime!(SHARE == 8);
        let mut xrow = Array::<u32>::new(comptime!(TM as usize));
        let mut own = Array::<u32>::new(comptime!(if plane { (TM / 8) as usize } else { 1 }));
        tile_rows(&mut xrow, &mut own, m0 + ty, m, kv, TM, BM / TM, plane);
        // On a CPU adapter (or with a shared x) the step's x is read first and each
        // accumulator goes through the step's eight K in a row (`step_products`).
        let per_accumulator = comptime!(plane || local_scalars);
        let mut xs = Array::<V4>::new(comptime!(if per_accumulator { (2 * TM) as usize } else { 1 }));
        let mut mine = Array::<V4>::new(comptime!(if plane { (TM / 4) as usize } else { 1 }));
        // A unit's columns: runs of `span` adjacent ones, `span BN / TN` apart (the runs
        // of neighbouring units are neighbours). `words`: the first column of each run of
        // four, as a word of its row (`col_words`; N % 4 == 0, so it is the run's word).
        let span = comptime!(if col_words { 4u32 } else { 1u32 });
        let col0 = n0 + tx * span;
        let mut cols = Array::<u32>::new(comptime!(TN as usize));
        #[unroll]
        for j in 0..TN {
            let run = j / comptime!(span);
            let col = col0 + run * comptime!(span * (BN / TN)) + j % comptime!(span);
            cols[j as usize] = min(col, n - 1);
        }
        let runs = comptime!(if col_words { TN / 4 } else { 1u32 });
        let mut words = Array::<u32>::new(comptime!(runs as usize));
        if comptime!(col_words) {
            #[unroll]
            for r in 0..runs {
                words[r as usize] = min(col0 + r * comptime!(4 * (BN / TN)), n - 4) / 4;
            }
        }
        let mut acc = Array::<f32>::new(comptime!((TM * TN) as usize));
        #[unroll]
        for e in 0..TM * TN {
            acc[e as usize] = 0.0;
        }
        let mut wv = Array::<f32>::new(comptime!((8 * TN) as usize));
        // The columns' scales and zero points, loaded once per group of G rows (int4
        // without act order) or once (int8: per channel), not once per word.
        let mut sg = Array::<f32>::new(comptime!(TN as usize));
        let mut zg = Array::<f32>::new(comptime!(TN as usize));
        if comptime!(wkind != WeightKind::Int4) {
            #[unroll]
            for j in 0..TN {
                sg[j as usize] = scales[cols[j as usize] as usize];
            }
        }
        // int4 without act order: the columns' scales and zero points change every G rows.
        let grouped = comptime!(wkind == WeightKind::Int4 && !act_order);
        // With few rows a unit sums per group, then scales once:
        // sum_k x (q - z) s = s (sum_k x q - z sum_k x). `part` holds the group's
        // sum_k x q of each output, `xsum` its sum_k x of each row; a weight then costs
        // its unpacking and one FMA per row, not a subtraction and a product more. With
        // TM >= 16 rows the two operations of `(q - z) s` are a small share of a weight's
        // TM FMAs, and dequantizing it once saves the second TM x TN tile of sums.
        let folded = comptime!(grouped && TM < 16);
        let mut part = Array::<f32>::new(comptime!((TM * TN) as usize));
        let mut xsum = Array::<f32>::new(comptime!(TM as usize));
        if comptime!(folded) {
            zero_group_sums(&mut part, &mut xsum, TM, TN);
        }
        let mut k0 = 0u32;
        while k0 < k {
            if comptime!(grouped) {
                if k0 % group_size == 0 {
                    if comptime!(folded) {
                        if k0 > 0 {
                            fold_group(&mut acc, &mut part, &mut xsum, &sg, &zg, TM, TN);
                        }
                    }
                    let g = k0 / group_size;
                    #[unroll]
                    for j in 0..TN {
                        let col = cols[j as usize];
                        sg[j as usize] = scales[(g * n + col) as usize];
                        zg[j as usize] = zeros[(g * n + col) as usize];
                    }
                }
            }
            #[unroll]
            for j in 0..TN {
                let col = cols[j as usize];
                if comptime!(wkind == WeightKind::Int4) {
                    // K is a multiple of 8 (and of G): the word and its group are whole.
                    let word = qweight[((k0 / 8) * n + col) as usize];
                    #[unroll]
                    for i in 0..8u32 {
                        let q = f32::cast_from(unpack_u4(word, i));
                        if comptime!(act_order) {
                            let ga = g_idx[(k0 + i) as usize];
                            let s = scales[(ga * n + col) as usize];
                            let z = zeros[(ga * n + col) as usize];
                            wv[(i * TN + j) as usize] = (q - z) * s;
                        } else if comptime!(folded) {
                            wv[(i * TN + j) as usize] = q;
                        } else {
                            wv[(i * TN + j) as usize] = (q - zg[j as usize]) * sg[j as usize];
                        }
                    }
                } else if comptime!(!col_words) {
                    // int8 rows past K weigh zero (K need not be a multiple of 8).
                    let s = sg[j as usize];
                    #[unroll]
                    for i in 0..8u32 {
                        let mut v = 0.0f32;
                        if k0 + i < k {
                            v = dequant_i8(qweight, (k0 + i) * n + col, s, shift);
                        }
                        wv[(i * TN + j) as usize] = v;
                    }
                }
            }
            if comptime!(col_words) {
                // One word: the bytes of four adjacent columns of one row.
                let nw = n / 4;
                #[unroll]
                for r in 0..runs {
                    #[unroll]
                    for i in 0..8u32 {
                        let row = min(k0 + i, k - 1);
                        let word = qweight[(row * nw + words[r as usize]) as usize];
                        #[unroll]
                        for l in 0..4u32 {
                            let j = r * 4 + l;
                            let v = dequant_i8_code(unpack_i8(word, l), sg[j as usize], shift);
                            wv[(i * TN + j) as usize] = select(k0 + i < k, v, 0.0f32);
                        }
                    }
                }
            }
            let clamp_last = comptime!(wkind != WeightKind::Int4);
            if comptime!(plane) {
                load_x_step::<F>(&mut mine, x, &own, k0, kv, TM / 8, clamp_last);
                plane_rows(&mut xs, &mine, TM, 2u32);
                k0 += 8 * step_products(&mut acc, &mut part, &mut xsum, &xs, &wv, k, TM, TN, folded);
            } else if comptime!(per_accumulator) {
                load_x_step::<F>(&mut xs, x, &xrow, k0, kv, TM, clamp_last);
                k0 += 8 * step_products(&mut acc, &mut part, &mut xsum, &xs, &wv, k, TM, TN, folded);
            } else {
            #[unroll]
            for r in 0..TM {
                #[unroll]
                for h in 0..2u32 {
                    // Two vectors a step; int8's K may end half-way (K % 8 == 4): its
                    // last vector is read again there, against zero weights.
                    let mut vi = k0 / 4 + h;
                    if comptime!(clamp_last) {
                        vi = min(vi, kv - 1);
                    }
                    let xq = x[(xrow[r as usize] + vi) as usize];
                    #[unroll]
                    for l in 0..4u32 {
                        let i = h * 4 + l;
                        let xv = f32::cast_from(xq[l as usize]);
                        if comptime!(folded) {
                            xsum[r as usize] += xv;
                            #[unroll]
                            for j in 0..TN {
                                part[(r * TN + j) as usize] += xv * wv[(i * TN + j) as usize];
                            }
                        } else {
                            #[unroll]
                            for j in 0..TN {
                                acc[(r * TN + j) as usize] += xv * wv[(i * TN + j) as usize];
                            }
                        }
                    }
                }
            }
            k0 += 8;
            }
        }
        if comptime!(folded) {
            fold_group(&mut acc, &mut part, &mut xsum, &sg, &zg, TM, TN);
        }
        store_strided_tile::<F>(y, &mut acc, m0 + ty, col0, m, n, BM, BN, TM, TN, span, local_scalars);
    }
}

/// The first element of each of a unit's `tm` tile rows in a row-major operand of
/// `stride` elements a row (`xrow[i]`: row `first + i row_step`, clamped to `m - 1`, so
/// that out-of-range rows read row `m - 1` and are never stored), and with `plane`
/// (`SHARE = 8`; the plane is one unit row) the `tm / 8` rows this unit reads for its
/// plane (`own[s]`: tile row `lane + 8 s`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_rows(
    xrow: &mut Array<u32>,
    own: &mut Array<u32>,
    first: u32,
    m: u32,
    stride: u32,
    #[comptime] tm: u32,
    #[comptime] row_step: u32,
    #[comptime] plane: bool,
) {
    #[unroll]
    for i in 0..tm {
        xrow[i as usize] = min(first + i * row_step, m - 1) * stride;
    }
    if comptime!(plane) {
        #[unroll]
        for s in 0..tm / 8 {
            let tile_row = UNIT_POS_PLANE + s * 8;
            own[s as usize] = min(first + tile_row * row_step, m - 1) * stride;
        }
    }
}

/// `xs[2 r + h]` = vector `k0 / 4 + h` of row `r` of x (`rows[r]`: the row's first vector),
/// in f32, for `r < tm`. With `clamp_last` (int8, whose K may end half-way: K % 8 == 4)
/// the last vector is read again past the end, against zero weights.
#[cube]
fn load_x_step<F: Float>(
    xs: &mut Array<V4>,
    x: &Array<Vector<F, Const<4>>>,
    rows: &Array<u32>,
    k0: u32,
    kv: u32,
    #[comptime] tm: u32,
    #[comptime] clamp_last: bool,
) {
    #[unroll]
    for r in 0..tm {
        #[unroll]
        for h in 0..2u32 {
            let mut vi = k0 / 4 + h;
            if comptime!(clamp_last) {
                vi = min(vi, kv - 1);
            }
            xs[(r * 2 + h) as usize] = V4::cast_from(x[(rows[r as usize] + vi) as usize]);
        }
    }
}

/// A step's products, accumulator by accumulator: `acc[r, j] += Σ_i x[r, i] wv[i, j]`
/// over the step's eight K in order (`xs[2 r + i / 4][i % 4]`), or with `folded` the
/// same into `part` and `xsum[r] += Σ_i x[r, i]`. The sums of the K-major loop, in the
/// same order; on a CPU adapter each accumulator is then loaded, blended through the
/// lanes' mask and stored once per step, not once per product (as matmul's `fma_k_quad`).
/// Returns 1 (`k >= 1`) through the [`block_boundary()`]s between groups of rows (for
/// llvmpipe's compile time), for the caller's step counter.
#[cube]
#[allow(clippy::too_many_arguments)]
fn step_products(
    acc: &mut Array<f32>,
    part: &mut Array<f32>,
    xsum: &mut Array<f32>,
    xs: &Array<V4>,
    wv: &Array<f32>,
    k: u32,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
    #[comptime] folded: bool,
) -> u32 {
    let rows = comptime!(rows_per_block(tm, tn));
    let mut step = 1u32;
    #[unroll]
    for r in 0..tm {
        if comptime!(r > 0 && r % rows == 0) {
            step *= block_boundary(k);
        }
        if comptime!(folded) {
            let mut t = xsum[r as usize];
            #[unroll]
            for i in 0..8u32 {
                t += xs[(2 * r + i / 4) as usize][(i % 4) as usize];
            }
            xsum[r as usize] = t;
        }
        #[unroll]
        for j in 0..tn {
            let e = (r * tn + j) as usize;
            if comptime!(folded) {
                part[e] = step_dot(part[e], xs, wv, r, j, tn);
            } else {
                acc[e] = step_dot(acc[e], xs, wv, r, j, tn);
            }
        }
    }
    step
}

/// `s + Σ_i x[r, i] wv[i, j]` over a step's eight K, in order.
#[cube]
fn step_dot(
    s: f32,
    xs: &Array<V4>,
    wv: &Array<f32>,
    #[comptime] r: u32,
    #[comptime] j: u32,
    #[comptime] tn: u32,
) -> f32 {
    let mut t = s;
    #[unroll]
    for i in 0..8u32 {
        t += xs[(2 * r + i / 4) as usize][(i % 4) as usize] * wv[(i * tn + j) as usize];
    }
    t
}

/// Zeroes a group's running sums: `part` `[tm, tn]` (sum x q) and `xsum` `[tm]` (sum x).
#[cube]
fn zero_group_sums(
    part: &mut Array<f32>,
    xsum: &mut Array<f32>,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    #[unroll]
    for e in 0..tm * tn {
        part[e as usize] = 0.0;
    }
    #[unroll]
    for r in 0..tm {
        xsum[r as usize] = 0.0;
    }
}

/// Adds a finished group to the accumulators, `acc[r, j] += s[j] (part[r, j] - z[j]
/// xsum[r])`, and zeroes its sums for the next group.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fold_group(
    acc: &mut Array<f32>,
    part: &mut Array<f32>,
    xsum: &mut Array<f32>,
    sg: &Array<f32>,
    zg: &Array<f32>,
    #[comptime] tm: u32,
    #[comptime] tn: u32,
) {
    #[unroll]
    for r in 0..tm {
        #[unroll]
        for j in 0..tn {
            let e = (r * tn + j) as usize;
            acc[e] += sg[j as usize] * (part[e] - zg[j as usize] * xsum[r as usize]);
        }
    }
    zero_group_sums(part, xsum, tm, tn);
}

/// The AWQ nibble slot of column `j` of a group of eight: AWQ packs columns in the
/// order [0, 2, 4, 6, 1, 3, 5, 7], so column j sits in slot `j / 2 + 4 (j % 2)`.
#[cube]
pub(crate) fn awq_slot(j: u32) -> u32 {
    j / 2 + 4 * (j % 2)
}

/// One-time conversion of a GPTQ or AWQ checkpoint to kiln's layout: `out_q` u32
/// `[K/8, N]` (packed along K), `out_s` f32 scales and `out_z` f32 zero points, both
/// `[K/G, N]`. `zero_offset` is 1 for GPTQ v1 (which stores z - 1); without
/// `has_zeros` the zero point is 8 (symmetric). One unit per output word and per
/// (group, column).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(items.div_ceil(UNITS)), cube = UNITS)]
pub fn w4a16_repack<F: Float>(
    qweight: &Array<u32>,
    qzeros: &Array<u32>,
    scales: &Array<F>,
    out_q: &mut Array<u32>,
    out_s: &mut Array<f32>,
    out_z: &mut Array<f32>,
    n: u32,
    words: u32,
    group_cols: u32,
    items: u32,
    zero_offset: u32,
    #[comptime] awq: bool,
    #[comptime] has_zeros: bool,
) {
    let i = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if i < words {
        if comptime!(awq) {
            let kw = i / n;
            let col = i % n;
            let mut word = 0u32;
            #[unroll]
            for s in 0..8u32 {
                let src = qweight[((kw * 8 + s) * (n / 8) + col / 8) as usize];
                word |= unpack_u4(src, awq_slot(col % 8)) << (s * 4);
            }
            out_q[i as usize] = word;
        } else {
            out_q[i as usize] = qweight[i as usize];
        }
    }
    if i < group_cols {
        let g = i / n;
        let col = i % n;
        out_s[i as usize] = f32::cast_from(scales[i as usize]);
        let mut z = 8u32;
        if comptime!(has_zeros) {
            let zw = qzeros[(g * (n / 8) + col / 8) as usize];
            let mut slot = col % 8;
            if comptime!(awq) {
                slot = awq_slot(col % 8);
            }
            z = unpack_u4(zw, slot) + zero_offset;
        }
        out_z[i as usize] = f32::cast_from(z);
    }
}
