//! Dispatch and combine, forward and backward, as gathers (WGSL has no float atomics):
//! dispatch and the expert-output gradient read each slot's route from the slot ->
//! route map; combine, the input gradient and the gate gradient read each token's k
//! routes. Every sum runs over the choices in order: deterministic.
#![allow(clippy::manual_div_ceil)] // kernel code: `(a + b - 1) / b` is what the emitted code does, written as such

use super::routing::{MoeRouting, RowLayout, NO_ROUTE};
use crate::launch::{check_input, shape_err};
use cubecl::prelude::*;
use kiln_dsl::{linear_unit, V4};
use kiln_runtime::{DType, Result, Tensor};

/// `[S, M]` rows of a routing's tokens: checks `x` and returns `M`.
fn check_tokens(name: &str, x: &Tensor, routing: &MoeRouting) -> Result<usize> {
    check_input(name, x, routing.expert_ids.client())?;
    let &[s, m] = x.shape() else {
        return Err(shape_err(name, "[S, M]".into(), x.shape()));
    };
    if s != routing.tokens() {
        return Err(shape_err(
            name,
            format!("[{}, M] (S of expert_ids)", routing.tokens()),
            x.shape(),
        ));
    }
    Ok(m)
}

/// Checks expert rows `[E, C, M]` of the capacity layout and returns `M`.
fn check_slots(name: &str, t: &Tensor, routing: &MoeRouting) -> Result<usize> {
    check_input(name, t, routing.expert_ids.client())?;
    let (e, c) = (routing.num_experts, routing.capacity);
    match *t.shape() {
        [te, tc, m] if te == e && tc == c => Ok(m),
        _ => Err(shape_err(
            name,
            format!("[{e}, {c}, M] (num_experts, capacity)"),
            t.shape(),
        )),
    }
}

/// Gathers `src` rows into the rows of `layout`: row `j` gets token `route / k`'s row of
/// `src` (times its gate with `scaled`) or zeros. Returns `[rows, M]`.
pub(super) fn gather_into_layout(
    src: &Tensor,
    routing: &MoeRouting,
    layout: RowLayout,
    scaled: bool,
) -> Result<Tensor> {
    let (rows, _) = routing.rows(layout);
    if rows * src.shape()[1] == 0 {
        return Tensor::empty(src.client(), src.dtype(), &[rows, src.shape()[1]]);
    }
    let (map, _) = routing.slot_routes(layout)?;
    let gates = if scaled { Some(routing.gates()?) } else { None };
    gather_by_map(src, &map, rows, routing.top_k(), gates)
}

/// `out[j] = w * src[map[j] / top_k]` for `j < rows` (`map` u32, [`NO_ROUTE`] for a
/// zero row; `w` = `gates[map[j]]` when given, else 1): `[rows, M]` in src's dtype.
pub(super) fn gather_by_map(
    src: &Tensor,
    map: &Tensor,
    rows: usize,
    top_k: usize,
    gates: Option<&Tensor>,
) -> Result<Tensor> {
    let client = src.client();
    let m = src.shape()[1];
    let out = Tensor::empty(client, src.dtype(), &[rows, m])?;
    if rows * m == 0 {
        return Ok(out);
    }
    if src.numel() == 0 {
        // No source rows (an expert-parallel rank that holds no tokens, or receives no
        // rows): every map entry is `NO_ROUTE`, so the result is zeros. A launch would
        // bind an empty tensor's one-element placeholder as vectors, which wgpu refuses.
        return Tensor::zeros(client, src.dtype(), &[rows, m]);
    }
    let ph = crate::launch::absent(client)?;
    let gates_or = gates.unwrap_or(&ph);
    if m.is_multiple_of(4) {
        // Four elements per access (a CPU adapter's memory loop is per access).
        MoeGatherRowsV4::tuned(
            client,
            0.0,
            &MoeGatherRowsV4Args {
                src,
                gates: gates_or,
                slot_route: map,
                out: &out,
                rows: rows as u32,
                cols: (m / 4) as u32,
                top_k: top_k as u32,
                scaled: gates.is_some(),
            },
        )?;
        return Ok(out);
    }
    MoeGatherRows::tuned(
        client,
        0.0,
        &MoeGatherRowsArgs {
            src,
            gates: gates_or,
            slot_route: map,
            out: &out,
            len: (rows * m) as u32,
            cols: m as u32,
            top_k: top_k as u32,
            scaled: gates.is_some(),
        },
    )?;
    Ok(out)
}

