//! Nothing to use: this package holds the compile-fail tests of `#[kiln::kernel]`
//! (`tests/macro_ui.rs`, one case per diagnostic in `tests/ui`, its message and span
//! pinned in the `.stderr` beside it).
