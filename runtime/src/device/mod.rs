//! Device selection and the device report.
//!
//! `Device::Auto` picks CUDA only when libcuda and NVRTC load and report a device;
//! otherwise the best wgpu adapter on the platform's native API (Vulkan on Linux and
//! Windows, Metal on macOS). Probing never panics: cudarc is asked whether its libraries
//! are present before any call that would panic without them, and adapters are
//! enumerated before cubecl is asked to open one.

use crate::{Error, Result};
use cubecl::ir::{ElemType, FloatKind, IntKind, StorageType};
use cubecl::prelude::ComputeClient;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// Which device to run on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when usable, else the best wgpu adapter.
    #[default]
    Auto,
    /// The CUDA device with this ordinal.
    Cuda(usize),
    /// A wgpu adapter.
    Wgpu(WgpuSelect),
}

/// Which wgpu adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WgpuSelect {
    /// Discrete over integrated over virtual over CPU.
    #[default]
    Best,
    /// The n-th discrete GPU.
    Discrete(usize),
    /// The n-th integrated GPU.
    Integrated(usize),
    /// The n-th virtual GPU.
    Virtual(usize),
    /// The CPU adapter (lavapipe, llvmpipe, WARP).
    Cpu,
}

impl Device {
    /// The accepted spellings, for error messages and `--help`.
    pub const SYNTAX: &'static str =
        "auto | cuda | cuda:N | wgpu | wgpu:discrete[:N] | wgpu:integrated[:N] | wgpu:virtual[:N] | wgpu:cpu";

    /// Parses `auto`, `cuda`, `cuda:1`, `wgpu`, `wgpu:cpu`, `wgpu:discrete:0`, ...
    pub fn parse(s: &str) -> Result<Device> {
        let bad = || Error::Param {
            param: "device".into(),
            expected: Self::SYNTAX.into(),
            found: s.into(),
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let index = |p: Option<&&str>| -> Result<usize> {
            p.map_or(Ok(0), |v| v.parse::<usize>().map_err(|_| bad()))
        };
        Ok(match parts.as_slice() {
            ["auto"] => Device::Auto,
            ["cuda"] | ["cuda", _] => Device::Cuda(index(parts.get(1))?),
            ["wgpu"] => Device::Wgpu(WgpuSelect::Best),
            ["wgpu", "cpu"] => Device::Wgpu(WgpuSelect::Cpu),
            ["wgpu", kind] | ["wgpu", kind, _] => {
                let i = index(parts.get(2))?;
                Device::Wgpu(match *kind {
                    "discrete" => WgpuSelect::Discrete(i),
                    "integrated" => WgpuSelect::Integrated(i),
                    "virtual" => WgpuSelect::Virtual(i),
                    _ => return Err(bad()),
                })
            }
            _ => return Err(bad()),
        })
    }

    /// `KILN_DEVICE` when set (an invalid value is an error), else `Auto`.
    pub fn from_env() -> Result<Device> {
        match std::env::var("KILN_DEVICE") {
            Ok(v) if !v.trim().is_empty() => Device::parse(&v).map_err(|e| match e {
                Error::Param {
                    expected, found, ..
                } => Error::Param {
                    param: "KILN_DEVICE".into(),
                    expected,
                    found,
                },
                other => other,
            }),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::Param {
                param: "KILN_DEVICE".into(),
                expected: format!("a device name in UTF-8: {}", Device::SYNTAX),
                found: format!("{v:?}"),
            }),
            _ => Ok(Device::Auto),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(WgpuSelect::Best) => write!(f, "wgpu"),
            Device::Wgpu(WgpuSelect::Cpu) => write!(f, "wgpu:cpu"),
            Device::Wgpu(WgpuSelect::Discrete(i)) => write!(f, "wgpu:discrete:{i}"),
            Device::Wgpu(WgpuSelect::Integrated(i)) => write!(f, "wgpu:integrated:{i}"),
            Device::Wgpu(WgpuSelect::Virtual(i)) => write!(f, "wgpu:virtual:{i}"),
        }
    }
}

/// The graphics or compute API a device is driven through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Backend {
    /// NVIDIA CUDA (kernels compiled to CUDA C++ by NVRTC).
    Cuda,
    /// Vulkan (WGSL through wgpu).
    Vulkan,
    /// Apple Metal (WGSL through wgpu).
    Metal,
    /// DirectX 12 (WGSL through wgpu).
    Dx12,
    /// OpenGL / GLES (WGSL through wgpu).
    Gl,
    /// WebGPU in a browser.
    BrowserWebGpu,
    /// A wgpu backend kiln does not know.
    Other,
}

