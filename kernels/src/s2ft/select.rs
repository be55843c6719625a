//! Selection: which units (KV groups of heads, or FFN channels) are trained, and the
//! co-permutation that makes them contiguous.
//!
//! Two sets per coupled pair: A (units whose rows are trained: `W_v`, `W_up`, `W_gate`)
//! and B (units whose columns are trained: `W_o`, `W_down`). Strategies: random (the
//! paper's default; SplitMix64 from `seed`, a partial Fisher-Yates shuffle, B drawn from
//! a second stream), the largest weight norms, the largest mean calibration activation,
//! or an explicit list. Scores are device reductions, one cube per unit, f32 sums; ties
//! go to the lower unit index. The permutation is host data (a few thousand integers).

use crate::launch::{check_input, shape_err};
use cubecl::prelude::*;
use kiln_dsl::cube_sum;
use kiln_runtime::{check::Rng, DType, Error, Result, Tensor};
use std::ops::Range;

/// How [`s2ft_select`] picks the units of A and B.
pub enum Strategy<'a> {
    /// Uniformly at random, reproducible from `seed` (A and B from two streams).
    Random {
        /// Seed of the SplitMix64 generator.
        seed: u64,
    },
    /// The largest L2 norms: A by the unit row blocks of `row_weight` `[U r, in]`
    /// (the matrix whose rows are trained, e.g. `W_v`), B by the unit column blocks of
    /// `col_weight` `[out, U unit]` (e.g. `W_o`). A row unit's height `r` is
    /// `row_weight`'s rows over `U`: with grouped-query attention a unit (a KV group) is
    /// `head_dim` rows of `W_v` but `heads per group x head_dim` columns of `W_o`.
    WeightNorm {
        /// `[U r, in]`, `r` rows a unit.
        row_weight: &'a Tensor,
        /// `[out, U unit]`.
        col_weight: &'a Tensor,
    },
    /// The largest mean `|a|` of a calibration batch `activations` `[T, U unit]` (the
    /// input of the column-block matrix: attention outputs before `W_o`, the FFN hidden
    /// before `W_down`), for both A and B.
    Activation {
        /// `[T, U unit]`.
        activations: &'a Tensor,
    },
    /// Exactly these units (distinct, each `< U`).
    Explicit {
        /// Units of A.
        a: &'a [usize],
        /// Units of B.
        b: &'a [usize],
    },
}

/// The most units a co-permutation has: 2^24 (heads, channels or rows of one weight;
/// the host holds a few words per unit, about 0.5 GiB at the bound).
pub const MAX_UNITS: usize = 1 << 24;

/// `perm` holds every unit of `0..perm.len()` exactly once, at most [`MAX_UNITS`] of
/// them (errors name `perm` and the first entry out of range or repeated).
fn check_perm(perm: &[usize]) -> Result<()> {
    let n = perm.len();
    if n > MAX_UNITS {
        return Err(Error::Param {
            param: "perm".into(),
            expected: format!("a permutation of at most {MAX_UNITS} units"),
            found: format!("{n} units"),
        });
    }
    let mut seen = vec![false; n];
    for (p, &u) in perm.iter().enumerate() {
        if u >= n || seen[u] {
            return Err(Error::Param {
                param: "perm".into(),
                expected: format!("a permutation of 0..{n}"),
                found: match u >= n {
                    true => format!("perm[{p}] = {u}, out of range"),
                    false => format!("perm[{p}] = {u}, repeated"),
                },
            });
        }
        seen[u] = true;
    }
    Ok(())
}

/// A co-permutation of `U` units: new unit `p` is old unit `perm[p]`, old unit `u` is at
/// `inverse[u]`. Order: A-only, shared (A and B), B-only, the rest, each ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S2ftPermutation {
    /// New position -> old unit.
    pub perm: Vec<usize>,
    /// Old unit -> new position.
    pub inverse: Vec<usize>,
    /// Units in A only.
    pub a_only: usize,
    /// Units in both A and B.
    pub shared: usize,
    /// Units in B only.
    pub b_only: usize,
}

