//! Every collective of a [`Communicator`] against a host reference, on whatever
//! implementation and device: the tests run it over [`HostComm`](super::HostComm) on
//! lavapipe, `kiln comm-check` over HostComm or NCCL on any device (the GPU script's
//! NCCL lines). Call it on every rank at once (one thread per rank); each rank builds
//! its inputs from (rank, world size) and checks what it receives, so no rank needs
//! another's results.

use super::Communicator;
use crate::{DType, Error, HostTensor, Result, Tensor};

/// Rank `r`'s value at element `i`: small integers, so sums are exact in any float
/// dtype and in any order (NCCL's reduction order is its own).
fn value(r: usize, i: usize) -> f64 {
    ((r * 7 + i * 3) % 13) as f64 - 6.0
}

fn values(r: usize, range: std::ops::Range<usize>) -> Vec<f64> {
    range.map(|i| value(r, i)).collect()
}

/// The cases this rank passed, one line each; the first failure as an
/// [`Error::Comm`] naming the case, or the communicator's own error.
pub fn check_collectives(c: &dyn Communicator) -> Result<Vec<String>> {
    let (rank, world) = (c.rank(), c.world_size());
    let client = c.client();
    let up = |dtype: DType, shape: &[usize], v: &[f64]| -> Result<Tensor> {
        Tensor::upload(client, &HostTensor::from_f64(dtype, shape.to_vec(), v)?)
    };
    let expect = |case: &str, got: &Tensor, shape: &[usize], want: &[f64]| -> Result<String> {
        let h = got.download()?;
        let fail = |message: String| Error::Comm {
            op: case.into(),
            rank,
            peer: None,
            message,
        };
        if h.shape != shape {
            return Err(fail(format!(
                "shape {:?}, the reference {shape:?}",
                h.shape
            )));
        }
        if let Some((i, (g, w))) = h
            .to_f64()
            .iter()
            .zip(want)
            .enumerate()
            .find(|(_, (g, w))| g != w)
        {
            return Err(fail(format!("element {i} is {g}, the reference {w}")));
        }
        Ok(format!("ok  {case} {shape:?}"))
    };
    let mut lines = Vec::new();

    // all_reduce: every float dtype the device has.
    for dtype in DType::FLOATS.into_iter().filter(|d| client.supports(*d)) {
        let shape = [3, 5];
        let t = up(dtype, &shape, &values(rank, 0..15))?;
        let want: Vec<f64> = (0..15)
            .map(|i| (0..world).map(|r| value(r, i)).sum())
            .collect();
        lines.push(expect(
            &format!("all_reduce {dtype}"),
            &c.all_reduce(&t)?,
            &shape,
            &want,
        )?);
    }

    // all_gather, equal rows and uneven rows (rank r has r % 3 rows: some have none).
    let even = |_: usize| 2usize;
    let uneven = |r: usize| r % 3;
    let cases: [(&str, &dyn Fn(usize) -> usize); 2] =
        [("all_gather", &even), ("all_gather uneven", &uneven)];
    for (case, rows_of) in cases {
        let mine = rows_of(rank);
        let start = |r: usize| (0..r).map(rows_of).sum::<usize>() * 3;
        let t = up(
            DType::F32,
            &[mine, 3],
            &values(rank, start(rank)..start(rank) + mine * 3),
        )?;
        let total: usize = (0..world).map(rows_of).sum();
        let want: Vec<f64> = (0..world)
            .flat_map(|r| values(r, start(r)..start(r) + rows_of(r) * 3))
            .collect();
        lines.push(expect(case, &c.all_gather(&t)?, &[total, 3], &want)?);
    }

    // all_to_all: rank r sends (r + j) % 3 rows to rank j (zero-size splits included),
    // in f32 and in i32 (the data moves as bytes).
    for dtype in [DType::F32, DType::I32] {
        let split = |r: usize, j: usize| (r + j) % 3;
        let counts: Vec<usize> = (0..world).map(|j| split(rank, j)).collect();
        let n: usize = counts.iter().sum();
        let t = up(dtype, &[n, 2], &values(rank, 0..2 * n))?;
        let (out, from) = c.all_to_all(&t, &counts)?;
        let want_from: Vec<usize> = (0..world).map(|r| split(r, rank)).collect();
        if from != want_from {
            return Err(Error::Comm {
                op: format!("all_to_all {dtype}"),
                rank,
                peer: None,
                message: format!("row counts {from:?}, the reference {want_from:?}"),
            });
        }
        let mut want = Vec::new();
        for r in 0..world {
            let before: usize = (0..rank).map(|k| split(r, k)).sum();
            want.extend(values(r, 2 * before..2 * (before + split(r, rank))));
        }
        let rows = want.len() / 2;
        lines.push(expect(
            &format!("all_to_all {dtype}"),
            &out,
            &[rows, 2],
            &want,
        )?);
    }

    // A ring of `world` send_recv steps brings every block home.
    let mut block = up(DType::F32, &[4], &values(rank, 0..4))?;
    for _ in 0..world {
        block = c.send_recv(&block, (rank + 1) % world, (rank + world - 1) % world)?;
    }
    lines.push(expect("send_recv ring", &block, &[4], &values(rank, 0..4))?);

    // send / recv between pairs (0→1, 2→3, ...); an odd last rank sits out.
    if world >= 2 && !(world % 2 == 1 && rank == world - 1) {
        let len = 6;
        if rank % 2 == 0 {
            c.send(&up(DType::F32, &[len], &values(rank, 0..len))?, rank + 1)?;
            lines.push(format!("ok  send to rank {}", rank + 1));
        } else {
            let got = c.recv(rank - 1, DType::F32, &[len])?;
            lines.push(expect("recv", &got, &[len], &values(rank - 1, 0..len))?);
        }
    }

    c.barrier()?;
    lines.push("ok  barrier".into());
    Ok(lines)
}
