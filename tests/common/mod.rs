//! Shared by the integration tests: one device for the whole test binary.

#![allow(dead_code)]

use kiln::{Client, Device};
use std::sync::OnceLock;

/// The device the tests run on: `KILN_DEVICE`, or auto (lavapipe in CI).
pub fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let device = Device::from_env().expect("KILN_DEVICE must be valid");
        Client::open(&device).expect("tests need a device: install mesa-vulkan-drivers")
    })
}

/// The conformance vectors copied from ../shared/vectors.
pub fn data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}
