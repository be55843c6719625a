//! The whole layer `y = combine(FFN(dispatch(x)))` with its gate, on one device (the
//! capacity or the sorted path, or the faster of the two, autotuned), and expert
//! parallel: experts sharded over the ranks of a communicator, tokens exchanged with
//! two all-to-alls (uneven splits), slots counted over the global batch so that every
//! rank count gives the routing and the output of one device.

use super::backward::{moe_layer_backward, LayerGrads};
use super::expert_parallel::{moe_layer_backward_expert_parallel, moe_layer_expert_parallel_on};
use super::ffn::{
    moe_expert_ffn_on, moe_expert_ffn_sorted_on, ExpertWeights, GroupedKernel, MoeGroupedMatmul,
    MoeGroupedMatmulCmma, MoeGroupedMatmulV4,
};
use super::gate::{moe_gate, GateOptions};
use super::movement::{
    combine_from_layout, gather_into_layout, MoeCombineRows, MoeCombineRowsV4, MoeGatherRows,
    MoeGatherRowsV4,
};
use super::routing::{MoeRouting, RowLayout};
use crate::launch::{check_input, on_local_ranks, shape_err};
use crate::matmul::{matmul, Epilogue};
use crate::rows::{copy_rows, slice_rows};
use kiln_runtime::comm::Communicator;
use kiln_runtime::tune::{Choice, Tolerance};
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
        _ => {
            return Err(shape_err(
                "w_gate",
                format!("[{m}, E] (M of x)"),
                w_gate.shape(),
            ))
        }
    };
    if x.dtype() == DType::F32 {
        return matmul(x, w_gate, false, Epilogue::default());
    }
    let x32 = slice_rows(x, 0, 0, s, DType::F32)?;
    let w32 = slice_rows(w_gate, 0, 0, m, DType::F32)?;
    matmul(&x32, &w32, false, Epilogue::default())
}

/// The experts of one path from tokens to `y`, the grouped GEMMs on `kernel`.
fn run_path(
    x: &Tensor,
    routing: &MoeRouting,
    w: &ExpertWeights<'_>,
    path: MoePath,
    kernel: GroupedKernel,
) -> Result<Tensor> {
    match path {
        MoePath::Dropless => moe_expert_ffn_sorted_on(x, routing, w, kernel),
        _ => {
            let m = x.shape()[1];
            let d = gather_into_layout(x, routing, RowLayout::Capacity, false)?;
            let d = d.reshape(&[routing.num_experts, routing.capacity, m])?;
            let y_e = moe_expert_ffn_on(&d, w, kernel)?;
            combine_from_layout(&y_e, routing, RowLayout::Capacity, true, false)
        }
    }
}

/// How far the dropless path's `y` may differ from the capacity path's when the tuner
/// compares them. In f32, 1e-4 relative (floored at 1e-3 of y's largest magnitude). In
/// half precision the paths round at different points (the dropless epilogue rounds
/// `gate * v`, the capacity combine `v` before weighting it), and an element that sums
/// k rows of large opposite values keeps one rounding of a large value: up to eps
/// times y's largest magnitude. So the scale is y's largest magnitude (floor 1) and the
/// bound four such roundings. Until 2026-12-05 the half bound was 4e3 eps relative with
/// the 1e-3 floor: over 1 in bf16 and f16, so a path returning zeros would have passed.
/// On a H200 the bf16 paths differed by 0.35 in that measure (3.5e-4 of the largest if
/// the worst element was near zero, as assumed here; not rerun since): where the new
/// bound rejects dropless, the capacity path runs (1.02x its time on Mixtral's layer).
fn path_tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => 1e-4.into(),
        half => Tolerance {
            rel: 4.0 * half.epsilon(),
            floor: 1.0,
        },
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
    moe_layer_on(x, w_gate, w, opts, GroupedKernel::Auto)
}

