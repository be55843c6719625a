//! f64 references of the S²FT family, written from the spec (row-major `Vec<f64>`,
//! weights `[out, in]`), and the spec's correctness reference: full fine-tuning of the
//! unpermuted FFN with a gradient mask that zeroes everything but the selected rows of
//! `W_up`/`W_gate` (set A) and columns of `W_down` (set B).

use super::adamw::AdamWConfig;

/// The S²FT order of `n` units for sets `a`, `b`: A-only, shared, B-only, the rest
/// (each ascending), as new position -> old unit.
pub fn order(n: usize, a: &[usize], b: &[usize]) -> Vec<usize> {
    let (ina, inb) = (|u: &usize| a.contains(u), |u: &usize| b.contains(u));
    let mut p: Vec<usize> = (0..n).filter(|u| ina(u) && !inb(u)).collect();
    p.extend((0..n).filter(|u| ina(u) && inb(u)));
    p.extend((0..n).filter(|u| !ina(u) && inb(u)));
    p.extend((0..n).filter(|u| !ina(u) && !inb(u)));
    p
}

/// `w` `[rows, cols]` with units of `unit` rows (or columns) reordered by `perm`.
pub fn permute(
    w: &[f64],
    rows: usize,
    cols: usize,
    perm: &[usize],
    unit: usize,
    columns: bool,
) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let (si, sj) = match columns {
                false => (perm[i / unit] * unit + i % unit, j),
                true => (i, perm[j / unit] * unit + j % unit),
            };
            out[i * cols + j] = w[si * cols + sj];
        }
    }
    out
}

/// `y = x w^T`: `x` `[t, k]`, `w` `[n, k]` -> `[t, n]`.
pub fn linear(x: &[f64], w: &[f64], t: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; t * n];
    for i in 0..t {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
        }
    }
    y
}

/// `dW = dy^T x` over the tokens: `dy` `[t, n]`, `x` `[t, k]` -> `[n, k]`.
pub fn weight_grad(dy: &[f64], x: &[f64], t: usize, n: usize, k: usize) -> Vec<f64> {
    let mut g = vec![0.0; n * k];
    for i in 0..t {
        for j in 0..n {
            for c in 0..k {
                g[j * k + c] += dy[i * n + j] * x[i * k + c];
            }
        }
    }
    g
}

/// `dx = dy w`: `dy` `[t, n]`, `w` `[n, k]` -> `[t, k]`.
pub fn input_grad(dy: &[f64], w: &[f64], t: usize, n: usize, k: usize) -> Vec<f64> {
    let mut dx = vec![0.0; t * k];
    for i in 0..t {
        for j in 0..n {
            for c in 0..k {
                dx[i * k + c] += dy[i * n + j] * w[j * k + c];
            }
        }
    }
    dx
}

/// Columns `s .. e` of a row-major `[rows, cols]` matrix.
pub fn columns(m: &[f64], rows: usize, cols: usize, s: usize, e: usize) -> Vec<f64> {
    (0..rows)
        .flat_map(|i| m[i * cols + s..i * cols + e].to_vec())
        .collect()
}

/// `silu(g) = g / (1 + e^-g)` (0 at `-inf`).
pub fn silu(g: f64) -> f64 {
    if g == f64::NEG_INFINITY {
        0.0
    } else {
        g / (1.0 + (-g).exp())
    }
}

/// One AdamW step (PyTorch's formula, step `t` from 1) on `p` with gradient `g`.
pub fn adamw(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], t: u64, c: &AdamWConfig) {
    let bc1 = 1.0 - c.beta1.powi(t as i32);
    let bc2 = 1.0 - c.beta2.powi(t as i32);
    for i in 0..p.len() {
        p[i] *= 1.0 - c.lr * c.weight_decay;
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
        p[i] -= c.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + c.eps);
    }
}

/// `x w0^T` plus each token's delta (`ids[t] = -1`: none): row block `deltas` `[A, r,
/// k]` at rows `start ..`, or column block `[A, n, e - s]` over columns `start ..`.
#[allow(clippy::too_many_arguments)]
pub fn adapter_forward(
    x: &[f64],
    w0: &[f64],
    deltas: &[f64],
    ids: &[i64],
    t: usize,
    n: usize,
    k: usize,
    rows: bool,
    start: usize,
    width: usize,
) -> Vec<f64> {
    let mut y = linear(x, w0, t, k, n);
    for i in 0..t {
        let Ok(a) = usize::try_from(ids[i]) else {
            continue;
        };
        if rows {
            for j in 0..width {
                let d = &deltas[(a * width + j) * k..(a * width + j + 1) * k];
                y[i * n + start + j] += (0..k).map(|c| x[i * k + c] * d[c]).sum::<f64>();
            }
        } else {
            for j in 0..n {
                let d = &deltas[(a * n + j) * width..(a * n + j + 1) * width];
                y[i * n + j] += (0..width).map(|c| x[i * k + start + c] * d[c]).sum::<f64>();
            }
        }
    }
    y
}

