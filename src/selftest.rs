//! `kiln selftest`: every operator against its f64 reference at small, ragged sizes,
//! in every float dtype. A dtype the device lacks must be refused with a clear
//! `Unsupported` error (and that refusal is what gets checked).
//!
//! The cases live beside each operator (its `OpSpec::selftest`); this gathers them
//! from the registry, and the integration tests instantiate them per device and dtype.

pub use kiln_runtime::selftest::{cases, only, run_case, run_case_on, Case, CaseInputs, Outcome};
