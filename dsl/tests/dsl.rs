//! Each DSL piece alone, on the default wgpu adapter (lavapipe in CI), against closed
//! forms or f64.
//!
//! Longer than most files on purpose: each DSL piece tested alone, with one small
//! launch helper shared by all.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;
use kiln_dsl::{
    cube_exclusive_sum, cube_inclusive_scan, cube_max, cube_sum, exp_diff, gelu_tanh, linear_cube,
    linear_unit, load_tile, load_tile_v4, reg_tile_mma, reg_tile_mma_v4, reg_tile_mma_v4_outer,
    sign_keep_nan, silu, v4_tile_col, ScanOp, V4,
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

/// [`scan_kernel`] on one cube of `ints.len()` units: the inclusive sums, the exclusive
/// sums and the log-cumsum-exp of `logs`, one after the other.
fn run_scans(c: &ComputeClient<R>, ints: &[f32], logs: &[f32]) -> Vec<f32> {
    let n = ints.len();
    let (hi, hl) = (
        c.create_from_slice(f32::as_bytes(ints)),
        c.create_from_slice(f32::as_bytes(logs)),
    );
    let out = c.empty(3 * n * 4);
    unsafe {
        scan_kernel::launch_unchecked::<R>(
            c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(n as u32),
            ArrayArg::from_raw_parts(hi, n),
            ArrayArg::from_raw_parts(hl, n),
            ArrayArg::from_raw_parts(out.clone(), 3 * n),
            n as u32,
        )
    };
    f32::from_bytes(&c.read_one_unchecked(out)).to_vec()
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
        let got = run_scans(&c, &ints, &logs);
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

#[test]
fn logcumsumexp_keeps_nan() {
    // A NaN in log space poisons every prefix that holds it (CUDA's fmax/fmin would
    // return the other operand and drop it).
    let c = client();
    let n = 32usize;
    let ints = vec![0.0f32; n];
    let mut logs: Vec<f32> = (0..n).map(|i| i as f32 * 0.1 - 2.0).collect();
    logs[5] = f32::NAN;
    let got = run_scans(&c, &ints, &logs);
    let lse = &got[2 * n..];
    assert!(lse[..5].iter().all(|v| v.is_finite()), "{lse:?}");
    assert!(lse[5..].iter().all(|v| v.is_nan()), "{lse:?}");
}

#[cube(launch_unchecked)]
fn sign_kernel(x: &Array<f32>, out: &mut Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        out[i] = sign_keep_nan(x[i]);
    }
}

#[test]
fn sign_keeps_nan_and_zero() {
    let c = client();
    let x = [
        -2.5f32,
        -0.0,
        0.0,
        3.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
    ];
    let n = x.len();
    let hx = c.create_from_slice(f32::as_bytes(&x));
    let out = c.empty(n * 4);
    unsafe {
        sign_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(n as u32),
            ArrayArg::from_raw_parts(hx, n),
            ArrayArg::from_raw_parts(out.clone(), n),
        )
    };
    let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
    // Closed form; a subnormal may flush to zero on a device.
    let want = [-1.0f32, 0.0, 0.0, 1.0, f32::NAN, 1.0, -1.0];
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w || (g.is_nan() && w.is_nan()), "sign({}) = {g}", x[i]);
    }
    assert!(got[7] == 1.0 || got[7] == 0.0, "sign(1e-40) = {}", got[7]);
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

