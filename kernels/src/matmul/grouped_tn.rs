//! Weight-gradient GEMMs `C_g = A_g^T B_g`, summed over each group's rows: MoE's
//! per-expert weight gradients and S²FT's partial backpropagation (`dDelta = dY[:, 0:r]^T
//! X`, `dY^T X[:, s:e]`). The operands are column windows of row-major tensors, so a
//! block of a gradient is read in place, never copied out first. The rows are the
//! reduction: one cube owns one output tile and walks its group's rows, so no two cubes
//! add into one output (no atomics; WGSL has none for floats).

use super::{clamped_strided, plane_rows, shares_rows, zero_tile_v4};
use crate::launch::upload_u32;
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::{shape_str, tune::Choice, Client, DType, Error, Result, Tensor};
use serde::{Deserialize, Serialize};

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

    /// Groups of `counts[g]` consecutive rows from row 0 of a `rows`-row operand (`what`),
    /// refused by name unless they cover it exactly: the `counts` of the `*_with` entry
    /// points.
    pub(crate) fn consecutive(
        like: &Tensor,
        counts: &[usize],
        rows: usize,
        what: &str,
    ) -> Result<RowGroups> {
        let total: usize = counts.iter().sum();
        if total != rows {
            return Err(Error::Param {
                param: "counts".into(),
                expected: format!("row counts summing to {what}'s {rows} rows"),
                found: format!("{counts:?} (sum {total})"),
            });
        }
        let starts: Vec<usize> = counts
            .iter()
            .scan(0, |at, &c| {
                *at += c;
                Some(*at - c)
            })
            .collect();
        RowGroups::new(like, &starts, counts)
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
    /// Columns `cols` of `t` (`name`, a usable `[R, C]` tensor) and its row count R, or an
    /// error naming `name` where `t` is not 2-D or `cols` is not inside C: the windows
    /// the `*_with` entry points take.
    pub(crate) fn checked(
        name: &str,
        t: &'a Tensor,
        cols: &std::ops::Range<usize>,
    ) -> Result<(usize, Self)> {
        crate::launch::check_input(name, t, t.client())?;
        match t.shape() {
            &[r, w] if cols.start <= cols.end && cols.end <= w => Ok((
                r,
                ColumnWindow {
                    t,
                    col: cols.start,
                    width: cols.len(),
                },
            )),
            s => Err(Error::Shape {
                tensor: name.into(),
                expected: format!("[R, C] with columns {cols:?} inside C"),
                found: shape_str(s),
            }),
        }
    }

    pub(crate) fn ld(&self) -> usize {
        self.t.shape()[self.t.rank() - 1]
    }
}

/// A configuration of one of the weight-gradient kernels: what the autotuner picks among.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupedTnConfig {
    /// `grouped_matmul_tn`: the rows staged through shared memory (any alignment; the
    /// GPU path).
    Staged(GroupedMatmulTnConfig),
    /// `grouped_matmul_tn_v4`: 4-wide vectors straight from global memory (windows and
    /// widths multiples of 4; the CPU-adapter path).
    Vec4(GroupedMatmulTnV4Config),
}

impl GroupedTnConfig {
    /// The kernel and its tunables (tune tables).
    pub fn label(&self) -> String {
        match self {
            GroupedTnConfig::Staged(c) => format!("staged {}", GroupedMatmulTn::label(c)),
            GroupedTnConfig::Vec4(c) => format!("vec4 {}", GroupedMatmulTnV4::label(c)),
        }
    }
}

