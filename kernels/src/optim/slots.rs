//! The slot machinery of the optimizer kernels that update several tensors in one launch
//! (the fused step, FRUGAL). WGSL has no arrays of buffers, so a launch binds [`SLOTS`]
//! weights and [`SLOTS`] gradients as separate arguments (unused ones get a placeholder);
//! a per-launch table gives each slot's first cube and its offsets, each cube works
//! within one slot, and picks that slot's buffers without a branch.
#![allow(clippy::collapsible_if)] // a `comptime!` outer `if` drops the inner branch from the kernel

use cubecl::prelude::*;
use kiln_runtime::{Error, Result, Tensor};

/// A kernel over the launch's [`SLOTS`] slots (WGSL has no arrays of buffers): its
/// weights `w0..w5` (updated in place) and gradients `g0..g5`, `N`-wide vectors of `F`,
/// come first, then its own arguments.
macro_rules! slot_kernel {
    (
        $(#[doc = $doc:literal])*
        #[kernel($($attr:tt)*)]
        pub fn $name:ident($($own:tt)*) $body:block
    ) => {
        $(#[doc = $doc])*
        #[kiln_macros::kernel($($attr)*)]
        pub fn $name<F: Float, N: Size>(
            w0: &mut Array<Vector<F, N>>,
            w1: &mut Array<Vector<F, N>>,
            w2: &mut Array<Vector<F, N>>,
            w3: &mut Array<Vector<F, N>>,
            w4: &mut Array<Vector<F, N>>,
            w5: &mut Array<Vector<F, N>>,
            g0: &Array<Vector<F, N>>,
            g1: &Array<Vector<F, N>>,
            g2: &Array<Vector<F, N>>,
            g3: &Array<Vector<F, N>>,
            g4: &Array<Vector<F, N>>,
            g5: &Array<Vector<F, N>>,
            $($own)*
        ) $body
    };
}
pub(super) use slot_kernel;

/// The arguments of a [`slot_kernel!`] launch: weights `w[0..SLOTS]` and gradients
/// `g[0..SLOTS]` (tensors), then the kernel's own fields.
macro_rules! slot_args {
    ($args:ident, $w:expr, $g:expr, { $($own:tt)* }) => {
        $args {
            w0: &$w[0],
            w1: &$w[1],
            w2: &$w[2],
            w3: &$w[3],
            w4: &$w[4],
            w5: &$w[5],
            g0: &$g[0],
            g1: &$g[1],
            g2: &$g[2],
            g3: &$g[3],
            g4: &$g[4],
            g5: &$g[5],
            $($own)*
        }
    };
}
pub(super) use slot_args;

/// Tensors (or blocks) one launch updates.
pub const SLOTS: usize = 6;
// The kernels bind six weights and six gradients (`slot_kernel!`).
const _: () = assert!(SLOTS == 6);
/// `u32` words per slot in the table: first cube, length, width, weight row stride,
/// weight offset, state offset, state stride, start in the slot (the fused step's; FRUGAL
/// uses the first six its own way).
pub(super) const SLOT_WORDS: usize = 8;

/// The launches of a step: the tensors `items` in groups of up to [`SLOTS`] of one
/// `kind` (dtype, vector width), in order within each kind, never two weights that
/// share elements in one group (the same weight twice, or overlapping views: their
/// bindings would alias; disjoint views of one flat buffer share a launch). A group is
/// listed when it fills, the open ones last.
pub(super) fn launch_groups<K: PartialEq>(
    items: impl IntoIterator<Item = usize>,
    kind: impl Fn(usize) -> K,
    weights: &[&Tensor],
) -> Vec<Vec<usize>> {
    let (mut open, mut full): (Vec<Vec<usize>>, Vec<Vec<usize>>) = (vec![], vec![]);
    for i in items {
        let joins = |g: &Vec<usize>| {
            kind(g[0]) == kind(i) && !g.iter().any(|&j| weights[j].overlaps(weights[i]))
        };
        match open.iter().position(joins) {
            Some(at) => open[at].push(i),
            None => open.push(vec![i]),
        }
        if let Some(at) = open.iter().position(|g| g.len() == SLOTS) {
            full.push(open.remove(at));
        }
    }
    full.extend(open);
    full
}

/// The items in groups of one `kind`, in order within each, as many to a group as
/// there are: the launches of a span step.
pub(super) fn kind_groups<K: PartialEq>(
    items: impl IntoIterator<Item = usize>,
    kind: impl Fn(usize) -> K,
) -> Vec<Vec<usize>> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for i in items {
        let k = kind(i);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, g)) => g.push(i),
            None => groups.push((k, vec![i])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// A step's weights and gradients as two spans (views of one flat buffer each, every
/// gradient at its weight's offset): a launch binds each span once (`w0`, `g0`) and
/// takes any number of slots at their offsets, each cube finding its own by a binary
/// search of the table ([`segment_of`]).
pub(super) struct Spans {
    /// The span of the weights.
    pub weights: Tensor,
    /// The span of the gradients.
    pub grads: Tensor,
    /// Each tensor's first element in the spans.
    pub offsets: Vec<usize>,
}

impl Spans {
    /// The spans of `weights` and `grads` where a span launch can take them: two to
    /// `max_slots` tensors (one gains nothing; a launch with a cube per tensor has a
    /// device limit), the weights disjoint views of one buffer (one dtype), the gradients
    /// views of one buffer at the same offsets, 4-aligned (views start at 256-byte
    /// boundaries: always; checked all the same).
    pub fn of(weights: &[&Tensor], grads: &[&Tensor], max_slots: usize) -> Option<Spans> {
        if weights.len() < 2 || weights.len() > max_slots {
            return None;
        }
        let (w, offsets) = Tensor::span(weights)?;
        let (g, g_offsets) = Tensor::span(grads)?;
        if offsets != g_offsets
            || w.numel() != g.numel()
            || w.numel() > crate::launch::MAX_ELEMENTS
            || offsets.iter().any(|o| o % 4 != 0)
        {
            return None;
        }
        // Disjoint: sorted by offset, each ends before the next begins.
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|&i| offsets[i]);
        let disjoint = order
            .windows(2)
            .all(|p| offsets[p[0]] + weights[p[0]].numel() <= offsets[p[1]]);
        disjoint.then_some(Spans {
            weights: w,
            grads: g,
            offsets,
        })
    }

    /// The span bindings of a launch whose slots end by element `end` of the spans,
    /// each first among [`SLOTS`] (the others `placeholders`: weights', then gradients').
    pub fn bind(&self, end: usize, placeholders: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let bind = |t: &Tensor, grad: bool| -> Result<Vec<Tensor>> {
            let mut v = vec![t.prefix(end)?];
            v.extend((1..SLOTS).map(|i| placeholders[i + SLOTS * grad as usize].clone()));
            Ok(v)
        };
        Ok((bind(&self.weights, false)?, bind(&self.grads, true)?))
    }
}

/// The slot of `cube`: the last of the launch's first `slots` (comptime) whose first cube
/// (word 0 of its `SLOT_WORDS` in `table`) is `<= cube`.
#[cube]
pub(super) fn slot_of(table: &Array<u32>, cube: u32, #[comptime] slots: u32) -> u32 {
    let mut b = 0u32;
    #[unroll]
    for s in 1..slots {
        b = select(
            cube >= table[(s * comptime!(SLOT_WORDS as u32)) as usize],
            s,
            b,
        );
    }
    b
}

/// The slot of `cube` among a span launch's `count` slots (a table as long as the
/// launch needs, first cubes non-decreasing): the last whose first cube is `<= cube`,
/// by a binary search (uniform in the cube; about 8 table reads for 200 slots).
#[cube]
pub(super) fn segment_of(table: &Array<u32>, cube: u32, count: u32) -> u32 {
    let words = comptime!(SLOT_WORDS as u32);
    let mut lo = 0u32;
    let mut hi = count;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if table[(mid * words) as usize] <= cube {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `slots[b][i]` for a slot index known only at run time (WGSL has no arrays of buffers),
/// among the launch's first `slots` (comptime): one slot reads without a branch. Why it
/// matters: lavapipe runs every branch masked, so each slot costs a load (a 4-wide copy
/// through a six-way pick ran at 0.61-0.66 of the plain copy).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn select_slot<F: Float, N: Size>(
    s0: &Array<Vector<F, N>>,
    s1: &Array<Vector<F, N>>,
    s2: &Array<Vector<F, N>>,
    s3: &Array<Vector<F, N>>,
    s4: &Array<Vector<F, N>>,
    s5: &Array<Vector<F, N>>,
    b: u32,
    i: u32,
    #[comptime] slots: u32,
) -> Vector<F, N> {
    let mut v = Vector::<F, N>::new(F::new(0.0));
    if comptime!(slots == 1) {
        v = s0[i as usize];
    } else {
        if b == 0 {
            v = s0[i as usize];
        }
        if b == 1 {
            v = s1[i as usize];
        }
        if comptime!(slots > 2) {
            if b == 2 {
                v = s2[i as usize];
            }
        }
        if comptime!(slots > 3) {
            if b == 3 {
                v = s3[i as usize];
            }
        }
        if comptime!(slots > 4) {
            if b == 4 {
                v = s4[i as usize];
            }
        }
        if comptime!(slots > 5) {
            if b == 5 {
                v = s5[i as usize];
            }
        }
    }
    v
}

/// `slots[b][i] = v` among the launch's first `slots` (comptime), as [`select_slot`].
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn store_slot<F: Float, N: Size>(
    s0: &mut Array<Vector<F, N>>,
    s1: &mut Array<Vector<F, N>>,
    s2: &mut Array<Vector<F, N>>,
    s3: &mut Array<Vector<F, N>>,
    s4: &mut Array<Vector<F, N>>,
    s5: &mut Array<Vector<F, N>>,
    b: u32,
    i: u32,
    v: Vector<F, N>,
    #[comptime] slots: u32,
) {
    if comptime!(slots == 1) {
        s0[i as usize] = v;
    } else {
        if b == 0 {
            s0[i as usize] = v;
        }
        if b == 1 {
            s1[i as usize] = v;
        }
        if comptime!(slots > 2) {
            if b == 2 {
                s2[i as usize] = v;
            }
        }
        if comptime!(slots > 3) {
            if b == 3 {
                s3[i as usize] = v;
            }
        }
        if comptime!(slots > 4) {
            if b == 4 {
                s4[i as usize] = v;
            }
        }
        if comptime!(slots > 5) {
            if b == 5 {
                s5[i as usize] = v;
            }
        }
    }
}

/// A slot table's words as u32, as the kernels index: an error naming `params` where an
/// offset into the packed state (or the masters, indices) does not fit, rather than
/// wrapped offsets (the packed buffers of a launch's tensors can pass 2^32 elements on
/// devices with large buffers).
pub(super) fn table_words(table: Vec<usize>) -> Result<Vec<u32>> {
    table
        .into_iter()
        .map(|x| {
            u32::try_from(x).map_err(|_| Error::Shape {
                tensor: "params".into(),
                expected: format!(
                    "optimizer state, master copies and indices of at most {} elements (32-bit offsets)",
                    u32::MAX
                ),
                found: format!("an offset of {x} elements"),
            })
        })
        .collect()
}
