//! The whole layer `y = combine(FFN(dispatch(x)))` with its gate, on one device (the
//! capacity or the sorted path, or the faster of the two, autotuned), and expert
//! parallel: experts sharded over the ranks of a communicator, tokens exchanged with
//! two all-to-alls (uneven splits), slots counted over the global batch so that every
//! rank count gives the routing and the output of one device.

use super::ffn::{
    moe_expert_ffn, moe_expert_ffn_sorted, ExpertWeights, MoeGroupedMatmul, MoeGroupedMatmulV4,
};
use super::gate::{check_gate, moe_gate, top_k, GateOptions};
use super::movement::{
    combine_from_layout, gather_by_map, gather_into_layout, MoeCombineRows, MoeCombineRowsV4,
    MoeGatherRows, MoeGatherRowsV4,
};
use super::routing::{count_slots, locate_slots, MoeRouting, RowLayout, NO_ROUTE};
use super::{capacity_for, MoeGateLoss, MoeGateLossArgs};
use crate::launch::{check_input, on_local_ranks, shape_err, upload_u32};
use crate::matmul::{matmul, Epilogue};
use crate::rows::{copy_rows, slice_rows};
use kiln_runtime::comm::Communicator;
use kiln_runtime::tune::Choice;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Which layout the layer's experts run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoePath {
    /// The faster of the two for this device and bucketed shape (autotuned).
    Auto,
    /// `[E, C, M]`: every slot computed (empty ones too), as Tutel.
    Capacity,
    /// Kept routes sorted by expert, no padding; the gate weight and the un-permute
    /// fused into the second GEMM's epilogue.
    Dropless,
}

impl MoePath {
    /// Parses `auto | capacity | dropless`; the error names the `path` parameter.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(MoePath::Auto),
            "capacity" => Ok(MoePath::Capacity),
            "dropless" => Ok(MoePath::Dropless),
            _ => Err(Error::Param {
                param: "path".into(),
                expected: "auto | capacity | dropless".into(),
                found: s.into(),
            }),
        }
    }
}

/// Parameters of [`moe_layer`]: the gate's and the path (the activation is the
/// weights').
#[derive(Clone, Copy, Debug)]
pub struct LayerOptions {
    /// Top-k, capacity factor, renormalisation, batch priority.
    pub gate: GateOptions,
    /// Layout of the expert computation (either gives the same `y` up to rounding;
    /// drops are the capacity factor's decision, not the path's).
    pub path: MoePath,
}

/// The results of [`moe_layer`].
pub struct LayerOutput {
    /// `[S, M]` in x's dtype.
    pub y: Tensor,
    /// Scalar f32 load-balancing loss.
    pub l_aux: Tensor,
    /// The routing the layer used (this rank's tokens under expert parallelism).
    pub routing: MoeRouting,
}

/// `x @ w_gate` in f32 (`x` `[S, M]`, `w_gate` `[M, E]` in x's dtype; half precision is
/// widened first, so the logits are never rounded to it).
pub(super) fn gate_logits(x: &Tensor, w_gate: &Tensor) -> Result<Tensor> {
    check_input("x", x, x.client())?;
    check_input("w_gate", w_gate, x.client())?;
    w_gate.expect_dtype("w_gate", &[x.dtype()])?;
    let &[s, m] = x.shape() else {
        return Err(shape_err("x", "[S, M]".into(), x.shape()));
    };
    match *w_gate.shape() {
        [wm, e] if wm == m && e > 0 => e,
        _ => return Err(shape_err("w_gate", format!("[{m}, E] (M of x)"), w_gate.shape())),
    };
    if x.dtype() == DType::F32 {
        return matmul(x, w_gate, false, Epilogue::default());
    }
    let x32 = slice_rows(x, 0, 0, s, DType::F32)?;
    let w32 = slice_rows(w_gate, 0, 0, m, DType::F32)?;
    matmul(&x32, &w32, false, Epilogue::default())
}