/// `c[g] = a_g^T b_g` summed over group `g`'s rows, `a` and `b` column windows (each in
/// `dtype` or f32): `[G, a.width, b.width]` in `dtype`, f32 accumulation. Autotuned among
/// both kernels' configurations that fit (the staged ones first: the reference the
/// others are checked against).
pub(crate) fn grouped_tn_product(
    a: ColumnWindow<'_>,
    b: ColumnWindow<'_>,
    groups: &RowGroups,
    dtype: DType,
) -> Result<Tensor> {
    let p = TnProblem::new(a, b, groups, dtype)?;
    if groups.experts * a.width * b.width == 0 {
        return p.output();
    }
    let candidates = p.candidates();
    let aligned = candidates
        .iter()
        .any(|c| matches!(c, GroupedTnConfig::Vec4(_)));
    // The kernels differ in summation order only: a few roundings of the sum over the
    // group's rows.
    let tolerance = 8.0 * dtype.epsilon() * (groups.max_rows as f64).sqrt().max(1.0);
    let cfg = Choice::new("grouped_tn")
        .sources([
            GroupedMatmulTn::source_hash(),
            GroupedMatmulTnV4::source_hash(),
        ])
        .dim("ka", a.width)
        .dim("n", b.width)
        .dim("max_rows", groups.max_rows)
        .dim("experts", groups.experts)
        .exact("dtype", dtype)
        .exact("a_f32", p.a_f32)
        .exact("b_f32", p.b_f32)
        .exact("aligned", aligned)
        .candidates(candidates.iter().copied())
        .tune(client_of(&a), tolerance, GroupedTnConfig::label, |c| {
            p.launch(c).map(|t| vec![t])
        })?;
    p.launch(&cfg)
}

/// [`grouped_tn_product`] on one configuration, untuned: `c[g] = a[rows of g, a_cols]^T
/// b[rows of g, b_cols]` for groups of `counts[g]` consecutive rows (summing to R), `a`
/// `[R, *]` and `b` `[R, *]` in one dtype; `c` `[G, a_cols.len(), b_cols.len()]`. For tests
/// and benchmarks; `cfg` must be one the problem offers.
pub fn grouped_matmul_tn_with(
    a: &Tensor,
    a_cols: std::ops::Range<usize>,
    b: &Tensor,
    b_cols: std::ops::Range<usize>,
    counts: &[usize],
    cfg: GroupedTnConfig,
) -> Result<Tensor> {
    crate::launch::check_input("b", b, a.client())?;
    let (ra, wa) = ColumnWindow::checked("a", a, &a_cols)?;
    let (rb, wb) = ColumnWindow::checked("b", b, &b_cols)?;
    if rb != ra {
        return Err(Error::Shape {
            tensor: "b".into(),
            expected: format!("{ra} rows (a's)"),
            found: shape_str(b.shape()),
        });
    }
    if b.dtype() != a.dtype() {
        return Err(Error::DType {
            tensor: "b".into(),
            expected: format!("{} (a's dtype)", a.dtype()),
            found: b.dtype().name().into(),
        });
    }
    let groups = RowGroups::consecutive(a, counts, ra, "a")?;
    let p = TnProblem::new(wa, wb, &groups, a.dtype())?;
    if counts.len() * wa.width * wb.width == 0 {
        return p.output();
    }
    if !p.candidates().contains(&cfg) {
        return Err(Error::Param {
            param: "config".into(),
            expected: "one of the weight-gradient kernels' configurations that fits the device and the problem".into(),
            found: cfg.label(),
        });
    }
    p.launch(&cfg)
}

fn client_of<'a>(w: &ColumnWindow<'a>) -> &'a Client {
    w.t.client()
}

/// One weight-gradient product: its windows, groups and the placeholders bound where a
/// window is read in f32 (or not).
struct TnProblem<'a> {
    a: ColumnWindow<'a>,
    b: ColumnWindow<'a>,
    groups: &'a RowGroups,
    dtype: DType,
    a_f32: bool,
    b_f32: bool,
    ph: Tensor,
    ph_f: Tensor,
}

/// A kernel's `*Problem` or `*Args` struct: the fields both kernels share, then `$field`s.
macro_rules! tn_fields {
    ($ty:ident, $p:expr $(, $field:ident: $value:expr)*) => {
        $ty {
            ka: $p.a.width as u32,
            n: $p.b.width as u32,
            lda: $p.a.ld() as u32,
            ldb: $p.b.ld() as u32,
            a_col: $p.a.col as u32,
            b_col: $p.b.col as u32,
            experts: $p.groups.experts as u32,
            max_rows: $p.groups.max_rows as u32,
            a_f32: $p.a_f32,
            b_f32: $p.b_f32,
            $($field: $value,)*
        }
    };
}

