//! FRUGAL's SVD projection and the device SVD under it, against f64 references written
//! from the spec: the Jacobi singular vectors as singular vectors (orthonormal, their
//! eigen-residuals, the values of the f64 one-sided Jacobi, the leading subspace where
//! the spectrum has a gap; rank-deficient and zero matrices), FRUGAL steps across three
//! subspaces for both projection sides, a vector, a rank-3 tensor and an f16 tensor with
//! its master copy, resuming mid-subspace bitwise, and bad input.

use crate::common::{assert_clear, client, down, up};
use kiln::check::{max_abs_error, max_rel_error, Rng};
use kiln::kernels::optim::{
    frugal_matrix, reference, Frugal, FrugalConfig, FrugalSvd, Hyper, Rule, Subspace,
};
use kiln::kernels::svd::{self, top_singular_vectors, Side};
use kiln::{DType, HostTensor};

fn f32s(rng: &mut Rng, n: usize) -> Vec<f64> {
    HostTensor::from_f64(DType::F32, vec![n], &rng.normals(n, 1.0))
        .unwrap()
        .to_f64()
}

/// `x` (`[rows, cols]`) times `u` (left: `x^T u`, `[cols]`; right: `x u`, `[rows]`).
fn apply(x: &[f64], rows: usize, cols: usize, side: Side, u: &[f64]) -> Vec<f64> {
    match side {
        Side::Left => (0..cols)
            .map(|j| (0..rows).map(|i| x[i * cols + j] * u[i]).sum())
            .collect(),
        Side::Right => (0..rows)
            .map(|i| (0..cols).map(|j| x[i * cols + j] * u[j]).sum())
            .collect(),
    }
}

/// `vectors` (`[r, s]`, row-major) are `r` leading singular vectors of `x`: orthonormal
/// within 1e-5, each an eigenvector of `x x^T` (left) or `x^T x` (right) with residual
/// within 1e-5 of `sigma_max²`, their singular values those of the f64 reference within
/// 1e-5 of `sigma_max` (plus, past the rank, the null-space bound `l eps |X|_F`).
/// Returns the reference's values.
#[allow(clippy::needless_range_loop)] // `a` is a vector index and a row of `want`
fn assert_leading(
    x: &[f64],
    rows: usize,
    cols: usize,
    side: Side,
    vectors: &[f64],
    r: usize,
    at: &str,
) -> Vec<f64> {
    let s = vectors.len() / r;
    let (_, want) = svd::reference::top_singular_vectors(x, rows, cols, r, side);
    let all = svd::reference::top_singular_vectors(x, rows, cols, 1, side).1;
    let top = all[0].max(1e-30);
    let row = |q: usize| &vectors[q * s..(q + 1) * s];
    for a in 0..r {
        for b in 0..r {
            let dot: f64 = row(a).iter().zip(row(b)).map(|(x, y)| x * y).sum();
            let e = (dot - (a == b) as u8 as f64).abs();
            assert!(e <= 1e-5, "{at}: <v{a}, v{b}> off by {e:.2e}");
        }
        // y = X^T u (left) or X w (right); X y (or X^T y) = sigma² u.
        let y = apply(x, rows, cols, side, row(a));
        let sigma = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        let back = match side {
            Side::Left => apply(x, rows, cols, Side::Right, &y),
            Side::Right => apply(x, rows, cols, Side::Left, &y),
        };
        let scaled: Vec<f64> = row(a).iter().map(|u| sigma * sigma * u).collect();
        let res = max_abs_error(&back, &scaled);
        assert!(
            res <= 1e-5 * top * top,
            "{at}: vector {a} residual {res:.2e} (sigma_max {top:.3})"
        );
        // Beyond the rank, the value of a null-space row: under `l eps |X|_F`.
        let l = if side == Side::Left { cols } else { rows };
        let null = l as f64 * f32::EPSILON as f64 * x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let e = (sigma - want[a]).abs();
        assert!(
            e <= 1e-5 * top + null,
            "{at}: sigma {a} {sigma} against {}",
            want[a]
        );
    }
    want
}

