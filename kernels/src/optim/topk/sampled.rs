//! Exact top-k by magnitude through a sampled bracket: one pass over the data instead
//! of three. The `r`-th largest magnitude of a seeded sample of `BRACKET_SAMPLE`
//! positions (`r` is `k`'s share of the sample plus a margin of `MARGIN_SIGMAS`
//! standard deviations of that share and `MARGIN_RANKS`, so at least `k` elements lie at
//! or above it except with a probability below about 10⁻⁶ whatever the data: see
//! [`bracket_rank`]) is a threshold `T_lo`;
//! one pass forms and writes `a` and keeps every element at or above `T_lo` as a
//! candidate ([`topk_form_candidates`], about `1.2 k` of them at `k = n / 100`); the
//! radix select's eight passes then read only the candidates, and the compaction
//! takes exactly `k`, ties to the lower indices. Where the pass kept fewer than `k`
//! (the sample misled: chance, or data built against the seed),
//! [`topk_candidates_short`] drops the threshold to 0 and a second launch of the pass
//! keeps every element, so the select is exact on every input; where it kept enough,
//! that launch returns at once. The indices, values and error are the radix select's
//! over every key, bit for bit (the compression-error norm is summed per cube in another
//! grouping: the same to f32 rounding), and nothing waits on the host. EControl's
//! selection takes it too, with its `p` formed ([`Formed`]) and written twice.
//!
//! Passes over every element: the sample's pass reads `BRACKET_SAMPLE` elements, the
//! pass that keeps candidates the three streams of a copy (against five for the select
//! over every key: the keys pass, a histogram pass, the pass that keeps candidates).
use super::*;

/// Positions in the sample the bracket is drawn from.
pub const BRACKET_SAMPLE: usize = 65_536;
/// The seed of the bracket's sample positions: any fixed value (the selection does not
/// depend on it; only whether the refill runs does).
pub const BRACKET_SEED: u64 = 0x6b69_6c6e_746f_706b;
/// The bracket's margin above `k`'s share of the sample, in standard deviations of that
/// share (binomial)...
const MARGIN_SIGMAS: f64 = 5.0;
/// ... and in ranks: where `k`'s share of the sample is a few draws the count is
/// Poisson-like, and five standard deviations alone would leave a tail of 10⁻⁵.
const MARGIN_RANKS: usize = 6;

/// Whether exact top-k of `k` of `n` elements by magnitude takes the sampled bracket
/// (else the radix select over every key): `n` of at least 2^19 (the sample's and the
/// candidate passes' launches cost about 10 ms on lavapipe whatever `n`: at 2^18 the
/// select over every key was faster, 9.5 against 11-14 ms; at 2^19 13.6 against 16.7-17.1
/// ms; at 2^22 57-60 against 99-100 ms, k = n / 100) and `k` at most `n / 2` (at `k = n`
/// the candidates are every element, which the candidate passes read slower than the
/// full passes read keys: 289 against 220 ms at 2^22; at `n / 2` 164 against 194 ms).
pub fn bracket_pays(n: usize, k: usize) -> bool {
    n >= 8 * BRACKET_SAMPLE && k.saturating_mul(2) <= n
}

/// The rank in a sample of `s` positions (of `n`) whose key is the bracket's threshold
/// for `k`: `k s / n` plus `MARGIN_SIGMAS` binomial standard deviations plus
/// `MARGIN_RANKS`. The pass keeps fewer than `k` only where at least `r` of the `s` draws
/// land among the `k − 1` largest keys, a binomial tail (scipy): 1.9·10⁻⁷ at `k = n / 100`,
/// 2.3·10⁻⁷ at `n / 2`, 1.2·10⁻⁸ at `k s / n` = 12.5, 1.9·10⁻¹⁰ at 0.875 (the 8 largest
/// of 2^19, where five standard deviations alone would leave 3.6·10⁻⁵).
pub fn bracket_rank(n: usize, k: usize, s: usize) -> usize {
    let share = k as f64 / n as f64;
    let mean = share * s as f64;
    let sd = (mean * (1.0 - share)).sqrt();
    ((mean + MARGIN_SIGMAS * sd).ceil() as usize + MARGIN_RANKS).clamp(1, s)
}

/// Exact top-k of `formed`'s `a` by magnitude through the sampled bracket (see the
/// module doc), compacted with `scale`: `a` and the selection (whose error is the copy
/// with `twice`, else `a`, overwritten where taken).
pub(crate) fn select_top_k_sampled(
    formed: &Formed,
    k: usize,
    scale: f32,
) -> Result<(Tensor, Selected)> {
    let client = formed.grad.client();
    let n = formed.grad.numel();
    let s = BRACKET_SAMPLE.min(n);
    let sampled = sample_keys(formed, s, BRACKET_SEED)?;
    // `[T_lo, u32::MAX]`: every key at or above T_lo is a candidate.
    let lo = radix_select(
        &sampled,
        None,
        u32::MAX,
        s,
        bracket_rank(n, k, s),
        None,
        true,
    )?;
    let (a, copy, kept) = form_candidates(formed, lo.state)?;
    let short = Tensor::empty(client, DType::U32, &[1])?;
    TopkCandidatesShort::tuned(
        client,
        0.0,
        &TopkCandidatesShortArgs {
            stored: &kept.stored,
            state: &kept.state,
            short: &short,
            regions: kept.stored.numel() as u32,
            k: k as u32,
        },
    )?;
    launch_form(formed, &a, &copy, &kept, Some(&short))?;
    // The radix select over the candidates alone: all eight digits.
    let kept = Candidates {
        state: upload_u32(client, "topk_state", &[0, k as u32])?,
        ..kept
    };
    let cubes = candidate_cubes(n);
    let hist = Tensor::empty(client, DType::U32, &[cubes * BINS as usize])?;
    let spec = Tensor::empty(client, DType::U32, &[4])?;
    for pass in 0..32 / DIGIT_BITS {
        // `sampled` stands for the keys, which a pass over the candidates does not read.
        radix_histogram(
            &sampled,
            &kept,
            &hist,
            n,
            pass,
            false,
            RadixSource::Candidates,
        )?;
        let (shift, _) = digit_of_pass(pass);
        radix_choose(&hist, &spec, &kept.state, cubes, shift, false, false)?;
    }
    let selected = compact_candidates(&copy, &kept, n, Some(k), scale)?;
    Ok((a, selected))
}

/// One cube: whether the candidates kept (`stored`: their number per region, `regions`
/// of them) are fewer than `k`. Then the threshold `state[0]` drops to 0 and `short[0]`
/// is 1, so that the refill ([`topk_form_candidates`] with `refill`) keeps every
/// element; else `short[0]` is 0.
#[kiln_macros::kernel(tune(UNITS = [256]), grid = (1), cube = UNITS)]
pub fn topk_candidates_short(
    stored: &Array<u32>,
    state: &mut Array<u32>,
    short: &mut Array<u32>,
    regions: u32,
    k: u32,
) {
    // At most n < 2^32 in all.
    let mut total = 0u32;
    let mut r = UNIT_POS;
    while r < regions {
        total += stored[r as usize];
        r += UNITS;
    }
    let mut smem = SharedMemory::<u32>::new(comptime!((CUBE + BINS) as usize));
    let before = cube_exclusive_sum_u32(&mut smem, total);
    if UNIT_POS == comptime!(CUBE - 1) {
        let few = before + total < k;
        short[0] = select(few, 1u32, 0u32);
        if few {
            state[0] = 0u32;
        }
    }
}