#[cube(launch_unchecked)]
fn tile_v4_kernel(a: &Array<f32>, b: &Array<f32>, out: &mut Array<f32>, m: u32, k: u32, n: u32) {
    // One 8 x 8 output tile of an m x k by k x n product (m, n <= 8, k <= 8) three times:
    // with the depth along X's vectors (reg_tile_mma_v4, its products depth by depth and
    // accumulator by accumulator) and with X depth-major (reg_tile_mma_v4_outer); 4 units
    // of 4 x 4 tiles. Loads mask past m, k, n to zero.
    let mut xs = SharedMemory::<V4>::new(16usize);
    let mut xo = SharedMemory::<V4>::new(16usize);
    let mut ys = SharedMemory::<V4>::new(16usize);
    // xs (r, d) = a[r k + d]; xo (d, r) = a[r k + d]; ys (d, c) = b[d n + c].
    load_tile_v4::<f32>(&mut xs, 0, a, 0, k, 1, m, k, 8u32, 8u32, 4u32);
    load_tile_v4::<f32>(&mut xo, 0, a, 0, 1, k, k, m, 8u32, 8u32, 4u32);
    load_tile_v4::<f32>(&mut ys, 0, b, 0, n, 1, k, n, 8u32, 8u32, 4u32);
    sync_cube();
    let ty = UNIT_POS / 2;
    let tx = UNIT_POS % 2;
    let mut acc = Array::<V4>::new(4usize);
    let mut acc_o = Array::<V4>::new(4usize);
    let mut acc_p = Array::<V4>::new(4usize);
    #[unroll]
    for e in 0..4u32 {
        acc[e as usize] = V4::new(0.0f32);
        acc_o[e as usize] = V4::new(0.0f32);
        acc_p[e as usize] = V4::new(0.0f32);
    }
    reg_tile_mma_v4(
        &mut acc, &xs, 0, &ys, 0, ty, tx, 8u32, 8u32, 8u32, 4u32, 4u32, false,
    );
    reg_tile_mma_v4(
        &mut acc_p, &xs, 0, &ys, 0, ty, tx, 8u32, 8u32, 8u32, 4u32, 4u32, true,
    );
    reg_tile_mma_v4_outer(
        &mut acc_o, &xo, 0, &ys, 0, ty, tx, 8u32, 8u32, 8u32, 4u32, 4u32,
    );
    #[unroll]
    for i in 0..4u32 {
        #[unroll]
        for j in 0..4u32 {
            let col = v4_tile_col(tx, j, 8u32, 4u32);
            // reg_tile_mma_v4: rows ty + 2 i; the outer form: row vectors ty + 2 (i / 4).
            out[((ty + 2 * i) * 8 + col) as usize] = acc[i as usize][j as usize];
            out[(128 + (ty + 2 * i) * 8 + col) as usize] = acc_p[i as usize][j as usize];
            let row = v4_tile_col(ty, i, 8u32, 4u32);
            out[(64 + row * 8 + col) as usize] = acc_o[i as usize][j as usize];
        }
    }
}

#[test]
fn vector_tiles_match_f64_both_layouts() {
    let c = client();
    // Ragged: 5 x 7 by 7 x 6 inside 8 x 8 tiles.
    let (m, k, n) = (5usize, 7usize, 6usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
    let (ha, hb) = (
        c.create_from_slice(f32::as_bytes(&a)),
        c.create_from_slice(f32::as_bytes(&b)),
    );
    let out = c.empty(192 * 4);
    unsafe {
        tile_v4_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(4),
            ArrayArg::from_raw_parts(ha, m * k),
            ArrayArg::from_raw_parts(hb, k * n),
            ArrayArg::from_raw_parts(out.clone(), 192),
            m as u32,
            k as u32,
            n as u32,
        )
    };
    let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
    let forms = [
        ("reg_tile_mma_v4", 0),
        ("reg_tile_mma_v4_outer", 64),
        ("reg_tile_mma_v4 per accumulator", 128),
    ];
    for (form, base) in forms {
        for i in 0..8 {
            for j in 0..8 {
                let want: f64 = if i < m && j < n {
                    (0..k)
                        .map(|d| a[i * k + d] as f64 * b[d * n + j] as f64)
                        .sum()
                } else {
                    0.0 // masked rows and columns load as zeros
                };
                let g = got[base + i * 8 + j] as f64;
                assert!((g - want).abs() <= 1e-6, "{form} ({i}, {j}): {g} vs {want}");
            }
        }
    }
}

#[cube(launch_unchecked)]
fn quant_kernel(
    bytes: &Array<u32>,
    halves: &Array<f32>,
    out_i: &mut Array<i32>,
    out_f: &mut Array<f32>,
    out_w: &mut Array<u32>,
) {
    let i = ABSOLUTE_POS as u32;
    if i < 256 {
        let q = kiln_dsl::load_i8(bytes, i);
        out_i[i as usize] = q;
        // Shifts 0, 2, 4, 6: the 8-, 6-, 4- and 2-bit views of Double Rounding.
        #[unroll]
        for s in 0..4u32 {
            out_i[(256 + s * 256 + i) as usize] = kiln_dsl::shift_round_half_even(q, s * 2);
        }
        out_i[(1280 + i) as usize] = i32::cast_from(kiln_dsl::unpack_u4(0x76543210u32 ^ i, i % 8));
        out_w[i as usize] = kiln_dsl::i8_bits(q);
    }
    if i < halves.len() as u32 {
        out_f[i as usize] = kiln_dsl::round_half_even(halves[i as usize]);
    }
}

