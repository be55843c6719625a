//! Where the CUDA compiler pieces are: NVRTC (`libnvrtc.so.12`) and the CUDA headers
//! (`cuda_fp16.h`, `cuda_bf16.h`, `mma.h` with its `crt/mma.h`). A machine with a
//! driver and PyTorch but no CUDA toolkit is common, and cubecl-cuda 0.10 panics at its
//! first kernel compile when it finds no `<CUDA_PATH>/include`; kiln looks itself,
//! before opening a CUDA device, in this order:
//!
//! 1. `KILN_CUDA_INCLUDE`: include directories, `:`-separated;
//! 2. `CUDA_PATH`, `/usr/local/cuda`, `/opt/cuda`, `/usr` (`<root>/include`, `<root>/lib64`);
//! 3. NVIDIA's Python packages (CUDA 13: `nvidia-cuda-runtime`, `nvidia-cuda-crt`,
//!    `nvidia-cuda-nvrtc`, sharing `nvidia/cu13/`; CUDA 12: `nvidia-cuda-runtime-cu12`,
//!    `nvidia-cuda-nvcc-cu12`, `nvidia-cuda-nvrtc-cu12`) in `KILN_CUDA_TOOLKIT` (a
//!    `pip install --target` directory, what `scripts/install-cuda-toolkit` makes),
//!    `$VIRTUAL_ENV`, and the site-packages of `python3` on the `PATH` (`KILN_PYTHON`
//!    overrides).
//!
//! NVRTC is taken from beside the headers, else from any `nvidia/*/lib` of those
//! site-packages (PyTorch's wheels bring it, but not the headers), else from the
//! system's library search.
//!
//! A toolkit found outside `<CUDA_PATH>/include` is handed to cubecl as a directory of
//! links in kiln's cache (`cuda-root-<hash>/include`), through `CUDA_PATH`; NVRTC found
//! by path is loaded before cubecl asks for it by name.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The CUDA compiler pieces kiln found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CudaToolkit {
    /// Include directories that together hold the headers, in search order.
    pub include_dirs: Vec<PathBuf>,
    /// NVRTC's shared library by path, or `None` where the system's library search
    /// finds it by name (`libnvrtc.so`).
    pub nvrtc: Option<PathBuf>,
    /// Which rule found it: `KILN_CUDA_INCLUDE`, `CUDA_PATH`, `/usr/local/cuda`, or the
    /// Python packages' directory.
    pub found_by: String,
}

/// The one line a user reads when no headers were found.
pub const INSTALL_HINT: &str = "CUDA headers not found (looked in KILN_CUDA_INCLUDE, CUDA_PATH, /usr/local/cuda, /opt/cuda and NVIDIA's Python packages); install a CUDA toolkit or run `pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-nvrtc` (CUDA 13; for 12: `nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12`), or set KILN_CUDA_INCLUDE";

fn has_headers(dirs: &[PathBuf]) -> bool {
    let has = |rel: &str| dirs.iter().any(|d| d.join(rel).is_file());
    has("cuda_fp16.h") && has("cuda_bf16.h") && has("crt/mma.h")
}

/// The files of `dir` whose names start with one of `prefixes`, sorted by name.
fn named_in(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| prefixes.iter().any(|pre| n.starts_with(pre)))
        })
        .collect();
    found.sort();
    found
}

fn nvrtc_in(dir: &Path) -> Option<PathBuf> {
    named_in(dir, &["libnvrtc.so", "nvrtc64"])
        .into_iter()
        .next()
}

/// NVRTC's builtins library in the directory of `nvrtc` (`libnvrtc-builtins.so.13.0`
/// beside `libnvrtc.so.13`; not the `.alt` variant), if there.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn builtins_beside(nvrtc: &Path) -> Option<PathBuf> {
    named_in(nvrtc.parent()?, &["libnvrtc-builtins.so"]).pop()
}

/// The site-packages directories to look in for NVIDIA's Python packages.
pub(crate) fn python_sites(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut sites = Vec::new();
    if let Some(d) = env("KILN_CUDA_TOOLKIT") {
        sites.push(PathBuf::from(d));
    }
    if let Some(venv) = env("VIRTUAL_ENV") {
        if let Ok(libs) = std::fs::read_dir(Path::new(&venv).join("lib")) {
            sites.extend(
                libs.filter_map(|e| e.ok())
                    .map(|e| e.path().join("site-packages")),
            );
        }
    }
    // The active interpreter's own list (what `pip install` wrote to).
    let listed = std::process::Command::new(env("KILN_PYTHON").unwrap_or_else(|| "python3".into()))
        .args([
            "-c",
            "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = listed {
        if out.status.success() {
            sites.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(PathBuf::from),
            );
        }
    }
    sites
}

