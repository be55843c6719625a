//! f64 references written from the spec: the gate (softmax, top-k by probability with
//! ties to the lower index, renormalisation, slot counting, capacity, `l_aux`), the
//! dense GShard formulation of dispatch and combine (a combine tensor `[S, E, C]` and
//! einsums), the expert FFN, a dense per-token loop for the dropless layer, and the
//! gate's backward.

use crate::matmul::reference::activate;

/// A routing: `ids`, `gates` and `locations` (`-1`: dropped) `[S, k]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Expert of each route.
    pub ids: Vec<usize>,
    /// Gate weight of each route.
    pub gates: Vec<f64>,
    /// Slot of each route, -1 where dropped.
    pub locations: Vec<i64>,
    /// Slots per expert.
    pub capacity: usize,
    /// Load-balancing loss.
    pub l_aux: f64,
    /// `S`.
    pub tokens: usize,
    /// `E`.
    pub experts: usize,
    /// `k`.
    pub top_k: usize,
}

/// Softmax of one row in f64; a row without mass (all `-inf`) is all zeros.
pub fn softmax(row: &[f64]) -> Vec<f64> {
    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return vec![0.0; row.len()];
    }
    let ex: Vec<f64> = row.iter().map(|x| (x - mx).exp()).collect();
    let sum: f64 = ex.iter().sum();
    ex.iter().map(|x| x / sum).collect()
}

