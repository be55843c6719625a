//! The grouped expert FFN `act(D_e W1_e + b1_e) W2_e + b2_e`: one launch per GEMM over
//! every expert (`moe_grouped_matmul`), in the capacity layout `[E, C, M]` or the
//! sorted layout, where the second GEMM's epilogue also scales each row by its gate and
//! writes it to its route's row (the un-permute), so combine is a sum over k rows.

use super::movement::{combine_from_layout, gather_into_layout};
use super::routing::{MoeRouting, RowLayout, NO_ROUTE};
use crate::launch::{check_input, shape_err, upload_u32};
use crate::matmul::{activate, clamped_strided, zero_tile_v4, Activation};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::tune::Choice;
use kiln_runtime::{DType, Error, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Candidates change tile shapes, never the order of a dot product's terms.
const TOLERANCE: f64 = 1e-5;

/// The experts' weights: `w1` `[E, M, F]`, `w2` `[E, F, M]`, optional biases `b1`
/// `[E, F]` and `b2` `[E, M]` (all in the activations' dtype), and the activation.
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// `[E, M, F]`.
    pub w1: &'a Tensor,
    /// `[E, F]`.
    pub b1: Option<&'a Tensor>,
    /// `[E, F, M]`.
    pub w2: &'a Tensor,
    /// `[E, M]`.
    pub b2: Option<&'a Tensor>,
    /// Applied to the first GEMM's output (after `b1`).
    pub activation: Activation,
}

impl ExpertWeights<'_> {
    /// Checks the weights against `E` experts of width `m`, dtype of `like`; returns F.
    pub(super) fn check(&self, experts: usize, m: usize, like: &Tensor) -> Result<usize> {
        let client = like.client();
        for (name, t) in [("w1", self.w1), ("w2", self.w2)] {
            check_input(name, t, client)?;
            t.expect_dtype(name, &[like.dtype()])?;
        }
        let f = match *self.w1.shape() {
            [e, mm, f] if e == experts && mm == m => f,
            _ => {
                return Err(shape_err(
                    "w1",
                    format!("[{experts}, {m}, F] (E, M)"),
                    self.w1.shape(),
                ))
            }
        };
        crate::launch::expect_shape("w2", self.w2, &[experts, f, m], "[E, F, M] of w1")?;
        for (name, t, n) in [("b1", self.b1, f), ("b2", self.b2, m)] {
            if let Some(t) = t {
                check_input(name, t, client)?;
                t.expect_dtype(name, &[like.dtype()])?;
                crate::launch::expect_shape(name, t, &[experts, n], "[E, width] per expert")?;
            }
        }
        Ok(f)
    }
}

/// Each expert's rows of the grouped GEMM's left operand: `start[e] .. start[e] +
/// count[e]`.
pub(super) use crate::matmul::RowGroups as Groups;

impl Groups {
    /// The groups of a routing's layout (capacity: every slot; sorted: the kept rows).
    pub(super) fn of(a: &Tensor, routing: &MoeRouting, layout: RowLayout) -> Result<Groups> {
        let (_, start) = routing.rows(layout);
        let count = match layout {
            RowLayout::Capacity => vec![routing.capacity; routing.num_experts],
            RowLayout::Sorted => routing.rows_per_expert.clone(),
        };
        Groups::new(a, &start, &count)
    }
}

/// The arguments both grouped kernels take (their `*Args` structs share these fields;
/// `extra` adds a kernel's own).
macro_rules! grouped_args {
    ($args:ident, $p:expr, $o:expr, $c:expr, $c32:expr, $slot:expr, $gates:expr, $scatter:expr
        $(, $field:ident: $value:expr)*) => {
        $args {
            a: $o.a,
            a32: $o.a32,
            b: $o.b,
            bias: $o.bias,
            row_start: &$p.groups.start,
            row_count: &$p.groups.count,
            slot_route: $slot,
            gates: $gates,
            c: $c,
            c32: $c32,
            n: $p.n as u32,
            k: $p.k as u32,
            experts: $p.groups.experts as u32,
            max_rows: $p.groups.max_rows as u32,
            has_bias: $p.has_bias,
            act: $p.act,
            scatter: $scatter,
            a_f32: $p.a_f32,
            c_f32: $p.c_f32,
            $($field: $value,)*
        }
    };
}

