//! Typed device tensors.

use crate::{dispatch, shape_str, Client, DType, Error, HostTensor, Result};
use cubecl::server::Handle;
use std::sync::Arc;

/// A tensor on a device: a buffer handle plus dtype, shape and strides (in elements).
///
/// Tensors kiln creates are contiguous and row-major; kernels check
/// [`Tensor::is_contiguous`] and say so when a tensor is not. A [`Tensor::view`] is a
/// tensor too: any kernel reads and writes it in place of a whole buffer.
#[derive(Clone)]
pub struct Tensor {
    client: Client,
    handle: Handle,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    buffer: Buffer,
}

/// The allocation a tensor sees and where in it: clones, reshapes and views of one
/// allocation share `id`; `start` is the tensor's first byte in it.
#[derive(Clone, Debug)]
struct Buffer {
    id: Arc<()>,
    start: usize,
}

impl Buffer {
    fn new() -> Buffer {
        Buffer {
            id: Arc::new(()),
            start: 0,
        }
    }
}

/// Where a [`Tensor::view`] may start in its buffer, in bytes: every device kiln drives
/// binds a buffer at a multiple of 256 bytes (WebGPU's default
/// `minStorageBufferOffsetAlignment`, and the alignment of `cudaMalloc`), so a view is
/// aligned for any kernel as a buffer of its own would be.
pub const VIEW_ALIGN_BYTES: usize = 256;

/// Row-major strides (in elements) for a shape (saturating: only an empty tensor, whose
/// strides are never used, can have a product past `usize` once [`checked_numel`] passed).
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

/// Most elements in one dimension, and in one non-empty tensor: kernels index in 32 bits
/// (signed, as WGSL's and CUDA's `int`).
pub const MAX_ELEMENTS: usize = i32::MAX as usize;

/// The product of `dims` where it is at most [`MAX_ELEMENTS`] (`None` past it, also where
/// it would pass `usize`): the one check of a count that kernels index in 32 bits.
pub fn indexable_product(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
}

/// The element count of `shape` for a tensor named `name` of `dtype`: an error naming it
/// where a dimension or the count passes [`MAX_ELEMENTS`] (also when another dimension
/// is 0: a `[2^40, 0]` tensor is refused, not allocated around) or the bytes pass `usize`.
pub fn checked_numel(name: &str, shape: &[usize], dtype: DType) -> Result<usize> {
    let refuse = |what: String| Error::Shape {
        tensor: name.into(),
        expected: format!("at most {MAX_ELEMENTS} elements, and per dimension (32-bit indexing)"),
        found: what,
    };
    if let Some(d) = shape.iter().find(|&&d| d > MAX_ELEMENTS) {
        return Err(refuse(format!(
            "a dimension of {d} in {}",
            shape_str(shape)
        )));
    }
    indexable_product(shape)
        .filter(|&n| n.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| refuse(format!("shape {}", shape_str(shape))))
}

/// [`Tensor::poisoned`]'s element in the 32-bit dtypes: a quiet NaN in f32 (exponent all
/// ones, a payload no arithmetic produces), 2 147 146 669 as an integer.
const POISON_WORD: u32 = 0x7FFA_DBAD;
/// In f16 and bf16: a NaN in both (all-ones exponent, non-zero mantissa).
const POISON_HALF: u16 = 0x7FAD;
/// In the 8-bit dtypes.
const POISON_BYTE: u8 = 0xAD;

/// Bytes actually allocated for `n` bytes of data: wgpu binds buffers in 4-byte
/// words, so f16/i8 tensors of odd length are padded (the padding is never read back);
/// and at least 16 bytes, one 4-wide f32 vector, so that an empty tensor bound where a
/// kernel reads 4-wide vectors (and reads none of them) passes wgpu's validation of the
/// binding's size instead of panicking inside wgpu.
fn padded(n: usize) -> usize {
    n.div_ceil(4).max(4) * 4
}

