//! Helpers for checking kernels against references: a seeded generator of test data
//! and error metrics. Used by the self-test cases, `kiln selftest` and the test suites.

/// SplitMix64: a small, seeded, reproducible generator of test inputs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// `n` normals scaled by `scale`.
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * scale).collect()
    }

    /// `n` standard normals, as [`Rng::normals`] below [`PARALLEL_NORMALS`] elements;
    /// above it, in chunks of 2^20 generated on every core, chunk `c` from its own
    /// generator seeded by this one's next value and `c` (the same values whatever the
    /// number of cores). For benchmark inputs: Mixtral's MoE layer takes about 1e9
    /// normals, 20 s or more on one core (Box-Muller's log and cosine per value), twice
    /// per benchmark on a lent GPU's 15 minutes.
    pub fn normals_parallel(&mut self, n: usize) -> Vec<f64> {
        if n < PARALLEL_NORMALS {
            return self.normals(n, 1.0);
        }
        const CHUNK: usize = 1 << 20;
        let base = self.next_u64();
        let mut out = vec![0.0; n];
        let mut chunks: Vec<(usize, &mut [f64])> = out.chunks_mut(CHUNK).enumerate().collect();
        let threads = crate::host_threads();
        let per_thread = chunks.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for group in chunks.chunks_mut(per_thread) {
                scope.spawn(move || {
                    for (c, part) in group.iter_mut() {
                        let mut rng =
                            Rng::new(base ^ (*c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                        for v in part.iter_mut() {
                            *v = rng.normal();
                        }
                    }
                });
            }
        });
        out
    }
}

/// From how many elements [`Rng::normals_parallel`] generates on every core (2^24: no
/// test input is that large, so tests draw the same values as before it existed).
pub const PARALLEL_NORMALS: usize = 1 << 24;

/// `sqrt(mean((x - r)^2)) / sqrt(mean(r^2))`: fla's error measure (the absolute RMS
/// when `r` is all 0). Infinities at the same place and sign in both count as equal.
pub fn rms_relative(x: &[f64], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len(), "rms_relative: lengths differ");
    let num: f64 = x
        .iter()
        .zip(r)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b) * (a - b) })
        .sum();
    let den: f64 = r.iter().filter(|b| b.is_finite()).map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Largest `|got - want|` over all elements, with [`max_rel_error`]'s rules for
/// non-finite values (a NaN on one side only is infinitely wrong: a plain `fold` with
/// `f64::max` would skip it).
pub fn max_abs_error(got: &[f64], want: &[f64]) -> f64 {
    max_rel_error_with(got, want, |_| 1.0)
}

/// Largest `|got - want| / (|want| + floor)` over all elements; matching infinities
/// count as exact, NaN on either side alone counts as infinitely wrong, and so does a
/// length mismatch.
pub fn max_rel_error(got: &[f64], want: &[f64], floor: f64) -> f64 {
    max_rel_error_with(got, want, |w| w.abs() + floor)
}

/// The largest `|got - want| / scale(want)`, non-finite values as [`max_rel_error`].
fn max_rel_error_with(got: &[f64], want: &[f64], scale: impl Fn(f64) -> f64) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g == w || (g.is_nan() && w.is_nan()) {
                0.0
            } else if g.is_nan() || w.is_nan() || g.is_infinite() || w.is_infinite() {
                f64::INFINITY
            } else {
                (g - w).abs() / scale(w)
            }
        })
        .fold(0.0, f64::max)
}

/// `ulps` times the machine epsilon of `dtype`.
pub fn tolerance(dtype: crate::DType, ulps: f64) -> f64 {
    dtype.epsilon() * ulps
}

/// Seeded random inputs of the shapes an operator derives from a `--shape` (`kiln
/// tune`, `kiln bench`, and the tests that need every operator's inputs). Floats are
/// normal and of `dtype`, except:
/// - inputs whose spec names one dtype keep it ([`crate::TensorSpec::example_dtype`]):
///   f32 states and scales, and integers: i32 (packed 4-bit codes) get random bits,
///   i8 uniform codes in -127..=127;
/// - inputs whose spec says [`ExampleValues::Positive`](crate::ExampleValues::Positive) (scales, divisors) are uniform
///   in [0.5, 1.5], and [`ExampleValues::LogDecay`](crate::ExampleValues::LogDecay) (gates of gated recurrences)
///   `logsigmoid(randn)` clamped at -5 (normal values would be positive gates), and
///   [`ExampleValues::LogSumExp`](crate::ExampleValues::LogSumExp) (an attention backward's lse) uniform in [4, 6];
/// - MoE routes ([`ExampleValues::ExpertIds`](crate::ExampleValues::ExpertIds), [`ExampleValues::SlotLocations`](crate::ExampleValues::SlotLocations)): a
///   valid routing in which every slot is full; [`ExampleValues::Permutation`](crate::ExampleValues::Permutation) a
///   shuffle of `0..n`, [`ExampleValues::Zero`](crate::ExampleValues::Zero) zeros.
///
/// `params` are the `--set` parameters (a layout parameter such as matmul's `trans_b`
/// changes a shape; the others are ignored here).
pub fn example_inputs(
    spec: &crate::OpSpec,
    dims: &[usize],
    params: &crate::ExampleParams,
    dtype: crate::DType,
) -> crate::Result<std::collections::BTreeMap<String, crate::HostTensor>> {
    example_inputs_seeded(spec, dims, params, dtype, 0x6b696c6e)
}

