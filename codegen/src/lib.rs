//! kiln-codegen: kernel x config x target -> source text and a manifest, with no device.
//!
//! cubecl 0.10's launch path needs a live client to define a kernel; this crate replays
//! that definition on a `KernelBuilder` configured with the target's properties and
//! hand-made device properties, then runs cubecl's own WGSL or CUDA C++ compiler.
//! Uses kiln-runtime's registry types; knows nothing of the operator library itself.

pub mod cuda_check;

use cubecl::prelude::{AddressType, KernelBuilder};
use cubecl::server::ExecutionMode;
use cubecl::Compiler;
use kiln_runtime::{Error, KernelConfig, KernelSpec, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// A source language kiln emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// CUDA C++ for NVRTC (what the CUDA runtime compiles).
    Cuda,
    /// WGSL for wgpu (Vulkan, Metal, DX12, browsers).
    Wgsl,
}

impl Target {
    /// Parses `cuda` or `wgsl`.
    pub fn parse(s: &str) -> Result<Target> {
        match s {
            "cuda" => Ok(Target::Cuda),
            "wgsl" => Ok(Target::Wgsl),
            _ => Err(Error::Unknown {
                kind: "target",
                name: s.into(),
                known: "cuda, wgsl".into(),
            }),
        }
    }
}

/// What a caller needs to launch emitted source.
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    /// The registered kernel's name.
    pub kernel: String,
    /// The target language.
    pub target: Target,
    /// The entry point's name in the source.
    pub entry_point: String,
    /// Units per cube (x, y, z).
    pub cube_dim: (u32, u32, u32),
    /// Static shared memory per cube, in bytes (as laid out by cubecl's CUDA compiler).
    pub shared_memory_bytes: usize,
    /// The configuration, defaults filled in.
    pub config: BTreeMap<String, String>,
    /// FNV-1a 64 of the source text, hex.
    pub source_hash: String,
}

/// Emitted source plus its manifest.
#[derive(Clone, Debug)]
pub struct Emitted {
    /// The source text.
    pub source: String,
    /// How to launch it.
    pub manifest: Manifest,
}

/// Device properties of a generic device of each target: the types the target's
/// compiler supports, 32-wide planes for CUDA, no vendor specifics.
fn device_properties(target: Target) -> cubecl::ir::DeviceProperties {
    use cubecl::ir::{
        features::{Features, TypeUsage},
        DeviceProperties, ElemType, FloatKind, HardwareProperties, IntKind, MemoryDeviceProperties,
        UIntKind,
    };
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 31,
        max_shared_memory_size: 48 * 1024,
        max_cube_count: (65_535, 65_535, 65_535),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: None,
        num_cpu_cores: None,
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        max_vector_size: 4,
    };
    let memory = MemoryDeviceProperties {
        max_page_size: 1 << 30,
        alignment: 32,
    };
    let mut props = DeviceProperties::new(
        Features::default(),
        memory,
        hardware,
        cubecl_common::profile::TimingMethod::System,
    );
    match target {
        Target::Cuda => cubecl_cpp::register_supported_types(&mut props),
        Target::Wgsl => {
            // What wgpu reports for an adapter with SHADER_F16 (WGSL has no bf16).
            props.register_address_type(cubecl::ir::AddressType::U32);
            for ty in [
                ElemType::UInt(UIntKind::U32),
                ElemType::Int(IntKind::I32),
                ElemType::Float(FloatKind::F32),
                ElemType::Float(FloatKind::Flex32),
                ElemType::Float(FloatKind::F16),
                ElemType::Bool,
            ] {
                props.register_type_usage(ty, TypeUsage::all());
            }
        }
    }
    props
}

/// cubecl's CUDA C++ compiler (what cubecl-cuda runs at launch, with `wmma` for
/// tensor cores). It is a pure code generator: no driver or toolkit is needed, so CUDA
/// emission works in every build of kiln, with or without the `cuda` feature.
type CudaCompiler = cubecl_cpp::shared::CppCompiler<
    cubecl_cpp::cuda::CudaDialect<cubecl_cpp::cuda::mma::CudaWmmaCompiler>,
>;

/// The runtime properties cubecl-cuda gives its kernel builder (plane of 32, the
/// register layouts of its `mma` fragments).
fn cuda_target_properties() -> cubecl::ir::TargetProperties {
    use cubecl::ir::{ContiguousElements, MatrixLayout, MmaProperties, TargetProperties};
    TargetProperties {
        mma: MmaProperties {
            register_size_bits: 32,
            const_plane_size: 32,
            register_layout_a: MatrixLayout::RowMajor,
            register_layout_b: MatrixLayout::ColMajor,
            register_layout_acc: MatrixLayout::RowMajor,
            register_duplication_a: 1,
            register_duplication_b: 1,
            register_duplication_acc: 1,
            contiguous_elements: ContiguousElements::new(
                cubecl_cpp::cuda::mma::contiguous_elements_cuda,
            ),
        },
    }
}