/// The problem both grouped kernels' `space` reads (tuned without the scatter).
macro_rules! grouped_problem {
    ($problem:ident, $p:expr $(, $field:ident: $value:expr)*) => {
        $problem {
            n: $p.n as u32,
            k: $p.k as u32,
            experts: $p.groups.experts as u32,
            max_rows: $p.groups.max_rows as u32,
            has_bias: $p.has_bias,
            act: $p.act,
            scatter: false,
            a_f32: $p.a_f32,
            c_f32: $p.c_f32,
            $($field: $value,)*
        }
    };
}

/// A configuration of one of the grouped GEMM kernels (what the autotuner picks
/// among): `Staged` stages K through shared memory (the GPU path), `Vec4` reads both
/// operands as 4-wide vectors straight from global memory (K and N multiples of 4, no
/// `trans_b`: the CPU-adapter path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupedConfig {
    /// `moe_grouped_matmul`.
    Staged(MoeGroupedMatmulConfig),
    /// `moe_grouped_matmul_v4`.
    Vec4(MoeGroupedMatmulV4Config),
}

impl GroupedConfig {
    /// The kernel and its tunables (tune tables).
    pub fn label(&self) -> String {
        match self {
            GroupedConfig::Staged(c) => format!("staged {}", MoeGroupedMatmul::label(c)),
            GroupedConfig::Vec4(c) => format!("vec4 {}", MoeGroupedMatmulV4::label(c)),
        }
    }
}

/// What both kernels' spaces read.
struct GroupedProblem<'a> {
    groups: &'a Groups,
    n: usize,
    k: usize,
    trans_b: bool,
    has_bias: bool,
    act: Activation,
    a_f32: bool,
    c_f32: bool,
}

impl GroupedProblem<'_> {
    /// Launches `cfg` writing `c` (f32 with `c_f32`), scattering through `scatter`.
    fn launch(
        &self,
        client: &kiln_runtime::Client,
        cfg: &GroupedConfig,
        o: &GroupedOperands<'_>,
        c: &Tensor,
        scatter: Option<&Scatter<'_>>,
        no_routes: &Tensor,
    ) -> Result<()> {
        let (c_f, c32) = if self.c_f32 {
            (o.placeholder_f, c)
        } else {
            (c, o.placeholder_32)
        };
        let (slot_route, gates) = match scatter {
            Some(s) => (s.slot_route, s.gates),
            None => (no_routes, o.placeholder_32),
        };
        let on = scatter.is_some();
        match cfg {
            GroupedConfig::Staged(cfg) => MoeGroupedMatmul::launch(
                client,
                cfg,
                &grouped_args!(MoeGroupedMatmulArgs, self, o, c_f, c32, slot_route, gates, on, trans_b: self.trans_b),
            ),
            GroupedConfig::Vec4(cfg) => MoeGroupedMatmulV4::launch(
                client,
                cfg,
                &grouped_args!(
                    MoeGroupedMatmulV4Args,
                    self,
                    o,
                    c_f,
                    c32,
                    slot_route,
                    gates,
                    on
                ),
            ),
        }
    }

    /// Staged configurations first (the reference the others are checked against),
    /// then the vector kernel's where it applies.
    fn candidates(&self, client: &kiln_runtime::Client) -> Vec<GroupedConfig> {
        let mut all: Vec<GroupedConfig> = MoeGroupedMatmul::space(
            client,
            &grouped_problem!(MoeGroupedMatmulProblem, self, trans_b: self.trans_b),
        )
        .into_iter()
        .map(GroupedConfig::Staged)
        .collect();
        if !self.trans_b {
            let p = grouped_problem!(MoeGroupedMatmulV4Problem, self);
            all.extend(
                MoeGroupedMatmulV4::space(client, &p)
                    .into_iter()
                    .map(GroupedConfig::Vec4),
            );
        }
        all
    }
}

/// Where the second GEMM's rows go in the sorted layout: row `j` scaled by the gate of
/// the route that fills it and written to that route's row of an `[S k, N]` output.
pub(super) struct Scatter<'a> {
    pub slot_route: &'a Tensor,
    pub gates: &'a Tensor,
    pub routes: usize,
}

