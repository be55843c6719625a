//! f64 CPU reference of GLA, written from the recurrent form of the spec (not from the
//! chunked formulas the kernels use), so that it is an independent check.
//!
//! Layouts as the operator's: q, k, g `[rows, H, K]`, v, o `[rows, H, V]` where
//! `rows` are all tokens of all sequences back to back (`[B, T]` flattened, or the
//! varlen batch), sequence `n` spanning rows `bounds[n]..bounds[n + 1]`; states
//! `[N, H, K, V]`.

/// The problem's dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Heads.
    pub heads: usize,
    /// Key (and gate) width K.
    pub dk: usize,
    /// Value width V.
    pub dv: usize,
    /// Sequence boundaries in rows, `N + 1` entries starting at 0.
    pub bounds: Vec<usize>,
}

impl Dims {
    /// Sequences.
    pub fn n_seq(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }
    /// All rows (tokens).
    pub fn rows(&self) -> usize {
        *self.bounds.last().unwrap_or(&0)
    }
    fn state(&self) -> usize {
        self.dk * self.dv
    }
}

/// Forward: `o` `[rows, H, V]` and the final states `ht` `[N, H, K, V]`.
pub fn forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    h0: Option<&[f64]>,
    d: &Dims,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (h, dv) = (d.heads, d.dv);
    let mut o = vec![0.0; d.rows() * h * dv];
    let mut ht = vec![0.0; d.n_seq() * h * d.state()];
    for n in 0..d.n_seq() {
        for head in 0..h {
            let sidx = (n * h + head) * d.state();
            let mut s = match h0 {
                Some(h0) => h0[sidx..sidx + d.state()].to_vec(),
                None => vec![0.0; d.state()],
            };
            for t in d.bounds[n]..d.bounds[n + 1] {
                step(&mut s, t, head, q, k, v, g, d, scale, &mut o);
            }
            ht[sidx..sidx + d.state()].copy_from_slice(&s);
        }
    }
    (o, ht)
}

/// One recurrent step at row `t`: `S = diag(exp(g_t)) S + k_t^T v_t`, `o_t = scale q_t S`.
#[allow(clippy::too_many_arguments)]
fn step(
    s: &mut [f64],
    t: usize,
    head: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    d: &Dims,
    scale: f64,
    o: &mut [f64],
) {
    let (h, dk, dv) = (d.heads, d.dk, d.dv);
    let kb = (t * h + head) * dk;
    let vb = (t * h + head) * dv;
    for i in 0..dk {
        let a = g[kb + i].exp();
        for j in 0..dv {
            s[i * dv + j] = a * s[i * dv + j] + k[kb + i] * v[vb + j];
        }
    }
    for j in 0..dv {
        o[vb + j] = scale * (0..dk).map(|i| q[kb + i] * s[i * dv + j]).sum::<f64>();
    }
}

/// Gradients of a loss with `do = dL/do` and `dht = dL/dht`.
#[derive(Clone, Debug)]
pub struct Grads {
    /// `[rows, H, K]`.
    pub dq: Vec<f64>,
    /// `[rows, H, K]`.
    pub dk: Vec<f64>,
    /// `[rows, H, V]`.
    pub dv: Vec<f64>,
    /// `[rows, H, K]`.
    pub dg: Vec<f64>,
    /// `[N, H, K, V]`.
    pub dh0: Vec<f64>,
}

/// Steps between stored states in [`backward`] (states in between are recomputed).
const CHECKPOINT: usize = 64;

/// Backward by the adjoint of the recurrence, walking time in reverse:
/// `dS += scale q_t^T do_t; dq_t = scale do_t S_t^T; dk_t = dS v_t^T; dv_t = k_t dS;
/// dg_t = exp(g_t) * rowsum(dS * S_{t-1}); dS = diag(exp(g_t)) dS`, starting from
/// `dS = dht`; `dh0` is the last `dS`. The gate gradient comes straight from the
/// recurrence, not from the kernels' reverse-cumsum identity. States are
/// checkpointed every 64 steps and recomputed, so memory stays `O(64 K V)`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    h0: Option<&[f64]>,
    do_: &[f64],
    dht: Option<&[f64]>,
    d: &Dims,
    scale: f64,
) -> Grads {
    let (h, dk, dv) = (d.heads, d.dk, d.dv);
    let st = d.state();
    let mut out = Grads {
        dq: vec![0.0; d.rows() * h * dk],
        dk: vec![0.0; d.rows() * h * dk],
        dv: vec![0.0; d.rows() * h * dv],
        dg: vec![0.0; d.rows() * h * dk],
        dh0: vec![0.0; d.n_seq() * h * st],
    };
    let mut scratch_o = vec![0.0; d.rows() * h * dv];
    for n in 0..d.n_seq() {
        let (bos, eos) = (d.bounds[n], d.bounds[n + 1]);
        for head in 0..h {
            let sidx = (n * h + head) * st;
            // Checkpoints: the state before rows bos, bos + 64, ...
            let mut s = match h0 {
                Some(h0) => h0[sidx..sidx + st].to_vec(),
                None => vec![0.0; st],
            };
            let mut checkpoints = Vec::new();
            for t in bos..eos {
                if (t - bos) % CHECKPOINT == 0 {
                    checkpoints.push(s.clone());
                }
                step(&mut s, t, head, q, k, v, g, d, scale, &mut scratch_o);
            }
            let mut ds = match dht {
                Some(dht) => dht[sidx..sidx + st].to_vec(),
                None => vec![0.0; st],
            };
            for (ci, ck) in checkpoints.iter().enumerate().rev() {
                let t0 = bos + ci * CHECKPOINT;
                let t1 = (t0 + CHECKPOINT).min(eos);
                // states[i] = the state after row t0 + i.
                let mut states = Vec::with_capacity(t1 - t0);
                let mut s = ck.clone();
                for t in t0..t1 {
                    step(&mut s, t, head, q, k, v, g, d, scale, &mut scratch_o);
                    states.push(s.clone());
                }
                for t in (t0..t1).rev() {
                    let cur = &states[t - t0];
                    let prev = if t == t0 { ck } else { &states[t - t0 - 1] };
                    let kb = (t * h + head) * dk;
                    let vb = (t * h + head) * dv;
                    for i in 0..dk {
                        for j in 0..dv {
                            ds[i * dv + j] += scale * q[kb + i] * do_[vb + j];
                        }
                    }
                    for i in 0..dk {
                        let row = i * dv..(i + 1) * dv;
                        out.dq[kb + i] = scale
                            * cur[row.clone()]
                                .iter()
                                .zip(&do_[vb..vb + dv])
                                .map(|(a, b)| a * b)
                                .sum::<f64>();
                        out.dk[kb + i] = ds[row.clone()]
                            .iter()
                            .zip(&v[vb..vb + dv])
                            .map(|(a, b)| a * b)
                            .sum::<f64>();
                        let a = g[kb + i].exp();
                        out.dg[kb + i] = a * ds[row.clone()]
                            .iter()
                            .zip(&prev[row.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f64>();
                    }
                    for j in 0..dv {
                        out.dv[vb + j] = (0..dk).map(|i| k[kb + i] * ds[i * dv + j]).sum();
                    }
                    for i in 0..dk {
                        let a = g[kb + i].exp();
                        for j in 0..dv {
                            ds[i * dv + j] *= a;
                        }
                    }
                }
            }
            out.dh0[sidx..sidx + st].copy_from_slice(&ds);
        }
    }
    out
}

pub use kiln_runtime::check::rms_relative;