impl S2ftPermutation {
    /// The permutation of `num_units` units that places the sets `a` and `b` (distinct
    /// units `< num_units` each) in the S²FT order. Errors name `units_a` / `units_b`.
    pub fn from_sets(num_units: usize, a: &[usize], b: &[usize]) -> Result<Self> {
        if num_units > MAX_UNITS {
            return Err(Error::Param {
                param: "num_units".into(),
                expected: format!("at most {MAX_UNITS}"),
                found: num_units.to_string(),
            });
        }
        let mark = |name: &str, set: &[usize]| -> Result<Vec<bool>> {
            let mut m = vec![false; num_units];
            for &u in set {
                if u >= num_units || m[u] {
                    return Err(Error::Param {
                        param: name.into(),
                        expected: format!("distinct units in 0..{num_units}"),
                        found: format!("{set:?}"),
                    });
                }
                m[u] = true;
            }
            Ok(m)
        };
        let (in_a, in_b) = (mark("units_a", a)?, mark("units_b", b)?);
        let class = |u: usize| match (in_a[u], in_b[u]) {
            (true, false) => 0,
            (true, true) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        let mut perm: Vec<usize> = (0..num_units).collect();
        perm.sort_by_key(|&u| (class(u), u));
        let count = |c: usize| (0..num_units).filter(|&u| class(u) == c).count();
        Ok(Self::with_perm(perm, count(0), count(1), count(2)))
    }

    fn with_perm(perm: Vec<usize>, a_only: usize, shared: usize, b_only: usize) -> Self {
        let mut inverse = vec![0; perm.len()];
        for (p, &u) in perm.iter().enumerate() {
            inverse[u] = p;
        }
        Self {
            perm,
            inverse,
            a_only,
            shared,
            b_only,
        }
    }

    /// Checks a permutation given as data (`kiln run`'s `perm`): every unit exactly once.
    pub fn from_perm(perm: Vec<usize>) -> Result<Self> {
        check_perm(&perm)?;
        Ok(Self::with_perm(perm, 0, 0, 0))
    }

    /// Checks that the fields describe one co-permutation (they are public, so a caller
    /// may have built or changed them): `perm` a permutation of `0..U`, `inverse` its
    /// inverse, and the set sizes within `U`. Every operator that takes a permutation
    /// checks it before any kernel reads it.
    pub fn check(&self) -> Result<()> {
        check_perm(&self.perm)?;
        let n = self.perm.len();
        let bad = |expected: String, found: String| Error::Param {
            param: "S2ftPermutation".into(),
            expected,
            found,
        };
        if self.inverse.len() != n
            || self
                .perm
                .iter()
                .enumerate()
                .any(|(p, &u)| self.inverse[u] != p)
        {
            return Err(bad(
                format!("`inverse` the inverse of `perm` ({n} units)"),
                format!("an `inverse` of {} entries that is not", self.inverse.len()),
            ));
        }
        let sets = self
            .a_only
            .checked_add(self.shared)
            .and_then(|x| x.checked_add(self.b_only));
        if sets.is_none_or(|s| s > n) {
            return Err(bad(
                format!("a_only + shared + b_only <= {n} units"),
                format!("{} + {} + {}", self.a_only, self.shared, self.b_only),
            ));
        }
        Ok(())
    }

    /// Number of units.
    pub fn units(&self) -> usize {
        self.perm.len()
    }

    /// The trained row block in units (after permutation): `0 .. |A|`.
    pub fn row_block(&self) -> Range<usize> {
        0..self.a_only + self.shared
    }

    /// The trained column block in units (after permutation): `|A-only| .. |A| + |B-only|`.
    pub fn col_block(&self) -> Range<usize> {
        self.a_only..self.a_only + self.shared + self.b_only
    }

    /// The inverse permutation (undoes this one).
    pub fn inverted(&self) -> Self {
        Self::with_perm(self.inverse.clone(), 0, 0, 0)
    }
}

/// Picks `count_a` units for A and `count_b` for B among `num_units` units of
/// `unit_size` rows or columns each, by `strategy`, and returns the co-permutation.
pub fn s2ft_select(
    num_units: usize,
    unit_size: usize,
    count_a: usize,
    count_b: usize,
    strategy: &Strategy<'_>,
) -> Result<S2ftPermutation> {
    for (name, count) in [("count_a", count_a), ("count_b", count_b)] {
        if count > num_units {
            return Err(Error::Param {
                param: name.into(),
                expected: format!("at most the number of units, {num_units}"),
                found: count.to_string(),
            });
        }
    }
    if unit_size == 0 {
        return Err(Error::Param {
            param: "unit_size".into(),
            expected: ">= 1".into(),
            found: "0".into(),
        });
    }
    // The permutation, its inverse and the set marks are held on the host (a few words
    // per unit), and the units' rows (columns) index a tensor: bounded by MAX_UNITS.
    if num_units > MAX_UNITS {
        return Err(Error::Param {
            param: "num_units".into(),
            expected: format!("at most {MAX_UNITS}"),
            found: num_units.to_string(),
        });
    }
    if kiln_runtime::indexable_product(&[num_units, unit_size]).is_none() {
        return Err(Error::Param {
            param: "unit_size".into(),
            expected: format!(
                "num_units x unit_size at most {} ({num_units} units)",
                crate::launch::MAX_ELEMENTS
            ),
            found: unit_size.to_string(),
        });
    }
    let (a, b) = match strategy {
        Strategy::Random { seed } => (
            random_units(num_units, count_a, *seed),
            random_units(num_units, count_b, seed ^ 0x5332_4654_425f_b5e7),
        ),
        Strategy::Explicit { a, b } => {
            for (name, set, count) in [("units_a", a, count_a), ("units_b", b, count_b)] {
                if set.len() != count {
                    return Err(Error::Param {
                        param: name.into(),
                        expected: format!("{count} units (the count)"),
                        found: format!("{set:?}"),
                    });
                }
            }
            (a.to_vec(), b.to_vec())
        }
        Strategy::WeightNorm {
            row_weight,
            col_weight,
        } => {
            let height = match row_weight.shape() {
                // No units: nothing to score (an empty selection).
                &[0, _] if num_units == 0 => 1,
                &[r, _] if num_units > 0 && r % num_units == 0 && r >= num_units => r / num_units,
                other => {
                    return Err(shape_err(
                        "row_weight",
                        format!("[U r, in]: rows a positive multiple of the {num_units} units"),
                        other,
                    ))
                }
            };
            let rows = unit_scores("row_weight", row_weight, num_units, height, true, true)?;
            let cols = unit_scores("col_weight", col_weight, num_units, unit_size, false, true)?;
            (top_units(&rows, count_a), top_units(&cols, count_b))
        }
        Strategy::Activation { activations } => {
            let s = unit_scores(
                "activations",
                activations,
                num_units,
                unit_size,
                false,
                false,
            )?;
            (top_units(&s, count_a), top_units(&s, count_b))
        }
    };
    S2ftPermutation::from_sets(num_units, &a, &b)
}

/// `count` distinct units of `0..n` drawn uniformly (partial Fisher-Yates, SplitMix64).
fn random_units(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut units: Vec<usize> = (0..n).collect();
    for i in 0..count {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        units.swap(i, j);
    }
    units.truncate(count);
    units
}

/// The `count` units of largest score (NaN lowest; ties: the lower unit).
pub(super) fn top_units(scores: &[f64], count: usize) -> Vec<usize> {
    let key = |u: usize| {
        if scores[u].is_nan() {
            f64::NEG_INFINITY
        } else {
            scores[u]
        }
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&x, &y| key(y).total_cmp(&key(x)).then(x.cmp(&y)));
    order.truncate(count);
    order
}

/// Per-unit score of `t` (`[U unit, C]` with `rows`: over each unit's rows; `[R, U
/// unit]` otherwise: over each unit's columns): the sum of squares with `squares`, else
/// the sum of `|x|`.
fn unit_scores(
    name: &str,
    t: &Tensor,
    units: usize,
    unit_size: usize,
    rows: bool,
    squares: bool,
) -> Result<Vec<f64>> {
    check_input(name, t, t.client())?;
    let &[r, c] = t.shape() else {
        return Err(shape_err(name, "a matrix".into(), t.shape()));
    };
    let along = if rows { r } else { c };
    if along != units * unit_size {
        let want = match rows {
            true => format!("[{} (units x unit_size), C]", units * unit_size),
            false => format!("[R, {} (units x unit_size)]", units * unit_size),
        };
        return Err(shape_err(name, want, t.shape()));
    }
    let scores = Tensor::empty(t.client(), DType::F32, &[units.max(1)])?;
    if units == 0 {
        return Ok(vec![]);
    }
    // Element (i of `outer`, j of the unit) of unit u: `(u unit + j) si + i so`.
    let (outer, so, si) = if rows { (c, 1, c) } else { (r, c, 1) };
    S2ftUnitScores::tuned(
        t.client(),
        1e-5,
        &S2ftUnitScoresArgs {
            x: t,
            scores: &scores,
            units: units as u32,
            outer: outer as u32,
            unit_size: unit_size as u32,
            outer_stride: so as u32,
            inner_stride: si as u32,
            squares,
        },
    )?;
    Ok(scores.download()?.to_f64())
}

/// `scores[u] = sum f(x[(u unit_size + j) inner_stride + i outer_stride])` over `j <
/// unit_size`, `i < outer`, with `f` the square (`squares`) or `|.|`: one cube per
/// unit, f32 partial sums in a fixed tree order (deterministic).
#[kiln_macros::kernel(
    tune(UNITS = [256, 64]),
    key(units = pow2, outer = pow2, unit_size = pow2, dtype),
    grid = cubes(units),
    cube = UNITS,
    defaults(squares = true)
)]
pub fn s2ft_unit_scores<F: Float>(
    x: &Array<F>,
    scores: &mut Array<f32>,
    units: u32,
    outer: u32,
    unit_size: u32,
    outer_stride: u32,
    inner_stride: u32,
    #[comptime] squares: bool,
) {
    let u = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    // Every unit of the cube takes part in the reduction; a cube past the end reads unit 0.
    let base = select(u < units, u, 0) * unit_size;
    let n = outer * unit_size;
    let mut acc = 0.0f32;
    let mut e = UNIT_POS;
    while e < n {
        let (i, j) = (e / unit_size, e % unit_size);
        let v = f32::cast_from(x[((base + j) * inner_stride + i * outer_stride) as usize]);
        if comptime!(squares) {
            acc += v * v;
        } else {
            acc += f32::abs(v);
        }
        e += UNITS;
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let total = cube_sum(&mut smem, acc, UNITS);
    if UNIT_POS == 0 && u < units {
        scores[u as usize] = total;
    }
}