#[test]
fn jacobi_singular_vectors_are_the_leading_ones() {
    let mut rng = Rng::new(3);
    for (rows, cols, side, r) in [
        (37, 53, Side::Left, 10),
        (37, 53, Side::Right, 53),
        (53, 37, Side::Right, 9),
        (1, 17, Side::Left, 1),
        (16, 16, Side::Left, 4),
    ] {
        let x = f32s(&mut rng, rows * cols);
        let t = up(DType::F32, &[rows, cols], &x);
        let got = top_singular_vectors(&t, r, side).unwrap();
        let at = format!("{rows}x{cols} {side:?} r {r}");
        assert_eq!(
            got.vectors.shape(),
            &[r, if side == Side::Left { rows } else { cols }]
        );
        let vectors = down(&got.vectors);
        let want = assert_leading(&x, rows, cols, side, &vectors, r, &at);
        let null = 60.0 * f32::EPSILON as f64 * x.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (q, (a, b)) in got.values.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * want[0] + null,
                "{at}: value {q}: {a} against {b}"
            );
        }
        assert!(got.sweeps <= 15, "{at}: {} sweeps", got.sweeps);
        // The input is a copy's: unchanged; and the same bits on a second run.
        assert_eq!(down(&t), x, "{at}: input modified");
        let again = top_singular_vectors(&t, r, side).unwrap();
        assert_eq!(down(&again.vectors), vectors, "{at}: deterministic");
    }
}

/// Where the spectrum has a gap the leading subspace is pinned down: a rank-3 matrix
/// (three nonzero singular values) gives the f64 reference's subspace within 1e-5 (its
/// projector), in f32 and f16; an all-zero matrix gives orthonormal vectors and zeros,
/// no NaN.
#[test]
fn jacobi_finds_a_rank_deficient_subspace_and_survives_zeros() {
    let (rows, cols) = (20, 30);
    let mut rng = Rng::new(17);
    let (a, b) = (f32s(&mut rng, rows * 3), f32s(&mut rng, 3 * cols));
    let x: Vec<f64> = (0..rows * cols)
        .map(|e| {
            (0..3)
                .map(|q| a[(e / cols) * 3 + q] * b[q * cols + e % cols])
                .sum()
        })
        .collect();
    for dtype in [DType::F32, DType::F16] {
        let t = up(dtype, &[rows, cols], &x);
        let x = down(&t);
        for side in [Side::Left, Side::Right] {
            let got = top_singular_vectors(&t, 3, side).unwrap();
            let v = down(&got.vectors);
            let (w, _) = svd::reference::top_singular_vectors(&x, rows, cols, 3, side);
            let s = v.len() / 3;
            let projector = |m: &[f64], i: usize, j: usize| -> f64 {
                (0..3).map(|q| m[q * s + i] * m[q * s + j]).sum()
            };
            let of = |m: &[f64]| -> Vec<f64> {
                (0..s * s).map(|e| projector(m, e / s, e % s)).collect()
            };
            let e = max_abs_error(&of(&v), &of(&w));
            assert!(e <= 1e-5, "{dtype} {side:?}: projector off by {e:.2e}");
            assert_leading(&x, rows, cols, side, &v, 3, &format!("{dtype} {side:?}"));
        }
    }
    let zeros = up(DType::F32, &[8, 5], &[0.0; 40]);
    let got = top_singular_vectors(&zeros, 5, Side::Right).unwrap();
    assert!(got.values.iter().all(|&v| v == 0.0));
    assert_leading(
        &[0.0; 40],
        8,
        5,
        Side::Right,
        &down(&got.vectors),
        5,
        "zeros",
    );
}

fn hyper() -> Hyper {
    Hyper {
        lr: 0.01,
        weight_decay: 0.1,
        ..Hyper::defaults(Rule::AdamW)
    }
}

fn config() -> FrugalConfig {
    FrugalConfig {
        density: 0.25,
        update_gap: 3,
        lr_free: 0.003,
        subspace: Subspace::Svd,
        ..Default::default()
    }
}

