//! `kiln bench`: time one operator at one shape on one device (after tuning, which is
//! not timed): the median time per call over several samples, each a run of calls back
//! to back ended by one device sync (as PyTorch's and Triton's timers measure), and the
//! latency of one call with its sync; throughput, and the fraction of the device's peak
//! where kiln knows it.

use crate::tune::{device_inputs, parse_shape};
use kiln::{Client, DType, Device, Result, Tensor};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

/// How long one timed sample lasts at least (calls back to back, then one sync).
const SAMPLE_SECONDS: f64 = 0.01;
/// The most calls in one sample.
const MAX_REPS: usize = 200;

/// Dense peak (TFLOP/s for this dtype, TB/s) of devices kiln knows, by name.
/// f16/bf16: tensor-core dense; f32: the FP32 (non-tensor) rate.
fn peak(name: &str, dtype: DType) -> Option<(f64, f64)> {
    let flops = |half: f64, single: f64| if dtype == DType::F32 { single } else { half };
    if name.contains("H200") {
        Some((flops(989.0, 67.0), 4.8))
    } else if name.contains("H100") {
        Some((flops(989.0, 67.0), 3.35))
    } else {
        None
    }
}

pub fn run(
    op: &str,
    shape: &str,
    dtype: &str,
    device: Option<String>,
    samples: usize,
    params: &BTreeMap<String, String>,
    json: bool,
) -> Result<ExitCode> {
    let spec = kiln::kernels::op(op)?;
    let dims = parse_shape(shape)?;
    let dtype = DType::parse(dtype)?;
    let device = match device {
        Some(d) => Device::parse(&d)?,
        None => Device::from_env()?,
    };
    let client = Client::open(&device)?;
    client.require_dtype("x", dtype)?;
    let hosts = device_inputs(&client, spec, &dims, params, dtype)?;
    let mut tensors = BTreeMap::new();
    for (name, h) in &hosts {
        tensors.insert(name.clone(), Tensor::upload_named(&client, name, h)?);
    }
    // An operator that copies its inputs to stay out of place (optimizer steps) is timed
    // in place, as a training loop runs it: set up once, then the step repeated.
    let mut work: Box<dyn FnMut() -> Result<()>> = match spec.in_place {
        Some(prepare) => prepare(&client, &spec.bind(tensors, params.clone())?)?,
        None => {
            let (client, params) = (client.clone(), params.clone());
            Box::new(move || {
                spec.call(&client, tensors.clone(), params.clone())
                    .map(drop)
            })
        }
    };
    // First call tunes (on first use) and compiles; the second warms caches.
    crate::progress::announce_tuning(spec.name);
    work()?;
    client.sync()?;
    work()?;
    client.sync()?;
    // Latency: one call, then a device sync, `samples` times.
    let mut latency = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        let t = Instant::now();
        work()?;
        client.sync()?;
        latency.push(t.elapsed().as_secs_f64());
    }
    latency.sort_by(f64::total_cmp);
    // Time per call: `reps` calls back to back, then one sync (as PyTorch's and Triton's
    // timers measure), with `reps` making a sample last about SAMPLE_SECONDS. This is
    // the figure reported: on a GPU the per-call sync costs tens to hundreds of
    // microseconds, which a short kernel must not be charged in a throughput.
    let reps = ((SAMPLE_SECONDS / latency[0].max(1e-9)).ceil() as usize).clamp(1, MAX_REPS);
    let mut times = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        let t = Instant::now();
        for _ in 0..reps {
            work()?;
        }
        client.sync()?;
        times.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let latency_median = latency[latency.len() / 2];
    let (flops, bytes) = (spec.cost)(&dims, dtype.size());
    let gflops = flops / median / 1e9;
    let gbps = bytes / median / 1e9;
    let r = client.report();
    let peak = peak(&r.name, dtype);
    if json {
        let v = serde_json::json!({
            "op": spec.name, "shape": dims, "dtype": dtype.name(), "params": params,
            "in_place": spec.in_place.is_some(),
            "device": r.name, "backend": r.backend,
            "median_ms": median * 1e3, "min_ms": times[0] * 1e3, "samples": times.len(),
            "calls_per_sample": reps, "latency_ms": latency_median * 1e3,
            // The mode in force (`KILN_AUTOTUNE` as kiln read it), not the raw text.
            "autotune": match kiln::runtime::Autotuner::global().mode() {
                kiln::runtime::TuneMode::On => "on",
                kiln::runtime::TuneMode::CacheOnly => "cache",
                kiln::runtime::TuneMode::Off => "off",
            },
            "gflops": gflops, "gbytes_per_s": gbps,
            "peak_tflops": peak.map(|p| p.0), "peak_tbytes_per_s": peak.map(|p| p.1),
            "flops_fraction_of_peak": peak.map(|p| gflops / (p.0 * 1e3)),
            "bandwidth_fraction_of_peak": peak.map(|p| gbps / (p.1 * 1e3)),
        });
        println!("{v}");
    } else {
        println!(
            "{} {dims:?} {dtype} on {} ({:?}){}",
            spec.name,
            r.name,
            r.backend,
            match spec.in_place {
                Some(_) => ", in place (set up once, the step repeated)",
                None => "",
            }
        );
        println!(
            "median {:.3} ms (min {:.3}; {} samples of {reps} calls, then a sync): {gflops:.2} GFLOP/s, {gbps:.2} GB/s",
            median * 1e3,
            times[0] * 1e3,
            times.len()
        );
        println!(
            "latency {:.3} ms (median of {} calls, each followed by a sync)",
            latency_median * 1e3,
            latency.len()
        );
        match peak {
            Some((tf, tb)) => println!(
                "{:.1}% of {tf} TFLOP/s peak, {:.1}% of {tb} TB/s",
                100.0 * gflops / (tf * 1e3),
                100.0 * gbps / (tb * 1e3)
            ),
            None => println!("peak of this device unknown to kiln: no fraction reported"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
