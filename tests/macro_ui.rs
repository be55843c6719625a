//! Compile tests of `#[kiln::kernel]`: every diagnostic, pinned with its message and
//! span in `tests/ui/*.stderr` (refresh with `TRYBUILD=overwrite` after an intended
//! change, and review the diff), and kernels that must compile and run as written
//! (`tests/ui-pass`: comptime enums, named arguments, capabilities, joint tunables).

#[test]
fn kernel_macro_diagnostics() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