/// [`example_inputs`] from a given seed (property tests draw many).
pub fn example_inputs_seeded(
    spec: &crate::OpSpec,
    dims: &[usize],
    params: &crate::ExampleParams,
    dtype: crate::DType,
    seed: u64,
) -> crate::Result<std::collections::BTreeMap<String, crate::HostTensor>> {
    use crate::DType;
    use crate::ExampleValues;
    // The dtype of the operator's float inputs (integer inputs keep their own).
    if !DType::FLOATS.contains(&dtype) {
        return Err(crate::Error::Param {
            param: "--dtype".into(),
            expected: "a float dtype: f32 | f16 | bf16 (integer inputs keep their own)".into(),
            found: dtype.name().into(),
        });
    }
    let mut rng = Rng::new(seed);
    let mut hosts = std::collections::BTreeMap::new();
    for (name, shape) in (spec.example_inputs)(dims, params)? {
        let tspec = spec.inputs.iter().find(|t| t.name == name);
        let t = tspec.map_or(dtype, |t| t.example_dtype(dtype));
        // Refused before any value is generated (a huge --shape is not built on the host).
        let n = crate::checked_numel(name, &shape, t)?;
        let example = tspec.map_or(ExampleValues::Normal, |t| t.example);
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let values: Vec<f64> = match t {
            _ if example == ExampleValues::ExpertIds => (0..n).map(|j| (j % cols) as f64).collect(),
            _ if example == ExampleValues::SlotLocations => {
                (0..n).map(|j| (j / cols) as f64).collect()
            }
            _ if example == ExampleValues::Zero => vec![0.0; n],
            _ if example == ExampleValues::Permutation => {
                let mut p: Vec<f64> = (0..n).map(|j| j as f64).collect();
                for i in (1..n).rev() {
                    p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                p
            }
            DType::I32 | DType::U32 => (0..n)
                .map(|_| (rng.next_u64() as u32 as i32) as f64)
                .collect(),
            DType::I8 => (0..n)
                .map(|_| (rng.uniform() * 255.0).floor() - 127.0)
                .collect(),
            DType::U8 => (0..n).map(|_| (rng.uniform() * 256.0).floor()).collect(),
            _ if example == ExampleValues::Positive => {
                (0..n).map(|_| 0.5 + rng.uniform()).collect()
            }
            _ if example == ExampleValues::LogSumExp => {
                (0..n).map(|_| 4.0 + 2.0 * rng.uniform()).collect()
            }
            _ if example == ExampleValues::LogDecay => rng
                .normals_parallel(n)
                .into_iter()
                .map(|x| (-(1.0 + (-x).exp()).ln()).max(-5.0))
                .collect(),
            _ => rng.normals_parallel(n),
        };
        hosts.insert(
            name.to_string(),
            crate::HostTensor::from_f64(t, shape, &values)?,
        );
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_normals_are_reproducible_standard_normals() {
        // Below the threshold: the sequential generator's values.
        let small = Rng::new(7).normals_parallel(1000);
        assert_eq!(small, Rng::new(7).normals(1000, 1.0));
        // Above it (a partial last chunk): the same values on every call, mean 0 and
        // variance 1 within five standard errors, and chunks that are not copies.
        let n = PARALLEL_NORMALS + 12_345;
        let a = Rng::new(7).normals_parallel(n);
        assert_eq!(a, Rng::new(7).normals_parallel(n));
        let mean = a.iter().sum::<f64>() / n as f64;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        let se = 1.0 / (n as f64).sqrt();
        assert!(mean.abs() < 5.0 * se, "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * 2f64.sqrt() * se, "variance {var}");
        assert_ne!(a[..1 << 20], a[1 << 20..2 << 20]);
        assert_ne!(a, Rng::new(8).normals_parallel(n));
    }
}