/// `c[rows of e] = act(a[rows of e] @ b[e] + bias[e])` for every expert in one launch:
/// `a` `[R, K]` (b's dtype, or f32), `b` `[E, K, N]` (`[E, N, K]` with `trans_b`),
/// `bias` `[E, N]`; `c` `[R, N]` (f32 with `out_f32`, else b's dtype), or `[S k, N]`
/// through `scatter`.
#[allow(clippy::too_many_arguments)]
pub(super) fn grouped_matmul(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    groups: &Groups,
    n: usize,
    trans_b: bool,
    scatter: Option<&Scatter<'_>>,
    out_f32: bool,
) -> Result<Tensor> {
    let client = a.client();
    let (rows, k) = (a.shape()[0], a.shape()[1]);
    let dtype = b.dtype();
    // Half-precision experts keep the hidden activations in f32 between the GEMMs.
    let (a_f32, c_f32) = (a.dtype() != dtype, out_f32 && dtype != DType::F32);
    let out_dtype = if c_f32 { DType::F32 } else { dtype };
    if groups.max_rows == 0 || n == 0 {
        return Tensor::empty(client, out_dtype, &[scatter.map_or(rows, |s| s.routes), n]);
    }
    if groups.experts > 65_535 {
        return Err(Error::Param {
            param: "num_experts".into(),
            expected: "at most 65535 experts per grouped GEMM".into(),
            found: groups.experts.to_string(),
        });
    }
    // Four elements: the vector kernel reads its placeholders as 4-wide arrays.
    let ph = Tensor::empty(client, DType::F32, &[4])?;
    let ph_f = Tensor::empty(client, dtype, &[4])?;
    let ph_u32 = upload_u32(client, "slot_route", &[])?;
    let problem = GroupedProblem {
        groups,
        n,
        k,
        trans_b,
        has_bias: bias.is_some(),
        act,
        a_f32,
        c_f32,
    };
    let operands = GroupedOperands {
        a: if a_f32 { b } else { a },
        a32: if a_f32 { a } else { &ph },
        b,
        bias: bias.unwrap_or(b),
        placeholder_f: &ph_f,
        placeholder_32: &ph,
    };
    // Tuned on the plain store into fresh outputs (a scattering candidate leaves the
    // rows of dropped routes unwritten, so candidates could not be compared); the
    // scatter changes the epilogue's addresses, not the main loop being tuned.
    let cfg = Choice::new("moe_grouped_gemm")
        .sources([
            MoeGroupedMatmul::source_hash(),
            MoeGroupedMatmulV4::source_hash(),
        ])
        .dim("max_rows", groups.max_rows)
        .dim("n", n)
        .dim("k", k)
        .dim("experts", groups.experts)
        .exact("dtype", dtype)
        .exact("trans_b", trans_b)
        .exact("act", act)
        .candidates(problem.candidates(client))
        .tune(client, TOLERANCE, GroupedConfig::label, |cfg| {
            let c = Tensor::empty(client, out_dtype, &[rows, n])?;
            problem.launch(client, cfg, &operands, &c, None, &ph_u32)?;
            Ok(vec![c])
        })?;
    let c = Tensor::empty(client, out_dtype, &[scatter.map_or(rows, |s| s.routes), n])?;
    problem.launch(client, &cfg, &operands, &c, scatter, &ph_u32)?;
    Ok(c)
}

/// The tensors bound to a grouped GEMM: the left operand in b's dtype (`a`) or in f32
/// (`a32`), and placeholders for the unused side of each pair.
struct GroupedOperands<'a> {
    a: &'a Tensor,
    a32: &'a Tensor,
    b: &'a Tensor,
    bias: &'a Tensor,
    placeholder_f: &'a Tensor,
    placeholder_32: &'a Tensor,
}

/// The expert FFN in the capacity layout: `dispatched` `[E, C, M]` ->
/// `act(D_e W1_e + b1_e) W2_e + b2_e` `[E, C, M]` (dispatched's dtype, f32
/// accumulation), two grouped launches. Empty slots (zero rows) give `b2`'s row
/// through the FFN, as in Tutel; combine never reads them.
pub fn moe_expert_ffn(dispatched: &Tensor, w: &ExpertWeights<'_>) -> Result<Tensor> {
    check_input("dispatched", dispatched, dispatched.client())?;
    let &[e, c, m] = dispatched.shape() else {
        return Err(shape_err(
            "dispatched",
            "[E, C, M]".into(),
            dispatched.shape(),
        ));
    };
    let f = w.check(e, m, dispatched)?;
    let a = dispatched.reshape(&[e * c, m])?;
    let starts: Vec<usize> = (0..e).map(|x| x * c).collect();
    let groups = Groups::new(&a, &starts, &vec![c; e])?;
    let h = grouped_matmul(&a, w.w1, w.b1, w.activation, &groups, f, false, None, true)?;
    grouped_matmul(
        &h,
        w.w2,
        w.b2,
        Activation::None,
        &groups,
        m,
        false,
        None,
        false,
    )?
    .reshape(&[e, c, m])
}

