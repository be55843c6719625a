//! The tensor-core paths of the quantized GEMMs. W4A16 and `w8_bits` (`qgemm_cmma`), for f16 and
//! bf16 activations on devices that report cooperative-matrix support (CUDA `wmma`):
//! every K step dequantizes the weight slice into shared memory in the activation's
//! dtype, then the planes multiply on tensor cores with f32 accumulation (Marlin's
//! shape of the problem, without its hand-scheduled pipeline). Never a candidate
//! elsewhere: `require(device.has(Capability::TensorCores))` keeps it out of the
//! tuning space, and `kiln emit` refuses WGSL for it.
//!
//! A cube of `PLANES_M x PLANES_N` planes (32 units each) owns a
//! `32 PLANES_M x 32 PLANES_N` tile of `y`; each plane accumulates a 32 x 32 block as
//! 2 x 2 fragments of 16 x 16 (`kiln_dsl::CmmaBlock`).
//!
//! W8A8 (`w8a8_cmma`) on int8 tensor cores (`wmma` s8 fragments, compute capability 7.2
//! and up: `Capability::Int8TensorCores`): int8 x int8 products summed in i32 fragments,
//! exact like the other W8A8 kernels, then the same epilogue.

use super::dequant::{stage_weight_tile, WeightKind};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_as, CmmaBlock};

/// Depth of a K step: one fragment (two int4 words per column).
const FRAG: u32 = 16;

qgemm_kernel! {
    /// `y = x @ w` on tensor cores: x's slice `[32 PLANES_M, 16]` and the dequantized
    /// weight slice `[16, 32 PLANES_N]` staged in shared memory in `F` (zero past the
    /// edges), f32 fragments, y written in `F`.
    #[kernel(
        tune(PLANES_M = [2, 1], PLANES_N = [2, 1]),
        require(device.has(Capability::TensorCores), device.plane_size.0 == 32),
        grid = (n.div_ceil(32 * PLANES_N), m.div_ceil(32 * PLANES_M)),
        cube = (32, PLANES_M * PLANES_N),
        // wmma has no 16x16x16 f32 fragment: half precision only.
        dtypes = [f16, bf16],
    )]
    qgemm_cmma() {
        let bm = comptime!(32 * PLANES_M);
        let bn = comptime!(32 * PLANES_N);
        let units = comptime!(32 * PLANES_M * PLANES_N);
        let block = CmmaBlock::new(PLANES_M, PLANES_N, 2u32, 2u32);
        let (row0, col0) = (block.row0, block.col0);

        // x's slice row-major [bm][16], the weight's row-major [16][bn].
        let mut xs = SharedMemory::<F>::new(comptime!((bm * FRAG) as usize));
        let mut ws = SharedMemory::<F>::new(comptime!((FRAG * bn) as usize));
        let mut k0 = 0u32;
        while k0 < k {
            load_tile_as::<F, F>(
                &mut xs,
                0,
                x,
                row0 * k + k0,
                k,
                m - row0,
                k - k0,
                bm,
                FRAG,
                false,
                units,
            );
            stage_weight_tile::<F>(
                &mut ws,
                qweight,
                scales,
                zeros,
                g_idx,
                k0,
                col0,
                n,
                k,
                group_size,
                shift,
                FRAG,
                bn,
                units,
                wkind,
                act_order,
            );
            sync_cube();
            block.mma::<F, F>(&xs, FRAG, &ws, bn, false, FRAG, 1u32);
            sync_cube();
            k0 += FRAG;
        }

        // Accumulators to shared memory, then y over the whole tile.
        let mut ys = SharedMemory::<f32>::new(comptime!((bm * bn) as usize));
        block.store(&mut ys, bn);
        sync_cube();
        let mut idx = UNIT_POS;
        while idx < comptime!(bm * bn) {
            let r = row0 + idx / bn;
            let col = col0 + idx % bn;
            if r < m && col < n {
                y[(r * n + col) as usize] = F::cast_from(ys[idx as usize]);
            }
            idx += units;
        }
    }
}

/// Depth of one int8 fragment (`wmma` s8: 16 x 16 x 16).
const I8_FRAG: u32 = 16;

