//! Why error feedback exists, as a user would see it: training with top-k at 1% ends far worse
//! without the residual than with it, and with it close to the exact run; bf16 with error
//! feedback stays within rounding distance of the exact run.
//!
//! The optimizer is AdamW with β1 = 0, ε = 1 and no weight decay: for gradients far below 1 in
//! magnitude (every coordinate here) its update `lr·g/(√v + ε)` is plain SGD's `lr·g` to within
//! |g|. Error feedback is a theory of SGD-type updates (Karimireddy et al. 2019, "Error Feedback
//! Fixes SignSGD and other Gradient Compression Schemes"); under AdamW's per-coordinate scaling
//! docs/communication.md reports that it does not help top-k at 1% on the default corpus.

use std::path::Path;
use std::process::Command;

mod common;

/// 256 documents of 8-32 tokens (see `common::affine_docs`).
fn setup(dir: &Path) {
    common::affine_docs(dir, 256, |i| [8, 12, 16, 24, 32][i % 5], |i| i / 5);
}

/// The mean loss of the last 10 of 100 steps of DP4 with `extra` flags.
fn final_loss(dir: &Path, name: &str, optimizer: &[&str], extra: &[&str]) -> f64 {
    let metrics = dir.join(format!("{name}.jsonl"));
    let mut args = common::train_on(dir);
    args.extend(common::cmd![
        "--devices 4 --strategy dp4 --global-batch 16 --steps 100 --metrics",
        &metrics
    ]);
    args.extend(optimizer.iter().chain(extra).map(Into::into));
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let losses = common::losses(&metrics);
    assert_eq!(losses.len(), 100, "{name}");
    let loss = losses[90..].iter().sum::<f64>() / 10.0;
    eprintln!("{name}: mean loss of steps 91-100 = {loss:.4}");
    loss
}

/// SGD at lr 1 (with the default clipping of the global gradient norm to 1).
const SGD: [&str; 8] = [
    "--lr",
    "1",
    "--beta1",
    "0",
    "--eps",
    "1",
    "--weight-decay",
    "0",
];

#[test]
fn top_k_at_one_percent_trains_only_with_error_feedback() {
    let d = &common::Scratch::new(setup);
    let exact = final_loss(d, "exact", &SGD, &[]);
    let with = final_loss(d, "topk-ef", &SGD, &["--grad-compression", "topk:0.01"]);
    let without = final_loss(
        d,
        "topk-no-ef",
        &SGD,
        &["--grad-compression", "topk:0.01", "--error-feedback", "off"],
    );
    // Measured over --seed 0-5: exact 0.505-0.549, with feedback 0.463-0.520, without
    // 1.184-1.266. Without feedback the 99% of each gradient that is not sent is lost for good,
    // so the run learns far slower; with it every coordinate arrives, late.
    assert!(
        without > with + 0.5,
        "without error feedback {without:.4} is not clearly worse than with it {with:.4}"
    );
    // Close: EF-SGD converges at SGD's rate plus a term of order 1/(δ²T) for a compressor
    // keeping a fraction δ (Karimireddy et al.); at δ = 1% and T = 100 that term is still
    // visible, so the bound is 20% of the loss (0.1), against the 100%+ that is lost without
    // feedback. Measured |with - exact| over seeds 0-5: 0.006-0.083.
    assert!(
        (with - exact).abs() <= 0.1,
        "top-k 1% with error feedback {with:.4} is not within 0.1 of the exact run {exact:.4}"
    );
}

/// AdamW at `lr` with `beta1`, ε 100 (SGD's step at a hundredth of `lr`, with momentum where
/// `beta1` is not 0), no weight decay and no global clipping.
fn unclipped<'a>(lr: &'a str, beta1: &'a str) -> [&'a str; 10] {
    [
        "--lr",
        lr,
        "--beta1",
        beta1,
        "--eps",
        "100",
        "--weight-decay",
        "0",
        "--grad-clip",
        "inf",
    ]
}

