//! Device selection and the device report.
//!
//! `Device::Auto` picks CUDA only when libcuda and NVRTC load and report a device;
//! otherwise the best wgpu adapter on the platform's native API (Vulkan on Linux and
//! Windows, Metal on macOS). Probing never panics: cudarc is asked whether its libraries
//! are present before any call that would panic without them, and adapters are
//! enumerated before cubecl is asked to open one.

use crate::{Error, Result};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::{ComputeClient, Runtime};
use cubecl::wgpu::{AutoGraphicsApi, GraphicsApi, WgpuDevice, WgpuRuntime};
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

impl Backend {
    fn from_wgpu(b: wgpu::Backend) -> Backend {
        match b {
            wgpu::Backend::Vulkan => Backend::Vulkan,
            wgpu::Backend::Metal => Backend::Metal,
            wgpu::Backend::Dx12 => Backend::Dx12,
            wgpu::Backend::Gl => Backend::Gl,
            wgpu::Backend::BrowserWebGpu => Backend::BrowserWebGpu,
            _ => Backend::Other,
        }
    }
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
    fn from_wgpu(t: wgpu::DeviceType) -> AdapterType {
        match t {
            wgpu::DeviceType::DiscreteGpu => AdapterType::Discrete,
            wgpu::DeviceType::IntegratedGpu => AdapterType::Integrated,
            wgpu::DeviceType::VirtualGpu => AdapterType::Virtual,
            wgpu::DeviceType::Cpu => AdapterType::Cpu,
            wgpu::DeviceType::Other => AdapterType::Other,
        }
    }
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
    /// Plane (warp / subgroup) operations usable by kernels.
    pub plane_ops: bool,
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
        writeln!(f, "tensor cores:  {}", yes(self.tensor_cores))?;
        writeln!(
            f,
            "plane ops:     {} (plane size {}..{})",
            yes(self.plane_ops),
            self.plane_size.0,
            self.plane_size.1
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

/// Whether the CUDA driver and NVRTC load and at least one device exists.
/// Never panics, whatever is installed.
pub fn cuda_device_count() -> usize {
    // SAFETY: these only try to dlopen the libraries; they do not call into them.
    let present = unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
    };
    if !present {
        return 0;
    }
    std::panic::catch_unwind(|| cudarc::driver::CudaContext::device_count().unwrap_or(0))
        .map_or(0, |n| n.max(0) as usize)
}

/// The wgpu backend cubecl opens adapters on here (Vulkan on Linux/Windows, Metal on macOS).
pub fn native_wgpu_backend() -> Backend {
    Backend::from_wgpu(<AutoGraphicsApi as GraphicsApi>::backend())
}

struct Adapter {
    info: wgpu::AdapterInfo,
    select: WgpuSelect,
}

fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    cubecl::future::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

/// The adapters cubecl can open, with the selector that opens each (cubecl counts
/// adapters per type in enumeration order on the native backend).
fn native_adapters() -> Vec<Adapter> {
    let backend = <AutoGraphicsApi as GraphicsApi>::backend();
    let mut counts = [0usize; 5];
    enumerate(backend.into())
        .into_iter()
        .filter_map(|info| {
            let t = AdapterType::from_wgpu(info.device_type);
            let n = counts[t.rank() as usize];
            counts[t.rank() as usize] += 1;
            let select = match t {
                AdapterType::Discrete => WgpuSelect::Discrete(n),
                AdapterType::Integrated => WgpuSelect::Integrated(n),
                AdapterType::Virtual => WgpuSelect::Virtual(n),
                AdapterType::Cpu if n == 0 => WgpuSelect::Cpu,
                _ => return None,
            };
            Some(Adapter { info, select })
        })
        .collect()
}

fn driver_string(info: &wgpu::AdapterInfo) -> String {
    match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (true, true) => "unknown".into(),
        (false, true) => info.driver.clone(),
        (true, false) => info.driver_info.clone(),
        (false, false) => format!("{} {}", info.driver, info.driver_info),
    }
}

/// Every adapter wgpu sees on every backend, marking the ones kiln can open.
pub fn list_wgpu_adapters() -> Vec<AdapterListing> {
    let native = native_adapters();
    let mut out: Vec<AdapterListing> = native
        .iter()
        .map(|a| AdapterListing {
            selector: Device::Wgpu(a.select).to_string(),
            name: a.info.name.clone(),
            backend: Backend::from_wgpu(a.info.backend),
            adapter_type: AdapterType::from_wgpu(a.info.device_type),
            driver: driver_string(&a.info),
            usable: true,
        })
        .collect();
    let native_backend = <AutoGraphicsApi as GraphicsApi>::backend();
    for info in enumerate(wgpu::Backends::all()) {
        if info.backend == native_backend {
            continue;
        }
        out.push(AdapterListing {
            selector: "-".into(),
            name: info.name.clone(),
            backend: Backend::from_wgpu(info.backend),
            adapter_type: AdapterType::from_wgpu(info.device_type),
            driver: driver_string(&info),
            usable: false,
        });
    }
    out
}

