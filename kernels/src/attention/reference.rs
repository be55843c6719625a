//! f64 reference of attention written from the spec: the full softmax of every row
//! (no tiling, no online rescaling) and its gradients. Tensors are flat, token-major:
//! `q[t][h][d]` over all query tokens `t` (B * Sq, or the varlen total), `k[t][hk][d]`,
//! `v[t][hk][e]`; `lse` in `[B, H, Sq]` order.

/// The problem a reference call sees.
#[derive(Clone, Debug)]
pub struct Dims {
    /// Query heads `H`.
    pub heads: usize,
    /// KV heads `Hkv` (dividing `H`).
    pub kv_heads: usize,
    /// Key width `D`.
    pub dk: usize,
    /// Value width `Dv`.
    pub dv: usize,
    /// Sequence bounds over the query tokens (`N + 1`).
    pub bounds_q: Vec<usize>,
    /// Sequence bounds over the key tokens (`N + 1`).
    pub bounds_k: Vec<usize>,
    /// Packed sequences (`B = 1`): `lse` is `[1, H, total]`.
    pub varlen: bool,
    /// Score scale.
    pub scale: f64,
    /// Causal mask `j <= i + shift` (positions within the sequence).
    pub causal: bool,
    /// `q_offset - k_offset`.
    pub shift: i64,
    /// Softmax temperature.
    pub temperature: f64,
    /// APE scale added to `lse` as `ln(lse_scale)`.
    pub lse_scale: f64,
}

impl Dims {
    /// Dense batches of `b` sequences, `sq` queries and `sk` keys each.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        b: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        kv_heads: usize,
        dk: usize,
        dv: usize,
    ) -> Dims {
        Dims {
            heads,
            kv_heads,
            dk,
            dv,
            bounds_q: (0..=b).map(|i| i * sq).collect(),
            bounds_k: (0..=b).map(|i| i * sk).collect(),
            varlen: false,
            scale: 1.0 / (dk as f64).sqrt(),
            causal: false,
            shift: 0,
            temperature: 1.0,
            lse_scale: 1.0,
        }
    }

    fn total_q(&self) -> usize {
        *self.bounds_q.last().unwrap_or(&0)
    }

    /// Index of (sequence `n`, query token `t`, head `h`) in `lse`.
    pub fn lse_index(&self, n: usize, t: usize, h: usize) -> usize {
        if self.varlen {
            h * self.total_q() + t
        } else {
            let sq = self.bounds_q[1] - self.bounds_q[0];
            (n * self.heads + h) * sq + (t - self.bounds_q[n])
        }
    }

    /// Whether query `i` sees key `j` (both positions within their sequence).
    pub fn sees(&self, i: usize, j: usize) -> bool {
        !self.causal || j as i64 <= i as i64 + self.shift
    }

    /// The probabilities of one (sequence, query token, head) row over the sequence's
    /// keys, and the row's natural log-sum-exp of `s / T` (before APE's affine map).
    fn row(&self, q: &[f64], k: &[f64], n: usize, t: usize, h: usize) -> (Vec<f64>, f64) {
        let (d, hk) = (self.dk, h / (self.heads / self.kv_heads));
        let i = t - self.bounds_q[n];
        let (k0, k1) = (self.bounds_k[n], self.bounds_k[n + 1]);
        let qr = &q[(t * self.heads + h) * d..][..d];
        let s: Vec<f64> = (k0..k1)
            .map(|kt| {
                if !self.sees(i, kt - k0) {
                    return f64::NEG_INFINITY;
                }
                let kr = &k[(kt * self.kv_heads + hk) * d..][..d];
                self.scale * qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() / self.temperature
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return (vec![0.0; s.len()], f64::NEG_INFINITY);
        }
        let sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (
            s.iter().map(|x| (x - m).exp() / sum).collect(),
            m + sum.ln(),
        )
    }

    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.bounds_q.len() - 1).flat_map(move |n| {
            (self.bounds_q[n]..self.bounds_q[n + 1])
                .flat_map(move |t| (0..self.heads).map(move |h| (n, t, h)))
        })
    }
}

