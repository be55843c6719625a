//! The bandwidth baseline of the benches: a 4-wide vectorized copy (`out[i] = x[i]`).

use cubecl::prelude::*;
use kiln::runtime::dispatch;
use kiln::Tensor;

/// The baseline: out[i] = x[i] in 4-wide vectors.
#[cube(launch_unchecked)]
fn copy_kernel<N: Size>(x: &Array<Vector<f32, N>>, out: &mut Array<Vector<f32, N>>, len: u32) {
    let i = kiln_dsl::linear_unit();
    if i < len as usize {
        out[i] = x[i];
    }
}

/// Copies f32 `x` into `out` (same length, a multiple of 4) in 4-wide vectors.
pub fn copy(x: &Tensor, out: &Tensor) {
    let len = (x.numel() / 4) as u32;
    let cubes = (len as usize).div_ceil(256);
    let count = CubeCount::Static(cubes.min(65_535) as u32, cubes.div_ceil(65_535) as u32, 1);
    dispatch!(x.client(), c => unsafe {
        copy_kernel::launch_unchecked::<_>(
            c,
            count,
            CubeDim::new_1d(256),
            4,
            ArrayArg::from_raw_parts(x.handle().clone(), x.numel()),
            ArrayArg::from_raw_parts(out.handle().clone(), out.numel()),
            len,
        )
    });
}
