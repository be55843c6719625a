//! A LLaMA-style block trained by full fine-tuning or by S²FT, on kiln's kernels only:
//! what `examples/s2ft_finetune.rs` and the S²FT benchmark run side by side.
//!
//! Block (one sequence `x` `[T, d]`, RMSNorms left out: they hold none of the weights
//! S²FT trains): `h1 = x + attention(x W_q^T, x W_k^T, x W_v^T; causal) W_o^T` (grouped-
//! query), `y = h1 + (silu(h1 W_gate^T) * (h1 W_up^T)) W_down^T`; loss `0.5 |y -
//! target|^2 / T`.
//! - Full fine-tuning: every weight's gradient, AdamW state for every weight.
//! - S²FT: the weights co-permuted once (KV groups for attention, channels for the
//!   FFN); trained blocks `W_v[0:r_v, :]`, `W_o[:, s_o:e_o]`, `W_up[0:r_f, :]`,
//!   `W_gate[0:r_f, :]`, `W_down[:, s_f:e_f]`; partial backprop (only the hidden's
//!   slice `[:, s_f:e_f]` is kept for `W_down`; `W_q`, `W_k` get no gradient), AdamW
//!   state for the blocks only. The attention backward still runs (V is trained), so its
//!   inputs are kept in both modes.

use super::adamw::{AdamWConfig, S2ftAdamW};
use super::block::{swiglu, swiglu_backward};
use super::grads::{s2ft_partial_backward, s2ft_save_slice, Block};
use super::permute::{check_units, s2ft_permute_in_place, Axis, HeadLayout};
use super::select::S2ftPermutation;
use crate::attention::{
    attention, attention_backward, AttentionGradInputs, AttentionInputs, AttentionOptions,
};
use crate::launch::shape_err;
use crate::matmul::{matmul, Epilogue};
use kiln_runtime::{check::Rng, Client, DType, HostTensor, Result, Tensor};

/// The block's seven projections, PyTorch's `[out, in]` layout.
pub struct LlamaWeights {
    /// `[H hd, d]`.
    pub w_q: Tensor,
    /// `[Hkv hd, d]`.
    pub w_k: Tensor,
    /// `[Hkv hd, d]`.
    pub w_v: Tensor,
    /// `[d, H hd]`.
    pub w_o: Tensor,
    /// `[F, d]`.
    pub w_up: Tensor,
    /// `[F, d]`.
    pub w_gate: Tensor,
    /// `[d, F]`.
    pub w_down: Tensor,
}

impl LlamaWeights {
    /// Seeded normal weights scaled by `1 / sqrt(fan_in)`, in `dtype`.
    pub fn random(
        client: &Client,
        d: usize,
        f: usize,
        heads: &HeadLayout,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        heads.check()?;
        let mut rng = Rng::new(seed);
        let (q, kv) = (
            heads.heads * heads.head_dim,
            heads.kv_heads * heads.head_dim,
        );
        let mut w = |r: usize, c: usize| -> Result<Tensor> {
            let v = rng.normals(r * c, 1.0 / (c as f64).sqrt());
            Tensor::upload(client, &HostTensor::from_f64(dtype, vec![r, c], &v)?)
        };
        Ok(Self {
            w_q: w(q, d)?,
            w_k: w(kv, d)?,
            w_v: w(kv, d)?,
            w_o: w(d, q)?,
            w_up: w(f, d)?,
            w_gate: w(f, d)?,
            w_down: w(d, f)?,
        })
    }

    fn all(&self) -> [&Tensor; 7] {
        [
            &self.w_q,
            &self.w_k,
            &self.w_v,
            &self.w_o,
            &self.w_up,
            &self.w_gate,
            &self.w_down,
        ]
    }

    /// Elements of all seven weights.
    pub fn numel(&self) -> usize {
        self.all().iter().map(|t| t.numel()).sum()
    }
}

/// How the block is trained.
enum Mode {
    Full,
    S2ft {
        /// Trained blocks of `W_v`, `W_o`, `W_up`, `W_gate`, `W_down`.
        blocks: [Block; 5],
    },
}