/// Seven steps (three subspaces) of a list: a matrix of each projection side, a vector, a
/// rank-3 tensor and an f16 matrix. At each subspace's first step the device's projection
/// is `rank` leading singular vectors of that gradient (as `assert_leading` checks them);
/// the reference steps with the device's projection in f64; every parameter (the f16
/// one's master copy) and moment within 1e-6.
#[test]
fn steps_across_subspaces_match_the_f64_reference() {
    let shapes = [
        vec![13, 9],
        vec![6, 11],
        vec![10],
        vec![4, 3, 5],
        vec![12, 8],
    ];
    let dtypes = [DType::F32, DType::F32, DType::F32, DType::F32, DType::F16];
    steps_match(&shapes, &dtypes, config(), &[3, 2, 1, 1, 2], 44);
}

/// At density 1 (`r = min(rows, cols)`) the projection spans everything: the residual is
/// zero, its rounding is not signed (a mutation that signs it moves every coordinate by
/// `lr_free`, 3e-3, and fails), and the step is Adam in the singular basis.
#[test]
fn full_rank_steps_have_no_sign_term() {
    let c = FrugalConfig {
        density: 1.0,
        ..config()
    };
    let shapes = [vec![6, 4], vec![3, 5], vec![5, 5]];
    let dtypes = [DType::F32, DType::F32, DType::F16];
    steps_match(&shapes, &dtypes, c, &[4, 3, 5], 45);
}

/// Seven steps of a list from `seed`; see [`steps_across_subspaces_match_the_f64_reference`].
fn steps_match(
    shapes: &[Vec<usize>],
    dtypes: &[DType],
    c: FrugalConfig,
    ranks: &[usize],
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    // A random tensor of each shape and dtype: its values (rounded to the dtype) and it.
    let mut draw = || -> (Vec<Vec<f64>>, Vec<kiln::Tensor>) {
        shapes
            .iter()
            .zip(dtypes)
            .map(|(s, &d)| {
                let t = up(d, s, &f32s(&mut rng, s.iter().product()));
                (down(&t), t)
            })
            .unzip()
    };
    let (mut p, ts) = draw();
    let refs: Vec<&kiln::Tensor> = ts.iter().collect();
    let mut opt = FrugalSvd::new_multi(&refs, hyper(), c).unwrap();
    let got: Vec<usize> = (0..shapes.len()).map(|i| opt.rank_of(i).unwrap()).collect();
    assert_eq!(got, ranks, "ceil(density min(rows, cols))");
    let mut proj = vec![Vec::new(); shapes.len()];
    let mut moments = vec![(Vec::new(), Vec::new()); shapes.len()];
    for step in 1..=7u64 {
        let (g, gt) = draw();
        let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
        opt.step_multi(&refs, &grefs).unwrap();
        for i in 0..shapes.len() {
            let at = format!("tensor {i} {:?} step {step}", shapes[i]);
            let (dp, dm, dv) = opt.state_of(i).unwrap();
            if step % 3 == 1 {
                proj[i] = down(&dp);
                let (rows, cols) = frugal_matrix(&shapes[i]);
                let side = if rows >= cols {
                    Side::Right
                } else {
                    Side::Left
                };
                assert_leading(&g[i], rows, cols, side, &proj[i], ranks[i], &at);
            } else {
                assert_eq!(
                    down(&dp),
                    proj[i],
                    "{at}: the projection stays within a subspace"
                );
            }
            let (m, v) = &mut moments[i];
            reference::frugal_svd_step(
                &hyper(),
                &c,
                step,
                &shapes[i],
                &mut p[i],
                &g[i],
                &proj[i],
                m,
                v,
            );
            let param = match opt.master_of(i).unwrap() {
                Some(master) => {
                    let master = down(&master);
                    let rounded = down(&up(DType::F16, &[master.len()], &master));
                    assert_eq!(
                        down(&ts[i]),
                        rounded,
                        "{at}: the f16 tensor is its master's rounding"
                    );
                    master
                }
                None => down(&ts[i]),
            };
            let floor = |w: &[f64]| w.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
            for (what, got, want) in [
                ("param", param, &p[i]),
                ("m", down(&dm), m),
                ("v", down(&dv), v),
            ] {
                let e = max_rel_error(&got, want, floor(want));
                assert!(e <= 1e-6, "{at} {what}: {e:.2e}");
            }
        }
    }
    assert_eq!(opt.steps(), 7);
}