/// The expert FFN in the sorted layout, from tokens to the combined output: `x`
/// `[S, M]` gathered into expert order (kept routes only, no padding), the two grouped
/// GEMMs, the second scaling each row by its gate and writing it to its route's row,
/// then the sum over each token's k rows: `y` `[S, M]`. Needs the routing's gates.
pub fn moe_expert_ffn_sorted(
    x: &Tensor,
    routing: &MoeRouting,
    w: &ExpertWeights<'_>,
) -> Result<Tensor> {
    check_input("x", x, x.client())?;
    let m = x.shape().get(1).copied().unwrap_or(0);
    if x.shape() != [routing.tokens(), m] {
        return Err(shape_err(
            "x",
            format!("[{}, M]", routing.tokens()),
            x.shape(),
        ));
    }
    let f = w.check(routing.num_experts, m, x)?;
    let gates = routing.gates()?;
    let d = gather_into_layout(x, routing, RowLayout::Sorted, false)?;
    let groups = Groups::of(&d, routing, RowLayout::Sorted)?;
    let h = grouped_matmul(&d, w.w1, w.b1, w.activation, &groups, f, false, None, true)?;
    let (map, _) = routing.slot_routes(RowLayout::Sorted)?;
    let scatter = Scatter {
        slot_route: &map,
        gates,
        routes: routing.tokens() * routing.top_k(),
    };
    let per_route = grouped_matmul(
        &h,
        w.w2,
        w.b2,
        Activation::None,
        &groups,
        m,
        false,
        Some(&scatter),
        false,
    )?;
    combine_from_layout(&per_route, routing, RowLayout::Sorted, false, true)
}