/// One training step's numbers.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// `0.5 |y - target|^2 / T` before the update.
    pub loss: f64,
    /// Bytes of activations kept from the forward for the backward.
    pub kept_bytes: usize,
    /// Bytes of the weight gradients the step produced.
    pub grad_bytes: usize,
}

/// A LLaMA block and its optimizer (full fine-tuning or S²FT).
pub struct LlamaTrainer {
    /// The weights (co-permuted for S²FT).
    pub weights: LlamaWeights,
    /// Head layout.
    pub heads: HeadLayout,
    mode: Mode,
    opt: S2ftAdamW,
}

/// What the forward keeps for the backward.
struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    h1: Tensor,
    gate: Tensor,
    up: Tensor,
    /// The whole hidden (full) or its slice `[:, s_f:e_f]` (S²FT).
    hidden: Tensor,
}

impl Saved {
    fn bytes(&self, x: &Tensor) -> usize {
        [
            x,
            &self.q,
            &self.k,
            &self.v,
            &self.out,
            &self.lse,
            &self.h1,
            &self.gate,
            &self.up,
            &self.hidden,
        ]
        .iter()
        .map(|t| t.numel() * t.dtype().size())
        .sum()
    }
}

impl LlamaTrainer {
    /// Full fine-tuning: AdamW on every weight.
    pub fn full(weights: LlamaWeights, heads: HeadLayout, config: AdamWConfig) -> Result<Self> {
        heads.check()?;
        let list: Vec<(&Tensor, Block)> = weights
            .all()
            .into_iter()
            .map(|w| {
                (
                    w,
                    // A weight of rank 0 gets an empty block here, and S2ftAdamW::new
                    // names it (every weight is a matrix).
                    Block::Rows {
                        start: 0,
                        end: w.shape().first().copied().unwrap_or(0),
                    },
                )
            })
            .collect();
        let opt = S2ftAdamW::new(&list, config)?;
        Ok(Self {
            weights,
            heads,
            mode: Mode::Full,
            opt,
        })
    }

    /// S²FT: co-permutes `weights` in place by `attention` (KV groups) and `ffn`
    /// (channels), then trains the five blocks they define.
    pub fn s2ft(
        weights: LlamaWeights,
        heads: HeadLayout,
        attention: &S2ftPermutation,
        ffn: &S2ftPermutation,
        config: AdamWConfig,
    ) -> Result<Self> {
        heads.check()?;
        let (hd, qu) = (heads.head_dim, heads.group() * heads.head_dim);
        let w = &weights;
        let moves = [
            ("w_q", &w.w_q, attention, qu, Axis::Rows, "head_dim"),
            ("w_k", &w.w_k, attention, hd, Axis::Rows, "head_dim"),
            ("w_v", &w.w_v, attention, hd, Axis::Rows, "head_dim"),
            ("w_o", &w.w_o, attention, qu, Axis::Columns, "head_dim"),
            ("w_up", &w.w_up, ffn, 1, Axis::Rows, "unit_size"),
            ("w_gate", &w.w_gate, ffn, 1, Axis::Rows, "unit_size"),
            ("w_down", &w.w_down, ffn, 1, Axis::Columns, "unit_size"),
        ];
        // Every weight and both permutations checked before the first one is permuted in
        // place: an error leaves the weights as they were given.
        for &(name, t, perm, unit, axis, param) in &moves {
            check_units(name, t, perm, unit, axis, param)?;
        }
        for (name, t, perm, unit, axis, param) in moves {
            s2ft_permute_in_place(name, t, perm, unit, axis, param)?;
        }
        let (ra, ca, rf, cf) = (
            attention.row_block(),
            attention.col_block(),
            ffn.row_block(),
            ffn.col_block(),
        );
        let blocks = [
            Block::Rows {
                start: 0,
                end: ra.end * hd,
            },
            Block::Columns {
                start: ca.start * qu,
                end: ca.end * qu,
            },
            Block::Rows {
                start: 0,
                end: rf.end,
            },
            Block::Rows {
                start: 0,
                end: rf.end,
            },
            Block::Columns {
                start: cf.start,
                end: cf.end,
            },
        ];
        let trained = [&w.w_v, &w.w_o, &w.w_up, &w.w_gate, &w.w_down];
        let list: Vec<(&Tensor, Block)> = trained.into_iter().zip(blocks).collect();
        let opt = S2ftAdamW::new(&list, config)?;
        Ok(Self {
            weights,
            heads,
            mode: Mode::S2ft { blocks },
            opt,
        })
    }

