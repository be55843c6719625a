//! kiln-macros: `#[kiln::kernel(...)]`.
//!
//! On a kernel written in cubecl's `#[cube]` language it declares tunable parameters
//! (each a list of integer values, which become comptime `u32` parameters of the
//! kernel), constraints among them, the shape and the device (`require`), the autotune
//! key (`key`), the launch grid and the cube size. It generates the cubecl kernel, a
//! typed config, named-argument structs (`FooArgs`, `FooProblem`), a validated `launch`
//! returning `Result`, `space`/`key`/`tuned` for the autotuner, and a `KernelSpec` that
//! registers itself for `kiln emit`. `#[comptime]` arguments may be `bool`, `u32` or
//! enums (`comptime_enum!`); `require` may ask for typed device capabilities
//! (`device.has(Capability::TensorCores)`). Misuse is a compile error at the
//! offending span (pinned by the compile-fail tests in `macros/diagnostics/tests/ui`).
//!
//! Must not depend on kiln's runtime or kernels: generated code names them by path.

mod args;
mod expand;
mod names;
mod signature;

use proc_macro::TokenStream;

/// Declares a tunable kiln kernel; see the crate docs and the guide in `docs/`.
///
/// ```text
/// #[kiln::kernel(
///     tune(UNITS = [32, 64, 128, 256]),
///     require(UNITS <= cols.next_power_of_two().max(32)),
///     key(rows = pow2, cols = pow2, dtype),
///     grid = (rows),
///     cube = UNITS,
/// )]
/// fn rms_norm<F: Float>(x: &Array<F>, w: &Array<F>, out: &mut Array<F>, rows: u32, cols: u32, eps: f32) { .. }
/// ```
#[proc_macro_attribute]
pub fn kernel(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand::expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}
