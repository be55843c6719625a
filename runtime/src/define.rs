//! Building kernel definitions without a device (for `kiln emit` and snapshot tests):
//! the steps cubecl's launch performs, as functions kernels and the kernel macro share.

use cubecl::prelude::*;

/// Runs `$body` with `$F` bound to the Rust element type of a float dtype.
#[macro_export]
macro_rules! with_float {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $F = f32;
                $body
            }
            $crate::DType::F16 => {
                type $F = $crate::half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $F = $crate::half::bf16;
                $body
            }
            other => Err($crate::Error::DType {
                tensor: "x".into(),
                expected: "f32 | f16 | bf16".into(),
                found: other.name().into(),
            }),
        }
    };
}

/// Registers the element type `F` for the generic marker `M` of a `#[cube]` kernel.
pub fn register_float<M: 'static, F: Float>(builder: &mut KernelBuilder) {
    builder
        .scope
        .register_type::<DynamicScalar<M>>(F::as_type_native_unchecked().storage_type());
}

/// An input array argument of a kernel under definition.
pub fn input_array<C: CubePrimitive>(builder: &mut KernelBuilder) -> NativeExpand<Array<C>> {
    <Array<C> as LaunchArg>::expand(&ArrayCompilationArg { inplace: None }, builder)
}

/// An output array argument of a kernel under definition.
pub fn output_array<C: CubePrimitive>(builder: &mut KernelBuilder) -> NativeExpand<Array<C>> {
    <Array<C> as LaunchArg>::expand_output(&ArrayCompilationArg { inplace: None }, builder)
}

/// Starts a device-free definition the way cubecl's launch does: 32-bit addressing.
pub fn begin(builder: &mut KernelBuilder) {
    AddressType::U32.register(&mut builder.scope);
}

/// Finishes a definition with an entry-point name and any cube shape.
pub fn finish_with(builder: KernelBuilder, name: String, cube_dim: CubeDim) -> KernelDefinition {
    let settings = KernelSettings::default()
        .kernel_name(name)
        .cube_dim(cube_dim)
        .address_type(AddressType::U32);
    builder.build(settings)
}
