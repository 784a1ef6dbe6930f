//! Time per op kind, when `HOTSPA_PROFILE=1` (or after [`enable`]): the executor waits for the
//! device after every op (which slows a GPU run down) and adds the op's wall time here.
//! `hotspa train` prints the table at the end; `hotspa bench step` its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static FORCED: AtomicBool = AtomicBool::new(false);

/// Whether `HOTSPA_PROFILE=1` was set when first asked, or [`enable`] was called.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    FORCED.load(Ordering::Relaxed)
        || *ON.get_or_init(|| std::env::var("HOTSPA_PROFILE").is_ok_and(|v| v == "1"))
}

/// Records from now on, whatever the environment says (a benchmark that prints the table).
pub fn enable() {
    FORCED.store(true, Ordering::Relaxed);
}

/// The recorded rows, slowest first: (op kind, calls, seconds).
pub fn rows() -> Vec<(String, u64, f64)> {
    let t = match table().lock() {
        Ok(t) => t.clone(),
        Err(_) => return Vec::new(),
    };
    let mut rows: Vec<(String, u64, f64)> = t.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows
}

fn table() -> &'static Mutex<HashMap<String, (u64, f64)>> {
    static T: OnceLock<Mutex<HashMap<String, (u64, f64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Adds one call of `name` lasting `secs`.
pub fn record(name: &str, secs: f64) {
    if let Ok(mut t) = table().lock() {
        let e = t.entry(name.to_string()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    }
}

/// The table, slowest first: name, calls, seconds, share of the total.
pub fn report() -> String {
    let rows = rows();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let mut out = format!(
        "{:<24} {:>8} {:>10} {:>7}\n",
        "op", "calls", "seconds", "share"
    );
    for (name, calls, secs) in rows {
        out += &format!(
            "{name:<24} {calls:>8} {secs:>10.3} {:>6.1}%\n",
            100.0 * secs / total.max(1e-12)
        );
    }
    out
}