/// [`moe_layer`] with the experts' grouped GEMMs on `kernel` (`kiln run moe_layer --set
/// kernel=tensor_cores`: the `wmma` kernel alone, refused where there is none).
pub fn moe_layer_on(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
    kernel: GroupedKernel,
) -> Result<LayerOutput> {
    let logits = gate_logits(x, w_gate)?;
    let e = logits.shape()[1];
    w.check(e, x.shape()[1], x)?;
    let g = moe_gate(&logits, &opts.gate)?;
    let routing = g.routing;
    let path = match opts.path {
        MoePath::Auto => {
            let mut choice = Choice::new("moe_path")
                .sources([
                    MoeGroupedMatmul::source_hash(),
                    MoeGroupedMatmulV4::source_hash(),
                    MoeGroupedMatmulCmma::source_hash(),
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
                .exact(
                    "capacity",
                    if opts.gate.capacity_factor > 0.0 {
                        "factor"
                    } else {
                        "dropless"
                    },
                )
                .exact("dtype", x.dtype());
            // The tensor-core kernel alone is another decision than the choice among all.
            if kernel == GroupedKernel::TensorCores {
                choice = choice.exact("kernel", "tensor_cores");
            }
            choice
                .candidates([MoePath::Capacity, MoePath::Dropless])
                .tune(
                    x.client(),
                    path_tolerance(x.dtype()),
                    |p| format!("{p:?}").to_lowercase(),
                    |&p| Ok(vec![run_path(x, &routing, w, p, kernel)?]),
                )?
        }
        p => p,
    };
    let y = run_path(x, &routing, w, path, kernel)?;
    Ok(LayerOutput {
        y,
        l_aux: g.l_aux,
        routing,
    })
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
    moe_layer_local_ranks_on(x, w_gate, w, opts, world_size, GroupedKernel::Auto)
}

/// [`moe_layer_local_ranks`] with every rank's grouped GEMMs on `kernel` (`kiln run
/// moe_layer --set kernel=tensor_cores --set world_size=P`).
pub fn moe_layer_local_ranks_on(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    opts: &LayerOptions,
    world_size: usize,
    kernel: GroupedKernel,
) -> Result<LayerOutput> {
    if world_size == 1 {
        return moe_layer_on(x, w_gate, w, opts, kernel);
    }
    let ranks = LocalRanks::new(x, w, world_size)?;
    let parts = ranks.run(x, w, &[], |c, xs, _, local| {
        let out = moe_layer_expert_parallel_on(c, xs, w_gate, local, opts, kernel)?;
        let ids = out.routing.expert_ids.download()?;
        let locs = out.routing.locations.download()?;
        Ok((
            out.y,
            out.l_aux,
            ids,
            locs,
            out.routing.capacity,
            out.routing.rows_per_expert,
        ))
    })?;
    let y = ranks.concat(x, parts.iter().map(|p| &p.0), 0)?;
    let (mut ids, mut locs) = (Vec::new(), Vec::new());
    for part in &parts {
        ids.extend(part.2.to_f64());
        locs.extend(part.3.to_f64());
    }
    let (s, k) = (x.shape()[0], opts.gate.top_k);
    let whole = |v: &[f64]| -> Result<Tensor> {
        Tensor::upload(
            x.client(),
            &HostTensor::from_f64(DType::I32, vec![s, k], v)?,
        )
    };
    let first = parts.into_iter().next().ok_or_else(|| Error::Kernel {
        kernel: "moe_layer".into(),
        message: "no rank returned".into(),
    })?;
    Ok(LayerOutput {
        y,
        l_aux: first.1,
        routing: MoeRouting::from_gate(whole(&ids)?, whole(&locs)?, None, first.4, &first.5),
    })
}

/// The expert-parallel backward over `world_size` ranks in this process, whole tensors
/// in and out (what `kiln run moe_layer_backward world_size=P` does).
pub fn moe_layer_backward_local_ranks(
    x: &Tensor,
    w_gate: &Tensor,
    w: &ExpertWeights<'_>,
    gate: &GateOptions,
    dy: &Tensor,
    d_l_aux: f64,
    world_size: usize,
) -> Result<LayerGrads> {
    if world_size == 1 {
        return moe_layer_backward(x, w_gate, w, gate, dy, d_l_aux);
    }
    let ranks = LocalRanks::new(x, w, world_size)?;
    let parts = ranks.run(x, w, &[dy], |c, xs, rows, local| {
        moe_layer_backward_expert_parallel(c, xs, w_gate, local, gate, &rows[0], d_l_aux)
    })?;
    let shards = |f: fn(&LayerGrads) -> &Tensor| ranks.concat(x, parts.iter().map(f), 0);
    Ok(LayerGrads {
        dx: ranks.concat(x, parts.iter().map(|g| &g.dx), 0)?,
        d_w_gate: parts[0].d_w_gate.clone(),
        d_w1: shards(|g| &g.d_w1)?,
        d_w2: shards(|g| &g.d_w2)?,
        d_b1: shards(|g| &g.d_b1)?,
        d_b2: shards(|g| &g.d_b2)?,
    })
}

/// The most ranks [`moe_layer_local_ranks`] runs in one process (threads on one device).
pub const MAX_LOCAL_RANKS: usize = 1024;

/// P ranks in threads on one device: token chunks `[q S / P, (q + 1) S / P)` and expert
/// shards `[q E / P, (q + 1) E / P)`.
struct LocalRanks {
    p: usize,
    s: usize,
    e: usize,
}

impl LocalRanks {
    fn new(x: &Tensor, w: &ExpertWeights<'_>, p: usize) -> Result<LocalRanks> {
        check_input("x", x, x.client())?;
        let &[s, _] = x.shape() else {
            return Err(shape_err("x", "[S, M]".into(), x.shape()));
        };
        let e = w.w1.shape().first().copied().unwrap_or(0);
        // Each rank is a thread with its own communicator state (P counters each):
        // capped as ring attention's ranks are.
        if p == 0 || p > MAX_LOCAL_RANKS || e == 0 || e % p != 0 {
            return Err(Error::Param {
                param: "world_size".into(),
                expected: format!(
                    "a divisor of the expert count E = {e}, at most {MAX_LOCAL_RANKS}"
                ),
                found: p.to_string(),
            });
        }
        Ok(LocalRanks { p, s, e })
    }

    fn tokens(&self, q: usize) -> (usize, usize) {
        (q * self.s / self.p, (q + 1) * self.s / self.p)
    }

    /// Runs `body(comm, x chunk, chunks of `rows`, expert shard)` on every rank.
    fn run<T: Send>(
        &self,
        x: &Tensor,
        w: &ExpertWeights<'_>,
        rows: &[&Tensor],
        body: impl Fn(&dyn Communicator, &Tensor, &[Tensor], &ExpertWeights<'_>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let el = self.e / self.p;
        on_local_ranks(x.client(), "moe_layer", self.p, |c| {
            let r = c.rank();
            let (s0, s1) = self.tokens(r);
            let xs = slice_rows(x, 0, s0, s1 - s0, x.dtype())?;
            let chunks: Vec<Tensor> = rows
                .iter()
                .map(|t| slice_rows(t, 0, s0, s1 - s0, t.dtype()))
                .collect::<Result<_>>()?;
            let shard = |t: &Tensor| slice_rows(t, 0, r * el, el, t.dtype());
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
            body(c, &xs, &chunks, &local)
        })
    }

    /// The ranks' parts concatenated along `axis` 0 (tokens or experts).
    fn concat<'a>(
        &self,
        like: &Tensor,
        parts: impl Iterator<Item = &'a Tensor>,
        axis: usize,
    ) -> Result<Tensor> {
        let parts: Vec<&Tensor> = parts.collect();
        let mut shape = parts.first().map_or(vec![0], |t| t.shape().to_vec());
        shape[axis] = parts.iter().map(|t| t.shape()[axis]).sum();
        let out = Tensor::empty(
            like.client(),
            parts.first().map_or(like.dtype(), |t| t.dtype()),
            &shape,
        )?;
        let mut at = 0;
        for t in parts {
            let n = t.shape()[axis];
            copy_rows(t, axis, 0, &out, at, n)?;
            at += n;
        }
        Ok(out)
    }
}
