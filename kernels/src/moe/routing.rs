//! Routes and slots: [`MoeRouting`] (who goes where, validated once), the deterministic
//! slot counting of the gate (`moe_route_scan`, counting then locating), and the slot ->
//! route map every gather reads (`moe_route_slots`).

use crate::launch::{shape_err, upload_u32};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{shape_str, Client, DType, Error, Result, Tensor};

/// Tokens per chunk of the slot count: each chunk is counted on its own, then the
/// chunks' counts are scanned in token order on the host.
pub(super) const CHUNK: usize = 128;

/// "No route": an empty slot of the slot -> route map.
pub(super) const NO_ROUTE: u32 = u32::MAX;

/// Where every route of a batch goes: `expert_ids` and `locations` `[S, k]` i32
/// (`-1`: dropped), the gates `[S, k]` f32 when known, and the slot count per expert.
/// Built by [`super::moe_gate`], or from tensors by [`MoeRouting::from_tensors`] (which
/// validates them), so the data-movement kernels never see an inconsistent routing.
///
/// The fields are read through methods: a routing is immutable once built, because the
/// kernels index by it without bounds checks of their own (a capacity lowered after the
/// check, for one, would let the slot-map kernel write past its buffer).
#[derive(Clone)]
pub struct MoeRouting {
    /// `[S, k]` i32, in `0..num_experts`.
    pub(super) expert_ids: Tensor,
    /// `[S, k]` i32: the route's slot at its expert, `-1` where dropped.
    pub(super) locations: Tensor,
    /// `[S, k]` f32 gate weights (absent where only dispatch is needed).
    pub(super) gates: Option<Tensor>,
    /// `E`.
    pub(super) num_experts: usize,
    /// `C`: slots per expert in the capacity layout.
    pub(super) capacity: usize,
    /// Per expert: 1 + its largest kept location (the rows it takes in the sorted
    /// layout; the kept-route count for a gate's routing).
    pub(super) rows_per_expert: Vec<usize>,
    /// The slot -> route maps built so far (per layout), shared by the clones: built
    /// once per routing, read by dispatch, the FFN and the backward.
    pub(super) slot_maps: SlotMaps,
}

/// Lazily built slot -> route maps and row bases, one per [`RowLayout`].
#[derive(Clone, Default)]
pub(super) struct SlotMaps(std::sync::Arc<[std::sync::OnceLock<(Tensor, Tensor)>; 2]>);

/// How the expert rows are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLayout {
    /// `[E, C, M]`: slot `(e, loc)` at row `e C + loc`.
    Capacity,
    /// Expert `e`'s rows at `offsets[e] + loc` (no padding).
    Sorted,
}

impl MoeRouting {
    /// Expert ids `[S, k]` i32, in `0..num_experts`.
    pub fn expert_ids(&self) -> &Tensor {
        &self.expert_ids
    }

    /// Slot locations `[S, k]` i32: each route's slot at its expert, `-1` where dropped.
    pub fn locations(&self) -> &Tensor {
        &self.locations
    }

    /// Experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Slots per expert `C` in the capacity layout.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Per expert: 1 + its largest kept location (its rows in the sorted layout; the
    /// kept-route count for a gate's routing).
    pub fn rows_per_expert(&self) -> &[usize] {
        &self.rows_per_expert
    }

    /// Tokens `S`.
    pub fn tokens(&self) -> usize {
        self.expert_ids.shape()[0]
    }

    /// Choices per token `k`.
    pub fn top_k(&self) -> usize {
        self.expert_ids.shape()[1]
    }

