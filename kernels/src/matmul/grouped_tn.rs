//! Weight-gradient GEMMs `C_g = A_g^T B_g`, summed over each group's rows: MoE's
//! per-expert weight gradients and S²FT's partial backpropagation (`dDelta = dY[:, 0:r]^T
//! X`, `dY^T X[:, s:e]`). The operands are column windows of row-major tensors, so a
//! block of a gradient is read in place, never copied out first. The rows are the
//! reduction: one cube owns one output tile and walks its group's rows, so no two cubes
//! add into one output (no atomics; WGSL has none for floats).

use super::zero_tile_v4;
use crate::launch::upload_u32;
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::{DType, Result, Tensor};

/// The row groups of a grouped GEMM: group `g` is rows `start[g] .. start[g] +
/// count[g]` of both operands (MoE: an expert's rows; one group: all rows).
pub(crate) struct RowGroups {
    pub start: Tensor,
    pub count: Tensor,
    pub max_rows: usize,
    pub experts: usize,
}

impl RowGroups {
    /// Groups from host offsets and counts (uploaded as u32 on `like`'s device).
    pub(crate) fn new(like: &Tensor, start: &[usize], count: &[usize]) -> Result<RowGroups> {
        let c = like.client();
        let as_u32 = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        Ok(RowGroups {
            start: upload_u32(c, "row_start", &as_u32(start))?,
            count: upload_u32(c, "row_count", &as_u32(count))?,
            max_rows: count.iter().copied().max().unwrap_or(0),
            experts: count.len(),
        })
    }
}

/// Columns `col .. col + width` of a row-major `[R, ld]` tensor (`ld` its last
/// dimension): an operand of [`grouped_tn_product`] read in place.
#[derive(Clone, Copy)]
pub(crate) struct ColumnWindow<'a> {
    pub t: &'a Tensor,
    pub col: usize,
    pub width: usize,
}

impl<'a> ColumnWindow<'a> {
    /// Every column of `t` (`[R, C]`).
    pub(crate) fn all(t: &'a Tensor) -> Self {
        ColumnWindow {
            t,
            col: 0,
            width: t.shape()[t.rank() - 1],
        }
    }
    fn ld(&self) -> usize {
        self.t.shape()[self.t.rank() - 1]
    }
}

/// `c[g] = a_g^T b_g` summed over group `g`'s rows, `a` and `b` column windows (each in
/// `dtype` or f32): `[G, a.width, b.width]` in `dtype`, f32 accumulation.
pub(crate) fn grouped_tn_product(
    a: ColumnWindow<'_>,
    b: ColumnWindow<'_>,
    groups: &RowGroups,
    dtype: DType,
) -> Result<Tensor> {
    let client = a.t.client();
    let (ka, n) = (a.width, b.width);
    let c = Tensor::empty(client, dtype, &[groups.experts, ka, n])?;
    if c.numel() == 0 {
        return Ok(c);
    }
    let ph = Tensor::empty(client, DType::F32, &[4])?;
    let ph_f = Tensor::empty(client, dtype, &[4])?;
    let (a_f32, b_f32) = (a.t.dtype() != dtype, b.t.dtype() != dtype);
    GroupedMatmulTn::tuned(
        client,
        1e-5,
        &GroupedMatmulTnArgs {
            a: if a_f32 { &ph_f } else { a.t },
            a32: if a_f32 { a.t } else { &ph },
            b: if b_f32 { &ph_f } else { b.t },
            b32: if b_f32 { b.t } else { &ph },
            row_start: &groups.start,
            row_count: &groups.count,
            c: &c,
            ka: ka as u32,
            n: n as u32,
            lda: a.ld() as u32,
            ldb: b.ld() as u32,
            a_col: a.col as u32,
            b_col: b.col as u32,
            experts: groups.experts as u32,
            max_rows: groups.max_rows as u32,
            a_f32,
            b_f32,
        },
    )?;
    Ok(c)
}