w8a8_kernel! {
    /// `y = sx sw (xq @ wq^T) (+ bias)` on int8 tensor cores. A cube of
    /// `PLANES_M x PLANES_N` planes owns a `16 FRAGS_M PLANES_M x 16 FRAGS_N PLANES_N`
    /// tile of `y`, each plane `FRAGS_M x FRAGS_N` i32 fragments of 16 x 16. Each K step
    /// of `BK` stages both operands' slices in shared memory, a word (four codes) a
    /// store, each 16 deep fragment slice `[rows][16]` on its own (16-byte rows, every
    /// fragment's first element 32-byte aligned, as `wmma` loads require): `xq`'s rows
    /// as the row-major A, `wq`'s rows (`[N, K]` as it lies) as the column-major B.
    /// Whole words of K are read (K a multiple of 16), zero past the edges. The epilogue
    /// goes a fragment at a time through the plane's 1 KiB of i32, then scales in f32 as
    /// the other W8A8 kernels do: `acc sx[row] sw[col] (+ bias[col])`.
    #[kernel(
        tune((PLANES_M, PLANES_N, FRAGS_M, FRAGS_N, BK) = [
            (2, 2, 2, 2, 64),
            (2, 2, 4, 2, 64),
            (2, 2, 2, 4, 64),
            (2, 2, 4, 4, 32),
            (2, 4, 2, 2, 64),
            // Few rows: one plane row, the planes across N.
            (1, 4, 1, 2, 64),
        ]),
        require(
            // Int8 fragments are tensor cores too: what refuses every cmma kernel for
            // WGSL and elsewhere (`needs(TensorCores)`) refuses this one.
            device.has(Capability::TensorCores),
            device.has(Capability::Int8TensorCores),
            device.plane_size.0 == 32,
            k % 16 == 0,
            (((16 * FRAGS_M * PLANES_M + 16 * FRAGS_N * PLANES_N) * BK
                + 1024 * PLANES_M * PLANES_N) as usize) <= device.max_shared_memory,
        ),
        grid = (n.div_ceil(16 * FRAGS_N * PLANES_N), m.div_ceil(16 * FRAGS_M * PLANES_M)),
        cube = (32, PLANES_M * PLANES_N),
    )]
    w8a8_cmma {
        let bm = comptime!(16 * FRAGS_M * PLANES_M);
        let bn = comptime!(16 * FRAGS_N * PLANES_N);
        let units = comptime!(32 * PLANES_M * PLANES_N);
        let plane = UNIT_POS / 32;
        let plane_row = plane / PLANES_N;
        let plane_col = plane % PLANES_N;
        let row0 = CUBE_POS_Y * bm;
        let col0 = CUBE_POS_X * bn;
        let mut acc = Sequence::<cmma::Matrix<i32>>::new();
        #[unroll]
        for _ in 0..comptime!((FRAGS_M * FRAGS_N) as usize) {
            acc.push(cmma::Matrix::<i32>::from_value(
                cmma::MatrixIdent::Accumulator,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::Undefined,
                0i32,
            ));
        }
        // [BK / 16][rows][16] bytes each.
        // 32-byte aligned, as `wmma` loads require of every fragment's first element
        // (the offsets below are multiples of 256 bytes).
        let mut xs = SharedMemory::<I8x4>::new_aligned(comptime!((bm * BK / 4) as usize), 32usize);
        let mut ws = SharedMemory::<I8x4>::new_aligned(comptime!((bn * BK / 4) as usize), 32usize);
        let kw = k / 4;
        let mut k0 = 0u32;
        while k0 < k {
            stage_i8_slice(&mut xs, xq, row0, m, kw, k0 / 4, bm, BK, units);
            stage_i8_slice(&mut ws, wq, col0, n, kw, k0 / 4, bn, BK, units);
            sync_cube();
            #[unroll]
            for kk in 0..comptime!(BK / I8_FRAG) {
                let mut af = Sequence::<cmma::Matrix<i8>>::new();
                #[unroll]
                for i in 0..comptime!(FRAGS_M as usize) {
                    let r = plane_row * comptime!(16 * FRAGS_M) + comptime!(i as u32 * 16);
                    af.push(i8_fragment(
                        &xs,
                        comptime!(kk * bm * 16) + r * 16u32,
                        cmma::MatrixIdent::A,
                        cmma::MatrixLayout::RowMajor,
                    ));
                }
                #[unroll]
                for j in 0..comptime!(FRAGS_N as usize) {
                    let c = plane_col * comptime!(16 * FRAGS_N) + comptime!(j as u32 * 16);
                    let b = i8_fragment(
                        &ws,
                        comptime!(kk * bn * 16) + c * 16u32,
                        cmma::MatrixIdent::B,
                        cmma::MatrixLayout::ColMajor,
                    );
                    #[unroll]
                    for i in 0..comptime!(FRAGS_M as usize) {
                        let c_frag = acc.index(comptime!(i * FRAGS_N as usize + j));
                        cmma::execute::<i8, i8, i32, i32>(af.index(i), &b, c_frag, c_frag);
                    }
                }
            }
            sync_cube();
            k0 += BK;
        }

        // A fragment at a time through the plane's scratch: 8 elements per unit.
        let mut scratch =
            SharedMemory::<i32>::new_aligned(comptime!((256 * PLANES_M * PLANES_N) as usize), 32usize);
        let base = plane * 256;
        #[unroll]
        for i in 0..comptime!(FRAGS_M) {
            #[unroll]
            for j in 0..comptime!(FRAGS_N) {
                cmma::store(
                    &mut scratch.slice_mut(base as usize, (base + 256) as usize),
                    acc.index(comptime!((i * FRAGS_N + j) as usize)),
                    16u32,
                    cmma::MatrixLayout::RowMajor,
                );
                sync_plane();
                let fr = plane_row * comptime!(16 * FRAGS_M) + comptime!(16 * i);
                let fc = plane_col * comptime!(16 * FRAGS_N) + comptime!(16 * j);
                #[unroll]
                for t in 0..8u32 {
                    let idx = UNIT_POS % 32 + t * 32;
                    let r = row0 + fr + idx / 16;
                    let col = col0 + fc + idx % 16;
                    if r < m && col < n {
                        let mut v = f32::cast_from(scratch[(base + idx) as usize])
                            * sx[r as usize]
                            * sw[col as usize];
                        if comptime!(has_bias) {
                            v += bias[col as usize];
                        }
                        y[(r * n + col) as usize] = F::cast_from(v);
                    }
                }
                sync_plane();
            }
        }
    }
}

