//! Top singular vectors of a matrix on the device, by one-sided (Hestenes) Jacobi: what
//! FRUGAL's and GaLore's SVD projection needs every `update_gap` steps.
//!
//! ```text
//! X [s, l] (a copy, f32)    find an orthogonal V^T [s, s] with the rows of V^T X orthogonal:
//!                           the rows of V^T are X's left singular vectors (eigenvectors of X X^T),
//!                           the norms of the rows of V^T X its singular values
//! ```
//!
//! A sweep rotates every pair of rows `(i, j)` once: with `a = |x_i|²`, `b = |x_j|²`,
//! `c = x_i · x_j`, `zeta = (b - a) / 2c`, `t = sign(zeta) / (|zeta| + sqrt(1 + zeta²))`
//! (the smaller root: the rotation of at most 45 degrees), `cos = 1 / sqrt(1 + t²)`,
//! `sin = cos t`, `x_i <- cos x_i - sin x_j`, `x_j <- sin x_i + cos x_j` (and the same on
//! the rows of V^T), after which `x_i · x_j = 0`. The `s (s - 1) / 2` pairs are ordered as
//! a round-robin tournament (the circle method, a bye for odd `s`): `s - 1` rounds of
//! `s / 2` disjoint pairs, one launch a round and one cube a pair, so no two cubes touch
//! a row in a launch (no atomics; the order is fixed, so the result is the same run to
//! run). The dot products are recomputed from the rows at each rotation (the one-sided
//! method's accuracy: no Gram matrix, whose rounding would square X's condition number).
//! A pair is rotated while `|c| / sqrt(a b)` exceeds `tol = 16 eps sqrt(l)` (the
//! rounding of an f32 dot product of length `l`), unless a row is in X's numerical null
//! space (`a` or `b <= (l eps)² |X|_F²`: its products are noise no rotation settles);
//! sweeps stop when none was (one f32 per pair read back per sweep), at most
//! [`MAX_SWEEPS`]. V^T is a product of rotations: its rows
//! are orthonormal to rounding whatever the convergence.
//!
//! Cost: `sweeps · s²/2 · (12 l + 6 s)` flops, about `sweeps · s² (3 l + 2 s)` floats
//! moved and `sweeps · (s - 1)` launches (for a 4096 x 4096 gradient on an H100, about 10
//! sweeps of 4095 launches and 1.4 TB).

use crate::launch::check_input;
use cubecl::prelude::*;
use kiln_dsl::{cube_sum, linear_unit};
use kiln_runtime::{shape_str, DType, Error, HostTensor, Result, Tensor};

/// Sweeps after which the rotation stops whatever the off-diagonal left (a well
/// conditioned f32 matrix converges in 6-10).
pub const MAX_SWEEPS: usize = 30;

/// Which singular vectors of `X [rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Left: `[rows]` vectors (eigenvectors of `X X^T`).
    Left,
    /// Right: `[cols]` vectors (eigenvectors of `X^T X`).
    Right,
}

/// The `r` leading singular vectors of a matrix.
pub struct SingularVectors {
    /// `[r, s]` f32, one unit vector a row, by decreasing singular value (ties: the lower
    /// row of the rotated matrix first); `s` = rows (left) or cols (right).
    pub vectors: Tensor,
    /// Their singular values, decreasing.
    pub values: Vec<f64>,
    /// Sweeps run.
    pub sweeps: usize,
    /// The largest `|x_i · x_j| / (|x_i| |x_j|)` of the last sweep (0 once converged).
    pub off_diagonal: f64,
}

