//! PipeDream-2BW on thread ranks against its update rule run on one device by hand:
//! `W(t+1) = W(t) - AdamW(grad f_t(W(t-1)))` with `W(-1) = W(0)` (Narayanan et al. 2021, §3.1),
//! four steps with clipping, the last drained. The pipelined weights equal the single device's
//! within 1e-5, and differ from synchronous training (so the delay is really there).

use std::sync::Arc;

use comm::ThreadComm;
use graph::Strategy;
use model::{param_specs, LlamaConfig, Weights};
use runtime::{stash, Stashing};

mod common;

const STEPS: usize = 4;

fn config() -> LlamaConfig {
    common::config(4, 2, true, None)
}

/// The global batch of step `s`: eight sequences, four micro-batches on one replica.
fn batch(s: usize) -> Vec<Vec<u32>> {
    common::sequences(&[19, 5, 2, 40, 9, 3, 13, 7], s)
}

type Trained = (Vec<Vec<f32>>, Vec<f64>, Vec<u64>);

/// `STEPS` steps under `spec`: the global weights, the norms, the staleness of every update.
/// `delayed` on one device applies the 2BW rule by hand; `flushless` runs the [`Stashing`].
fn train(spec: &str, devices: usize, delayed: bool, flushless: bool) -> Trained {
    let (out, mut kept) = common::on_ranks(&config(), spec, devices, move |_, s2, mut r| {
        let mut opt = r.optimizer(0.3)?;
        let (mut norms, mut stale) = (Vec::new(), Vec::new());
        let mut pipe = Stashing::new();
        // The hand-applied rule's W(t-1).
        let mut previous = stash(&r.cpu, opt.params())?;
        for s in 0..STEPS {
            let mbs = common::replica_batches(&batch(s), s2.dp, r.dp_rank);
            if flushless {
                let w = stash(&r.cpu, opt.params())?;
                let done = pipe.step(&r.cpu, &r.exec, &mut r.groups, w, &r.shared, mbs)?;
                if let Some(d) = done {
                    assert_eq!(d.step as usize + 1, s, "the last step comes back");
                    stale.push(d.staleness);
                    norms.push(opt.update(&r.cpu, &mut r.groups, d.gradients.grads, 1e-2)?);
                }
                continue;
            }
            let read = if delayed {
                std::mem::replace(&mut previous, stash(&r.cpu, opt.params())?)
            } else {
                stash(&r.cpu, opt.params())?
            };
            let out = r.pass(&read[..], &mbs)?;
            stale.push(u64::from(delayed && s > 0));
            norms.push(opt.update(&r.cpu, &mut r.groups, out.grads, 1e-2)?);
        }
        if flushless {
            assert!(pipe.pending(), "the last step is still in flight");
            let d = pipe
                .drain(&r.cpu, &r.exec, &mut r.groups, &r.shared)?
                .expect("the drain finishes the last step");
            assert_eq!(d.step as usize, STEPS - 1);
            assert_eq!(pipe.in_flight(), 0);
            stale.push(d.staleness);
            norms.push(opt.update(&r.cpu, &mut r.groups, d.gradients.grads, 1e-2)?);
        }
        Ok((opt.params_host(&r.cpu, &r.groups)?, r.held, (norms, stale)))
    });
    let (norms, stale) = kept.swap_remove(0);
    (out, norms, stale)
}

fn check(spec: &str, devices: usize) {
    let (want, want_norms, want_stale) = train("dp1", 1, true, false);
    let (sync, _, _) = train("dp1", 1, false, false);
    let (got, norms, stale) = train(spec, devices, false, true);
    assert_eq!(stale, want_stale, "{spec}: staleness of each update");
    assert_eq!(want_stale, vec![0, 1, 1, 1]);
    for (a, b) in norms.iter().zip(&want_norms) {
        assert!(
            (a - b).abs() <= 1e-5 * b,
            "{spec}: gradient norm {a} vs {b}"
        );
    }
    let mut apart = 0f32;
    for (k, s) in param_specs(&config()).iter().enumerate() {
        let (worst, _) = common::worst(&got[k], &want[k]);
        assert!(
            worst <= 1e-5,
            "{spec}: {} differs by {worst:e} from the 2BW rule after {STEPS} steps",
            s.name
        );
        apart = apart.max(common::worst(&got[k], &sync[k]).0);
    }
    assert!(
        apart > 1e-4,
        "{spec}: the delayed update should differ from the synchronous one ({apart:e})"
    );
}

#[test]
fn pp2_and_pp4_with_tied_embeddings_follow_the_2bw_rule() {
    check("pp2", 2);
    check("pp4", 4);
}

#[test]
fn dp2pp2_zero1_and_tp2pp2_follow_the_2bw_rule() {
    check("dp2pp2zero1", 4);
    check("tp2pp2", 4);
}

#[test]
fn too_few_micro_batches_are_refused_by_every_rank() {
    // dp2 gives each replica two micro-batches; four stages need three.
    let cfg = Arc::new(config());
    let weights = Arc::new(Weights::random(&cfg, 9));
    let s2 = Strategy::parse("dp2pp4", 8).unwrap();
    let errors = ThreadComm::run(
        8,
        move |world| -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
            let mut rp = common::rank_setup(&world, &cfg, &s2, &weights)?;
            let mbs = common::micro_batches(&batch(0), 2, rp.dp_rank, 0.01);
            let w = stash(&rp.cpu, &rp.params)?;
            let mut pipe = Stashing::new();
            Ok(
                match pipe.step(&rp.cpu, &rp.exec, &mut rp.groups, w, &rp.shared, mbs) {
                    Ok(_) => "ran".into(),
                    Err(e) => e.to_string(),
                },
            )
        },
    )
    .unwrap();
    for e in errors {
        assert!(e.contains("at least 3 micro-batches"), "{e}");
    }
}
