//! What the attention kernels share: their signature (`attention_kernel!`) and the
//! query tile a forward or dq cube owns (`query_tile`).
#![allow(clippy::manual_div_ceil)] // kernel code: `(a + b - 1) / b` is what the emitted code does, written as such

/// Declares an attention kernel: `q` `[B, Sq, H, D]`, `k` `[B, Sk, Hkv, D]`, `v` `[B, Sk,
/// Hkv, Dv]` (as `Array<F>`, or as `Array<OPERAND>` written `name<[OPERAND]>(..)`), the
/// sequence bounds `bounds_q` / `bounds_k` (N + 1 token offsets each),
/// then the kernel's own tensors, the shape (`n_seq` sequences of at most `max_q`
/// queries and `max_k` keys, `heads` query heads in groups of `group` per KV head,
/// head dims `dk`, `dv`), the rows of `lse` per head (`lse_rows`), the causal `shift`
/// (query `i` sees key `j` iff `j <= i + shift`), the score `scale`, then the kernel's
/// own scalars, and the comptime switches `causal`, `varlen` and the kernel's own;
/// keyed by the shape's power-of-two buckets and the dtype. The caller gives the rest
/// of the attribute (tunables, requirements, grid, cube, defaults) and the body.
macro_rules! attention_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident($($tensors:tt)*)
        scalars($($scalars:tt)*)
        comptime($($flags:tt)*)
        $body:block
    ) => {
        attention_kernel! {
            $(#[doc = $doc])*
            #[kernel($($attr)*)]
            $name<[F]>($($tensors)*)
            scalars($($scalars)*)
            comptime($($flags)*)
            $body
        }
    };
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<[$($operand:tt)*]>($($tensors:tt)*)
        scalars($($scalars:tt)*)
        comptime($($flags:tt)*)
        $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel(
            key(n_seq = pow2, max_q = pow2, max_k = pow2, heads = pow2, dk = pow2, dv = pow2, dtype),
            $($attr)*
        )]
        pub fn $name<F: Float>(
            q: &Array<$($operand)*>,
            k: &Array<$($operand)*>,
            v: &Array<$($operand)*>,
            bounds_q: &Array<u32>,
            bounds_k: &Array<u32>,
            $($tensors)*
            n_seq: u32,
            max_q: u32,
            max_k: u32,
            heads: u32,
            group: u32,
            dk: u32,
            dv: u32,
            lse_rows: u32,
            shift: i32,
            scale: f32,
            $($scalars)*
            #[comptime] causal: bool,
            #[comptime] varlen: bool,
            $($flags)*
        ) $body
    };
}

