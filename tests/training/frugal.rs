//! FRUGAL against the f64 reference written from the spec: many steps across several
//! redraws of the subset (densities 1/n, 0.25 and 1), the subset equal to the host
//! generator's, a list of tensors of ragged sizes in one optimizer (two launches), row and
//! column subspaces of matrices (whole lines, checked by their structure too), f16
//! tensors with their f32 master copies, resuming mid-subspace bitwise, and bad input.

use crate::common::{assert_clear, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::optim::compress::{with_unit_layout, UnitLayout};
use kiln::kernels::optim::{
    frugal_matrix, reference, BlockOrder, Frugal, FrugalConfig, Hyper, Rule, Subspace,
};
use kiln::{DType, HostTensor};

fn f32s(rng: &mut Rng, n: usize) -> Vec<f64> {
    HostTensor::from_f64(DType::F32, vec![n], &rng.normals(n, 1.0))
        .unwrap()
        .to_f64()
}

pub(crate) fn hyper() -> Hyper {
    Hyper {
        lr: 0.01,
        weight_decay: 0.1,
        ..Hyper::defaults(Rule::AdamW)
    }
}

/// One tensor's reference state: its subset, `m` and `v`.
type RefState = (Vec<usize>, Vec<f64>, Vec<f64>);

/// Tensor `i` of `opt` against the reference: its subset equal to `state`'s, `param` (the
/// tensor or its master copy, as read) within 1e-6 of `want`, and its moments within 1e-6
/// of `state`'s. Returns the subset.
fn check_tensor(
    opt: &Frugal,
    i: usize,
    param: &[f64],
    want: &[f64],
    state: &RefState,
    at: &str,
) -> Vec<usize> {
    let (subset, m, v) = state;
    let (idx, dm, dv) = opt.state_of(i).unwrap();
    let idx: Vec<usize> = down(&idx).iter().map(|&x| x as usize).collect();
    assert_eq!(&idx, subset, "{at}: subset");
    let floor = |w: &[f64]| w.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
    for (what, got, want) in [
        ("param", param.to_vec(), want),
        ("m", down(&dm), m),
        ("v", down(&dv), v),
    ] {
        let e = max_rel_error(&got, want, floor(want));
        assert!(e <= 1e-6, "{at} {what}: {e:.2e}");
    }
    idx
}

#[test]
fn steps_across_redraws_match_the_f64_reference() {
    // Both layouts of the subset selection's passes (a device runs only its own).
    for layout in [UnitLayout::Contiguous, UnitLayout::Coalesced] {
        with_unit_layout(layout, steps_across_redraws);
    }
}

fn steps_across_redraws() {
    let n = 10_007;
    for density in [1.0 / n as f64, 0.25, 1.0] {
        let c = FrugalConfig {
            density,
            update_gap: 7,
            lr_free: 0.003,
            seed: 99,
            ..Default::default()
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
            reference::frugal_step(
                &hyper(),
                &c,
                step,
                &[n],
                &mut p,
                &g,
                &mut subset,
                &mut m,
                &mut v,
            );
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

#[test]
fn a_nan_gradient_is_nan_on_both_parts_and_densities_round_exactly() {
    // sign(NaN) is NaN on the state-free coordinates too (it was 0 there: the weight
    // only decayed), as in the reference and torch.sign.
    let n = 64;
    let c = FrugalConfig {
        density: 0.25,
        ..Default::default()
    };
    let t = up(DType::F32, &[n], &[0.5; 64]);
    let mut opt = Frugal::new(&t, hyper(), c).unwrap();
    opt.step(&t, &up(DType::F32, &[n], &[f64::NAN; 64]))
        .unwrap();
    assert!(down(&t).iter().all(|v| v.is_nan()), "{:?}", down(&t));
    // 0.07 x 100 is 7.000000000000001 in f64: 7 coordinates, not 8; 0.55 x 200 rows: 110.
    let c = FrugalConfig {
        density: 0.07,
        ..Default::default()
    };
    assert_eq!(c.active(&[100]), 7);
    let rows = FrugalConfig {
        density: 0.55,
        subspace: Subspace::Rows,
        ..Default::default()
    };
    assert_eq!(rows.lines(&[200, 64]), Some((200, 110)));
}

/// Eight tensors (1 to 10^6 + 3 elements, two of the same size; two launches of up to
/// six) in one optimizer: each follows the f64 reference with its own seed
/// (`seed_of(i)`) across three subspaces, the two same-size tensors draw different
/// subsets, and each equals a one-tensor optimizer given that seed, bitwise.
/// Density 0.25, a redraw every 3 steps, `lr_free` 0.003, seed 5: the lists' config.
pub(crate) fn list_config() -> FrugalConfig {
    FrugalConfig {
        density: 0.25,
        update_gap: 3,
        lr_free: 0.003,
        seed: 5,
        ..Default::default()
    }
}

#[test]
fn a_list_of_tensors_matches_the_reference_per_tensor() {
    let sizes = [1usize, 1_000_003, 7, 3001, 33, 3001, 257, 64];
    let c = list_config();
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
            reference::frugal_step(
                &hyper(),
                &own,
                step,
                &[sizes[i]],
                &mut p[i],
                &g[i],
                subset,
                m,
                v,
            );
        }
        if step % 3 != 1 && step != 7 {
            continue;
        }
        for (i, state) in refstate.iter().enumerate() {
            let at = format!("tensor {i} step {step}");
            check_tensor(&opt, i, &down(&ts[i]), &p[i], state, &at);
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

/// f32 and f16 tensors (bf16 too where the device has it) in one optimizer: one launch
/// per dtype, across a redraw. An f16 tensor's f32 master copy follows the f64 reference
/// within 1e-6 (a step far below half an f16 ulp is kept), the tensor is its rounding;
/// `set_master` replaces the copy.
#[test]
fn half_tensors_step_an_f32_master_copy() {
    let mut dtypes = vec![DType::F32, DType::F16, DType::F16];
    if crate::common::client().supports(DType::BF16) {
        dtypes.push(DType::BF16);
    } else {
        let h = HostTensor::from_f64(DType::BF16, vec![4], &[0.5; 4]).unwrap();
        assert_clear(
            kiln::Tensor::upload(crate::common::client(), &h).unwrap_err(),
            &["bf16"],
        );
    }
    let sizes = [301usize, 1003, 64, 257];
    let c = FrugalConfig {
        density: 0.25,
        update_gap: 3,
        lr_free: 1e-5,
        seed: 11,
        ..Default::default()
    };
    // lr 1e-5: each step moves a value by ~1e-5, far below half an f16 ulp at 1 (4.9e-4).
    let h = Hyper {
        lr: 1e-5,
        ..hyper()
    };
    let mut rng = Rng::new(31);
    let round = |d: DType, v: &[f64]| HostTensor::from_f64(d, vec![v.len()], v).unwrap().to_f64();
    let mut p: Vec<Vec<f64>> = dtypes
        .iter()
        .zip(sizes)
        .map(|(&d, n)| round(d, &rng.normals(n, 1.0)))
        .collect();
    let ts: Vec<_> = dtypes
        .iter()
        .zip(&p)
        .map(|(&d, v)| up(d, &[v.len()], v))
        .collect();
    let refs: Vec<&kiln::Tensor> = ts.iter().collect();
    let mut opt = Frugal::new_multi(&refs, h, c).unwrap();
    assert!(opt.master_of(0).unwrap().is_none());
    let initial = p.clone();
    let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); dtypes.len()];
    for step in 1..=5u64 {
        let g: Vec<Vec<f64>> = dtypes
            .iter()
            .zip(sizes)
            .map(|(&d, n)| round(d, &rng.normals(n, 1.0)))
            .collect();
        let gt: Vec<_> = dtypes
            .iter()
            .zip(&g)
            .map(|(&d, v)| up(d, &[v.len()], v))
            .collect();
        let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
        opt.step_multi(&refs, &grefs).unwrap();
        let shapes: Vec<Vec<usize>> = sizes.iter().map(|&n| vec![n]).collect();
        reference::frugal_step_list(&h, &c, step, &shapes, &mut p, &g, &mut refstate);
    }
    let floor = |w: &[f64]| w.iter().fold(1e-30f64, |a, b| a.max(b.abs()));
    for (i, &d) in dtypes.iter().enumerate() {
        let (_, m, v) = &refstate[i];
        let (_, dm, dv) = opt.state_of(i).unwrap();
        for (what, got, want) in [("m", down(&dm), m), ("v", down(&dv), v)] {
            let e = max_rel_error(&got, want, floor(want));
            assert!(e <= 1e-6, "tensor {i} ({d}) {what}: {e:.2e}");
        }
        let master = opt.master_of(i).unwrap();
        let exact = match master {
            Some(m) => down(&m),
            None => down(&ts[i]),
        };
        let e = max_rel_error(&exact, &p[i], floor(&p[i]));
        assert!(e <= 1e-6, "tensor {i} ({d}) master: {e:.2e}");
        assert_eq!(
            down(&ts[i]),
            round(d, &exact),
            "tensor {i} ({d}): the master's rounding"
        );
    }
    // The f16 tensor's master copy moved at (almost) every coordinate, though the steps were
    // below half an ulp of the f16 value (the tensor itself kept most of its values).
    let master = down(&opt.master_of(1).unwrap().unwrap());
    let moved = master
        .iter()
        .zip(&initial[1])
        .filter(|(a, b)| a != b)
        .count();
    // (Signs of ±lr steps may cancel exactly at a rare coordinate.)
    assert!(
        moved >= sizes[1] * 99 / 100,
        "f16 master: {moved} of {} moved",
        sizes[1]
    );
    // A given master copy is what the next step updates.
    let given = up(DType::F32, &[sizes[1]], &vec![2.0; sizes[1]]);
    opt.set_master(1, &given).unwrap();
    assert_eq!(
        down(&opt.master_of(1).unwrap().unwrap()),
        vec![2.0; sizes[1]]
    );
    assert_clear(
        opt.set_master(0, &given).unwrap_err(),
        &["master[0]", "f32"],
    );
    let short = up(DType::F32, &[3], &[1.0; 3]);
    assert_clear(
        opt.set_master(2, &short).unwrap_err(),
        &["master[2]", "64", "[3]"],
    );
    // A gradient in another dtype than its tensor's.
    let mut wrong: Vec<kiln::Tensor> = ts
        .iter()
        .map(|t| up(t.dtype(), t.shape(), &vec![0.0; t.numel()]))
        .collect();
    wrong[1] = up(DType::F32, &[sizes[1]], &vec![0.5; sizes[1]]);
    let wrong: Vec<&kiln::Tensor> = wrong.iter().collect();
    assert_clear(
        opt.step_multi(&refs, &wrong).unwrap_err(),
        &["grad[1]", "f16"],
    );
}

/// Row and column subspaces: a list of a ragged matrix, a rank-3 tensor (seen as
/// `[5, 21]`), a vector (one row) and a one-row matrix, across three subspaces, at
/// densities taking one line, a quarter and every line. Each subset is whole lines — the
/// same `taken` columns in every row, or every entry of `taken` rows — and equal to the
/// host's; parameters and moments follow the f64 reference within 1e-6.
#[test]
fn row_and_column_subspaces_match_the_reference() {
    let shapes: [&[usize]; 4] = [&[37, 53], &[5, 3, 7], &[41], &[1, 9]];
    for subspace in [Subspace::Columns, Subspace::Rows] {
        for density in [1e-9, 0.25, 1.0] {
            let c = FrugalConfig {
                density,
                update_gap: 3,
                lr_free: 0.003,
                seed: 17,
                subspace,
                ..Default::default()
            };
            let what = format!("{subspace} density {density}");
            let mut rng = Rng::new(41);
            let mut p: Vec<Vec<f64>> = shapes
                .iter()
                .map(|s| f32s(&mut rng, s.iter().product()))
                .collect();
            let ts: Vec<_> = shapes
                .iter()
                .zip(&p)
                .map(|(s, v)| up(DType::F32, s, v))
                .collect();
            let refs: Vec<&kiln::Tensor> = ts.iter().collect();
            let mut opt = Frugal::new_multi(&refs, hyper(), c).unwrap();
            let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); shapes.len()];
            let mut first_subsets = Vec::new();
            for step in 1..=7u64 {
                let g: Vec<Vec<f64>> = p.iter().map(|v| f32s(&mut rng, v.len())).collect();
                let gt: Vec<_> = shapes
                    .iter()
                    .zip(&g)
                    .map(|(s, v)| up(DType::F32, s, v))
                    .collect();
                let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
                opt.step_multi(&refs, &grefs).unwrap();
                let owned: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
                reference::frugal_step_list(&hyper(), &c, step, &owned, &mut p, &g, &mut refstate);
                for (i, state) in refstate.iter().enumerate() {
                    let at = format!("{what} tensor {i} step {step}");
                    let idx = check_tensor(&opt, i, &down(&ts[i]), &p[i], state, &at);
                    assert_whole_lines(&idx, shapes[i], subspace, c.lines(shapes[i]).unwrap().1);
                    if step == 1 {
                        first_subsets.push(idx);
                    }
                }
            }
            // A redraw picks other lines of the 37 x 53 matrix (when not all are taken).
            if density < 1.0 {
                let (now, _, _) = opt.state_of(0).unwrap();
                let now: Vec<usize> = down(&now).iter().map(|&x| x as usize).collect();
                assert_ne!(now, first_subsets[0], "{what}: subspace 2 against 0");
            }
        }
    }
    // The subspace fixes the state's size: changing it after creation is refused.
    let t = up(DType::F32, &[4, 8], &[0.5; 32]);
    let mut opt = Frugal::new(&t, hyper(), FrugalConfig::default()).unwrap();
    opt.config.subspace = Subspace::Rows;
    assert_clear(opt.step(&t, &t).unwrap_err(), &["subspace", "Rows"]);
}

/// `subset` is whole lines of `shape`'s matrix: `taken` columns present in every row, or
/// `taken` rows present in full (closed-form, independent of the reference's draw).
fn assert_whole_lines(subset: &[usize], shape: &[usize], subspace: Subspace, taken: usize) {
    let (rows, cols) = frugal_matrix(shape);
    let line = |i: &usize| match subspace {
        Subspace::Rows => i / cols,
        _ => i % cols,
    };
    let mut lines: Vec<usize> = subset.iter().map(line).collect();
    lines.sort_unstable();
    lines.dedup();
    let length = if subspace == Subspace::Rows {
        cols
    } else {
        rows
    };
    assert_eq!(lines.len(), taken, "{shape:?} {subspace}: lines taken");
    assert_eq!(
        subset.len(),
        taken * length,
        "{shape:?} {subspace}: whole lines"
    );
    assert!(subset.windows(2).all(|w| w[0] < w[1]), "increasing");
}

/// Blocks (FRUGAL's blockwise projection, BAdam-like): of six tensors (f32 and f16,
/// ragged), `ceil(0.4 · 6) = 3` hold Adam state on all their coordinates and the others
/// none, the three redrawn every two steps over four subspaces. Each subspace's active
/// set is the host's; every tensor, moment and f16 master copy (moved at each re-layout)
/// follows the f64 reference within 1e-6; the state holds only the active tensors'
/// moments (and the master copies).
#[test]
fn blocks_hold_state_on_whole_tensors_in_turn() {
    let specs: [(&[usize], DType); 6] = [
        (&[33, 7], DType::F32),
        (&[100], DType::F16),
        (&[5], DType::F32),
        (&[4099], DType::F16),
        (&[1], DType::F32),
        (&[64, 3], DType::F32),
    ];
    let c = FrugalConfig {
        density: 0.4,
        update_gap: 2,
        lr_free: 0.003,
        seed: 23,
        subspace: Subspace::Blocks,
        ..Default::default()
    };
    let shapes: Vec<Vec<usize>> = specs.iter().map(|(s, _)| s.to_vec()).collect();
    let round = |d: DType, v: &[f64]| HostTensor::from_f64(d, vec![v.len()], v).unwrap().to_f64();
    let mut rng = Rng::new(43);
    let mut p: Vec<Vec<f64>> = specs
        .iter()
        .map(|(s, d)| round(*d, &rng.normals(s.iter().product(), 1.0)))
        .collect();
    let ts: Vec<_> = specs
        .iter()
        .zip(&p)
        .map(|((s, d), v)| up(*d, s, v))
        .collect();
    let refs: Vec<&kiln::Tensor> = ts.iter().collect();
    let mut opt = Frugal::new_multi(&refs, hyper(), c).unwrap();
    let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); specs.len()];
    let mut sets = Vec::new();
    for step in 1..=8u64 {
        let g: Vec<Vec<f64>> = specs
            .iter()
            .zip(&p)
            .map(|((_, d), v)| round(*d, &rng.normals(v.len(), 1.0)))
            .collect();
        let gt: Vec<_> = specs
            .iter()
            .zip(&g)
            .map(|((s, d), v)| up(*d, s, v))
            .collect();
        let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
        opt.step_multi(&refs, &grefs).unwrap();
        reference::frugal_step_list(&hyper(), &c, step, &shapes, &mut p, &g, &mut refstate);
        let mut active = Vec::new();
        for (i, state) in refstate.iter().enumerate() {
            let exact = match opt.master_of(i).unwrap() {
                Some(master) => {
                    let master = down(&master);
                    assert_eq!(
                        down(&ts[i]),
                        round(specs[i].1, &master),
                        "tensor {i}: rounding"
                    );
                    master
                }
                None => down(&ts[i]),
            };
            let at = format!("tensor {i} step {step}");
            let idx = check_tensor(&opt, i, &exact, &p[i], state, &at);
            let n = p[i].len();
            assert!(
                idx.is_empty() || idx == (0..n).collect::<Vec<_>>(),
                "whole tensors"
            );
            if !idx.is_empty() {
                active.push(i);
            }
        }
        let j = ((step - 1) / 2) as u32;
        assert_eq!(
            active,
            c.active_tensors(specs.len(), j),
            "step {step}: active set"
        );
        assert_eq!(active.len(), 3, "ceil(0.4 * 6) tensors");
        // Moments for the active tensors only (each `m` and `v` padded to a multiple of
        // 4 floats), and the f16 tensors' master copies; blocks keep no subsets (a
        // placeholder of one 4-wide vector) nor masks (one word).
        let moments: usize = active
            .iter()
            .map(|&i| 2 * p[i].len().next_multiple_of(4))
            .sum();
        assert_eq!(
            opt.state_bytes(),
            4 * (moments + 100 + 4099 + 4 + 1),
            "step {step}: state bytes"
        );
        sets.push(active);
    }
    sets.dedup();
    assert!(
        sets.len() > 1,
        "the active blocks change between subspaces: {sets:?}"
    );

    // Resuming mid-subspace: the active tensors' moments given, none for the others.
    let mut rng = Rng::new(5);
    let sizes = [10usize, 20, 30];
    let init: Vec<Vec<f64>> = sizes.iter().map(|&n| f32s(&mut rng, n)).collect();
    let grads: Vec<Vec<Vec<f64>>> = (0..6)
        .map(|_| sizes.iter().map(|&n| f32s(&mut rng, n)).collect())
        .collect();
    let c = FrugalConfig {
        density: 0.5,
        update_gap: 3,
        ..c
    };
    let tensors = |v: &[Vec<f64>]| -> Vec<kiln::Tensor> {
        v.iter().map(|x| up(DType::F32, &[x.len()], x)).collect()
    };
    let (a, b) = (tensors(&init), tensors(&init));
    let (ar, br): (Vec<&kiln::Tensor>, Vec<&kiln::Tensor>) =
        (a.iter().collect(), b.iter().collect());
    let mut whole = Frugal::new_multi(&ar, hyper(), c).unwrap();
    let mut first = Frugal::new_multi(&br, hyper(), c).unwrap();
    for (s, g) in grads.iter().enumerate() {
        let gt = tensors(g);
        let gr: Vec<&kiln::Tensor> = gt.iter().collect();
        whole.step_multi(&ar, &gr).unwrap();
        if s < 4 {
            first.step_multi(&br, &gr).unwrap();
        }
    }
    let saved: Vec<_> = (0..3).map(|i| first.state_of(i).unwrap()).collect();
    let moments: Vec<Option<(&kiln::Tensor, &kiln::Tensor)>> = saved
        .iter()
        .map(|(idx, m, v)| (idx.numel() > 0).then_some((m, v)))
        .collect();
    let mut resumed = Frugal::resume_multi(&br, hyper(), c, 4, &moments).unwrap();
    for g in &grads[4..] {
        let gt = tensors(g);
        let gr: Vec<&kiln::Tensor> = gt.iter().collect();
        resumed.step_multi(&br, &gr).unwrap();
    }
    for i in 0..3 {
        assert_eq!(down(&a[i]), down(&b[i]), "tensor {i} resumed");
    }
    // Moments for a tensor that holds none in this subspace are refused by name.
    let inactive = (0..3).find(|i| moments[*i].is_none()).unwrap();
    let (_, m, v) = &saved[(inactive + 1) % 3];
    let mut wrong = moments.clone();
    wrong[inactive] = Some((m, v));
    let err = Frugal::resume_multi(&br, hyper(), c, 4, &wrong)
        .err()
        .unwrap();
    assert_clear(err, &[&format!("m[{inactive}]"), "none"]);
}

