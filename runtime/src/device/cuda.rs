//! The CUDA backend (cargo feature `cuda`): probing that never panics, and opening a
//! device. Without the feature, CUDA reports no device and refuses to open one.

use super::Client;
use crate::Result;

#[cfg(feature = "cuda")]
mod enabled {
    use super::super::{report_from_props, AdapterType, Backend, ClientInner};
    use super::*;
    use crate::{panic_message, Error};
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use cubecl::prelude::Runtime;
    use std::sync::Arc;

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

    pub(crate) fn open(index: usize) -> Result<Client> {
        let n = cuda_device_count();
        if index >= n {
            return Err(Error::Device(if n == 0 {
                "CUDA was asked for, but libcuda/NVRTC did not load or report no device".into()
            } else {
                format!("cuda:{index} asked for, but only {n} CUDA device(s) exist")
            }));
        }
        // cubecl compiles every kernel with NVRTC and the CUDA headers: find them first
        // (cubecl-cuda 0.10 panics at the first compile when it finds none).
        super::super::toolkit::prepare()
            .map_err(|e| Error::Device(format!("cuda:{index}: {e}")))?;
        // cudarc loads driver symbols lazily and panics on a missing one: catch it.
        let (name, cc) = std::panic::catch_unwind(|| {
            cudarc::driver::CudaContext::new(index)
                .and_then(|ctx| Ok((ctx.name()?, ctx.compute_capability()?)))
        })
        .map_err(|p| Error::Device(format!("cuda:{index}: {}", panic_message(&*p))))?
        .map_err(|e| Error::Device(format!("cuda:{index}: {e}")))?;
        let client = std::panic::catch_unwind(|| CudaRuntime::client(&CudaDevice::new(index)))
            .map_err(|p| Error::Device(format!("cuda:{index}: {}", panic_message(&*p))))?;
        let mut report = report_from_props(
            format!("cuda:{index}"),
            name,
            Backend::Cuda,
            AdapterType::Discrete,
            format!("compute capability {}.{}", cc.0, cc.1),
            client.properties(),
        );
        report.compute_capability = Some((cc.0 as u32, cc.1 as u32));
        // cubecl lists s8 fragments from 7.0 on; `wmma` has them from 7.2.
        report.int8_tensor_cores &= (cc.0, cc.1) >= (7, 2);
        Ok(Client {
            inner: ClientInner::Cuda(client),
            report: Arc::new(report),
            empty: Default::default(),
        })
    }
}
#[cfg(feature = "cuda")]
pub use enabled::cuda_device_count;
#[cfg(feature = "cuda")]
pub(super) use enabled::open;

/// Whether the CUDA driver and NVRTC load and at least one device exists: never, in a
/// build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> usize {
    0
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn open(index: usize) -> Result<Client> {
    Err(crate::Error::Device(format!(
        "cuda:{index}: this build of kiln has no CUDA backend (built without the `cuda` feature)"
    )))
}
