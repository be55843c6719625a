//! f64 references of the update rules, written from the spec and the papers' code, one
//! step at a time (call them repeatedly for several steps).

use super::rules::{Hyper, Rule};

/// One step `t` (from 1) of `rule` on `p` with gradient `g` and the rule's state tensors
/// `state` (in `Rule::state_names` order), all in place.
/// `state` in `Rule::state_names` order: per-element tensors of `p`'s length, then the
/// per-tensor scalars (AdaGrad-Norm's `b2`) as one-element vectors. LAMB and
/// AdaGrad-Norm take their norms over the whole of `p` (one tensor or block).
pub fn step(rule: Rule, h: &Hyper, t: u64, p: &mut [f64], g: &[f64], state: &mut [Vec<f64>]) {
    let bc = |b: f64| 1.0 - b.powi(t as i32);
    let decoupled = 1.0 - h.lr * h.weight_decay;
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    match rule {
        Rule::Lamb => {
            let r: Vec<f64> = (0..p.len())
                .map(|i| {
                    state[0][i] = h.beta1 * state[0][i] + (1.0 - h.beta1) * g[i];
                    state[1][i] = h.beta2 * state[1][i] + (1.0 - h.beta2) * g[i] * g[i];
                    let m_hat = state[0][i] / bc(h.beta1);
                    let v_hat = state[1][i] / bc(h.beta2);
                    m_hat / (v_hat.sqrt() + h.eps) + h.weight_decay * p[i]
                })
                .collect();
            let (wn, rn) = (norm(&mut p.iter().copied()), norm(&mut r.iter().copied()));
            let trust = if wn > 0.0 && rn > 0.0 { wn / rn } else { 1.0 };
            for (pi, ri) in p.iter_mut().zip(&r) {
                *pi -= h.lr * trust * ri;
            }
            return;
        }
        Rule::AdaGradNorm => {
            let gg: Vec<f64> = (0..p.len()).map(|i| g[i] + h.weight_decay * p[i]).collect();
            state[0][0] += gg.iter().map(|x| x * x).sum::<f64>();
            let b = state[0][0].sqrt();
            for (pi, gi) in p.iter_mut().zip(&gg) {
                *pi -= h.lr * gi / (b + h.eps);
            }
            return;
        }
        _ => {}
    }
    for i in 0..p.len() {
        match rule {
            Rule::AdamW => {
                p[i] *= decoupled;
                state[0][i] = h.beta1 * state[0][i] + (1.0 - h.beta1) * g[i];
                state[1][i] = h.beta2 * state[1][i] + (1.0 - h.beta2) * g[i] * g[i];
                let den = state[1][i].sqrt() / bc(h.beta2).sqrt() + h.eps;
                p[i] -= h.lr / bc(h.beta1) * state[0][i] / den;
            }
            Rule::AdaBelief => {
                p[i] *= decoupled;
                state[0][i] = h.beta1 * state[0][i] + (1.0 - h.beta1) * g[i];
                let d = g[i] - state[0][i];
                state[1][i] = h.beta2 * state[1][i] + (1.0 - h.beta2) * d * d + h.eps;
                let den = state[1][i].sqrt() / bc(h.beta2).sqrt() + h.eps;
                p[i] -= h.lr / bc(h.beta1) * state[0][i] / den;
            }
            Rule::Adan => {
                let delta = if t == 1 { 0.0 } else { g[i] - state[3][i] };
                state[0][i] = h.beta1 * state[0][i] + (1.0 - h.beta1) * g[i];
                state[1][i] = h.beta2 * state[1][i] + (1.0 - h.beta2) * delta;
                let u = g[i] + h.beta2 * delta;
                state[2][i] = h.beta3 * state[2][i] + (1.0 - h.beta3) * u * u;
                let den = state[2][i].sqrt() / bc(h.beta3).sqrt() + h.eps;
                if h.no_prox {
                    p[i] *= decoupled;
                }
                p[i] -= h.lr / bc(h.beta1) * state[0][i] / den
                    + h.lr * h.beta2 / bc(h.beta2) * state[1][i] / den;
                if !h.no_prox {
                    p[i] /= 1.0 + h.lr * h.weight_decay;
                }
                state[3][i] = g[i];
            }
            Rule::AdaGrad => {
                let gg = g[i] + h.weight_decay * p[i];
                state[0][i] += gg * gg;
                p[i] -= h.lr * gg / (state[0][i].sqrt() + h.eps);
            }
            // Whole-tensor rules: stepped (and returned) above.
            Rule::Lamb | Rule::AdaGradNorm => {}
        }
    }
}

