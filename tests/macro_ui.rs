//! Compile-fail tests: every diagnostic of `#[kiln::kernel]`, pinned with its message
//! and span in `tests/ui/*.stderr` (refresh with `TRYBUILD=overwrite` after an
//! intended change, and review the diff).

#[test]
fn kernel_macro_diagnostics() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