impl Tensor {
    /// Copies a host tensor to the device. The device must support its dtype.
    pub fn upload(client: &Client, host: &HostTensor) -> Result<Tensor> {
        Self::upload_named(client, "tensor", host)
    }

    /// [`Tensor::upload`], naming the tensor in errors (as operators' inputs are named).
    pub fn upload_named(client: &Client, name: &str, host: &HostTensor) -> Result<Tensor> {
        client.require_dtype(name, host.dtype)?;
        // The fields of a HostTensor are public: check the shape (its product may not
        // overflow or pass 32-bit indexing) and the bytes against it here, since kernels
        // trust the shape.
        let bytes_expected = checked_numel(name, &host.shape, host.dtype)? * host.dtype.size();
        if host.data.len() != bytes_expected {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: format!(
                    "{bytes_expected} bytes of data for {} {:?}",
                    host.dtype, host.shape
                ),
                found: format!("{} bytes", host.data.len()),
            });
        }
        client.require_buffer(name, bytes_expected)?;
        let handle = if bytes_expected == 0 {
            client.empty_handle()
        } else {
            let mut bytes = host.data.clone();
            bytes.resize(padded(bytes.len()), 0);
            dispatch!(client, c => c.create_from_slice(&bytes))
        };
        Ok(Tensor {
            client: client.clone(),
            handle,
            dtype: host.dtype,
            shape: host.shape.clone(),
            strides: contiguous_strides(&host.shape),
            buffer: Buffer::new(),
        })
    }

    /// An uninitialized contiguous tensor: what it holds is unspecified (in a
    /// candidate's check run while autotuning, poison: see [`Tensor::poisoned`]).
    pub fn empty(client: &Client, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        if crate::tune::is_check_run() {
            return Self::poisoned(client, dtype, shape);
        }
        client.require_dtype("output", dtype)?;
        let numel = checked_numel("output", shape, dtype)?;
        client.require_buffer("output", numel * dtype.size())?;
        let handle = match numel * dtype.size() {
            0 => client.empty_handle(),
            bytes => dispatch!(client, c => c.empty(padded(bytes))),
        };
        Ok(Tensor {
            client: client.clone(),
            handle,
            dtype,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            buffer: Buffer::new(),
        })
    }

    /// A contiguous tensor of poison: every element is a NaN in the float dtypes
    /// (`0x7FFADBAD` in f32, `0x7FAD` in f16 and bf16) and an integer no kernel computes
    /// by chance in the 32-bit ones (`0x7FFADBAD`), `0xAD` in the 8-bit ones. What the
    /// autotuner gives a candidate to write in its check run ([`crate::tune::is_check_run`]):
    /// an element the candidate skips reads as poison instead of the value an earlier
    /// candidate left there, and the comparison with the reference candidate fails.
    pub fn poisoned(client: &Client, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel("output", shape, dtype)?;
        client.require_dtype("output", dtype)?;
        client.require_buffer("output", numel * dtype.size())?;
        let word: &[u8] = match dtype.size() {
            4 => &POISON_WORD.to_le_bytes(),
            2 => &POISON_HALF.to_le_bytes(),
            _ => &[POISON_BYTE],
        };
        let bytes = word.repeat(numel);
        let host = HostTensor::from_bytes(dtype, shape.to_vec(), bytes)?;
        Self::upload_named(client, "output", &host)
    }

    /// A contiguous tensor of zeros (every dtype's zero is all-zero bytes).
    pub fn zeros(client: &Client, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel("output", shape, dtype)?;
        // Before the host buffer: a shape the device cannot hold is refused, not
        // allocated on the host first.
        client.require_dtype("output", dtype)?;
        client.require_buffer("output", numel * dtype.size())?;
        let host = HostTensor::from_bytes(dtype, shape.to_vec(), vec![0; numel * dtype.size()])?;
        Self::upload_named(client, "output", &host)
    }

    /// Copies the tensor back to the host (waits for pending kernels).
    pub fn download(&self) -> Result<HostTensor> {
        // Nothing to read (and nothing to wait for): no round trip to the device.
        if self.numel() == 0 {
            return HostTensor::from_bytes(self.dtype, self.shape.clone(), Vec::new());
        }
        let bytes = dispatch!(self.client, c => c.read_one(self.handle.clone())).map_err(|e| {
            Error::Kernel {
                kernel: "read".into(),
                message: format!("{e:?}"),
            }
        })?;
        let n = self.numel() * self.dtype.size();
        if bytes.len() < n {
            return Err(Error::Kernel {
                kernel: "read".into(),
                message: format!("read {} bytes, expected {n}", bytes.len()),
            });
        }
        HostTensor::from_bytes(self.dtype, self.shape.clone(), bytes[..n].to_vec())
    }

    /// The device this tensor lives on.
    pub fn client(&self) -> &Client {
        &self.client
    }
    /// The buffer.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether strides are row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }

    /// The same buffer seen with another shape of equal element count (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel("reshape", shape, self.dtype)?;
        if numel != self.numel() || !self.is_contiguous() {
            return Err(Error::Shape {
                tensor: "reshape".into(),
                expected: format!("{} elements, contiguous", self.numel()),
                found: shape_str(shape),
            });
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        t.strides = contiguous_strides(shape);
        Ok(t)
    }

    /// The first `len` elements of a contiguous tensor as a `[len]` tensor over the same
    /// buffer (no copy): a kernel bound to it sees `len` elements (e.g. a multiple of its
    /// vector width, where the whole tensor is not).
    pub fn prefix(&self, len: usize) -> Result<Tensor> {
        if len > self.numel() || !self.is_contiguous() {
            return Err(Error::Shape {
                tensor: "prefix".into(),
                expected: format!("at most {} elements, contiguous", self.numel()),
                found: len.to_string(),
            });
        }
        let mut t = self.clone();
        t.shape = vec![len];
        t.strides = vec![1];
        Ok(t)
    }

    /// The same buffer seen as `[ceil(bytes / 4)]` u32 words (no copy): how kernels
    /// read packed 8-bit and 4-bit data, since WGSL has no 8-bit storage. Byte `i` of
    /// the tensor is bits `8 (i % 4)..` of word `i / 4` (little-endian).
    pub fn as_words(&self) -> Tensor {
        let words = (self.numel() * self.dtype.size()).div_ceil(4).max(1);
        Tensor {
            client: self.client.clone(),
            handle: self.handle.clone(),
            dtype: DType::U32,
            shape: vec![words],
            strides: vec![1],
            buffer: self.buffer.clone(),
        }
    }

    /// Elements `offset .. offset + numel(shape)` of a contiguous tensor (in row-major
    /// order) seen as a contiguous tensor of `shape`, over the same buffer (no copy):
    /// what a kernel writes to the view, the tensor holds. `offset` must put the view
    /// at a multiple of [`VIEW_ALIGN_BYTES`] bytes in its buffer (64 f32 elements, 128
    /// f16). [`crate::FlatLayout`] places many tensors in one buffer this way.
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel("view", shape, self.dtype)?;
        if !self.is_contiguous() {
            return Err(Error::Shape {
                tensor: "view".into(),
                expected: "a contiguous tensor to view".into(),
                found: format!("strides {:?}", self.strides),
            });
        }
        let size = self.dtype.size();
        if offset > self.numel() || numel > self.numel() - offset {
            return Err(Error::Shape {
                tensor: "view".into(),
                expected: format!("elements within the tensor's {}", self.numel()),
                found: format!(
                    "elements {offset}..{} ({} at offset {offset})",
                    offset as u128 + numel as u128,
                    shape_str(shape)
                ),
            });
        }
        let start = self.buffer.start + offset * size;
        if !start.is_multiple_of(VIEW_ALIGN_BYTES) {
            return Err(Error::Param {
                param: "offset".into(),
                expected: format!(
                    "a multiple of {} {} elements (a view starts at a multiple of {VIEW_ALIGN_BYTES} bytes in its buffer)",
                    VIEW_ALIGN_BYTES / size,
                    self.dtype
                ),
                found: format!("{offset} (byte {start} of the buffer)"),
            });
        }
        let handle = match numel {
            0 => self.client.empty_handle(),
            _ => {
                // The view's bytes, padded as an allocation of its own would be (whole
                // words, at least one 4-wide vector) where the tensor has them: the
                // padding never reaches the next 256-byte boundary, so views placed at
                // distinct boundaries never overlap in what they bind.
                let skip = (offset * size) as u64;
                let left = self.handle.size_in_used().saturating_sub(skip);
                let keep = (padded(numel * size) as u64).min(left);
                if keep < (numel * size) as u64 {
                    // Only a tensor over fewer bytes than its shape says (the one word
                    // `as_words` gives an empty tensor) can get here.
                    return Err(Error::Shape {
                        tensor: "view".into(),
                        expected: format!("{} bytes of the tensor's buffer", numel * size),
                        found: format!("{left} bytes past offset {offset}"),
                    });
                }
                self.handle
                    .clone()
                    .offset_start(skip)
                    .offset_end(left - keep)
            }
        };
        Ok(Tensor {
            client: self.client.clone(),
            handle,
            dtype: self.dtype,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            buffer: Buffer {
                id: self.buffer.id.clone(),
                start,
            },
        })
    }

    /// The smallest contiguous tensor that covers every one of `tensors`, with each
    /// one's first element in it, where all are non-empty contiguous tensors of one dtype
    /// in one buffer (views of a [`crate::FlatLayout`] buffer, in any order); `None`
    /// otherwise. How an operator binds many views as one array.
    pub fn span(tensors: &[&Tensor]) -> Option<(Tensor, Vec<usize>)> {
        let first = *tensors.first()?;
        let size = first.dtype.size();
        let same = |t: &&Tensor| {
            t.numel() > 0
                && t.dtype == first.dtype
                && t.is_contiguous()
                && Arc::ptr_eq(&t.buffer.id, &first.buffer.id)
        };
        if !tensors.iter().all(same) {
            return None;
        }
        let end = |t: &Tensor| t.buffer.start + t.numel() * size;
        let lo = tensors.iter().min_by_key(|t| t.buffer.start)?;
        let hi = tensors.iter().max_by_key(|t| end(t))?;
        let (start, stop) = (lo.buffer.start, end(hi));
        // Both handles are the allocation's with offsets (a tensor's first byte is its
        // handle's `offset_start`): from `lo`'s start to `hi`'s end.
        let mut handle = lo.handle.clone();
        handle.offset_end = hi.handle.offset_end;
        if handle.size_in_used() < (stop - start) as u64 {
            return None;
        }
        let offsets = tensors
            .iter()
            .map(|t| (t.buffer.start - start) / size)
            .collect();
        let n = (stop - start) / size;
        let t = Tensor {
            client: first.client.clone(),
            handle,
            dtype: first.dtype,
            shape: vec![n],
            strides: vec![1],
            buffer: Buffer {
                id: first.buffer.id.clone(),
                start,
            },
        };
        Some((t, offsets))
    }

    /// The first pair `(i, j)` in which `written[i]` shares elements with `read[j]`, if any;
    /// a `read[j]` that is exactly `written[j]`'s elements (a tensor updated from itself)
    /// is not counted: what an in-place operator over lists (an optimizer's weights and
    /// gradients) checks before launches that write some of them while reading others
    /// (two written tensors that overlap are the operator's to order). `O(n log n)`: a
    /// sweep over the tensors sorted by buffer and start.
    pub fn written_overlap(written: &[&Tensor], read: &[&Tensor]) -> Option<(usize, usize)> {
        let bytes = |t: &Tensor| t.numel() * t.dtype.size();
        let same = |a: &Tensor, b: &Tensor| {
            Arc::ptr_eq(&a.buffer.id, &b.buffer.id)
                && a.buffer.start == b.buffer.start
                && bytes(a) == bytes(b)
        };
        // (buffer, start, end, side, index): side 0 written, 1 read.
        let mut spans: Vec<(usize, usize, usize, usize, usize)> = Vec::new();
        for (side, list) in [written, read].into_iter().enumerate() {
            for (i, t) in list.iter().enumerate() {
                let own = side == 1 && written.get(i).is_some_and(|w| same(w, t));
                if bytes(t) > 0 && !own {
                    let id = Arc::as_ptr(&t.buffer.id) as usize;
                    spans.push((id, t.buffer.start, t.buffer.start + bytes(t), side, i));
                }
            }
        }
        spans.sort_unstable();
        // Per side, the furthest end so far in the current buffer and whose it is: a span
        // overlaps an earlier-starting one of the other side iff it starts before that end.
        let mut buffer = usize::MAX;
        let mut furthest = [(0usize, 0usize); 2];
        for &(id, start, end, side, i) in &spans {
            if id != buffer {
                (buffer, furthest) = (id, [(0, 0); 2]);
            }
            let (other_end, j) = furthest[1 - side];
            if start < other_end {
                return Some(match side {
                    0 => (i, j),
                    _ => (j, i),
                });
            }
            if end > furthest[side].0 {
                furthest[side] = (end, i);
            }
        }
        None
    }

    /// Whether the two tensors share some elements of one buffer but not all: views that
    /// overlap in part. Kernels that update in place bind one tensor twice (the same
    /// elements, read and written by the same unit); a partial overlap is never meant,
    /// and `#[kiln::kernel]` launches refuse it where one of the two is written.
    pub fn overlaps_partly(&self, other: &Tensor) -> bool {
        let bytes = |t: &Tensor| t.numel() * t.dtype.size();
        self.overlaps(other)
            && !(self.buffer.start == other.buffer.start && bytes(self) == bytes(other))
    }

    /// Whether the two tensors share elements of one buffer (views of one
    /// [`crate::FlatLayout`] buffer that do not overlap do not; an empty tensor shares
    /// nothing). What an in-place operator checks before binding both in one launch.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        let range = |t: &Tensor| {
            let bytes = t.numel() * t.dtype.size();
            t.buffer.start..t.buffer.start + bytes
        };
        let (a, b) = (range(self), range(other));
        Arc::ptr_eq(&self.buffer.id, &other.buffer.id)
            && !a.is_empty()
            && !b.is_empty()
            && a.start < b.end
            && b.start < a.end
    }

    /// Checks the dtype, naming the tensor in the error.
    pub fn expect_dtype(&self, name: &str, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            Ok(())
        } else {
            Err(Error::DType {
                tensor: name.into(),
                expected: {
                    // Each dtype once (`[dtype, F32]` with dtype f32 reads "f32").
                    let mut names: Vec<&str> = Vec::with_capacity(allowed.len());
                    for d in allowed {
                        if !names.contains(&d.name()) {
                            names.push(d.name());
                        }
                    }
                    names.join(" or ")
                },
                found: self.dtype.name().into(),
            })
        }
    }

    /// Checks that the tensor lives on `client`'s device and is contiguous.
    pub fn expect_usable(&self, name: &str, client: &Client) -> Result<()> {
        if self.client.report().selector != client.report().selector {
            return Err(Error::Device(format!(
                "tensor `{name}` lives on {}, the operator runs on {}",
                self.client.report().selector,
                client.report().selector
            )));
        }
        if !self.is_contiguous() {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: "contiguous row-major strides".into(),
                found: format!("strides {:?}", self.strides),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({} {:?} on {})",
            self.dtype,
            self.shape,
            self.client.report().selector
        )
    }
}