impl<'a> TnProblem<'a> {
    fn new(
        a: ColumnWindow<'a>,
        b: ColumnWindow<'a>,
        groups: &'a RowGroups,
        dtype: DType,
    ) -> Result<Self> {
        let client = a.t.client();
        Ok(TnProblem {
            a,
            b,
            groups,
            dtype,
            a_f32: a.t.dtype() != dtype,
            b_f32: b.t.dtype() != dtype,
            ph: Tensor::empty(client, DType::F32, &[4])?,
            ph_f: Tensor::empty(client, dtype, &[4])?,
        })
    }

    fn output(&self) -> Result<Tensor> {
        let shape = [self.groups.experts, self.a.width, self.b.width];
        Tensor::empty(self.a.t.client(), self.dtype, &shape)
    }

    /// The staged kernel's configurations, then the vector kernel's where they fit.
    fn candidates(&self) -> Vec<GroupedTnConfig> {
        let client = self.a.t.client();
        let staged = GroupedMatmulTn::space(client, &tn_fields!(GroupedMatmulTnProblem, self));
        let vec4 = GroupedMatmulTnV4::space(client, &tn_fields!(GroupedMatmulTnV4Problem, self));
        (staged.into_iter().map(GroupedTnConfig::Staged))
            .chain(vec4.into_iter().map(GroupedTnConfig::Vec4))
            .collect()
    }

    /// Launches `cfg` into a new output.
    fn launch(&self, cfg: &GroupedTnConfig) -> Result<Tensor> {
        let client = self.a.t.client();
        let c = self.output()?;
        // A window in f32 binds `x32` (and a placeholder for `x`), else `x`.
        let (a, a32) = match self.a_f32 {
            true => (&self.ph_f, self.a.t),
            false => (self.a.t, &self.ph),
        };
        let (b, b32) = match self.b_f32 {
            true => (&self.ph_f, self.b.t),
            false => (self.b.t, &self.ph),
        };
        let (row_start, row_count) = (&self.groups.start, &self.groups.count);
        match cfg {
            GroupedTnConfig::Staged(cfg) => GroupedMatmulTn::launch(
                client,
                cfg,
                &tn_fields!(GroupedMatmulTnArgs, self, a: a, a32: a32, b: b, b32: b32,
                    row_start: row_start, row_count: row_count, c: &c),
            )?,
            GroupedTnConfig::Vec4(cfg) => GroupedMatmulTnV4::launch(
                client,
                cfg,
                &tn_fields!(GroupedMatmulTnV4Args, self, a: a, a32: a32, b: b, b32: b32,
                    row_start: row_start, row_count: row_count, c: &c),
            )?,
        }
        Ok(c)
    }
}

/// Declares a weight-gradient kernel with the signature both share (`a`, `b` as
/// `$operand`, their f32 forms as `$operand32`, `c` as `$operand`): its `#[kernel]`
/// sections beyond the shared key, grid, cube and defaults, then its body.
macro_rules! tn_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<[$($operand:tt)*], [$($operand32:tt)*]> $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(
            key(ka = pow2, n = pow2, max_rows = pow2, experts = pow2, dtype),
            grid = (n.div_ceil(BN), ka.div_ceil(BM), experts),
            cube = ((BM / TM) * (BN / TN)),
            defaults(a_f32 = false, b_f32 = false),
            $($attr)*
        )]
        pub fn $name<F: Float>(
            a: &Array<$($operand)*>,
            a32: &Array<$($operand32)*>,
            b: &Array<$($operand)*>,
            b32: &Array<$($operand32)*>,
            row_start: &Array<u32>,
            row_count: &Array<u32>,
            c: &mut Array<$($operand)*>,
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
        ) $body
    };
}

tn_kernel! {
    /// `c[g] = a_g^T b_g` over group `g`'s rows `row_start[g] ..`, with `a_g` element (row
    /// t, i) at `a[t lda + a_col + i]` (`i < ka`) and `b_g` (t, j) at `b[t ldb + b_col + j]`
    /// (`j < n`): one cube per (column tile, row tile of Ka, group) walks the group's rows in
    /// `BK` slices staged through shared memory as 4-wide vectors, f32 accumulators; a
    /// group without rows writes zeros. The rows are the reduction, so no two cubes add
    /// into one output: no atomics.
    #[kernel(
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
    )]
    grouped_matmul_tn<[F], [f32]> {
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
}

