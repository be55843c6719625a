//! The wgpu backend (cargo feature `wgpu`): adapter enumeration on the platform's
//! native API and opening an adapter. Without the feature there are no adapters.

#[cfg(not(feature = "wgpu"))]
use super::Device;
use super::{AdapterListing, Backend, Client, WgpuSelect};
use crate::Result;

#[cfg(feature = "wgpu")]
mod enabled {
    use super::super::{no_adapter, report_from_props, AdapterType, ClientInner, Device};
    use super::*;
    use crate::{panic_message, Error};
    use cubecl::prelude::Runtime;
    use cubecl::wgpu::{AutoGraphicsApi, GraphicsApi, WgpuDevice, WgpuRuntime};
    use std::sync::Arc;

    fn backend_from_wgpu(b: wgpu::Backend) -> Backend {
        {
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

    fn adapter_type_from_wgpu(t: wgpu::DeviceType) -> AdapterType {
        match t {
            wgpu::DeviceType::DiscreteGpu => AdapterType::Discrete,
            wgpu::DeviceType::IntegratedGpu => AdapterType::Integrated,
            wgpu::DeviceType::VirtualGpu => AdapterType::Virtual,
            wgpu::DeviceType::Cpu => AdapterType::Cpu,
            wgpu::DeviceType::Other => AdapterType::Other,
        }
    }

    /// The wgpu backend cubecl opens adapters on here (Vulkan on Linux/Windows, Metal on macOS).
    pub fn native_wgpu_backend() -> Option<Backend> {
        Some(backend_from_wgpu(
            <AutoGraphicsApi as GraphicsApi>::backend(),
        ))
    }

    struct Adapter {
        info: wgpu::AdapterInfo,
        /// wgpu's `SUBGROUP` feature, which cubecl requests on every device it opens
        /// (all the adapter's features) but reports as plane operations only off CPU
        /// adapters.
        subgroups: bool,
        select: WgpuSelect,
    }

    fn enumerate(backends: wgpu::Backends) -> Vec<(wgpu::AdapterInfo, wgpu::Features)> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        cubecl::future::block_on(instance.enumerate_adapters(backends))
            .into_iter()
            .map(|a| (a.get_info(), a.features()))
            .collect()
    }

    /// The adapters cubecl can open, with the selector that opens each (cubecl counts
    /// adapters per type in enumeration order on the native backend).
    fn native_adapters() -> Vec<Adapter> {
        let backend = <AutoGraphicsApi as GraphicsApi>::backend();
        let mut counts = [0usize; 5];
        enumerate(backend.into())
            .into_iter()
            .filter_map(|(info, features)| {
                let t = adapter_type_from_wgpu(info.device_type);
                let n = counts[t.rank() as usize];
                counts[t.rank() as usize] += 1;
                let select = match t {
                    AdapterType::Discrete => WgpuSelect::Discrete(n),
                    AdapterType::Integrated => WgpuSelect::Integrated(n),
                    AdapterType::Virtual => WgpuSelect::Virtual(n),
                    AdapterType::Cpu if n == 0 => WgpuSelect::Cpu,
                    _ => return None,
                };
                let subgroups = features.contains(wgpu::Features::SUBGROUP);
                Some(Adapter {
                    info,
                    subgroups,
                    select,
                })
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
                backend: backend_from_wgpu(a.info.backend),
                adapter_type: adapter_type_from_wgpu(a.info.device_type),
                driver: driver_string(&a.info),
                usable: true,
            })
            .collect();
        let native_backend = <AutoGraphicsApi as GraphicsApi>::backend();
        for (info, _) in enumerate(wgpu::Backends::all()) {
            if info.backend == native_backend {
                continue;
            }
            out.push(AdapterListing {
                selector: "-".into(),
                name: info.name.clone(),
                backend: backend_from_wgpu(info.backend),
                adapter_type: adapter_type_from_wgpu(info.device_type),
                driver: driver_string(&info),
                usable: false,
            });
        }
        out
    }

    /// Launches cubecl records before it submits them (its `tasks_max`) on a CPU adapter.
    /// cubecl's default, 32, submits every 32 launches and runs its memory cleanup at each
    /// submission; on lavapipe that cost launch-heavy operators queued without a sync
    /// about a fifth of their time (exact top-k of 4M elements, ten calls a sync, in the
    /// `compress_perturb_interleaved` bench: 71.2 against 52.6 ms a call; the operators
    /// of a few long launches alike at both). GPUs keep cubecl's default.
    const CPU_TASKS_MAX: usize = 4096;

    /// The cubecl client of `device`; on a CPU adapter registered first with
    /// [`CPU_TASKS_MAX`] (once per device in the process, and not where
    /// `CUBECL_WGPU_MAX_TASKS` sets it).
    fn client_of(device: &WgpuDevice, cpu: bool) -> cubecl::prelude::ComputeClient<WgpuRuntime> {
        static CONFIGURED: std::sync::Mutex<Vec<WgpuDevice>> = std::sync::Mutex::new(Vec::new());
        if cpu && std::env::var_os("CUBECL_WGPU_MAX_TASKS").is_none() {
            let mut configured = CONFIGURED.lock().unwrap_or_else(|e| e.into_inner());
            if !configured.contains(device) {
                configured.push(device.clone());
                let options = cubecl::wgpu::RuntimeOptions {
                    tasks_max: CPU_TASKS_MAX,
                    ..Default::default()
                };
                // cubecl refuses (panics) where something else in the process loaded the
                // device first: its server then stays as it is.
                let init = || cubecl::wgpu::init_setup::<AutoGraphicsApi>(device, options);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(init));
            }
        }
        WgpuRuntime::client(device)
    }