/// The SwiGLU FFN's weights and shapes (`w_up`, `w_gate` `[f, d]`, `w_down` `[d, f]`).
#[derive(Clone, Debug)]
pub struct Ffn {
    /// Model width.
    pub d: usize,
    /// Hidden width.
    pub f: usize,
    /// `[f, d]`.
    pub w_up: Vec<f64>,
    /// `[f, d]`.
    pub w_gate: Vec<f64>,
    /// `[d, f]`.
    pub w_down: Vec<f64>,
}

impl Ffn {
    /// `(y, gate, up, h)` for `x` `[t, d]`.
    pub fn forward(&self, x: &[f64], t: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let gate = linear(x, &self.w_gate, t, self.d, self.f);
        let up = linear(x, &self.w_up, t, self.d, self.f);
        let h: Vec<f64> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
        (linear(&h, &self.w_down, t, self.f, self.d), gate, up, h)
    }

    /// The gradients `(d_up, d_gate, d_down, dx)` from `dy` `[t, d]` and the forward's
    /// `gate`, `up`, `h`.
    #[allow(clippy::type_complexity)]
    pub fn backward(
        &self,
        x: &[f64],
        dy: &[f64],
        (gate, up, h): (&[f64], &[f64], &[f64]),
        t: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let d_down = weight_grad(dy, h, t, self.d, self.f);
        let dh = input_grad(dy, &self.w_down, t, self.d, self.f);
        let (mut dg, mut du) = (vec![0.0; t * self.f], vec![0.0; t * self.f]);
        for i in 0..t * self.f {
            let s = 1.0 / (1.0 + (-gate[i]).exp());
            du[i] = dh[i] * silu(gate[i]);
            dg[i] = dh[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
        }
        let mut dx = input_grad(&du, &self.w_up, t, self.f, self.d);
        for (a, b) in dx
            .iter_mut()
            .zip(input_grad(&dg, &self.w_gate, t, self.f, self.d))
        {
            *a += b;
        }
        (
            weight_grad(&du, x, t, self.f, self.d),
            weight_grad(&dg, x, t, self.f, self.d),
            d_down,
            dx,
        )
    }

    /// The loss `0.5 sum (y - target)^2 / t`'s gradients `(d_up, d_gate, d_down)`.
    pub fn grads(&self, x: &[f64], target: &[f64], t: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (y, gate, up, h) = self.forward(x, t);
        let dy = loss_grad(&y, target, t);
        let (du, dg, dd, _) = self.backward(x, &dy, (&gate, &up, &h), t);
        (du, dg, dd)
    }
}

/// `(y - target) / t`: the gradient of `0.5 sum (y - target)^2 / t`.
pub fn loss_grad(y: &[f64], target: &[f64], t: usize) -> Vec<f64> {
    y.iter()
        .zip(target)
        .map(|(a, b)| (a - b) / t as f64)
        .collect()
}

/// AdamW step `step` on the elements of `p` that `keep` selects (the others, and their
/// moments, stay exactly as they are): the S²FT gradient mask.
pub fn masked_adamw(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u64,
    c: &AdamWConfig,
    keep: &dyn Fn(usize) -> bool,
) {
    for i in (0..p.len()).filter(|&i| keep(i)) {
        let (mut pi, mut mi, mut vi) = ([p[i]], [m[i]], [v[i]]);
        adamw(&mut pi, &[g[i]], &mut mi, &mut vi, step, c);
        (p[i], m[i], v[i]) = (pi[0], mi[0], vi[0]);
    }
}

/// Full fine-tuning of `ffn` for `steps` AdamW steps with the S²FT gradient mask: only
/// rows `a` of `w_up`/`w_gate` and columns `b` of `w_down` move (their moments too;
/// weight decay only where trained, as the in-place optimizer does).
#[allow(clippy::too_many_arguments)]
pub fn masked_fine_tune(
    ffn: &mut Ffn,
    x: &[f64],
    target: &[f64],
    t: usize,
    a: &[usize],
    b: &[usize],
    steps: u64,
    c: &AdamWConfig,
) {
    let (d, f) = (ffn.d, ffn.f);
    let (mut mu, mut vu) = (vec![0.0; f * d], vec![0.0; f * d]);
    let (mut mg, mut vg) = (vec![0.0; f * d], vec![0.0; f * d]);
    let (mut md, mut vd) = (vec![0.0; d * f], vec![0.0; d * f]);
    for step in 1..=steps {
        let (gu, gg, gd) = ffn.grads(x, target, t);
        masked_adamw(&mut ffn.w_up, &gu, &mut mu, &mut vu, step, c, &|i| {
            a.contains(&(i / d))
        });
        masked_adamw(&mut ffn.w_gate, &gg, &mut mg, &mut vg, step, c, &|i| {
            a.contains(&(i / d))
        });
        masked_adamw(&mut ffn.w_down, &gd, &mut md, &mut vd, step, c, &|i| {
            b.contains(&(i % f))
        });
    }
}

/// The LLaMA block of [`super::LlamaTrainer`] (causal grouped-query attention with
/// residual, SwiGLU FFN with residual), unpermuted: `w_q` `[h hd, d]`, `w_k`, `w_v`
/// `[hkv hd, d]`, `w_o` `[d, h hd]`, and the FFN.
#[derive(Clone, Debug)]
pub struct Llama {
    /// Query heads, KV heads, head dimension.
    pub heads: (usize, usize, usize),
    /// `[h hd, d]`.
    pub w_q: Vec<f64>,
    /// `[hkv hd, d]`.
    pub w_k: Vec<f64>,
    /// `[hkv hd, d]`.
    pub w_v: Vec<f64>,
    /// `[d, h hd]`.
    pub w_o: Vec<f64>,
    /// The FFN (its `d` is the model width).
    pub ffn: Ffn,
}

impl Llama {
    /// `(y, grads of w_v, w_o, w_up, w_gate, w_down)` of the loss `0.5 |y - target|^2 /
    /// t` on `x` `[t, d]`.
    pub fn grads(&self, x: &[f64], target: &[f64], t: usize) -> (Vec<f64>, [Vec<f64>; 5]) {
        let (h, hkv, hd) = self.heads;
        let d = self.ffn.d;
        let mut dims = crate::attention::reference::Dims::dense(1, t, t, h, hkv, hd, hd);
        dims.causal = true;
        let q = linear(x, &self.w_q, t, d, h * hd);
        let k = linear(x, &self.w_k, t, d, hkv * hd);
        let v = linear(x, &self.w_v, t, d, hkv * hd);
        let (out, _) = crate::attention::reference::forward(&dims, &q, &k, &v);
        let mut h1 = linear(&out, &self.w_o, t, h * hd, d);
        h1.iter_mut().zip(x).for_each(|(a, b)| *a += b);
        let (mut y, gate, up, hid) = self.ffn.forward(&h1, t);
        y.iter_mut().zip(&h1).for_each(|(a, b)| *a += b);
        let dy = loss_grad(&y, target, t);
        let (du, dg, dd, mut dh1) = self.ffn.backward(&h1, &dy, (&gate, &up, &hid), t);
        dh1.iter_mut().zip(&dy).for_each(|(a, b)| *a += b);
        let d_wo = weight_grad(&dh1, &out, t, d, h * hd);
        let d_out = input_grad(&dh1, &self.w_o, t, d, h * hd);
        let (_, _, dv) = crate::attention::reference::backward(&dims, &q, &k, &v, &d_out);
        let d_wv = weight_grad(&dv, x, t, hkv * hd, d);
        (y, [d_wv, d_wo, du, dg, dd])
    }