tn_kernel! {
    /// [`grouped_matmul_tn`] with 4-wide vectors straight from global memory (no shared
    /// memory, no barriers: the CPU-adapter path, as `matmul_vec4`): a unit owns `TM` rows of
    /// `c` (`TM / 4` vectors of `a`'s window, four adjacent output rows each) and `TN` columns
    /// (`TN / 4` vectors of `b`'s), both strided across the cube and clamped past the edges
    /// (computed, never stored), and walks its group's rows: per row `TM / 4 + TN / 4` vector
    /// loads for `TM x TN` FMAs (an outer product; the staged kernel reads every row twice,
    /// through shared memory). Four rows at a time, each accumulator through the four in
    /// order (`tn_rows`), then one at a time. Windows, leading dimensions and widths must be
    /// multiples of 4.
    #[kernel(
        tune((BM, BN, TM, TN, SHARE) = [
                (64, 64, 8, 8, 1),
                (64, 128, 8, 16, 1),
                (128, 128, 16, 16, 1),
                (32, 64, 8, 8, 1),
                // Few columns (MoE's `d_w_gate = x^T d_logits`, N = the experts).
                (128, 8, 16, 8, 1),
                // A plane of 8 shares its rows of `a` (`matmul_vec4_plane`'s scheme).
                (64, 128, 64, 16, 8),
                (32, 128, 32, 16, 8),
                (64, 64, 64, 8, 8),
            ]),
        require(shares_rows(device, SHARE, BN, TM, TN),
            SHARE == 1 || TM % (4 * SHARE) == 0,
            BM % TM == 0,
            BN % TN == 0,
            TM % 4 == 0,
            TN % 4 == 0,
            ka % 4 == 0,
            n % 4 == 0,
            lda % 4 == 0,
            ldb % 4 == 0,
            a_col % 4 == 0,
            b_col % 4 == 0,
            TM * TN <= 64 || (ka >= BM && n >= BN)),
    )]
    grouped_matmul_tn_v4<[Vector<F, Const<4>>], [Vector<f32, Const<4>>]> {
        let e = CUBE_POS_Z;
        let start = row_start[e as usize];
        let end = start + row_count[e as usize];
        let units_x = comptime!(BN / TN);
        let units_y = comptime!(BM / TM);
        let (tmv, tnv) = comptime!((TM / 4, TN / 4));
        let (ty, tx) = (UNIT_POS / units_x, UNIT_POS % units_x);
        let (kav, nv) = (ka / 4, n / 4);
        let rv0 = CUBE_POS_Y * (BM / 4) + ty;
        let cv0 = CUBE_POS_X * (BN / 4) + tx;
        let mut rv = Array::<u32>::new(comptime!(tmv as usize));
        clamped_strided(&mut rv, rv0, units_y, kav - 1, tmv);
        let mut cv = Array::<u32>::new(comptime!(tnv as usize));
        clamped_strided(&mut cv, cv0, units_x, nv - 1, tnv);
        // Row t of a's window starts at vector t ldav + a0, of b's at t ldbv + b0.
        let (ldav, a0, ldbv, b0) = (lda / 4, a_col / 4, ldb / 4, b_col / 4);
        // With SHARE = 8 the plane (one `ty`, the eight `tx`) needs the same vectors of `a`:
        // lane `l` reads vectors `l, l + 8, ..` of the tile (`own`), the rest come by shuffles.
        let owned = comptime!(if SHARE > 1 { tmv / SHARE } else { 1 });
        let mut own = Array::<u32>::new(comptime!(owned as usize));
        if comptime!(SHARE > 1) {
            clamped_strided(
                &mut own,
                rv0 + UNIT_POS_PLANE * units_y,
                SHARE * units_y,
                kav - 1,
                owned,
            );
        }
        let mut acc = Array::<V4>::new(comptime!((TM * tnv) as usize));
        zero_tile_v4(&mut acc, TM * tnv);
        let mut t = start;
        while t + 4 <= end {
            tn_rows::<F>(
                &mut acc, a, a32, b, b32, &rv, &own, &cv, ldav, a0, ldbv, b0, t, 4u32, tmv, tnv,
                SHARE, a_f32, b_f32,
            );
            t += 4;
        }
        while t < end {
            tn_rows::<F>(
                &mut acc, a, a32, b, b32, &rv, &own, &cv, ldav, a0, ldbv, b0, t, 1u32, tmv, tnv,
                SHARE, a_f32, b_f32,
            );
            t += 1;
        }
        #[unroll]
        for i in 0..tmv {
            let rvec = rv0 + i * units_y;
            #[unroll]
            for l in 0..4u32 {
                #[unroll]
                for jv in 0..tnv {
                    let cvec = cv0 + jv * units_x;
                    if rvec < kav && cvec < nv {
                        let v = acc[((i * 4 + l) * tnv + jv) as usize];
                        c[((e * ka + rvec * 4 + l) * nv + cvec) as usize] =
                            Vector::<F, Const<4>>::cast_from(v);
                    }
                }
            }
        }
    }
}

