//! Running independent jobs on several threads while reporting their results in order
//! (the self-test's `--jobs`): a result is handed on as soon as it and every one
//! before it are done, so the output reads as a sequential run's would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Runs `work` on every item, `jobs` at a time (each on a thread of its own; 1: on this
/// thread), and calls `report` with each item and its result in the items' order.
/// Workers take the next item in order, so the earliest items finish first.
pub fn run_in_order<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
    mut report: impl FnMut(&T, R),
) {
    if jobs <= 1 {
        for item in items {
            report(item, work(item));
        }
        return;
    }
    let next = AtomicUsize::new(0);
    let (done, arrived) = mpsc::channel::<(usize, R)>();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(items.len()) {
            let (done, next, work) = (done.clone(), &next, &work);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(k) else { break };
                if done.send((k, work(item))).is_err() {
                    break;
                }
            });
        }
        drop(done);
        let mut pending = BTreeMap::new();
        let mut printed = 0;
        for (k, result) in arrived {
            pending.insert(k, result);
            while let Some(result) = pending.remove(&printed) {
                report(&items[printed], result);
                printed += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn results_come_in_item_order_whatever_order_they_finish_in() {
        // Earlier items take longer, so they finish after later ones.
        let items: Vec<u64> = (0..12).collect();
        for jobs in [1, 3, 8, 20] {
            let mut seen = Vec::new();
            run_in_order(
                &items,
                jobs,
                |&i| {
                    std::thread::sleep(Duration::from_millis(2 * (12 - i)));
                    i * i
                },
                |&i, r| seen.push((i, r)),
            );
            let want: Vec<(u64, u64)> = items.iter().map(|&i| (i, i * i)).collect();
            assert_eq!(seen, want, "jobs = {jobs}");
        }
    }

    #[test]
    fn no_items_and_more_jobs_than_items_are_fine() {
        let mut n = 0;
        run_in_order(&[] as &[u8], 4, |_| 0, |_, _: i32| n += 1);
        run_in_order(&[7u8], 4, |&x| x, |_, r| n += r as i32);
        assert_eq!(n, 7);
    }
}
