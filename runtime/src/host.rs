//! Host-side tensors: contiguous row-major bytes plus dtype and shape, with
//! conversion to and from f64 (for references) and safetensors files.

use crate::{DType, Error, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

/// `v` rounded to the nearest f16, ties to even (correctly rounded, unlike `half` 2.7's
/// `f16::from_f64`, which goes through f32 with f16c, rounding twice, or drops the low 32
/// mantissa bits without it: half-rs issues 116 and 151).
pub fn f16_from_f64(v: f64) -> f16 {
    f16::from_f32(f32_round_to_odd(v))
}

/// `v` rounded to the nearest bf16, ties to even (correctly rounded: `half` 2.7's
/// `bf16::from_f64` drops the low 32 mantissa bits before rounding, so a value just above
/// a tie rounds down, e.g. the f32 0x3ee88005 to 0x3ee8 instead of 0x3ee9).
pub fn bf16_from_f64(v: f64) -> bf16 {
    bf16::from_f32(f32_round_to_odd(v))
}

/// `v` rounded to f32 toward zero, the last mantissa bit set where that was inexact
/// ("round to odd"). Rounding that to nearest-even in a format at least two bits
/// narrower (f16, bf16; subnormals and overflow included, f32 has their exponent range)
/// gives the correctly rounded result: the odd bit keeps "above the tie" from becoming
/// "on the tie". NaN stays NaN.
fn f32_round_to_odd(v: f64) -> f32 {
    let t = v as f32; // nearest, ties to even: one of the two f32 values around `v`
    if v.is_nan() || t as f64 == v || t.to_bits() & 1 == 1 {
        return t;
    }
    // `t` is even: the other neighbour, one step toward `v` in magnitude, is odd.
    // Sign-magnitude bits: -1 moves toward zero, +1 away (inf - 1 is f32::MAX).
    let toward_zero = (t as f64).abs() > v.abs();
    f32::from_bits(if toward_zero {
        t.to_bits() - 1
    } else {
        t.to_bits() + 1
    })
}

/// A contiguous, row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Little-endian element bytes, `numel * dtype.size()` of them.
    pub data: Vec<u8>,
}

impl HostTensor {
    /// Wraps raw little-endian bytes; errors when the byte count does not match the shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        Self::from_bytes_named("data", dtype, shape, data)
    }

    /// [`HostTensor::from_bytes`], naming the tensor `name` in errors (as a file's
    /// tensors are named).
    pub fn from_bytes_named(
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Self> {
        let numel = crate::checked_numel(name, &shape, dtype)?;
        if data.len() != numel * dtype.size() {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: format!("{} bytes for {dtype} {shape:?}", numel * dtype.size()),
                found: format!("{} bytes", data.len()),
            });
        }
        Ok(Self { dtype, shape, data })
    }

    /// Converts f64 values to `dtype` (round to nearest even for floats; saturating for ints).
    pub fn from_f64(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Result<Self> {
        let numel = crate::checked_numel("values", &shape, dtype)?;
        if values.len() != numel {
            return Err(Error::Shape {
                tensor: "values".into(),
                expected: format!("{numel} values for shape {shape:?}"),
                found: format!("{} values", values.len()),
            });
        }
        let mut data = Vec::with_capacity(numel * dtype.size());
        for &v in values {
            match dtype {
                DType::F32 => data.extend_from_slice(&(v as f32).to_le_bytes()),
                DType::F16 => data.extend_from_slice(&f16_from_f64(v).to_le_bytes()),
                DType::BF16 => data.extend_from_slice(&bf16_from_f64(v).to_le_bytes()),
                DType::I8 => data.extend_from_slice(&(v as i8).to_le_bytes()),
                DType::U8 => data.extend_from_slice(&(v as u8).to_le_bytes()),
                DType::I32 => data.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::U32 => data.extend_from_slice(&(v as u32).to_le_bytes()),
            }
        }
        Ok(Self { dtype, shape, data })
    }

    /// Builds an f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        Self::from_bytes(DType::F32, shape, bytemuck::cast_slice(values).to_vec())
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Every element widened to f64 (exactly, for every dtype kiln has).
    pub fn to_f64(&self) -> Vec<f64> {
        let s = self.dtype.size();
        self.data
            .chunks_exact(s)
            .map(|b| match self.dtype {
                DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::I8 => b[0] as i8 as f64,
                DType::U8 => b[0] as f64,
                DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                DType::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            })
            .collect()
    }

    /// The same values in another dtype (through f64).
    pub fn cast(&self, dtype: DType) -> Result<HostTensor> {
        Self::from_f64(dtype, self.shape.clone(), &self.to_f64())
    }
}

