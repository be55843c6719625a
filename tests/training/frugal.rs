//! FRUGAL against the f64 reference written from the spec: many steps across several
//! redraws of the subset (densities 1/n, 0.25 and 1), the subset equal to the host
//! generator's, a list of tensors of ragged sizes in one optimizer (two launches),
//! resuming mid-subspace bitwise, and bad input.

use crate::common::{assert_clear, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::optim::{reference, Frugal, FrugalConfig, Hyper, Rule};
use kiln::{DType, HostTensor};

fn f32s(rng: &mut Rng, n: usize) -> Vec<f64> {
    HostTensor::from_f64(DType::F32, vec![n], &rng.normals(n, 1.0))
        .unwrap()
        .to_f64()
}

fn hyper() -> Hyper {
    Hyper {
        lr: 0.01,
        weight_decay: 0.1,
        ..Hyper::defaults(Rule::AdamW)
    }
}

#[test]
fn steps_across_redraws_match_the_f64_reference() {
    let n = 10_007;
    for density in [1.0 / n as f64, 0.25, 1.0] {
        let c = FrugalConfig {
            density,
            update_gap: 7,
            lr_free: 0.003,
            seed: 99,
        };
        let mut rng = Rng::new(8);
        let mut p = f32s(&mut rng, n);
        let t = up(DType::F32, &[n], &p);
        let mut opt = Frugal::new(&t, hyper(), c).unwrap();
        let (mut subset, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for step in 1..=30u64 {
            // Step 10 has a zero gradient (sign 0: the state-free part stays).
            let g = if step == 10 {
                vec![0.0; n]
            } else {
                f32s(&mut rng, n)
            };
            opt.step(&t, &up(DType::F32, &[n], &g)).unwrap();
            reference::frugal_step(&hyper(), &c, step, &mut p, &g, &mut subset, &mut m, &mut v);
            let (idx, dm, dv) = opt.state().unwrap();
            let idx: Vec<usize> = down(&idx).iter().map(|&i| i as usize).collect();
            assert_eq!(idx, subset, "density {density} step {step}: subset");
            if step % 7 == 0 || step == 30 {
                let floor = |w: &[f64]| w.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
                let e = max_rel_error(&down(&t), &p, floor(&p));
                assert!(e <= 1e-6, "density {density} step {step} param: {e:.2e}");
                let e = max_rel_error(&down(&dm), &m, floor(&m));
                assert!(e <= 1e-6, "density {density} step {step} m: {e:.2e}");
                let e = max_rel_error(&down(&dv), &v, floor(&v));
                assert!(e <= 1e-6, "density {density} step {step} v: {e:.2e}");
            }
        }
        assert_eq!(opt.steps(), 30);
    }
}

/// Eight tensors (1 to 10^6 + 3 elements, two of the same size; two launches of up to
/// six) in one optimizer: each follows the f64 reference with its own seed
/// (`seed_of(i)`) across three subspaces, the two same-size tensors draw different
/// subsets, and each equals a one-tensor optimizer given that seed, bitwise.
#[test]
fn a_list_of_tensors_matches_the_reference_per_tensor() {
    let sizes = [1usize, 1_000_003, 7, 3001, 33, 3001, 257, 64];
    let c = FrugalConfig {
        density: 0.25,
        update_gap: 3,
        lr_free: 0.003,
        seed: 5,
    };
    let mut rng = Rng::new(21);
    let mut p: Vec<Vec<f64>> = sizes.iter().map(|&n| f32s(&mut rng, n)).collect();
    let ts: Vec<_> = p.iter().map(|v| up(DType::F32, &[v.len()], v)).collect();
    let alone: Vec<_> = p.iter().map(|v| up(DType::F32, &[v.len()], v)).collect();
    let refs: Vec<&kiln::Tensor> = ts.iter().collect();
    let mut opt = Frugal::new_multi(&refs, hyper(), c).unwrap();
    let mut singles: Vec<Frugal> = alone
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let own = FrugalConfig {
                seed: c.seed_of(i),
                ..c
            };
            Frugal::new(t, hyper(), own).unwrap()
        })
        .collect();
    let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); sizes.len()];
    for step in 1..=7u64 {
        let g: Vec<Vec<f64>> = sizes.iter().map(|&n| f32s(&mut rng, n)).collect();
        let gt: Vec<_> = g.iter().map(|v| up(DType::F32, &[v.len()], v)).collect();
        let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
        opt.step_multi(&refs, &grefs).unwrap();
        for (i, single) in singles.iter_mut().enumerate() {
            single.step(&alone[i], &gt[i]).unwrap();
            let own = FrugalConfig {
                seed: c.seed_of(i),
                ..c
            };
            let (subset, m, v) = &mut refstate[i];
            reference::frugal_step(&hyper(), &own, step, &mut p[i], &g[i], subset, m, v);
        }
        if step % 3 != 1 && step != 7 {
            continue;
        }
        for (i, (subset, m, v)) in refstate.iter().enumerate() {
            let (idx, dm, dv) = opt.state_of(i).unwrap();
            let idx: Vec<usize> = down(&idx).iter().map(|&x| x as usize).collect();
            assert_eq!(&idx, subset, "tensor {i} step {step}: subset");
            let floor = |w: &[f64]| w.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
            for (what, got, want) in [
                ("param", down(&ts[i]), &p[i]),
                ("m", down(&dm), m),
                ("v", down(&dv), v),
            ] {
                let e = max_rel_error(&got, want, floor(want));
                assert!(e <= 1e-6, "tensor {i} step {step} {what}: {e:.2e}");
            }
            assert_eq!(
                down(&ts[i]),
                down(&alone[i]),
                "tensor {i} step {step}: one-tensor optimizer"
            );
        }
    }
    let (a, _, _) = opt.state_of(3).unwrap();
    let (b, _, _) = opt.state_of(5).unwrap();
    assert_ne!(
        down(&a),
        down(&b),
        "same-size tensors draw independent subsets"
    );
    assert_eq!(opt.steps(), 7);
    assert_clear(opt.state_of(8).err().unwrap(), &["tensor", "8"]);
}