/// The concrete device `Auto` (or `Wgpu(Best)`) resolves to here, without opening it.
pub fn resolve(device: &Device) -> Result<Device> {
    match device {
        Device::Auto => {
            if cuda_device_count() > 0 {
                Ok(Device::Cuda(0))
            } else {
                resolve(&Device::Wgpu(WgpuSelect::Best))
            }
        }
        Device::Wgpu(WgpuSelect::Best) => native_adapters()
            .into_iter()
            .min_by_key(|a| AdapterType::from_wgpu(a.info.device_type).rank())
            .map(|a| Device::Wgpu(a.select))
            .ok_or_else(no_adapter),
        other => Ok(other.clone()),
    }
}

fn no_adapter() -> Error {
    Error::Device(format!(
        "no wgpu adapter on {:?} and no CUDA device; on Linux without a GPU install lavapipe: \
         apt-get install -y mesa-vulkan-drivers libvulkan1",
        native_wgpu_backend()
    ))
}

/// An open device: a cubecl client of the right runtime plus the device report.
#[derive(Clone)]
pub struct Client {
    /// The typed cubecl client.
    pub inner: ClientInner,
    report: Arc<DeviceReport>,
}

/// cubecl 0.10 has no type-erased client: one variant per runtime. Use
/// [`dispatch!`](crate::dispatch) to run generic `R: Runtime` code on it.
#[derive(Clone)]
pub enum ClientInner {
    /// wgpu (Vulkan, Metal, DX12, ...), kernels compiled to WGSL.
    Wgpu(ComputeClient<WgpuRuntime>),
    /// CUDA, kernels compiled to CUDA C++.
    Cuda(ComputeClient<CudaRuntime>),
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

fn report_from_props(
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
        plane_ops: !props.features.plane.is_empty(),
        plane_size: (hw.plane_size_min, hw.plane_size_max),
        max_shared_memory: hw.max_shared_memory_size,
        max_units_per_cube: hw.max_units_per_cube,
        max_cube_count: hw.max_cube_count,
        max_buffer_bytes: props.memory.max_page_size,
    }
}

/// The text of a panic payload (`String` or `&str`), for turning panics into errors.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl Client {
    /// Opens a device. `Auto` picks CUDA when usable, else the best wgpu adapter.
    pub fn open(device: &Device) -> Result<Client> {
        match resolve(device)? {
            Device::Cuda(i) => Self::open_cuda(i),
            Device::Wgpu(select) => Self::open_wgpu(select),
            Device::Auto => unreachable!("resolve never returns Auto"),
        }
    }

    /// Opens the device named by `KILN_DEVICE`, or `auto`.
    pub fn from_env() -> Result<Client> {
        Self::open(&Device::from_env()?)
    }

    fn open_cuda(index: usize) -> Result<Client> {
        let n = cuda_device_count();
        if index >= n {
            return Err(Error::Device(if n == 0 {
                "CUDA was asked for, but libcuda/NVRTC did not load or report no device".into()
            } else {
                format!("cuda:{index} asked for, but only {n} CUDA device(s) exist")
            }));
        }
        // cudarc loads driver symbols lazily and panics on a missing one: catch it.
        let (name, cc) = std::panic::catch_unwind(|| {
            cudarc::driver::CudaContext::new(index)
                .and_then(|ctx| Ok((ctx.name()?, ctx.compute_capability()?)))
        })
        .map_err(|p| Error::Device(format!("cuda:{index}: {}", panic_message(&*p))))?
        .map_err(|e| Error::Device(format!("cuda:{index}: {e}")))?;
        let client = std::panic::catch_unwind(|| CudaRuntime::client(&CudaDevice::new(index)))
            .map_err(|p| Error::Device(format!("cuda:{index}: {}", panic_message(&*p))))?;
        let report = report_from_props(
            format!("cuda:{index}"),
            name,
            Backend::Cuda,
            AdapterType::Discrete,
            format!("compute capability {}.{}", cc.0, cc.1),
            client.properties(),
        );
        Ok(Client {
            inner: ClientInner::Cuda(client),
            report: Arc::new(report),
        })
    }

    fn open_wgpu(select: WgpuSelect) -> Result<Client> {
        let adapters = native_adapters();
        let adapter = adapters
            .iter()
            .find(|a| a.select == select)
            .ok_or_else(|| {
                if adapters.is_empty() {
                    no_adapter()
                } else {
                    Error::Device(format!(
                        "no adapter {} (adapters: {})",
                        Device::Wgpu(select),
                        adapters
                            .iter()
                            .map(|a| format!("{} = {}", Device::Wgpu(a.select), a.info.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            })?;
        let wgpu_device = match select {
            WgpuSelect::Discrete(i) => WgpuDevice::DiscreteGpu(i),
            WgpuSelect::Integrated(i) => WgpuDevice::IntegratedGpu(i),
            WgpuSelect::Virtual(i) => WgpuDevice::VirtualGpu(i),
            WgpuSelect::Cpu => WgpuDevice::Cpu,
            WgpuSelect::Best => WgpuDevice::DefaultDevice,
        };
        let client = std::panic::catch_unwind(|| WgpuRuntime::client(&wgpu_device))
            .map_err(|p| Error::Device(format!("{}: {}", adapter.info.name, panic_message(&*p))))?;
        let report = report_from_props(
            Device::Wgpu(select).to_string(),
            adapter.info.name.clone(),
            Backend::from_wgpu(adapter.info.backend),
            AdapterType::from_wgpu(adapter.info.device_type),
            driver_string(&adapter.info),
            client.properties(),
        );
        Ok(Client {
            inner: ClientInner::Wgpu(client),
            report: Arc::new(report),
        })
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
