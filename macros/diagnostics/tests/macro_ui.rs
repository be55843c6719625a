//! Compile tests of `#[kiln::kernel]`: every diagnostic, pinned with its message and
//! span in `tests/ui/*.stderr` (refresh with `TRYBUILD=overwrite` after an intended
//! change, and review the diff). The kernels that must compile and run as written
//! (comptime enums, named arguments, capabilities, joint tunables) are `macros/ui`'s
//! `ui_pass_*` test targets, against the real kiln.
//!
//! trybuild builds the cases as a project of their own, dependencies included, so it is
//! kept lean: compile-fail cases only, so trybuild type-checks (`cargo check`, no machine
//! code); `kiln` is a stand-in with the real macro (see this package's Cargo.toml); and no
//! debug info (trybuild's project has no profile of its own; cargo reads these variables
//! from the environment).
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

#[test]
fn kernel_macro_diagnostics() {
    std::env::set_var("CARGO_PROFILE_DEV_DEBUG", "false");
    std::env::set_var("CARGO_INCREMENTAL", "0");
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