/// Sums each token's routes' rows of `src` (in `layout`, or indexed by route with
/// `by_route`), weighted by the gates with `weighted`: `[S, M]` in `src`'s dtype.
pub(super) fn combine_from_layout(
    src: &Tensor,
    routing: &MoeRouting,
    layout: RowLayout,
    weighted: bool,
    by_route: bool,
) -> Result<Tensor> {
    let client = src.client();
    let (s, m) = (routing.tokens(), src.shape()[src.rank() - 1]);
    let out = Tensor::empty(client, src.dtype(), &[s, m])?;
    if s * m == 0 {
        return Ok(out);
    }
    if src.numel() == 0 {
        // No rows at all (capacity 0: every route dropped): the sums are zeros. A launch
        // would bind the empty tensor's placeholder as vectors, which wgpu refuses.
        return Tensor::zeros(client, src.dtype(), &[s, m]);
    }
    // The experts' first rows, on the device once per routing (not uploaded per call).
    let (_, row_base) = routing.slot_routes(layout)?;
    let gates = match weighted {
        true => routing.gates()?.clone(),
        false => crate::launch::absent(client)?,
    };
    let top_k = routing.top_k() as u32;
    if m % 4 == 0 {
        MoeCombineRowsV4::tuned(
            client,
            0.0,
            &MoeCombineRowsV4Args {
                src,
                gates: &gates,
                expert_ids: &routing.expert_ids,
                locations: &routing.locations,
                row_base: &row_base,
                out: &out,
                tokens: s as u32,
                cols: (m / 4) as u32,
                top_k,
                weighted,
                by_route,
            },
        )?;
        return Ok(out);
    }
    MoeCombineRows::tuned(
        client,
        0.0,
        &MoeCombineRowsArgs {
            src,
            gates: &gates,
            expert_ids: &routing.expert_ids,
            locations: &routing.locations,
            row_base: &row_base,
            out: &out,
            len: (s * m) as u32,
            cols: m as u32,
            top_k,
            weighted,
            by_route,
        },
    )?;
    Ok(out)
}

/// Dispatch: `x` `[S, M]` into the capacity layout `[E, C, M]` (x's dtype): slot
/// `(e, loc)` holds its token's row, empty slots are zero.
pub fn moe_dispatch(x: &Tensor, routing: &MoeRouting) -> Result<Tensor> {
    let m = check_tokens("x", x, routing)?;
    gather_into_layout(x, routing, RowLayout::Capacity, false)?.reshape(&[
        routing.num_experts,
        routing.capacity,
        m,
    ])
}

/// Combine: `y[s] = sum_i keep_i g_i expert_out[I_i, loc_i]` from `expert_out`
/// `[E, C, M]`; `[S, M]` in expert_out's dtype (f32 accumulation). Needs the gates.
pub fn moe_combine(expert_out: &Tensor, routing: &MoeRouting) -> Result<Tensor> {
    check_slots("expert_out", expert_out, routing)?;
    routing.gates()?;
    combine_from_layout(expert_out, routing, RowLayout::Capacity, true, false)
}

/// The gradient of dispatch: `dx[s] = sum_i keep_i d_dispatched[I_i, loc_i]`
/// (`d_dispatched` `[E, C, M]`; `[S, M]` in its dtype).
pub fn moe_dispatch_backward(d_dispatched: &Tensor, routing: &MoeRouting) -> Result<Tensor> {
    check_slots("d_dispatched", d_dispatched, routing)?;
    combine_from_layout(d_dispatched, routing, RowLayout::Capacity, false, false)
}

