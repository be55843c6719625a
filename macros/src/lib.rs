//! kiln-macros: the home of `#[kiln::kernel(...)]` (tunable parameters, constraints,
//! autotune key, launch grid -> cubecl kernel, typed config, validated launch function,
//! registry entry). The macro is the subject of the kernel-macro issue and is not
//! implemented yet: this crate currently exports nothing, so nothing reachable is a stub.
//!
//! Must not depend on kiln's runtime or kernels (proc-macro crates cannot anyway).
