//! S²FT against the f64 reference written from the spec: three S²FT steps of a SwiGLU
//! FFN against masked full fine-tuning of the unpermuted model (within 1e-6), exact
//! co-permutation, the layer check for the FFN and grouped-query attention, selection
//! strategies, partial backprop at ragged sizes in f32 and f16, the multi-block AdamW
//! (and PyTorch's AdamW vector), serving many fine-tunes, and bad input.

use crate::common::{self, down, up};
use kiln::check::{max_rel_error, Rng};
use kiln::kernels::s2ft::{
    ffn_forward, reference as rf, s2ft_adapter_forward, s2ft_merge, s2ft_partial_backward,
    s2ft_permute, s2ft_permute_ffn, s2ft_permute_in_place, s2ft_save_slice, s2ft_select,
    s2ft_verify_attention, s2ft_verify_ffn, swiglu_backward, AdamWConfig, AttentionWeights, Axis,
    Block, FfnWeights, HeadLayout, S2ftAdamW, S2ftPermutation, Strategy,
};
use kiln::{DType, HostTensor, Tensor};

mod bad_input;
mod kernels;
mod steps;
mod structure;

/// The device; this binary runs untuned (`common::UNTUNED`: every kernel its first
/// configuration; the `*_tune` binaries tune and validate every candidate).
fn client() -> &'static kiln::Client {
    common::client()
}

fn weight(rng: &mut Rng, r: usize, c: usize) -> Vec<f64> {
    let v = rng.normals(r * c, 1.0 / (c as f64).sqrt());
    HostTensor::from_f64(DType::F32, vec![r * c], &v)
        .unwrap()
        .to_f64()
}

fn f32s(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    let v = rng.normals(n, scale);
    HostTensor::from_f64(DType::F32, vec![n], &v)
        .unwrap()
        .to_f64()
}

fn t32(shape: &[usize], v: &[f64]) -> Tensor {
    up(DType::F32, shape, v)
}