/// FRUGAL's subset `j` of a tensor of `shape` (increasing positions): the
/// `c.active(shape)` coordinates, or the rows or columns of `frugal_matrix(shape)`, with
/// the largest Philox words of `(c.seed, stream j)`, rows and columns expanded to their
/// coordinates.
pub fn frugal_subset(c: &super::FrugalConfig, shape: &[usize], j: u32) -> Vec<usize> {
    let n: usize = shape.iter().product();
    let pick = |count: usize, k: usize| {
        let keys = super::compress::random_keys(count, c.seed, j);
        super::compress::reference_select(&keys, k)
    };
    let (rows, cols) = super::frugal_matrix(shape);
    match (c.subspace, c.lines(shape)) {
        // A list of one: its one tensor is the block taken.
        (super::Subspace::Blocks, _) => (0..n).collect(),
        (super::Subspace::Rows, Some((_, taken))) => pick(rows, taken)
            .into_iter()
            .flat_map(|r| r * cols..(r + 1) * cols)
            .collect(),
        (super::Subspace::Columns, Some((_, taken))) => {
            let chosen = pick(cols, taken);
            (0..rows)
                .flat_map(|r| chosen.iter().map(move |&col| r * cols + col))
                .collect()
        }
        _ => pick(n, c.active(shape)),
    }
}

/// One FRUGAL step `t` (from 1) on `p` (a tensor of `shape`) by `g` with the subset and
/// its moments `m`, `v` (all length `k`, the subset increasing): at the first step of
/// each subspace the subset is redrawn ([`frugal_subset`] of stream `t / gap`) and the
/// moments are zeroed; Adam (AdamW's formula, bias corrections counted from the
/// redraw) on the subset, `p -= lr_free sign(g)` elsewhere, decoupled decay on all.
#[allow(clippy::too_many_arguments)]
pub fn frugal_step(
    h: &Hyper,
    c: &super::FrugalConfig,
    t: u64,
    shape: &[usize],
    p: &mut [f64],
    g: &[f64],
    subset: &mut Vec<usize>,
    m: &mut Vec<f64>,
    v: &mut Vec<f64>,
) {
    assert_eq!(
        p.len(),
        shape.iter().product::<usize>(),
        "p is a tensor of shape"
    );
    if (t - 1).is_multiple_of(c.update_gap) {
        *subset = frugal_subset(c, shape, ((t - 1) / c.update_gap) as u32);
    }
    frugal_apply(h, c, t, p, g, subset, m, v);
}

/// FRUGAL's step `t` over a list of tensors (`shapes[i]`, `p[i]`, `g[i]`, each with its
/// `(subset, m, v)`), as `Frugal::step_multi`: tensor `i` draws with `c.seed_of(i)`;
/// for blocks the tensors of [`super::FrugalConfig::active_tensors`] hold state on all
/// their coordinates and the others on none.
#[allow(clippy::type_complexity)]
pub fn frugal_step_list(
    h: &Hyper,
    c: &super::FrugalConfig,
    t: u64,
    shapes: &[Vec<usize>],
    p: &mut [Vec<f64>],
    g: &[Vec<f64>],
    state: &mut [(Vec<usize>, Vec<f64>, Vec<f64>)],
) {
    let j = ((t - 1) / c.update_gap) as u32;
    let active = c.active_tensors(shapes.len(), j);
    for (i, (subset, m, v)) in state.iter_mut().enumerate() {
        let own = super::FrugalConfig {
            seed: c.seed_of(i),
            ..*c
        };
        if (t - 1).is_multiple_of(c.update_gap) {
            *subset = match (c.subspace, active.contains(&i)) {
                (super::Subspace::Blocks, true) => (0..p[i].len()).collect(),
                (super::Subspace::Blocks, false) => Vec::new(),
                _ => frugal_subset(&own, &shapes[i], j),
            };
        }
        frugal_apply(h, &own, t, &mut p[i], &g[i], subset, m, v);
    }
}

/// [`frugal_step`] with the subset drawn: moments zeroed at the first step of a
/// subspace, Adam on `subset`, signSGD elsewhere, decoupled decay on all.
#[allow(clippy::too_many_arguments)]
fn frugal_apply(
    h: &Hyper,
    c: &super::FrugalConfig,
    t: u64,
    p: &mut [f64],
    g: &[f64],
    subset: &[usize],
    m: &mut Vec<f64>,
    v: &mut Vec<f64>,
) {
    let (n, k) = (p.len(), subset.len());
    if (t - 1).is_multiple_of(c.update_gap) {
        *m = vec![0.0; k];
        *v = vec![0.0; k];
    }
    let local = ((t - 1) % c.update_gap + 1) as i32;
    let (bc1, bc2) = (1.0 - h.beta1.powi(local), 1.0 - h.beta2.powi(local));
    let mut slot = vec![None; n];
    for (s, &i) in subset.iter().enumerate() {
        slot[i] = Some(s);
    }
    for i in 0..n {
        p[i] *= 1.0 - h.lr * h.weight_decay;
        match slot[i] {
            Some(s) => {
                m[s] = h.beta1 * m[s] + (1.0 - h.beta1) * g[i];
                v[s] = h.beta2 * v[s] + (1.0 - h.beta2) * g[i] * g[i];
                p[i] -= h.lr * (m[s] / bc1) / ((v[s] / bc2).sqrt() + h.eps);
            }
            None => p[i] -= c.lr_free * g[i].signum() * (g[i] != 0.0) as u8 as f64,
        }
    }
}

