//! The grouped expert FFN `act(D_e W1_e + b1_e) W2_e + b2_e`: one launch per GEMM over
//! every expert (`moe_grouped_matmul`), in the capacity layout `[E, C, M]` or the
//! sorted layout, where the second GEMM's epilogue also scales each row by its gate and
//! writes it to its route's row (the un-permute), so combine is a sum over k rows.

pub use super::grouped::{
    MoeGroupedMatmul, MoeGroupedMatmulArgs, MoeGroupedMatmulCmma, MoeGroupedMatmulCmmaArgs,
    MoeGroupedMatmulCmmaConfig, MoeGroupedMatmulCmmaProblem, MoeGroupedMatmulConfig,
    MoeGroupedMatmulProblem, MoeGroupedMatmulV4, MoeGroupedMatmulV4Args, MoeGroupedMatmulV4Config,
    MoeGroupedMatmulV4Problem,
};
use super::movement::{combine_from_layout, gather_into_layout};
use super::routing::{MoeRouting, RowLayout};
use crate::launch::{check_input, shape_err, upload_u32};
use crate::matmul::Activation;
use kiln_runtime::tune::Choice;
use kiln_runtime::{DType, Error, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The FMA candidates change tile shapes, never the order of a dot product's terms.
const TOLERANCE: f64 = 1e-5;

/// How far a candidate may differ from the reference (the first staged FMA tile) for an
/// output of `out_dtype`: [`TOLERANCE`] among FMA tiles; with tensor-core candidates,
/// which sum a dot product in another order (16-deep fragments), a few roundings: of
/// the output dtype where it is half precision, else of an f32 partial sum measured
/// against the check's floor (1e-3 of the output's largest magnitude, where one
/// rounding of a large partial sum is about 1e3 f32 epsilons). On the H200 every
/// tensor-core tile of a bf16 layer (K = 264, f32 hidden out) differed by 6.42e-5 and
/// was rejected by 1e-5. A tile that drops or repeats a K slice differs by 1e-1 or more.
fn tolerance(candidates: &[GroupedConfig], out_dtype: DType) -> f64 {
    if candidates
        .iter()
        .any(|c| matches!(c, GroupedConfig::Cmma(_)))
    {
        4.0 * out_dtype.epsilon().max(2.5e-4)
    } else {
        TOLERANCE
    }
}

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

    /// The first GEMM of the FFN on rows `a` grouped by expert: `act(a W1_e + b1_e)`,
    /// `[R, F]` (f32 for half-precision experts), on `kernel`.
    fn hidden(
        &self,
        a: &Tensor,
        groups: &Groups,
        f: usize,
        kernel: GroupedKernel,
    ) -> Result<Tensor> {
        grouped_matmul(
            a,
            self.w1,
            self.b1,
            self.activation,
            groups,
            f,
            false,
            None,
            true,
            kernel,
        )
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
/// operands as 4-wide vectors straight from global memory (K and N multiples of 4: the
/// CPU-adapter path); `Cmma` multiplies on tensor cores (half precision
/// where the device has them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupedConfig {
    /// `moe_grouped_matmul`.
    Staged(MoeGroupedMatmulConfig),
    /// `moe_grouped_matmul_v4`.
    Vec4(MoeGroupedMatmulV4Config),
    /// `moe_grouped_matmul_cmma`.
    Cmma(MoeGroupedMatmulCmmaConfig),
}

impl GroupedConfig {
    /// The kernel and its tunables (tune tables).
    pub fn label(&self) -> String {
        match self {
            GroupedConfig::Staged(c) => format!("staged {}", MoeGroupedMatmul::label(c)),
            GroupedConfig::Vec4(c) => format!("vec4 {}", MoeGroupedMatmulV4::label(c)),
            GroupedConfig::Cmma(c) => format!("cmma {}", MoeGroupedMatmulCmma::label(c)),
        }
    }
}

/// Which grouped GEMM kernel runs ([`grouped_matmul`]; `kiln run moe_expert_ffn --set
/// kernel=..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupedKernel {
    /// The autotuner's choice among every kernel that fits the device and the problem.
    Auto,
    /// The tensor-core kernel's configurations only (tuned among them): half-precision
    /// experts on a device with tensor cores; refused elsewhere (`Error::Unsupported`,
    /// which the self-test reports as a skip).
    TensorCores,
    /// One configuration, untuned (tests and benchmarks); refused where it does not fit.
    Config(GroupedConfig),
}

