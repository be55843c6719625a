//! Expert parallelism over any [`Communicator`]: rank `r` holds its tokens and experts
//! `r E/P ..`. The plan ([`EpPlan`]) gates the rank's tokens, counts slots over the
//! global batch (one `all_gather` of every rank's per-(choice, expert) counts), so ids,
//! locations and drops equal one device's, and fixes which rows travel where; rows then
//! move to their experts' ranks and back with `all_to_all`s (uneven splits). The
//! forward and the backward are both written on the plan.

use super::backward::{check_dy, gate_input_grads, FfnForward, LayerGrads};
use super::ffn::{moe_expert_ffn_on, ExpertWeights, GroupedKernel, Groups};
use super::gate::{
    capacity_of, check_gate, counting_order, gate_backward_with, load_balancing_loss,
    prob_column_sums, top_k, TopK,
};
use super::layer::{gate_logits, LayerOptions, LayerOutput};
use super::movement::{combine_from_layout, gate_grads, gather_by_map};
use super::routing::{count_slots, locate_slots, MoeRouting, RowLayout, NO_ROUTE};
use super::GateOptions;
use crate::launch::upload_u32;
use crate::rows::slice_rows;
use kiln_runtime::comm::Communicator;
use kiln_runtime::{DType, Error, HostTensor, Result, Tensor};

/// One rank's routing over the global batch and the row movements it implies.
pub(super) struct EpPlan {
    /// This rank's router logits `[S_r, E]`, f32.
    logits: Tensor,
    /// This rank's tokens' routing (global slots).
    routing: MoeRouting,
    /// The global `l_aux`, on every rank.
    l_aux: Tensor,
    /// Every expert's share of top-1 routes over the global batch.
    share: Vec<f64>,
    /// Tokens over all ranks.
    s_total: usize,
    /// Experts per rank.
    e_local: usize,
    /// This rank's kept routes in send order (grouped by their expert's rank).
    routes: Tensor,
    n_send: usize,
    send_rows: Vec<usize>,
    /// Rows received from each rank, and (owner side) the slot of each received row.
    recv_rows: Vec<usize>,
    recv_slots: Tensor,
    n_recv: usize,
    /// Owner side: the received row in each slot of `[E/P, C]` (or `NO_ROUTE`).
    slot_map: Tensor,
    /// Origin side: the returned row of each route (or `NO_ROUTE`).
    route_map: Tensor,
}

impl EpPlan {
    fn new(
        comm: &dyn Communicator,
        x: &Tensor,
        w_gate: &Tensor,
        e_local: usize,
        gate: &GateOptions,
    ) -> Result<EpPlan> {
        let p = comm.world_size();
        let client = x.client();
        let logits = gate_logits(x, w_gate)?;
        let (s_r, e) = check_gate(&logits, gate)?;
        if e != e_local * p {
            return Err(Error::Param {
                param: "world_size".into(),
                expected: format!("a divisor of the expert count E = {e} matching the weights' {e_local} experts per rank"),
                found: p.to_string(),
            });
        }
        let t = top_k(&logits, s_r, e, gate.top_k, gate.normalize())?;
        let slots = if gate.batch_prioritized {
            GlobalSlots::prioritized(comm, &t, s_r, e, gate)?
        } else {
            GlobalSlots::in_rank_order(comm, &t, s_r, e, gate)?
        };
        let (s_total, capacity) = (slots.s_total, slots.capacity);
        // The capacity is the global batch's (`check_gate` bounded this rank's): the
        // owner's slots `[E/P, C, M]` must be indexable before any table is sized by it.
        let m = x.shape().get(1).copied().unwrap_or(0);
        if kiln_runtime::indexable_product(&[e_local.max(1), capacity, m.max(1)]).is_none() {
            return Err(Error::Param {
                param: "capacity_factor".into(),
                expected: format!(
                    "a capacity whose slots [E/P, C, M] = [{e_local}, C, {m}] hold at most {} elements (S = {s_total} tokens over {p} ranks, E = {e})",
                    crate::launch::MAX_ELEMENTS
                ),
                found: format!("{} (C = {capacity})", gate.capacity_factor),
            });
        }
        let routing = MoeRouting::from_gate(
            t.ids,
            slots.locations,
            Some(t.gates),
            capacity,
            &slots.per_expert,
        );

        // l_aux = E sum_e share_e mean_s p: this rank's part (its tokens' probabilities
        // over the global S), then the sum over ranks.
        let share: Vec<f64> = slots
            .top1
            .iter()
            .map(|&c| c as f64 / s_total.max(1) as f64)
            .collect();
        let sums = prob_column_sums(&t.probs, s_r, e)?;
        let part = load_balancing_loss(&sums, &share, s_total);
        let part = Tensor::upload(client, &HostTensor::from_f64(DType::F32, vec![1], &[part])?)?;
        let l_aux = comm.all_reduce(&part)?.reshape(&[])?;

        // Kept routes grouped by their expert's rank (route order within), each with its
        // slot row in the owner's [E/P, C, M]; the slots travel once, as metadata.
        let ids = routing.expert_ids.download()?.to_f64();
        let locs = routing.locations.download()?.to_f64();
        let mut by_rank: Vec<Vec<(u32, f64)>> = vec![Vec::new(); p];
        for (r, (&id, &loc)) in ids.iter().zip(&locs).enumerate() {
            if loc >= 0.0 {
                let id = id as usize;
                let slot = (id % e_local) * capacity + loc as usize;
                by_rank[id / e_local].push((r as u32, slot as f64));
            }
        }
        let send_rows: Vec<usize> = by_rank.iter().map(Vec::len).collect();
        let (routes, slots): (Vec<u32>, Vec<f64>) = by_rank.concat().into_iter().unzip();
        let slots_t = Tensor::upload(
            client,
            &HostTensor::from_f64(DType::I32, vec![slots.len(), 1], &slots)?,
        )?;
        let (recv_slots, recv_rows) = comm.all_to_all(&slots_t, &send_rows)?;
        let recv_slots: Vec<u32> = recv_slots
            .download()?
            .to_f64()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let mut slot_map = vec![NO_ROUTE; e_local * capacity];
        for (i, &slot) in recv_slots.iter().enumerate() {
            slot_map[slot as usize] = i as u32;
        }
        let mut route_map = vec![NO_ROUTE; s_r * gate.top_k];
        for (j, &r) in routes.iter().enumerate() {
            route_map[r as usize] = j as u32;
        }
        Ok(EpPlan {
            logits,
            l_aux,
            share,
            s_total,
            e_local,
            n_send: routes.len(),
            routes: upload_u32(client, "send_routes", &routes)?,
            send_rows,
            recv_rows,
            n_recv: recv_slots.len(),
            recv_slots: upload_u32(client, "recv_slots", &recv_slots)?,
            slot_map: upload_u32(client, "slot_map", &slot_map)?,
            route_map: upload_u32(client, "route_map", &route_map)?,
            routing,
        })
    }