/// FRUGAL's SVD projection for a gradient `g` of `shape` (seen as
/// [`super::frugal_matrix`]): its `c.rank(shape)` leading right singular vectors
/// (`[r, cols]`, when rows >= cols) or left ones (`[r, rows]`), row-major, in f64.
pub fn frugal_svd_projection(c: &super::FrugalConfig, shape: &[usize], g: &[f64]) -> Vec<f64> {
    let (rows, cols) = super::frugal_matrix(shape);
    let side = match rows >= cols {
        true => crate::svd::Side::Right,
        false => crate::svd::Side::Left,
    };
    crate::svd::reference::top_singular_vectors(g, rows, cols, c.rank(shape), side).0
}

/// One FRUGAL step `t` (from 1) with the SVD projection `proj` (the subspace's:
/// [`frugal_svd_projection`] of its first step's gradient, or the device's) on `p` (a
/// tensor of `shape`) by `g`, with the low-rank moments `m`, `v` (zeroed at a subspace's
/// first step): `low = G P^T` or `P G`, Adam on it (bias corrections from the
/// subspace's start), `p = p (1 - lr wd) + up(-lr m̂ / (sqrt(v̂) + eps)) - lr_free
/// sign(G - up(low))`, the last term left out at full rank (`r = min(rows, cols)`, where
/// the residual is zero).
#[allow(clippy::too_many_arguments)]
pub fn frugal_svd_step(
    h: &Hyper,
    c: &super::FrugalConfig,
    t: u64,
    shape: &[usize],
    p: &mut [f64],
    g: &[f64],
    proj: &[f64],
    m: &mut Vec<f64>,
    v: &mut Vec<f64>,
) {
    let (rows, cols) = super::frugal_matrix(shape);
    let r = c.rank(shape);
    let right = rows >= cols;
    // low's shape, and up(x)[i][j] for a low-rank x.
    let (a, b) = if right { (rows, r) } else { (r, cols) };
    let low: Vec<f64> = (0..a * b)
        .map(|e| {
            let (i, j) = (e / b, e % b);
            match right {
                true => (0..cols)
                    .map(|k| g[i * cols + k] * proj[j * cols + k])
                    .sum(),
                false => (0..rows)
                    .map(|k| proj[i * rows + k] * g[k * cols + j])
                    .sum(),
            }
        })
        .collect();
    let up = |x: &[f64], i: usize, j: usize| -> f64 {
        match right {
            true => (0..r).map(|q| x[i * r + q] * proj[q * cols + j]).sum(),
            false => (0..r).map(|q| proj[q * rows + i] * x[q * cols + j]).sum(),
        }
    };
    if (t - 1).is_multiple_of(c.update_gap) {
        *m = vec![0.0; a * b];
        *v = vec![0.0; a * b];
    }
    let local = ((t - 1) % c.update_gap + 1) as i32;
    let (bc1, bc2) = (1.0 - h.beta1.powi(local), 1.0 - h.beta2.powi(local));
    let dir: Vec<f64> = (0..a * b)
        .map(|e| {
            m[e] = h.beta1 * m[e] + (1.0 - h.beta1) * low[e];
            v[e] = h.beta2 * v[e] + (1.0 - h.beta2) * low[e] * low[e];
            -h.lr * (m[e] / bc1) / ((v[e] / bc2).sqrt() + h.eps)
        })
        .collect();
    // At full rank P spans everything: the residual is zero (its rounding is not signed).
    let lr_free = if r == rows.min(cols) { 0.0 } else { c.lr_free };
    for i in 0..rows {
        for j in 0..cols {
            let e = i * cols + j;
            let rest = g[e] - up(&low, i, j);
            let sign = rest.signum() * (rest != 0.0) as u8 as f64;
            p[e] = p[e] * (1.0 - h.lr * h.weight_decay) + up(&dir, i, j) - lr_free * sign;
        }
    }
}

/// One EControl worker step (`optim::econtrol`) in f64: `p = eta e + g - h`, `Δ` the `k`
/// largest `|p|` (ties to the lower index), `e -= ...` and `h += Δ` in place as
/// `e' = e + g - h - Δ`, `h' = h + Δ`. Returns the taken positions (increasing) and
/// `Δ`'s values there.
pub fn econtrol_step(
    g: &[f64],
    e: &mut [f64],
    h: &mut [f64],
    eta: f64,
    k: usize,
) -> (Vec<usize>, Vec<f64>) {
    let p: Vec<f64> = (0..g.len()).map(|i| eta * e[i] + g[i] - h[i]).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&i, &j| p[j].abs().total_cmp(&p[i].abs()).then(i.cmp(&j)));
    let mut taken = order[..k].to_vec();
    taken.sort_unstable();
    let mut sent = vec![0.0; p.len()];
    for &t in &taken {
        sent[t] = p[t];
    }
    for i in 0..p.len() {
        e[i] = e[i] + g[i] - h[i] - sent[i];
        h[i] += sent[i];
    }
    let values = taken.iter().map(|&t| p[t]).collect();
    (taken, values)
}