    /// `steps` steps of full fine-tuning with the S²FT mask: rows of `w_v` in the KV
    /// groups `attn_a`, columns of `w_o` in the groups `attn_b`, rows of `w_up`/`w_gate`
    /// in `ffn_a`, columns of `w_down` in `ffn_b`; every other weight (and `w_q`, `w_k`)
    /// frozen. Returns the output of the last forward (before its update).
    #[allow(clippy::too_many_arguments)]
    pub fn masked_fine_tune(
        &mut self,
        x: &[f64],
        target: &[f64],
        t: usize,
        (attn_a, attn_b): (&[usize], &[usize]),
        (ffn_a, ffn_b): (&[usize], &[usize]),
        steps: u64,
        c: &AdamWConfig,
    ) -> Vec<f64> {
        let (h, hkv, hd) = self.heads;
        let (d, f) = (self.ffn.d, self.ffn.f);
        let q_unit = h / hkv * hd;
        let mut state: Vec<(Vec<f64>, Vec<f64>)> = [hkv * hd * d, d * h * hd, f * d, f * d, d * f]
            .iter()
            .map(|&n| (vec![0.0; n], vec![0.0; n]))
            .collect();
        let mut y = vec![];
        for step in 1..=steps {
            let (out, g) = self.grads(x, target, t);
            y = out;
            let keeps: [&dyn Fn(usize) -> bool; 5] = [
                &|i| attn_a.contains(&(i / d / hd)),
                &|i| attn_b.contains(&(i % (h * hd) / q_unit)),
                &|i| ffn_a.contains(&(i / d)),
                &|i| ffn_a.contains(&(i / d)),
                &|i| ffn_b.contains(&(i % f)),
            ];
            let ws = [
                &mut self.w_v,
                &mut self.w_o,
                &mut self.ffn.w_up,
                &mut self.ffn.w_gate,
                &mut self.ffn.w_down,
            ];
            for (((w, g), (m, v)), keep) in ws.into_iter().zip(&g).zip(state.iter_mut()).zip(keeps)
            {
                masked_adamw(w, g, m, v, step, c, keep);
            }
        }
        y
    }
}
