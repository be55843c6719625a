//! The one error type of the whole library.

/// Everything that can go wrong in kiln, as a value. Every variant names the tensor,
/// parameter or device involved, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operator input that is required was not supplied.
    #[error("missing input tensor `{tensor}` for `{op}` (expected {expected})")]
    MissingTensor {
        /// The operator.
        op: String,
        /// The documented input name.
        tensor: String,
        /// Its documented shape and dtypes.
        expected: String,
    },
    /// A tensor has the wrong shape or rank.
    #[error("tensor `{tensor}`: expected shape {expected}, found {found}")]
    Shape {
        /// The tensor's name.
        tensor: String,
        /// What was expected, e.g. `[..., 257]` or `rank >= 1`.
        expected: String,
        /// What was found, e.g. `[33, 256]`.
        found: String,
    },
    /// A tensor has the wrong element type.
    #[error("tensor `{tensor}`: expected dtype {expected}, found {found}")]
    DType {
        /// The tensor's name.
        tensor: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// No operator or kernel of that name exists.
    #[error("unknown {kind} `{name}` (known: {known})")]
    Unknown {
        /// `operator`, `kernel`, `target`, `device`, ...
        kind: &'static str,
        /// The name given.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// A parameter the operator does not take.
    #[error("`{op}` has no parameter `{param}` (parameters: {known})")]
    UnknownParam {
        /// The operator or kernel.
        op: String,
        /// The parameter given.
        param: String,
        /// The parameters that exist.
        known: String,
    },
    /// A parameter with a value out of range or of the wrong form.
    #[error("parameter `{param}`: expected {expected}, found `{found}`")]
    Param {
        /// The parameter's name.
        param: String,
        /// The allowed values.
        expected: String,
        /// The value given.
        found: String,
    },
    /// The device cannot do what was asked (a dtype, tensor cores, ...).
    #[error("device `{device}` does not support {feature}")]
    Unsupported {
        /// The device's name.
        device: String,
        /// What is missing.
        feature: String,
    },
    /// No usable device, or a device failed to start.
    #[error("device: {0}")]
    Device(String),
    /// A kernel failed to compile or launch, or reading back failed.
    #[error("kernel `{kernel}`: {message}")]
    Kernel {
        /// The kernel's name.
        kernel: String,
        /// What the runtime reported.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid safetensors, or holds a dtype kiln does not handle.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A collective or point-to-point transfer failed: peers disagreed on sizes or
    /// dtypes, a peer dropped out, or a wait timed out.
    #[error("rank {rank}: {op}{}: {message}", peer.map_or(String::new(), |p| format!(" with rank {p}")))]
    Comm {
        /// The operation (`all_reduce`, `send`, ...).
        op: String,
        /// This rank.
        rank: usize,
        /// The peer involved, where one is known (a collective that timed out on NCCL
        /// cannot tell which rank did not take part).
        peer: Option<usize>,
        /// What went wrong.
        message: String,
    },
}

/// kiln's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a shape as `[a, b, c]`.
pub fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// A number as an error message shows it: `1e-50` and `1e39`, not `Display`'s fifty
/// digits (it never uses an exponent); ordinary magnitudes as `Display` writes them.
pub fn number_str(v: f64) -> String {
    match v.abs() {
        a if a != 0.0 && a.is_finite() && !(1e-4..1e16).contains(&a) => format!("{v:e}"),
        _ => v.to_string(),
    }
}
