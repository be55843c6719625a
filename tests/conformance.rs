//! Agreement with a peer: vectors computed by PyTorch (in f64, stored as f32) and by
//! fla's GLA reference, in tests/data. Each runs through the operator registry
//! exactly as `kiln run` does.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{client, data};
use kiln::check::max_rel_error;
use kiln::load_safetensors;

/// Runs `op` on the file's inputs through the registry, exactly as `kiln run` does,
/// and returns the max relative error of `out` against `expected_out`.
fn conformance(file: &str, op: &str, floor: f64) -> f64 {
    conformance_with(file, op, &[], "out", floor)
}

/// [`conformance`] with parameters and another output name.
fn conformance_with(
    file: &str,
    op: &str,
    params: &[(&str, &str)],
    output: &str,
    floor: f64,
) -> f64 {
    let hosts = load_safetensors(data(file)).unwrap();
    let spec = kiln::kernels::op(op).unwrap();
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let outs = spec.call_host(client(), &hosts, params).unwrap();
    let (got, want) = (&outs[output], &hosts[&format!("expected_{output}")]);
    assert_eq!(got.shape, want.shape);
    max_rel_error(&got.to_f64(), &want.to_f64(), floor)
}

#[test]
fn softmax_matches_pytorch_within_1e6() {
    // Row 5 is all -inf: PyTorch gives NaN, the file (and kiln) give zeros.
    let e = conformance("softmax_f32.safetensors", "softmax", 0.0);
    assert!(e < 1e-6, "max rel err {e:e}");
}

#[test]
fn logsumexp_matches_pytorch() {
    let e = conformance("logsumexp_f32.safetensors", "logsumexp", 0.0);
    assert!(e < 1e-6, "max rel err {e:e}");
}

#[test]
fn silu_matches_pytorch() {
    let e = conformance("silu_f32.safetensors", "silu", 1e-30);
    assert!(e < 1e-6, "max rel err {e:e}");
}

#[test]
fn gelu_tanh_matches_pytorch() {
    // PyTorch evaluates 0.5 x (1 + tanh(u)), which cancels to -0 for x < -7 where the
    // true value is about -1e-17; kiln's sigmoid form keeps it. Hence an absolute
    // floor of 1e-6 in the relative error.
    let e = conformance("gelu_tanh_f32.safetensors", "gelu", 1e-6);
    assert!(e < 4e-6, "max rel err {e:e}");
}

#[test]
fn add_broadcast_matches_pytorch() {
    let e = conformance("add_broadcast_f32.safetensors", "add", 1e-30);
    assert!(e < 2e-7, "max rel err {e:e}");
}

#[test]
fn matmul_bias_gelu_residual_matches_pytorch() {
    // Relative to max(|c|, 1): the K = 130 products, not their sum, set the error scale.
    let e = conformance_with(
        "matmul_bias_gelu_residual_f32.safetensors",
        "matmul",
        &[("activation", "gelu")],
        "c",
        1.0,
    );
    assert!(e < 1e-5, "max rel err {e:e}");
}

#[test]
fn matmul_f16_matches_pytorch() {
    // f16 inputs and output; expected in f32 from f64 math: one f16 rounding of c.
    let e = conformance_with("matmul_f16.safetensors", "matmul", &[], "c", 1.0);
    assert!(e < 1e-3, "max rel err {e:e}");
}

/// Runs `op` on the file's inputs with `params` and returns, per output named in
/// `outputs`, the max relative error against `expected_<name>` (denominators floored
/// at 1: the values are O(1)).
fn conformance_outputs(
    file: &str,
    op: &str,
    params: &[(&str, &str)],
    outputs: &[&str],
) -> Vec<(String, f64)> {
    outputs
        .iter()
        .map(|o| (o.to_string(), conformance_with(file, op, params, o, 1.0)))
        .collect()
}

#[test]
fn attention_gqa_causal_offset_matches_pytorch() {
    // PyTorch's scaled_dot_product_attention in f64: 8 query heads over 2 KV heads,
    // 64 queries at positions 32..95 of 96 keys.
    let p = [("causal", "true"), ("q_offset", "32")];
    for (name, e) in conformance_outputs(
        "attention_gqa_causal_offset_f32.safetensors",
        "attention",
        &p,
        &["out", "lse"],
    ) {
        assert!(e < 1e-5, "{name}: max rel err {e:e}");
    }
}

