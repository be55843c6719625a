//! Seeded inputs of the benches.

use kiln::check::Rng;
use kiln::{Client, DType, HostTensor, Tensor};

/// An f32 tensor of `shape` with normal values times `scale`, from `rng`.
pub fn normals(client: &Client, shape: &[usize], rng: &mut Rng, scale: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::upload(
        client,
        &HostTensor::from_f64(DType::F32, shape.to_vec(), &rng.normals(n, scale)).unwrap(),
    )
    .unwrap()
}