/// Block orders as the authors' code takes them (closed forms for six tensors, two active):
/// ascending `[0, 1], [2, 3], [4, 5], [0, 1]`, descending `[4, 5], [2, 3], [0, 1], [4, 5]`,
/// mirror `[0, 5], [1, 4], [2, 3], [0, 5]`; a list stepped in ascending order holds state
/// on those tensors and follows the f64 reference; mirror with an odd count is refused.
#[test]
fn block_orders_take_turns() {
    let c = FrugalConfig {
        density: 1.0 / 3.0,
        update_gap: 2,
        lr_free: 0.003,
        seed: 3,
        subspace: Subspace::Blocks,
        ..Default::default()
    };
    let expect: [(BlockOrder, [[usize; 2]; 4]); 3] = [
        (BlockOrder::Ascending, [[0, 1], [2, 3], [4, 5], [0, 1]]),
        (BlockOrder::Descending, [[4, 5], [2, 3], [0, 1], [4, 5]]),
        (BlockOrder::Mirror, [[0, 5], [1, 4], [2, 3], [0, 5]]),
    ];
    for (order, sets) in expect {
        let c = FrugalConfig {
            block_order: order,
            ..c
        };
        for (j, set) in sets.iter().enumerate() {
            assert_eq!(
                c.active_tensors(6, j as u32),
                set.to_vec(),
                "{order} subspace {j}"
            );
        }
    }
    let c = FrugalConfig {
        block_order: BlockOrder::Ascending,
        ..c
    };
    let shapes: Vec<Vec<usize>> = [5usize, 8, 3, 12, 1, 7].iter().map(|&n| vec![n]).collect();
    let mut rng = Rng::new(9);
    let mut p: Vec<Vec<f64>> = shapes.iter().map(|s| f32s(&mut rng, s[0])).collect();
    let ts: Vec<_> = p.iter().map(|v| up(DType::F32, &[v.len()], v)).collect();
    let refs: Vec<&kiln::Tensor> = ts.iter().collect();
    let mut opt = Frugal::new_multi(&refs, hyper(), c).unwrap();
    let mut refstate = vec![(Vec::new(), Vec::new(), Vec::new()); shapes.len()];
    for step in 1..=6u64 {
        let g: Vec<Vec<f64>> = p.iter().map(|v| f32s(&mut rng, v.len())).collect();
        let gt: Vec<_> = g.iter().map(|v| up(DType::F32, &[v.len()], v)).collect();
        let grefs: Vec<&kiln::Tensor> = gt.iter().collect();
        opt.step_multi(&refs, &grefs).unwrap();
        reference::frugal_step_list(&hyper(), &c, step, &shapes, &mut p, &g, &mut refstate);
        let mut active = Vec::new();
        for (i, state) in refstate.iter().enumerate() {
            let at = format!("tensor {i} step {step}");
            if !check_tensor(&opt, i, &down(&ts[i]), &p[i], state, &at).is_empty() {
                active.push(i);
            }
        }
        let turn = ((step - 1) / 2) as usize;
        assert_eq!(
            active,
            [2 * turn, 2 * turn + 1],
            "step {step}: ascending turn"
        );
    }
    let mirror = FrugalConfig {
        block_order: BlockOrder::Mirror,
        ..c
    };
    let err = Frugal::new_multi(&refs[..5], hyper(), mirror)
        .err()
        .unwrap();
    assert_clear(err, &["block_order", "5 tensors"]);
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
    assert_clear(with(|c| c.update_gap = 1 << 32), &["update_gap"]);
    assert_clear(with(|c| c.lr_free = f64::NAN), &["lr_free"]);
    assert_clear(with(|c| c.lr_free = 1e39), &["lr_free"]);
    let mut opt = Frugal::new(&t, hyper(), FrugalConfig::default()).unwrap();
    let g = up(DType::F32, &[7], &[0.5; 7]);
    assert_clear(opt.step(&t, &g).unwrap_err(), &["grad", "[8]"]);
    let h = up(DType::I32, &[8], &[5.0; 8]);
    assert_clear(
        Frugal::new(&h, hyper(), FrugalConfig::default())
            .err()
            .unwrap(),
        &["param", "i32"],
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