/// Searches as the module docs say, reading the environment through `env` (tests pass
/// their own): the headers, then NVRTC beside them or in the Python packages (`None`:
/// the system's library search). `Err` is [`INSTALL_HINT`] or names a bad
/// `KILN_CUDA_INCLUDE`.
pub fn find_with(env: &dyn Fn(&str) -> Option<String>) -> Result<CudaToolkit, String> {
    let mut sites: Option<Vec<PathBuf>> = None;
    let mut sites = || sites.get_or_insert_with(|| python_sites(env)).clone();
    let mut found = find_headers(env, &mut sites)?;
    if found.nvrtc.is_none() {
        // Headers from one place, NVRTC from another: PyTorch's wheels bring NVRTC
        // (`nvidia/cuda_nvrtc/lib`, `nvidia/cu13/lib`) but not the headers.
        found.nvrtc = sites().iter().find_map(|site| {
            let mut libs: Vec<PathBuf> = std::fs::read_dir(site.join("nvidia"))
                .ok()?
                .filter_map(|e| e.ok())
                .filter_map(|e| nvrtc_in(&e.path().join("lib")))
                .collect();
            libs.sort();
            libs.pop()
        });
    }
    Ok(found)
}

fn find_headers(
    env: &dyn Fn(&str) -> Option<String>,
    sites: &mut dyn FnMut() -> Vec<PathBuf>,
) -> Result<CudaToolkit, String> {
    if let Some(list) = env("KILN_CUDA_INCLUDE") {
        let dirs: Vec<PathBuf> = std::env::split_paths(&list).collect();
        if !has_headers(&dirs) {
            return Err(format!(
                "KILN_CUDA_INCLUDE={list} does not hold cuda_fp16.h, cuda_bf16.h and crt/mma.h"
            ));
        }
        return Ok(CudaToolkit {
            include_dirs: dirs,
            nvrtc: None,
            found_by: "KILN_CUDA_INCLUDE".into(),
        });
    }
    let mut roots: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = env("CUDA_PATH") {
        roots.push(("CUDA_PATH".into(), PathBuf::from(p)));
    }
    for p in ["/usr/local/cuda", "/opt/cuda", "/usr"] {
        roots.push((p.into(), PathBuf::from(p)));
    }
    for (by, root) in roots {
        let include = vec![root.join("include")];
        if has_headers(&include) {
            return Ok(CudaToolkit {
                include_dirs: include,
                nvrtc: nvrtc_in(&root.join("lib64")).or_else(|| nvrtc_in(&root.join("lib"))),
                found_by: by,
            });
        }
    }
    for site in sites() {
        let nv = site.join("nvidia");
        // CUDA 13's wheels share one `nvidia/cu13/{include,lib}` (`nvidia-cuda-runtime`,
        // `nvidia-cuda-crt`, `nvidia-cuda-nvrtc` 13.x); CUDA 12's keep one directory per
        // package. The newer layout first: headers and NVRTC of one release together.
        let cu13 = nv.join("cu13");
        let layouts: [(Vec<PathBuf>, PathBuf); 2] = [
            (vec![cu13.join("include")], cu13.join("lib")),
            (
                ["cuda_runtime", "cuda_nvcc", "cuda_nvrtc"]
                    .iter()
                    .map(|p| nv.join(p).join("include"))
                    .filter(|d| d.is_dir())
                    .collect(),
                nv.join("cuda_nvrtc").join("lib"),
            ),
        ];
        for (dirs, lib) in layouts {
            if has_headers(&dirs) {
                return Ok(CudaToolkit {
                    include_dirs: dirs,
                    nvrtc: nvrtc_in(&lib),
                    found_by: format!("Python packages in {}", site.display()),
                });
            }
        }
    }
    // A KILN_CUDA_TOOLKIT that was set but held nothing is named: it is what the user
    // meant to be used.
    match env("KILN_CUDA_TOOLKIT") {
        Some(tk) => Err(format!(
            "KILN_CUDA_TOOLKIT={tk} holds no CUDA headers (no nvidia/cu13/include or nvidia/cuda_runtime/include with cuda_fp16.h, cuda_bf16.h and crt/mma.h); {INSTALL_HINT}"
        )),
        None => Err(INSTALL_HINT.into()),
    }
}

