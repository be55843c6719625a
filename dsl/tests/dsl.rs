//! Each DSL piece alone, on the default wgpu adapter (lavapipe in CI), against closed
//! forms or f64.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use kiln_dsl::{
    cube_exclusive_sum, cube_inclusive_scan, cube_max, cube_sum, exp_diff, gelu_tanh, linear_cube,
    linear_unit, load_tile, reg_tile_mma, silu, ScanOp,
};

type R = WgpuRuntime;

fn client() -> ComputeClient<R> {
    R::client(&Default::default())
}

#[cube(launch_unchecked)]
fn reduce_kernel(out: &mut Array<f32>, #[comptime] units: u32) {
    let mut smem = SharedMemory::<f32>::new(units as usize);
    let v = f32::cast_from(UNIT_POS);
    let s = cube_sum(&mut smem, v, units);
    let m = cube_max(&mut smem, 100.0 - v, units);
    if UNIT_POS == 0 {
        out[0] = s;
        out[1] = m;
    }
}

#[test]
fn cube_sum_and_max_match_closed_forms() {
    let c = client();
    for units in [32u32, 64, 256] {
        let out = c.empty(8);
        unsafe {
            reduce_kernel::launch_unchecked::<R>(
                &c,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(units),
                ArrayArg::from_raw_parts(out.clone(), 2),
                units,
            )
        };
        let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
        assert_eq!(
            got[0],
            (units * (units - 1) / 2) as f32,
            "sum, units {units}"
        );
        assert_eq!(got[1], 100.0, "max, units {units}");
    }
}

#[cube(launch_unchecked)]
fn pos_kernel(out: &mut Array<u32>) {
    let i = linear_unit();
    if i < out.len() {
        out[i] = linear_cube() as u32;
    }
}

#[test]
fn linear_positions_cover_a_2d_grid() {
    let c = client();
    // 3 x 2 cubes of 4 units: units 0..24 in cube order x first.
    let out = c.empty(24 * 4);
    unsafe {
        pos_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(3, 2, 1),
            CubeDim::new_1d(4),
            ArrayArg::from_raw_parts(out.clone(), 24),
        )
    };
    let got = u32::from_bytes(&c.read_one_unchecked(out)).to_vec();
    let want: Vec<u32> = (0..24).map(|i| i / 4).collect();
    assert_eq!(got, want);
}

#[cube(launch_unchecked)]
fn math_kernel(a: &Array<f32>, b: &Array<f32>, out: &mut Array<f32>, one: f32) {
    let i = ABSOLUTE_POS;
    if i < a.len() {
        out[i * 3] = exp_diff(a[i], b[i], one);
        out[i * 3 + 1] = silu::<Const<1>>(Vector::new(a[i]))[0];
        out[i * 3 + 2] = gelu_tanh::<Const<1>>(Vector::new(a[i]))[0];
    }
}

#[test]
fn exp_diff_and_activations_match_f64() {
    let c = client();
    let a: Vec<f32> = vec![
        -20.0,
        -7.25,
        0.0,
        3.5,
        10.0,
        -100.0,
        f32::NEG_INFINITY,
        1e-3,
    ];
    let b: Vec<f32> = vec![3.3, 9.9, 0.0, -2.0, 10.0, 0.0, 1.0, -1e-3];
    let n = a.len();
    let (ha, hb) = (
        c.create_from_slice(f32::as_bytes(&a)),
        c.create_from_slice(f32::as_bytes(&b)),
    );
    let out = c.empty(n * 3 * 4);
    unsafe {
        math_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(n as u32),
            ArrayArg::from_raw_parts(ha, n),
            ArrayArg::from_raw_parts(hb, n),
            ArrayArg::from_raw_parts(out.clone(), n * 3),
            1.0f32,
        )
    };
    let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
    for i in 0..n {
        let (x, y) = (a[i] as f64, b[i] as f64);
        let e = (x - y).exp();
        let e = if e < f32::MIN_POSITIVE as f64 { 0.0 } else { e };
        let g = got[i * 3] as f64;
        assert!(
            (g - e).abs() <= 4.0 * f32::EPSILON as f64 * e,
            "exp({x} - {y}): {g} vs {e}"
        );
        if x.is_finite() {
            let s = x / (1.0 + (-x).exp());
            assert!(
                (got[i * 3 + 1] as f64 - s).abs() <= 1e-6 * (s.abs() + 1e-30),
                "silu({x})"
            );
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            let gl = x / (1.0 + (-2.0 * u).exp());
            // The argument z ~ x^3 carries f32 rounding amplified by |z| (~40 at x = -7).
            assert!(
                (got[i * 3 + 2] as f64 - gl).abs() <= 2e-5 * gl.abs() + 1e-30,
                "gelu({x})"
            );
        }
    }
}

