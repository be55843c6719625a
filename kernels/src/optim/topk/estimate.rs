//! Top-k's threshold estimate: the `round(k s / n)`-th largest magnitude key of `s`
//! seeded sample positions is the threshold, and every element at or above it is sent.
//! The sample is drawn and keyed in one pass (four positions a unit, one Philox block's
//! words), the general radix select ([`radix_select`]) finds the threshold over it,
//! then one pass forms `a` and keeps the candidates ([`form_candidates`]), and the
//! compaction. (One cube finding the threshold of the default 65 536 keys in a single
//! launch, eight 4-bit passes with per-unit counters, took 6.2 ms on lavapipe: as long
//! as the sixteen launches of the general select, whose later passes read only the
//! candidates, while one cube runs on one core.)
use super::*;

/// Top-k with an estimated threshold: the `round(k s / n)`-th largest `|a|` of `sample`
/// positions drawn from `seed` (uniform, with replacement) is the threshold, and every
/// element at or above it is taken (about `k`, not exactly; ties all taken). The
/// threshold stays on the device; then one pass over `grad` and `error` that forms and
/// writes `a` and keeps the candidates ([`form_candidates`]), and the compaction over
/// those; one small download (the count) sizes the outputs.
pub(crate) fn select_above_estimate(
    grad: &Tensor,
    error: Option<&Tensor>,
    k: usize,
    sample: usize,
    seed: u64,
) -> Result<Selected> {
    let n = grad.numel();
    let sample = sample.clamp(1, n);
    let formed = Formed::error_feedback(grad, error);
    let sampled = sample_keys(&formed, sample, seed)?;
    let k_sample = ((k as f64 * sample as f64 / n as f64).round() as usize).clamp(1, sample);
    // `[T, u32::MAX]`, on the device: every key >= T taken, all ties (at least the sampled
    // element whose key is T).
    let state = radix_select(&sampled, None, u32::MAX, sample, k_sample, None, true)?.state;
    let (a, _, kept) = form_candidates(&formed, state)?;
    compact_candidates(&a, &kept, n, None, 1.0)
}

/// The magnitude keys of `sample` (1..=n) positions of `formed`'s `a` drawn from
/// `seed` ([`topk_sample`]), `sample` rounded up to 4 long.
pub(super) fn sample_keys(formed: &Formed, sample: usize, seed: u64) -> Result<Tensor> {
    let (grad, error) = (formed.grad, formed.error);
    let client = grad.client();
    let sampled = Tensor::empty(client, DType::U32, &[sample.next_multiple_of(4)])?;
    let key = crate::random::seed_key(seed);
    TopkSample::tuned(
        client,
        0.0,
        &TopkSampleArgs {
            grad,
            error: &crate::launch::or_absent(client, error)?,
            h: &crate::launch::or_absent(client, formed.h)?,
            sampled: &sampled,
            n: grad.numel() as u32,
            sample: sample as u32,
            blocks: sample.div_ceil(4) as u32,
            key0: key[0],
            key1: key[1],
            eta: formed.eta,
            has_error: error.is_some(),
            has_h: formed.h.is_some(),
        },
    )?;
    Ok(sampled)
}

/// `sampled[j]` = the magnitude key of `a[p_j] = eta error[p_j] + grad[p_j] - h[p_j]`
/// (f32, as [`formed`] forms it; no `error` without `has_error`, no `h` without
/// `has_h`), `p_j` uniform in `0..n` from
/// Philox word `j` of `seed` (`mul_hi(word, n)`: bias below `n / 2^32`). Unit `b` draws
/// positions `4b .. 4b + 4` from one Philox block (`blocks` = `sample / 4` rounded up)
/// and stores their keys as one vector; keys past `sample` are 0 and never counted.
#[kiln_macros::kernel(
    tune(UNITS = [256]),
    key(n = pow2, dtype),
    grid = cubes(blocks.div_ceil(UNITS)),
    cube = UNITS
)]
pub fn topk_sample<F: Float>(
    grad: &Array<F>,
    error: &Array<f32>,
    h: &Array<f32>,
    sampled: &mut Array<Vector<u32, Const<4>>>,
    n: u32,
    sample: u32,
    blocks: u32,
    key0: u32,
    key1: u32,
    eta: f32,
    #[comptime] has_error: bool,
    #[comptime] has_h: bool,
) {
    let b = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * UNITS + UNIT_POS;
    if b < blocks {
        let r = philox4x32_10(b, 1u32, 0u32, 0u32, key0, key1);
        let mut keys = Vector::<u32, Const<4>>::new(0u32);
        #[unroll]
        for l in 0..4u32 {
            let w = select(
                l == 0,
                r.x0,
                select(l == 1, r.x1, select(l == 2, r.x2, r.x3)),
            );
            let p = u32::mul_hi(w, n) as usize;
            let mut v = f32::cast_from(grad[p]);
            if comptime!(has_error) {
                v = eta * error[p] + v;
            }
            if comptime!(has_h) {
                v -= h[p];
            }
            let key = u32::reinterpret(v) & 0x7FFF_FFFFu32;
            keys[l as usize] = select(4u32 * b + l < sample, key, 0u32);
        }
        sampled[b as usize] = keys;
    }
}
