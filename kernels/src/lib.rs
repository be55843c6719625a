//! kiln-kernels: the operator library. One module per operator family, each reading
//! top-down: spec summary, host API, kernels, f64 reference, registry entries.
//!
//! Uses kiln-runtime and kiln-dsl; must not depend on codegen or the root crate.

/// A kernel choice a caller may pin by name (`kiln run OP --set PARAM=NAME`): `auto`
/// (the autotuner's choice, `None`) or one of the enum's variants by its name. Gives
/// the enum `NAMES` (for errors and `kiln ops`), `parse` (an unknown name is an error
/// naming `PARAM`) and `name`.
macro_rules! pinnable_by_name {
    ($ty:ident, $param:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The names the parameter takes, `auto` first.
            pub const NAMES: &'static str = concat!("auto", $(" | ", $name),+);

            /// `auto` (the autotuner's choice: `None`) or a choice by its name.
            pub fn parse(name: &str) -> kiln_runtime::Result<Option<$ty>> {
                match name {
                    "auto" => Ok(None),
                    $($name => Ok(Some($ty::$variant)),)+
                    other => Err(kiln_runtime::Error::Param {
                        param: $param.into(),
                        expected: Self::NAMES.into(),
                        found: other.into(),
                    }),
                }
            }

            /// The choice's name, as `parse` takes it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }
    };
}

pub mod attention;
pub mod elementwise;
pub mod gla;
mod launch;
pub mod matmul;
pub mod moe;
pub mod optim;
pub mod qgemm;
pub mod random;
pub mod rows;
pub mod rowwise;
pub mod s2ft;
mod split_k;
pub mod svd;
mod tile_cost;

use kiln_runtime::{Error, KernelSpec, OpSpec, Result};

// Configurations `kiln check-cuda` found to spill on an architecture: left out of the
// tuning spaces on such CUDA devices (see `kiln_runtime::budget`).
kiln_runtime::register_budget!("cuda-budget.txt");

/// Every operator in the library (each registers itself beside its spec with
/// [`kiln_runtime::register_op!`]), by module then name: `kiln ops` order.
pub fn ops() -> &'static [&'static OpSpec] {
    static OPS: std::sync::OnceLock<Vec<&'static OpSpec>> = std::sync::OnceLock::new();
    OPS.get_or_init(kiln_runtime::registered_ops)
}

/// Every kernel whose source `kiln emit` can print (`#[kiln::kernel]` registers each).
pub fn kernels() -> &'static [&'static KernelSpec] {
    static KERNELS: std::sync::OnceLock<Vec<&'static KernelSpec>> = std::sync::OnceLock::new();
    KERNELS.get_or_init(kiln_runtime::registered_kernels)
}

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
