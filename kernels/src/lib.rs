//! kiln-kernels: the operator library. One module per operator family, each reading
//! top-down: spec summary, host API, kernels, f64 reference, registry entries.
//!
//! Uses kiln-runtime and kiln-dsl; must not depend on codegen or the root crate.

// `#[cube]` generates undocumented expansion items inside the operator modules.
#[allow(missing_docs)]
pub mod elementwise;
#[allow(missing_docs)]
pub mod gla;
mod launch;
#[allow(missing_docs)]
pub mod matmul;
#[allow(missing_docs)]
pub mod qgemm;
#[allow(missing_docs)]
pub mod rowwise;

use kiln_runtime::{Error, KernelSpec, OpSpec, Result};

/// Every operator in the library, in `kiln ops` order.
pub fn ops() -> &'static [&'static OpSpec] {
    static OPS: [&OpSpec; 18] = [
        &elementwise::ADD,
        &elementwise::MUL,
        &elementwise::SILU,
        &elementwise::GELU,
        &rowwise::SOFTMAX,
        &rowwise::LOGSUMEXP,
        &matmul::MATMUL,
        &gla::GLA,
        &gla::GLA_RECURRENT,
        &gla::GLA_STEP,
        &gla::GLA_BACKWARD,
        &qgemm::W4A16,
        &qgemm::W4A16_REPACK,
        &qgemm::W8A8,
        &qgemm::QUANTIZE_PER_TOKEN,
        &qgemm::W8_BITS,
        &qgemm::FLEXROUND,
        &qgemm::FLEXROUND_BACKWARD,
    ];
    &OPS
}

/// Every kernel whose source `kiln emit` can print.
pub fn kernels() -> &'static [&'static KernelSpec] {
    static KERNELS: std::sync::OnceLock<Vec<&'static KernelSpec>> = std::sync::OnceLock::new();
    KERNELS.get_or_init(|| {
        let mut all = BASE_KERNELS.to_vec();
        all.extend(gla::KERNELS);
        all.extend(qgemm::KERNELS);
        all
    })
}

const BASE_KERNELS: [&KernelSpec; 9] = [
    &elementwise::ADD_KERNEL,
    &elementwise::MUL_KERNEL,
    &elementwise::SILU_KERNEL,
    &elementwise::GELU_KERNEL,
    &rowwise::SOFTMAX_KERNEL,
    &rowwise::LOGSUMEXP_KERNEL,
    &matmul::MATMUL_TILED_KERNEL,
    &matmul::MATMUL_CMMA_KERNEL,
    &matmul::MATMUL_VEC4_KERNEL,
];

/// Looks an operator up by name.
pub fn op(name: &str) -> Result<&'static OpSpec> {
    ops()
        .iter()
        .copied()
        .find(|o| o.name == name)
        .ok_or_else(|| Error::Unknown {
            kind: "operator",
            name: name.into(),
            known: kiln_runtime::join_names(ops().iter().map(|o| o.name)),
        })
}

/// Looks a kernel up by name.
pub fn kernel(name: &str) -> Result<&'static KernelSpec> {
    kernels()
        .iter()
        .copied()
        .find(|k| k.name == name)
        .ok_or_else(|| Error::Unknown {
            kind: "kernel",
            name: name.into(),
            known: kiln_runtime::join_names(kernels().iter().map(|k| k.name)),
        })
}
