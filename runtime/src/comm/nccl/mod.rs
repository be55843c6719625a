//! NCCL: the engine of [`NcclComm`] on NVIDIA GPUs, single- and multi-node.
//!
//! kiln loads `libnccl.so.2` at run time, like the rest of CUDA, and looks for it in
//! this order: `KILN_NCCL_LIB` (the library's path); NVIDIA's Python package
//! `nvidia-nccl-cu12` or `-cu13` (`nvidia/nccl/lib/libnccl.so.2`) in `KILN_CUDA_TOOLKIT`,
//! `$VIRTUAL_ENV` and `python3`'s site-packages; the system's library search. Without
//! it, every NCCL entry point returns one error that says what to install
//! ([`NCCL_HINT`]). Querying the version and making a unique id need no GPU.
//!
//! Ranks of one communicator meet through a [`NcclId`]: one process makes it
//! (`kiln nccl-id`, or [`NcclId::new`]), every rank receives it as a hex string
//! (`KILN_NCCL_ID`, with `KILN_RANK` and `KILN_WORLD_SIZE`: [`RankEnv`]), so any
//! launcher (Slurm, mpirun, torchrun-style scripts) can start kiln ranks.

#[cfg(feature = "cuda")]
mod comm;
#[cfg(feature = "cuda")]
mod ffi;

#[cfg(feature = "cuda")]
pub use comm::NcclComm;

use crate::{Error, Result};
use std::fmt;
use std::path::PathBuf;

/// The one line a user reads when NCCL is not there.
pub const NCCL_HINT: &str = "NCCL (libnccl.so.2) not found (looked in KILN_NCCL_LIB, NVIDIA's Python packages and the system's library path); run `pip install nvidia-nccl-cu12` (`nvidia-nccl-cu13` for CUDA 13; or set KILN_NCCL_LIB to the library's path)";

/// Where kiln found NCCL.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NcclLocation {
    /// The library by path; `None`: the system's library search, by name.
    pub path: Option<PathBuf>,
    /// Which rule found it.
    pub found_by: String,
}

/// Searches as the module docs say, reading the environment through `env` (tests pass
/// their own). `Err`: `KILN_NCCL_LIB` names no file.
pub fn find_nccl_with(env: &dyn Fn(&str) -> Option<String>) -> Result<NcclLocation, String> {
    if let Some(p) = env("KILN_NCCL_LIB") {
        let path = PathBuf::from(&p);
        if !path.is_file() {
            return Err(format!("KILN_NCCL_LIB={p}: no such file"));
        }
        return Ok(NcclLocation {
            path: Some(path),
            found_by: "KILN_NCCL_LIB".into(),
        });
    }
    let sites = crate::device::toolkit::python_sites(env);
    for site in sites {
        let lib = site
            .join("nvidia")
            .join("nccl")
            .join("lib")
            .join("libnccl.so.2");
        if lib.is_file() {
            return Ok(NcclLocation {
                path: Some(lib),
                found_by: format!("Python packages in {}", site.display()),
            });
        }
    }
    Ok(NcclLocation {
        path: None,
        found_by: "the system's library search".into(),
    })
}

