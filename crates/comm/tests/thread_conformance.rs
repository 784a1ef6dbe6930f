//! The conformance suite on `ThreadComm` with 1–8 ranks, plus the failure behaviour of `run`.

use std::time::{Duration, Instant};

use comm::{conformance, CommError, CommKind, Communicator, Counting, Rank, ReduceOp, ThreadComm};

#[derive(Debug)]
struct Failed(String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<CommError> for Failed {
    fn from(e: CommError) -> Self {
        Failed(e.to_string())
    }
}

/// Runs `job` (a run of thread ranks that must fail) and checks that it ended within `limit`:
/// its error's message.
fn fails_within<T: std::fmt::Debug>(
    limit: Duration,
    job: impl FnOnce() -> Result<T, CommError>,
) -> String {
    let start = Instant::now();
    let err = job().unwrap_err();
    let took = start.elapsed();
    assert!(took < limit, "took {took:?}: {err}");
    err.to_string()
}

/// `n` ranks with a 500 ms timeout, the last of which hangs (sleeps 30 s, never communicates)
/// while the others run `op`: what the run fails with, within 5 s.
fn one_rank_hangs(n: usize, op: fn(&ThreadComm) -> Result<(), CommError>) -> String {
    fails_within(Duration::from_secs(5), || {
        ThreadComm::run_with_timeout(n, Duration::from_millis(500), move |c| {
            if c.rank() == Rank(n - 1) {
                std::thread::sleep(Duration::from_secs(30));
                return Ok(());
            }
            op(&c)
        })
    })
}

#[test]
fn conformance_on_1_to_8_thread_ranks() {
    for n in 1..=8 {
        ThreadComm::run(n, |mut c| conformance::run_all(&mut c).map_err(Failed))
            .unwrap_or_else(|e| panic!("{n} ranks: {e}"));
    }
}

#[test]
fn a_failing_rank_stops_the_others_promptly_and_is_reported() {
    let msg = fails_within(Duration::from_secs(10), || {
        ThreadComm::run(4, |c| -> Result<(), CommError> {
            if c.rank() == Rank(2) {
                return Err(CommError::Unavailable("rank 2 hit a bad batch".into()));
            }
            let mut buf = vec![1.0; 8];
            c.all_reduce(&mut buf, ReduceOp::Sum) // would wait 120 s for rank 2
        })
    });
    assert_eq!(msg, "communicator unavailable: rank 2 hit a bad batch");
}

#[test]
fn a_panicking_rank_is_reported_with_its_message() {
    let err = ThreadComm::run(3, |c| -> Result<(), CommError> {
        if c.rank() == Rank(1) {
            panic!("boom in rank 1");
        }
        c.barrier()
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "rank 1 panicked: boom in rank 1");
}

#[test]
fn a_hung_rank_cannot_hang_the_caller() {
    let msg = one_rank_hangs(2, |c| c.barrier());
    assert!(msg.contains("barrier"), "{msg}");
    assert!(msg.contains("rank 1 never arrived"), "{msg}");
}

#[test]
fn counting_records_kind_group_and_bytes() {
    let logs = ThreadComm::run(4, |c| -> Result<_, CommError> {
        let counting = Counting::new(Box::new(c));
        let mut buf = vec![1.0; 10];
        counting.all_reduce(&mut buf, ReduceOp::Sum)?;
        let tp = counting.sub_group(&[
            Rank(counting.rank().0 / 2 * 2),
            Rank(counting.rank().0 / 2 * 2 + 1),
        ])?;
        let mut out = vec![0.0; 6];
        tp.all_gather(&[1.0; 3], &mut out, &[3, 3])?;
        Ok(counting.records())
    })
    .unwrap();
    for log in logs {
        let kinds: Vec<(CommKind, usize, usize)> = log
            .iter()
            .map(|r| (r.kind, r.group_size, r.bytes))
            .collect();
        assert_eq!(
            kinds,
            vec![(CommKind::AllReduce, 4, 40), (CommKind::AllGather, 2, 24)]
        );
    }
}

#[test]
fn length_mismatches_are_clear_errors() {
    let mut comms = ThreadComm::world(1);
    let c = comms.remove(0);
    let mut recv = vec![0.0; 3];
    let e = c.all_gather(&[1.0; 2], &mut recv, &[3]).unwrap_err();
    assert_eq!(e.to_string(), "all_gather: send has 2 elements, expected 3");
    let e = c.send(&[1.0], Rank(5), 0).unwrap_err();
    assert_eq!(e.to_string(), "send: rank 5 is not in a group of 1");
}

#[test]
fn a_window_a_rank_never_enters_times_out_naming_it() {
    let msg = one_rank_hangs(3, |c| {
        let mine = vec![c.rank().0 as f32; 4];
        c.window(&[&mine], &mut |_| {})?;
        Ok(())
    });
    assert!(msg.contains("window"), "{msg}");
    assert!(msg.contains("rank(s) 2 did not expose"), "{msg}");
}

#[test]
fn a_panic_while_reading_a_window_is_reported_and_frees_the_others() {
    let msg = fails_within(Duration::from_secs(10), || {
        ThreadComm::run(3, |c| -> Result<(), CommError> {
            let mine = vec![c.rank().0 as f32; 1 << 16];
            let me = c.rank();
            c.window(&[&mine], &mut |exposed| {
                let peer = exposed.get(Rank((me.0 + 1) % 3), 0).unwrap_or(&[]);
                assert!(me != Rank(1), "rank 1 cannot read {} values", peer.len());
            })?;
            c.barrier()
        })
    });
    assert_eq!(msg, "rank 1 panicked: rank 1 cannot read 65536 values");
}