    /// Token rows `src` `[S_r, M]` (times each route's gate with `scaled`) to their
    /// experts' ranks, as the owner's slots `[E/P C, M]` (empty slots zero).
    fn to_owners(&self, comm: &dyn Communicator, src: &Tensor, scaled: bool) -> Result<Tensor> {
        let gates = if scaled {
            Some(self.routing.gates()?)
        } else {
            None
        };
        let send = gather_by_map(src, &self.routes, self.n_send, self.routing.top_k(), gates)?;
        let (recv, _) = comm.all_to_all(&send, &self.send_rows)?;
        gather_by_map(
            &recv,
            &self.slot_map,
            self.e_local * self.routing.capacity,
            1,
            None,
        )
    }

    /// The owner's slot rows `[E/P C, M]` back to their routes' ranks: `[S_r k, M]`
    /// indexed by route (a dropped route's row zero).
    fn to_origin(&self, comm: &dyn Communicator, slots: &Tensor) -> Result<Tensor> {
        let reply = gather_by_map(slots, &self.recv_slots, self.n_recv, 1, None)?;
        let (back, _) = comm.all_to_all(&reply, &self.recv_rows)?;
        let routes = self.routing.tokens() * self.routing.top_k();
        gather_by_map(&back, &self.route_map, routes, 1, None)
    }

    /// This rank's experts' groups in the owner's slots.
    fn groups(&self, like: &Tensor) -> Result<Groups> {
        let c = self.routing.capacity;
        let starts: Vec<usize> = (0..self.e_local).map(|i| i * c).collect();
        Groups::new(like, &starts, &vec![c; self.e_local])
    }
}

/// The slot counting of the global batch (every rank's tokens in rank order, as one
/// device would count them), as one rank sees it.
struct GlobalSlots {
    /// Tokens over all ranks.
    s_total: usize,
    /// Routes per expert over the global batch, every choice.
    per_expert: Vec<usize>,
    /// Top-1 routes per expert over the global batch.
    top1: Vec<usize>,
    capacity: usize,
    /// This rank's routes' locations `[S_r, k]` (i32, `-1` where dropped).
    locations: Tensor,
}