/// NCCL's version, as `ncclGetVersion` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct NcclVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `NCCL_VERSION_CODE`: `X*10000 + Y*100 + Z` from 2.9 on, `X*1000 + Y*100
    /// + Z` before.
    pub fn from_code(code: u32) -> NcclVersion {
        let (major, rest) = if code >= 10000 {
            (code / 10000, code % 10000)
        } else {
            (code / 1000, code % 1000)
        };
        NcclVersion {
            major,
            minor: rest / 100,
            patch: rest % 100,
        }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Loads NCCL (once per process) and returns its version and where it was found.
/// Needs no GPU.
pub fn nccl_version() -> Result<(NcclVersion, NcclLocation)> {
    #[cfg(feature = "cuda")]
    {
        let lib = ffi::nccl().map_err(Error::Device)?;
        Ok((lib.version()?, lib.location.clone()))
    }
    #[cfg(not(feature = "cuda"))]
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::Device(
        "NCCL: this build of kiln has no CUDA backend (built without the `cuda` feature)".into(),
    )
}

/// The unique id that ranks of one NCCL communicator share (NCCL's `ncclUniqueId`,
/// 128 bytes), written as 256 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl NcclId {
    /// A fresh id from NCCL (`ncclGetUniqueId`: it also picks the network interface
    /// rank 0 listens on, so make it on the machine of rank 0). Needs no GPU.
    pub fn new() -> Result<NcclId> {
        #[cfg(feature = "cuda")]
        {
            ffi::nccl().map_err(Error::Device)?.unique_id()
        }
        #[cfg(not(feature = "cuda"))]
        Err(no_cuda())
    }

    /// Parses the 256 hex digits [`Display`](fmt::Display) writes.
    pub fn parse(s: &str) -> Result<NcclId> {
        let s = s.trim();
        let bad = || Error::Param {
            param: "nccl id".into(),
            expected: "256 hex digits (what `kiln nccl-id` prints)".into(),
            found: if s.len() > 40 {
                format!(
                    "{}... ({} characters)",
                    s.chars().take(40).collect::<String>(),
                    s.len()
                )
            } else {
                s.into()
            },
        };
        if s.len() != 256 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 128];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NcclId(id))
    }
}

impl fmt::Display for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId({self})")
    }
}

/// One rank's place in a multi-process communicator, as a launcher passes it:
/// `KILN_NCCL_ID` (from `kiln nccl-id`), `KILN_RANK`, `KILN_WORLD_SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// The communicator's id.
    pub id: NcclId,
    /// This rank, in `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
}

impl RankEnv {
    /// Reads the three variables of this process.
    pub fn from_env() -> Result<RankEnv> {
        Self::from_env_with(&|k| std::env::var(k).ok())
    }

    /// Reads the three variables through `env` (tests pass their own); each missing
    /// or malformed one is named.
    pub fn from_env_with(env: &dyn Fn(&str) -> Option<String>) -> Result<RankEnv> {
        let var = |k: &str, expected: &str| {
            env(k)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| Error::Param {
                    param: k.into(),
                    expected: expected.into(),
                    found: "nothing (the variable is not set)".into(),
                })
        };
        let number = |k: &str| -> Result<usize> {
            let v = var(k, "a non-negative integer")?;
            v.trim().parse().map_err(|_| Error::Param {
                param: k.into(),
                expected: "a non-negative integer".into(),
                found: v,
            })
        };
        let id = NcclId::parse(&var("KILN_NCCL_ID", "256 hex digits from `kiln nccl-id`")?)
            .map_err(|e| match e {
                Error::Param {
                    expected, found, ..
                } => Error::Param {
                    param: "KILN_NCCL_ID".into(),
                    expected,
                    found,
                },
                e => e,
            })?;
        let rank = number("KILN_RANK")?;
        let world_size = number("KILN_WORLD_SIZE")?;
        // NCCL counts ranks in a C int.
        if world_size > i32::MAX as usize {
            return Err(Error::Param {
                param: "KILN_WORLD_SIZE".into(),
                expected: format!("1 ..= {}", i32::MAX),
                found: world_size.to_string(),
            });
        }
        if world_size == 0 || rank >= world_size {
            return Err(Error::Param {
                param: "KILN_RANK".into(),
                expected: format!("a rank in 0..{world_size} (KILN_WORLD_SIZE={world_size})"),
                found: rank.to_string(),
            });
        }
        Ok(RankEnv {
            id,
            rank,
            world_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_before_and_after_2_9() {
        assert_eq!(NcclVersion::from_code(22602).to_string(), "2.26.2");
        assert_eq!(NcclVersion::from_code(2804).to_string(), "2.8.4");
        assert_eq!(NcclVersion::from_code(21903).to_string(), "2.19.3");
    }

    #[test]
    fn ids_round_trip_through_hex_and_bad_ones_are_named() {
        let mut raw = [0u8; 128];
        raw.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 37 + 5) as u8);
        let id = NcclId(raw);
        let hex = id.to_string();
        assert_eq!(hex.len(), 256);
        assert_eq!(NcclId::parse(&format!(" {hex}\n")).expect("parse"), id);
        let e = NcclId::parse(&hex[..200]).expect_err("short").to_string();
        assert!(
            e.contains("256 hex digits") && e.contains("200 characters"),
            "{e}"
        );
        let e = NcclId::parse(&format!("zz{}", &hex[2..]))
            .expect_err("not hex")
            .to_string();
        assert!(e.contains("256 hex digits"), "{e}");
    }