    /// A routing from `expert_ids` and `locations` (`[S, k]` i32, `-1` for a dropped
    /// route) and optional `gates` (`[S, k]` f32), checked on the host: ids in
    /// `0..num_experts`, k distinct per token, kept locations below `capacity`, no two
    /// routes in one slot.
    pub fn from_tensors(
        expert_ids: &Tensor,
        locations: &Tensor,
        gates: Option<&Tensor>,
        num_experts: usize,
        capacity: usize,
    ) -> Result<MoeRouting> {
        let client = expert_ids.client();
        expert_ids.expect_usable("expert_ids", client)?;
        locations.expect_usable("locations", client)?;
        expert_ids.expect_dtype("expert_ids", &[DType::I32])?;
        locations.expect_dtype("locations", &[DType::I32])?;
        let &[s, k] = expert_ids.shape() else {
            return Err(shape_err("expert_ids", "[S, k]".into(), expert_ids.shape()));
        };
        crate::launch::expect_shape("locations", locations, &[s, k], "[S, k] of expert_ids")?;
        if k == 0 {
            return Err(shape_err(
                "expert_ids",
                "[S, k] with k >= 1 choices per token".into(),
                expert_ids.shape(),
            ));
        }
        if num_experts == 0 {
            return Err(param("num_experts", "at least 1", "0"));
        }
        if k > num_experts.min(super::MAX_TOP_K) {
            return Err(param(
                "expert_ids",
                &format!("k = 1 ..= min(8, num_experts = {num_experts}) choices per token"),
                &format!("k = {k}"),
            ));
        }
        if let Some(g) = gates {
            g.expect_usable("gates", client)?;
            g.expect_dtype("gates", &[DType::F32])?;
            crate::launch::expect_shape("gates", g, &[s, k], "[S, k] of expert_ids")?;
        }
        // The slots `[E, C]` (times M in the dispatched tensor) must be indexable.
        if kiln_runtime::indexable_product(&[num_experts, capacity]).is_none() {
            return Err(param(
                "capacity",
                &format!(
                    "num_experts x capacity at most {} ({num_experts} experts)",
                    crate::launch::MAX_ELEMENTS
                ),
                &capacity.to_string(),
            ));
        }
        let ids = expert_ids.download()?.to_f64();
        let locs = locations.download()?.to_f64();
        let mut used = vec![false; num_experts * capacity];
        let mut rows_per_expert = vec![0usize; num_experts];
        for (r, (&e, &l)) in ids.iter().zip(&locs).enumerate() {
            let (tok, i) = (r / k, r % k);
            if e < 0.0 || e >= num_experts as f64 {
                return Err(param(
                    "expert_ids",
                    &format!("expert ids in 0..{num_experts}"),
                    &format!("{e} at token {tok}, choice {i}"),
                ));
            }
            if let Some(j) = ids[tok * k..r].iter().position(|&other| other == e) {
                return Err(param(
                    "expert_ids",
                    "k distinct experts per token",
                    &format!("expert {e} at token {tok}, choices {j} and {i}"),
                ));
            }
            if l < 0.0 {
                if l != -1.0 {
                    return Err(param(
                        "locations",
                        "a slot >= 0, or -1 for a dropped route",
                        &format!("{l} at token {tok}, choice {i}"),
                    ));
                }
                continue;
            }
            let (e, l) = (e as usize, l as usize);
            if l >= capacity {
                return Err(param(
                    "capacity",
                    &format!("more than every kept location (token {tok}, choice {i} is at slot {l} of expert {e})"),
                    &capacity.to_string(),
                ));
            }
            if std::mem::replace(&mut used[e * capacity + l], true) {
                return Err(param(
                    "locations",
                    "one route per slot",
                    &format!(
                        "slot {l} of expert {e} taken twice (again by token {tok}, choice {i})"
                    ),
                ));
            }
            rows_per_expert[e] = rows_per_expert[e].max(l + 1);
        }
        Ok(MoeRouting {
            expert_ids: expert_ids.clone(),
            locations: locations.clone(),
            gates: gates.cloned(),
            num_experts,
            capacity,
            rows_per_expert,
            slot_maps: SlotMaps::default(),
        })
    }

    /// A routing made by a gate: every kept location is below `capacity` and unique by
    /// construction; `routes_per_expert` counts all routes (kept or not) per expert.
    pub(super) fn from_gate(
        expert_ids: Tensor,
        locations: Tensor,
        gates: Option<Tensor>,
        capacity: usize,
        routes_per_expert: &[usize],
    ) -> MoeRouting {
        MoeRouting {
            expert_ids,
            locations,
            gates,
            num_experts: routes_per_expert.len(),
            capacity,
            rows_per_expert: routes_per_expert.iter().map(|&n| n.min(capacity)).collect(),
            slot_maps: SlotMaps::default(),
        }
    }

    /// The gates, or an error naming `gates` where the routing has none.
    pub fn gates(&self) -> Result<&Tensor> {
        self.gates.as_ref().ok_or_else(|| Error::Param {
            param: "gates".into(),
            expected: "gate weights [S, k] f32 with the routing".into(),
            found: "none".into(),
        })
    }

    /// `offsets[e] .. offsets[e + 1]`: expert `e`'s rows in the sorted layout.
    pub fn sorted_offsets(&self) -> Vec<usize> {
        let mut off = Vec::with_capacity(self.num_experts + 1);
        off.push(0);
        for n in &self.rows_per_expert {
            off.push(off.last().copied().unwrap_or(0) + n);
        }
        off
    }

    /// Rows of the layout, and each expert's first row.
    pub fn rows(&self, layout: RowLayout) -> (usize, Vec<usize>) {
        match layout {
            RowLayout::Capacity => (
                self.num_experts * self.capacity,
                (0..self.num_experts).map(|e| e * self.capacity).collect(),
            ),
            RowLayout::Sorted => {
                let off = self.sorted_offsets();
                (off[self.num_experts], off[..self.num_experts].to_vec())
            }
        }
    }

