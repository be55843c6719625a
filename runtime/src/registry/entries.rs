//! The link-time registry: operators and kernels submit entries beside their
//! definitions (`register_op!`, `#[kiln::kernel]`), and tools read them all.

use super::{KernelSpec, OpSpec};

/// An operator's place in the registry; made by [`register_op!`](crate::register_op).
pub struct OpEntry {
    /// The operator.
    pub spec: &'static OpSpec,
    /// The module that registered it (orders `kiln ops` by family).
    pub module: &'static str,
}
inventory::collect!(OpEntry);

/// A kernel's place in the registry; `#[kiln::kernel]` submits one for every kernel.
pub struct KernelEntry {
    /// The kernel.
    pub spec: &'static KernelSpec,
    /// The module that declared it.
    pub module: &'static str,
}
inventory::collect!(KernelEntry);

/// Registers operators (statics of type [`OpSpec`]) so that `kiln ops`, `kiln run`,
/// the self-test and the registry-wide tests find them: one line beside the operator.
///
/// ```ignore
/// kiln_runtime::register_op!(SOFTMAX, LOGSUMEXP);
/// ```
#[macro_export]
macro_rules! register_op {
    ($($op:path),+ $(,)?) => {
        $(
            $crate::inventory::submit! {
                $crate::OpEntry { spec: &$op, module: ::core::module_path!() }
            }
        )+
    };
}

/// Registers hand-written kernel specs (statics of type [`KernelSpec`]); kernels
/// declared with `#[kiln::kernel]` register themselves.
#[macro_export]
macro_rules! register_kernel {
    ($($k:path),+ $(,)?) => {
        $(
            $crate::inventory::submit! {
                $crate::KernelEntry { spec: &$k, module: ::core::module_path!() }
            }
        )+
    };
}

/// Every registered operator, by module then name.
pub fn registered_ops() -> Vec<&'static OpSpec> {
    let mut v: Vec<&OpEntry> = inventory::iter::<OpEntry>.into_iter().collect();
    v.sort_by_key(|e| (e.module, e.spec.name));
    v.into_iter().map(|e| e.spec).collect()
}

/// Every registered kernel, by module then name.
pub fn registered_kernels() -> Vec<&'static KernelSpec> {
    let mut v: Vec<&KernelEntry> = inventory::iter::<KernelEntry>.into_iter().collect();
    v.sort_by_key(|e| (e.module, e.spec.name));
    v.into_iter().map(|e| e.spec).collect()
}