/// The experts of one path from tokens to `y`.
fn run_path(x: &Tensor, routing: &MoeRouting, w: &ExpertWeights<'_>, path: MoePath) -> Result<Tensor> {
    match path {
        MoePath::Dropless => moe_expert_ffn_sorted(x, routing, w),
        _ => {
            let m = x.shape()[1];
            let d = gather_into_layout(x, routing, RowLayout::Capacity, false)?;
            let d = d.reshape(&[routing.num_experts, routing.capacity, m])?;
            let y_e = moe_expert_ffn(&d, w)?;
            combine_from_layout(&y_e, routing, RowLayout::Capacity, true, false)
        }
    }
}

/// The MoE layer on one device: `x` `[S, M]`, `w_gate` `[M, E]`, the experts' weights
/// (`[E, M, F]`, `[E, F, M]`, optional biases) -> `y` `[S, M]` and `l_aux`. With
/// [`MoePath::Auto`] the path is chosen by the autotuner (`moe_path` in the cache).
pub fn moe_layer(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
) -> Result<LayerOutput> {
    let logits = gate_logits(x, w_gate)?;
    let e = logits.shape()[1];
    w.check(e, x.shape()[1], x)?;
    let g = moe_gate(&logits, &opts.gate)?;
    let routing = g.routing;
    let path = match opts.path {
        MoePath::Auto => Choice::new("moe_path")
            .sources([
                MoeGroupedMatmul::source_hash(),
                MoeGroupedMatmulV4::source_hash(),
                MoeGatherRows::source_hash(),
                MoeGatherRowsV4::source_hash(),
                MoeCombineRows::source_hash(),
                MoeCombineRowsV4::source_hash(),
            ])
            .dim("tokens", routing.tokens())
            .dim("m", x.shape()[1])
            .dim("f", w.w1.shape()[2])
            .dim("experts", e)
            .exact("top_k", routing.top_k())
            .exact("capacity", if opts.gate.capacity_factor > 0.0 { "factor" } else { "dropless" })
            .exact("dtype", x.dtype())
            .candidates([MoePath::Capacity, MoePath::Dropless])
            .tune(x.client(), 1e-4, |p| format!("{p:?}").to_lowercase(), |&p| {
                Ok(vec![run_path(x, &routing, w, p)?])
            })?,
        p => p,
    };
    let y = run_path(x, &routing, w, path)?;
    Ok(LayerOutput {
        y,
        l_aux: g.l_aux,
        routing,
    })
}