/// Resuming after step 5 (mid-subspace) with the saved projection, moments and master
/// copy continues bitwise; without them it is refused, naming the projection.
#[test]
fn resume_mid_subspace_is_bitwise() {
    let c = config();
    let mut rng = Rng::new(5);
    let p0 = f32s(&mut rng, 96);
    let grads: Vec<Vec<f64>> = (0..7).map(|_| f32s(&mut rng, 96)).collect();
    let a = up(DType::F16, &[8, 12], &p0);
    let mut first = FrugalSvd::new_multi(&[&a], hyper(), c).unwrap();
    for g in &grads[..5] {
        first
            .step_multi(&[&a], &[&up(DType::F16, &[8, 12], g)])
            .unwrap();
    }
    let (proj, m, v) = first.state_of(0).unwrap();
    let master = first.master_of(0).unwrap().unwrap();
    let b = up(DType::F16, &[8, 12], &down(&a));
    let mut second =
        FrugalSvd::resume_multi(&[&b], hyper(), c, 5, &[Some((&proj, &m, &v))]).unwrap();
    second.set_master(0, &master).unwrap();
    for g in &grads[5..] {
        let g = up(DType::F16, &[8, 12], g);
        first.step_multi(&[&a], &[&g]).unwrap();
        second.step_multi(&[&b], &[&g]).unwrap();
    }
    assert_eq!(down(&a), down(&b));
    assert_eq!(
        down(&first.master_of(0).unwrap().unwrap()),
        down(&second.master_of(0).unwrap().unwrap())
    );
    let e = FrugalSvd::resume_multi(&[&b], hyper(), c, 5, &[])
        .err()
        .unwrap();
    assert_clear(e, &["state", "mid-subspace"]);
    let e = FrugalSvd::resume_multi(&[&b], hyper(), c, 5, &[None])
        .err()
        .unwrap();
    assert_clear(e, &["projection", "mid-subspace"]);
}

/// An empty tensor in the list: its state comes back empty in its declared shapes (not
/// as the one-element placeholder it is held in), resuming mid-subspace with it works,
/// and its neighbour continues bitwise.
#[test]
fn an_empty_tensor_saves_and_resumes() {
    let c = config();
    let mut rng = Rng::new(9);
    let p0 = f32s(&mut rng, 24);
    let grads: Vec<Vec<f64>> = (0..4).map(|_| f32s(&mut rng, 24)).collect();
    for shape in [vec![0, 4], vec![5, 0], vec![0]] {
        let empty = up(DType::F32, &shape, &[]);
        let a = up(DType::F32, &[6, 4], &p0);
        let mut first = FrugalSvd::new_multi(&[&empty, &a], hyper(), c).unwrap();
        for g in &grads[..2] {
            first
                .step_multi(&[&empty, &a], &[&empty, &up(DType::F32, &[6, 4], g)])
                .unwrap();
        }
        let (p, m, v) = first.state_of(0).unwrap();
        for (what, t) in [("projection", &p), ("m", &m), ("v", &v)] {
            assert_eq!(t.numel(), 0, "{shape:?} {what}: {:?}", t.shape());
            assert_eq!(t.shape().len(), 2, "{shape:?} {what}: {:?}", t.shape());
        }
        let (pa, ma, va) = first.state_of(1).unwrap();
        let b = up(DType::F32, &[6, 4], &down(&a));
        let mut second = FrugalSvd::resume_multi(
            &[&empty, &b],
            hyper(),
            c,
            2,
            &[Some((&p, &m, &v)), Some((&pa, &ma, &va))],
        )
        .unwrap();
        for g in &grads[2..] {
            let g = up(DType::F32, &[6, 4], g);
            first.step_multi(&[&empty, &a], &[&empty, &g]).unwrap();
            second.step_multi(&[&empty, &b], &[&empty, &g]).unwrap();
        }
        assert_eq!(down(&a), down(&b), "{shape:?}");
    }
}

