//! FlexRound's forward and straight-through backward against f64.

use super::*;

#[test]
fn flexround_forward_and_backward_match_f64() {
    let mut rng = Rng::new(14);
    // 600 rows: ds4 sums its column in blocks of 256 rows (two whole, one partial).
    for (case, (rows, cols)) in [(3, 5), (37, 300), (70, 1), (600, 3)]
        .into_iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::F16] {
            let f = flex_case(&mut rng, rows, cols, dtype);
            let g = rounded(dtype, &rng.normals(rows * cols, 1.0));
            let t = |shape: &[usize], v: &[f64]| up(dtype, shape, v);
            // The scale vectors in both accepted layouts: `[1]`, `[rows]`, `[cols]`, or
            // `[]`, `[1, rows]`, `[1, cols]`; each gradient comes back in its parameter's.
            let (s1_shape, s3_shape, s4_shape) = match case % 2 {
                0 => (vec![1], vec![rows], vec![cols]),
                _ => (vec![], vec![1, rows], vec![1, cols]),
            };
            let (w, s1, s2, s3, s4) = (
                t(&[rows, cols], &f.w),
                t(&s1_shape, &[f.s1]),
                t(&[rows, cols], &f.s2),
                t(&s3_shape, &f.s3),
                t(&s4_shape, &f.s4),
            );
            let inp = FlexRoundInputs {
                w: &w,
                s1: &s1,
                s2: &s2,
                s3: &s3,
                s4: &s4,
                qmin: -8.0,
                qmax: 7.0,
            };
            let wq = qgemm::flexround(&inp).unwrap().download().unwrap().to_f64();
            let want = f.forward();
            let tol = if dtype == DType::F32 { 1e-6 } else { 2e-3 };
            // Codes must agree exactly; values to one rounding of the dtype.
            for i in 0..rows * cols {
                assert!(
                    (wq[i] - want[i]).abs() <= tol * f.s1 * 8.0,
                    "{dtype} wq[{i}]: {} vs {}",
                    wq[i],
                    want[i]
                );
            }
            let grads = qgemm::flexround_backward(&inp, &t(&[rows, cols], &g)).unwrap();
            assert_eq!(grads.ds1.shape(), s1_shape);
            assert_eq!(grads.ds3.shape(), s3_shape);
            assert_eq!(grads.ds4.shape(), s4_shape);
            let r = f.backward(&g);
            for (name, got, want) in [
                ("dw", &grads.dw, r.dw.clone()),
                ("ds1", &grads.ds1, vec![r.ds1]),
                ("ds2", &grads.ds2, r.ds2.clone()),
                ("ds3", &grads.ds3, r.ds3.clone()),
                ("ds4", &grads.ds4, r.ds4.clone()),
            ] {
                // ds1, ds3 and ds4 are sums of up to 300 terms of both signs.
                let reduced = !matches!(name, "dw" | "ds2");
                let gtol = match (dtype, reduced) {
                    (DType::F32, false) => 1e-5,
                    (DType::F32, true) => 1e-4,
                    _ => 5e-3,
                };
                let err = mean_rel(&got.download().unwrap().to_f64(), &want);
                assert!(err < gtol, "{dtype} [{rows}, {cols}] {name}: {err:e}");
            }
        }
    }
}