/// One rank of the expert-parallel layer: this rank's tokens `x` `[S_r, M]`, the whole
/// `w_gate` `[M, E]`, and this rank's experts `E / P` (rank `r` owns experts
/// `r E/P ..`, weights `[E/P, M, F]` ...). Slots are counted over the global batch
/// (every rank's tokens in rank order, as one device would), so ids, locations, drops
/// and `y` match [`moe_layer`] on the concatenated tokens; `l_aux` is the global one on
/// every rank. Tokens travel to their experts' ranks and back with two all-to-alls.
pub fn moe_layer_expert_parallel(
    comm: &dyn Communicator,
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
) -> Result<LayerOutput> {
    let (p, rank) = (comm.world_size(), comm.rank());
    let client = x.client();
    let logits = gate_logits(x, w_gate)?;
    let (s_r, e) = check_gate(&logits, &opts.gate)?;
    let m = x.shape()[1];
    if e % p != 0 {
        return Err(Error::Param {
            param: "world_size".into(),
            expected: format!("a divisor of the expert count E = {e}"),
            found: p.to_string(),
        });
    }
    let e_local = e / p;
    w.check(e_local, m, x)?;
    if opts.gate.batch_prioritized {
        return Err(Error::Param {
            param: "batch_prioritized".into(),
            expected: "false with world_size > 1 (a global sort of every rank's tokens)".into(),
            found: "true".into(),
        });
    }
    let k = opts.gate.top_k;
    let t = top_k(&logits, s_r, e, k, opts.gate.normalize())?;
    let order = upload_u32(client, "order", &[])?;
    let counts = count_slots(client, &t.ids, &order, false, e)?;

    // Every rank's route totals per (choice, expert) and token count, in rank order.
    let width = k * e + 1;
    let mut mine: Vec<f64> = (0..k)
        .flat_map(|i| (0..e).map(move |x| (i, x)))
        .map(|(i, x)| counts.total(i, x) as f64)
        .collect();
    mine.push(s_r as f64);
    let mine = Tensor::upload(client, &HostTensor::from_f64(DType::F32, vec![1, width], &mine)?)?;
    let all = comm.all_gather(&mine)?.download()?.to_f64();
    let at = |q: usize, i: usize, x: usize| all[q * width + i * e + x] as usize;
    let s_total: usize = (0..p).map(|q| all[q * width + k * e] as usize).sum();
    let global = |i: usize, x: usize| (0..p).map(|q| at(q, i, x)).sum::<usize>();
    let per_expert: Vec<usize> = (0..e).map(|x| (0..k).map(|i| global(i, x)).sum()).collect();
    let capacity = if opts.gate.capacity_factor > 0.0 {
        capacity_for(s_total, e, k, opts.gate.capacity_factor)
    } else {
        per_expert.iter().copied().max().unwrap_or(0)
    };
    let bases = counts.bases_from(|i, x| {
        ((0..i).map(|j| global(j, x)).sum::<usize>() + (0..rank).map(|q| at(q, i, x)).sum::<usize>())
            as u32
    });
    let locations = Tensor::empty(client, DType::I32, &[s_r, k])?;
    if s_r > 0 {
        locate_slots(client, &t.ids, &order, false, &counts, &bases, capacity, &locations)?;
    }
    let routing = MoeRouting::from_gate(t.ids, locations, Some(t.gates), capacity, &per_expert);

    // l_aux = E sum_e share_e mean_s p: this rank's part, then the sum over ranks.
    let share: Vec<f64> = (0..e).map(|x| global(0, x) as f64 / s_total.max(1) as f64).collect();
    let share = Tensor::upload(client, &HostTensor::from_f64(DType::F32, vec![e], &share)?)?;
    let part = Tensor::empty(client, DType::F32, &[])?;
    MoeGateLoss::tuned(
        client,
        0.0,
        &MoeGateLossArgs {
            probs: &t.probs,
            top1_share: &share,
            l_aux: &part,
            tokens: s_r as u32,
            experts: e as u32,
        },
    )?;
    let part = part.download()?.to_f64()[0] * s_r as f64 / s_total.max(1) as f64;
    let part = Tensor::upload(client, &HostTensor::from_f64(DType::F32, vec![1], &[part])?)?;
    let l_aux = comm.all_reduce(&part)?.reshape(&[])?;

    // Kept routes grouped by their expert's rank (route order within), each with its
    // slot row in the owner's [E/P, C, M].
    let ids = routing.expert_ids.download()?.to_f64();
    let locs = routing.locations.download()?.to_f64();
    let mut by_rank: Vec<Vec<(u32, i32)>> = vec![Vec::new(); p];
    for (r, (&id, &loc)) in ids.iter().zip(&locs).enumerate() {
        if loc >= 0.0 {
            let id = id as usize;
            let slot = (id % e_local) * capacity + loc as usize;
            by_rank[id / e_local].push((r as u32, slot as i32));
        }
    }
    let send_rows: Vec<usize> = by_rank.iter().map(Vec::len).collect();
    let (routes, slots): (Vec<u32>, Vec<f64>) =
        by_rank.concat().into_iter().map(|(r, s)| (r, s as f64)).unzip();
    let send_x = gather_by_map(x, &upload_u32(client, "send_routes", &routes)?, routes.len(), k, None)?;
    let slots = Tensor::upload(client, &HostTensor::from_f64(DType::I32, vec![slots.len(), 1], &slots)?)?;
    let (recv_x, recv_rows) = comm.all_to_all(&send_x, &send_rows)?;
    let (recv_slots, _) = comm.all_to_all(&slots, &send_rows)?;
    let recv_slots: Vec<u32> = recv_slots.download()?.to_f64().iter().map(|&v| v as u32).collect();

    // The owner's capacity layout from the received rows; the FFN; the rows back.
    let mut slot_map = vec![NO_ROUTE; e_local * capacity];
    for (i, &slot) in recv_slots.iter().enumerate() {
        slot_map[slot as usize] = i as u32;
    }
    let dispatched = gather_by_map(&recv_x, &upload_u32(client, "slot_map", &slot_map)?, slot_map.len(), 1, None)?;
    let y_e = moe_expert_ffn(&dispatched.reshape(&[e_local, capacity, m])?, w)?;
    let y_e = y_e.reshape(&[e_local * capacity, m])?;
    let reply = gather_by_map(&y_e, &upload_u32(client, "reply_slots", &recv_slots)?, recv_slots.len(), 1, None)?;
    let (back, _) = comm.all_to_all(&reply, &recv_rows)?;

    // Back in send order: put each row at its route, then the gate-weighted sum.
    let mut route_map = vec![NO_ROUTE; s_r * k];
    for (j, &r) in routes.iter().enumerate() {
        route_map[r as usize] = j as u32;
    }
    let per_route = gather_by_map(&back, &upload_u32(client, "route_map", &route_map)?, s_r * k, 1, None)?;
    let y = combine_from_layout(&per_route, &routing, RowLayout::Capacity, true, true)?;
    Ok(LayerOutput { y, l_aux, routing })
}

