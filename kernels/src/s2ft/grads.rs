//! Partial backpropagation of a linear layer `Y = X W^T` (`W` `[out, in]`) whose
//! trainable part is one block of `W`:
//! - row block `W[start:end, :]`: `dDelta = dY[:, start:end]^T X` `[end - start, in]`;
//! - column block `W[:, start:end]`: `dDelta = dY^T X[:, start:end]` `[out, end -
//!   start]`, from the saved slice alone ([`s2ft_save_slice`]: the memory saving);
//! - `dX = dY W` `[T, in]` only when asked (a trainable layer lies below).
//!
//! The weight gradients are one `A^T B` GEMM over the tokens reading `dY`'s column
//! window in place (`grouped_matmul_tn` with one group, autotuned tiles, f32
//! accumulation, rounded once to the operands' dtype); `dX` is `matmul`.

use crate::launch::{check_input, shape_err};
use crate::matmul::{grouped_tn_product, matmul, ColumnWindow, Epilogue, RowGroups};
use kiln_runtime::{Result, Tensor};

pub use crate::optim::Block;

/// `X[:, start:end]` as a contiguous `[T, end - start]` tensor: what a column block's
/// backward keeps instead of `X`.
pub fn s2ft_save_slice(x: &Tensor, start: usize, end: usize) -> Result<Tensor> {
    check_input("x", x, x.client())?;
    let &[_, inp] = x.shape() else {
        return Err(shape_err("x", "[T, in]".into(), x.shape()));
    };
    Block::Columns { start, end }.check("x", 0, inp)?;
    crate::rows::slice_rows(x, 1, start, end - start, x.dtype())
}

/// Partial backward of `Y = X W^T` for `block`: `(dDelta, dX)`, `dX` only when `w`
/// `[out, in]` is given. `dy` `[T, out]`; `x` is `X` `[T, in]` for a row block, the saved
/// slice `X[:, start:end]` `[T, end - start]` for a column block. Outputs in dy's dtype.
/// Without `w` a row block's `in` is x's width and a column block's `out` dy's.
pub fn s2ft_partial_backward(
    dy: &Tensor,
    x: &Tensor,
    w: Option<&Tensor>,
    block: Block,
) -> Result<(Tensor, Option<Tensor>)> {
    let client = dy.client();
    check_input("dy", dy, client)?;
    check_input("x", x, client)?;
    x.expect_dtype("x", &[dy.dtype()])?;
    let &[t, out] = dy.shape() else {
        return Err(shape_err("dy", "[T, out]".into(), dy.shape()));
    };
    let &[tx, xw] = x.shape() else {
        return Err(shape_err("x", "[T, in]".into(), x.shape()));
    };
    let (s, e) = block.range();
    if tx != t {
        return Err(shape_err("x", format!("[{t}, ...] (T of dy)"), x.shape()));
    }
    let inp = match (w, block) {
        (Some(w), _) => {
            check_input("w", w, client)?;
            w.expect_dtype("w", &[dy.dtype()])?;
            match *w.shape() {
                [wo, wi] if wo == out => wi,
                _ => {
                    return Err(shape_err(
                        "w",
                        format!("[{out}, in] (out of dy)"),
                        w.shape(),
                    ))
                }
            }
        }
        (None, Block::Rows { .. }) => xw,
        (None, Block::Columns { .. }) => e.max(xw),
    };
    block.check("w", out, inp)?;
    let groups = RowGroups::new(dy, &[0], &[t])?;
    let d_delta = match block {
        Block::Rows { .. } => {
            if xw != inp {
                return Err(shape_err(
                    "x",
                    format!("[{t}, {inp}] (X, in of w)"),
                    x.shape(),
                ));
            }
            let dy_rows = ColumnWindow {
                t: dy,
                col: s,
                width: e - s,
            };
            grouped_tn_product(dy_rows, ColumnWindow::all(x), &groups, dy.dtype())?
        }
        Block::Columns { .. } => {
            if xw != e - s {
                return Err(shape_err(
                    "x",
                    format!("[{t}, {}] (the saved slice X[:, {s}:{e}])", e - s),
                    x.shape(),
                ));
            }
            grouped_tn_product(
                ColumnWindow::all(dy),
                ColumnWindow::all(x),
                &groups,
                dy.dtype(),
            )?
        }
    };
    let [r, c] = block.shape(out, inp);
    let d_delta = d_delta.reshape(&[r, c])?;
    let dx = match w {
        Some(w) => Some(matmul(dy, w, false, Epilogue::default())?),
        None => None,
    };
    Ok((d_delta, dx))
}