/// The `r` leading left or right singular vectors of `x` (`[rows, cols]`, f32/f16/bf16,
/// computed in f32; `x` is not modified), `1 <= r <= ` rows (left) or cols (right).
/// Errors name `x` or `r`.
pub fn top_singular_vectors(x: &Tensor, r: usize, side: Side) -> Result<SingularVectors> {
    let client = x.client();
    check_input("x", x, client)?;
    x.expect_dtype("x", &[DType::F32, DType::F16, DType::BF16])?;
    let [rows, cols] = matrix_dims(x)?;
    // The rows Jacobi orthogonalises: X's (left) or X^T's (right).
    let (s, l) = match side {
        Side::Left => (rows, cols),
        Side::Right => (cols, rows),
    };
    if r == 0 || r > s {
        return Err(Error::Param {
            param: "r".into(),
            expected: format!(
                "1..={s} (the matrix's {})",
                if side == Side::Left {
                    "rows"
                } else {
                    "columns"
                }
            ),
            found: r.to_string(),
        });
    }
    // Rows padded with zeros to whole 4-wide vectors (no rotation changes a zero column).
    let (lp, sp) = (l.next_multiple_of(4), s.next_multiple_of(4));
    let work = load_padded(x, side == Side::Right, 4)?;
    let vt = Tensor::empty(client, DType::F32, &[s, sp])?;
    SvdIdentity::tuned(
        client,
        0.0,
        &SvdIdentityArgs {
            vt: &vt,
            s: s as u32,
            sp: sp as u32,
        },
    )?;
    // Players of the tournament: s, or s + 1 with a bye.
    let players = s + s % 2;
    let pairs = players / 2;
    let off = Tensor::empty(client, DType::F32, &[pairs.max(1)])?;
    let tol = 16.0 * f32::EPSILON as f64 * (l.max(1) as f64).sqrt();
    // Rows under `l eps |X|_F` are X's numerical null space: their dot products are
    // rounding noise that no rotation settles (rotating them only wears V^T down).
    let frobenius: f64 = row_norms(&work, s, lp)?.iter().map(|n| n * n).sum();
    let null = (l as f64 * f32::EPSILON as f64).powi(2) * frobenius;
    let (mut sweeps, mut off_diagonal) = (0, 0.0);
    // A NaN or an infinite |X|_F (an entry whose square overflows f32) leaves no
    // trustworthy rotation and no null-space bound: no sweep, V^T = I.
    while players > 1 && sweeps < MAX_SWEEPS && l > 0 && frobenius.is_finite() {
        for round in 0..players - 1 {
            SvdJacobiRound::tuned(
                client,
                0.0,
                &SvdJacobiRoundArgs {
                    x: &work,
                    vt: &vt,
                    off: &off,
                    s: s as u32,
                    lv: (lp / 4) as u32,
                    sv: (sp / 4) as u32,
                    players: players as u32,
                    pairs: pairs as u32,
                    round: round as u32,
                    first: (round == 0) as u32,
                    tol: tol as f32,
                    null: null as f32,
                },
            )?;
        }
        sweeps += 1;
        off_diagonal = off.download()?.to_f64().into_iter().fold(0.0, f64::max);
        if off_diagonal <= tol {
            break;
        }
    }
    let norms = row_norms(&work, s, lp)?;
    let mut order: Vec<usize> = (0..s).collect();
    // Decreasing, ties to the lower row (a stable sort of the rows' order).
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    order.truncate(r);
    let values = order.iter().map(|&i| norms[i]).collect();
    let picked: Vec<u8> = order
        .iter()
        .flat_map(|&i| (i as i32).to_le_bytes())
        .collect();
    let picked = Tensor::upload(
        client,
        &HostTensor::from_bytes(DType::I32, vec![r], picked)?,
    )?;
    let vectors = Tensor::empty(client, DType::F32, &[r, s])?;
    SvdGatherRows::tuned(
        client,
        0.0,
        &SvdGatherRowsArgs {
            vt: &vt,
            picked: &picked,
            out: &vectors,
            len: (r * s) as u32,
            s: s as u32,
            sp: sp as u32,
        },
    )?;
    Ok(SingularVectors {
        vectors,
        values,
        sweeps,
        off_diagonal,
    })
}

