//! The `kiln` of the compile-fail cases (`macros/diagnostics/tests/ui`): the real
//! `#[kiln::kernel]`, and the paths a user's crate imports, empty. Each case is a kernel
//! the macro rejects, which expands to its `compile_error!` alone, so nothing else of
//! kiln is type-checked; a case whose kernel the macro accepted would fail to resolve
//! cubecl's names here, and its `.stderr` would show it.

pub use kiln_macros::kernel;

/// `kiln::runtime`, as far as the cases import it.
pub mod runtime {
    /// `kiln::runtime::cubecl`, as far as the cases import it (`use cubecl::prelude::*`).
    pub mod cubecl {
        /// Empty: no case's expansion names anything of cubecl.
        pub mod prelude {}
    }
}
