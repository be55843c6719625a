//! Column sums over row groups, `c[g, j] = sum over group g's rows t of b[t, b_col + j]`:
//! the bias gradients of a grouped GEMM (MoE's `d_b1`, `d_b2`: `ones^T dY` per expert).
//! As a weight-gradient product with a column of ones (K = 1) they ran on tiles built
//! for wide outputs: a few cubes walking every row (0.1 s each at 4096 rows x 512 on
//! lavapipe). Here a unit owns one column of one group and `SPLIT` units share its rows
//! (interleaved), their partial sums added in shared memory in a fixed order: no
//! atomics, the same bits on every run.

use super::{ColumnWindow, RowGroups};
use cubecl::prelude::*;
use kiln_runtime::{Client, DType, Result, Tensor};

/// `c[g, j]` for a column window `b` (in `dtype` or f32) over `groups`: `[G, b.width]` in
/// `dtype`, f32 sums. Autotuned over how many units share a group's rows.
pub(crate) fn sum_columns_by_group(
    b: ColumnWindow<'_>,
    groups: &RowGroups,
    dtype: DType,
) -> Result<Tensor> {
    let client = b.t.client();
    let c = Tensor::empty(client, dtype, &[groups.experts, b.width])?;
    if groups.experts * b.width == 0 {
        return Ok(c);
    }
    // The configurations differ in summation order only.
    let tolerance = 8.0 * dtype.epsilon() * (groups.max_rows as f64).sqrt().max(1.0);
    let (ph, ph_f) = placeholders(client, dtype)?;
    let args = sums_args(b, groups, dtype, &c, &ph, &ph_f);
    GroupedColumnSums::tuned(client, tolerance, &args)?;
    Ok(c)
}

/// [`sum_columns_by_group`] on one configuration (`None`: the tuned one), for tests and
/// benchmarks: `c[g, j] = sum of b[t, b_cols.start + j]` over group `g`'s rows, groups of
/// `counts[g]` consecutive rows summing to b's rows; `[G, b_cols.len()]` in b's dtype.
pub fn grouped_column_sums_with(
    b: &Tensor,
    b_cols: std::ops::Range<usize>,
    counts: &[usize],
    cfg: Option<GroupedColumnSumsConfig>,
) -> Result<Tensor> {
    let (rows, window) = ColumnWindow::checked("b", b, &b_cols)?;
    let groups = RowGroups::consecutive(b, counts, rows, "b")?;
    let Some(cfg) = cfg else {
        return sum_columns_by_group(window, &groups, b.dtype());
    };
    let client = b.client();
    let c = Tensor::empty(client, b.dtype(), &[counts.len(), window.width])?;
    if counts.len() * window.width == 0 {
        return Ok(c);
    }
    let (ph, ph_f) = placeholders(client, b.dtype())?;
    GroupedColumnSums::launch(
        client,
        &cfg,
        &sums_args(window, &groups, b.dtype(), &c, &ph, &ph_f),
    )?;
    Ok(c)
}

/// The f32 and `dtype` placeholders bound for the binding a window does not use.
fn placeholders(client: &Client, dtype: DType) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::empty(client, DType::F32, &[1])?,
        Tensor::empty(client, dtype, &[1])?,
    ))
}

fn sums_args<'a>(
    b: ColumnWindow<'a>,
    groups: &'a RowGroups,
    dtype: DType,
    c: &'a Tensor,
    ph: &'a Tensor,
    ph_f: &'a Tensor,
) -> GroupedColumnSumsArgs<'a> {
    let b_f32 = b.t.dtype() != dtype;
    GroupedColumnSumsArgs {
        b: if b_f32 { ph_f } else { b.t },
        b32: if b_f32 { b.t } else { ph },
        row_start: &groups.start,
        row_count: &groups.count,
        c,
        n: b.width as u32,
        ldb: b.ld() as u32,
        b_col: b.col as u32,
        experts: groups.experts as u32,
        max_rows: groups.max_rows as u32,
        b_f32,
    }
}

/// `c[g, j] = sum_t b[(row_start[g] + t) ldb + b_col + j]` over `t < row_count[g]`: unit
/// (x, y) of cube (X, 0, g) sums column `X UNITS + x` over rows `y, y + SPLIT, ..` in
/// f32 (consecutive units read consecutive columns of a row); with `SPLIT > 1` row `y =
/// 0` adds the cube's partial sums in order of `y`. A group without rows writes zeros.
#[kiln_macros::kernel(
    tune((UNITS, SPLIT) = [(256, 1), (64, 4), (32, 8)]),
    key(n = pow2, max_rows = pow2, experts = pow2, dtype),
    grid = (n.div_ceil(UNITS), 1, experts),
    cube = (UNITS, SPLIT),
    defaults(b_f32 = false)
)]
pub fn grouped_column_sums<F: Float>(
    b: &Array<F>,
    b32: &Array<f32>,
    row_start: &Array<u32>,
    row_count: &Array<u32>,
    c: &mut Array<F>,
    n: u32,
    ldb: u32,
    b_col: u32,
    experts: u32,
    max_rows: u32,
    #[comptime] b_f32: bool,
) {
    let e = CUBE_POS_Z;
    let start = row_start[e as usize];
    let count = row_count[e as usize];
    let j = CUBE_POS_X * UNITS + UNIT_POS_X;
    // Units past the last column read column 0 (in bounds) and store nothing.
    let col = b_col + select(j < n, j, 0u32);
    let mut acc = 0.0f32;
    let mut t = UNIT_POS_Y;
    while t < count {
        let at = ((start + t) * ldb + col) as usize;
        if comptime!(b_f32) {
            acc += b32[at];
        } else {
            acc += f32::cast_from(b[at]);
        }
        t += SPLIT;
    }
    if comptime!(SPLIT > 1) {
        let mut part = SharedMemory::<f32>::new(comptime!((UNITS * SPLIT) as usize));
        part[(UNIT_POS_Y * UNITS + UNIT_POS_X) as usize] = acc;
        sync_cube();
        if UNIT_POS_Y == 0 {
            #[unroll]
            for y in 1..SPLIT {
                acc += part[(y * UNITS + UNIT_POS_X) as usize];
            }
        }
    }
    if UNIT_POS_Y == 0 && j < n {
        c[(e * n + j) as usize] = F::cast_from(acc);
    }
}
