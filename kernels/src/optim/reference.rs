//! f64 references of the update rules, written from the spec and the papers' code, one
//! step at a time (call them repeatedly for several steps).

use super::rules::{Hyper, Rule};

/// One step `t` (from 1) of `rule` on `p` with gradient `g` and the rule's state tensors
/// `state` (in `Rule::state_names` order), all in place.
pub fn step(rule: Rule, h: &Hyper, t: u64, p: &mut [f64], g: &[f64], state: &mut [Vec<f64>]) {
    let bc = |b: f64| 1.0 - b.powi(t as i32);
    let decoupled = 1.0 - h.lr * h.weight_decay;
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
        }
    }
}
