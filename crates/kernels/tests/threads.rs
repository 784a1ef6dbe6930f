//! The CPU backend's row-wise ops split over its pool's threads give, bit for bit, what one
//! thread gives (inputs large enough to be split, odd row widths, ragged last pieces).

use kernels::{AdamW, Backend, CpuBackend, Rope, Rotation};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    kernels::conformance::xorshift(seed)
        .take(n)
        .map(|x| ((x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every op's outputs on `be`.
fn outputs(be: &CpuBackend) -> Vec<Vec<f32>> {
    let (rows, dim) = (1201, 96);
    let n = rows * dim;
    let (a, b) = (rand(n, 1), rand(n, 2));
    let mut out = vec![0.0; n];
    be.add(&a, &b, &mut out).unwrap();
    let mut y = b.clone();
    be.axpy(0.37, &a, &mut y).unwrap();
    let mut sw = vec![0.0; n];
    be.swiglu_forward(&a, &b, &mut sw).unwrap();
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    be.swiglu_backward(&out, &a, &b, &mut dg, &mut du).unwrap();
    let w = rand(dim, 3);
    let (mut norm, mut rstd) = (vec![0.0; n], vec![0.0; rows]);
    be.rms_norm_forward(&a, &w, 1e-5, &mut norm, &mut rstd)
        .unwrap();
    let positions: Vec<u32> = (0..rows as u32).map(|t| t % 300).collect();
    let mut roped = a.clone();
    let plain = Rope::plain(10000.0);
    be.rope(&mut roped, &Rotation::new(&positions, 3, 32, &plain))
        .unwrap();
    // Positions too sparse for a table of angles: each token's are computed on its own.
    let sparse: Vec<u32> = (0..rows as u32).map(|t| t * 37).collect();
    let mut roped_sparse = a.clone();
    let backward = Rotation::new(&sparse, 3, 32, &plain).inverted(true);
    be.rope(&mut roped_sparse, &backward).unwrap();
    let mut copied = b.clone();
    be.copy(&a, &mut copied).unwrap();
    let (mut ndx, mut ndw) = (vec![0.0; n], w.clone());
    be.rms_norm_backward(&b, &a, &w, &rstd, &mut ndx, &mut ndw)
        .unwrap();
    let targets: Vec<u32> = (0..rows as u32).map(|t| (t * 7) % dim as u32).collect();
    let mask: Vec<bool> = (0..rows).map(|t| t % 5 != 0).collect();
    let mut lse = vec![0.0; rows];
    let loss = be
        .cross_entropy_forward(&a, dim, &targets, &mask, &mut lse)
        .unwrap();
    let mut dlogits = vec![0.0; n];
    be.cross_entropy_backward(&a, dim, &targets, &mask, &lse, 0.01, &mut dlogits)
        .unwrap();
    let cfg = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        freeze_variance_after: None,
    };
    let (mut p, mut m, mut v) = (a.clone(), b.clone(), b.iter().map(|x| x * x).collect());
    be.adamw(&cfg, 3, &mut p, &out, &mut m, &mut v).unwrap();
    vec![
        out,
        y,
        sw,
        dg,
        du,
        norm,
        rstd,
        ndx,
        ndw,
        roped,
        roped_sparse,
        copied,
        lse,
        vec![loss],
        dlogits,
        p,
        m,
        v,
    ]
}

#[test]
fn split_over_threads_equals_one_thread_bit_for_bit() {
    let one = outputs(&CpuBackend::new(1).unwrap());
    let three = outputs(&CpuBackend::new(3).unwrap());
    let names = [
        "add",
        "axpy",
        "swiglu",
        "dgate",
        "dup",
        "rms_norm",
        "rstd",
        "rms_norm dx",
        "rms_norm dweight",
        "rope",
        "rope (sparse positions, inverse)",
        "copy",
        "lse",
        "loss",
        "dlogits",
        "param",
        "exp_avg",
        "exp_avg_sq",
    ];
    assert_eq!(one.len(), names.len());
    for ((a, b), name) in one.iter().zip(&three).zip(names) {
        assert_eq!(bits(a), bits(b), "{name}");
    }
}

#[test]
fn a_bad_target_is_named_by_its_row_whatever_the_threads() {
    let be = CpuBackend::new(2).unwrap();
    let (rows, vocab) = (1000, 64);
    let logits = rand(rows * vocab, 4);
    let mut targets = vec![1u32; rows];
    targets[777] = 64;
    let mask = vec![true; rows];
    let lse = vec![0.0; rows];
    let mut d = vec![0.0; rows * vocab];
    let e = be
        .cross_entropy_backward(&logits, vocab, &targets, &mask, &lse, 1.0, &mut d)
        .unwrap_err();
    assert!(e.to_string().contains("row 777"), "{e}");
}