    /// The slot -> route map of a layout: `[rows]` u32 holding the route `s k + i` that
    /// fills each row, or [`NO_ROUTE`]; and the experts' first rows `[E]` u32.
    pub(super) fn slot_routes(&self, layout: RowLayout) -> Result<(Tensor, Tensor)> {
        let cell = &self.slot_maps.0[layout as usize];
        if let Some(built) = cell.get() {
            return Ok(built.clone());
        }
        let built = self.build_slot_routes(layout)?;
        Ok(cell.get_or_init(|| built).clone())
    }

    fn build_slot_routes(&self, layout: RowLayout) -> Result<(Tensor, Tensor)> {
        let client = self.expert_ids.client();
        let (rows, base) = self.rows(layout);
        let base: Vec<u32> = base.iter().map(|&b| b as u32).collect();
        let row_base = upload_u32(client, "row_base", &base)?;
        let map = Tensor::empty(client, DType::U32, &[rows.max(1)])?;
        let routes = self.tokens() * self.top_k();
        for fill in [false, true] {
            MoeRouteSlots::tuned(
                client,
                0.0,
                &MoeRouteSlotsArgs {
                    expert_ids: &self.expert_ids,
                    locations: &self.locations,
                    row_base: &row_base,
                    slot_route: &map,
                    routes: routes as u32,
                    rows: rows as u32,
                    fill,
                },
            )?;
        }
        Ok((map, row_base))
    }
}

fn param(name: &str, expected: &str, found: &str) -> Error {
    Error::Param {
        param: name.into(),
        expected: expected.into(),
        found: found.into(),
    }
}

/// What the host reads back from the slot count: per (choice, expert, chunk) how many
/// of the chunk's routes go there.
pub(super) struct SlotCounts {
    pub counts: Vec<u32>,
    pub chunks: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl SlotCounts {
    /// Routes of choice `i` at expert `e` over all chunks.
    pub fn total(&self, i: usize, e: usize) -> usize {
        let at = (i * self.experts + e) * self.chunks;
        self.counts[at..at + self.chunks]
            .iter()
            .map(|&c| c as usize)
            .sum()
    }

    /// The first location of every (choice, expert, chunk): the routes of earlier
    /// choices at that expert, then those of earlier chunks of the same choice.
    pub fn bases(&self) -> Vec<u32> {
        self.bases_from(|i, e| (0..i).map(|j| self.total(j, e) as u32).sum())
    }

    /// The first location of every (choice, expert, chunk) when choice `i`'s routes at
    /// expert `e` start at `start(i, e)` (expert parallelism adds the other ranks').
    pub fn bases_from(&self, start: impl Fn(usize, usize) -> u32) -> Vec<u32> {
        let mut out = vec![0u32; self.counts.len()];
        for i in 0..self.top_k {
            for e in 0..self.experts {
                let mut run = start(i, e);
                for c in 0..self.chunks {
                    let at = (i * self.experts + e) * self.chunks + c;
                    out[at] = run;
                    run += self.counts[at];
                }
            }
        }
        out
    }
}

/// Counts the routes of every (chunk, choice, expert) and returns them on the host.
/// `order` (with `prioritized`) lists the tokens in counting order.
pub(super) fn count_slots(
    client: &Client,
    expert_ids: &Tensor,
    order: &Tensor,
    prioritized: bool,
    experts: usize,
) -> Result<SlotCounts> {
    let (s, k) = (expert_ids.shape()[0], expert_ids.shape()[1]);
    let chunks = s.div_ceil(CHUNK).max(1);
    let counts = Tensor::empty(client, DType::U32, &[chunks * k * experts])?;
    let no_locations = Tensor::empty(client, DType::I32, &[1])?;
    let scan = Scan {
        expert_ids,
        order,
        prioritized,
        experts,
        chunks,
    };
    scan.launch(
        client,
        &upload_u32(client, "bases", &[])?,
        &counts,
        &no_locations,
        0,
        false,
    )?;
    let counts = counts
        .download()?
        .to_f64()
        .into_iter()
        .map(|c| c as u32)
        .collect();
    Ok(SlotCounts {
        counts,
        chunks,
        experts,
        top_k: k,
    })
}

/// Writes every route's location (`-1` where `>= capacity`) from the chunks' `bases`
/// ([`SlotCounts::bases`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn locate_slots(
    client: &Client,
    expert_ids: &Tensor,
    order: &Tensor,
    prioritized: bool,
    counts: &SlotCounts,
    bases: &[u32],
    capacity: usize,
    locations: &Tensor,
) -> Result<()> {
    let scan = Scan {
        expert_ids,
        order,
        prioritized,
        experts: counts.experts,
        chunks: counts.chunks,
    };
    let bases = upload_u32(client, "slot_bases", bases)?;
    let capacity = capacity.min(i32::MAX as usize) as u32;
    scan.launch(
        client,
        &bases,
        &upload_u32(client, "counts", &[])?,
        locations,
        capacity,
        true,
    )
}

