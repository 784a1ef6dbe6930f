//! Plans are deterministic functions of their inputs: a cache keyed by the caller's name for a
//! switch (e.g. `"dp4->tp4"`) saves re-planning the same switch every step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::plan::Plan;

/// A thread-safe map from a switch's key to its plan.
#[derive(Default)]
pub struct PlanCache {
    plans: Mutex<HashMap<String, Arc<Plan>>>,
}

impl PlanCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plan under `key`, made by `make` the first time.
    pub fn get_or_plan(&self, key: &str, make: impl FnOnce() -> Result<Plan>) -> Result<Arc<Plan>> {
        if let Some(p) = self.plans.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(p);
        }
        let plan = Arc::new(make()?);
        if let Ok(mut m) = self.plans.lock() {
            m.insert(key.to_string(), plan.clone());
        }
        Ok(plan)
    }

    /// Number of cached plans.
    pub fn len(&self) -> usize {
        self.plans.lock().map_or(0, |m| m.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
