//! f64 reference, written from the spec.

/// `epilogue(a @ b)`: `a` [m, k], `b` [k, n] or [n, k] (`trans_b`), `activation`
/// one of `none`, `silu`, `gelu`, `relu`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f64],
    b: &[f64],
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    bias: Option<&[f64]>,
    activation: &str,
    residual: Option<&[f64]>,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                s += a[i * k + p] * bv;
            }
            if let Some(bias) = bias {
                s += bias[j];
            }
            s = activate(s, activation);
            if let Some(r) = residual {
                s += r[i * n + j];
            }
            c[i * n + j] = s;
        }
    }
    c
}

/// The epilogue activation `none | silu | gelu | relu` of one value.
pub fn activate(s: f64, activation: &str) -> f64 {
    match activation {
        "silu" => crate::elementwise::reference::silu(&[s])[0],
        "gelu" => crate::elementwise::reference::gelu(&[s])[0],
        // NaN stays NaN (`f64::max` would return 0).
        "relu" => {
            if s < 0.0 {
                0.0
            } else {
                s
            }
        }
        _ => s,
    }
}