/// The norms of the `s` rows (length `l`) of `x`, read back.
fn row_norms(x: &Tensor, s: usize, l: usize) -> Result<Vec<f64>> {
    let norms = Tensor::empty(x.client(), DType::F32, &[s])?;
    SvdRowNorms::tuned(
        x.client(),
        0.0,
        &SvdRowNormsArgs {
            x,
            norms: &norms,
            s: s as u32,
            l: l as u32,
        },
    )?;
    Ok(norms.download()?.to_f64())
}

/// `x` (`[rows, cols]`, any float dtype) as a new f32 matrix, transposed (`[cols, rows]`)
/// with `transpose`.
pub fn load_f32(x: &Tensor, transpose: bool) -> Result<Tensor> {
    load_padded(x, transpose, 1)
}

/// `x`'s `[rows, cols]`, or an error naming `x` unless it is a matrix.
fn matrix_dims(x: &Tensor) -> Result<[usize; 2]> {
    match *x.shape() {
        [rows, cols] => Ok([rows, cols]),
        _ => Err(Error::Shape {
            tensor: "x".into(),
            expected: "[rows, cols] (a matrix)".into(),
            found: shape_str(x.shape()),
        }),
    }
}

/// [`load_f32`] with each row zero-padded to a multiple of `align` elements (`[rows', l']`).
fn load_padded(x: &Tensor, transpose: bool, align: usize) -> Result<Tensor> {
    let [rows, cols] = matrix_dims(x)?;
    let (out_rows, l) = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let lp = l.next_multiple_of(align);
    let out = Tensor::empty(x.client(), DType::F32, &[out_rows, lp])?;
    if out_rows * lp > 0 {
        SvdLoad::tuned(
            x.client(),
            0.0,
            &SvdLoadArgs {
                x,
                out: &out,
                len: (out_rows * lp) as u32,
                rows: rows as u32,
                cols: cols as u32,
                lp: lp as u32,
                transpose: transpose as u32,
            },
        )?;
    }
    Ok(out)
}

/// `out = x` as f32, or `x^T` with `transpose` (`x` `[rows, cols]` row-major), each row of
/// `out` zero-padded to `lp` elements; one element a unit (the output's, so the writes are
/// coalesced).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(len.div_ceil(UNITS)), cube = UNITS)]
fn svd_load<F: Float>(
    x: &Array<F>,
    out: &mut Array<f32>,
    len: u32,
    rows: u32,
    cols: u32,
    lp: u32,
    transpose: u32,
) {
    let e = linear_unit() as u32;
    if e < len {
        let (r, c) = (e / lp, e % lp);
        // out[r][c] = x[r][c], or x[c][r] transposed (out [cols, rows]).
        let mut l = cols;
        let mut from = r * cols + c;
        if transpose == 1u32 {
            l = rows;
            from = c * cols + r;
        }
        let mut v = 0.0f32;
        if c < l {
            v = f32::cast_from(x[from as usize]);
        }
        out[e as usize] = v;
    }
}

/// `vt = I` (`[s, sp]`, the columns past `s` zero).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes((s * sp).div_ceil(UNITS)), cube = UNITS)]
fn svd_identity(vt: &mut Array<f32>, s: u32, sp: u32) {
    let e = linear_unit() as u32;
    if e < s * sp {
        vt[e as usize] = select(e / sp == e % sp, 1.0f32, 0.0f32);
    }
}

