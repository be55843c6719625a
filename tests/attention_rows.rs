//! The row-per-unit forward kernel's fast tiles: offered on a CPU adapter from four
//! query tiles of rows (each takes llvmpipe ~30 s to compile), so the other attention
//! tests, whose shapes are smaller, run only its small tiles. Here the kernel tunes
//! over both on a ragged shape that has them (every candidate checked against the
//! first, all timed), and the tuned result must match the f64 reference.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

#[path = "common/attention_rows.rs"]
mod rows;

#[test]
fn rows_kernel_fast_tiles_match_the_reference() {
    rows::fast_tiles_match_the_reference(false, 0);
}