fn builder(target: Target) -> KernelBuilder {
    let mut b = KernelBuilder::default();
    b.runtime_properties(match target {
        Target::Cuda => cuda_target_properties(),
        // wgpu's WGSL backends have no manual mma: its properties are the defaults.
        Target::Wgsl => Default::default(),
    });
    b.device_properties(&device_properties(target));
    b
}

fn compile_error(kernel: &str, e: impl std::fmt::Debug) -> Error {
    Error::Kernel {
        kernel: kernel.into(),
        message: format!("compilation failed: {e:?}"),
    }
}

/// Emits `spec` for `target` with `config` (validated against the kernel's knobs).
pub fn emit(spec: &KernelSpec, target: Target, config: &KernelConfig) -> Result<Emitted> {
    let bf16 = config
        .values()
        .get("dtype")
        .is_some_and(|d| kiln_runtime::DType::parse(d).ok() == Some(kiln_runtime::DType::BF16));
    if target == Target::Wgsl && spec.needs(kiln_runtime::Capability::TensorCores) {
        return Err(Error::Unsupported {
            device: "WGSL".into(),
            feature: format!(
                "kernel `{}` (tensor-core cmma instructions: CUDA C++ only)",
                spec.name
            ),
        });
    }
    if target == Target::Wgsl && bf16 {
        return Err(Error::Unsupported {
            device: "WGSL".into(),
            feature: "bf16 (WGSL has no bfloat16 type)".into(),
        });
    }
    let mode = ExecutionMode::Unchecked;
    let addr = AddressType::U32.unsigned_type();
    // The CUDA compile always runs: it gives the manifest's shared-memory layout.
    let cuda_def = (spec.define)(builder(Target::Cuda), config)?;
    let entry_point = cuda_def.options.kernel_name.clone();
    let cube = cuda_def.cube_dim;
    let options = cubecl_cpp::shared::CompilationOptions {
        warp_size: 32,
        ..Default::default()
    };
    // cubecl-cpp numbers its temporaries (`_tmp_N`) from one process-wide counter that
    // each compilation resets and its formatting advances: two emissions at once (the
    // CUDA check's threads, parallel tests) would number from each other's state, or
    // give one kernel the same name twice. One CUDA emission at a time.
    static CUDA_EMISSION: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (shared_memory_bytes, cuda_source) = {
        let _one_at_a_time = CUDA_EMISSION.lock().unwrap_or_else(|p| p.into_inner());
        let cuda = CudaCompiler::default()
            .compile(cuda_def, &options, mode, addr)
            .map_err(|e| compile_error(spec.name, e))?;
        (cuda.shared_memory_size(), cuda.to_string())
    };
    let source = match target {
        Target::Cuda => cuda_source,
        #[cfg(feature = "wgpu")]
        Target::Wgsl => {
            let def = (spec.define)(builder(Target::Wgsl), config)?;
            cubecl::wgpu::WgslCompiler::default()
                .compile(def, &Default::default(), mode, addr)
                .map_err(|e| compile_error(spec.name, e))?
                .to_string()
        }
        #[cfg(not(feature = "wgpu"))]
        Target::Wgsl => {
            return Err(Error::Unsupported {
                device: "this build of kiln".into(),
                feature: "WGSL emission (built without the `wgpu` feature)".into(),
            })
        }
    };
    let manifest = Manifest {
        kernel: spec.name.into(),
        target,
        entry_point,
        cube_dim: (cube.x, cube.y, cube.z),
        shared_memory_bytes,
        config: config.values().clone(),
        source_hash: kiln_runtime::tune::fnv1a_hex(&source),
    };
    Ok(Emitted { source, manifest })
}

/// Makes emitted text stable for snapshots. cubecl emits some declarations in hash-map
/// order, which changes from run to run: shared-memory arrays (with their offsets),
/// vector struct definitions and mutable locals in CUDA C++ (WGSL is the same text every
/// time since kiln's patched cubecl-ir declares locals in creation order, see
/// `vendor/README.md`; sorting it changes nothing there). Each run
/// of consecutive such declarations is sorted (a struct block moves as one piece) and
/// shared-memory offsets are masked. Everything else is left byte for byte.
pub fn normalize(source: &str) -> String {
    renumber_temporaries(&sort_declarations(source, true))
}

/// The source with cubecl's hash-ordered declaration runs sorted, as [`normalize`] does,
/// but nothing masked: still compilable, and the same text on every run, so NVRTC and
/// ptxas see the same program each time (`kiln check-cuda`; register allocation, and a
/// few bytes of spill, otherwise change from run to run).
pub fn canonical(source: &str) -> String {
    renumber_temporaries(&sort_declarations(source, false))
}

