//! FRUGAL's SVD projection (the authors' `GaloreOptimizer`, `proj_type = "svd"`,
//! `proj_side = "std"`): Adam state on the low-rank projection of the gradient onto its
//! leading singular vectors (GaLore's subspace), signSGD on what the projection leaves:
//!
//! ```text
//! G [rows, cols] (a tensor seen as frugal_matrix(shape)), s = min(rows, cols), r = ceil(density s)
//! P = the r leading right singular vectors of G ([r, cols], rows >= cols) or left ones ([r, rows]),
//!     of the gradient of the first step of each subspace (every update_gap steps)
//! low  = G P^T [rows, r]          or  P G [r, cols]
//! m, v = Adam's moments of low (reset at each new P; t counts from it)
//! p   *= 1 - lr wd
//! p   += up(-lr m̂ / (sqrt(v̂) + eps)) - lr_free sign(G - up(low))     up(x) = x P  or  P^T x
//! ```
//!
//! The singular vectors come from the device's one-sided Jacobi ([`crate::svd`]); a step
//! is five launches per tensor (the low-rank product, Adam on it, the two products back,
//! the update; a sixth copies an f16/bf16 gradient to f32; at full rank, `r = s`, the
//! residual is zero and neither formed nor signed, since its rounding would move every
//! coordinate by `lr_free`) and one to advance the device step counter, no host synchronisation
//! (a new P adds the Jacobi sweeps, which read one value per sweep back). State per
//! tensor: `P` (`4 r s` bytes; also transposed, `4 r rows`, when the left side is
//! taken), the moments (`8 r max(rows, cols)`) and, for an f16/bf16 tensor, its f32
//! master copy; scratch during a step: the low-rank gradient and direction, two
//! `[rows, cols]` f32 products and a half gradient's f32 copy. The rank is `ceil(density s)` (the authors round; kiln's
//! line and block subspaces count `ceil` too), at least 1.

use super::super::adam::{adam_constants, adam_direction_of, adam_moments_of};
use super::super::{Hyper, OptimAdvanceStep, OptimAdvanceStepArgs, Rule};
use super::{check_step_pair, frugal_matrix, param_name, FrugalConfig, Subspace};
use crate::launch::{check_input, expect_shape, upload_u32};
use crate::matmul::{matmul, Epilogue};
use crate::svd::{load_f32, top_singular_vectors, Side};
use cubecl::prelude::*;
use kiln_dsl::linear_unit;
use kiln_runtime::{DType, Error, Result, Tensor};

/// One tensor of a [`FrugalSvd`] list.
struct Projected {
    rows: usize,
    cols: usize,
    dtype: DType,
    side: Side,
    rank: usize,
    /// `[r, cols]` (right) or `[r, rows]` (left), rows orthonormal; and for the left side
    /// its transpose `[rows, r]` (the product back).
    projection: Tensor,
    transposed: Option<Tensor>,
    /// Adam's moments of the low-rank gradient (`[rows, r]` or `[r, cols]`).
    m: Tensor,
    v: Tensor,
    /// An f16/bf16 tensor's f32 master copy (`[rows, cols]`), else a 4-element
    /// placeholder (it never narrows the update's vector width).
    master: Tensor,
}

impl Projected {
    /// The low-rank gradient's shape.
    /// The projection's shape: `[r, cols]` (right side) or `[r, rows]` (left side).
    fn projection_shape(&self) -> [usize; 2] {
        match self.side {
            Side::Right => [self.rank, self.cols],
            Side::Left => [self.rank, self.rows],
        }
    }

    fn low_shape(&self) -> [usize; 2] {
        match self.side {
            Side::Right => [self.rows, self.rank],
            Side::Left => [self.rank, self.cols],
        }
    }
}

