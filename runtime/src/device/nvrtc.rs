//! Compiling emitted CUDA C++ for an architecture with NVRTC, as cubecl-cuda does at
//! launch, and reading what ptxas reports of the result: registers, spills, stack and
//! shared memory per kernel. NVRTC assembles with its built-in ptxas when the target is
//! a real architecture (`sm_90a`), and `--ptxas-options=-v` prints the same lines the
//! stand-alone `ptxas -v` does, so no GPU, driver or `ptxas` binary is needed.

use crate::{Error, Result};
use serde::Serialize;
use std::fmt;

/// A CUDA architecture kiln compiles for: compute capability `major.minor`, written
/// `sm_80`, or `sm_90a` from 9.0 up (the architecture-specific features cubecl uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CudaArch {
    /// Compute capability, major.
    pub major: u32,
    /// Compute capability, minor.
    pub minor: u32,
}

impl CudaArch {
    /// Parses `sm_80`, `sm_90a`, `80`, `90a` or `8.0`.
    pub fn parse(s: &str) -> Result<CudaArch> {
        let t = s.trim();
        let t = t.strip_prefix("sm_").unwrap_or(t).trim_end_matches('a');
        let parsed = match t.split_once('.') {
            Some((a, b)) => a.parse().ok().zip(b.parse().ok()),
            // ASCII only: a byte split elsewhere could fall inside a character.
            None if t.len() >= 2 && t.is_ascii() => t[..t.len() - 1]
                .parse()
                .ok()
                .zip(t[t.len() - 1..].parse().ok()),
            None => None,
        };
        match parsed {
            Some((major, minor)) if (5..=12).contains(&major) => Ok(CudaArch { major, minor }),
            _ => Err(Error::Param {
                param: "--arch".into(),
                expected: "a CUDA architecture such as sm_80 or sm_90a".into(),
                found: s.into(),
            }),
        }
    }

    /// NVRTC's `--gpu-architecture` value, as cubecl-cuda passes it.
    pub fn nvrtc_name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for CudaArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = if self.major >= 9 { "a" } else { "" };
        write!(f, "sm_{}{}{a}", self.major, self.minor)
    }
}

/// What ptxas reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelUsage {
    /// The entry point.
    pub entry: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes per thread spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes per thread reloaded from spills.
    pub spill_loads: u32,
    /// Stack frame bytes per thread.
    pub stack_frame: u32,
    /// Static shared memory per cube, bytes.
    pub shared_bytes: u32,
}

impl KernelUsage {
    /// Whether the kernel spills registers to local memory.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }

    /// Parses the `ptxas -v` lines of a compile log (the first entry function).
    pub fn parse(log: &str) -> Option<KernelUsage> {
        let mut u = KernelUsage::default();
        let mut seen = false;
        for line in log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                if seen {
                    break;
                }
                u.entry = rest.split('\'').next().unwrap_or("").into();
            }
            let number_before = |unit: &str| -> Option<u32> {
                let i = line.find(unit)?;
                line[..i].split_whitespace().last()?.parse().ok()
            };
            if line.contains("bytes stack frame") {
                u.stack_frame = number_before("bytes stack frame").unwrap_or(0);
                u.spill_stores = number_before("bytes spill stores").unwrap_or(0);
                u.spill_loads = number_before("bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used ") && line.contains(" registers") {
                seen = true;
                u.registers = number_before(" registers").unwrap_or(0);
                u.shared_bytes = number_before(" bytes smem").unwrap_or(0);
            }
        }
        seen.then_some(u)
    }
}

/// The result of one NVRTC compile.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// ptxas's report of the kernel.
    pub usage: KernelUsage,
    /// NVRTC's log (warnings and the ptxas lines).
    pub log: String,
}

/// The toolkit prepared and NVRTC loaded, or why not (what to install).
#[cfg(feature = "cuda")]
fn loaded() -> Result<&'static super::toolkit::CudaToolkit> {
    let tk = super::toolkit::prepare().map_err(|e| Error::Unsupported {
        device: "this machine".into(),
        feature: format!("NVRTC compiles: {e}"),
    })?;
    // SAFETY: only dlopens the library, as probing does.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Unsupported {
            device: "this machine".into(),
            feature: format!(
                "NVRTC (libnvrtc.so.12 not found; {})",
                "pip install nvidia-cuda-nvrtc-cu12, or a CUDA toolkit"
            ),
        });
    }
    Ok(tk)
}