/// Renames cubecl-cpp's temporaries (`_tmp_N`) `_tmp_0`, `_tmp_1`, ... in the order they
/// first appear. Their numbers come from a process-wide counter that every CUDA
/// compilation resets and advances. [`emit`]'s lock keeps kiln's own emissions from
/// interleaving, but not cubecl's runtime compiles on a CUDA device's thread in the
/// same process (a test binary run on a GPU), which can still shift the numbering.
fn renumber_temporaries(source: &str) -> String {
    const TMP: &str = "_tmp_";
    let mut names: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find(TMP) {
        let digits = rest[at + TMP.len()..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let starts_word = rest[..at]
            .bytes()
            .next_back()
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'_'));
        let end = at + TMP.len() + digits;
        let ends_word = rest[end..]
            .bytes()
            .next()
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'_'));
        out.push_str(&rest[..at]);
        if digits > 0 && starts_word && ends_word {
            let name = &rest[at..end];
            let n = names.iter().position(|&x| x == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            });
            out.push_str(&format!("{TMP}{n}"));
        } else {
            out.push_str(&rest[at..end]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn sort_declarations(source: &str, mask: bool) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out: Vec<String> = Vec::new();
    let mut group: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with("struct __align__") {
            // A whole `struct ... { ... };` block is one sortable unit.
            let mut block = vec![line];
            while i + 1 < lines.len() && !lines[i].starts_with("};") {
                i += 1;
                block.push(lines[i]);
            }
            group.push(block.join("\n"));
        } else if line.starts_with("// Shared array size")
            && lines.get(i + 1).is_some_and(|next| is_shared_decl(next))
        {
            // The size comment travels with its declaration.
            i += 1;
            group.push(format!("{line}\n{}", lines[i]));
        } else if is_shared_decl(line) || is_local_decl(line) {
            group.push(line.to_string());
        } else {
            flush(&mut group, &mut out, mask);
            out.push(line.to_string());
        }
        i += 1;
    }
    flush(&mut group, &mut out, mask);
    out.join("\n")
}

/// Sorts a run of declarations by their text with shared-memory offsets masked (cubecl
/// assigns those in hash order too); then masks the offsets (`mask`), or lays the
/// arrays out again in the sorted order, each at a 16-byte boundary, so the text is
/// the same on every run and still compiles.
fn flush(group: &mut Vec<String>, out: &mut Vec<String>, mask: bool) {
    group.sort_by_cached_key(|d| mask_numbers_after(d, "["));
    let mut offset = 0usize;
    for d in group.drain(..) {
        if mask {
            let shared = d.lines().any(is_shared_decl);
            out.push(if shared {
                mask_numbers_after(&d, "[")
            } else {
                d
            });
            continue;
        }
        let bytes = d
            .strip_prefix("// Shared array size")
            .and_then(|c| c.split(" bytes").next())
            .and_then(|c| c.rsplit(' ').next())
            .and_then(|n| n.parse::<usize>().ok());
        match (bytes, d.find("dynamic_shared_mem[")) {
            (Some(bytes), Some(at)) => {
                let start = at + "dynamic_shared_mem[".len();
                let end = d[start..].find(']').map_or(start, |e| start + e);
                out.push(format!("{}{offset}{}", &d[..start], &d[end..]));
                offset += bytes.div_ceil(16) * 16;
            }
            _ => out.push(d),
        }
    }
}

fn is_shared_decl(line: &str) -> bool {
    line.contains("__shared__") && !line.contains("extern")
        || line.contains("shared_memory_") && line.contains("reinterpret_cast")
}

/// A declaration with no initializer: `float l_mut_7;` (CUDA) or `var l_mut_7: u32;` (WGSL).
fn is_local_decl(line: &str) -> bool {
    let t = line.trim();
    if !t.ends_with(';') || t.contains('=') {
        return false;
    }
    let body = t.trim_end_matches(';');
    if let Some(rest) = body.strip_prefix("var ") {
        return rest.starts_with("l_");
    }
    let mut parts = body.split_whitespace();
    matches!((parts.next(), parts.next(), parts.next()), (Some(_), Some(name), None) if name.starts_with("l_"))
}

fn mask_numbers_after(line: &str, marker: &str) -> String {
    // Every run of digits after `marker` becomes one `N`: offsets differ in length too.
    match line.find(marker) {
        Some(i) => {
            let (head, tail) = line.split_at(i);
            let mut masked = String::with_capacity(tail.len());
            let mut in_digits = false;
            for c in tail.chars() {
                if c.is_ascii_digit() {
                    if !in_digits {
                        masked.push('N');
                    }
                    in_digits = true;
                } else {
                    masked.push(c);
                    in_digits = false;
                }
            }
            format!("{head}{masked}")
        }
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_numbered_by_first_appearance() {
        let a = "T _tmp_4 = T{x};\nU l_1 = f(_tmp_4);\nT _tmp_5 = T{y};\ng(_tmp_5, _tmp_4);";
        let b = "T _tmp_0 = T{x};\nU l_1 = f(_tmp_0);\nT _tmp_1 = T{y};\ng(_tmp_1, _tmp_0);";
        assert_eq!(canonical(a), b);
        assert_eq!(canonical(a), canonical(b));
        // Other identifiers that contain the prefix stay as they are.
        let c = "my_tmp_3 _tmp_ x_tmp_2y _tmp_9";
        assert_eq!(renumber_temporaries(c), "my_tmp_3 _tmp_ x_tmp_2y _tmp_0");
    }
}
