//! kiln-dsl: the vocabulary used inside kiln kernels, as `#[cube]` functions.
//!
//! Everything here runs on every cubecl target (CUDA, WGSL on Vulkan/Metal/DX12, and
//! lavapipe, which has no plane operations), so nothing assumes warps or tensor cores.
//! Must not depend on kiln's runtime, kernels or codegen.

/// Hash of the DSL's sources (made by the build script). `#[kiln::kernel]` folds it
/// into every kernel's tune-cache key, so an edited DSL function is tuned anew.
pub const SOURCE_HASH: &str = env!("KILN_DSL_SOURCE_HASH");

// `#[cube]` generates undocumented expansion items.
#[allow(missing_docs)]
pub mod activation;
#[allow(missing_docs)]
pub mod block;
#[allow(missing_docs)]
pub mod grid;
#[allow(missing_docs)]
pub mod permutation;
#[allow(missing_docs)]
pub mod quant;
#[allow(missing_docs)]
pub mod random;
#[allow(missing_docs)]
pub mod reduce;
#[allow(missing_docs)]
pub mod scan;
#[allow(missing_docs)]
pub mod softmax;
#[allow(missing_docs)]
pub mod tile;

pub use activation::*;
pub use block::*;
pub use grid::*;
pub use permutation::*;
pub use quant::*;
pub use random::*;
pub use reduce::*;
pub use scan::*;
pub use softmax::*;
pub use tile::*;
