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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan, Method, TensorSwitch, Topology};
    use dstate::{Axis, DState, DeviceGroup, Distribution};

    #[test]
    fn a_plan_is_made_once_per_key() {
        let g = DeviceGroup::range(0, 2).unwrap();
        let t = TensorSwitch {
            name: "w".into(),
            shape: vec![4],
            src: Distribution::new(g.clone(), DState::new(vec![Axis::split(0, 2)]).unwrap())
                .unwrap(),
            dst: Distribution::new(g, DState::new(vec![Axis::dup(2)]).unwrap()).unwrap(),
        };
        let cache = PlanCache::new();
        let mut made = 0;
        for _ in 0..3 {
            let p = cache
                .get_or_plan("s->d", || {
                    made += 1;
                    plan(std::slice::from_ref(&t), Topology::new(2), Method::Exact)
                })
                .unwrap();
            assert_eq!(p.transfers.len(), 2);
        }
        assert_eq!((made, cache.len()), (1, 1));
    }
}