/// `(out, lse)`: `out[t][h][e]` and `lse` in `[B, H, Sq]` order (`-inf` for a row that
/// sees no key, whose `out` is 0).
pub fn forward(dims: &Dims, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (h_n, dv) = (dims.heads, dims.dv);
    let group = h_n / dims.kv_heads;
    let mut out = vec![0.0; dims.total_q() * h_n * dv];
    let mut lse = vec![f64::NEG_INFINITY; dims.total_q() * h_n];
    for (n, t, h) in dims.rows() {
        let (p, l) = dims.row(q, k, n, t, h);
        let o = &mut out[(t * h_n + h) * dv..][..dv];
        for (jj, pj) in p.iter().enumerate() {
            // A masked key contributes nothing, not `0 x v` (a NaN in a masked `v` is
            // not the row's).
            if !dims.sees(t - dims.bounds_q[n], jj) {
                continue;
            }
            let vr = &v[((dims.bounds_k[n] + jj) * dims.kv_heads + h / group) * dv..][..dv];
            for (oe, ve) in o.iter_mut().zip(vr) {
                *oe += pj * ve;
            }
        }
        lse[dims.lse_index(n, t, h)] = dims.temperature * l + dims.lse_scale.ln();
    }
    (out, lse)
}

/// `(dq, dk, dv)` of `sum(do * out)`, in the layouts of q, k, v.
pub fn backward(
    dims: &Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (out, lse) = forward(dims, q, k, v);
    backward_with(dims, q, k, v, &out, &lse, d_o)
}

/// The block backward as the kernels define it: the probabilities from the given
/// `lse` (`p = exp(c s - (lse - ln S) / T)`, `c = scale / T`) and `delta = do . out`
/// from the given `out`. With the forward's own `out` and `lse` this is the exact
/// gradient; with a ring's merged ones, the block's share of the whole gradient.
pub fn backward_with(
    dims: &Dims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    out: &[f64],
    lse: &[f64],
    d_o: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h_n, hkv, d, e) = (dims.heads, dims.kv_heads, dims.dk, dims.dv);
    let group = h_n / hkv;
    let c = dims.scale / dims.temperature;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dvv = vec![0.0; v.len()];
    for (n, t, h) in dims.rows() {
        let l = (lse[dims.lse_index(n, t, h)] - dims.lse_scale.ln()) / dims.temperature;
        if l == f64::NEG_INFINITY {
            continue;
        }
        let hk = h / group;
        let i = t - dims.bounds_q[n];
        let row = (t * h_n + h) * e;
        let dor = &d_o[row..][..e];
        let delta: f64 = dor.iter().zip(&out[row..][..e]).map(|(a, b)| a * b).sum();
        let qr = &q[(t * h_n + h) * d..][..d];
        for jj in 0..dims.bounds_k[n + 1] - dims.bounds_k[n] {
            if !dims.sees(i, jj) {
                continue;
            }
            let kt = (dims.bounds_k[n] + jj) * hkv + hk;
            let s: f64 = qr.iter().zip(&k[kt * d..][..d]).map(|(a, b)| a * b).sum();
            let p = (c * s - l).exp();
            let dp: f64 = dor.iter().zip(&v[kt * e..][..e]).map(|(a, b)| a * b).sum();
            let ds = p * (dp - delta) * c;
            for x in 0..e {
                dvv[kt * e + x] += p * dor[x];
            }
            for x in 0..d {
                dq[(t * h_n + h) * d + x] += ds * k[kt * d + x];
                dk[kt * d + x] += ds * qr[x];
            }
        }
    }
    (dq, dk, dvv)
}

/// The merge of two partial results (f64, by weights `exp(lse - max)`, for tests):
/// `out` `[B, S, H, Dv]`, `lse` `[B, H, S]` as `shape = [B, S, H, Dv]`.
pub fn merge(
    out_a: &[f64],
    lse_a: &[f64],
    out_b: &[f64],
    lse_b: &[f64],
    shape: [usize; 4],
) -> (Vec<f64>, Vec<f64>) {
    let [b, s, h, dv] = shape;
    let mut out = out_a.to_vec();
    let mut lse = lse_a.to_vec();
    for (bi, si, hi) in
        (0..b).flat_map(|bi| (0..s).flat_map(move |si| (0..h).map(move |hi| (bi, si, hi))))
    {
        let r = (bi * h + hi) * s + si;
        let o = ((bi * s + si) * h + hi) * dv;
        let (la, lb) = (lse_a[r], lse_b[r]);
        let m = la.max(lb);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
        lse[r] = m + (wa + wb).ln();
        for x in o..o + dv {
            out[x] = (wa * out_a[x] + wb * out_b[x]) / (wa + wb);
        }
    }
    (out, lse)
}