/// Declares a forward attention kernel: an `attention_kernel!` (operands as written,
/// `name<[OPERAND]>`) that writes `out` in F, or in f32 to `out32` with `out_f32`, and
/// `lse` (f32), with APE's `temperature` and `log_lse_scale`. `causal`, `varlen` and
/// `out_f32` default to false. The caller's attribute ends with a comma.
macro_rules! attention_fwd_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident<[$($operand:tt)*]> $body:block
    ) => {
        attention_kernel! {
            $(#[doc = $doc])*
            #[kernel($($attr)* defaults(causal = false, out_f32 = false, varlen = false),)]
            $name<[$($operand)*]>(
                out: &mut Array<F>,
                out32: &mut Array<f32>,
                lse: &mut Array<f32>,
            )
            scalars(temperature: f32, log_lse_scale: f32,)
            comptime(#[comptime] out_f32: bool,)
            $body
        }
    };
}

/// Declares a backward attention kernel: an `attention_kernel!` that also reads `d_o`
/// (dL/dout, q's layout), `lse_n` (the rows' natural log-sum-exp of `c s`) and `delta`
/// (`rowsum(do * out)`), then its own outputs, and writes them in F or, with
/// `grad_f32`, in f32 (`..32` outputs). `causal`, `varlen` and `grad_f32` default to
/// false. The caller's attribute ends with a comma.
macro_rules! attention_grad_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        $name:ident($($outputs:tt)*) $body:block
    ) => {
        attention_kernel! {
            $(#[doc = $doc])*
            #[kernel($($attr)* defaults(causal = false, varlen = false, grad_f32 = false),)]
            $name(d_o: &Array<F>, lse_n: &Array<f32>, delta: &Array<f32>, $($outputs)*,)
            scalars()
            comptime(#[comptime] grad_f32: bool,)
            $body
        }
    };
}

/// The arguments struct `$args` of an `attention_kernel!` kernel: the shared fields from
/// the inputs `$inp`, the checked problem `$p` and its uploaded sequence bounds
/// `$bounds_q` / `$bounds_k`, then the kernel's own fields.
macro_rules! attention_args {
    ($args:ident, $inp:expr, $p:expr, $bounds_q:expr, $bounds_k:expr, { $($own:tt)* }) => {
        $args {
            q: $inp.q,
            k: $inp.k,
            v: $inp.v,
            bounds_q: $bounds_q,
            bounds_k: $bounds_k,
            n_seq: $p.n_seq() as u32,
            max_q: Problem::longest(&$p.bounds_q) as u32,
            max_k: Problem::longest(&$p.bounds_k) as u32,
            heads: $p.heads as u32,
            group: ($p.heads / $p.kv_heads) as u32,
            dk: $p.dk as u32,
            dv: $p.dv as u32,
            lse_rows: $p.sq as u32,
            shift: $p.shift as i32,
            scale: $p.score_scale(),
            causal: $p.causal,
            varlen: $p.varlen,
            $($own)*
        }
    };
}

use cubecl::prelude::*;

/// The query tile of a forward or dq cube: cube `(x, h, _)` owns rows `i0..i0 + rows`
/// of sequence `n`, query head `h` (KV head `hk`).
#[derive(CubeType, Clone, Copy)]
pub(super) struct QueryTile {
    /// The sequence.
    pub n: u32,
    /// The tile's first row, within the sequence.
    pub i0: u32,
    /// The query head.
    pub h: u32,
    /// Its KV head.
    pub hk: u32,
    /// The sequence's first query token and its query count.
    pub bos_q: u32,
    pub sq: u32,
    /// The sequence's first key token and its key count (at most `max_k`).
    pub bos_k: u32,
    pub sk: u32,
    /// The tile's rows inside the sequence: 0 for cubes past the end of a shorter
    /// sequence (uniform per cube).
    pub rows: u32,
    /// Keys the tile's last row sees: all, or up to `i_last + shift` (causal); 0 when
    /// the tile has no rows.
    pub kmax: u32,
}

/// This cube's [`QueryTile`] for query tiles of `bq` rows.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn query_tile(
    bounds_q: &Array<u32>,
    bounds_k: &Array<u32>,
    max_q: u32,
    max_k: u32,
    group: u32,
    shift: i32,
    #[comptime] bq: u32,
    #[comptime] causal: bool,
) -> QueryTile {
    let tiles_per_seq = (max_q + bq - 1) / bq;
    let n = CUBE_POS_X / tiles_per_seq;
    let i0 = (CUBE_POS_X % tiles_per_seq) * bq;
    let bos_q = bounds_q[n as usize];
    let sq = bounds_q[(n + 1) as usize] - bos_q;
    let bos_k = bounds_k[n as usize];
    let sk = min(bounds_k[(n + 1) as usize] - bos_k, max_k);
    let rows = select(i0 < sq, min(sq - i0, bq), 0u32);
    let mut kmax = sk;
    if comptime!(causal) {
        let seen = i32::cast_from(i0 + max(rows, 1) - 1) + shift + 1;
        kmax = select(seen <= 0, 0u32, min(u32::cast_from(max(seen, 0)), sk));
    }
    if rows == 0 {
        kmax = 0;
    }
    QueryTile {
        n,
        i0,
        h: CUBE_POS_Y,
        hk: CUBE_POS_Y / group,
        bos_q,
        sq,
        bos_k,
        sk,
        rows,
        kmax,
    }
}

/// Writes row `r` (within the tile) of a forward tile's log-sum-exp, `T (m + ln l) +
/// log_lse_scale` (an empty row: l = 0, lse = -inf through ln(0)), at its place in `lse`
/// `[B, H, Sq]` (varlen: `[1, H, total rows]`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_lse(
    lse: &mut Array<f32>,
    tile: &QueryTile,
    r: u32,
    heads: u32,
    lse_rows: u32,
    m: f32,
    l: f32,
    temperature: f32,
    log_lse_scale: f32,
    #[comptime] varlen: bool,
) {
    let at = lse_index(
        tile.n,
        heads,
        tile.h,
        lse_rows,
        tile.bos_q,
        tile.i0 + r,
        varlen,
    );
    lse[at as usize] = temperature * (m + f32::ln(l)) + log_lse_scale;
}

