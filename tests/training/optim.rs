//! The fused optimizers against the f64 reference written from the spec: five steps
//! of every rule over one list holding a 1-element, a ragged and a 10^6 + 3-element
//! tensor (one launch), with weight decay, bias correction and a step of zero
//! gradients; an f16 parameter with its f32 master copy; the device step counter
//! resumed from a given step; and bad input.

use crate::common::{self, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::optim::{reference, Block, GivenState, Hyper, MultiTensorStep, Rule, Sums};
use kiln::{DType, HostTensor, Tensor};

const RULES: [Rule; 6] = Rule::ALL;

/// Zero state of `rule` for a tensor of `n` elements (scalars as one-element vectors).
pub(crate) fn zero_state(rule: Rule, n: usize) -> Vec<Vec<f64>> {
    (0..rule.state_names().len())
        .map(|j| vec![0.0; rule.state_len(j, n)])
        .collect()
}

pub(crate) fn hyper(rule: Rule) -> Hyper {
    Hyper {
        lr: 0.01,
        weight_decay: 0.1,
        ..Hyper::defaults(rule)
    }
}

fn f32s(rng: &mut Rng, n: usize) -> Vec<f64> {
    let v = rng.normals(n, 1.0);
    HostTensor::from_f64(DType::F32, vec![n], &v)
        .unwrap()
        .to_f64()
}

/// Relative to each value with a floor of the tensor's largest magnitude: a state that
/// cancels (Adan's `d`, a moment after a sign change) carries O(eps) error relative to
/// its terms, which are of the tensor's scale, not of its own value.
fn close(got: &[f64], want: &[f64]) -> f64 {
    let floor = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    max_rel_error(got, want, floor.max(1e-30))
}

#[test]
fn five_steps_of_every_rule_over_one_list_match_the_f64_reference() {
    // Ragged sizes (one element a unit), 4-aligned ones (4-wide vectors), and both
    // interleaved, more than six of each (launches group blocks by vector width: a full
    // group of each kind launches before the list ends).
    let interleaved: Vec<usize> = (0..14)
        .map(|i| if i % 2 == 0 { 2 * i + 1 } else { 4 * i })
        .collect();
    for (sizes, rule) in [
        vec![1usize, 4099, 1_000_003],
        vec![4, 4100, 65_536],
        interleaved,
    ]
    .into_iter()
    .flat_map(|s| RULES.into_iter().map(move |r| (s.clone(), r)))
    {
        five_steps_match_the_reference(&sizes, rule, hyper(rule), None);
    }
}

/// LAMB and AdaGrad-Norm with their norms' partial sums per cube (a GPU's default) and
/// per unit (a CPU adapter's): both within 1e-6 of the f64 reference, whatever device
/// runs the suite. AdaGrad-Norm also without weight decay (its default), where its norms
/// pass skips the weight.
#[test]
fn norm_rules_match_the_reference_with_either_partial_sums() {
    for sums in [Sums::PerCube, Sums::PerUnit] {
        for rule in [Rule::Lamb, Rule::AdaGradNorm] {
            five_steps_match_the_reference(&[1, 4099, 70_001, 12], rule, hyper(rule), Some(sums));
        }
        let no_decay = Hyper {
            lr: 0.01,
            ..Hyper::defaults(Rule::AdaGradNorm)
        };
        assert_eq!(no_decay.weight_decay, 0.0);
        five_steps_match_the_reference(
            &[1, 4099, 70_001, 12],
            Rule::AdaGradNorm,
            no_decay,
            Some(sums),
        );
    }
}

/// Five steps of `rule` with `h` over tensors of `sizes` (one list; zero gradients at step 3),
/// with `sums` where given, against the f64 reference: parameters and states within
/// 1e-6.
fn five_steps_match_the_reference(sizes: &[usize], rule: Rule, h: Hyper, sums: Option<Sums>) {
    let mut rng = Rng::new(7 + rule as u64);
    let mut params: Vec<Vec<f64>> = sizes.iter().map(|&n| f32s(&mut rng, n)).collect();
    let ts: Vec<Tensor> = params
        .iter()
        .map(|p| up(DType::F32, &[1, p.len()], p))
        .collect();
    let list: Vec<(&Tensor, Block)> = ts.iter().map(|t| (t, Block::whole(1))).collect();
    let mut opt = MultiTensorStep::new(rule, h, &list).unwrap();
    if let Some(sums) = sums {
        opt.set_sums(sums);
    }
    let mut state: Vec<Vec<Vec<f64>>> = sizes.iter().map(|&n| zero_state(rule, n)).collect();
    for t in 1..=5u64 {
        let grads: Vec<Vec<f64>> = sizes
            .iter()
            .map(|&n| {
                if t == 3 {
                    vec![0.0; n]
                } else {
                    f32s(&mut rng, n)
                }
            })
            .collect();
        let gt: Vec<Tensor> = grads
            .iter()
            .map(|g| up(DType::F32, &[1, g.len()], g))
            .collect();
        opt.step(
            &ts.iter().collect::<Vec<_>>(),
            &gt.iter().collect::<Vec<_>>(),
        )
        .unwrap();
        for i in 0..sizes.len() {
            reference::step(rule, &h, t, &mut params[i], &grads[i], &mut state[i]);
        }
    }
    assert_eq!(opt.steps(), 5);
    for (i, n) in sizes.iter().enumerate() {
        let err = close(&down(&ts[i]), &params[i]);
        assert!(err <= 1e-6, "{rule:?} {sums:?} n={n} param: {err:.2e}");
        let (got, master) = opt.state_of(i).unwrap();
        assert!(master.is_none());
        for (j, name) in rule.state_names().iter().enumerate() {
            let err = close(&down(&got[j]), &state[i][j]);
            assert!(err <= 1e-6, "{rule:?} {sums:?} n={n} {name}: {err:.2e}");
        }
    }
}

#[test]
fn half_parameters_step_an_f32_master_copy() {
    if common::refused(DType::F16) {
        return;
    }
    let mut rng = Rng::new(3);
    // 777: one element a unit; 776: 4-wide (AdaGrad-Norm's master copy behind its
    // scalar keeps it at one).
    for (n, rule) in [777, 776]
        .into_iter()
        .flat_map(|n| RULES.into_iter().map(move |r| (n, r)))
    {
        let h = hyper(rule);
        let p0 = HostTensor::from_f64(DType::F16, vec![n], &rng.normals(n, 1.0))
            .unwrap()
            .to_f64();
        let w = up(DType::F16, &[1, n], &p0);
        let mut opt = MultiTensorStep::new(rule, h, &[(&w, Block::whole(1))]).unwrap();
        let (mut p, mut st) = (p0.clone(), zero_state(rule, n));
        for t in 1..=3u64 {
            let g = HostTensor::from_f64(DType::F16, vec![n], &rng.normals(n, 1.0))
                .unwrap()
                .to_f64();
            opt.step(&[&w], &[&up(DType::F16, &[1, n], &g)]).unwrap();
            reference::step(rule, &h, t, &mut p, &g, &mut st);
        }
        let (_, master) = opt.state_of(0).unwrap();
        let err = close(
            &down(&master.expect("an f16 parameter has a master copy")),
            &p,
        );
        assert!(err <= 1e-6, "{rule:?} master: {err:.2e}");
        let rounded = HostTensor::from_f64(DType::F16, vec![n], &p)
            .unwrap()
            .to_f64();
        let err = max_rel_error(&down(&w), &rounded, 1e-3);
        assert!(err <= DType::F16.epsilon(), "{rule:?} f16 param: {err:.2e}");
    }
}

#[test]
fn the_device_step_counter_resumes_from_a_given_state() {
    // Two steps from scratch equal one step, then a new optimizer resumed at step 1
    // from the first's state.
    let mut rng = Rng::new(12);
    let n = 300;
    for rule in RULES {
        let h = hyper(rule);
        let p = f32s(&mut rng, n);
        let (g1, g2) = (f32s(&mut rng, n), f32s(&mut rng, n));
        let (a, b) = (up(DType::F32, &[1, n], &p), up(DType::F32, &[1, n], &p));
        let (g1t, g2t) = (up(DType::F32, &[1, n], &g1), up(DType::F32, &[1, n], &g2));
        let mut whole = MultiTensorStep::new(rule, h, &[(&a, Block::whole(1))]).unwrap();
        whole.step(&[&a], &[&g1t]).unwrap();
        whole.step(&[&a], &[&g2t]).unwrap();
        let mut first = MultiTensorStep::new(rule, h, &[(&b, Block::whole(1))]).unwrap();
        first.step(&[&b], &[&g1t]).unwrap();
        let (st, _) = first.state_of(0).unwrap();
        let given = GivenState {
            tensors: st.iter().collect(),
            master: None,
        };
        let mut resumed =
            MultiTensorStep::with_state(rule, h, &[(&b, Block::whole(1))], &[Some(given)], 1)
                .unwrap();
        resumed.step(&[&b], &[&g2t]).unwrap();
        assert_eq!(down(&a), down(&b), "{rule:?}: bitwise the same");
    }
}

#[test]
fn half_parameters_resume_from_a_given_master_copy() {
    // As above with f16 weights: the resumed optimizer takes the state and the f32
    // master copy (the weight's shape, for every rule: AdaGrad-Norm's state is one
    // scalar, its master is not).
    if common::refused(DType::F16) {
        return;
    }
    let mut rng = Rng::new(13);
    let n = 301;
    for rule in RULES {
        let h = hyper(rule);
        let half = |v: &[f64]| up(DType::F16, &[1, n], v);
        let p = f32s(&mut rng, n);
        let (a, b) = (half(&p), half(&p));
        let (g1, g2) = (half(&f32s(&mut rng, n)), half(&f32s(&mut rng, n)));
        let mut whole = MultiTensorStep::new(rule, h, &[(&a, Block::whole(1))]).unwrap();
        whole.step(&[&a], &[&g1]).unwrap();
        whole.step(&[&a], &[&g2]).unwrap();
        let mut first = MultiTensorStep::new(rule, h, &[(&b, Block::whole(1))]).unwrap();
        first.step(&[&b], &[&g1]).unwrap();
        let (st, master) = first.state_of(0).unwrap();
        let master = master.expect("an f16 parameter has a master copy");
        let given = GivenState {
            tensors: st.iter().collect(),
            master: Some(&master),
        };
        let mut resumed =
            MultiTensorStep::with_state(rule, h, &[(&b, Block::whole(1))], &[Some(given)], 1)
                .unwrap();
        resumed.step(&[&b], &[&g2]).unwrap();
        assert_eq!(down(&a), down(&b), "{rule:?}: bitwise the same");
        let masters = [&whole, &resumed].map(|o| down(&o.state_of(0).unwrap().1.unwrap()));
        assert_eq!(masters[0], masters[1], "{rule:?}: master copies");
    }
}

#[test]
fn a_master_copy_for_an_f32_parameter_is_refused_not_ignored() {
    let w = up(DType::F32, &[1, 4], &[0.5; 4]);
    let (m, v, master) = (
        up(DType::F32, &[1, 4], &[0.0; 4]),
        up(DType::F32, &[1, 4], &[0.0; 4]),
        up(DType::F32, &[1, 4], &[0.5; 4]),
    );
    let given = GivenState {
        tensors: vec![&m, &v],
        master: Some(&master),
    };
    let e = MultiTensorStep::with_state(
        Rule::AdamW,
        Hyper::defaults(Rule::AdamW),
        &[(&w, Block::whole(1))],
        &[Some(given)],
        0,
    )
    .err()
    .expect("a master copy of an f32 weight accepted");
    crate::common::assert_clear(e, &["master", "f32"]);
}

#[test]
fn bad_input_is_one_clear_line() {
    let w = up(DType::F32, &[1, 4], &[0.5; 4]);
    let check = crate::common::assert_clear;
    let bad = Hyper {
        beta3: 1.5,
        ..Hyper::defaults(Rule::Adan)
    };
    check(
        MultiTensorStep::new(Rule::Adan, bad, &[(&w, Block::whole(1))])
            .err()
            .unwrap(),
        &["beta3", "1.5"],
    );
    let bad = Hyper {
        eps: 0.0,
        ..Hyper::defaults(Rule::AdamW)
    };
    check(
        MultiTensorStep::new(Rule::AdamW, bad, &[(&w, Block::whole(1))])
            .err()
            .unwrap(),
        &["eps"],
    );
    let mut opt = MultiTensorStep::new(
        Rule::AdamW,
        Hyper::defaults(Rule::AdamW),
        &[(&w, Block::whole(1))],
    )
    .unwrap();
    let g = up(DType::F32, &[1, 3], &[0.5; 3]);
    check(opt.step(&[&w], &[&g]).unwrap_err(), &["`grad`", "[1, 4]"]);
    check(
        opt.step(&[&w, &w], &[&g]).unwrap_err(),
        &["1 params and grads"],
    );
    let given = GivenState {
        tensors: vec![&w],
        master: None,
    };
    check(
        MultiTensorStep::with_state(
            Rule::AdamW,
            Hyper::defaults(Rule::AdamW),
            &[(&w, Block::whole(1))],
            &[Some(given)],
            0,
        )
        .err()
        .unwrap(),
        &["state", "m, v"],
    );
    // Values valid in f64 that the kernels' f32 would turn into 0 or inf.
    for (param, bad) in [
        (
            "eps",
            Hyper {
                eps: 1e-50,
                ..Hyper::defaults(Rule::AdamW)
            },
        ),
        (
            "lr",
            Hyper {
                lr: 1e39,
                ..Hyper::defaults(Rule::AdamW)
            },
        ),
        (
            "weight_decay",
            Hyper {
                weight_decay: 1e39,
                ..Hyper::defaults(Rule::AdamW)
            },
        ),
    ] {
        check(
            MultiTensorStep::new(Rule::AdamW, bad, &[(&w, Block::whole(1))])
                .err()
                .unwrap(),
            &[param],
        );
    }
    // A state list that does not match the weights, and a step past the u32 counter.
    check(
        MultiTensorStep::with_state(
            Rule::AdamW,
            Hyper::defaults(Rule::AdamW),
            &[(&w, Block::whole(1))],
            &[],
            0,
        )
        .err()
        .unwrap(),
        &["state", "one entry"],
    );
    check(
        MultiTensorStep::with_state(
            Rule::AdamW,
            Hyper::defaults(Rule::AdamW),
            &[(&w, Block::whole(1))],
            &[None],
            1 << 32,
        )
        .err()
        .unwrap(),
        &["step"],
    );
}

#[test]
fn lamb_trust_ratio_is_one_where_a_norm_is_zero_and_norms_are_per_tensor() {
    // Tensor 0: p = 0 (||p|| = 0: trust 1, the step is lr r). Tensor 1: p = 0 and g = 0
    // (r = 0: no NaN, p stays 0). Tensor 2: p of scale 100 beside tensor 3 of scale
    // 0.01 in the same launch: each gets its own ratio.
    let h = hyper(Rule::Lamb);
    let mut rng = Rng::new(21);
    let n = 1000;
    let mut params = [
        vec![0.0; n],
        vec![0.0; n],
        rng.normals(n, 100.0),
        rng.normals(n, 0.01),
    ];
    let grads = [
        f32s(&mut rng, n),
        vec![0.0; n],
        f32s(&mut rng, n),
        f32s(&mut rng, n),
    ];
    for p in params.iter_mut() {
        *p = HostTensor::from_f64(DType::F32, vec![n], p)
            .unwrap()
            .to_f64();
    }
    let ts: Vec<Tensor> = params.iter().map(|p| up(DType::F32, &[1, n], p)).collect();
    let gs: Vec<Tensor> = grads.iter().map(|g| up(DType::F32, &[1, n], g)).collect();
    let list: Vec<(&Tensor, Block)> = ts.iter().map(|t| (t, Block::whole(1))).collect();
    let mut opt = MultiTensorStep::new(Rule::Lamb, h, &list).unwrap();
    opt.step(
        &ts.iter().collect::<Vec<_>>(),
        &gs.iter().collect::<Vec<_>>(),
    )
    .unwrap();
    for i in 0..4 {
        let mut st = zero_state(Rule::Lamb, n);
        reference::step(Rule::Lamb, &h, 1, &mut params[i], &grads[i], &mut st);
        let got = down(&ts[i]);
        assert!(got.iter().all(|v| v.is_finite()), "tensor {i}: not finite");
        let err = close(&got, &params[i]);
        assert!(err <= 1e-6, "tensor {i}: {err:.2e}");
    }
    assert!(down(&ts[1]).iter().all(|&v| v == 0.0));
}

/// Contiguous blocks whose lengths are not multiples of 4 run as a 4-wide body and a
/// tail (the body bound as a prefix of the weight, whose own length need not be a
/// multiple of 4); one whose offset is not 4-aligned runs one element a unit. Five
/// steps of AdamW and Adan (four states) against the f64 reference on each block, the
/// rest of each weight untouched.
#[test]
fn ragged_contiguous_blocks_match_the_reference() {
    // [3, 5] whole: 12 + 3 across rows; [3, 6] rows 0..2: 12 of a weight of 18 (no tail);
    // [7, 3] rows 1..6: offset 3, one a unit; [5, 7] rows 4..5: offset 28, 4 + 3; a
    // [1, 10^5 + 1] vector.
    let blocks = [
        ([3usize, 5usize], Block::whole(3)),
        ([3, 6], Block::Rows { start: 0, end: 2 }),
        ([7, 3], Block::Rows { start: 1, end: 6 }),
        ([5, 7], Block::Rows { start: 4, end: 5 }),
        ([1, 100_001], Block::whole(1)),
    ];
    for rule in [Rule::AdamW, Rule::Adan] {
        let h = hyper(rule);
        let mut rng = Rng::new(40 + rule as u64);
        let full: Vec<Vec<f64>> = blocks
            .iter()
            .map(|([r, c], _)| f32s(&mut rng, r * c))
            .collect();
        let ws: Vec<Tensor> = blocks
            .iter()
            .zip(&full)
            .map(|(([r, c], _), v)| up(DType::F32, &[*r, *c], v))
            .collect();
        let list: Vec<(&Tensor, Block)> =
            ws.iter().zip(&blocks).map(|(w, (_, b))| (w, *b)).collect();
        let mut opt = MultiTensorStep::new(rule, h, &list).unwrap();
        // The block of each weight: its offset and length (all rows blocks: contiguous).
        let span = |i: usize| {
            let ([_, c], b) = blocks[i];
            let (s, e) = b.range();
            (s * c, (e - s) * c)
        };
        let mut params: Vec<Vec<f64>> = (0..blocks.len())
            .map(|i| {
                let (at, n) = span(i);
                full[i][at..at + n].to_vec()
            })
            .collect();
        let mut state: Vec<Vec<Vec<f64>>> =
            params.iter().map(|p| zero_state(rule, p.len())).collect();
        for t in 1..=5u64 {
            let grads: Vec<Vec<f64>> = params.iter().map(|p| f32s(&mut rng, p.len())).collect();
            let gt: Vec<Tensor> = (0..blocks.len())
                .map(|i| {
                    let ([_, c], b) = blocks[i];
                    let (s, e) = b.range();
                    up(DType::F32, &[e - s, c], &grads[i])
                })
                .collect();
            opt.step(
                &ws.iter().collect::<Vec<_>>(),
                &gt.iter().collect::<Vec<_>>(),
            )
            .unwrap();
            for i in 0..blocks.len() {
                reference::step(rule, &h, t, &mut params[i], &grads[i], &mut state[i]);
            }
        }
        for i in 0..blocks.len() {
            let (at, n) = span(i);
            let got = down(&ws[i]);
            let err = close(&got[at..at + n], &params[i]);
            assert!(err <= 1e-6, "{rule:?} block {i}: {err:.2e}");
            assert_eq!(&got[..at], &full[i][..at], "{rule:?} block {i}: before it");
            assert_eq!(
                &got[at + n..],
                &full[i][at + n..],
                "{rule:?} block {i}: after it"
            );
            let (st, _) = opt.state_of(i).unwrap();
            for (j, name) in rule.state_names().iter().enumerate() {
                let err = close(&down(&st[j]), &state[i][j]);
                assert!(err <= 1e-6, "{rule:?} block {i} {name}: {err:.2e}");
            }
        }
    }
}

/// `kiln run`'s entry points: a bad tensor is named as the user named it (not the copy
/// each makes), and a shape or value that would overflow is one clear line.
#[test]
fn registry_errors_name_the_users_tensor_or_parameter() {
    use std::collections::BTreeMap;
    let client = common::client();
    let call = |op: &str, tensors: &[(&str, Tensor)], params: &[(&str, &str)]| {
        kiln::kernels::op(op)
            .unwrap()
            .call(
                client,
                tensors
                    .iter()
                    .map(|(n, t)| (n.to_string(), t.clone()))
                    .collect::<BTreeMap<_, _>>(),
                params
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
            .err()
            .unwrap()
    };
    let ints = up(DType::I32, &[4], &[1.0; 4]);
    let g = up(DType::F32, &[4], &[0.5; 4]);
    for op in ["adamw", "frugal"] {
        common::assert_clear(
            call(op, &[("param", ints.clone()), ("grad", g.clone())], &[]),
            &["param", "i32"],
        );
    }
    common::assert_clear(
        call("perturb", &[("param", ints.clone())], &[]),
        &["param", "i32"],
    );
    common::assert_clear(
        call(
            "adamw",
            &[("param", g.clone()), ("grad", g.clone())],
            &[("step", "4294967296")],
        ),
        &["step"],
    );
    // s2ft_permute with a rank-0 w_k (its rows fix head_dim).
    let perm = up(DType::I32, &[2], &[1.0, 0.0]);
    let scalar = up(DType::F32, &[], &[1.0]);
    common::assert_clear(
        call("s2ft_permute", &[("perm", perm), ("w_k", scalar)], &[]),
        &["w_k", "matrix"],
    );
    // moe_gate: a capacity factor whose capacity passes i32.
    let logits = up(DType::F32, &[4, 2], &[0.0; 8]);
    common::assert_clear(
        call(
            "moe_gate",
            &[("logits", logits)],
            &[("capacity_factor", "1e300")],
        ),
        &["capacity_factor"],
    );
}
