//! `tests/attention_rows.rs` with a causal mask and the queries at offset 40: the row-per-unit
//! forward kernel's fast tiles, tuned from scratch (its own process: the tuner's cache
//! and log are global), against the f64 reference.
#![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

mod common;

#[path = "common/attention_rows.rs"]
mod rows;

#[test]
fn rows_kernel_fast_tiles_match_the_reference_causal() {
    rows::fast_tiles_match_the_reference(true, 40);
}
