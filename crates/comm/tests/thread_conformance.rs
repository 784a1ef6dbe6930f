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

#[test]
fn conformance_on_1_to_8_thread_ranks() {
    for n in 1..=8 {
        ThreadComm::run(n, |mut c| conformance::run_all(&mut c).map_err(Failed))
            .unwrap_or_else(|e| panic!("{n} ranks: {e}"));
    }
}

#[test]
fn a_failing_rank_stops_the_others_promptly_and_is_reported() {
    let start = Instant::now();
    let err = ThreadComm::run(4, |c| -> Result<(), CommError> {
        if c.rank() == Rank(2) {
            return Err(CommError::Unavailable("rank 2 hit a bad batch".into()));
        }
        let mut buf = vec![1.0; 8];
        c.all_reduce(&mut buf, ReduceOp::Sum) // would wait 120 s for rank 2
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "communicator unavailable: rank 2 hit a bad batch"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
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
    let start = Instant::now();
    let err = ThreadComm::run_with_timeout(
        2,
        Duration::from_millis(500),
        |c| -> Result<(), CommError> {
            if c.rank() == Rank(1) {
                std::thread::sleep(Duration::from_secs(30)); // hangs, never communicates
                return Ok(());
            }
            c.barrier()
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("barrier") && msg.contains("rank 1 never arrived"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
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
    let start = Instant::now();
    let err = ThreadComm::run_with_timeout(
        3,
        Duration::from_millis(500),
        |c| -> Result<(), CommError> {
            if c.rank() == Rank(2) {
                std::thread::sleep(Duration::from_secs(30));
                return Ok(());
            }
            let mine = vec![c.rank().0 as f32; 4];
            c.window(&[&mine], &mut |_| {})?;
            Ok(())
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("window") && msg.contains("rank(s) 2 did not expose"),
        "{msg}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_panic_while_reading_a_window_is_reported_and_frees_the_others() {
    let start = Instant::now();
    let err = ThreadComm::run(3, |c| -> Result<(), CommError> {
        let mine = vec![c.rank().0 as f32; 1 << 16];
        let me = c.rank();
        c.window(&[&mine], &mut |exposed| {
            let peer = exposed.get(Rank((me.0 + 1) % 3), 0).unwrap_or(&[]);
            assert!(me != Rank(1), "rank 1 cannot read {} values", peer.len());
        })?;
        c.barrier()
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rank 1 panicked: rank 1 cannot read 65536 values"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}
