//! Both layouts of the passes over every element ([`super::contiguous_regions`]): a
//! device runs only its own, so each is forced here and checked against the host
//! selection (sort by key, ties to the lower index), on a multi-cube ragged length and
//! on one that is not a multiple of 4 (the 1-wide keys pass), and through the threshold
//! estimate (the passes over its sample; every tie of the threshold taken).

use super::*;
use crate::optim::compress::{magnitude_keys, reference_select};
use kiln_runtime::{check::Rng, HostTensor};
use std::cell::Cell;

thread_local! {
    /// `Some(contiguous)` overrides the device's layout on this thread.
    pub(super) static LAYOUT: Cell<Option<bool>> = const { Cell::new(None) };
}

fn upload(client: &Client, values: &[f32]) -> Tensor {
    let host = HostTensor::from_f32(vec![values.len()], values).unwrap();
    Tensor::upload(client, &host).unwrap()
}

fn indices(t: &Tensor) -> Vec<usize> {
    t.download()
        .unwrap()
        .to_f64()
        .iter()
        .map(|&v| v as usize)
        .collect()
}

#[test]
fn both_layouts_select_the_reference_set() {
    let client = Client::from_env().unwrap();
    for (n, k) in [
        (100_003usize, 1_000usize),
        (100_004, 50_002),
        (70_001, 35_001),
        (65_540, 1),
    ] {
        let mut rng = Rng::new(n as u64);
        // Magnitudes near 1 (the keys pass counts the second digit: its pass is skipped)
        // and near 1e12 (a first digit it does not count under: the pass runs).
        let scale = if n % 2 == 0 { 1.0 } else { 1e12 };
        let g: Vec<f32> = rng.normals(n, scale).iter().map(|&v| v as f32).collect();
        let e: Vec<f32> = rng
            .normals(n, 0.3 * scale)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let a: Vec<f32> = g.iter().zip(&e).map(|(g, e)| e + g).collect();
        let magnitude = reference_select(&magnitude_keys(&a), k);
        // FRUGAL's keys: the Philox word of each index.
        let (seed, stream) = (7u64, 3u32);
        let words: Vec<u32> = (0..n as u64)
            .map(|i| crate::random::word(seed, stream, i))
            .collect();
        let random = reference_select(&words, k);
        let (gt, et) = (upload(&client, &g), upload(&client, &e));
        for contiguous in [true, false] {
            LAYOUT.set(Some(contiguous));
            let what = format!("n {n}, k {k}, contiguous {contiguous}");
            let got = select_top_k(&gt, Some(&et), k, KeySource::Magnitude, (0, 0), 1.0);
            assert_eq!(
                indices(&got.unwrap().indices),
                magnitude,
                "{what}: magnitude"
            );
            let got = select_top_k(&gt, None, k, KeySource::Random, (seed, stream), 1.0);
            assert_eq!(
                indices(&got.unwrap().indices),
                random,
                "{what}: random keys"
            );
        }
        LAYOUT.set(None);
    }
}

#[test]
fn both_layouts_select_the_estimates_threshold() {
    let client = Client::from_env().unwrap();
    let (n, k, seed) = (100_003usize, 1_000usize, 5u64);
    let mut rng = Rng::new(3);
    let g: Vec<f32> = rng.normals(n, 1.0).iter().map(|&v| v as f32).collect();
    let keys = magnitude_keys(&g);
    let gt = upload(&client, &g);
    // A ragged sample (its 4-wide tail masked) and one of a single key.
    for sample in [9_999usize, 1] {
        // The threshold: the round(k s / n)-th largest key of the seeded sample.
        let mut sampled: Vec<u32> = (0..sample as u64)
            .map(|j| keys[((crate::random::word(seed, 1, j) as u64 * n as u64) >> 32) as usize])
            .collect();
        sampled.sort_unstable_by(|x, y| y.cmp(x));
        let k_sample = ((k * sample) as f64 / n as f64)
            .round()
            .clamp(1.0, sample as f64);
        let threshold = sampled[k_sample as usize - 1];
        let want: Vec<usize> = (0..n).filter(|&i| keys[i] >= threshold).collect();
        for contiguous in [true, false] {
            LAYOUT.set(Some(contiguous));
            let got = select_above_estimate(&gt, None, k, sample, seed).unwrap();
            let what = format!("sample {sample}, contiguous {contiguous}");
            assert_eq!(indices(&got.indices), want, "{what}");
        }
        LAYOUT.set(None);
    }
}