/// What kind of adapter a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AdapterType {
    /// A discrete GPU.
    Discrete,
    /// A GPU sharing memory with the CPU.
    Integrated,
    /// A virtualized GPU.
    Virtual,
    /// A software rasterizer on the CPU (lavapipe, llvmpipe, WARP).
    Cpu,
    /// Unknown.
    Other,
}

impl AdapterType {
    /// Lower is preferred by `auto`.
    fn rank(self) -> u8 {
        match self {
            AdapterType::Discrete => 0,
            AdapterType::Integrated => 1,
            AdapterType::Virtual => 2,
            AdapterType::Cpu => 3,
            AdapterType::Other => 4,
        }
    }
}

/// What a device is and what kernels may rely on.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    /// How to select this device again (`cuda:0`, `wgpu:cpu`, ...).
    pub selector: String,
    /// The adapter's or GPU's name.
    pub name: String,
    /// The API kiln drives it through.
    pub backend: Backend,
    /// Discrete, integrated, CPU, ...
    pub adapter_type: AdapterType,
    /// Driver name and version (wgpu), or compute capability (CUDA).
    pub driver: String,
    /// Half-precision arithmetic and storage.
    pub f16: bool,
    /// bfloat16 arithmetic and storage.
    pub bf16: bool,
    /// Double precision.
    pub f64: bool,
    /// Cooperative-matrix (tensor core) instructions usable by kernels.
    pub tensor_cores: bool,
    /// Int8 cooperative-matrix instructions (CUDA `wmma` s8 x s8 -> s32, compute
    /// capability 7.2 and up).
    pub int8_tensor_cores: bool,
    /// Plane (warp / subgroup) operations usable by kernels.
    pub plane_ops: bool,
    /// Whether kernels may exchange values across a plane with `plane_shuffle`: where
    /// cubecl reports plane operations, and on a wgpu adapter with subgroups that cubecl
    /// leaves unreported (it reports none on CPU adapters; lavapipe runs a shuffle from
    /// a constant lane as one vector permute, no memory access).
    pub plane_shuffle: bool,
    /// Plane (warp) size, smallest and largest.
    pub plane_size: (u32, u32),
    /// Shared memory per cube, bytes.
    pub max_shared_memory: usize,
    /// Units (threads) per cube.
    pub max_units_per_cube: u32,
    /// Largest cube count per grid dimension.
    pub max_cube_count: (u32, u32, u32),
    /// Largest single buffer, bytes.
    pub max_buffer_bytes: u64,
    /// Most storage buffers one kernel may bind (wgpu: the adapter's per-stage limit
    /// less the one wgpu keeps; CUDA: no such limit).
    pub max_bindings: u32,
    /// CUDA compute capability (major, minor); `None` on wgpu.
    pub compute_capability: Option<(u32, u32)>,
}

impl DeviceReport {
    /// A generic CUDA device of architecture `arch` as the autotuner sees it (48 KiB of
    /// static shared memory, 1024 units per cube, tensor cores, planes of 32), for
    /// checks that need no GPU (`kiln check-cuda`).
    pub fn cuda_target(arch: nvrtc::CudaArch) -> DeviceReport {
        DeviceReport {
            selector: format!("cuda ({arch})"),
            name: format!("generic {arch}"),
            backend: Backend::Cuda,
            adapter_type: AdapterType::Discrete,
            driver: format!("compute capability {}.{}", arch.major, arch.minor),
            f16: true,
            bf16: arch.major >= 8,
            f64: true,
            tensor_cores: arch.major >= 7,
            int8_tensor_cores: (arch.major, arch.minor) >= (7, 2),
            plane_ops: true,
            plane_shuffle: true,
            plane_size: (32, 32),
            max_shared_memory: 48 * 1024,
            max_units_per_cube: 1024,
            max_cube_count: (u32::MAX, 65_535, 65_535),
            max_buffer_bytes: 1 << 40,
            max_bindings: u32::MAX,
            compute_capability: Some((arch.major, arch.minor)),
        }
    }
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "device:        {} ({})", self.name, self.selector)?;
        writeln!(f, "backend:       {:?}", self.backend)?;
        writeln!(f, "adapter type:  {:?}", self.adapter_type)?;
        writeln!(f, "driver:        {}", self.driver)?;
        writeln!(
            f,
            "dtypes:        f16 {}, bf16 {}, f64 {}",
            yes(self.f16),
            yes(self.bf16),
            yes(self.f64)
        )?;
        match self.tensor_cores {
            true => writeln!(
                f,
                "tensor cores:  yes (int8 {})",
                yes(self.int8_tensor_cores)
            )?,
            false => writeln!(f, "tensor cores:  no")?,
        }
        writeln!(
            f,
            "plane ops:     {} (plane size {}..{}; shuffles {})",
            yes(self.plane_ops),
            self.plane_size.0,
            self.plane_size.1,
            yes(self.plane_shuffle)
        )?;
        writeln!(
            f,
            "shared memory: {} bytes per cube",
            self.max_shared_memory
        )?;
        write!(f, "units/cube:    {}", self.max_units_per_cube)
    }
}