impl GlobalSlots {
    /// Tokens counted in token order: one `all_gather` of every rank's route totals
    /// per (choice, expert); this rank's routes start after every earlier choice of
    /// every rank and the same choice of earlier ranks.
    fn in_rank_order(
        comm: &dyn Communicator,
        t: &TopK,
        s_r: usize,
        e: usize,
        gate: &GateOptions,
    ) -> Result<GlobalSlots> {
        let (p, rank, k) = (comm.world_size(), comm.rank(), gate.top_k);
        let client = t.ids.client();
        let order = upload_u32(client, "order", &[])?;
        let counts = count_slots(client, &t.ids, &order, false, e)?;
        // Every rank's route totals per (choice, expert) and token count, in rank order:
        // u32, exact (each below 2^31: `check_routes`); f32 would round counts past 2^24.
        let width = k * e + 1;
        let mut mine: Vec<f64> = (0..k * e)
            .map(|ie| counts.total(ie / e, ie % e) as f64)
            .collect();
        mine.push(s_r as f64);
        let mine = Tensor::upload(
            client,
            &HostTensor::from_f64(DType::U32, vec![1, width], &mine)?,
        )?;
        let all = comm.all_gather(&mine)?.download()?.to_f64();
        let at = |q: usize, i: usize, x: usize| all[q * width + i * e + x] as usize;
        let s_total: usize = (0..p).map(|q| all[q * width + k * e] as usize).sum();
        let global = |i: usize, x: usize| (0..p).map(|q| at(q, i, x)).sum::<usize>();
        let per_expert: Vec<usize> = (0..e).map(|x| (0..k).map(|i| global(i, x)).sum()).collect();
        let capacity = capacity_of(s_total, e, gate, &per_expert);
        let bases = counts.bases_from(|i, x| {
            ((0..i).map(|j| global(j, x)).sum::<usize>()
                + (0..rank).map(|q| at(q, i, x)).sum::<usize>()) as u32
        });
        let locations = Tensor::empty(client, DType::I32, &[s_r, k])?;
        if s_r > 0 {
            locate_slots(
                client, &t.ids, &order, false, &counts, &bases, capacity, &locations,
            )?;
        }
        Ok(GlobalSlots {
            s_total,
            top1: (0..e).map(|x| global(0, x)).collect(),
            per_expert,
            capacity,
            locations,
        })
    }

    /// Tokens counted by descending top-1 probability over the global batch (ties to
    /// the earlier token, an earlier rank's first): no rank's slots can be placed from
    /// totals alone, so every rank gathers every rank's top-1 probabilities and expert
    /// ids (`S k` integers and `S` floats, an uneven `all_to_all`), runs one device's
    /// scan on the concatenation, and keeps its own rows' locations. Routing is
    /// O(S k) work, repeated on each rank; the rows themselves still move only to
    /// their experts.
    fn prioritized(
        comm: &dyn Communicator,
        t: &TopK,
        s_r: usize,
        e: usize,
        gate: &GateOptions,
    ) -> Result<GlobalSlots> {
        let (rank, k) = (comm.rank(), gate.top_k);
        let client = t.ids.client();
        let (ids, from) = gather_rows(comm, &t.ids.reshape(&[s_r, k])?)?;
        let (top1, _) = gather_rows(comm, &t.top1.reshape(&[s_r, 1])?)?;
        let s_total: usize = from.iter().sum();
        let order = counting_order(client, &top1, true)?;
        let counts = count_slots(client, &ids, &order, true, e)?;
        let per_expert: Vec<usize> = (0..e)
            .map(|x| (0..k).map(|i| counts.total(i, x)).sum())
            .collect();
        let capacity = capacity_of(s_total, e, gate, &per_expert);
        let all = Tensor::empty(client, DType::I32, &[s_total, k])?;
        if s_total > 0 {
            locate_slots(
                client,
                &ids,
                &order,
                true,
                &counts,
                &counts.bases(),
                capacity,
                &all,
            )?;
        }
        let first: usize = from[..rank].iter().sum();
        let all = all.download()?.to_f64();
        let mine = &all[first * k..(first + s_r) * k];
        Ok(GlobalSlots {
            s_total,
            top1: (0..e).map(|x| counts.total(0, x)).collect(),
            per_expert,
            capacity,
            locations: Tensor::upload(
                t.ids.client(),
                &HostTensor::from_f64(DType::I32, vec![s_r, k], mine)?,
            )?,
        })
    }
}

/// Every rank's rows of `t` `[S_r, c]`, concatenated in rank order on every rank (an
/// `all_to_all` of `P` copies: ranks may hold different numbers of rows), with how
/// many came from each rank.
fn gather_rows(comm: &dyn Communicator, t: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let p = comm.world_size();
    let host = t.download()?;
    let values = host.to_f64();
    let mut shape = t.shape().to_vec();
    shape[0] *= p;
    let copies = HostTensor::from_f64(t.dtype(), shape, &values.repeat(p))?;
    comm.all_to_all(
        &Tensor::upload(t.client(), &copies)?,
        &vec![t.shape()[0]; p],
    )
}

