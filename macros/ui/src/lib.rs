//! Nothing to use: this package holds the compile tests of `#[kiln::kernel]`
//! (`tests/macro_ui.rs`, cases in `tests/ui` and `tests/ui-pass`).