/// DGC (Lin et al. 2018) is top-k for momentum SGD: its velocity `u ← 0.9·u + g` is the
/// momentum, so the optimizer adds none and is plain SGD here (AdamW with β1 = 0, ε = 100 and
/// the lr × 100: `lr·g/(√v + ε)` is SGD's step to within |g|/100; DGC's sums of accumulated
/// velocity are larger than the plain gradients of the error-feedback tests above). DGC
/// replaces global clipping by its local clipping, so the runs clip nothing (`--grad-clip
/// inf`). Two checks independent of the code: sending everything (`dgc:1`), momentum factor
/// masking clears every velocity each step, which is plain SGD; at 1 % the unsent
/// accumulation carries momentum, and trains clearly better than SGD at the same rate.
#[test]
fn dgc_sending_everything_is_sgd_and_at_one_percent_beats_it() {
    let d = &common::Scratch::new(setup);
    let sgd = unclipped("10", "0");
    let plain = final_loss(d, "sgd", &sgd, &[]);
    let all = final_loss(d, "dgc-1", &sgd, &["--grad-compression", "dgc:1"]);
    let dgc = final_loss(d, "dgc-0.01", &sgd, &["--grad-compression", "dgc:0.01"]);
    // For the record (docs/communication.md): momentum SGD itself, exact, in the same units
    // (an EMA of the gradient at 10× the rate is the heavy ball's momentum at this rate), and
    // top-k 1 % with error feedback under that momentum.
    let momentum = unclipped("100", "0.9");
    let exact = final_loss(d, "momentum", &momentum, &[]);
    let topk = final_loss(
        d,
        "topk-momentum",
        &momentum,
        &["--grad-compression", "topk:0.01"],
    );
    eprintln!("sgd {plain:.4}, dgc:1 {all:.4}, dgc:0.01 {dgc:.4}, momentum {exact:.4}, top-k 1% under momentum {topk:.4}");
    assert!(
        (all - plain).abs() < 1e-6,
        "dgc:1 {all:.6} is not SGD {plain:.6}: sent velocities were not cleared"
    );
    // Measured: SGD 1.616, DGC 1 % 1.057 (momentum 0.355, top-k 1 % under momentum 1.003).
    assert!(
        dgc < plain - 0.3,
        "DGC at 1% {dgc:.4} does not train clearly better than SGD {plain:.4}"
    );
}

#[test]
fn bf16_with_error_feedback_stays_within_rounding_distance_of_the_exact_run() {
    let d = &common::Scratch::new(setup);
    let adamw = ["--lr", "1e-2"];
    let exact = final_loss(d, "exact", &adamw, &[]);
    let reordered = final_loss(d, "rhd", &adamw, &["--allreduce", "rhd"]);
    let bf16 = final_loss(d, "bf16", &adamw, &["--grad-compression", "bf16"]);
    // bf16 rounds each gradient to 8 bits of mantissa (relative error ≤ 2^-9); error feedback
    // carries the rounding into the next step, so what has arrived differs from the exact sum
    // by one step's rounding, never more, and the run stays on an exact run's course. Bound: 3%
    // of the loss, a third of the exact run's own spread over --seed 0-3 (0.169-0.185, 9%).
    // Measured over seeds 0-3: bf16 with feedback lands 0.7-2.3% below the exact run; two exact
    // runs that differ only in the order of f32 additions (ring vs halving-doubling) agree to
    // 4 digits here.
    let bound = 0.03 * exact;
    eprintln!(
        "reordering moved the loss by {:.4}, bf16 by {:.4}, bound {bound:.4}",
        (reordered - exact).abs(),
        (bf16 - exact).abs()
    );
    assert!(
        (bf16 - exact).abs() <= bound,
        "bf16 with error feedback {bf16:.4} is not within {bound:.4} of the exact run {exact:.4}"
    );
}

/// The mean loss of steps 281-300 of the default run (`hotspa train --default-run`) with `extra`.
fn default_run_loss(name: &str, extra: &[&str]) -> f64 {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let metrics = tmp.path().join(format!("{name}.jsonl"));
    let o = Command::new(env!("CARGO_BIN_EXE_hotspa"))
        .args(["train", "--default-run", "--metrics"])
        .arg(&metrics)
        .args(extra)
        .current_dir(&root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name}: {err}");
    if let Some(dir) = err
        .lines()
        .find_map(|l| l.strip_prefix("run written to "))
        .and_then(|l| l.split(':').next())
    {
        std::fs::remove_dir_all(root.join(dir)).ok();
    }
    let losses = common::losses(&metrics);
    assert_eq!(losses.len(), 300, "{name}");
    let loss = losses[280..].iter().sum::<f64>() / 20.0;
    eprintln!("{name}: mean loss of steps 281-300 = {loss:.4}");
    loss
}

/// The criterion on the default corpus: 300 steps of the default run, bf16 with error
/// feedback against the exact exchange, under the same 3% bound as above. Measured (mean of
/// steps 281-300; the corpus is this repository, so it moves with every commit): exact 1.780,
/// bf16 1.756 (1.3%), and the exact exchange with its additions reordered (`--allreduce rhd`)
/// 1.781; on an earlier corpus 1.757 against 1.748 (0.5%). About 15 minutes in release:
/// `cargo test --release -p hotspa --test error_feedback -- --ignored --nocapture`.
#[test]
#[ignore]
fn default_run_with_bf16_and_error_feedback_ends_near_the_exact_run() {
    let exact = default_run_loss("exact", &[]);
    let bf16 = default_run_loss("bf16", &["--grad-compression", "bf16"]);
    assert!(
        (bf16 - exact).abs() <= 0.03 * exact,
        "bf16 with error feedback {bf16:.4} is not within 3% of the exact run {exact:.4}"
    );
}
