//! f64 references of the quantized GEMMs, and Python-free packers that write the
//! checkpoint layouts (GPTQ v1/v2, AWQ) from 4-bit codes, so that tests cover the
//! exact formats. Written from the spec, independent of the kernels.

/// `x` rounded to the nearest integer, ties to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round(); // ties away from zero
    if (r - x).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// AWQ's order of columns within a packed word: slot i holds column `AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// 4-bit codes of a `[K, N]` weight with per-group, per-column scales and zero
/// points: `w = (q - z) s`, groups of `group_size` rows.
#[derive(Clone, Debug)]
pub struct W4Codes {
    /// Rows (input features).
    pub k: usize,
    /// Columns (output features).
    pub n: usize,
    /// Rows per group.
    pub group_size: usize,
    /// Codes in 0..16, `[K, N]`.
    pub q: Vec<u8>,
    /// Zero points in 0..16, `[K/G, N]`.
    pub z: Vec<u8>,
    /// Scales, `[K/G, N]`.
    pub s: Vec<f64>,
}

impl W4Codes {
    /// Asymmetric min-max quantization of `w` `[K, N]` per group of rows and column
    /// (the grid GPTQ and AWQ use): `s = (max - min) / 15`, `z = round(-min / s)`.
    pub fn quantize(w: &[f64], k: usize, n: usize, group_size: usize) -> W4Codes {
        let groups = k / group_size;
        let (mut q, mut z, mut s) = (
            vec![0u8; k * n],
            vec![0u8; groups * n],
            vec![0.0; groups * n],
        );
        for g in 0..groups {
            for c in 0..n {
                let col = (g * group_size..(g + 1) * group_size).map(|r| w[r * n + c]);
                let (lo, hi) = col.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
                let scale = ((hi - lo) / 15.0).max(1e-8);
                let zero = round_half_even(-lo / scale).clamp(0.0, 15.0);
                s[g * n + c] = scale;
                z[g * n + c] = zero as u8;
                for r in g * group_size..(g + 1) * group_size {
                    q[r * n + c] =
                        round_half_even(w[r * n + c] / scale + zero).clamp(0.0, 15.0) as u8;
                }
            }
        }
        W4Codes {
            k,
            n,
            group_size,
            q,
            z,
            s,
        }
    }

    /// The dequantized weight `[K, N]`; `g_idx` (one group per row) overrides `k / G`.
    pub fn dequantize(&self, g_idx: Option<&[usize]>) -> Vec<f64> {
        let mut w = vec![0.0; self.k * self.n];
        for r in 0..self.k {
            let g = g_idx.map_or(r / self.group_size, |gi| gi[r]);
            for c in 0..self.n {
                let i = g * self.n + c;
                w[r * self.n + c] = (self.q[r * self.n + c] as f64 - self.z[i] as f64) * self.s[i];
            }
        }
        w
    }

    /// GPTQ's `qweight` int32 `[K/8, N]`: eight rows per word, least-significant first.
    pub fn gptq_qweight(&self) -> Vec<i32> {
        let mut out = vec![0u32; self.k / 8 * self.n];
        for r in 0..self.k {
            for c in 0..self.n {
                out[(r / 8) * self.n + c] |= (self.q[r * self.n + c] as u32) << (4 * (r % 8));
            }
        }
        out.into_iter().map(|w| w as i32).collect()
    }

    /// AWQ's `qweight` int32 `[K, N/8]`: eight columns per word in [`AWQ_ORDER`].
    pub fn awq_qweight(&self) -> Vec<i32> {
        pack_columns(&self.q, self.k, self.n, &AWQ_ORDER, 0)
    }

    /// `qzeros` int32 `[K/G, N/8]`: GPTQ v1 stores `z - 1`, v2 stores `z` (both in
    /// column order); AWQ stores `z` in [`AWQ_ORDER`].
    pub fn qzeros(&self, format: &str, gptq_version: u32) -> Vec<i32> {
        let groups = self.k / self.group_size;
        match format {
            "awq" => pack_columns(&self.z, groups, self.n, &AWQ_ORDER, 0),
            _ => pack_columns(
                &self.z,
                groups,
                self.n,
                &[0, 1, 2, 3, 4, 5, 6, 7],
                (gptq_version == 1) as i32,
            ),
        }
    }
}

/// Packs `[rows, N]` 4-bit values along N, slot i of a word holding column
/// `order[i]` of its group of eight, after subtracting `offset` (4-bit wrap-around).
fn pack_columns(v: &[u8], rows: usize, n: usize, order: &[usize; 8], offset: i32) -> Vec<i32> {
    let mut out = vec![0u32; rows * n / 8];
    for r in 0..rows {
        for w in 0..n / 8 {
            for (slot, &col) in order.iter().enumerate() {
                let val = ((v[r * n + w * 8 + col] as i32 - offset) & 15) as u32;
                out[r * (n / 8) + w] |= val << (4 * slot);
            }
        }
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// `x [M, K] @ w [K, N]` in f64.
pub fn matmul(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            let a = x[i * k + l];
            for j in 0..n {
                y[i * n + j] += a * w[l * n + j];
            }
        }
    }
    y
}

/// W8A8: `y[m, n] = sx[m] sw[n] sum_k xq[m, k] wq[n, k] + bias[n]`.
#[allow(clippy::too_many_arguments)]
pub fn w8a8(
    xq: &[f64],
    sx: &[f64],
    wq: &[f64],
    sw: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|l| xq[i * k + l] * wq[j * k + l]).sum();
            y[i * n + j] = sx[i] * sw[j] * dot + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// Dynamic per-token int8 quantization, in f32 as the kernel defines it:
