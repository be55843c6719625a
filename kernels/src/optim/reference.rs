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
            Rule::Lamb | Rule::AdaGradNorm => unreachable!("handled above"),
        }
    }
}