/// The expert-parallel layer over `world_size` ranks in this process (threads on x's
/// device, the host-staged communicator): tokens split in `world_size` contiguous
/// chunks, experts in `world_size` contiguous shards; the whole `y`, `l_aux` and the
/// whole routing back. What `kiln run moe_layer world_size=P` does.
pub fn moe_layer_local_ranks(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
    world_size: usize,
) -> Result<LayerOutput> {
    if world_size <= 1 {
        if world_size == 0 {
            return Err(Error::Param {
                param: "world_size".into(),
                expected: "at least 1".into(),
                found: "0".into(),
            });
        }
        return moe_layer(x, w_gate, w, opts);
    }
    check_input("x", x, x.client())?;
    let &[s, m] = x.shape() else {
        return Err(shape_err("x", "[S, M]".into(), x.shape()));
    };
    let e = w.w1.shape().first().copied().unwrap_or(0);
    if e % world_size != 0 || e == 0 {
        return Err(Error::Param {
            param: "world_size".into(),
            expected: format!("a divisor of the expert count E = {e}"),
            found: world_size.to_string(),
        });
    }
    let e_local = e / world_size;
    let span = |q: usize| (q * s / world_size, (q + 1) * s / world_size);
    let parts = on_local_ranks(x.client(), "moe_layer", world_size, |c| {
        let r = c.rank();
        let (s0, s1) = span(r);
        let xs = slice_rows(x, 0, s0, s1 - s0, x.dtype())?;
        let shard = |t: &Tensor| slice_rows(t, 0, r * e_local, e_local, t.dtype());
        let (w1, w2) = (shard(w.w1)?, shard(w.w2)?);
        let b1 = w.b1.map(shard).transpose()?;
        let b2 = w.b2.map(shard).transpose()?;
        let local = ExpertWeights {
            w1: &w1,
            b1: b1.as_ref(),
            w2: &w2,
            b2: b2.as_ref(),
            activation: w.activation,
        };
        let out = moe_layer_expert_parallel(c, &xs, w_gate, &local, opts)?;
        let ids = out.routing.expert_ids.download()?;
        let locs = out.routing.locations.download()?;
        Ok((out.y, out.l_aux, ids, locs, out.routing.capacity, out.routing.rows_per_expert))
    })?;
    let y = Tensor::empty(x.client(), x.dtype(), &[s, m])?;
    let (mut ids, mut locs) = (Vec::new(), Vec::new());
    for (q, part) in parts.iter().enumerate() {
        let (s0, s1) = span(q);
        copy_rows(&part.0, 0, 0, &y, s0, s1 - s0)?;
        ids.extend(part.2.to_f64());
        locs.extend(part.3.to_f64());
    }
    let k = opts.gate.top_k;
    let whole = |v: &[f64]| -> Result<Tensor> {
        Tensor::upload(x.client(), &HostTensor::from_f64(DType::I32, vec![s, k], v)?)
    };
    let first = parts.into_iter().next().ok_or_else(|| Error::Kernel {
        kernel: "moe_layer".into(),
        message: "no rank returned".into(),
    })?;
    Ok(LayerOutput {
        y,
        l_aux: first.1,
        routing: MoeRouting {
            expert_ids: whole(&ids)?,
            locations: whole(&locs)?,
            gates: None,
            num_experts: e,
            capacity: first.4,
            rows_per_expert: first.5,
            slot_maps: Default::default(),
        },
    })
}
