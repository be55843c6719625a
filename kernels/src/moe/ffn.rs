//! The grouped expert FFN `act(D_e W1_e + b1_e) W2_e + b2_e`: one launch per GEMM over
//! every expert (`moe_grouped_matmul`), in the capacity layout `[E, C, M]` or the
//! sorted layout, where the second GEMM's epilogue also scales each row by its gate and
//! writes it to its route's row (the un-permute), so combine is a sum over k rows.

use super::movement::{combine_from_layout, gather_into_layout};
use super::routing::{MoeRouting, RowLayout, NO_ROUTE};
use crate::launch::{absent, check_input, shape_err, upload_u32};
use crate::matmul::{activate, Activation};
use cubecl::prelude::*;
use kiln_dsl::{load_tile_v4, reg_tile_mma_v4, v4_tile_col, V4};
use kiln_runtime::{DType, Error, Result, Tensor};

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
pub(super) struct Groups {
    start: Tensor,
    count: Tensor,
    max_rows: usize,
    experts: usize,
}

impl Groups {
    pub(super) fn new(a: &Tensor, start: &[usize], count: &[usize]) -> Result<Groups> {
        let c = a.client();
        let as_u32 = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
        Ok(Groups {
            start: upload_u32(c, "row_start", &as_u32(start))?,
            count: upload_u32(c, "row_count", &as_u32(count))?,
            max_rows: count.iter().copied().max().unwrap_or(0),
            experts: count.len(),
        })
    }

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
    let out_rows = scatter.map_or(rows, |s| s.routes);
    let dtype = b.dtype();
    // Half-precision experts keep the hidden activations in f32 between the GEMMs.
    let (a_f32, c_f32) = (a.dtype() != dtype, out_f32 && dtype != DType::F32);
    let c = Tensor::empty(client, if c_f32 { DType::F32 } else { dtype }, &[out_rows, n])?;
    if groups.max_rows == 0 || n == 0 {
        return Ok(c);
    }
    if groups.experts > 65_535 {
        return Err(Error::Param {
            param: "num_experts".into(),
            expected: "at most 65535 experts per grouped GEMM".into(),
            found: groups.experts.to_string(),
        });
    }
    let ph = absent(client)?;
    let ph_f = Tensor::empty(client, dtype, &[1])?;
    let ph_u32 = upload_u32(client, "slot_route", &[])?;
    let (a_f, a32) = if a_f32 { (b, a) } else { (a, &ph) };
    let (c_f, c32) = if c_f32 { (&ph_f, &c) } else { (&c, &ph) };
    let (slot_route, gates) = match scatter {
        Some(s) => (s.slot_route, s.gates),
        None => (&ph_u32, &ph),
    };
    MoeGroupedMatmul::tuned(
        client,
        TOLERANCE,
        &MoeGroupedMatmulArgs {
            a: a_f,
            a32,
            b,
            bias: bias.unwrap_or(b),
            row_start: &groups.start,
            row_count: &groups.count,
            slot_route,
            gates,
            c: c_f,
            c32,
            n: n as u32,
            k: k as u32,
            experts: groups.experts as u32,
            max_rows: groups.max_rows as u32,
            trans_b,
            has_bias: bias.is_some(),
            act,
            scatter: scatter.is_some(),
            a_f32,
            c_f32,
        },
    )?;
    Ok(c)
}

/// The expert FFN in the capacity layout: `dispatched` `[E, C, M]` ->
/// `act(D_e W1_e + b1_e) W2_e + b2_e` `[E, C, M]` (dispatched's dtype, f32
/// accumulation), two grouped launches. Empty slots (zero rows) give `b2`'s row
/// through the FFN, as in Tutel; combine never reads them.
pub fn moe_expert_ffn(dispatched: &Tensor, w: &ExpertWeights<'_>) -> Result<Tensor> {
    check_input("dispatched", dispatched, dispatched.client())?;
    let &[e, c, m] = dispatched.shape() else {
        return Err(shape_err("dispatched", "[E, C, M]".into(), dispatched.shape()));
    };
    let f = w.check(e, m, dispatched)?;
    let a = dispatched.reshape(&[e * c, m])?;
    let starts: Vec<usize> = (0..e).map(|x| x * c).collect();
    let groups = Groups::new(&a, &starts, &vec![c; e])?;
    let h = grouped_matmul(&a, w.w1, w.b1, w.activation, &groups, f, false, None, true)?;
    grouped_matmul(&h, w.w2, w.b2, Activation::None, &groups, m, false, None, false)?.reshape(&[e, c, m])
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
        return Err(shape_err("x", format!("[{}, M]", routing.tokens()), x.shape()));
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
    let per_route =
        grouped_matmul(&h, w.w2, w.b2, Activation::None, &groups, m, false, Some(&scatter), false)?;
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
        #[unroll]
        for z in 0..comptime!(TM * TN / 4) {
            acc[z as usize] = V4::new(0.0f32);
        }
        let mut xs = SharedMemory::<V4>::new(comptime!((BM * BK / 4) as usize));
        let mut ys = SharedMemory::<V4>::new(comptime!((BK * BN / 4) as usize));
        let b_base = e * k * n;
        let mut k0 = 0u32;
        while k0 < k {
            let depth = k - k0;
            // a: (row r, depth d) at a[(row0 + r) K + k0 + d].
            if comptime!(a_f32) {
                load_tile_v4::<f32>(&mut xs, 0, a32, row0 * k + k0, k, 1, rows_valid, depth, BM, BK, units);
            } else {
                load_tile_v4::<F>(&mut xs, 0, a, row0 * k + k0, k, 1, rows_valid, depth, BM, BK, units);
            }
            if comptime!(trans_b) {
                // b[e] is [N, K]: (depth d, column c) at (col0 + c) K + k0 + d.
                load_tile_v4::<F>(&mut ys, 0, b, b_base + col0 * k + k0, 1, k, depth, cols_valid, BK, BN, units);
            } else {
                load_tile_v4::<F>(&mut ys, 0, b, b_base + k0 * n + col0, n, 1, depth, cols_valid, BK, BN, units);
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
                    let mut v = acc[(i * comptime!(TN / 4) + j / 4) as usize][(j % 4) as usize];
                    if comptime!(has_bias) {
                        v += f32::cast_from(bias[(e * n + col0 + col) as usize]);
                    }
                    v = activate(v, act);
                    if comptime!(scatter) {
                        let route = slot_route[(row0 + r) as usize];
                        if route != comptime!(NO_ROUTE) {
                            c[(route * n + col0 + col) as usize] = F::cast_from(gates[route as usize] * v);
                        }
                    } else if comptime!(c_f32) {
                        c32[((row0 + r) * n + col0 + col) as usize] = v;
                    } else {
                        c[((row0 + r) * n + col0 + col) as usize] = F::cast_from(v);
                    }
                }
            }
        }
    }
}