/// One rank of the expert-parallel layer: this rank's tokens `x` `[S_r, M]`, the whole
/// `w_gate` `[M, E]`, and this rank's experts `E / P` (rank `r` owns experts
/// `r E/P ..`, weights `[E/P, M, F]` ...). Slots are counted over the global batch
/// (every rank's tokens in rank order, as one device would), so ids, locations, drops
/// and `y` match [`super::moe_layer`] on the concatenated tokens; `l_aux` is the global
/// one on every rank. The experts' rows travel in the capacity layout: `path` must be
/// `auto` or `capacity` (`capacity_factor = 0` keeps every route, as dropless does).
pub fn moe_layer_expert_parallel(
    comm: &dyn Communicator,
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
) -> Result<LayerOutput> {
    moe_layer_expert_parallel_on(comm, x, w_gate, w, opts, GroupedKernel::Auto)
}

/// [`moe_layer_expert_parallel`] with this rank's grouped GEMMs on `kernel` (each rank
/// tunes its own experts' tiles; `TensorCores` refused as unsupported where the rank's
/// device or dtype lacks them, on every rank alike before the rows go back).
pub fn moe_layer_expert_parallel_on(
    comm: &dyn Communicator,
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
    kernel: GroupedKernel,
) -> Result<LayerOutput> {
    if opts.path == super::MoePath::Dropless {
        return Err(Error::Param {
            param: "path".into(),
            expected: "auto or capacity with expert parallelism (rows travel in the capacity layout; capacity_factor = 0 drops nothing)".into(),
            found: "dropless".into(),
        });
    }
    let e_local = w.w1.shape().first().copied().unwrap_or(0);
    let plan = EpPlan::new(comm, x, w_gate, e_local, &opts.gate)?;
    let m = x.shape()[1];
    w.check(e_local, m, x)?;
    let d = plan.to_owners(comm, x, false)?;
    let c = plan.routing.capacity;
    let y_e =
        moe_expert_ffn_on(&d.reshape(&[e_local, c, m])?, w, kernel)?.reshape(&[e_local * c, m])?;
    let per_route = plan.to_origin(comm, &y_e)?;
    let y = combine_from_layout(&per_route, &plan.routing, RowLayout::Capacity, true, true)?;
    Ok(LayerOutput {
        y,
        l_aux: plan.l_aux,
        routing: plan.routing,
    })
}

/// One rank of the expert-parallel backward (the forward's arguments plus `dy`
/// `[S_r, M]` and the gradient of the global `l_aux`): `dx` of this rank's tokens, the
/// gradients of this rank's experts, and `d_w_gate` summed over every rank
/// (`all_reduce`), equal to [`super::moe_layer_backward`] on one device.
pub fn moe_layer_backward_expert_parallel(
    comm: &dyn Communicator,
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    gate: &GateOptions,
    dy: &Tensor,
    d_l_aux: f64,
) -> Result<LayerGrads> {
    let e_local = w.w1.shape().first().copied().unwrap_or(0);
    let plan = EpPlan::new(comm, x, w_gate, e_local, gate)?;
    let m = x.shape()[1];
    let f = w.check(e_local, m, x)?;
    check_dy(dy, x)?;
    // Owner: the FFN's forward again; origin: the gates' gradient from the returned rows.
    let d = plan.to_owners(comm, x, false)?;
    let groups = plan.groups(&d)?;
    let fwd = FfnForward::new(&d, &groups, w, m, f)?;
    let per_route_y = plan.to_origin(comm, &fwd.y_e)?;
    let d_gates = gate_grads(dy, &per_route_y, &plan.routing, RowLayout::Capacity, true)?;
    // dY = g dy to the owners, the FFN's backward there, dD back to the origin.
    let d_y = plan.to_owners(comm, dy, true)?;
    let g = fwd.backward(&d, &d_y, &groups, w, m, f, e_local)?;
    let per_route_dd = plan.to_origin(comm, &g.d_d)?;
    let dx_experts = combine_from_layout(
        &per_route_dd,
        &plan.routing,
        RowLayout::Capacity,
        false,
        true,
    )?;
    // The gate, with l_aux's gradient through the global shares and token count.
    let e = plan.share.len();
    let aux: Vec<f64> = plan
        .share
        .iter()
        .map(|sh| d_l_aux * e as f64 * sh / plan.s_total.max(1) as f64)
        .collect();
    let d_logits = gate_backward_with(&plan.logits, &d_gates, &aux, gate)?;
    let (dx, d_w_gate) = gate_input_grads(x, w_gate, &dx_experts, &d_logits)?;
    let d_w_gate = comm.all_reduce(&d_w_gate)?;
    let d_w_gate = match x.dtype() {
        DType::F32 => d_w_gate,
        dt => slice_rows(&d_w_gate, 0, 0, m, dt)?,
    };
    Ok(LayerGrads {
        dx,
        d_w_gate,
        d_w1: g.d_w1,
        d_w2: g.d_w2,
        d_b1: g.d_b1,
        d_b2: g.d_b2,
    })
}