/// One round of a Jacobi sweep: cube `p` rotates its pair of rows of `x` (`[s, lv]`
/// vectors) and of `vt` (`[s, sv]` vectors; rows zero-padded to whole vectors, which no
/// rotation changes) so that the two rows of `x` are orthogonal, and records the pair's
/// `|c| / sqrt(a b)` before the rotation in `off[p]` (the largest of the sweep: `first`
/// starts it). A pair already orthogonal to `tol`, or with a row whose squared norm is under
/// `null` (the numerical null space), is left alone and records 0. Round `round` of the
/// circle method over `players` (s, or s + 1 with a bye): pair 0 is `(round, players - 1)`,
/// pair `p` is `(round + p, round - p)` mod `players - 1`. Every unit of the cube takes part
/// in the reductions. A cube of 64 on a GPU; of 8 on a CPU adapter (one SIMD slice of
/// lavapipe, whose barriers then cost nothing). A 256 x 256 SVD on lavapipe: 2.9 s with
/// one scalar cube of 64 a pair, 2.0 s with cubes of 8, 1.0 s with 4-wide rows as well.
#[kiln_macros::kernel(
    tune(UNITS = [8, 64]),
    require(match device.adapter_type == kiln_runtime::AdapterType::Cpu {
        true => UNITS == 8,
        false => UNITS == 64,
    }),
    vector = [4],
    grid = cubes(pairs),
    cube = UNITS
)]
fn svd_jacobi_round<N: Size>(
    x: &mut Array<Vector<f32, N>>,
    vt: &mut Array<Vector<f32, N>>,
    off: &mut Array<f32>,
    s: u32,
    lv: u32,
    sv: u32,
    players: u32,
    pairs: u32,
    round: u32,
    first: u32,
    tol: f32,
    null: f32,
) {
    let nw = N::value().comptime() as u32;
    let p = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let ring = players - 1;
    let mut a = round;
    let mut b = ring;
    if p > 0 {
        a = (round + p) % ring;
        b = (round + ring - p % ring) % ring;
    }
    let i = min(a, b);
    let j = max(a, b);
    // The bye (row s of an odd s) and cubes past the pairs rotate nothing.
    let live = p < pairs && j < s;
    let zero = Vector::<f32, N>::new(0.0);
    let mut aa4 = zero;
    let mut bb4 = zero;
    let mut ab4 = zero;
    if live {
        let mut t = UNIT_POS;
        while t < lv {
            let xi = x[(i * lv + t) as usize];
            let xj = x[(j * lv + t) as usize];
            aa4 += xi * xi;
            bb4 += xj * xj;
            ab4 += xi * xj;
            t += UNITS;
        }
    }
    let mut aa = 0.0f32;
    let mut bb = 0.0f32;
    let mut ab = 0.0f32;
    #[unroll]
    for k in 0..nw {
        aa += aa4[k as usize];
        bb += bb4[k as usize];
        ab += ab4[k as usize];
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let aa = cube_sum(&mut smem, aa, UNITS);
    let bb = cube_sum(&mut smem, bb, UNITS);
    let ab = cube_sum(&mut smem, ab, UNITS);
    let norm = f32::sqrt(aa) * f32::sqrt(bb);
    let noise = aa <= null || bb <= null;
    let rel = select(norm > 0.0 && !noise, f32::abs(ab) / norm, 0.0f32);
    if live && rel > tol {
        let zeta = (bb - aa) / (2.0 * ab);
        // For a huge zeta, zeta² is inf and t = 0: no rotation, as it should be.
        let t =
            select(zeta >= 0.0, 1.0f32, -1.0f32) / (f32::abs(zeta) + f32::sqrt(1.0 + zeta * zeta));
        let cs = 1.0 / f32::sqrt(1.0 + t * t);
        let sn = cs * t;
        let c4 = Vector::<f32, N>::new(cs);
        let s4 = Vector::<f32, N>::new(sn);
        let mut e = UNIT_POS;
        while e < lv {
            let xi = x[(i * lv + e) as usize];
            let xj = x[(j * lv + e) as usize];
            x[(i * lv + e) as usize] = c4 * xi - s4 * xj;
            x[(j * lv + e) as usize] = s4 * xi + c4 * xj;
            e += UNITS;
        }
        let mut e = UNIT_POS;
        while e < sv {
            let vi = vt[(i * sv + e) as usize];
            let vj = vt[(j * sv + e) as usize];
            vt[(i * sv + e) as usize] = c4 * vi - s4 * vj;
            vt[(j * sv + e) as usize] = s4 * vi + c4 * vj;
            e += UNITS;
        }
    }
    if p < pairs && UNIT_POS == 0 {
        let seen = select(live, rel, 0.0f32);
        if first == 1u32 {
            off[p as usize] = seen;
        } else {
            off[p as usize] = max(off[p as usize], seen);
        }
    }
}

/// `norms[i] = |x_i|` for the `s` rows of `x` (`[s, l]`), one cube a row.
#[kiln_macros::kernel(tune(UNITS = [64]), grid = cubes(s), cube = UNITS)]
fn svd_row_norms(x: &Array<f32>, norms: &mut Array<f32>, s: u32, l: u32) {
    let i = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let mut sum = 0.0f32;
    if i < s {
        let mut t = UNIT_POS;
        while t < l {
            let v = x[(i * l + t) as usize];
            sum += v * v;
            t += UNITS;
        }
    }
    let mut smem = SharedMemory::<f32>::new(UNITS as usize);
    let sum = cube_sum(&mut smem, sum, UNITS);
    if i < s && UNIT_POS == 0 {
        norms[i as usize] = f32::sqrt(sum);
    }
}

/// `out[q][c] = vt[picked[q]][c]` (`out` `[r, s]`, `len = r s`).
#[kiln_macros::kernel(tune(UNITS = [256]), grid = cubes(len.div_ceil(UNITS)), cube = UNITS)]
fn svd_gather_rows(
    vt: &Array<f32>,
    picked: &Array<i32>,
    out: &mut Array<f32>,
    len: u32,
    s: u32,
    sp: u32,
) {
    let e = linear_unit() as u32;
    if e < len {
        let row = u32::cast_from(picked[(e / s) as usize]);
        out[e as usize] = vt[(row * sp + e % s) as usize];
    }
}

/// The f64 reference: `X`'s `r` leading left (`[r, rows]`) or right (`[r, cols]`)
/// singular vectors, row-major, and their singular values, by the same one-sided Jacobi
/// in f64 to convergence (`|c| <= 1e-15 sqrt(a b)`).
pub mod reference {
    use super::Side;

    /// `x` row-major `[rows, cols]`.
    pub fn top_singular_vectors(
        x: &[f64],
        rows: usize,
        cols: usize,
        r: usize,
        side: Side,
    ) -> (Vec<f64>, Vec<f64>) {
        let (s, l) = match side {
            Side::Left => (rows, cols),
            Side::Right => (cols, rows),
        };
        let mut w: Vec<f64> = (0..s * l)
            .map(|e| match side {
                Side::Left => x[e],
                Side::Right => x[(e % l) * cols + e / l],
            })
            .collect();
        let mut vt: Vec<f64> = (0..s * s)
            .map(|e| if e / s == e % s { 1.0 } else { 0.0 })
            .collect();
        for _ in 0..100 {
            let mut rotated = false;
            for i in 0..s {
                for j in i + 1..s {
                    let dot = |u: usize, v: usize| -> f64 {
                        (0..l).map(|t| w[u * l + t] * w[v * l + t]).sum()
                    };
                    let (a, b, c) = (dot(i, i), dot(j, j), dot(i, j));
                    if c == 0.0 || c.abs() <= 1e-15 * (a * b).sqrt() {
                        continue;
                    }
                    rotated = true;
                    let zeta = (b - a) / (2.0 * c);
                    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let cs = 1.0 / (1.0 + t * t).sqrt();
                    let sn = cs * t;
                    for (m, len) in [(&mut w, l), (&mut vt, s)] {
                        for e in 0..len {
                            let (u, v) = (m[i * len + e], m[j * len + e]);
                            m[i * len + e] = cs * u - sn * v;
                            m[j * len + e] = sn * u + cs * v;
                        }
                    }
                }
            }
            if !rotated {
                break;
            }
        }
        let norms: Vec<f64> = (0..s)
            .map(|i| (0..l).map(|t| w[i * l + t].powi(2)).sum::<f64>().sqrt())
            .collect();
        let mut order: Vec<usize> = (0..s).collect();
        order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
        order.truncate(r);
        let vectors = order
            .iter()
            .flat_map(|&i| vt[i * s..(i + 1) * s].to_vec())
            .collect();
        (vectors, order.iter().map(|&i| norms[i]).collect())
    }
}