/// Extreme gradients (one entry NaN, infinite, or 1e30, whose square overflows f32):
/// no rotation can be trusted and the null-space bound is lost, so no sweep runs and the
/// projection is rows of the identity (orthonormal); the step runs, a NaN reaching the
/// parameter as Adam's would, with no panic and no hang (without the rule the NaN case
/// ran two sweeps, rotating the finite rows with the null-space bound NaN).
#[test]
fn nan_and_infinite_gradients_neither_panic_nor_hang() {
    for bad in [f64::NAN, f64::INFINITY, 1e30] {
        let mut g = vec![0.25; 24];
        g[7] = bad;
        let grad = up(DType::F32, &[6, 4], &g);
        let got = top_singular_vectors(&grad, 2, Side::Right).unwrap();
        assert_eq!(got.sweeps, 0, "{bad}");
        let v = down(&got.vectors);
        for a in 0..2 {
            for b in 0..2 {
                let dot: f64 = (0..4).map(|k| v[a * 4 + k] * v[b * 4 + k]).sum();
                assert_eq!(dot, (a == b) as u8 as f64, "{bad}: rows {a}, {b}");
            }
        }
        let param = up(DType::F32, &[6, 4], &[0.5; 24]);
        let mut opt = FrugalSvd::new_multi(&[&param], hyper(), config()).unwrap();
        opt.step_multi(&[&param], &[&grad]).unwrap();
        if bad.is_nan() {
            assert!(down(&param).iter().any(|p| p.is_nan()), "NaN carried");
        }
    }
}

#[test]
fn bad_input_is_refused_by_name() {
    let t = up(DType::F32, &[6, 4], &[0.5; 24]);
    let e = top_singular_vectors(&t, 0, Side::Left).err().unwrap();
    assert_clear(e, &["r", "1..=6", "0"]);
    let e = top_singular_vectors(&t, 5, Side::Right).err().unwrap();
    assert_clear(e, &["r", "1..=4", "5"]);
    let cube = up(DType::F32, &[2, 3, 4], &[0.5; 24]);
    let e = top_singular_vectors(&cube, 1, Side::Left).err().unwrap();
    assert_clear(e, &["x", "[rows, cols]"]);
    // Each optimizer takes its own subspaces.
    let e = Frugal::new(&t, hyper(), config()).err().unwrap();
    assert_clear(e, &["subspace", "FrugalSvd", "svd"]);
    let coords = FrugalConfig {
        subspace: Subspace::Coordinates,
        ..config()
    };
    let e = FrugalSvd::new_multi(&[&t], hyper(), coords).err().unwrap();
    assert_clear(e, &["subspace", "svd", "coordinates"]);
    // A projection of the wrong shape (r = 1 of 4 columns: [1, 4]).
    let wrong = up(DType::F32, &[2, 4], &[0.0; 8]);
    let m = up(DType::F32, &[6, 1], &[0.0; 6]);
    let e = FrugalSvd::resume_multi(&[&t], hyper(), config(), 1, &[Some((&wrong, &m, &m))])
        .err()
        .unwrap();
    assert_clear(e, &["projection", "[1, 4]"]);
    // The rank is fixed at creation.
    let mut opt = FrugalSvd::new_multi(&[&t], hyper(), config()).unwrap();
    opt.config.density = 0.5;
    let e = opt.step_multi(&[&t], &[&t]).err().unwrap();
    assert_clear(e, &["density", "0.25", "0.5"]);
    opt.config.density = 0.25;
    opt.config.subspace = Subspace::Rows;
    let e = opt.step_multi(&[&t], &[&t]).err().unwrap();
    assert_clear(e, &["subspace", "svd", "rows"]);
    // Through `kiln run`'s registry: mid-subspace without the state's inputs, an
    // update_gap of 0 (before any modulo), a projection for another subspace.
    let op = kiln::kernels::op("frugal").unwrap();
    let run = |params: &[(&str, &str)], with_projection: bool| {
        let mut tensors = std::collections::BTreeMap::new();
        tensors.insert("param".to_string(), t.clone());
        tensors.insert("grad".to_string(), t.clone());
        if with_projection {
            tensors.insert("projection".to_string(), wrong.clone());
        }
        let params = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        op.call(client(), tensors, params).err().unwrap()
    };
    let e = run(&[("subspace", "svd"), ("step", "3")], false);
    assert_clear(e, &["projection, m, v", "step 3", "none"]);
    let e = run(
        &[("subspace", "svd"), ("update_gap", "0"), ("step", "3")],
        false,
    );
    assert_clear(e, &["update_gap", ">= 1", "0"]);
    let e = run(&[("subspace", "rows")], true);
    assert_clear(e, &["projection", "svd", "rows"]);
}