/// A wgpu adapter as seen before opening it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterListing {
    /// How to select it (`wgpu:cpu`, `wgpu:discrete:0`, ...).
    pub selector: String,
    /// Adapter name.
    pub name: String,
    /// Backend.
    pub backend: Backend,
    /// Adapter type.
    pub adapter_type: AdapterType,
    /// Driver name and version.
    pub driver: String,
    /// Whether kiln can open it (only adapters on the platform's native API can be).
    pub usable: bool,
}

/// The concrete device `Auto` (or `Wgpu(Best)`) resolves to here, without opening it.
pub fn resolve(device: &Device) -> Result<Device> {
    match device {
        Device::Auto => {
            // A CUDA device is only usable with NVRTC's headers (cubecl compiles every
            // kernel at first launch): without them `auto` falls back to wgpu.
            if cuda_device_count() > 0 && toolkit::find().is_ok() {
                Ok(Device::Cuda(0))
            } else {
                resolve(&Device::Wgpu(WgpuSelect::Best))
            }
        }
        Device::Wgpu(WgpuSelect::Best) => wgpu::best().map(Device::Wgpu).ok_or_else(no_adapter),
        other => Ok(other.clone()),
    }
}

fn no_adapter() -> Error {
    match native_wgpu_backend() {
        Some(backend) => Error::Device(format!(
            "no wgpu adapter on {backend:?} and no CUDA device; on Linux without a GPU install \
             lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1"
        )),
        None => Error::Device(
            "this build of kiln has no wgpu backend (built without the `wgpu` feature)".into(),
        ),
    }
}

/// An open device: a cubecl client of the right runtime plus the device report.
#[derive(Clone)]
pub struct Client {
    /// The typed cubecl client.
    pub inner: ClientInner,
    report: Arc<DeviceReport>,
    /// The one buffer every empty tensor of this client shares (see
    /// [`Client::empty_handle`]).
    empty: Arc<std::sync::OnceLock<cubecl::server::Handle>>,
}

mod cuda;
pub mod nvrtc;
pub mod toolkit;
mod wgpu;
pub use self::cuda::cuda_device_count;
pub use self::wgpu::{list_wgpu_adapters, native_wgpu_backend};

/// The cubecl runtime types behind [`ClientInner`]'s variants.
///
/// Each backend is a cargo feature (`wgpu`, `cuda`; both on by default). A build
/// without one keeps its variant, typed with the other runtime, and never constructs
/// it: [`dispatch!`](crate::dispatch) then needs no `cfg` in the crates that expand it
/// (a `cfg` in a macro would be evaluated against the caller's features).
pub mod runtimes {
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    compile_error!("kiln-runtime needs at least one backend feature: `wgpu` or `cuda`");

    /// wgpu's runtime.
    #[cfg(feature = "wgpu")]
    pub type Wgpu = cubecl::wgpu::WgpuRuntime;
    /// CUDA's runtime.
    #[cfg(feature = "cuda")]
    pub type Cuda = cubecl::cuda::CudaRuntime;
    /// Stand-in: this build has no wgpu backend (the variant is never constructed).
    #[cfg(all(feature = "cuda", not(feature = "wgpu")))]
    pub type Wgpu = Cuda;
    /// Stand-in: this build has no CUDA backend (the variant is never constructed).
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    pub type Cuda = Wgpu;
}

/// cubecl 0.10 has no type-erased client: one variant per runtime. Use
/// [`dispatch!`](crate::dispatch) to run generic `R: Runtime` code on it.
#[derive(Clone)]
pub enum ClientInner {
    /// wgpu (Vulkan, Metal, DX12, ...), kernels compiled to WGSL.
    Wgpu(ComputeClient<runtimes::Wgpu>),
    /// CUDA, kernels compiled to CUDA C++.
    Cuda(ComputeClient<runtimes::Cuda>),
}

/// Runs `$body` with `$c` bound to the typed `&ComputeClient<R>` of a [`Client`].
#[macro_export]
macro_rules! dispatch {
    ($client:expr, $c:ident => $body:expr) => {
        match &$client.inner {
            $crate::ClientInner::Wgpu($c) => $body,
            $crate::ClientInner::Cuda($c) => $body,
        }
    };
}