/// The gradients of combine from `dy` `[S, M]`: `d_expert_out` `[E, C, M]` (dy's
/// dtype; `g_i dy[s]` in a kept route's slot, zero in empty ones) and `d_gates`
/// `[S, k]` f32 (`<dy[s], expert_out[I_i, loc_i]>`, zero for a dropped route).
pub fn moe_combine_backward(
    dy: &Tensor,
    expert_out: &Tensor,
    routing: &MoeRouting,
) -> Result<(Tensor, Tensor)> {
    let m = check_tokens("dy", dy, routing)?;
    let me = check_slots("expert_out", expert_out, routing)?;
    expert_out.expect_dtype("expert_out", &[dy.dtype()])?;
    if me != m {
        return Err(shape_err(
            "expert_out",
            format!("[E, C, {m}] (M of dy)"),
            expert_out.shape(),
        ));
    }
    let d_out = gather_into_layout(dy, routing, RowLayout::Capacity, true)?.reshape(&[
        routing.num_experts,
        routing.capacity,
        m,
    ])?;
    let d_gates = gate_grads(dy, expert_out, routing, RowLayout::Capacity, false)?;
    Ok((d_out, d_gates))
}

/// `d_gates[s, i] = keep_i <dy[s], rows[row(s, i)]>` with `rows` in `layout`, or
/// indexed by route (`[S k, M]`) with `by_route`.
pub(super) fn gate_grads(
    dy: &Tensor,
    rows: &Tensor,
    routing: &MoeRouting,
    layout: RowLayout,
    by_route: bool,
) -> Result<Tensor> {
    let client = dy.client();
    let (s, k) = (routing.tokens(), routing.top_k());
    let d_gates = Tensor::empty(client, DType::F32, &[s, k])?;
    if s * k == 0 {
        return Ok(d_gates);
    }
    if rows.numel() == 0 {
        // No rows (capacity 0): every route is dropped, its gradient zero.
        return Tensor::zeros(client, DType::F32, &[s, k]);
    }
    let (_, base) = routing.rows(layout);
    let base: Vec<u32> = base.iter().map(|&b| b as u32).collect();
    let row_base = crate::launch::upload_u32(client, "row_base", &base)?;
    MoeGateGrads::tuned(
        client,
        0.0,
        &MoeGateGradsArgs {
            dy,
            rows,
            expert_ids: &routing.expert_ids,
            locations: &routing.locations,
            row_base: &row_base,
            d_gates: &d_gates,
            routes: (s * k) as u32,
            cols: dy.shape()[1] as u32,
            top_k: k as u32,
            by_route,
        },
    )?;
    Ok(d_gates)
}

/// `out[j, c] = w * src[route / k, c]` for the route filling row `j` (`w` its gate with
/// `scaled`, else 1), zero for an empty row; one element per unit, grid-stride.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, cols = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    defaults(scaled = false)
)]
pub fn moe_gather_rows<F: Float>(
    src: &Array<F>,
    gates: &Array<f32>,
    slot_route: &Array<u32>,
    out: &mut Array<F>,
    len: u32,
    cols: u32,
    top_k: u32,
    #[comptime] scaled: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut at = linear_unit() as u32;
    while at < len {
        let route = slot_route[(at / cols) as usize];
        let mut v = F::new(0.0);
        if route != comptime!(NO_ROUTE) {
            v = src[((route / top_k) * cols + at % cols) as usize];
            if comptime!(scaled) {
                v = F::cast_from(gates[route as usize] * f32::cast_from(v));
            }
        }
        out[at as usize] = v;
        at = kiln_dsl::grid_stride_next(at, stride, len);
    }
}