    pub(crate) fn open(select: WgpuSelect) -> Result<Client> {
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
        let cpu = adapter.info.device_type == wgpu::DeviceType::Cpu;
        let client = std::panic::catch_unwind(|| client_of(&wgpu_device, cpu))
            .map_err(|p| Error::Device(format!("{}: {}", adapter.info.name, panic_message(&*p))))?;
        let mut report = report_from_props(
            Device::Wgpu(select).to_string(),
            adapter.info.name.clone(),
            backend_from_wgpu(adapter.info.backend),
            adapter_type_from_wgpu(adapter.info.device_type),
            driver_string(&adapter.info),
            client.properties(),
        );
        report.plane_shuffle |= adapter.subgroups;
        Ok(Client {
            inner: ClientInner::Wgpu(client),
            report: Arc::new(report),
            empty: Default::default(),
        })
    }

    /// The adapter `wgpu` (best) resolves to: discrete before integrated, virtual, CPU.
    pub(crate) fn best() -> Option<WgpuSelect> {
        native_adapters()
            .into_iter()
            .min_by_key(|a| adapter_type_from_wgpu(a.info.device_type).rank())
            .map(|a| a.select)
    }
}
#[cfg(feature = "wgpu")]
pub(super) use enabled::{best, open};
#[cfg(feature = "wgpu")]
pub use enabled::{list_wgpu_adapters, native_wgpu_backend};

/// The wgpu backend cubecl would open adapters on: none in a build without `wgpu`.
#[cfg(not(feature = "wgpu"))]
pub fn native_wgpu_backend() -> Option<Backend> {
    None
}

/// Every adapter wgpu sees: none in a build without the `wgpu` feature.
#[cfg(not(feature = "wgpu"))]
pub fn list_wgpu_adapters() -> Vec<AdapterListing> {
    Vec::new()
}

#[cfg(not(feature = "wgpu"))]
pub(super) fn best() -> Option<WgpuSelect> {
    None
}

#[cfg(not(feature = "wgpu"))]
pub(crate) fn open(select: WgpuSelect) -> Result<Client> {
    Err(crate::Error::Device(format!(
        "{}: this build of kiln has no wgpu backend (built without the `wgpu` feature)",
        Device::Wgpu(select)
    )))
}