pub(crate) fn report_from_props(
    selector: String,
    name: String,
    backend: Backend,
    adapter_type: AdapterType,
    driver: String,
    props: &cubecl::ir::DeviceProperties,
) -> DeviceReport {
    let hw = &props.hardware;
    DeviceReport {
        selector,
        name,
        backend,
        adapter_type,
        driver,
        f16: props.supports_type(ElemType::Float(FloatKind::F16)),
        bf16: props.supports_type(ElemType::Float(FloatKind::BF16)),
        f64: props.supports_type(ElemType::Float(FloatKind::F64)),
        tensor_cores: !props.features.matmul.cmma.is_empty(),
        int8_tensor_cores: props.features.matmul.cmma.iter().any(|c| {
            let int = |k| StorageType::from(ElemType::Int(k));
            c.a_type == int(IntKind::I8)
                && c.b_type == int(IntKind::I8)
                && c.cd_type == int(IntKind::I32)
                && (c.m, c.n, c.k) == (16, 16, 16)
        }),
        plane_ops: !props.features.plane.is_empty(),
        plane_shuffle: !props.features.plane.is_empty(),
        plane_size: (hw.plane_size_min, hw.plane_size_max),
        max_shared_memory: hw.max_shared_memory_size,
        max_units_per_cube: hw.max_units_per_cube,
        max_cube_count: hw.max_cube_count,
        max_buffer_bytes: props.memory.max_page_size,
        max_bindings: hw.max_bindings,
        compute_capability: None,
    }
}

/// The host's hardware threads (`std::thread::available_parallelism`, 1 where unknown),
/// read once per process: the standard library reads cgroup files on every call (tens of
/// microseconds), and cost models ask on every operator call (lavapipe runs a cube per
/// thread).
pub fn host_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The text of a panic payload (`String` or `&str`), for turning panics into errors.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl Client {
    /// The storage of an empty tensor: one 16-byte buffer (wgpu's smallest binding) per
    /// client, allocated once. No kernel reads or writes an element of an empty
    /// tensor, so they can share it; what sharing saves is a device call per empty
    /// tensor, which many threads (one per rank of a ring with more ranks than tokens)
    /// would otherwise queue on the device's one channel.
    pub(crate) fn empty_handle(&self) -> cubecl::server::Handle {
        self.empty
            .get_or_init(|| crate::dispatch!(self, c => c.empty(16)))
            .clone()
    }

    /// Opens a device. `Auto` picks CUDA when usable, else the best wgpu adapter.
    pub fn open(device: &Device) -> Result<Client> {
        match resolve(device)? {
            Device::Cuda(i) => cuda::open(i),
            Device::Wgpu(select) => wgpu::open(select),
            Device::Auto => unreachable!("resolve never returns Auto"),
        }
    }

    /// Opens the device named by `KILN_DEVICE`, or `auto`.
    pub fn from_env() -> Result<Client> {
        Self::open(&Device::from_env()?)
    }

    /// What this device is and can do.
    pub fn report(&self) -> &DeviceReport {
        &self.report
    }

    /// The device's name, for error messages.
    pub fn name(&self) -> &str {
        &self.report.name
    }

    /// Whether kernels may use this dtype here.
    pub fn supports(&self, dtype: crate::DType) -> bool {
        use crate::DType::*;
        match dtype {
            F16 => self.report.f16,
            BF16 => self.report.bf16,
            _ => true,
        }
    }

    /// An `Unsupported` error unless the device has `dtype`.
    pub fn require_dtype(&self, tensor: &str, dtype: crate::DType) -> Result<()> {
        if self.supports(dtype) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                device: format!("{} ({:?})", self.report.name, self.report.backend),
                feature: format!("{dtype} (tensor `{tensor}`)"),
            })
        }
    }

    /// An error unless a buffer of `bytes` fits in one allocation on this device.
    pub fn require_buffer(&self, tensor: &str, bytes: usize) -> Result<()> {
        if bytes as u64 <= self.report.max_buffer_bytes {
            Ok(())
        } else {
            Err(Error::Unsupported {
                device: self.report.name.clone(),
                feature: format!(
                    "a buffer of {bytes} bytes for tensor `{tensor}` (largest: {} bytes)",
                    self.report.max_buffer_bytes
                ),
            })
        }
    }

    /// Blocks until every queued kernel has finished.
    pub fn sync(&self) -> Result<()> {
        let r = dispatch!(self, c => cubecl::future::block_on(c.sync()));
        r.map_err(|e| Error::Kernel {
            kernel: "sync".into(),
            message: format!("{e:?}"),
        })
    }
}