impl GroupedKernel {
    /// `auto` or `tensor_cores` (the `kernel` parameter).
    pub fn parse(name: &str) -> Result<GroupedKernel> {
        match name {
            "auto" => Ok(GroupedKernel::Auto),
            "tensor_cores" => Ok(GroupedKernel::TensorCores),
            other => Err(Error::Param {
                param: "kernel".into(),
                expected: "auto | tensor_cores".into(),
                found: other.into(),
            }),
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
    /// f16 or bf16 experts: what the tensor-core kernel takes (its `dtypes`, which its
    /// space does not see).
    half: bool,
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
                &grouped_args!(MoeGroupedMatmulV4Args, self, o, c_f, c32, slot_route, gates, on, trans_b: self.trans_b),
            ),
            GroupedConfig::Cmma(cfg) => MoeGroupedMatmulCmma::launch(
                client,
                cfg,
                &grouped_args!(MoeGroupedMatmulCmmaArgs, self, o, c_f, c32, slot_route, gates, on, trans_b: self.trans_b),
            ),
        }
    }

    /// Staged configurations first (the reference the others are checked against),
    /// then the vector kernel's where it applies, then the tensor-core kernel's.
    fn candidates(&self, client: &kiln_runtime::Client) -> Vec<GroupedConfig> {
        let mut all: Vec<GroupedConfig> = MoeGroupedMatmul::space(
            client,
            &grouped_problem!(MoeGroupedMatmulProblem, self, trans_b: self.trans_b),
        )
        .into_iter()
        .map(GroupedConfig::Staged)
        .collect();
        let p = grouped_problem!(MoeGroupedMatmulV4Problem, self, trans_b: self.trans_b);
        all.extend(
            MoeGroupedMatmulV4::space(client, &p)
                .into_iter()
                .map(GroupedConfig::Vec4),
        );
        if self.half {
            all.extend(
                MoeGroupedMatmulCmma::space(
                    client,
                    &grouped_problem!(MoeGroupedMatmulCmmaProblem, self, trans_b: self.trans_b),
                )
                .into_iter()
                .map(GroupedConfig::Cmma),
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
/// through `scatter`; on `kernel` (a configuration must be one of the problem's
/// candidates; tensor cores must have some).
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
    kernel: GroupedKernel,
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
    // Eight elements: the vector kernels read their placeholders as 4- or 8-wide arrays.
    let ph = Tensor::empty(client, DType::F32, &[8])?;
    let ph_f = Tensor::empty(client, dtype, &[8])?;
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
        half: matches!(dtype, DType::F16 | DType::BF16),
    };
    let operands = GroupedOperands {
        a: if a_f32 { b } else { a },
        a32: if a_f32 { a } else { &ph },
        b,
        bias: bias.unwrap_or(b),
        placeholder_f: &ph_f,
        placeholder_32: &ph,
    };
    let cfg = match kernel {
        GroupedKernel::Config(cfg) if problem.candidates(client).contains(&cfg) => cfg,
        GroupedKernel::Config(cfg) => {
            return Err(Error::Param {
                param: "config".into(),
                expected: "one of the grouped GEMM kernels' declared configurations that fits the device and the problem".into(),
                found: cfg.label(),
            })
        }
        GroupedKernel::Auto | GroupedKernel::TensorCores => {
            let tensor_cores = kernel == GroupedKernel::TensorCores;
            let candidates: Vec<GroupedConfig> = problem
                .candidates(client)
                .into_iter()
                .filter(|c| !tensor_cores || matches!(c, GroupedConfig::Cmma(_)))
                .collect();
            if candidates.is_empty() {
                let report = client.report();
                // Only where tensor cores alone were asked for: every problem has staged
                // configurations.
                return Err(Error::Unsupported {
                    device: report.name.clone(),
                    feature: format!(
                        "tensor cores for this MoE grouped GEMM (kernel=tensor_cores: wmma tiles \
                         take f16 or bf16 experts with the GEMM's K and N multiples of 8; found \
                         {dtype} with K = {k}, N = {n}, on a device that reports {}tensor cores)",
                        if report.tensor_cores { "" } else { "no " }
                    ),
                });
            }
            tuned(client, &problem, &candidates, &operands, rows, out_dtype, &ph_u32)?
        }
    };
    let c = Tensor::empty(client, out_dtype, &[scatter.map_or(rows, |s| s.routes), n])?;
    problem.launch(client, &cfg, &operands, &c, scatter, &ph_u32)?;
    Ok(c)
}

/// The tuned configuration of `problem` (see [`grouped_matmul`]): `rows` rows of
/// `out_dtype` out. Tuned on the plain store into fresh outputs (a scattering candidate
/// leaves the rows of dropped routes unwritten, so candidates could not be compared);
/// the scatter changes the epilogue's addresses, not the main loop being tuned.
fn tuned(
    client: &kiln_runtime::Client,
    problem: &GroupedProblem<'_>,
    candidates: &[GroupedConfig],
    operands: &GroupedOperands<'_>,
    rows: usize,
    out_dtype: DType,
    no_routes: &Tensor,
) -> Result<GroupedConfig> {
    let (groups, n, k, dtype) = (problem.groups, problem.n, problem.k, operands.b.dtype());
    let (trans_b, act) = (problem.trans_b, problem.act);
    let tolerance = tolerance(candidates, out_dtype);
    let mut choice = Choice::new("moe_grouped_gemm")
        .sources([
            MoeGroupedMatmul::source_hash(),
            MoeGroupedMatmulV4::source_hash(),
            MoeGroupedMatmulCmma::source_hash(),
        ])
        .dim("max_rows", groups.max_rows)
        .dim("n", n)
        .dim("k", k)
        .dim("experts", groups.experts)
        .exact("dtype", dtype)
        .exact("trans_b", trans_b)
        .exact("act", act)
        .candidates(candidates.iter().copied());
    // The tensor-core kernel alone is another decision than the choice among all.
    if candidates
        .iter()
        .all(|c| matches!(c, GroupedConfig::Cmma(_)))
    {
        choice = choice.exact("kernel", "tensor_cores");
    }
    if let Some(model) = super::cost::model(client.report(), groups.max_rows, n, dtype.size()) {
        choice = choice.cost(model);
    }
    choice.tune(client, tolerance, GroupedConfig::label, |cfg| {
        let c = Tensor::empty(client, out_dtype, &[rows, n])?;
        problem.launch(client, cfg, operands, &c, None, no_routes)?;
        Ok(vec![c])
    })
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
    moe_expert_ffn_on(dispatched, w, GroupedKernel::Auto)
}

/// [`moe_expert_ffn`] with both grouped GEMMs on the configuration `cfg` (no tuning):
/// for tests and benchmarks. `cfg` must fit the device and both GEMMs (e.g. a `Vec4`
/// one needs M and F multiples of 4).
pub fn moe_expert_ffn_with(
    dispatched: &Tensor,
    w: &ExpertWeights<'_>,
    cfg: GroupedConfig,
) -> Result<Tensor> {
    moe_expert_ffn_on(dispatched, w, GroupedKernel::Config(cfg))
}

/// `c[rows of e] = a[rows of e] @ b[e]` for every expert in one launch of configuration
/// `cfg` (no tuning, no epilogue): `a` `[R, K]` holds the experts' rows one expert after
/// the other, `counts[e]` rows each (summing to R); `b` `[E, K, N]`, or `[E, N, K]` with
/// `trans_b` (the layer backward's `dY W2^T`); `c` `[R, N]` in a's dtype. The grouped GEMM
/// kernels alone, for tests and benchmarks; `cfg` must be one the problem offers.
pub fn moe_grouped_matmul_with(
    a: &Tensor,
    b: &Tensor,
    counts: &[usize],
    trans_b: bool,
    cfg: GroupedConfig,
) -> Result<Tensor> {
    let client = a.client();
    check_input("a", a, client)?;
    check_input("b", b, client)?;
    let &[rows, k] = a.shape() else {
        return Err(shape_err("a", "[R, K]".into(), a.shape()));
    };
    let e = counts.len();
    let n = match (b.shape(), trans_b) {
        (&[be, kb, n], false) if be == e && kb == k => n,
        (&[be, n, kb], true) if be == e && kb == k => n,
        _ => {
            let want = match trans_b {
                false => format!("[{e}, {k}, N] (one [K, N] matrix per group of counts)"),
                true => format!("[{e}, N, {k}] (trans_b; one per group of counts)"),
            };
            return Err(shape_err("b", want, b.shape()));
        }
    };
    if b.dtype() != a.dtype() {
        return Err(Error::DType {
            tensor: "b".into(),
            expected: format!("{} (a's dtype)", a.dtype()),
            found: b.dtype().name().into(),
        });
    }
    let groups = Groups::consecutive(a, counts, rows, "a")?;
    grouped_matmul(
        a,
        b,
        None,
        Activation::None,
        &groups,
        n,
        trans_b,
        None,
        false,
        GroupedKernel::Config(cfg),
    )
}

/// [`moe_expert_ffn`] with both grouped GEMMs on `kernel` (`kiln run moe_expert_ffn
/// --set kernel=tensor_cores`: the tensor-core kernel, tuned among its tiles).
pub fn moe_expert_ffn_on(
    dispatched: &Tensor,
    w: &ExpertWeights<'_>,
    kernel: GroupedKernel,
) -> Result<Tensor> {
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
    let h = w.hidden(&a, &groups, f, kernel)?;
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
        kernel,
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
    moe_expert_ffn_sorted_on(x, routing, w, GroupedKernel::Auto)
}

/// [`moe_expert_ffn_sorted`] with both grouped GEMMs on the configuration `cfg` (no
/// tuning; the second with the scatter epilogue): for tests and benchmarks.
pub fn moe_expert_ffn_sorted_with(
    x: &Tensor,
    routing: &MoeRouting,
    w: &ExpertWeights<'_>,
    cfg: GroupedConfig,
) -> Result<Tensor> {
    moe_expert_ffn_sorted_on(x, routing, w, GroupedKernel::Config(cfg))
}

/// [`moe_expert_ffn_sorted`] with both grouped GEMMs on `kernel`.
pub fn moe_expert_ffn_sorted_on(
    x: &Tensor,
    routing: &MoeRouting,
    w: &ExpertWeights<'_>,
    kernel: GroupedKernel,
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
    let h = w.hidden(&d, &groups, f, kernel)?;
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
        kernel,
    )?;
    combine_from_layout(&per_route, routing, RowLayout::Sorted, false, true)
}