/// `out[s, c] = sum_i keep_i w_i src[row_i, c]` over token `s`'s routes in order (f32
/// accumulation): `row_i = row_base[I_i] + loc_i`, or the route `s k + i` itself with
/// `by_route`; `w_i` the gate with `weighted`, else 1. One element per unit.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(len = pow2, cols = pow2, dtype),
    grid = (len.div_ceil(UNITS).min(65_535), len.div_ceil(UNITS).div_ceil(65_535).min(65_535)),
    cube = UNITS,
    defaults(weighted = false, by_route = false)
)]
pub fn moe_combine_rows<F: Float>(
    src: &Array<F>,
    gates: &Array<f32>,
    expert_ids: &Array<i32>,
    locations: &Array<i32>,
    row_base: &Array<u32>,
    out: &mut Array<F>,
    len: u32,
    cols: u32,
    top_k: u32,
    #[comptime] weighted: bool,
    #[comptime] by_route: bool,
) {
    let stride = CUBE_COUNT_X * CUBE_COUNT_Y * UNITS;
    let mut at = linear_unit() as u32;
    while at < len {
        let s = at / cols;
        let c = at % cols;
        let mut acc = 0.0f32;
        for i in 0..top_k {
            let r = s * top_k + i;
            let loc = locations[r as usize];
            if loc >= 0 {
                let mut row = r;
                if comptime!(!by_route) {
                    row = row_base[expert_ids[r as usize] as usize] + loc as u32;
                }
                let mut v = f32::cast_from(src[(row * cols + c) as usize]);
                if comptime!(weighted) {
                    v *= gates[r as usize];
                }
                acc += v;
            }
        }
        out[at as usize] = F::cast_from(acc);
        at = kiln_dsl::grid_stride_next(at, stride, len);
    }
}

/// `d_gates[r] = <dy[r / k], rows[row_base[I] + loc]>` (or `rows[r]` with `by_route`)
/// for a kept route `r`, else 0: one unit per route, the dot product in order (f32).
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(routes = pow2, cols = pow2, dtype),
    grid = cubes(routes.div_ceil(UNITS)),
    cube = UNITS,
    defaults(by_route = false)
)]
pub fn moe_gate_grads<F: Float>(
    dy: &Array<F>,
    rows: &Array<F>,
    expert_ids: &Array<i32>,
    locations: &Array<i32>,
    row_base: &Array<u32>,
    d_gates: &mut Array<f32>,
    routes: u32,
    cols: u32,
    top_k: u32,
    #[comptime] by_route: bool,
) {
    let r = linear_unit() as u32;
    if r < routes {
        let loc = locations[r as usize];
        let mut acc = 0.0f32;
        if loc >= 0 {
            let mut row = r;
            if comptime!(!by_route) {
                row = row_base[expert_ids[r as usize] as usize] + loc as u32;
            }
            let (a, b) = ((r / top_k) * cols, row * cols);
            for c in 0..cols {
                acc +=
                    f32::cast_from(dy[(a + c) as usize]) * f32::cast_from(rows[(b + c) as usize]);
            }
        }
        d_gates[r as usize] = acc;
    }
}

/// `moe_gather_rows` four elements at a time (`M % 4 == 0`; `cols` counts 4-wide
/// vectors), without loops: each unit copies `PER` vectors of one row, `span =
/// ceil(cols / PER)` apart (neighbouring units touch neighbouring vectors), so a row's
/// route is read once per `PER` vectors. Why no grid-stride loop: on lavapipe the loop
/// version (a cube per row walking its columns) ran at 0.51 of a 4-wide copy, this form
/// at 0.91 (PER = 4, S = 2048, M = 512, E = 8, k = 2, the same run).
#[kiln_macros::kernel(
    tune(UNITS = [256], PER = [4, 16]),
    key(rows = pow2, cols = pow2, dtype),
    grid = cubes((rows * cols.div_ceil(PER)).div_ceil(UNITS)),
    cube = UNITS,
    domain(top_k = 1..=8),
    defaults(scaled = false)
)]
pub fn moe_gather_rows_v4<F: Float>(
    src: &Array<Vector<F, Const<4>>>,
    gates: &Array<f32>,
    slot_route: &Array<u32>,
    out: &mut Array<Vector<F, Const<4>>>,
    rows: u32,
    cols: u32,
    #[comptime] top_k: u32,
    #[comptime] scaled: bool,
) {
    let span = (cols + PER - 1) / PER;
    let unit = linear_unit() as u32;
    let r = unit / span;
    let first = unit - r * span;
    let inside = r < rows;
    let route = slot_route[select(inside, r, 0u32) as usize];
    let kept = route != comptime!(NO_ROUTE);
    let from = (route / top_k) * cols;
    let mut w = 1.0f32;
    if comptime!(scaled) {
        w = select(kept, gates[select(kept, route, 0u32) as usize], 0.0f32);
    }
    // The load under `kept` alone (the column clamped into the row), the store under the
    // bounds: branches side by side, not nested, measured faster on lavapipe.
    #[unroll]
    for j in 0..PER {
        let c = first + j * span;
        let mut v = Vector::<F, Const<4>>::cast_from(V4::new(0.0f32));
        if kept {
            v = src[(from + select(c < cols, c, 0u32)) as usize];
            if comptime!(scaled) {
                v = Vector::<F, Const<4>>::cast_from(V4::cast_from(v) * V4::new(w));
            }
        }
        if inside && c < cols {
            out[(r * cols + c) as usize] = v;
        }
    }
}