/// `depth` rows `t ..` of the group into the unit's tile: `acc[4 i + l, jv] += Σ_d
/// a[t + d, vector rv[i]][l] b[t + d, vector cv[jv]]`, the products added in row order.
/// Each row's vectors are loaded first, then each accumulator goes through the `depth`
/// rows in a row (one load, blend and store of it per `depth` products on a CPU adapter,
/// as `fma_k_quad`). With `share > 1` the unit loads only its `own` vectors of `a` and
/// the plane exchanges them (`plane_rows`; uniform control flow: the group's rows are the
/// cube's).
#[cube]
#[allow(clippy::too_many_arguments)]
fn tn_rows<F: Float>(
    acc: &mut Array<V4>,
    a: &Array<Vector<F, Const<4>>>,
    a32: &Array<V4>,
    b: &Array<Vector<F, Const<4>>>,
    b32: &Array<V4>,
    rv: &Array<u32>,
    own: &Array<u32>,
    cv: &Array<u32>,
    ldav: u32,
    a0: u32,
    ldbv: u32,
    b0: u32,
    t: u32,
    #[comptime] depth: u32,
    #[comptime] tmv: u32,
    #[comptime] tnv: u32,
    #[comptime] share: u32,
    #[comptime] a_f32: bool,
    #[comptime] b_f32: bool,
) {
    let mut aq = Array::<V4>::new(comptime!((depth * tmv) as usize));
    let mut bq = Array::<V4>::new(comptime!((depth * tnv) as usize));
    #[unroll]
    for d in 0..depth {
        if comptime!(share > 1) {
            let owned = comptime!(tmv / share);
            let mut mine = Array::<V4>::new(comptime!(owned as usize));
            #[unroll]
            for q in 0..owned {
                let at = (t + d) * ldav + a0 + own[q as usize];
                mine[q as usize] = load_v4::<F>(a, a32, at, a_f32);
            }
            let mut row = Array::<V4>::new(comptime!(tmv as usize));
            plane_rows(&mut row, &mine, tmv, 1u32);
            #[unroll]
            for i in 0..tmv {
                aq[(d * tmv + i) as usize] = row[i as usize];
            }
        } else {
            #[unroll]
            for i in 0..tmv {
                let at = (t + d) * ldav + a0 + rv[i as usize];
                aq[(d * tmv + i) as usize] = load_v4::<F>(a, a32, at, a_f32);
            }
        }
        #[unroll]
        for jv in 0..tnv {
            let at = (t + d) * ldbv + b0 + cv[jv as usize];
            bq[(d * tnv + jv) as usize] = load_v4::<F>(b, b32, at, b_f32);
        }
    }
    #[unroll]
    for i in 0..tmv {
        #[unroll]
        for l in 0..4u32 {
            #[unroll]
            for jv in 0..tnv {
                let x = ((i * 4 + l) * tnv + jv) as usize;
                let mut s = acc[x];
                #[unroll]
                for d in 0..depth {
                    let p = aq[(d * tmv + i) as usize];
                    s += V4::new(p[l as usize]) * bq[(d * tnv + jv) as usize];
                }
                acc[x] = s;
            }
        }
    }
}

/// Vector `at` of `x` (or of `x32` with `x_f32`), in f32.
#[cube]
pub(crate) fn load_v4<F: Float>(
    x: &Array<Vector<F, Const<4>>>,
    x32: &Array<V4>,
    at: u32,
    #[comptime] x_f32: bool,
) -> V4 {
    if comptime!(x_f32) {
        x32[at as usize]
    } else {
        V4::cast_from(x[at as usize])
    }
}