/// The 16 x 16 int8 fragment whose first code is byte `at` of `smem` (a multiple of 256:
/// the fragment slices' rows are 16 bytes), as `ident` in `layout`.
#[cube]
fn i8_fragment(
    smem: &SharedMemory<I8x4>,
    at: u32,
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] layout: cmma::MatrixLayout,
) -> cmma::Matrix<i8> {
    let fragment =
        unsafe { cmma::Matrix::<i8>::uninitialized(ident, 16usize, 16usize, 16usize, layout) };
    cmma::load(
        &fragment,
        &smem.slice((at / 4) as usize, ((at + 256u32) / 4) as usize),
        16u32,
    );
    fragment
}

/// Four int8 codes: one 32-bit word of an int8 matrix as it lies in memory.
type I8x4 = Vector<i8, Const<4>>;

/// Stages the `rows x bk` int8 slice of a `[.., K]` int8 matrix (`src`, read as u32
/// words, rows `kw` words apart) whose first row is `row0` (`valid` rows in all) and
/// first word `w0` into `smem` as `[bk / 16][rows][16]` bytes (a word a store), zero past
/// the edges.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_i8_slice(
    smem: &mut SharedMemory<I8x4>,
    src: &Array<u32>,
    row0: u32,
    valid: u32,
    kw: u32,
    w0: u32,
    #[comptime] rows: u32,
    #[comptime] bk: u32,
    #[comptime] units: u32,
) {
    // Consecutive units read consecutive words of a row.
    let words = comptime!(bk / 4);
    let mut idx = UNIT_POS;
    while idx < comptime!(rows * bk / 4) {
        let r = idx / words;
        let w = idx % words;
        let mut word = 0u32;
        if row0 + r < valid && w0 + w < kw {
            word = src[((row0 + r) * kw + w0 + w) as usize];
        }
        // Word w is bytes 4 (w % 4) .. of row r in fragment slice w / 4.
        let at = (w / 4) * comptime!(rows * 4) + r * 4 + w % 4;
        smem[at as usize] = I8x4::reinterpret(word);
        idx += units;
    }
}