#[test]
fn int_unpacking_and_rounding_match_closed_forms() {
    let c = client();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let halves: Vec<f32> = vec![
        -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -127.5, 0.49999997, -0.2, 3.7, -3.7, 0.0, 7.5,
    ];
    let hb = c.create_from_slice(&bytes);
    let hh = c.create_from_slice(f32::as_bytes(&halves));
    let (oi, of, ow) = (
        c.empty(1536 * 4),
        c.empty(halves.len() * 4),
        c.empty(256 * 4),
    );
    unsafe {
        quant_kernel::launch_unchecked::<R>(
            &c,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(hb, 64),
            ArrayArg::from_raw_parts(hh, halves.len()),
            ArrayArg::from_raw_parts(oi.clone(), 1536),
            ArrayArg::from_raw_parts(of.clone(), halves.len()),
            ArrayArg::from_raw_parts(ow.clone(), 256),
        )
    };
    let gi = i32::from_bytes(&c.read_one_unchecked(oi)).to_vec();
    let gf = f32::from_bytes(&c.read_one_unchecked(of)).to_vec();
    let gw = u32::from_bytes(&c.read_one_unchecked(ow)).to_vec();
    // Ties to even in f64, independently of the kernel's integer trick.
    let even = |x: f64| {
        let r = x.round();
        if (r - x).abs() == 0.5 && r % 2.0 != 0.0 {
            r - x.signum()
        } else {
            r
        }
    };
    for i in 0..256usize {
        let q = bytes[i] as i8 as i32;
        assert_eq!(gi[i], q, "load_i8 byte {i}");
        assert_eq!(gw[i], bytes[i] as u32, "i8_bits byte {i}");
        for s in 0..4 {
            let want = even(q as f64 / f64::from(1 << (2 * s))) as i32;
            assert_eq!(gi[256 + s * 256 + i], want, "shift_round({q}, {})", 2 * s);
        }
        let word = 0x76543210u32 ^ i as u32;
        assert_eq!(
            gi[1280 + i] as u32,
            (word >> (4 * (i % 8))) & 15,
            "unpack_u4 {i}"
        );
    }
    for (x, g) in halves.iter().zip(&gf) {
        assert_eq!(*g as f64, even(*x as f64), "round_half_even({x})");
    }
}

#[cube(launch_unchecked)]
fn online_softmax_kernel(x: &Array<f32>, out: &mut Array<f32>, len: u32, #[comptime] units: u32) {
    let mut smem = SharedMemory::<f32>::new(units as usize);
    let one = f32::cast_from(min(len, 1u32));
    let mut state = kiln_dsl::OnlineSoftmax::new();
    let mut j = UNIT_POS;
    while j < len {
        state.push(x[j as usize], one);
        j += units;
    }
    let all = kiln_dsl::cube_online_softmax(&mut smem, state, one, units);
    if UNIT_POS == 0 {
        out[0] = all.max;
        out[1] = all.sum;
        out[2] = all.log_sum_exp();
    }
}

#[test]
fn online_softmax_matches_f64_log_sum_exp() {
    let c = client();
    let mut rng = 0x1234u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 40.0
    };
    let mut mixed: Vec<f32> = (0..300).map(|_| next() as f32).collect();
    mixed[7] = f32::NEG_INFINITY;
    mixed[100] = 1e3; // one dominant value
    let cases: Vec<Vec<f32>> = vec![mixed, vec![f32::NEG_INFINITY; 50], vec![2.5]];
    for x in cases {
        let out = c.empty(3 * 4);
        unsafe {
            online_softmax_kernel::launch_unchecked::<R>(
                &c,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(64),
                ArrayArg::from_raw_parts(c.create_from_slice(f32::as_bytes(&x)), x.len()),
                ArrayArg::from_raw_parts(out.clone(), 3),
                x.len() as u32,
                64,
            )
        };
        let got = f32::from_bytes(&c.read_one_unchecked(out)).to_vec();
        let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        if m == f64::NEG_INFINITY {
            assert_eq!(got[1], 0.0, "all -inf: empty sum");
            assert_eq!(got[2], f32::NEG_INFINITY, "all -inf: lse");
            continue;
        }
        let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        assert_eq!(got[0] as f64, m);
        assert!(
            (got[1] as f64 - s).abs() <= 1e-6 * s,
            "sum {} vs {s}",
            got[1]
        );
        let lse = m + s.ln();
        assert!(
            (got[2] as f64 - lse).abs() <= 1e-6 * lse.abs().max(1.0),
            "lse {} vs {lse}",
            got[2]
        );
    }
}
