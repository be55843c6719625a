//! kiln: a Rust GPU kernel DSL, compiler and operator library on cubecl.
//!
//! One kernel source runs on CUDA (NVRTC) and on every wgpu backend (Vulkan, Metal,
//! DX12, browsers), including lavapipe on a plain CPU. This crate is the facade: it
//! re-exports the layers and holds the pieces the `kiln` tool and tests share.
//!
//! ```no_run
//! use kiln::{Client, Device, HostTensor, Tensor};
//! let client = Client::open(&Device::Auto)?;
//! let x = Tensor::upload(&client, &HostTensor::from_f32(vec![2, 3], &[1., 2., 3., 4., 5., 6.])?)?;
//! let p = kiln::kernels::rowwise::softmax(&x)?.download()?;
//! # Ok::<(), kiln::Error>(())
//! ```

pub use kiln_codegen as codegen;
pub use kiln_dsl as dsl;
pub use kiln_kernels as kernels;
/// `#[kiln::kernel(...)]`: see the guide in `docs/first-kernel.md`.
pub use kiln_macros::kernel;
pub use kiln_runtime as runtime;
pub use kiln_runtime::{
    load_safetensors, save_safetensors, Backend, Client, DType, Device, DeviceReport, Error,
    FlatLayout, HostTensor, Result, Tensor, MAX_ELEMENTS, VIEW_ALIGN_BYTES,
};

/// Seeded test data and error metrics (`Rng`, `max_rel_error`, `example_inputs`).
pub use kiln_runtime::check;
pub mod selftest;