/// The toolkit of this process, searched once (see the module docs).
pub fn find() -> Result<&'static CudaToolkit, String> {
    static FOUND: OnceLock<Result<CudaToolkit, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_with(&|k| std::env::var(k).ok().filter(|v| !v.is_empty())))
        .as_ref()
        .map_err(Clone::clone)
}

impl CudaToolkit {
    /// A directory whose `include/` holds every header (what cubecl reads from
    /// `CUDA_PATH`): the toolkit root itself, or a directory of links in `cache`.
    pub fn cuda_root(&self, cache: &Path) -> std::io::Result<PathBuf> {
        if let [one] = self.include_dirs.as_slice() {
            if one.file_name().is_some_and(|n| n == "include") {
                if let Some(root) = one.parent() {
                    return Ok(root.to_path_buf());
                }
            }
        }
        let key = crate::tune::fnv1a_hex(&format!("{:?}", self.include_dirs));
        let root = cache.join(format!("cuda-root-{key}"));
        let include = root.join("include");
        if include.is_dir() {
            return Ok(root);
        }
        // Built beside and renamed into place, so a concurrent process never sees half.
        let staging = cache.join(format!("cuda-root-{key}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("include"))?;
        for dir in &self.include_dirs {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let link = staging.join("include").join(entry.file_name());
                if !link.exists() {
                    symlink(&entry.path(), &link)?;
                }
            }
        }
        match std::fs::rename(&staging, &root) {
            Ok(()) => Ok(root),
            Err(_) if include.is_dir() => {
                let _ = std::fs::remove_dir_all(&staging);
                Ok(root)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::copy(target, link).map(|_| ())
}

/// Finds the toolkit and makes it visible to cubecl and cudarc: loads NVRTC by path
/// (cudarc then finds it by name) and sets `CUDA_PATH` to a root whose `include/`
/// holds the headers. Call before opening a CUDA device; once per process.
pub fn prepare() -> Result<&'static CudaToolkit, String> {
    static PREPARED: OnceLock<Result<(), String>> = OnceLock::new();
    let tk = find()?;
    PREPARED
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            if let Some(lib) = &tk.nvrtc {
                // NVRTC opens its builtins (`libnvrtc-builtins.so.13.0`) by name at its
                // first compile, which fails where its directory is on no library path
                // (NVIDIA's wheels, a toolkit outside ld.so.conf): loaded here by path
                // first, the by-name open finds it by soname.
                for l in builtins_beside(lib).iter().chain([lib]) {
                    // SAFETY: loading NVRTC runs no initialiser with preconditions; the
                    // library stays loaded for the process (cudarc holds it by soname).
                    match unsafe { libloading::Library::new(l) } {
                        Ok(l) => std::mem::forget(l),
                        Err(e) => return Err(format!("NVRTC at {}: {e}", l.display())),
                    }
                }
            }
            let root = tk
                .cuda_root(&crate::tune::default_cache_dir())
                .map_err(|e| format!("linking the CUDA headers for cubecl: {e}"))?;
            if std::env::var_os("CUDA_PATH").map(PathBuf::from) != Some(root.clone()) {
                // Read by cubecl-cuda at each kernel compile; set before any is opened.
                std::env::set_var("CUDA_PATH", &root);
            }
            Ok(())
        })
        .clone()
        .map(|()| tk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty files at `dir/rel` for each `rel`, with their directories.
    fn touch(dir: &Path, rels: &[&str]) {
        for rel in rels {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, "").expect("write");
        }
    }

    /// CUDA 12's wheels: one directory per package.
    fn fake_pip_site(dir: &Path) {
        touch(
            &dir.join("nvidia"),
            &[
                "cuda_runtime/include/cuda_fp16.h",
                "cuda_runtime/include/cuda_bf16.h",
                "cuda_runtime/include/mma.h",
                "cuda_nvcc/include/crt/mma.h",
                "cuda_nvrtc/lib/libnvrtc.so.12",
            ],
        );
    }

    /// The environment of a search in the packages at `site` alone: no CUDA_PATH, and
    /// KILN_PYTHON pointing at nothing so only KILN_CUDA_TOOLKIT counts.
    fn only_packages_at(site: &Path) -> impl Fn(&str) -> Option<String> {
        let site = site.display().to_string();
        move |k: &str| match k {
            "KILN_CUDA_TOOLKIT" => Some(site.clone()),
            "KILN_PYTHON" => Some("/nonexistent/python".into()),
            _ => None,
        }
    }

    #[test]
    fn finds_pip_packages_without_cuda_path_and_links_one_root() {
        let tmp = std::env::temp_dir().join(format!("kiln-tk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        fake_pip_site(&tmp.join("site"));
        let tk = find_with(&only_packages_at(&tmp.join("site"))).expect("found");
        assert!(
            tk.found_by.starts_with("Python packages"),
            "{}",
            tk.found_by
        );
        assert_eq!(tk.include_dirs.len(), 2);
        assert!(tk
            .nvrtc
            .as_ref()
            .is_some_and(|p| p.ends_with("libnvrtc.so.12")));
        let root = tk.cuda_root(&tmp.join("cache")).expect("root");
        for h in ["cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h"] {
            assert!(root.join("include").join(h).is_file(), "{h}");
        }
        // A second call reuses the linked root.
        assert_eq!(tk.cuda_root(&tmp.join("cache")).expect("again"), root);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn finds_cuda_13_wheels_sharing_one_directory() {
        let tmp = std::env::temp_dir().join(format!("kiln-tk13-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        // A CUDA 12 layout in the same site too: the CUDA 13 one wins, with its NVRTC.
        fake_pip_site(&tmp.join("site"));
        let cu13 = tmp.join("site/nvidia/cu13");
        touch(
            &cu13,
            &[
                "include/cuda_fp16.h",
                "include/cuda_bf16.h",
                "include/mma.h",
                "include/crt/mma.h",
                "lib/libnvrtc.so.13",
            ],
        );
        let tk = find_with(&only_packages_at(&tmp.join("site"))).expect("found");
        assert_eq!(tk.include_dirs, vec![cu13.join("include")]);
        assert_eq!(tk.nvrtc, Some(cu13.join("lib/libnvrtc.so.13")));
        // One include directory named `include`: its parent is the root cubecl reads.
        assert_eq!(tk.cuda_root(&tmp.join("cache")).expect("root"), cu13);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn headers_from_kiln_cuda_include_and_nvrtc_from_pytorchs_wheels() {
        let tmp = std::env::temp_dir().join(format!("kiln-tk2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        fake_pip_site(&tmp.join("headers"));
        touch(
            &tmp,
            &["venv/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13"],
        );
        let nv = tmp.join("headers/nvidia");
        let include = std::env::join_paths([
            nv.join("cuda_runtime/include"),
            nv.join("cuda_nvcc/include"),
        ])
        .expect("paths")
        .into_string()
        .expect("utf-8");
        let venv = tmp.join("venv").display().to_string();
        let env = |k: &str| match k {
            "KILN_CUDA_INCLUDE" => Some(include.clone()),
            "VIRTUAL_ENV" => Some(venv.clone()),
            "KILN_PYTHON" => Some("/nonexistent/python".into()),
            _ => None,
        };
        let tk = find_with(&env).expect("found");
        assert_eq!(tk.found_by, "KILN_CUDA_INCLUDE");
        assert!(
            tk.nvrtc
                .as_ref()
                .is_some_and(|p| p.ends_with("cu13/lib/libnvrtc.so.13")),
            "{tk:?}"
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn nvrtc_builtins_are_found_beside_nvrtc_not_their_alt_variant() {
        let tmp = std::env::temp_dir().join(format!("kiln-tk-b-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        touch(
            &tmp,
            &[
                "libnvrtc.so.13",
                "libnvrtc-builtins.so.13.0",
                "libnvrtc-builtins.alt.so.13.0",
            ],
        );
        assert_eq!(
            builtins_beside(&tmp.join("libnvrtc.so.13")),
            Some(tmp.join("libnvrtc-builtins.so.13.0"))
        );
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(builtins_beside(&tmp.join("libnvrtc.so.13")), None);
    }

    #[test]
    fn nothing_found_is_one_clear_line() {
        let env = |k: &str| match k {
            "KILN_PYTHON" => Some("/nonexistent/python".into()),
            "CUDA_PATH" => Some("/nonexistent/cuda".into()),
            _ => None,
        };
        if ["/usr/local/cuda", "/opt/cuda", "/usr"]
            .iter()
            .any(|r| Path::new(r).join("include/cuda_fp16.h").exists())
        {
            return; // a machine with a toolkit: nothing to refuse
        }
        let e = find_with(&env).expect_err("nothing there");
        assert!(e.contains("pip install nvidia-cuda-runtime"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn incomplete_kiln_cuda_include_is_named() {
        let env = |k: &str| (k == "KILN_CUDA_INCLUDE").then(|| "/nonexistent/include".to_string());
        let e = find_with(&env).expect_err("incomplete");
        assert!(
            e.starts_with("KILN_CUDA_INCLUDE=/nonexistent/include"),
            "{e}"
        );
    }
}