/// One cube per (column tile, row tile, expert): a `BM x BN` tile of expert `e`'s rows
/// `row_start[e] + CUBE_POS_Y BM ..` (tiles are cut per expert, so none straddles two
/// and cubes past an expert's last row return at once), K staged through shared memory
/// as 4-wide vectors (zero past the edges), f32 accumulators in registers. Epilogue:
/// `+ bias[e]`, the activation, then a plain store (to f32 with `c_f32`: a half
/// model's hidden activations), or with `scatter` the row's gate times the value into
/// the row of the route that fills it. `a_f32` reads the left operand from `a32`.
#[kiln_macros::kernel(
    tune((BM, BN, BK, TM, TN) = [
            (32, 64, 16, 4, 8),
            (64, 64, 16, 4, 8),
            (64, 64, 32, 8, 8),
            (16, 64, 16, 2, 8),
            (64, 128, 16, 8, 8),
        ]),
    require(BM % TM == 0,
        BN % TN == 0,
        TN % 4 == 0,
        BK % 4 == 0,
        (((BM + BN) * BK * 4) as usize) <= device.max_shared_memory),
    key(max_rows = pow2, n = pow2, k = pow2, experts = pow2, dtype),
    grid = (n.div_ceil(BN), max_rows.div_ceil(BM), experts),
    cube = ((BM / TM) * (BN / TN)),
    defaults(trans_b = false, has_bias = false, act = none, scatter = false, a_f32 = false, c_f32 = false)
)]
pub fn moe_grouped_matmul<F: Float>(
    a: &Array<F>,
    a32: &Array<f32>,
    b: &Array<F>,
    bias: &Array<F>,
    row_start: &Array<u32>,
    row_count: &Array<u32>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    c: &mut Array<F>,
    c32: &mut Array<f32>,
    n: u32,
    k: u32,
    experts: u32,
    max_rows: u32,
    #[comptime] trans_b: bool,
    #[comptime] has_bias: bool,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] a_f32: bool,
    #[comptime] c_f32: bool,
) {
    let e = CUBE_POS_Z;
    let count = row_count[e as usize];
    let tile_row = CUBE_POS_Y * BM;
    // Uniform per cube: a cube past its expert's rows skips the barriers together.
    if tile_row < count {
        let units = comptime!((BM / TM) * (BN / TN));
        let cols_of_units = comptime!(BN / TN);
        let row0 = row_start[e as usize] + tile_row;
        let rows_valid = count - tile_row;
        let col0 = CUBE_POS_X * BN;
        let cols_valid = n - col0;
        let (ty, tx) = (UNIT_POS / cols_of_units, UNIT_POS % cols_of_units);
        let mut acc = Array::<V4>::new(comptime!((TM * TN / 4) as usize));
        zero_tile_v4(&mut acc, TM * TN / 4);
        let mut xs = SharedMemory::<V4>::new(comptime!((BM * BK / 4) as usize));
        let mut ys = SharedMemory::<V4>::new(comptime!((BK * BN / 4) as usize));
        let b_base = e * k * n;
        let mut k0 = 0u32;
        while k0 < k {
            let depth = k - k0;
            // a: (row r, depth d) at a[(row0 + r) K + k0 + d].
            if comptime!(a_f32) {
                load_tile_v4::<f32>(
                    &mut xs,
                    0,
                    a32,
                    row0 * k + k0,
                    k,
                    1,
                    rows_valid,
                    depth,
                    BM,
                    BK,
                    units,
                );
            } else {
                load_tile_v4::<F>(
                    &mut xs,
                    0,
                    a,
                    row0 * k + k0,
                    k,
                    1,
                    rows_valid,
                    depth,
                    BM,
                    BK,
                    units,
                );
            }
            if comptime!(trans_b) {
                // b[e] is [N, K]: (depth d, column c) at (col0 + c) K + k0 + d.
                load_tile_v4::<F>(
                    &mut ys,
                    0,
                    b,
                    b_base + col0 * k + k0,
                    1,
                    k,
                    depth,
                    cols_valid,
                    BK,
                    BN,
                    units,
                );
            } else {
                load_tile_v4::<F>(
                    &mut ys,
                    0,
                    b,
                    b_base + k0 * n + col0,
                    n,
                    1,
                    depth,
                    cols_valid,
                    BK,
                    BN,
                    units,
                );
            }
            sync_cube();
            reg_tile_mma_v4(&mut acc, &xs, 0, &ys, 0, ty, tx, BM, BN, BK, TM, TN);
            sync_cube();
            k0 += BK;
        }
        let row_step = comptime!(BM / TM);
        #[unroll]
        for i in 0..TM {
            let r = ty + i * row_step;
            #[unroll]
            for j in 0..TN {
                let col = v4_tile_col(tx, j, BN, TN);
                if r < rows_valid && col < cols_valid {
                    let v = acc[(i * comptime!(TN / 4) + j / 4) as usize][(j % 4) as usize];
                    store_grouped::<F>(
                        c,
                        c32,
                        bias,
                        slot_route,
                        gates,
                        v,
                        row0 + r,
                        col0 + col,
                        e,
                        n,
                        has_bias,
                        act,
                        scatter,
                        c_f32,
                    );
                }
            }
        }
    }
}

/// The grouped GEMMs' epilogue for one f32 value `v` of row `row` (absolute), column
/// `col` of expert `e`: `+ bias[e, col]`, the activation, then the store: to `c` (or
/// `c32`), or with `scatter` times the gate of the route that fills the row, into that
/// route's row. The caller masks the edges.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_grouped<F: Float>(
    c: &mut Array<F>,
    c32: &mut Array<f32>,
    bias: &Array<F>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    v: f32,
    row: u32,
    col: u32,
    e: u32,
    n: u32,
    #[comptime] has_bias: bool,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] c_f32: bool,
) {
    let mut v = v;
    if comptime!(has_bias) {
        v += f32::cast_from(bias[(e * n + col) as usize]);
    }
    v = activate(v, act);
    if comptime!(scatter) {
        let route = slot_route[row as usize];
        if route != comptime!(NO_ROUTE) {
            c[(route * n + col) as usize] = F::cast_from(gates[route as usize] * v);
        }
    } else if comptime!(c_f32) {
        c32[(row * n + col) as usize] = v;
    } else {
        c[(row * n + col) as usize] = F::cast_from(v);
    }
}