    /// Trained parameters (elements).
    pub fn trained_params(&self) -> usize {
        match &self.mode {
            Mode::Full => self.weights.numel(),
            Mode::S2ft { blocks } => {
                let w = &self.weights;
                [&w.w_v, &w.w_o, &w.w_up, &w.w_gate, &w.w_down]
                    .iter()
                    .zip(blocks)
                    .map(|(t, b)| {
                        let [r, c] = b.shape(t.shape()[0], t.shape()[1]);
                        r * c
                    })
                    .sum()
            }
        }
    }

    /// Bytes of optimizer state (f32 `m`, `v`, and master copies of half blocks).
    pub fn state_bytes(&self) -> usize {
        self.opt.state_bytes()
    }

    /// The block's output `y` `[T, d]` for `x` `[T, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_saving(x)?.0)
    }

    fn forward_saving(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let w = &self.weights;
        let h = &self.heads;
        let &[t, _] = x.shape() else {
            return Err(shape_err("x", "[T, d]".into(), x.shape()));
        };
        let proj = |wm: &Tensor, n: usize| -> Result<Tensor> {
            matmul(x, wm, true, Epilogue::default())?.reshape(&[1, t, n, h.head_dim])
        };
        let (q, k, v) = (
            proj(&w.w_q, h.heads)?,
            proj(&w.w_k, h.kv_heads)?,
            proj(&w.w_v, h.kv_heads)?,
        );
        let opts = AttentionOptions {
            causal: true,
            ..AttentionOptions::default()
        };
        let att = attention(&AttentionInputs::new(&q, &k, &v), &opts)?;
        let out = att.out.reshape(&[t, h.heads * h.head_dim])?;
        let residual = |r| Epilogue {
            residual: Some(r),
            ..Epilogue::default()
        };
        let h1 = matmul(&out, &w.w_o, true, residual(x))?;
        let gate = matmul(&h1, &w.w_gate, true, Epilogue::default())?;
        let up = matmul(&h1, &w.w_up, true, Epilogue::default())?;
        let hidden = swiglu(&gate, &up)?;
        let y = matmul(&hidden, &w.w_down, true, residual(&h1))?;
        let hidden = match &self.mode {
            Mode::Full => hidden,
            Mode::S2ft { blocks } => {
                let (s, e) = blocks[4].range();
                s2ft_save_slice(&hidden, s, e)?
            }
        };
        let saved = Saved {
            q,
            k,
            v,
            out,
            lse: att.lse,
            h1,
            gate,
            up,
            hidden,
        };
        Ok((y, saved))
    }

    /// One step on `x` `[T, d]` toward `target` `[T, d]`: forward, backward (full or
    /// partial), AdamW. The loss is computed on the host from `y` (one download).
    pub fn step(&mut self, x: &Tensor, target: &[f64]) -> Result<StepStats> {
        let (y, s) = self.forward_saving(x)?;
        let kept_bytes = s.bytes(x);
        let t = x.shape()[0];
        let yv = y.download()?.to_f64();
        if yv.len() != target.len() {
            return Err(shape_err(
                "target",
                format!("{} values ([T, d] of y)", yv.len()),
                &[target.len()],
            ));
        }
        let loss = 0.5
            * yv.iter()
                .zip(target)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
            / t as f64;
        let dy: Vec<f64> = yv
            .iter()
            .zip(target)
            .map(|(a, b)| (a - b) / t as f64)
            .collect();
        let dy = Tensor::upload(
            x.client(),
            &HostTensor::from_f64(y.dtype(), y.shape().to_vec(), &dy)?,
        )?;
        let grads = self.backward(x, &dy, &s)?;
        let grad_bytes = grads.iter().map(|g| g.numel() * g.dtype().size()).sum();
        let w = &self.weights;
        let gr: Vec<&Tensor> = grads.iter().collect();
        match &self.mode {
            Mode::Full => self.opt.step(&w.all(), &gr)?,
            Mode::S2ft { .. } => self
                .opt
                .step(&[&w.w_v, &w.w_o, &w.w_up, &w.w_gate, &w.w_down], &gr)?,
        }
        Ok(StepStats {
            loss,
            kept_bytes,
            grad_bytes,
        })
    }

    /// The gradients of the trained weights (or blocks), in the optimizer's order.
    fn backward(&self, x: &Tensor, dy: &Tensor, s: &Saved) -> Result<Vec<Tensor>> {
        let w = &self.weights;
        let h = &self.heads;
        let t = x.shape()[0];
        let all_rows = |m: &Tensor| Block::Rows {
            start: 0,
            end: m.shape()[0],
        };
        let (b_v, b_o, b_up, b_down) = match &self.mode {
            Mode::Full => (
                all_rows(&w.w_v),
                all_rows(&w.w_o),
                all_rows(&w.w_up),
                all_rows(&w.w_down),
            ),
            Mode::S2ft { blocks } => (blocks[0], blocks[1], blocks[2], blocks[4]),
        };
        let (d_down, d_hidden) = s2ft_partial_backward(dy, &s.hidden, Some(&w.w_down), b_down)?;
        let d_hidden = d_hidden.expect("w_down given");
        let (d_gate, d_up) = swiglu_backward(&d_hidden, &s.gate, &s.up)?;
        let (d_wup, _) = s2ft_partial_backward(&d_up, &s.h1, None, b_up)?;
        let (d_wgate, _) = s2ft_partial_backward(&d_gate, &s.h1, None, b_up)?;
        // dh1 = dy + d_gate W_gate + d_up W_up (the residual fused into the GEMMs).
        let with = |r| Epilogue {
            residual: Some(r),
            ..Epilogue::default()
        };
        let dh1 = matmul(&d_gate, &w.w_gate, false, with(dy))?;
        let dh1 = matmul(&d_up, &w.w_up, false, with(&dh1))?;
        let out_kept = match b_o {
            Block::Columns { start, end } => s2ft_save_slice(&s.out, start, end)?,
            Block::Rows { .. } => s.out.clone(),
        };
        let (d_wo, d_out) = s2ft_partial_backward(&dh1, &out_kept, Some(&w.w_o), b_o)?;
        let d_out = d_out
            .expect("w_o given")
            .reshape(&[1, t, h.heads, h.head_dim])?;
        let out4 = s.out.reshape(&[1, t, h.heads, h.head_dim])?;
        let opts = AttentionOptions {
            causal: true,
            ..AttentionOptions::default()
        };
        let g = attention_backward(
            &AttentionInputs::new(&s.q, &s.k, &s.v),
            &AttentionGradInputs {
                out: &out4,
                lse: &s.lse,
                d_o: &d_out,
            },
            &opts,
        )?;
        let flat = |d: &Tensor, n: usize| d.reshape(&[t, n * h.head_dim]);
        let dv = flat(&g.dv, h.kv_heads)?;
        let (d_wv, _) = s2ft_partial_backward(&dv, x, None, b_v)?;
        Ok(match &self.mode {
            Mode::Full => {
                let (d_wq, _) =
                    s2ft_partial_backward(&flat(&g.dq, h.heads)?, x, None, all_rows(&w.w_q))?;
                let (d_wk, _) =
                    s2ft_partial_backward(&flat(&g.dk, h.kv_heads)?, x, None, all_rows(&w.w_k))?;
                vec![d_wq, d_wk, d_wv, d_wo, d_wup, d_wgate, d_down]
            }
            Mode::S2ft { .. } => vec![d_wv, d_wo, d_wup, d_wgate, d_down],
        })
    }
}
