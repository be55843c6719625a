//! Nothing to use: this package holds the compile-and-run cases of `#[kiln::kernel]`
//! (`tests/ui-pass`, each a test target of its own); its diagnostics are pinned in
//! `macros/diagnostics`.
