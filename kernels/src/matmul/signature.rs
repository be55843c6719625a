//! The one signature of the `matmul` kernels, written once: `matmul_kernel!` declares a
//! kernel with the arguments every one of them takes, `fma_kernel!` a register-tiled FMA
//! kernel whole from its main loop and tune list. (`#[kiln::kernel]` binds arguments
//! and tunables by name, so a body or `require` list the caller writes sees the
//! arguments the macro's template declares.)

/// Declares a `matmul` kernel: operands `a`, `b` as `Array<$operand>`, the epilogue's
/// `bias` [N] and `residual` [M, N] and the output `c` [M, N] as `Array<$out>` (scalars,
/// or 4-wide vectors along N where N is a multiple of 4), the shape `m`, `n`, `k`,
/// and the epilogue's comptime switches (`trans_b`, `has_bias`, `has_residual`, `act`),
/// keyed by the shape's power-of-two buckets and the dtype. The caller gives the rest
/// of the attribute (tunables, requirements, grid, cube) and the body.
macro_rules! matmul_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<[$($operand:tt)*], [$($out:tt)*]> $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(key(m = pow2, n = pow2, k = pow2, dtype), $($attr)*)]
        pub fn $name<F: Float>(
            a: &Array<$($operand)*>,
            b: &Array<$($operand)*>,
            bias: &Array<$($out)*>,
            residual: &Array<$($out)*>,
            c: &mut Array<$($out)*>,
            m: u32,
            n: u32,
            k: u32,
            #[comptime] trans_b: bool,
            #[comptime] has_bias: bool,
            #[comptime] has_residual: bool,
            #[comptime] act: Activation,
        ) $body
    };
}

/// Declares a register-tiled FMA kernel (see `tiled`): its `MainLoop` variant, its
/// tune list (`BM`, `BN`, `TM`, `TN`, and `BK` for the staged loops), requirements
/// beyond the tile's divisibility, and the staged slice depth `bk` (0 for the direct
/// loops). Grid, cube and body are the same for all four.
macro_rules! fma_kernel {
    (
        $(#[doc = $doc:literal])*
        $name:ident = $main:ident,
        tune($($tune:tt)*),
        require($($req:expr),* $(,)?),
        bk = $bk:expr $(,)?
    ) => {
        matmul_kernel! {
            $(#[doc = $doc])*
            #[kernel(
                tune($($tune)*),
                require(BM % TM == 0, BN % TN == 0 $(, $req)*),
                grid = (n.div_ceil(BN), m.div_ceil(BM)),
                cube = ((BM / TM) * (BN / TN)),
            )]
            $name<[F], [F]> {
                let plan = comptime!(FmaPlan {
                    main: MainLoop::$main,
                    tile: TileShape::new(BM, BN, TM, TN),
                    bk: $bk,
                    trans_b,
                });
                let fused = comptime!(Fused::new(has_bias, has_residual, act));
                // On a CPU adapter (`local_scalars`) the epilogue loops over rows.
                fma_matmul::<F>(a, b, bias, residual, c, m, n, k, plan, fused, local_scalars);
            }
        }
    };
}