/// Reads every tensor of a safetensors file, keyed by name.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, HostTensor>> {
    load(path.as_ref(), None).map(|(t, _)| t)
}

/// Reads only the tensors named in `names` (those present); others are skipped
/// unread, whatever their dtype.
pub fn load_safetensors_named(
    path: impl AsRef<Path>,
    names: &[&str],
) -> Result<BTreeMap<String, HostTensor>> {
    load(path.as_ref(), Some(names)).map(|(t, _)| t)
}

/// As [`load_safetensors_named`], also returning the names of the file's other tensors
/// (sorted), so a caller can say which were not used (a misspelled `Bias`).
pub fn load_safetensors_split(
    path: impl AsRef<Path>,
    names: &[&str],
) -> Result<(BTreeMap<String, HostTensor>, Vec<String>)> {
    load(path.as_ref(), Some(names))
}

fn load(
    path: &Path,
    names: Option<&[&str]>,
) -> Result<(BTreeMap<String, HostTensor>, Vec<String>)> {
    let p = path.display().to_string();
    // A regular file only: a device such as /dev/zero would be read without end.
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: p.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::Format {
            path: p,
            message: "not a regular file (a directory, device or pipe); a safetensors file is"
                .into(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: p.clone(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
        path: p.clone(),
        message: format!(
            "not a valid safetensors file ({} bytes): {}",
            bytes.len(),
            describe_safetensors_error(&e)
        ),
    })?;
    let mut out = BTreeMap::new();
    let mut unused = Vec::new();
    for (name, view) in st.tensors() {
        if names.is_some_and(|n| !n.contains(&name.as_str())) {
            unused.push(name);
            continue;
        }
        let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| Error::Format {
            path: p.clone(),
            message: format!(
                "tensor `{name}` has dtype {:?}; kiln handles f32, f16, bf16, i8, u8, i32, u32",
                view.dtype()
            ),
        })?;
        let t = HostTensor::from_bytes_named(
            &name,
            dtype,
            view.shape().to_vec(),
            view.data().to_vec(),
        )?;
        out.insert(name, t);
    }
    unused.sort();
    Ok((out, unused))
}

/// Writes tensors to a safetensors file (names sorted). The file is replaced atomically
/// through a unique temporary file beside it; a destination that is not a regular file
/// is refused, a symbolic link is followed (see [`crate::fsio`]).
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<()> {
    let path = path.as_ref();
    let p = path.display().to_string();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            safetensors::tensor::TensorView::new(t.dtype.to_safetensors(), t.shape.clone(), &t.data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Format {
                    path: p.clone(),
                    message: format!("tensor `{n}`: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| Error::Format {
        path: p.clone(),
        message: e.to_string(),
    })?;
    crate::fsio::replace_file(path, &bytes).map_err(|source| Error::Io { path: p, source })
}

/// What a safetensors parse error means, in words (the crate's own `Display` prints
/// the variant's name).
fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => {
            "shorter than the 8-byte header length a safetensors file starts with".into()
        }
        E::InvalidHeaderLength | E::HeaderTooLarge => {
            "its first 8 bytes (the JSON header's length, little-endian u64) give a length past the end of the file or over 100 MB".into()
        }
        E::InvalidHeader => "the JSON header is not valid UTF-8".into(),
        E::InvalidHeaderStart => "the JSON header does not start with `{`".into(),
        E::InvalidHeaderDeserialization | E::JsonError(_) => {
            format!("the JSON header is not a safetensors header ({e:?})")
        }
        E::InvalidOffset(name) => format!(
            "the data_offsets of tensor `{name}` do not follow the previous tensor's or do not match its shape and dtype"
        ),
        E::TensorInvalidInfo => {
            "a tensor's shape and dtype do not match the size of its data_offsets".into()
        }
        E::MetadataIncompleteBuffer => {
            "the tensors' data_offsets do not cover the data exactly (the last must end at the end of the file)".into()
        }
        E::ValidationOverflow => "a tensor's shape overflows (its size is not a number)".into(),
        E::TensorNotFound(name) => format!("no tensor `{name}`"),
        other => format!("{other:?}"),
    }
}