#[cube(launch_unchecked)]
fn scan_kernel(ints: &Array<f32>, logs: &Array<f32>, out: &mut Array<f32>, #[comptime] units: u32) {
    let mut smem = SharedMemory::<f32>::new(units as usize);
    let u = UNIT_POS as usize;
    out[u] = cube_inclusive_scan(&mut smem, ints[u], units, ScanOp::Sum);
    out[units as usize + u] = cube_exclusive_sum(&mut smem, ints[u], units);
    out[2 * units as usize + u] = cube_inclusive_scan(&mut smem, logs[u], units, ScanOp::LogAddExp);
}

#[test]
fn scans_match_f64_prefix_sums_and_logcumsumexp() {
    let c = client();
    for units in [32u32, 64, 256] {
        let n = units as usize;
        // Small integers: every prefix sum is exact in f32, so equality is the test.
        let ints: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        // Log-space values with a leading run of -inf (an empty prefix stays -inf).
        let logs: Vec<f32> = (0..n)
            .map(|i| {
                if i < 3 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 37) % 11) as f32 - 20.0
                }
            })
            .collect();
        let (hi, hl) = (
            c.create_from_slice(f32::as_bytes(&ints)),
            c.create_from_slice(f32::as_bytes(&logs)),
        );
        let out = c.empty(3 * n * 4);
        unsafe {
            scan_kernel::launch_unchecked::<R>(
                &c,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(units),
                ArrayArg::from_raw_parts(hi, n),
                ArrayArg::from_raw_parts(hl, n),
                ArrayArg::from_raw_parts(out.clone(), 3 * n),
                units,
            )
        };
        let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
        let (mut acc, mut lse) = (0.0f64, f64::NEG_INFINITY);
        for i in 0..n {
            assert_eq!(got[n + i] as f64, acc, "exclusive sum {i}, units {units}");
            acc += ints[i] as f64;
            assert_eq!(got[i] as f64, acc, "inclusive sum {i}, units {units}");
            let v = logs[i] as f64;
            if v != f64::NEG_INFINITY {
                lse = if lse == f64::NEG_INFINITY {
                    v
                } else {
                    lse.max(v) + (1.0 + (lse.min(v) - lse.max(v)).exp()).ln()
                };
            }
            let g = got[2 * n + i] as f64;
            if lse == f64::NEG_INFINITY {
                assert_eq!(g, lse, "logcumsumexp {i}, units {units}");
            } else {
                assert!(
                    (g - lse).abs() <= 1e-5 * lse.abs().max(1.0),
                    "logcumsumexp {i}: {g} vs {lse}"
                );
            }
        }
    }
}

#[cube(launch_unchecked)]
fn tile_kernel(a: &Array<f32>, b: &Array<f32>, out: &mut Array<f32>, m: u32, k: u32, n: u32) {
    // One 8 x 8 output tile from an m x k by k x n product (m, n <= 8, k <= 4), 4 units
    // of 4 x 4 register tiles; the loads mask everything past m, k, n to zero.
    let mut xs = SharedMemory::<f32>::new(32usize);
    let mut ys = SharedMemory::<f32>::new(32usize);
    load_tile::<f32>(&mut xs, 0, a, 0, k, m, k, 8u32, 4u32, true, 4u32);
    load_tile::<f32>(&mut ys, 0, b, 0, n, k, n, 4u32, 8u32, false, 4u32);
    sync_cube();
    let ty = UNIT_POS / 2;
    let tx = UNIT_POS % 2;
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for e in 0..16u32 {
        acc[e as usize] = 0.0;
    }
    reg_tile_mma(
        &mut acc, &xs, 0, &ys, 0, ty, tx, 8u32, 8u32, 4u32, 4u32, 4u32,
    );
    #[unroll]
    for i in 0..4u32 {
        #[unroll]
        for j in 0..4u32 {
            // Strided ownership: rows ty + 2 i, columns tx + 2 j.
            out[((ty + 2 * i) * 8 + tx + 2 * j) as usize] = acc[(i * 4 + j) as usize];
        }
    }
}

#[test]
fn masked_tile_loads_and_register_tile_mma_match_f64() {
    let c = client();
    // Ragged: 5 x 3 by 3 x 7 inside 8 x 4 and 4 x 8 tiles.
    let (m, k, n) = (5usize, 3usize, 7usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
    let (ha, hb) = (
        c.create_from_slice(f32::as_bytes(&a)),
        c.create_from_slice(f32::as_bytes(&b)),
    );
    let out = c.empty(64 * 4);
    unsafe {
        tile_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(4),
            ArrayArg::from_raw_parts(ha, m * k),
            ArrayArg::from_raw_parts(hb, k * n),
            ArrayArg::from_raw_parts(out.clone(), 64),
            m as u32,
            k as u32,
            n as u32,
        )
    };
    let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
    for i in 0..8 {
        for j in 0..8 {
            let want: f64 = if i < m && j < n {
                (0..k)
                    .map(|d| a[i * k + d] as f64 * b[d * n + j] as f64)
                    .sum()
            } else {
                0.0 // masked rows and columns load as zeros
            };
            let g = got[i * 8 + j] as f64;
            assert!((g - want).abs() <= 1e-6, "({i}, {j}): {g} vs {want}");
        }
    }
}
