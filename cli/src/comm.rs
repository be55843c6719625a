//! `kiln nccl-id` and `kiln comm-check`.

use kiln::runtime::comm::check::check_collectives;
use kiln::runtime::comm::nccl::NcclId;
use kiln::runtime::comm::{Communicator, HostComm};
use kiln::{Client, Device, Error, Result};
use std::process::ExitCode;
use std::time::Duration;

pub fn nccl_id() -> Result<ExitCode> {
    println!("{}", NcclId::new()?);
    Ok(ExitCode::SUCCESS)
}

/// Runs [`check_collectives`] on every rank (one thread each) and prints each rank's
/// lines; fails if any rank failed.
fn report<C: Communicator>(comms: Vec<C>) -> Result<ExitCode> {
    let results: Vec<Result<Vec<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || check_collectives(&c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|p| {
                    Err(Error::Device(format!(
                        "rank thread panicked: {}",
                        kiln::runtime::panic_message(&*p)
                    )))
                })
            })
            .collect()
    });
    let mut failed = 0;
    for (rank, r) in results.iter().enumerate() {
        match r {
            Ok(lines) => lines.iter().for_each(|l| println!("rank {rank}: {l}")),
            Err(e) => {
                failed += 1;
                println!("rank {rank}: FAILED {e}");
            }
        }
    }
    let world = results.len();
    println!(
        "{} ranks: {}",
        world,
        if failed == 0 {
            "every collective matches the host reference".to_string()
        } else {
            format!("{failed} failed")
        }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The most ranks `comm-check --backend host` runs.
const HOST_RANKS: usize = 128;

pub fn comm_check(
    backend: &str,
    ranks: usize,
    device: Option<String>,
    timeout: u64,
) -> Result<ExitCode> {
    let timeout = Duration::from_secs(timeout);
    match backend {
        "host" if ranks > HOST_RANKS => Err(Error::Param {
            param: "--ranks".into(),
            expected: format!(
                "1..={HOST_RANKS} with --backend host (one thread per rank, every transfer through one device's queue: the check's time grows as the square of the ranks, about 150 s at 128 on a CPU adapter)"
            ),
            found: ranks.to_string(),
        }),
        "host" => {
            let client = Client::open(&super::device_arg(device)?)?;
            println!(
                "HostComm, {ranks} ranks on {} ({})",
                client.report().selector,
                client.name()
            );
            report(HostComm::with_timeout(vec![client; ranks], timeout))
        }
        "nccl" => nccl_check(ranks, device, timeout),
        other => Err(Error::Param {
            param: "--backend".into(),
            expected: "host or nccl".into(),
            found: other.into(),
        }),
    }
}

#[cfg(feature = "cuda")]
fn nccl_check(ranks: usize, device: Option<String>, timeout: Duration) -> Result<ExitCode> {
    use kiln::runtime::comm::nccl::{nccl_version, NcclComm};
    if let Some(d) = device {
        return Err(Error::Param {
            param: "--device".into(),
            expected: "nothing for --backend nccl (ranks take cuda:0..N-1)".into(),
            found: d,
        });
    }
    let (version, at) = nccl_version()?;
    let gpus = kiln::runtime::cuda_device_count();
    let selectors: Vec<String> = (0..ranks)
        .map(|r| format!("cuda:{}", if gpus >= ranks { r } else { 0 }))
        .collect();
    let clients = selectors
        .iter()
        .map(|s| Device::parse(s).and_then(|d| Client::open(&d)))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "NCCL {version} ({}), {ranks} ranks on {}",
        at.found_by,
        selectors.join(", ")
    );
    let comms = NcclComm::from_devices(&clients)?
        .into_iter()
        .map(|c| c.with_timeout(timeout))
        .collect();
    report(comms)
}

#[cfg(not(feature = "cuda"))]
fn nccl_check(_: usize, _: Option<String>, _: Duration) -> Result<ExitCode> {
    Err(Error::Device(
        "NCCL: this build of kiln has no CUDA backend (built without the `cuda` feature)".into(),
    ))
}