/// Where query `row` (within its sequence `n`, whose first token is `bos_q`) of head `h`
/// lies in an lse-shaped `[B, H, Sq]` array (varlen: `[1, H, total rows]`).
#[cube]
pub(super) fn lse_index(
    n: u32,
    heads: u32,
    h: u32,
    lse_rows: u32,
    bos_q: u32,
    row: u32,
    #[comptime] varlen: bool,
) -> u32 {
    let mut at = (n * heads + h) * lse_rows + row;
    if comptime!(varlen) {
        at = h * lse_rows + bos_q + row;
    }
    at
}

/// The backward's per-query-column statistics of a dk/dv cube's query tile (rows
/// `i0..i0 + qs` of sequence `n`, head `h`): `L` (f32::MAX past `qs`: p = 0) and delta,
/// `cols` of each, written by every unit of the cube (`units`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn query_stats(
    lcol: &mut SharedMemory<f32>,
    dcol: &mut SharedMemory<f32>,
    lse_n: &Array<f32>,
    delta: &Array<f32>,
    tile: &KeyTile,
    heads: u32,
    h: u32,
    lse_rows: u32,
    i0: u32,
    qs: u32,
    #[comptime] cols: u32,
    #[comptime] units: u32,
    #[comptime] varlen: bool,
) {
    let mut idx = UNIT_POS;
    while idx < cols {
        let li = lse_index(
            tile.n,
            heads,
            h,
            lse_rows,
            tile.bos_q,
            i0 + min(idx, qs - 1),
            varlen,
        ) as usize;
        lcol[idx as usize] = row_lse(lse_n[li], idx < qs);
        dcol[idx as usize] = delta[li];
        idx += units;
    }
}

/// The key tile of a dk/dv cube: cube `(x, hk, _)` owns keys `j0..j0 + keys` of
/// sequence `n` and KV head `hk`; the sequence's queries `qmin..qend` see them (causal:
/// from `j0 - shift` on; none where the tile has no keys).
#[derive(CubeType, Clone, Copy)]
pub(super) struct KeyTile {
    pub n: u32,
    pub j0: u32,
    pub hk: u32,
    /// The sequence's first query token and first key token.
    pub bos_q: u32,
    pub bos_k: u32,
    pub keys: u32,
    pub qmin: u32,
    pub qend: u32,
}

/// This cube's [`KeyTile`] for key tiles of `bk` keys.
#[cube]
pub(super) fn key_tile(
    bounds_q: &Array<u32>,
    bounds_k: &Array<u32>,
    max_q: u32,
    max_k: u32,
    shift: i32,
    #[comptime] bk: u32,
    #[comptime] causal: bool,
) -> KeyTile {
    let tiles_per_seq = (max_k + bk - 1) / bk;
    let n = CUBE_POS_X / tiles_per_seq;
    let j0 = (CUBE_POS_X % tiles_per_seq) * bk;
    let bos_q = bounds_q[n as usize];
    let sq = min(bounds_q[(n + 1) as usize] - bos_q, max_q);
    let bos_k = bounds_k[n as usize];
    let sk = bounds_k[(n + 1) as usize] - bos_k;
    let keys = select(j0 < sk, min(sk - j0, bk), 0u32);
    // The first query that sees key j0: i >= j0 - shift (causal).
    let mut qmin = 0u32;
    if comptime!(causal) {
        let first = i32::cast_from(j0) - shift;
        qmin = select(first <= 0, 0u32, min(u32::cast_from(max(first, 0)), sq));
    }
    let mut qend = sq;
    if keys == 0 {
        qend = 0;
    }
    KeyTile {
        n,
        j0,
        hk: CUBE_POS_Y,
        bos_q,
        bos_k,
        keys,
        qmin,
        qend,
    }
}

/// A query row's `L` as the gradient kernels use it: `f32::MAX` for a row that sees no
/// key (`L = -inf`) or lies past the tile (`valid` false), so that `p = exp(c s - L)` is
/// exactly 0 there without a test per element; anything else as it is, a NaN included
/// (a NaN input's row stays NaN, never a dropped row: told apart from -inf by its bits).
#[cube]
pub(super) fn row_lse(l: f32, valid: bool) -> f32 {
    let live = l > f32::min_value() || kiln_dsl::is_nan(l);
    select(valid && live, l, f32::max_value())
}