/// The grouped GEMM with both operands read as 4-wide vectors straight from global
/// memory (K and N multiples of 4; no shared memory, no barriers: the CPU-adapter path,
/// as `matmul_vec4`): a `TM x TN` register tile per unit, rows clamped to the expert's
/// last row and columns to the last one (computed, never stored). Grid, groups and
/// epilogue as `moe_grouped_matmul`.
#[kiln_macros::kernel(
    tune((BM, BN, TM, TN) = [
            (64, 64, 8, 8),
            (128, 128, 16, 8),
            (64, 128, 8, 16),
            (128, 128, 16, 16),
            (32, 128, 4, 8),
            (16, 64, 4, 4),
        ]),
    require(BM % TM == 0, BN % TN == 0, TN % 4 == 0, k % 4 == 0, n % 4 == 0),
    key(max_rows = pow2, n = pow2, k = pow2, experts = pow2, dtype),
    grid = (n.div_ceil(BN), max_rows.div_ceil(BM), experts),
    cube = ((BM / TM) * (BN / TN)),
    defaults(has_bias = false, act = none, scatter = false, a_f32 = false, c_f32 = false)
)]
pub fn moe_grouped_matmul_v4<F: Float>(
    a: &Array<Vector<F, Const<4>>>,
    a32: &Array<Vector<f32, Const<4>>>,
    b: &Array<Vector<F, Const<4>>>,
    bias: &Array<F>,
    row_start: &Array<u32>,
    row_count: &Array<u32>,
    slot_route: &Array<u32>,
    gates: &Array<f32>,
    c: &mut Array<F>,
    c32: &mut Array<f32>,
    n: u32,
    k: u32,
    experts: u32,
    max_rows: u32,
    #[comptime] has_bias: bool,
    #[comptime] act: Activation,
    #[comptime] scatter: bool,
    #[comptime] a_f32: bool,
    #[comptime] c_f32: bool,
) {
    let e = CUBE_POS_Z;
    let count = row_count[e as usize];
    let tile_row = CUBE_POS_Y * BM;
    if tile_row < count {
        let units_x = comptime!(BN / TN);
        let row_step = comptime!(BM / TM);
        let tnv = comptime!(TN / 4);
        let (ty, tx) = (UNIT_POS / units_x, UNIT_POS % units_x);
        let start = row_start[e as usize];
        let row0 = start + tile_row;
        let col0 = CUBE_POS_X * BN;
        let (kv, nv) = (k / 4, n / 4);
        let b_base = e * k * nv;
        let mut rows = Array::<u32>::new(comptime!(TM as usize));
        clamped_strided(&mut rows, row0 + ty, row_step, start + count - 1, TM);
        let mut cols = Array::<u32>::new(comptime!(tnv as usize));
        clamped_strided(&mut cols, col0 / 4 + tx, units_x, nv - 1, tnv);
        let mut av = Array::<V4>::new(comptime!(TM as usize));
        let mut accv = Array::<V4>::new(comptime!((TM * tnv) as usize));
        zero_tile_v4(&mut accv, TM * tnv);
        let mut kq = 0u32;
        while kq < kv {
            #[unroll]
            for i in 0..TM {
                let at = (rows[i as usize] * kv + kq) as usize;
                if comptime!(a_f32) {
                    av[i as usize] = a32[at];
                } else {
                    av[i as usize] = V4::cast_from(a[at]);
                }
            }
            #[unroll]
            for d in 0..4u32 {
                #[unroll]
                for jv in 0..tnv {
                    let bv =
                        V4::cast_from(b[(b_base + (kq * 4 + d) * nv + cols[jv as usize]) as usize]);
                    #[unroll]
                    for i in 0..TM {
                        let x = (i * tnv + jv) as usize;
                        accv[x] += V4::new(av[i as usize][d as usize]) * bv;
                    }
                }
            }
            kq += 1;
        }
        #[unroll]
        for i in 0..TM {
            let r = ty + i * row_step;
            #[unroll]
            for j in 0..TN {
                let col = col0 + (tx + (j / 4) * units_x) * 4 + j % 4;
                if tile_row + r < count && col < n {
                    let v = accv[(i * tnv + j / 4) as usize][(j % 4) as usize];
                    store_grouped::<F>(
                        c,
                        c32,
                        bias,
                        slot_route,
                        gates,
                        v,
                        row0 + r,
                        col,
                        e,
                        n,
                        has_bias,
                        act,
                        scatter,
                        c_f32,
                    );
                }
            }
        }
    }
}
