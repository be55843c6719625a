//! Many tensors in one flat buffer: the layout of a model's parameters (or gradients)
//! placed one after another, each at a [`VIEW_ALIGN_BYTES`] boundary, and views of them
//! ([`Tensor::view`]) that every kernel uses as tensors of their own. What the buffer
//! buys: an element-wise operator over all of them is one launch over one tensor (a
//! fused optimizer step over hundreds of parameters, a gradient scaled or all-reduced
//! once), as DeepSpeed's and Megatron's flat parameter buffers do.

use crate::tensor::VIEW_ALIGN_BYTES;
use crate::{checked_numel, shape_str, Client, DType, Error, HostTensor, Result, Tensor};

/// Where each tensor of a list sits in one flat `[len]` buffer of `dtype`: tensor `i`
/// at element `offsets[i]`, a multiple of [`VIEW_ALIGN_BYTES`] bytes, in list order;
/// `len` is a multiple of it too (so that the buffer runs in whole 4-wide vectors). The
/// elements between two tensors and after the last (at most 255 bytes each) belong to
/// none and are zero in the buffers [`FlatLayout::zeros`] and [`FlatLayout::upload`]
/// make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    dtype: DType,
    shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    len: usize,
}

impl FlatLayout {
    /// The layout of tensors of `shapes` (each row-major) in one buffer of `dtype`.
    pub fn new(dtype: DType, shapes: &[Vec<usize>]) -> Result<FlatLayout> {
        let align = VIEW_ALIGN_BYTES / dtype.size();
        let (mut offsets, mut len) = (Vec::with_capacity(shapes.len()), 0usize);
        for (i, shape) in shapes.iter().enumerate() {
            let numel = checked_numel(&format!("shapes[{i}]"), shape, dtype)?;
            let at = len.next_multiple_of(align);
            offsets.push(at);
            len = at + numel;
        }
        let len = len.next_multiple_of(align);
        // The buffer is one tensor: kernels index it in 32 bits.
        checked_numel("flat buffer", &[len], dtype)?;
        Ok(FlatLayout {
            dtype,
            shapes: shapes.to_vec(),
            offsets,
            len,
        })
    }

    /// Elements of the flat buffer (the tensors' and the gaps between them).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tensors' element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The tensors' shapes, in list order.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Each tensor's first element in the buffer.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// A `[len]` buffer of zeros on `client`.
    pub fn zeros(&self, client: &Client) -> Result<Tensor> {
        Tensor::zeros(client, self.dtype, &[self.len])
    }

    /// A `[len]` buffer holding `tensors` (one per shape, in order; the gaps zero),
    /// uploaded in one copy.
    pub fn upload(&self, client: &Client, tensors: &[HostTensor]) -> Result<Tensor> {
        if tensors.len() != self.shapes.len() {
            return Err(Error::Param {
                param: "tensors".into(),
                expected: format!("one per shape of the layout, {}", self.shapes.len()),
                found: tensors.len().to_string(),
            });
        }
        let size = self.dtype.size();
        let mut bytes = vec![0u8; self.len * size];
        for (i, (t, (shape, &at))) in tensors
            .iter()
            .zip(self.shapes.iter().zip(&self.offsets))
            .enumerate()
        {
            let name = format!("tensors[{i}]");
            if t.dtype != self.dtype {
                return Err(Error::DType {
                    tensor: name,
                    expected: self.dtype.name().into(),
                    found: t.dtype.name().into(),
                });
            }
            if &t.shape != shape || t.data.len() != t.numel() * size {
                return Err(Error::Shape {
                    tensor: name,
                    expected: format!("{} as laid out", shape_str(shape)),
                    found: format!("{} with {} bytes", shape_str(&t.shape), t.data.len()),
                });
            }
            bytes[at * size..][..t.data.len()].copy_from_slice(&t.data);
        }
        let host = HostTensor::from_bytes(self.dtype, vec![self.len], bytes)?;
        Tensor::upload_named(client, "flat buffer", &host)
    }

    /// The tensors of `flat` (a buffer of this layout) on the host, in list order: one
    /// download for all of them (a checkpoint of a model's parameters).
    pub fn download(&self, flat: &Tensor) -> Result<Vec<HostTensor>> {
        self.check(flat)?;
        let all = flat.download()?;
        let size = self.dtype.size();
        self.shapes
            .iter()
            .zip(&self.offsets)
            .map(|(shape, &at)| {
                let n = shape.iter().product::<usize>() * size;
                HostTensor::from_bytes(
                    self.dtype,
                    shape.clone(),
                    all.data[at * size..][..n].to_vec(),
                )
            })
            .collect()
    }

    /// An error unless `flat` is a `[len]` buffer of the layout's dtype.
    fn check(&self, flat: &Tensor) -> Result<()> {
        flat.expect_dtype("flat buffer", &[self.dtype])?;
        if flat.shape() != [self.len] {
            return Err(Error::Shape {
                tensor: "flat buffer".into(),
                expected: format!("[{}] (the layout's length)", self.len),
                found: shape_str(flat.shape()),
            });
        }
        Ok(())
    }

    /// The tensors as views of `flat` (a buffer of this layout): each reads and writes
    /// its elements of `flat`.
    pub fn views(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        self.check(flat)?;
        self.shapes
            .iter()
            .zip(&self.offsets)
            .map(|(shape, &at)| flat.view(at, shape))
            .collect()
    }
}