#[test]
fn attention_varlen_causal_matches_pytorch() {
    // Sequences of 0, 1, 49 and 73 tokens packed along the token axis.
    for (name, e) in conformance_outputs(
        "attention_varlen_causal_f32.safetensors",
        "attention",
        &[("causal", "true")],
        &["out", "lse"],
    ) {
        assert!(e < 1e-5, "{name}: max rel err {e:e}");
    }
}

#[test]
fn attention_merge_matches_pytorch() {
    // Keys 0..61 and 61..150 of one attention, merged: the whole attention.
    for (name, e) in conformance_outputs(
        "attention_merge_f32.safetensors",
        "attention_merge",
        &[],
        &["out", "lse"],
    ) {
        assert!(e < 1e-6, "{name}: max rel err {e:e}");
    }
}

#[test]
fn attention_backward_matches_pytorch_autograd() {
    // The forward's expected out and lse are the backward's out and lse inputs.
    let mut hosts = load_safetensors(data("attention_gqa_causal_offset_f32.safetensors")).unwrap();
    for name in ["out", "lse"] {
        let t = hosts[&format!("expected_{name}")].clone();
        hosts.insert(name.to_string(), t);
    }
    let spec = kiln::kernels::op("attention_backward").unwrap();
    let params = [("causal", "true"), ("q_offset", "32")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let outs = spec.call_host(client(), &hosts, params).unwrap();
    for name in ["dq", "dk", "dv"] {
        let (got, want) = (&outs[name], &hosts[&format!("expected_{name}")]);
        assert_eq!(got.shape, want.shape);
        let e = kiln::check::rms_relative(&got.to_f64(), &want.to_f64());
        assert!(e < 1e-5, "{name}: rel-RMS {e:e}");
    }
}

/// The file's `expected_<name>` beside kiln's `<name>` for every listed output of `op`.
fn moe_outputs(file: &str, op: &str, params: &[(&str, &str)], outputs: &[&str]) {
    let hosts = load_safetensors(data(file)).unwrap();
    let spec = kiln::kernels::op(op).unwrap();
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let outs = spec.call_host(client(), &hosts, params).unwrap();
    for name in outputs {
        let (got, want) = (&outs[*name], &hosts[&format!("expected_{name}")]);
        assert_eq!(got.shape, want.shape, "{file}: {name}");
        let (g, w) = (got.to_f64(), want.to_f64());
        if got.dtype.is_float() {
            // Relative to max(|y|, 1): the values are O(1), and a y that cancels to near
            // zero carries the rounding of its O(1) terms.
            let e = max_rel_error(&g, &w, 1.0);
            assert!(e < 1e-6, "{file}: {name}: max rel err {e:e}");
        } else {
            // Ids, locations and the capacity: identical, drops included.
            assert_eq!(g, w, "{file}: {name}");
        }
    }
}

#[test]
fn moe_gate_matches_pytorch_routing() {
    // Rows 10..19 are exact ties (the lower expert wins), expert 1 is hot in rows
    // 0..7; cf 0 is dropless. Ids, locations (-1 for drops) and capacity identical.
    for (file, k, cf) in [
        ("moe_gate_S257_E8_k2_cf1.25.safetensors", "2", "1.25"),
        ("moe_gate_S100_E16_k4_cf0.0.safetensors", "4", "0"),
        ("moe_gate_S64_E4_k1_cf0.5.safetensors", "1", "0.5"),
    ] {
        moe_outputs(
            file,
            "moe_gate",
            &[("top_k", k), ("capacity_factor", cf)],
            &["expert_ids", "locations", "capacity", "gates", "l_aux"],
        );
    }
}

#[test]
fn moe_layer_matches_pytorch_and_each_stage_alone() {
    let file = "moe_layer_silu_f32.safetensors";
    for path in ["capacity", "dropless"] {
        moe_outputs(
            file,
            "moe_layer",
            &[("top_k", "2"), ("capacity_factor", "1"), ("path", path)],
            &["y", "l_aux"],
        );
    }
    // The layer's routing is the file's.
    let hosts = load_safetensors(data(file)).unwrap();
    let params = [("top_k", "2")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let outs = kiln::kernels::op("moe_layer")
        .unwrap()
        .call_host(client(), &hosts, params)
        .unwrap();
    for name in ["expert_ids", "locations"] {
        assert_eq!(outs[name].to_f64(), hosts[name].to_f64(), "{name}");
    }
    // Dispatch alone from the file's routing; the expert FFN alone from its dispatched
    // slots; combine alone from its expert outputs.
    let mut hosts = load_safetensors(data(file)).unwrap();
    let run = |op: &str,
               hosts: &std::collections::BTreeMap<String, kiln::HostTensor>,
               params: &[(&str, &str)]| {
        let params = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        kiln::kernels::op(op)
            .unwrap()
            .call_host(client(), hosts, params)
            .unwrap()
    };
    let d = run(
        "moe_dispatch",
        &hosts,
        &[("num_experts", "4"), ("capacity", "60")],
    );
    assert_eq!(
        d["dispatched"].to_f64(),
        hosts["expected_dispatched"].to_f64()
    );
    // The gate's `capacity` output fed as a tensor sets C (62 here: two empty slots per
    // expert past the vector's 60).
    let mut with_c = hosts.clone();
    with_c.insert(
        "capacity".into(),
        kiln::HostTensor::from_f64(kiln::DType::I32, vec![], &[62.0]).unwrap(),
    );
    let d = run("moe_dispatch", &with_c, &[("num_experts", "4")]);
    assert_eq!(d["dispatched"].shape, vec![4, 62, 24]);
    let (got, want) = (
        d["dispatched"].to_f64(),
        hosts["expected_dispatched"].to_f64(),
    );
    for e in 0..4 {
        assert_eq!(
            got[e * 62 * 24..e * 62 * 24 + 60 * 24],
            want[e * 60 * 24..(e + 1) * 60 * 24]
        );
        assert!(got[e * 62 * 24 + 60 * 24..(e + 1) * 62 * 24]
            .iter()
            .all(|&v| v == 0.0));
    }
    hosts.insert("dispatched".into(), hosts["expected_dispatched"].clone());
    let f = run("moe_expert_ffn", &hosts, &[("activation", "silu")]);
    let e = max_rel_error(
        &f["expert_out"].to_f64(),
        &hosts["expected_expert_out"].to_f64(),
        1.0,
    );
    assert!(e < 1e-6, "expert_out: max rel err {e:e}");
    hosts.insert("expert_out".into(), hosts["expected_expert_out"].clone());
    let c = run("moe_combine", &hosts, &[]);
    let e = max_rel_error(&c["y"].to_f64(), &hosts["expected_y"].to_f64(), 1.0);
    assert!(e < 1e-6, "y: max rel err {e:e}");
}

/// One AdamW step at step 5 from a non-zero state (torch.optim.AdamW in f64) through
/// `op`: `param`, `m`, `v` within 1e-6, each relative with a floor of a tenth of the
/// tensor's largest value (an f32 sum of O(max) terms that cancels is O(eps max) off).
fn adamw_vector(op: &str) {
    let file = "adamw_step5_f32.safetensors";
    let hosts = load_safetensors(data(file)).unwrap();
    let floor = |n: &str| hosts[n].to_f64().iter().fold(0.0f64, |a, b| a.max(b.abs())) / 10.0;
    let params = [("lr", "0.003"), ("weight_decay", "0.05"), ("step", "5")];
    for out in ["param", "m", "v"] {
        let e = conformance_with(file, op, &params, out, floor(&format!("expected_{out}")));
        assert!(e <= 1e-6, "{op} {out}: {e:.2e}");
    }
}

#[test]
fn s2ft_adamw_step_matches_pytorch_adamw() {
    // The flat parameter is one row, the whole row the block.
    adamw_vector("s2ft_adamw_step");
}

#[test]
fn adamw_matches_pytorch_adamw() {
    adamw_vector("adamw");
}