#[test]
fn resuming_mid_subspace_continues_bitwise() {
    let n = 3001;
    let c = FrugalConfig {
        update_gap: 5,
        ..Default::default()
    };
    let mut rng = Rng::new(4);
    let p = f32s(&mut rng, n);
    let grads: Vec<Vec<f64>> = (0..8).map(|_| f32s(&mut rng, n)).collect();
    let (a, b) = (up(DType::F32, &[n], &p), up(DType::F32, &[n], &p));
    let mut whole = Frugal::new(&a, hyper(), c).unwrap();
    for g in &grads {
        whole.step(&a, &up(DType::F32, &[n], g)).unwrap();
    }
    // Six steps, then a new optimizer resumed at step 6 (mid-subspace 1) with the state.
    let mut first = Frugal::new(&b, hyper(), c).unwrap();
    for g in &grads[..6] {
        first.step(&b, &up(DType::F32, &[n], g)).unwrap();
    }
    let (_, m, v) = first.state().unwrap();
    let mut resumed = Frugal::resume(&b, hyper(), c, 6, Some((&m, &v))).unwrap();
    for g in &grads[6..] {
        resumed.step(&b, &up(DType::F32, &[n], g)).unwrap();
    }
    assert_eq!(down(&a), down(&b));
}

#[test]
fn bad_input_is_one_clear_line() {
    let t = up(DType::F32, &[8], &[0.5; 8]);
    let with = |f: fn(&mut FrugalConfig)| {
        let mut c = FrugalConfig::default();
        f(&mut c);
        Frugal::new(&t, hyper(), c).err().unwrap()
    };
    assert_clear(with(|c| c.density = 0.0), &["density", "0"]);
    assert_clear(with(|c| c.density = 1.5), &["density", "1.5"]);
    assert_clear(with(|c| c.update_gap = 0), &["update_gap"]);
    assert_clear(with(|c| c.lr_free = f64::NAN), &["lr_free"]);
    let mut opt = Frugal::new(&t, hyper(), FrugalConfig::default()).unwrap();
    let g = up(DType::F32, &[7], &[0.5; 7]);
    assert_clear(opt.step(&t, &g).unwrap_err(), &["grad", "[8]"]);
    let h = up(DType::F16, &[8], &[0.5; 8]);
    assert_clear(
        Frugal::new(&h, hyper(), FrugalConfig::default())
            .err()
            .unwrap(),
        &["param", "f16"],
    );
    let (m, v) = (
        up(DType::F32, &[3], &[0.0; 3]),
        up(DType::F32, &[2], &[0.0; 2]),
    );
    assert_clear(
        Frugal::resume(&t, hyper(), FrugalConfig::default(), 1, Some((&m, &v)))
            .err()
            .unwrap(),
        &["m", "[2]"],
    );
    assert_eq!(down(&t), vec![0.5; 8]);
    // Lists: empty, a grad of the wrong shape named by position, density changed.
    assert_clear(
        Frugal::new_multi(&[], hyper(), FrugalConfig::default())
            .err()
            .unwrap(),
        &["params", "at least one"],
    );
    let u = up(DType::F32, &[3], &[0.5; 3]);
    let mut opt = Frugal::new_multi(&[&t, &u], hyper(), FrugalConfig::default()).unwrap();
    let g8 = up(DType::F32, &[8], &[0.5; 8]);
    assert_clear(
        opt.step_multi(&[&t, &u], &[&g8, &g8]).unwrap_err(),
        &["grad[1]", "[3]"],
    );
    assert_clear(opt.step_multi(&[&t], &[&g8]).unwrap_err(), &["2 params"]);
    opt.config.density = 0.5;
    assert_clear(
        opt.step_multi(&[&t, &u], &[&g8, &u]).unwrap_err(),
        &["density"],
    );
    assert_eq!(down(&t), vec![0.5; 8]);
    assert_eq!(down(&u), vec![0.5; 3]);
}
