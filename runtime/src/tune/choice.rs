//! Choices between kernels or algorithms, tuned like a kernel's configurations.

use super::{fnv1a_hex, Autotuner, Ranking, Tolerance, TuneKey, WarmUp};
use crate::{Client, Result, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;

/// A candidate's predicted cost (lower is better), shared by the choice's copies.
type CostModel<C> = Arc<dyn Fn(&C) -> f64>;

/// A tuning decision among candidates that may come from several kernels, or be
/// whole algorithms (a GEMV against a tiled GEMM, a fused kernel against a pipeline):
/// one key type and one validation rule for every such choice.
///
/// The key is the decision's name, a hash of the sources of every kernel a candidate
/// may run (an edited kernel or DSL function is tuned anew), and named problem
/// dimensions, bucketed to powers of two ([`Choice::dim`]) or exact ([`Choice::exact`]).
///
/// ```ignore
/// let path = Choice::new("qgemm_path")
///     .sources([QgemmGemv::source_hash(), QgemmTiled::source_hash()])
///     .dim("m", m).dim("n", n).dim("k", k).exact("dtype", y.dtype())
///     .candidates([Path::Gemv, Path::Tiled])
///     .tune(client, 1e-2, |p| format!("{p:?}"), |&p| Ok(vec![run(p)?]))?;
/// ```
#[derive(Clone)]
pub struct Choice<C> {
    name: &'static str,
    sources: Vec<String>,
    shape: Vec<String>,
    candidates: Vec<C>,
    cost: Option<CostModel<C>>,
    /// The ranked search's finalists and ties (see [`Choice::finalists`]).
    finalists: Option<usize>,
    ties: f64,
}

impl<C: std::fmt::Debug> std::fmt::Debug for Choice<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Choice")
            .field("name", &self.name)
            .field("shape", &self.shape.join(";"))
            .field("candidates", &self.candidates)
            .field("cost_model", &self.cost.is_some())
            .finish()
    }
}

impl<C> Choice<C>
where
    C: Clone + PartialEq + Serialize + DeserializeOwned,
{
    /// A decision named `name` (as it appears in `kiln tune` and the cache).
    pub fn new(name: &'static str) -> Self {
        Choice {
            name,
            sources: Vec::new(),
            shape: Vec::new(),
            candidates: Vec::new(),
            cost: None,
            finalists: None,
            ties: Ranking::<C>::DEFAULT_TIES,
        }
    }

    /// The source hashes of the kernels the candidates may run.
    pub fn sources<S: Into<String>>(mut self, hashes: impl IntoIterator<Item = S>) -> Self {
        self.sources.extend(hashes.into_iter().map(Into::into));
        self
    }

    /// A problem dimension, rounded up to a power of two in the key.
    pub fn dim(mut self, name: &str, value: usize) -> Self {
        self.shape
            .push(format!("{name}={}", value.next_power_of_two()));
        self
    }

    /// A key part taken as it is (a dtype, a flag, a mode).
    pub fn exact(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.shape.push(format!("{name}={value}"));
        self
    }

    /// Adds candidates, in preference order: the first is what runs untuned, and the
    /// reference every other candidate's outputs are checked against.
    pub fn candidates(mut self, candidates: impl IntoIterator<Item = C>) -> Self {
        self.candidates.extend(candidates);
        self
    }

    /// A cost model: the estimated time of a candidate in any unit (lower is better).
    /// With one, a ranked search ([`super::Search`]) times only the best-ranked few.
    pub fn cost(mut self, model: impl Fn(&C) -> f64 + 'static) -> Self {
        self.cost = Some(Arc::new(model));
        self
    }

    /// How far a ranked search trusts the cost model: it times the model's best `most`
    /// (not the tuner's default [`Autotuner::finalists`]) plus those estimated within
    /// `ties` (relative) of the last of them. For a model checked against exhaustive
    /// searches of this decision; each finalist's compilation is most of a search.
    pub fn finalists(mut self, most: usize, ties: f64) -> Self {
        self.finalists = Some(most);
        self.ties = ties;
        self
    }

    /// The candidates in the cost model's order, best first, each with its estimate
    /// (declaration order and no estimate without a model).
    pub fn ranking(&self) -> Vec<(C, Option<f64>)> {
        match &self.cost {
            Some(cost) => super::search::rank(&self.candidates, cost.as_ref())
                .into_iter()
                .map(|(i, e)| (self.candidates[i].clone(), Some(e)))
                .collect(),
            None => self.candidates.iter().map(|c| (c.clone(), None)).collect(),
        }
    }

    /// The candidates so far.
    pub fn list(&self) -> &[C] {
        &self.candidates
    }

    /// The cache key of this decision.
    pub fn key(&self) -> TuneKey {
        TuneKey {
            kernel: self.name,
            source_hash: fnv1a_hex(&self.sources.concat()),
            shape: self.shape.join(";"),
        }
    }

    /// Picks a candidate with the global [`Autotuner`]: `run` launches one and returns
    /// its outputs, which must agree with the first candidate's within `tolerance`
    /// (see [`Autotuner::tune`]) before its time counts.
    pub fn tune(
        &self,
        client: &Client,
        tolerance: impl Into<Tolerance>,
        label: impl Fn(&C) -> String,
        run: impl Fn(&C) -> Result<Vec<Tensor>>,
    ) -> Result<C> {
        self.tune_warmed(client, tolerance, label, None, run)
    }

    /// [`Choice::tune`] with a warm-up: `warm` compiles a candidate by launching the same
    /// kernel on little work (a `#[kiln::kernel]` kernel's `warm_up`), or returns `false`
    /// where it cannot (see [`Autotuner::tune_warmed`]).
    pub fn tune_warmed(
        &self,
        client: &Client,
        tolerance: impl Into<Tolerance>,
        label: impl Fn(&C) -> String,
        warm: Option<WarmUp<'_, C>>,
        run: impl Fn(&C) -> Result<Vec<Tensor>>,
    ) -> Result<C> {
        Autotuner::global().tune_warmed(
            client,
            &self.key(),
            &self.candidates,
            label,
            run,
            tolerance,
            self.cost.as_deref().map(|cost| Ranking {
                cost,
                finalists: self.finalists,
                ties: self.ties,
            }),
            warm,
        )
    }
}