/// FRUGAL with the SVD projection for a list of f32/f16/bf16 tensors (each seen as
/// [`frugal_matrix`]); [`FrugalSvd::step_multi`] updates them in place.
pub struct FrugalSvd {
    /// Adam's part (`lr`, `beta1`, `beta2`, `eps`, `weight_decay`; may change between
    /// steps).
    pub hyper: Hyper,
    /// FRUGAL's part: `density` (the rank, fixed at creation), `update_gap`, `lr_free`
    /// (may change); `subspace` is `Svd`, `seed` and `block_order` are unused.
    pub config: FrugalConfig,
    tensors: Vec<Projected>,
    density: f64,
    counter: Tensor,
    steps: u64,
}

/// A saved state of one tensor for [`FrugalSvd::resume_multi`]: its projection and
/// moments (as [`FrugalSvd::state_of`] gives them).
pub type SvdState<'a> = (&'a Tensor, &'a Tensor, &'a Tensor);

impl FrugalSvd {
    /// Zero state for each of `params` (the first projection is taken at the first step).
    pub fn new_multi(params: &[&Tensor], hyper: Hyper, config: FrugalConfig) -> Result<Self> {
        Self::resume_multi(params, hyper, config, 0, &[])
    }

    /// Resumes after `steps` steps. Mid-subspace (`steps % update_gap != 0`) every tensor
    /// needs its `(projection, m, v)` (shapes as [`FrugalSvd::state_of`]); at a subspace's
    /// start the next step takes a new projection and `state` may be empty. A half
    /// tensor's master copy is read from it ([`FrugalSvd::set_master`] gives a saved one).
    pub fn resume_multi(
        params: &[&Tensor],
        hyper: Hyper,
        config: FrugalConfig,
        steps: u64,
        state: &[Option<SvdState<'_>>],
    ) -> Result<Self> {
        hyper.check(Rule::AdamW)?;
        config.check()?;
        if config.subspace != Subspace::Svd {
            return Err(Error::Param {
                param: "subspace".into(),
                expected: "svd (the others: Frugal)".into(),
                found: config.subspace.to_string(),
            });
        }
        let Some(first) = params.first() else {
            return Err(Error::Param {
                param: "params".into(),
                expected: "at least one tensor".into(),
                found: "none".into(),
            });
        };
        let client = first.client().clone();
        let mid = !steps.is_multiple_of(config.update_gap);
        if (mid || !state.is_empty()) && state.len() != params.len() {
            return Err(Error::Param {
                param: "state".into(),
                expected: format!(
                    "one (projection, m, v) per param ({}){}",
                    params.len(),
                    if mid { " mid-subspace" } else { ", or none" }
                ),
                found: state.len().to_string(),
            });
        }
        // Zeros of `shape` (`[1]` for an empty one: a binding is never empty).
        let zeros = |shape: &[usize]| -> Result<Tensor> {
            let shape = match shape.iter().product::<usize>() {
                0 => vec![1],
                _ => shape.to_vec(),
            };
            Tensor::zeros(&client, DType::F32, &shape)
        };
        let mut tensors = Vec::with_capacity(params.len());
        for (i, param) in params.iter().enumerate() {
            let name = param_name(params.len(), "param", i);
            check_input(&name, param, &client)?;
            param.expect_dtype(&name, &[DType::F32, DType::F16, DType::BF16])?;
            let (rows, cols) = frugal_matrix(param.shape());
            let side = if rows >= cols {
                Side::Right
            } else {
                Side::Left
            };
            let rank = config.rank(param.shape());
            let master = match param.dtype() {
                DType::F32 => Tensor::empty(&client, DType::F32, &[4])?,
                _ => load_f32(&param.reshape(&[rows, cols])?, false)?,
            };
            let mut t = Projected {
                rows,
                cols,
                dtype: param.dtype(),
                side,
                rank,
                projection: zeros(&[0])?,
                transposed: None,
                m: zeros(&[0])?,
                v: zeros(&[0])?,
                master,
            };
            let (proj_shape, low) = (t.projection_shape(), t.low_shape());
            (t.projection, t.m, t.v) = (zeros(&proj_shape)?, zeros(&low)?, zeros(&low)?);
            match state.get(i).copied().flatten() {
                Some((projection, m, v)) => {
                    for (tensor, what, shape) in [
                        (projection, "projection", proj_shape),
                        (m, "m", low),
                        (v, "v", low),
                    ] {
                        let what = param_name(params.len(), what, i);
                        check_input(&what, tensor, &client)?;
                        tensor.expect_dtype(&what, &[DType::F32])?;
                        expect_shape(
                            &what,
                            tensor,
                            &shape,
                            "[r, cols] (rows >= cols) or [r, rows] for P, the low-rank gradient's shape for m, v; r = ceil(density min(rows, cols))",
                        )?;
                    }
                    // An empty tensor (rank 0) keeps its placeholders (see `zeros`)
                    // and is never stepped.
                    if rank > 0 {
                        t.projection = load_f32(projection, false)?;
                        t.m = load_f32(m, false)?;
                        t.v = load_f32(v, false)?;
                        if side == Side::Left {
                            t.transposed = Some(load_f32(&t.projection, true)?);
                        }
                    }
                }
                None if mid && rank > 0 => {
                    return Err(Error::Param {
                        param: param_name(params.len(), "projection", i),
                        expected:
                            "the current subspace's projection and moments to resume mid-subspace"
                                .into(),
                        found: "none".into(),
                    })
                }
                None => {}
            }
            tensors.push(t);
        }
        Ok(FrugalSvd {
            hyper,
            config,
            tensors,
            density: config.density,
            counter: upload_u32(&client, "step", &[(steps % config.update_gap) as u32])?,
            steps,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The rank of the `i`-th tensor's projection.
    pub fn rank_of(&self, i: usize) -> Result<usize> {
        Ok(self.at(i)?.rank)
    }

    /// The `i`-th tensor's projection (`[r, cols]` when rows >= cols, else `[r, rows]`;
    /// rows orthonormal) and moments (the low-rank gradient's shape), as copies.
    pub fn state_of(&self, i: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let t = self.at(i)?;
        // An empty part (rank 0, or an empty tensor) is held as one placeholder element
        // (a binding is never empty): give it back in its declared shape.
        let copy = |x: &Tensor, shape: [usize; 2]| match shape[0] * shape[1] {
            0 => Tensor::empty(x.client(), DType::F32, &shape),
            _ => load_f32(x, false),
        };
        Ok((
            copy(&t.projection, t.projection_shape())?,
            copy(&t.m, t.low_shape())?,
            copy(&t.v, t.low_shape())?,
        ))
    }

    /// The f32 master copy of the `i`-th tensor (`None` for an f32 tensor), `[rows,
    /// cols]` of [`frugal_matrix`], as a copy.
    pub fn master_of(&self, i: usize) -> Result<Option<Tensor>> {
        let t = self.at(i)?;
        match t.dtype {
            DType::F32 => Ok(None),
            _ => load_f32(&t.master, false).map(Some),
        }
    }

    /// Replaces the master copy of the `i`-th tensor (f16/bf16) by `master` (f32, as
    /// many elements as the tensor).
    pub fn set_master(&mut self, i: usize, master: &Tensor) -> Result<()> {
        let name = param_name(self.tensors.len(), "master", i);
        let t = self.at(i)?;
        if t.dtype == DType::F32 {
            return Err(Error::Param {
                param: name,
                expected: "a master copy only for an f16/bf16 tensor".into(),
                found: format!("tensor {i} is f32"),
            });
        }
        check_input(&name, master, t.master.client())?;
        master.expect_dtype(&name, &[DType::F32])?;
        if master.numel() != t.rows * t.cols {
            return Err(Error::Shape {
                tensor: name,
                expected: format!("{} elements (the tensor's)", t.rows * t.cols),
                found: format!("{:?}", master.shape()),
            });
        }
        let (rows, cols) = (t.rows, t.cols);
        self.tensors[i].master = load_f32(&master.reshape(&[rows, cols])?, false)?;
        Ok(())
    }

    fn at(&self, i: usize) -> Result<&Projected> {
        self.tensors.get(i).ok_or_else(|| Error::Param {
            param: "tensor".into(),
            expected: format!("< {}", self.tensors.len()),
            found: i.to_string(),
        })
    }

    /// One step of every tensor of the list (as created, in order) by its gradient (the
    /// tensor's dtype and shape), in place. At a subspace's first step each projection is
    /// taken from that step's gradient and the moments restart from zero.
    pub fn step_multi(&mut self, params: &[&Tensor], grads: &[&Tensor]) -> Result<()> {
        let count = self.tensors.len();
        super::super::expect_list(count, params.len(), grads.len())?;
        let client = self.counter.client().clone();
        for (i, (t, (param, grad))) in self
            .tensors
            .iter()
            .zip(params.iter().zip(grads))
            .enumerate()
        {
            check_step_pair(count, i, param, grad, t.rows * t.cols, t.dtype, &client)?;
        }
        self.hyper.check(Rule::AdamW)?;
        self.config.check()?;
        if self.config.subspace != Subspace::Svd {
            return Err(Error::Param {
                param: "subspace".into(),
                expected: "svd (as created: FrugalSvd steps only the SVD subspace)".into(),
                found: self.config.subspace.to_string(),
            });
        }
        if self.config.density != self.density {
            return Err(Error::Param {
                param: "density".into(),
                expected: format!("{} (as created: it fixes the rank)", self.density),
                found: self.config.density.to_string(),
            });
        }
        let redraw = self.steps.is_multiple_of(self.config.update_gap);
        if redraw {
            // Counter 0: the step starts the moments from zero.
            self.counter = upload_u32(&client, "step", &[0])?;
        }
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            self.step_one(i, param, grad, redraw)?;
        }
        OptimAdvanceStep::tuned(
            &client,
            0.0,
            &OptimAdvanceStepArgs {
                counter: &self.counter,
            },
        )?;
        self.steps += 1;
        Ok(())
    }

    /// One tensor's step (see the module's formula).
    fn step_one(&mut self, i: usize, param: &Tensor, grad: &Tensor, redraw: bool) -> Result<()> {
        let h = self.hyper;
        let lr_free = self.config.lr_free;
        let t = &mut self.tensors[i];
        if t.rank == 0 {
            return Ok(());
        }
        let (rows, cols) = (t.rows, t.cols);
        let g = match t.dtype {
            DType::F32 => grad.reshape(&[rows, cols])?,
            _ => load_f32(&grad.reshape(&[rows, cols])?, false)?,
        };
        if redraw {
            t.projection = top_singular_vectors(&g, t.rank, t.side)?.vectors;
            if t.side == Side::Left {
                t.transposed = Some(load_f32(&t.projection, true)?);
            }
        }
        let plain = Epilogue::default();
        let low = match t.side {
            Side::Right => matmul(&g, &t.projection, true, plain)?,
            Side::Left => matmul(&t.projection, &g, false, plain)?,
        };
        let dir = Tensor::empty(g.client(), DType::F32, low.shape())?;
        FrugalLowRankAdam::tuned(
            g.client(),
            0.0,
            &FrugalLowRankAdamArgs {
                low: &low,
                m: &t.m,
                v: &t.v,
                dir: &dir,
                counter: &self.counter,
                len: low.numel() as u32,
                lr: h.lr as f32,
                beta1: h.beta1 as f32,
                beta2: h.beta2 as f32,
                one_minus_beta1: (1.0 - h.beta1) as f32,
                one_minus_beta2: (1.0 - h.beta2) as f32,
                ln_beta1: h.beta1.ln() as f32,
                ln_beta2: h.beta2.ln() as f32,
                eps: h.eps as f32,
            },
        )?;
        // `low` now holds -low: its product back with G as the residual is G - up(low).
        let with_g = Epilogue {
            residual: Some(&g),
            ..plain
        };
        // At full rank (r = min(rows, cols)) P spans everything and the residual is zero:
        // its rounding noise is not signed (lr_free 0), and its product is not formed.
        let full = t.rank == rows.min(cols);
        let lr_free = if full { 0.0 } else { lr_free };
        let back = |x: &Tensor, epilogue| match (t.side, &t.transposed) {
            (Side::Left, Some(pt)) => matmul(pt, x, false, epilogue),
            _ => matmul(x, &t.projection, false, epilogue),
        };
        let up = back(&dir, plain)?;
        let rest = if full {
            up.clone()
        } else {
            back(&low, with_g)?
        };
        let has_master = t.dtype != DType::F32;
        FrugalProjectedUpdate::tuned(
            g.client(),
            0.0,
            &FrugalProjectedUpdateArgs {
                param: &param.reshape(&[rows * cols])?,
                master: &t.master,
                up: &up,
                rest: &rest,
                len: (rows * cols) as u32,
                lr_free: lr_free as f32,
                decay: (1.0 - h.lr * h.weight_decay) as f32,
                has_master,
            },
        )?;
        Ok(())
    }
}

/// Adam on the low-rank gradient `low` (in place on `m`, `v`; from zero when
/// `counter[0]` is 0, the subspace's first step; `t = counter[0] + 1`):
/// `dir = -lr m̂ / (sqrt(v̂) + eps)`, and `low` becomes `-low` (what the residual's
/// product back adds to G). f32.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(len = pow2),
    grid = cubes(len.div_ceil(VECTOR * UNITS)),
    cube = UNITS
)]
pub fn frugal_low_rank_adam<F: Float, N: Size>(
    low: &mut Array<Vector<F, N>>,
    m: &mut Array<Vector<f32, N>>,
    v: &mut Array<Vector<f32, N>>,
    dir: &mut Array<Vector<F, N>>,
    counter: &Array<u32>,
    len: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    eps: f32,
) {
    let nw = N::value().comptime() as u32;
    let local = counter[0];
    let c = adam_constants(
        beta1,
        beta2,
        one_minus_beta1,
        one_minus_beta2,
        ln_beta1,
        ln_beta2,
        eps,
        f32::cast_from(local + 1),
    );
    let i = linear_unit();
    if i < (len / nw) as usize {
        let g = Vector::<f32, N>::cast_from(low[i]);
        let zero = Vector::<f32, N>::new(0.0);
        // A new subspace's moments start from zero (the buffer holds the last one's).
        let mut m0 = m[i];
        let mut v0 = v[i];
        if local == 0u32 {
            m0 = zero;
            v0 = zero;
        }
        let mv = adam_moments_of(m0, v0, g, c, false);
        m[i] = mv.m;
        v[i] = mv.v;
        dir[i] = Vector::cast_from(Vector::<f32, N>::new(-lr) * adam_direction_of(mv.m, mv.v, c));
        low[i] = Vector::cast_from(zero - g);
    }
}

/// FRUGAL's update of a projected tensor: `p = p (1 - lr wd) + up - lr_free sign(rest)`
/// (`up` the Adam direction brought back, `rest = G - up(low)`; sign(0) = 0), in f32;
/// with `has_master` the f32 master copy is the parameter and `param` receives its
/// rounding.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    vector = [4, 1],
    key(len = pow2, dtype),
    grid = cubes(len.div_ceil(VECTOR * UNITS)),
    cube = UNITS
)]
pub fn frugal_projected_update<F: Float, N: Size>(
    param: &mut Array<Vector<F, N>>,
    master: &mut Array<Vector<f32, N>>,
    up: &Array<Vector<f32, N>>,
    rest: &Array<Vector<f32, N>>,
    len: u32,
    lr_free: f32,
    decay: f32,
    #[comptime] has_master: bool,
) {
    let nw = N::value().comptime() as u32;
    let i = linear_unit();
    if i < (len / nw) as usize {
        let mut p = Vector::<f32, N>::cast_from(param[i]);
        if comptime!(has_master) {
            p = master[i];
        }
        let u = up[i];
        let r = rest[i];
        let mut q = Vector::<f32, N>::new(0.0);
        #[unroll]
        for l in 0..nw {
            let x = r[l as usize];
            // sign(NaN) = NaN, sign(0) = 0.
            let s = kiln_dsl::sign_keep_nan(x);
            q[l as usize] = p[l as usize] * decay + u[l as usize] - lr_free * s;
        }
        if comptime!(has_master) {
            master[i] = q;
        }
        param[i] = Vector::cast_from(q);
    }
}
