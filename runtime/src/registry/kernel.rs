//! Kernels in the registry: their emission spec and configuration, the device
//! capabilities they may require, and the value types of `#[comptime]` arguments.

use super::{join_names, ParamSpec};
use crate::{Error, Result};
use cubecl::prelude::{KernelBuilder, KernelDefinition};
use std::collections::BTreeMap;

/// Values for a kernel's configuration knobs (`kiln emit --config k=v`), validated
/// against the kernel's declared [`ParamSpec`]s.
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    values: BTreeMap<String, String>,
}

impl KernelConfig {
    /// Checks every key against `spec`; unknown keys are errors naming the kernel.
    pub fn new(spec: &KernelSpec, values: BTreeMap<String, String>) -> Result<Self> {
        for k in values.keys() {
            if !spec.config.iter().any(|p| p.name == *k) {
                return Err(Error::UnknownParam {
                    op: spec.name.into(),
                    param: k.clone(),
                    known: join_names(spec.config.iter().map(|p| p.name)),
                });
            }
        }
        let mut all = BTreeMap::new();
        for p in spec.config {
            all.insert(p.name.to_string(), p.default.to_string());
        }
        all.extend(values);
        Ok(Self { values: all })
    }

    /// The value of a knob (given or default), parsed, or an error naming it.
    pub fn get<T: std::str::FromStr>(&self, name: &str) -> Result<T> {
        let v = self.values.get(name).map(String::as_str).unwrap_or("");
        v.parse().map_err(|_| Error::Param {
            param: name.into(),
            expected: format!("a {}", std::any::type_name::<T>()),
            found: v.into(),
        })
    }

    /// The value of a `#[comptime]` knob (given or default), or an error naming the
    /// knob and listing its values.
    pub fn get_param<T: ComptimeParam>(&self, name: &str) -> Result<T> {
        let v = self.values.get(name).map(String::as_str).unwrap_or("");
        v.trim().parse().map_err(|_| Error::Param {
            param: name.into(),
            expected: T::VALUES.into(),
            found: v.into(),
        })
    }

    /// All values, defaults filled in.
    pub fn values(&self) -> &BTreeMap<String, String> {
        &self.values
    }
}

/// One configuration of a kernel's tunables: `(name, value)` in declaration order.
pub type Tunables = Vec<(&'static str, u32)>;

/// A kernel whose source can be emitted without a device.
pub struct KernelSpec {
    /// Name used by `kiln emit`.
    pub name: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Configuration knobs (dtype, vector width, cube size, ...).
    pub config: &'static [ParamSpec],
    /// Expands the kernel into `builder` (already set up for the target) for a config
    /// and returns its definition.
    pub define: fn(KernelBuilder, &KernelConfig) -> Result<KernelDefinition>,
    /// The declared tunable configurations the autotuner may pick on a device for some
    /// problem, given the `#[comptime]` values of a config: `(tunable, value)` lists in
    /// declaration order (what `kiln check-cuda` compiles).
    pub declared: fn(&crate::DeviceReport, &KernelConfig) -> Result<Vec<Tunables>>,
    /// The least fraction of an SM's threads the kernel keeps resident on CUDA as far as
    /// its registers allow (`occupancy = ..` in `#[kiln::kernel]`; 0 when undeclared):
    /// `kiln check-cuda` fails a configuration below it that the tuning space keeps.
    pub min_occupancy: f64,
    /// Device capabilities the kernel's instructions need (declared in its `require`
    /// as `device.has(Capability::..)`); emission refuses a target without them.
    pub capabilities: &'static [Capability],
    /// Hash of the kernel's source and of the DSL it calls (keys the tune cache).
    pub source_hash: fn() -> String,
}

impl KernelSpec {
    /// Whether the kernel needs `capability`.
    pub fn needs(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }
}

/// A device capability a kernel can require beyond the basics every backend has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Cooperative-matrix (tensor core) instructions (`cmma`; CUDA `wmma`). WGSL has
    /// none; on wgpu such a kernel would silently write nothing, so it is refused.
    TensorCores,
    /// Int8 cooperative-matrix instructions (CUDA `wmma` s8 fragments, i32 accumulators).
    Int8TensorCores,
    /// Plane (warp / subgroup) operations.
    PlaneOps,
    /// f16 arithmetic and storage.
    F16,
    /// bf16 arithmetic and storage (CUDA; WGSL has no bf16).
    Bf16,
}

impl crate::DeviceReport {
    /// Whether the device has `capability`.
    pub fn has(&self, capability: Capability) -> bool {
        match capability {
            Capability::TensorCores => self.tensor_cores,
            Capability::Int8TensorCores => self.int8_tensor_cores,
            Capability::PlaneOps => self.plane_ops,
            Capability::F16 => self.f16,
            Capability::Bf16 => self.bf16,
        }
    }
}

/// A value type a `#[comptime]` kernel argument may have: its value is part of the
/// kernel (one compiled variant per value), parsed from `kiln emit --config`, shown in
/// tune keys and tables by [`Display`](std::fmt::Display). Implemented for `bool` and
/// `u32`; declare enums with [`comptime_enum!`](crate::comptime_enum).
pub trait ComptimeParam: Copy + Default + std::fmt::Display + std::str::FromStr {
    /// The values in words, e.g. `none | silu | gelu`.
    const VALUES: &'static str;
    /// The value emission uses when `--config` names none.
    const DEFAULT: &'static str;
}

impl ComptimeParam for bool {
    const VALUES: &'static str = "false | true";
    const DEFAULT: &'static str = "false";
}

impl ComptimeParam for u32 {
    const VALUES: &'static str = "u32";
    const DEFAULT: &'static str = "0";
}

/// Declares a `#[comptime]` enum for kernels: the enum (with the derives cubecl needs
/// of a comptime value), its words for `Display`/`FromStr`, and [`ComptimeParam`]. The
/// first variant is the default.
///
/// ```
/// kiln_runtime::comptime_enum! {
///     /// The activation of a fused epilogue.
///     pub enum Act { None = "none", Silu = "silu" }
/// }
/// assert_eq!("silu".parse::<Act>().unwrap(), Act::Silu);
/// assert_eq!(Act::None.to_string(), "none");
/// ```
#[macro_export]
macro_rules! comptime_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(#[$fmeta:meta])* $first:ident = $first_word:literal
            $(, $(#[$vmeta:meta])* $variant:ident = $word:literal)* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $(#[$fmeta])*
            #[doc = concat!("`", $first_word, "`")]
            #[default]
            $first,
            $(
                $(#[$vmeta])*
                #[doc = concat!("`", $word, "`")]
                $variant,
            )*
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self {
                    $name::$first => $first_word,
                    $($name::$variant => $word,)*
                })
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                match s.trim() {
                    $first_word => Ok($name::$first),
                    $($word => Ok($name::$variant),)*
                    other => Err($crate::Error::Param {
                        param: stringify!($name).into(),
                        expected: <$name as $crate::ComptimeParam>::VALUES.into(),
                        found: other.into(),
                    }),
                }
            }
        }

        impl $crate::ComptimeParam for $name {
            const VALUES: &'static str = concat!($first_word $(, " | ", $word)*);
            const DEFAULT: &'static str = $first_word;
        }
    };
}
