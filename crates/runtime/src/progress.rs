//! Progress reports for a watchdog: the executor calls [`beat`] before every op, the pipeline
//! before every slot. A thread that wants them (a training rank) installs a hook; elsewhere a
//! beat costs one thread-local read.

use std::cell::RefCell;
use std::sync::Arc;

/// What a rank's thread is told of its own progress: the op or phase it starts.
pub type Hook = Arc<dyn Fn(&'static str) + Send + Sync>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Installs (or, with `None`, removes) this thread's hook.
pub fn set_hook(hook: Option<Hook>) {
    HOOK.with(|h| *h.borrow_mut() = hook);
}

/// Reports that this thread starts `what`.
pub fn beat(what: &'static str) {
    HOOK.with(|h| {
        if let Some(f) = h.borrow().as_ref() {
            f(what)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn only_the_thread_with_a_hook_reports() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        set_hook(Some(Arc::new(move |w| s2.lock().unwrap().push(w))));
        beat("gemm");
        std::thread::spawn(|| beat("elsewhere")).join().unwrap();
        set_hook(None);
        beat("after");
        assert_eq!(*seen.lock().unwrap(), vec!["gemm"]);
    }
}