/// The top-k experts of one row of probabilities (descending, ties to the lower index).
pub fn top_k(p: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| {
        p[b].partial_cmp(&p[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// The gate of the spec for `logits` `[S, E]`.
pub fn gate(
    logits: &[f64],
    experts: usize,
    top_k_: usize,
    capacity_factor: f64,
    normalize: bool,
    batch_prioritized: bool,
) -> Routing {
    let s = logits.len() / experts;
    let probs: Vec<Vec<f64>> = logits.chunks(experts).map(softmax).collect();
    let mut ids = Vec::with_capacity(s * top_k_);
    let mut gates = Vec::with_capacity(s * top_k_);
    for p in &probs {
        let sel = top_k(p, top_k_);
        let g: Vec<f64> = sel.iter().map(|&e| p[e]).collect();
        let denom = g.iter().sum::<f64>().max(f32::EPSILON as f64);
        for (e, gv) in sel.into_iter().zip(g) {
            ids.push(e);
            gates.push(if normalize { gv / denom } else { gv });
        }
    }
    let mut order: Vec<usize> = (0..s).collect();
    if batch_prioritized {
        let top1 = |t: usize| probs[t][ids[t * top_k_]];
        order.sort_by(|&a, &b| {
            top1(b)
                .partial_cmp(&top1(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
    let mut count = vec![0usize; experts];
    let mut loc_raw = vec![0usize; s * top_k_];
    for i in 0..top_k_ {
        for &t in &order {
            let e = ids[t * top_k_ + i];
            loc_raw[t * top_k_ + i] = count[e];
            count[e] += 1;
        }
    }
    let capacity = if capacity_factor > 0.0 {
        top_k_ * (capacity_factor * s.div_ceil(experts) as f64).floor() as usize
    } else {
        count.iter().copied().max().unwrap_or(0)
    };
    let locations = loc_raw
        .iter()
        .map(|&l| if l < capacity { l as i64 } else { -1 })
        .collect();
    let mut l_aux = 0.0;
    for e in 0..experts {
        let me = probs.iter().map(|p| p[e]).sum::<f64>() / s.max(1) as f64;
        let ce = (0..s).filter(|&t| ids[t * top_k_] == e).count() as f64 / s.max(1) as f64;
        l_aux += me * ce;
    }
    Routing {
        ids,
        gates,
        locations,
        capacity,
        l_aux: l_aux * experts as f64,
        tokens: s,
        experts,
        top_k: top_k_,
    }
}

impl Routing {
    /// The GShard combine tensor `[S, E, C]` (the gate at each kept route's slot) and
    /// its dispatch mask.
    pub fn combine_tensor(&self) -> (Vec<f64>, Vec<bool>) {
        let (s, e, c, k) = (self.tokens, self.experts, self.capacity, self.top_k);
        let mut comb = vec![0.0; s * e * c];
        let mut mask = vec![false; s * e * c];
        for t in 0..s {
            for i in 0..k {
                let l = self.locations[t * k + i];
                if l >= 0 {
                    let at = (t * e + self.ids[t * k + i]) * c + l as usize;
                    comb[at] = self.gates[t * k + i];
                    mask[at] = true;
                }
            }
        }
        (comb, mask)
    }

    /// `dispatched = einsum("sec,sm->ecm", mask, x)`.
    pub fn dispatch(&self, x: &[f64], m: usize) -> Vec<f64> {
        let (s, e, c) = (self.tokens, self.experts, self.capacity);
        let (_, mask) = self.combine_tensor();
        let mut out = vec![0.0; e * c * m];
        for t in 0..s {
            for ec in 0..e * c {
                if mask[t * e * c + ec] {
                    for j in 0..m {
                        out[ec * m + j] += x[t * m + j];
                    }
                }
            }
        }
        out
    }

    /// `y = einsum("sec,ecm->sm", combine, expert_out)`.
    pub fn combine(&self, expert_out: &[f64], m: usize) -> Vec<f64> {
        let (s, e, c) = (self.tokens, self.experts, self.capacity);
        let (comb, _) = self.combine_tensor();
        let mut y = vec![0.0; s * m];
        for t in 0..s {
            for ec in 0..e * c {
                let w = comb[t * e * c + ec];
                if w != 0.0 {
                    for j in 0..m {
                        y[t * m + j] += w * expert_out[ec * m + j];
                    }
                }
            }
        }
        y
    }

    /// The adjoint of dispatch: `dx = einsum("sec,ecm->sm", mask, d_dispatched)`.
    pub fn dispatch_backward(&self, d: &[f64], m: usize) -> Vec<f64> {
        let (s, e, c) = (self.tokens, self.experts, self.capacity);
        let (_, mask) = self.combine_tensor();
        let mut dx = vec![0.0; s * m];
        for t in 0..s {
            for ec in 0..e * c {
                if mask[t * e * c + ec] {
                    for j in 0..m {
                        dx[t * m + j] += d[ec * m + j];
                    }
                }
            }
        }
        dx
    }

    /// The gradients of combine: `d_expert_out = einsum("sec,sm->ecm", combine, dy)` and
    /// `d_gates[s, i] = <dy[s], expert_out[I_i, loc_i]>` for kept routes.
    pub fn combine_backward(
        &self,
        dy: &[f64],
        expert_out: &[f64],
        m: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (s, e, c, k) = (self.tokens, self.experts, self.capacity, self.top_k);
        let (comb, _) = self.combine_tensor();
        let mut d_out = vec![0.0; e * c * m];
        for t in 0..s {
            for ec in 0..e * c {
                let w = comb[t * e * c + ec];
                for j in 0..m {
                    d_out[ec * m + j] += w * dy[t * m + j];
                }
            }
        }
        let mut d_gates = vec![0.0; s * k];
        for t in 0..s {
            for i in 0..k {
                let l = self.locations[t * k + i];
                if l >= 0 {
                    let row = self.ids[t * k + i] * c + l as usize;
                    d_gates[t * k + i] = (0..m)
                        .map(|j| dy[t * m + j] * expert_out[row * m + j])
                        .sum();
                }
            }
        }
        (d_out, d_gates)
    }
}

/// The experts' weights in f64: `w1` `[E, M, F]`, `w2` `[E, F, M]`, biases `[E, F]`,
/// `[E, M]`.
pub struct Experts<'a> {
    /// `[E, M, F]`.
    pub w1: &'a [f64],
    /// `[E, F]`.
    pub b1: Option<&'a [f64]>,
    /// `[E, F, M]`.
    pub w2: &'a [f64],
    /// `[E, M]`.
    pub b2: Option<&'a [f64]>,
    /// Model width `M`.
    pub m: usize,
    /// Hidden width `F`.
    pub f: usize,
    /// `none | silu | gelu | relu`.
    pub activation: &'a str,
}

impl Experts<'_> {
    /// Expert `e`'s FFN of one row `x` `[M]`.
    pub fn ffn(&self, e: usize, x: &[f64]) -> Vec<f64> {
        let (m, f) = (self.m, self.f);
        let h: Vec<f64> = (0..f)
            .map(|j| {
                let mut s: f64 = (0..m).map(|i| x[i] * self.w1[(e * m + i) * f + j]).sum();
                if let Some(b) = self.b1 {
                    s += b[e * f + j];
                }
                activate(s, self.activation)
            })
            .collect();
        (0..m)
            .map(|j| {
                let mut s: f64 = (0..f).map(|i| h[i] * self.w2[(e * f + i) * m + j]).sum();
                if let Some(b) = self.b2 {
                    s += b[e * m + j];
                }
                s
            })
            .collect()
    }

    /// The FFN of every slot of `dispatched` `[E, C, M]`.
    pub fn ffn_slots(&self, dispatched: &[f64], experts: usize) -> Vec<f64> {
        let m = self.m;
        let c = dispatched.len() / (experts * m).max(1);
        (0..experts * c)
            .flat_map(|ec| self.ffn(ec / c.max(1), &dispatched[ec * m..(ec + 1) * m]))
            .collect()
    }
}

/// `logits = x @ w_gate` (`x` `[S, M]`, `w_gate` `[M, E]`).
pub fn gate_logits(x: &[f64], w_gate: &[f64], m: usize, e: usize) -> Vec<f64> {
    let s = x.len() / m.max(1);
    (0..s * e)
        .map(|se| {
            (0..m)
                .map(|i| x[(se / e) * m + i] * w_gate[i * e + se % e])
                .sum()
        })
        .collect()
}

/// The layer in the GShard formulation (dispatch, every slot's FFN, combine).
pub fn layer(x: &[f64], routing: &Routing, w: &Experts<'_>) -> Vec<f64> {
    let d = routing.dispatch(x, w.m);
    let y_e = w.ffn_slots(&d, routing.experts);
    routing.combine(&y_e, w.m)
}

/// The layer as a dense per-token loop: `y[s] = sum_i keep_i g_i FFN_{I_i}(x[s])` (the
/// dropless reference; equal to [`layer`] for any routing).
pub fn layer_per_token(x: &[f64], routing: &Routing, w: &Experts<'_>) -> Vec<f64> {
    let (m, k) = (w.m, routing.top_k);
    let mut y = vec![0.0; routing.tokens * m];
    for t in 0..routing.tokens {
        for i in 0..k {
            if routing.locations[t * k + i] >= 0 {
                let out = w.ffn(routing.ids[t * k + i], &x[t * m..(t + 1) * m]);
                for j in 0..m {
                    y[t * m + j] += routing.gates[t * k + i] * out[j];
                }
            }
        }
    }
    y
}

/// `d_logits` of `L = sum d_gates * gates(logits) + d_l_aux * l_aux(logits)` with the
/// top-k choice and the top-1 counts held fixed (analytic, f64).
pub fn gate_backward(
    logits: &[f64],
    experts: usize,
    top_k_: usize,
    normalize: bool,
    d_gates: &[f64],
    d_l_aux: f64,
) -> Vec<f64> {
    let s = logits.len() / experts;
    let r = gate(logits, experts, top_k_, 1.0, normalize, false);
    let mut share = vec![0.0; experts];
    for t in 0..s {
        share[r.ids[t * top_k_]] += 1.0 / s as f64;
    }
    let mut out = vec![0.0; s * experts];
    for t in 0..s {
        let p = softmax(&logits[t * experts..(t + 1) * experts]);
        let sel: Vec<usize> = r.ids[t * top_k_..(t + 1) * top_k_].to_vec();
        let gsum: f64 = sel.iter().map(|&e| p[e]).sum();
        let eps = f32::EPSILON as f64;
        let denom = gsum.max(eps);
        let dg = &d_gates[t * top_k_..(t + 1) * top_k_];
        let dot: f64 = sel.iter().zip(dg).map(|(&e, d)| d * p[e] / denom).sum();
        let mut dp: Vec<f64> = (0..experts)
            .map(|e| d_l_aux * experts as f64 * share[e] / s as f64)
            .collect();
        for (i, &e) in sel.iter().enumerate() {
            dp[e] += match (normalize, gsum > eps) {
                (false, _) => dg[i],
                (true, true) => (dg[i] - dot) / denom,
                (true, false) => dg[i] / denom,
            };
        }
        let pdp: f64 = (0..experts).map(|e| p[e] * dp[e]).sum();
        for e in 0..experts {
            out[t * experts + e] = p[e] * (dp[e] - pdp);
        }
    }
    out
}

/// A whole layer's inputs in f64, for gradient checks by finite differences.
#[derive(Clone)]
pub struct LayerInputs {
    /// `[S, M]`.
    pub x: Vec<f64>,
    /// `[M, E]`.
    pub w_gate: Vec<f64>,
    /// `[E, M, F]`.
    pub w1: Vec<f64>,
    /// `[E, F]`.
    pub b1: Vec<f64>,
    /// `[E, F, M]`.
    pub w2: Vec<f64>,
    /// `[E, M]`.
    pub b2: Vec<f64>,
    /// Model width `M`.
    pub m: usize,
    /// Hidden width `F`.
    pub f: usize,
    /// Experts `E`.
    pub e: usize,
    /// `top_k`.
    pub k: usize,
    /// Capacity factor.
    pub cf: f64,
    /// `none | silu | gelu | relu`.
    pub activation: &'static str,
}

impl LayerInputs {
    /// `y` and `l_aux` of the layer (GShard form).
    pub fn forward(&self) -> (Vec<f64>, f64) {
        let logits = gate_logits(&self.x, &self.w_gate, self.m, self.e);
        let r = gate(&logits, self.e, self.k, self.cf, self.k > 1, false);
        let w = Experts {
            w1: &self.w1,
            b1: Some(&self.b1),
            w2: &self.w2,
            b2: Some(&self.b2),
            m: self.m,
            f: self.f,
            activation: self.activation,
        };
        (layer(&self.x, &r, &w), r.l_aux)
    }

    /// `L = <dy, y> + d_l_aux l_aux`.
    pub fn loss(&self, dy: &[f64], d_l_aux: f64) -> f64 {
        let (y, l) = self.forward();
        y.iter().zip(dy).map(|(a, b)| a * b).sum::<f64>() + d_l_aux * l
    }

    /// `dL / d which` (`x | w_gate | w1 | b1 | w2 | b2`) by central differences (step
    /// `1e-6`; the routing does not change under such a step away from ties).
    pub fn grad_fd(&self, which: &str, dy: &[f64], d_l_aux: f64) -> Vec<f64> {
        let len = self.field(which).len();
        (0..len)
            .map(|i| {
                let h = 1e-6;
                let at = |delta: f64| {
                    let mut p = self.clone();
                    p.field_mut(which)[i] += delta;
                    p.loss(dy, d_l_aux)
                };
                (at(h) - at(-h)) / (2.0 * h)
            })
            .collect()
    }

    /// The number of entries of `which`.
    pub fn field_len(&self, which: &str) -> usize {
        self.field(which).len()
    }

    fn field(&self, which: &str) -> &Vec<f64> {
        match which {
            "x" => &self.x,
            "w_gate" => &self.w_gate,
            "w1" => &self.w1,
            "b1" => &self.b1,
            "w2" => &self.w2,
            _ => &self.b2,
        }
    }

    fn field_mut(&mut self, which: &str) -> &mut Vec<f64> {
        match which {
            "x" => &mut self.x,
            "w_gate" => &mut self.w_gate,
            "w1" => &mut self.w1,
            "b1" => &mut self.b1,
            "w2" => &mut self.w2,
            _ => &mut self.b2,
        }
    }
}
