//! kiln-runtime: devices, typed device tensors, safetensors I/O, the one error type,
//! and the registry types that operators fill in and tools read.
//!
//! Depends on cubecl only; it must not depend on kiln's kernels, codegen or macros.

mod device;
mod dtype;
mod error;
mod host;
mod registry;
mod tensor;
pub mod tune;

pub use device::{
    cuda_device_count, list_wgpu_adapters, native_wgpu_backend, panic_message, resolve,
    AdapterListing, AdapterType, Backend, Client, ClientInner, Device, DeviceReport, WgpuSelect,
};
pub use dtype::DType;
pub use error::{shape_str, Error, Result};
pub use host::{load_safetensors, load_safetensors_named, save_safetensors, HostTensor};
pub use registry::{
    join_names, KernelConfig, KernelSpec, OpArgs, OpSpec, Outputs, ParamSpec, TensorSpec,
};
pub use tensor::{contiguous_strides, Tensor};
pub use tune::{Autotuner, TuneKey, TuneMode};

/// Re-export of the cubecl version kiln is built on.
pub use cubecl;
