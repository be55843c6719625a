//! fla's own vectors, through the registry path of `kiln run` and the f64 reference.

use super::*;

/// fla's own vectors (naive_recurrent_gla + autograd, f32): the operator registry
/// path of `kiln run`, and our f64 reference, both agree with them.
#[test]
fn fla_vectors_agree_t130_d100() {
    fla_vectors_agree("gla_T130_D100_f32.safetensors");
}

/// As [`fla_vectors_agree_t130_d100`], T = 300, K = V = 64.
#[test]
fn fla_vectors_agree_t300_d64() {
    fla_vectors_agree("gla_T300_D64_f32.safetensors");
}

fn fla_vectors_agree(file: &str) {
    {
        let hosts = load_safetensors(data(file)).unwrap();
        let f = |n: &str| hosts[n].to_f64();
        let shape = hosts["q"].shape.clone();
        let dims = Dims {
            heads: shape[2],
            dk: shape[3],
            dv: hosts["v"].shape[3],
            bounds: vec![0, shape[1]],
        };
        let scale = 1.0 / (dims.dk as f64).sqrt();
        let (o, ht) = reference::forward(
            &f("q"),
            &f("k"),
            &f("v"),
            &f("g"),
            Some(&f("h0")),
            &dims,
            scale,
        );
        let gr = reference::backward(
            &f("q"),
            &f("k"),
            &f("v"),
            &f("g"),
            Some(&f("h0")),
            &f("do"),
            Some(&f("dht")),
            &dims,
            scale,
        );
        for (name, ours) in [
            ("o", &o),
            ("ht", &ht),
            ("dq", &gr.dq),
            ("dk", &gr.dk),
            ("dv", &gr.dv),
            ("dg", &gr.dg),
            ("dh0", &gr.dh0),
        ] {
            let e = rms_relative(ours, &f(&format!("expected_{name}")));
            assert!(e < 1e-5, "{file}: f64 reference {name} vs fla: {e:.2e}");
        }
        let params = |extra: &[(&str, &str)]| {
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (op, mode) in [
            ("gla", "auto"),
            ("gla", "chunk"),
            ("gla", "fused_chunk"),
            ("gla_recurrent", ""),
        ] {
            let spec = kiln::kernels::op(op).unwrap();
            let mut extra = vec![("output_final_state", "true")];
            if !mode.is_empty() {
                extra.push(("mode", mode));
            }
            let outs = spec.call_host(client(), &hosts, params(&extra)).unwrap();
            for name in ["o", "ht"] {
                let e = rms_relative(&outs[name].to_f64(), &f(&format!("expected_{name}")));
                assert!(e < 1e-5, "{file}: {op} {mode} {name} vs fla: {e:.2e}");
            }
        }
        let e = kiln::kernels::op("gla")
            .unwrap()
            .call_host(client(), &hosts, params(&[("mode", "fused")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode") && e.contains("fused_chunk"), "{e}");
        // The index's parameter set for `gla / gla_backward` drives both.
        let spec = kiln::kernels::op("gla_backward").unwrap();
        for extra in [&[][..], &[("output_final_state", "true")][..]] {
            let outs = spec.call_host(client(), &hosts, params(extra)).unwrap();
            for name in ["dq", "dk", "dv", "dg", "dh0"] {
                let e = rms_relative(&outs[name].to_f64(), &f(&format!("expected_{name}")));
                assert!(e < 1e-5, "{file}: gla_backward {name} vs fla: {e:.2e}");
            }
        }
        let e = spec
            .call_host(client(), &hosts, params(&[("output_final_state", "false")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_final_state") && e.contains("dht"), "{e}");
    }
}
