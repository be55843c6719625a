//! S²FT against full fine-tuning of one LLaMA-style block, with kiln's kernels only:
//! the same weights, data and AdamW settings; prints the loss, the bytes each keeps
//! (activations for the backward, gradients, optimizer state) and the time per step.
//!
//! ```text
//! cargo run --release --example s2ft_finetune                       # d 256, 8 heads, GQA 2, FFN 688
//! cargo run --release --example s2ft_finetune -- --d 1024 --ffn 2752 --kv-heads 8 --tokens 256
//! ```
//! Flags: `--d`, `--ffn`, `--heads`, `--kv-heads`, `--tokens`, `--steps`, `--lr`,
//! `--attn-units` (KV groups trained in V and O, default 1), `--ffn-units` (FFN
//! channels trained, default 1% of `--ffn`), `--dtype` (f32 | f16). The device is
//! `$KILN_DEVICE` or the default one.

use kiln::kernels::s2ft::{
    s2ft_select, AdamWConfig, HeadLayout, LlamaTrainer, LlamaWeights, Strategy,
};
use kiln::{Client, DType, Device, HostTensor, Tensor};
use std::time::Instant;

struct Args {
    d: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    tokens: usize,
    steps: usize,
    lr: f64,
    attn_units: usize,
    ffn_units: Option<usize>,
    dtype: DType,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        d: 256,
        ffn: 688,
        heads: 8,
        kv_heads: 2,
        tokens: 128,
        steps: 20,
        lr: 1e-3,
        attn_units: 1,
        ffn_units: None,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let n = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag}: not a count: {value}"))
        };
        match flag.as_str() {
            "--d" => a.d = n()?,
            "--ffn" => a.ffn = n()?,
            "--heads" => a.heads = n()?,
            "--kv-heads" => a.kv_heads = n()?,
            "--tokens" => a.tokens = n()?,
            "--steps" => a.steps = n()?,
            "--attn-units" => a.attn_units = n()?,
            "--ffn-units" => a.ffn_units = Some(n()?),
            "--lr" => a.lr = value.parse().map_err(|_| format!("--lr: {value}"))?,
            "--dtype" => a.dtype = DType::parse(&value).map_err(|e| e.to_string())?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn mib(bytes: usize) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let client = Client::open(&Device::from_env()?)?;
    if a.d % a.heads != 0 {
        return Err(format!("--heads {} must divide --d {}", a.heads, a.d).into());
    }
    let heads = HeadLayout {
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.d / a.heads,
    };
    let ffn_units = a.ffn_units.unwrap_or((a.ffn / 100).max(1));
    println!(
        "LLaMA block d {} heads {} (KV {}, head_dim {}) FFN {} tokens {} {} on {}",
        a.d,
        a.heads,
        a.kv_heads,
        heads.head_dim,
        a.ffn,
        a.tokens,
        a.dtype,
        client.name()
    );
    // Synthetic data: a fixed input and a target the block can move toward.
    let mut rng = kiln::check::Rng::new(2024);
    let x = rng.normals(a.tokens * a.d, 1.0);
    let target = rng.normals(a.tokens * a.d, 1.0);
    let x = Tensor::upload(
        &client,
        &HostTensor::from_f64(a.dtype, vec![a.tokens, a.d], &x)?,
    )?;
    let config = AdamWConfig {
        lr: a.lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };

    // The S²FT selection: random units (the paper's default), as many for the row
    // blocks (V, up/gate) as for the column blocks (O, down).
    let attn = s2ft_select(
        a.kv_heads,
        1,
        a.attn_units,
        a.attn_units,
        &Strategy::Random { seed: 1 },
    )?;
    let ffn = s2ft_select(
        a.ffn,
        1,
        ffn_units,
        ffn_units,
        &Strategy::Random { seed: 2 },
    )?;
    let weights = || LlamaWeights::random(&client, a.d, a.ffn, &heads, a.dtype, 7);
    let mut runs = Vec::new();
    for (name, mut trainer) in [
        ("full", LlamaTrainer::full(weights()?, heads, config)?),
        (
            "s2ft",
            LlamaTrainer::s2ft(weights()?, heads, &attn, &ffn, config)?,
        ),
    ] {
        // One untimed step compiles and tunes the kernels of this shape.
        let first = trainer.step(&x, &target)?;
        client.sync()?;
        let start = Instant::now();
        let mut last = first;
        for step in 2..=a.steps {
            last = trainer.step(&x, &target)?;
            if step % 5 == 0 || step == a.steps {
                println!("{name:>5} step {step:>3}: loss {:.5}", last.loss);
            }
        }
        client.sync()?;
        let per_step = start.elapsed().as_secs_f64() / (a.steps.saturating_sub(1)).max(1) as f64;
        runs.push((
            name,
            first.loss,
            last,
            trainer.trained_params(),
            trainer.state_bytes(),
            per_step,
        ));
    }
    println!(
        "\n{:>5} {:>12} {:>12} {:>14} {:>14} {:>14} {:>14} {:>11}",
        "", "trained", "loss 1->N", "kept for bwd", "gradients", "optim. state", "total", "ms/step"
    );
    for (name, l0, last, params, state, per_step) in &runs {
        println!(
            "{name:>5} {params:>12} {:>12} {:>14} {:>14} {:>14} {:>14} {:>11.1}",
            format!("{l0:.3}->{:.3}", last.loss),
            mib(last.kept_bytes),
            mib(last.grad_bytes),
            mib(*state),
            mib(last.kept_bytes + last.grad_bytes + state),
            per_step * 1e3
        );
    }
    let (full, s2) = (&runs[0], &runs[1]);
    let mem = |r: &(&str, f64, kiln::kernels::s2ft::StepStats, usize, usize, f64)| {
        r.2.kept_bytes + r.2.grad_bytes + r.4
    };
    println!(
        "\nS2FT keeps {:.2}x less training memory (activations + gradients + state; weights excluded) and steps {:.2}x faster than full fine-tuning.",
        mem(full) as f64 / mem(s2) as f64,
        full.5 / s2.5
    );
    Ok(())
}