/// One pass of `moe_route_scan` over a routing's ids.
struct Scan<'a> {
    expert_ids: &'a Tensor,
    order: &'a Tensor,
    prioritized: bool,
    experts: usize,
    chunks: usize,
}

impl Scan<'_> {
    fn launch(
        &self,
        client: &Client,
        bases: &Tensor,
        counts: &Tensor,
        locations: &Tensor,
        capacity: u32,
        locate: bool,
    ) -> Result<()> {
        let (s, k) = (self.expert_ids.shape()[0], self.expert_ids.shape()[1]);
        MoeRouteScan::tuned(
            client,
            0.0,
            &MoeRouteScanArgs {
                expert_ids: self.expert_ids,
                order: self.order,
                bases,
                counts,
                locations,
                tokens: s as u32,
                top_k: k as u32,
                experts: self.experts as u32,
                chunks: self.chunks as u32,
                chunk: CHUNK as u32,
                capacity,
                prioritized: self.prioritized,
                locate,
            },
        )
        .map(|_| ())
    }
}

/// Checks the token count fits the kernels' 32-bit route indices.
pub(super) fn check_routes(name: &str, shape: &[usize], s: usize, k: usize) -> Result<()> {
    if s.saturating_mul(k) >= i32::MAX as usize {
        return Err(Error::Shape {
            tensor: name.into(),
            expected: "fewer than 2^31 routes (S k)".into(),
            found: shape_str(shape),
        });
    }
    Ok(())
}

/// The slot count, one unit per (chunk, choice `i`, expert `e`) walking its chunk of
/// the counting order (no atomics). Without `locate`: `counts[(i E + e) chunks + c]` =
/// the chunk's routes of choice `i` to expert `e`. With `locate`: each such route's
/// location, its (choice, expert, chunk) base from `bases` plus the routes before it
/// in the chunk, or -1 at or past `capacity`.
#[kiln_macros::kernel(
    tune(UNITS = [64]),
    key(tokens = pow2, experts = pow2),
    grid = ((chunks * top_k * experts).div_ceil(UNITS)),
    cube = UNITS,
    defaults(prioritized = false, locate = false)
)]
pub fn moe_route_scan(
    expert_ids: &Array<i32>,
    order: &Array<u32>,
    bases: &Array<u32>,
    counts: &mut Array<u32>,
    locations: &mut Array<i32>,
    tokens: u32,
    top_k: u32,
    experts: u32,
    chunks: u32,
    chunk: u32,
    capacity: u32,
    #[comptime] prioritized: bool,
    #[comptime] locate: bool,
) {
    let u = linear_unit() as u32;
    if u < chunks * top_k * experts {
        let e = u % experts;
        let i = (u / experts) % top_k;
        let c = u / (experts * top_k);
        let at = ((i * experts + e) * chunks + c) as usize;
        let end = min(tokens, (c + 1) * chunk);
        let mut run = 0u32;
        if comptime!(locate) {
            run = bases[at];
        }
        let mut pos = c * chunk;
        while pos < end {
            let mut t = pos;
            if comptime!(prioritized) {
                t = order[pos as usize];
            }
            let r = (t * top_k + i) as usize;
            if expert_ids[r] == e as i32 {
                if comptime!(locate) {
                    locations[r] = select(run < capacity, run as i32, -1i32);
                }
                run += 1;
            }
            pos += 1;
        }
        if comptime!(!locate) {
            counts[at] = run;
        }
    }
}

/// The slot -> route map: with `fill = false` every row is cleared to `NO_ROUTE`;
/// with `fill = true`, `slot_route[row_base[e] + loc] = r` for every kept route `r`
/// (slots are unique, so the writes never collide). Two launches, so that every clear
/// precedes every fill (no barrier spans cubes).
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(routes = pow2, rows = pow2),
    grid = cubes(routes.max(rows).div_ceil(UNITS)),
    cube = UNITS,
)]
pub fn moe_route_slots(
    expert_ids: &Array<i32>,
    locations: &Array<i32>,
    row_base: &Array<u32>,
    slot_route: &mut Array<u32>,
    routes: u32,
    rows: u32,
    #[comptime] fill: bool,
) {
    let u = linear_unit() as u32;
    if comptime!(fill) {
        if u < routes {
            let loc = locations[u as usize];
            if loc >= 0 {
                let e = expert_ids[u as usize] as u32;
                let row = row_base[e as usize] + loc as u32;
                slot_route[row as usize] = u;
            }
        }
    } else if u < rows {
        slot_route[u as usize] = 0xFFFF_FFFFu32;
    }
}