/// `c[g] = a_g^T b_g` over group `g`'s rows `row_start[g] ..`, with `a_g` element (row
/// t, i) at `a[t lda + a_col + i]` (`i < ka`) and `b_g` (t, j) at `b[t ldb + b_col + j]`
/// (`j < n`): one cube per (column tile, row tile of Ka, group) walks the group's rows in
/// `BK` slices staged through shared memory as 4-wide vectors, f32 accumulators; a
/// group without rows writes zeros. The rows are the reduction, so no two cubes add
/// into one output: no atomics.
#[kiln_macros::kernel(
    tune((BM, BN, BK, TM, TN) = [
            (32, 64, 16, 4, 8),
            (64, 64, 16, 4, 8),
            (16, 64, 16, 2, 8),
        ]),
    require(BM % TM == 0,
        BN % TN == 0,
        TN % 4 == 0,
        BK % 4 == 0,
        (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory),
    key(ka = pow2, n = pow2, max_rows = pow2, experts = pow2, dtype),
    grid = (n.div_ceil(BN), ka.div_ceil(BM), experts),
    cube = ((BM / TM) * (BN / TN)),
    defaults(a_f32 = false, b_f32 = false)
)]
pub fn grouped_matmul_tn<F: Float>(
    a: &Array<F>,
    a32: &Array<f32>,
    b: &Array<F>,
    b32: &Array<f32>,
    row_start: &Array<u32>,
    row_count: &Array<u32>,
    c: &mut Array<F>,
    ka: u32,
    n: u32,
    lda: u32,
    ldb: u32,
    a_col: u32,
    b_col: u32,
    experts: u32,
    max_rows: u32,
    #[comptime] a_f32: bool,
    #[comptime] b_f32: bool,
) {
    let e = CUBE_POS_Z;
    let start = row_start[e as usize];
    let count = row_count[e as usize];
    let units = comptime!((BM / TM) * (BN / TN));
    let cols_of_units = comptime!(BN / TN);
    let row0 = CUBE_POS_Y * BM;
    let col0 = CUBE_POS_X * BN;
    let (ty, tx) = (UNIT_POS / cols_of_units, UNIT_POS % cols_of_units);
    let mut acc = Array::<V4>::new(comptime!((TM * TN / 4) as usize));
    zero_tile_v4(&mut acc, TM * TN / 4);
    let mut xs = SharedMemory::<V4>::new(comptime!((BM * BK / 4) as usize));
    let mut ys = SharedMemory::<V4>::new(comptime!((BK * BN / 4) as usize));
    let mut d0 = 0u32;
    while d0 < count {
        let depth = count - d0;
        let base = start + d0;
        // X (output row i, depth d) = a[(base + d) lda + a_col + row0 + i].
        let a_at = base * lda + a_col + row0;
        if comptime!(a_f32) {
            load_tile_v4::<f32>(
                &mut xs,
                0,
                a32,
                a_at,
                1,
                lda,
                ka - row0,
                depth,
                BM,
                BK,
                units,
            );
        } else {
            load_tile_v4::<F>(&mut xs, 0, a, a_at, 1, lda, ka - row0, depth, BM, BK, units);
        }
        // Y (depth d, column j) = b[(base + d) ldb + b_col + col0 + j].
        let b_at = base * ldb + b_col + col0;
        if comptime!(b_f32) {
            load_tile_v4::<f32>(
                &mut ys,
                0,
                b32,
                b_at,
                ldb,
                1,
                depth,
                n - col0,
                BK,
                BN,
                units,
            );
        } else {
            load_tile_v4::<F>(&mut ys, 0, b, b_at, ldb, 1, depth, n - col0, BK, BN, units);
        }
        sync_cube();
        reg_tile_mma_v4(
            &mut acc,
            &xs,
            0,
            &ys,
            0,
            ty,
            tx,
            BM,
            BN,
            BK,
            TM,
            TN,
            local_scalars,
        );
        sync_cube();
        d0 += BK;
    }
    let row_step = comptime!(BM / TM);
    #[unroll]
    for i in 0..TM {
        let r = row0 + ty + i * row_step;
        #[unroll]
        for j in 0..TN {
            let col = col0 + v4_tile_col(tx, j, BN, TN);
            if r < ka && col < n {
                let v = acc[(i * comptime!(TN / 4) + j / 4) as usize][(j % 4) as usize];
                c[((e * ka + r) * n + col) as usize] = F::cast_from(v);
            }
        }
    }
}