/// Compiles `source` for `arch` with NVRTC (found as [`super::toolkit`] says) and the
/// toolkit's headers; assembles with NVRTC's ptxas and returns its report. A compile
/// error returns its log as [`Error::Kernel`] naming `kernel`.
#[cfg(feature = "cuda")]
pub fn compile(kernel: &str, source: &str, arch: CudaArch) -> Result<Compiled> {
    use cudarc::nvrtc::result as nvrtc;
    let tk = loaded()?;
    let mut options = vec![
        format!("--gpu-architecture={}", arch.nvrtc_name()),
        "--ptxas-options=-v".to_string(),
        // Kernels are generated: their unused temporaries are not the reader's concern.
        "--disable-warnings".to_string(),
    ];
    options.extend(
        tk.include_dirs
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    let fail = |what: &str, e: &dyn fmt::Debug| Error::Kernel {
        kernel: kernel.into(),
        message: format!("NVRTC {what}: {e:?}"),
    };
    let text = std::ffi::CString::new(source).map_err(|e| fail("source", &e))?;
    let log_text = |prog| {
        // SAFETY: `prog` is a live program; the log is a NUL-terminated C string.
        unsafe { nvrtc::get_program_log(prog) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default()
    };
    let prog = nvrtc::create_program(&text, None).map_err(|e| fail("create", &e))?;
    // SAFETY: `prog` was created above and is destroyed once, below.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let log = log_text(prog);
    // SAFETY: as above.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    if compiled.is_err() {
        let first: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("error"))
            .take(3)
            .collect();
        return Err(Error::Kernel {
            kernel: kernel.into(),
            message: format!("NVRTC rejected it for {arch}: {}", first.join(" | ")),
        });
    }
    let usage = KernelUsage::parse(&log).ok_or_else(|| Error::Kernel {
        kernel: kernel.into(),
        message: format!("no ptxas report in NVRTC's log for {arch}"),
    })?;
    Ok(Compiled { usage, log })
}

/// The version of the NVRTC that [`compile`] uses, as `major.minor` (`12.9`): what a
/// record of earlier compiles must match to stand for a compile here.
#[cfg(feature = "cuda")]
pub fn version() -> Result<String> {
    loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters, written by NVRTC.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Unsupported {
            device: "this machine".into(),
            feature: format!("NVRTC's version ({status:?})"),
        });
    }
    Ok(format!("{major}.{minor}"))
}

/// NVRTC's version needs the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn version() -> Result<String> {
    Err(Error::Unsupported {
        device: "this build of kiln".into(),
        feature: "NVRTC (built without the `cuda` feature)".into(),
    })
}

/// Compiling needs NVRTC, which this build (without the `cuda` feature) cannot load.
#[cfg(not(feature = "cuda"))]
pub fn compile(kernel: &str, _source: &str, _arch: CudaArch) -> Result<Compiled> {
    Err(Error::Unsupported {
        device: "this build of kiln".into(),
        feature: format!("compiling `{kernel}` with NVRTC (built without the `cuda` feature)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for (s, name) in [
            ("sm_80", "sm_80"),
            ("90a", "sm_90a"),
            ("9.0", "sm_90a"),
            ("sm_86", "sm_86"),
        ] {
            assert_eq!(CudaArch::parse(s).expect(s).to_string(), name);
        }
        assert!(CudaArch::parse("sm_x").is_err());
        assert!(CudaArch::parse("sm_200").is_err());
    }

    #[test]
    fn parses_ptxas_lines() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'kiln_gla_fused_fwd_f32_BV_64' for 'sm_90a'\n\
ptxas info    : Function properties for kiln_gla_fused_fwd_f32_BV_64\n\
ptxas         .     1216 bytes stack frame, 3412 bytes spill stores, 3408 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 1216 bytes cumulative stack size, 4096 bytes smem, 400 bytes cmem[0]\n";
        let u = KernelUsage::parse(log).expect("report");
        assert_eq!(u.entry, "kiln_gla_fused_fwd_f32_BV_64");
        assert_eq!(
            (u.registers, u.spill_stores, u.spill_loads),
            (255, 3412, 3408)
        );
        assert_eq!((u.stack_frame, u.shared_bytes), (1216, 4096));
        assert!(u.spills());
        assert_eq!(KernelUsage::parse("nothing"), None);
    }
}
