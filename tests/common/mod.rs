//! Shared by the integration tests: one device for the whole test binary.

#![allow(dead_code)]

use kiln::{Client, Device};
use std::sync::OnceLock;

/// The test binaries whose suites run untuned: every kernel its first configuration, so
/// that their many shapes do not each compile and time every candidate (the `*_tune`
/// binaries tune, and so validate every candidate, on a few shapes).
const UNTUNED: &[&str] = &[
    "attention",
    "gla",
    "moe",
    "ops_half",
    "properties",
    "qgemm",
    "ring_attention",
    "training",
];

/// In an [`UNTUNED`] binary, turns the global autotuner off, directly: every operator
/// call needs a tensor, and so a device opened by [`client`] or [`client_for`], which
/// call this first (`KILN_AUTOTUNE` set by a test would be read only if that test
/// happened to create the autotuner).
fn untuned_if_listed() {
    if UNTUNED.contains(&binary_name().as_str()) {
        use kiln::runtime::tune::{Autotuner, TuneMode};
        Autotuner::global().set_mode(TuneMode::Off);
    }
}

/// The device the tests run on: `KILN_DEVICE`, or auto (lavapipe in CI); the autotuner
/// off in an [`UNTUNED`] binary.
pub fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        untuned_if_listed();
        let device = Device::from_env().expect("KILN_DEVICE must be valid");
        Client::open(&device).expect("tests need a device: install mesa-vulkan-drivers")
    })
}

/// This test binary's target name (`gla` for `target/debug/deps/gla-<hash>`).
pub fn binary_name() -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, _hash)) => name.to_string(),
        None => stem.to_string(),
    }
}

/// The device a selector names (`wgpu`, `cuda`, ...), opened once per test binary; the
/// refusal's text when this machine has none. Asserts that a refusal is a clear
/// `Device` error (any other error, or a panic, fails the calling test).
pub fn client_for(selector: &str) -> Result<&'static Client, String> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static CLIENTS: OnceLock<Mutex<BTreeMap<String, Result<&'static Client, String>>>> =
        OnceLock::new();
    let mut map = CLIENTS.get_or_init(Default::default).lock().unwrap();
    let entry = map.entry(selector.to_string()).or_insert_with(|| {
        untuned_if_listed();
        match Device::parse(selector).and_then(|d| Client::open(&d)) {
            Ok(c) => Ok(&*Box::leak(Box::new(c))),
            Err(e @ kiln::Error::Device(_)) => Err(e.to_string()),
            Err(e) => panic!("{selector}: opening the device failed without a Device error: {e}"),
        }
    });
    entry.clone()
}

/// Whether the test device lacks `dtype`; if so, asserts that a tensor of that dtype is
/// refused by name with `Unsupported` (so a test that then skips the dtype has checked
/// the refusal, never skipped silently).
pub fn refused(dtype: kiln::DType) -> bool {
    if client().supports(dtype) {
        return false;
    }
    let h = kiln::HostTensor::from_f64(dtype, vec![2, 2], &[1.0; 4]).unwrap();
    let e = kiln::Tensor::upload_named(client(), "a", &h).unwrap_err();
    assert!(
        matches!(e, kiln::Error::Unsupported { .. }) && e.to_string().contains(dtype.name()),
        "{dtype}: {e}"
    );
    true
}

/// `v` uploaded to the test device as `dtype` (rounded once).
pub fn up(dtype: kiln::DType, shape: &[usize], v: &[f64]) -> kiln::Tensor {
    kiln::Tensor::upload(
        client(),
        &kiln::HostTensor::from_f64(dtype, shape.to_vec(), v).unwrap(),
    )
    .unwrap()
}

/// A device tensor's values as f64.
pub fn down(t: &kiln::Tensor) -> Vec<f64> {
    t.download().unwrap().to_f64()
}

/// A conformance vector in the workspace's `tests/data` (computed by PyTorch and by
/// fla's reference), from the root package's tests or from the command-line crate's.
pub fn data(name: &str) -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if here.join("tests/data").is_dir() {
        here.to_path_buf()
    } else {
        here.join("..")
    };
    root.join("tests/data").join(name)
}

/// Every candidate the autotuner timed: (label, status), in order.
pub type TuneLog =
    std::sync::Arc<std::sync::Mutex<Vec<(String, kiln::runtime::tune::CandidateStatus)>>>;

/// Autotuning on, exhaustive, in a fresh cache of its own (so that every candidate is timed), with
/// a log of the candidates: for a test binary with one test, before the first operator
/// call creates the global autotuner. Returns the cache folder (to remove at the end)
/// and the log.
pub fn tune_from_scratch(name: &str) -> (std::path::PathBuf, TuneLog) {
    use kiln::runtime::tune::{Autotuner, Search, TuneEvent};
    let dir = std::env::temp_dir().join(format!("kiln-{name}-tune-{}", std::process::id()));
    std::env::set_var("KILN_CACHE_DIR", &dir);
    std::env::set_var("KILN_AUTOTUNE", "on");
    // Every candidate runs, whatever a cost model thinks of it (tests/tune.rs checks the
    // ranked search itself).
    Autotuner::global().set_search(Search::Exhaustive);
    let seen = TuneLog::default();
    let log = seen.clone();
    Autotuner::global().observe(move |e| {
        if let TuneEvent::Candidate { label, status } = e {
            log.lock().unwrap().push((label.clone(), status.clone()));
        }
    });
    (dir, seen)
}

/// Asserts that an attention forward's `out` and `lse` are within `1e-5` rel-RMS of the
/// reference's (f32 bars of the attention tests); `what` names the run in the message.
#[allow(dead_code)]
pub fn assert_forward_close(
    what: &str,
    out: &kiln::Tensor,
    lse: &kiln::Tensor,
    o_ref: &[f64],
    l_ref: &[f64],
) {
    let (eo, el) = (
        kiln::check::rms_relative(&down(out), o_ref),
        kiln::check::rms_relative(&down(lse), l_ref),
    );
    assert!(
        eo <= 1e-5 && el <= 1e-5,
        "{what}: out {eo:.2e} lse {el:.2e}"
    );
}

/// Asserts that `e`'s message is one line and contains each of `words`.
pub fn assert_clear(e: kiln::Error, words: &[&str]) {
    let m = e.to_string();
    assert!(!m.contains('\n'), "{m}");
    for w in words {
        assert!(m.contains(w), "`{w}` not in: {m}");
    }
}

/// Whether the test device is a CPU adapter (lavapipe): some tile shapes are offered only
/// there, and GPUs refuse some kernels by design.
pub fn on_cpu_adapter() -> bool {
    client().report().adapter_type == kiln::runtime::AdapterType::Cpu
}

/// Whether the device offers the kernels that share operands across a plane of 8 by
/// shuffles (`matmul_vec4_plane` and the quantized GEMMs' `SHARE = 8` tiles: lavapipe on
/// 256-bit SIMD).
pub fn has_planes_of_8() -> bool {
    let device = client().report();
    device.plane_shuffle && device.plane_size == (8, 8)
}