/// `sx = max|x_m| / 127`, `xq = clamp(round(x / sx), -127, 127)` ties to even (0 for a
/// zero row).
pub fn quantize_per_token(x: &[f32], m: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; m * k];
    let mut s = vec![0f32; m];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        // A NaN anywhere makes the row's scale NaN (its codes 0): dequantized, the row
        // is NaN. An infinity makes the scale infinite: +-inf code +-127, the rest 0.
        s[i] = if row.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0
        };
        if s[i] > 0.0 {
            for (j, v) in row.iter().enumerate() {
                q[i * k + j] = if v.is_infinite() {
                    127i8 * v.signum() as i8
                } else {
                    round_half_even((v / s[i]) as f64).clamp(-127.0, 127.0) as i8
                };
            }
        }
    }
    (q, s)
}

/// Double Rounding: the `bits`-bit code of an int8 code, `clamp(round(q8 / 2^(8 -
/// bits)))` with ties to even, clamped to `[-2^(bits-1), 2^(bits-1) - 1]`.
pub fn double_round(q8: i8, bits: u32) -> i32 {
    let shift = 8 - bits;
    let half = 1i32 << (bits - 1);
    let r = round_half_even(q8 as f64 / f64::from(1u32 << shift)) as i32;
    r.clamp(-half, half - 1)
}

/// The `bits`-bit view of an int8 weight `q8` `[K, N]` with per-channel scale `s8`:
/// `w = double_round(q8) s8 2^(8 - bits)`.
pub fn w8_bits_weight(q8: &[i8], s8: &[f64], k: usize, n: usize, bits: u32) -> Vec<f64> {
    let step = f64::from(1u32 << (8 - bits));
    (0..k * n)
        .map(|i| double_round(q8[i], bits) as f64 * s8[i % n] * step)
        .collect()
}

/// FlexRound's parameters and shapes: `w`, `s2` `[rows, cols]`, `s3` `[rows]`, `s4`
/// `[cols]`, `s1` a scalar; codes clamped to `[qmin, qmax]`.
#[derive(Clone, Debug)]
pub struct FlexRound {
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// The weight.
    pub w: Vec<f64>,
    /// Per-tensor scale.
    pub s1: f64,
    /// Per-element divisor.
    pub s2: Vec<f64>,
    /// Per-output-channel divisor.
    pub s3: Vec<f64>,
    /// Per-input-channel divisor.
    pub s4: Vec<f64>,
    /// Smallest code.
    pub qmin: f64,
    /// Largest code.
    pub qmax: f64,
}

/// FlexRound's gradients.
#[derive(Clone, Debug)]
pub struct FlexRoundGrads {
    /// dL/dw.
    pub dw: Vec<f64>,
    /// dL/ds1.
    pub ds1: f64,
    /// dL/dS2.
    pub ds2: Vec<f64>,
    /// dL/ds3.
    pub ds3: Vec<f64>,
    /// dL/ds4.
    pub ds4: Vec<f64>,
}

impl FlexRound {
    /// FlexRound's divisor of element `i` (row-major): `s1 · s2[i] · s3[row] · s4[col]`.
    pub fn divisor(&self, i: usize) -> f64 {
        self.s1 * self.s2[i] * self.s3[i / self.cols] * self.s4[i % self.cols]
    }

    /// `wq = s1 clamp(round(w / (s1 S2 s3 s4)), qmin, qmax)`.
    pub fn forward(&self) -> Vec<f64> {
        (0..self.rows * self.cols)
            .map(|i| {
                self.s1 * round_half_even(self.w[i] / self.divisor(i)).clamp(self.qmin, self.qmax)
            })
            .collect()
    }

    /// The straight-through backward for an upstream gradient `g` `[rows, cols]`.
    #[allow(clippy::needless_range_loop)] // `i` indexes five arrays, its row and its column
    pub fn backward(&self, g: &[f64]) -> FlexRoundGrads {
        let (rows, cols) = (self.rows, self.cols);
        let mut out = FlexRoundGrads {
            dw: vec![0.0; rows * cols],
            ds1: 0.0,
            ds2: vec![0.0; rows * cols],
            ds3: vec![0.0; rows],
            ds4: vec![0.0; cols],
        };
        for i in 0..rows * cols {
            let d = self.divisor(i);
            let u = self.w[i] / d;
            let r = round_half_even(u);
            let inside = r >= self.qmin && r <= self.qmax;
            let c = r.clamp(self.qmin, self.qmax);
            // d wq / d u = s1 inside the clamp range (straight through round), 0 outside.
            let gu = if inside { g[i] * self.s1 } else { 0.0 };
            out.dw[i] = gu / d;
            // u = w / d, d linear in each factor: du/dx = -u / x. Outside the clamp range
            // the element contributes nothing (not `0 x u`, NaN for an infinite u).
            if inside {
                out.ds2[i] = -gu * u / self.s2[i];
                out.ds3[i / cols] += -gu * u / self.s3[i / cols];
                out.ds4[i % cols] += -gu * u / self.s4[i % cols];
            }
            // wq = s1 c(u(s1)): c + s1 dc/du du/ds1 = c - inside * u.
            out.ds1 += g[i] * (c - if inside { u } else { 0.0 });
        }
        out
    }
}