    #[test]
    fn rank_env_names_each_missing_or_bad_variable() {
        let hex = NcclId([7; 128]).to_string();
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            RankEnv::from_env_with(&move |k| {
                vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
            })
        };
        let ok = with(&[
            ("KILN_NCCL_ID", &hex),
            ("KILN_RANK", "2"),
            ("KILN_WORLD_SIZE", "4"),
        ])
        .expect("complete");
        assert_eq!((ok.rank, ok.world_size, ok.id), (2, 4, NcclId([7; 128])));
        let e = with(&[("KILN_RANK", "0"), ("KILN_WORLD_SIZE", "1")]).expect_err("no id");
        assert!(
            e.to_string().contains("KILN_NCCL_ID") && e.to_string().contains("not set"),
            "{e}"
        );
        let e = with(&[
            ("KILN_NCCL_ID", "abc"),
            ("KILN_RANK", "0"),
            ("KILN_WORLD_SIZE", "1"),
        ])
        .expect_err("bad id");
        assert!(e.to_string().starts_with("parameter `KILN_NCCL_ID`"), "{e}");
        let e = with(&[
            ("KILN_NCCL_ID", &hex),
            ("KILN_RANK", "x"),
            ("KILN_WORLD_SIZE", "1"),
        ])
        .expect_err("bad rank");
        assert!(
            e.to_string().contains("KILN_RANK") && e.to_string().contains("`x`"),
            "{e}"
        );
        let e = with(&[
            ("KILN_NCCL_ID", &hex),
            ("KILN_RANK", "4"),
            ("KILN_WORLD_SIZE", "4"),
        ])
        .expect_err("rank out of range");
        assert!(e.to_string().contains("0..4"), "{e}");
        let e = with(&[("KILN_NCCL_ID", &hex), ("KILN_RANK", "0")]).expect_err("no world");
        assert!(e.to_string().contains("KILN_WORLD_SIZE"), "{e}");
    }

    #[test]
    fn a_kiln_nccl_lib_that_names_no_file_is_an_error_naming_it() {
        let env = |k: &str| (k == "KILN_NCCL_LIB").then(|| "/nonexistent/libnccl.so.2".to_string());
        let e = find_nccl_with(&env).expect_err("missing");
        assert_eq!(e, "KILN_NCCL_LIB=/nonexistent/libnccl.so.2: no such file");
    }

    #[test]
    fn the_python_package_is_found_under_kiln_cuda_toolkit() {
        let dir = std::env::temp_dir().join(format!("kiln-nccl-find-{}", std::process::id()));
        let lib = dir.join("nvidia/nccl/lib/libnccl.so.2");
        std::fs::create_dir_all(lib.parent().expect("parent")).expect("mkdir");
        std::fs::write(&lib, b"").expect("write");
        let d = dir.display().to_string();
        let env = move |k: &str| match k {
            "KILN_CUDA_TOOLKIT" => Some(d.clone()),
            "KILN_PYTHON" => Some("/nonexistent/python".into()),
            _ => None,
        };
        let found = find_nccl_with(&env).expect("found");
        assert_eq!(found.path.as_deref(), Some(lib.as_path()));
        assert!(
            found.found_by.starts_with("Python packages in"),
            "{found:?}"
        );
        // Nothing anywhere: the system's search by name is what is left.
        let env = |k: &str| (k == "KILN_PYTHON").then(|| "/nonexistent/python".to_string());
        assert_eq!(find_nccl_with(&env).expect("system").path, None);
        std::fs::remove_dir_all(&dir).ok();
    }
}