/// `moe_combine_rows` four elements at a time (`M % 4 == 0`; `cols` counts 4-wide
/// vectors), f32 accumulation, without loops: each unit sums `PER` vectors of one
/// token, `span = ceil(cols / PER)` apart, its routes read once per `PER` vectors (the
/// loop version, a cube per token walking its columns, ran at 0.67 of a 4-wide copy's
/// time on lavapipe; this one at 1.4, PER = 4, same run). PER = 16 reads the routes a
/// quarter as often: 2.42 against 2.85 ms at S = 2048, M = 512, k = 2 on lavapipe.
#[kiln_macros::kernel(
    tune(UNITS = [256], PER = [4, 16]),
    key(tokens = pow2, cols = pow2, dtype),
    grid = cubes((tokens * cols.div_ceil(PER)).div_ceil(UNITS)),
    cube = UNITS,
    domain(top_k = 1..=8),
    defaults(weighted = false, by_route = false)
)]
pub fn moe_combine_rows_v4<F: Float>(
    src: &Array<Vector<F, Const<4>>>,
    gates: &Array<f32>,
    expert_ids: &Array<i32>,
    locations: &Array<i32>,
    row_base: &Array<u32>,
    out: &mut Array<Vector<F, Const<4>>>,
    tokens: u32,
    cols: u32,
    #[comptime] top_k: u32,
    #[comptime] weighted: bool,
    #[comptime] by_route: bool,
) {
    let span = (cols + PER - 1) / PER;
    let unit = linear_unit() as u32;
    let s = unit / span;
    let first = unit - s * span;
    let inside = s < tokens;
    let token = select(inside, s, 0u32);
    // `top_k` is comptime: the loops over routes unroll and `rows`/`weights` stay in
    // registers (a runtime k put them in memory: half the bandwidth on lavapipe).
    let mut rows = Array::<u32>::new(comptime!(top_k as usize));
    let mut weights = Array::<f32>::new(comptime!(top_k as usize));
    #[unroll]
    for i in 0..top_k {
        let r = token * top_k + i;
        let loc = locations[r as usize];
        let mut row = r;
        if comptime!(!by_route) {
            row = row_base[expert_ids[r as usize] as usize] + select(loc >= 0, loc as u32, 0u32);
        }
        let mut w = 1.0f32;
        if comptime!(weighted) {
            w = gates[r as usize];
        }
        rows[i as usize] = select(loc >= 0, row * cols, comptime!(NO_ROUTE));
        weights[i as usize] = w;
    }
    // Route-major: one branch per route (not per route and vector), the column clamped
    // into the row instead of a branch around the loads, only the stores guarded: on
    // lavapipe every branch runs masked (0.90-0.99 of a copy's time with the branches
    // nested per vector, 1.01-1.12 so).
    let mut acc = Array::<V4>::new(comptime!(PER as usize));
    #[unroll]
    for j in 0..PER {
        acc[j as usize] = V4::new(0.0f32);
    }
    #[unroll]
    for i in 0..top_k {
        let at = rows[i as usize];
        if at != comptime!(NO_ROUTE) {
            let w = V4::new(weights[i as usize]);
            #[unroll]
            for j in 0..PER {
                let c = first + j * span;
                let c = select(c < cols, c, 0u32);
                acc[j as usize] += V4::cast_from(src[(at + c) as usize]) * w;
            }
        }
    }
    #[unroll]
    for j in 0..PER {
        let c = first + j * span;
        if inside && c < cols {
            out[(s * cols + c) as usize] = Vector::<F, Const<4>>::cast_from(acc[j as usize]);
        }
    }
}
