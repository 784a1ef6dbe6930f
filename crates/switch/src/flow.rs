//! The min–max send assignment: demands (bytes that must leave one of a set of eligible senders)
//! spread over the senders so that the largest total any sender sends is as small as possible,
//! a demand may be split between senders. Binary search on the bottleneck `T`, each probe a
//! max-flow (Dinic) of source → demand (its volume) → eligible senders (unbounded) → sink (`T`).

use std::collections::VecDeque;

struct Edge {
    to: usize,
    cap: f64,
}

/// Dinic's max-flow on real capacities.
struct Dinic {
    edges: Vec<Edge>,
    adj: Vec<Vec<usize>>,
    level: Vec<i64>,
    next: Vec<usize>,
}

const EPS: f64 = 1e-9;

impl Dinic {
    fn new(n: usize) -> Self {
        Self {
            edges: Vec::new(),
            adj: vec![Vec::new(); n],
            level: vec![0; n],
            next: vec![0; n],
        }
    }

    fn add(&mut self, a: usize, b: usize, cap: f64) -> usize {
        self.adj[a].push(self.edges.len());
        self.edges.push(Edge { to: b, cap });
        self.adj[b].push(self.edges.len());
        self.edges.push(Edge { to: a, cap: 0.0 });
        self.edges.len() - 2
    }

    fn bfs(&mut self, s: usize, t: usize) -> bool {
        self.level.fill(-1);
        self.level[s] = 0;
        let mut q = VecDeque::from([s]);
        while let Some(u) = q.pop_front() {
            for &e in &self.adj[u] {
                let v = self.edges[e].to;
                if self.edges[e].cap > EPS && self.level[v] < 0 {
                    self.level[v] = self.level[u] + 1;
                    q.push_back(v);
                }
            }
        }
        self.level[t] >= 0
    }

    fn dfs(&mut self, u: usize, t: usize, f: f64) -> f64 {
        if u == t {
            return f;
        }
        while self.next[u] < self.adj[u].len() {
            let e = self.adj[u][self.next[u]];
            let v = self.edges[e].to;
            if self.edges[e].cap > EPS && self.level[v] == self.level[u] + 1 {
                let got = self.dfs(v, t, f.min(self.edges[e].cap));
                if got > EPS {
                    self.edges[e].cap -= got;
                    self.edges[e ^ 1].cap += got;
                    return got;
                }
            }
            self.next[u] += 1;
        }
        0.0
    }

    fn run(&mut self, s: usize, t: usize) -> f64 {
        let mut total = 0.0;
        while self.bfs(s, t) {
            self.next.fill(0);
            loop {
                let f = self.dfs(s, t, f64::INFINITY);
                if f <= EPS {
                    break;
                }
                total += f;
            }
        }
        total
    }
}

/// The optimal assignment: `flows[g]` lists (sender index, amount) for demand group `g`, and
/// `bottleneck` is the largest total of any sender.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Per demand group: how much each eligible sender takes.
    pub flows: Vec<Vec<(usize, f64)>>,
    /// The min–max send volume (the fractional optimum, to a relative 1e-9).
    pub bottleneck: f64,
}

fn probe(
    volumes: &[f64],
    eligible: &[Vec<usize>],
    senders: usize,
    cap: f64,
) -> (f64, Dinic, Vec<Vec<(usize, usize)>>) {
    let groups = volumes.len();
    let (s, t) = (groups + senders, groups + senders + 1);
    let mut g = Dinic::new(groups + senders + 2);
    let mut ids = Vec::with_capacity(groups);
    for (i, (&v, el)) in volumes.iter().zip(eligible).enumerate() {
        g.add(s, i, v);
        ids.push(
            el.iter()
                .map(|&k| (k, g.add(i, groups + k, f64::INFINITY)))
                .collect(),
        );
    }
    for k in 0..senders {
        g.add(groups + k, t, cap);
    }
    let f = g.run(s, t);
    (f, g, ids)
}

/// Minimises the largest per-sender total for `volumes[g]` that must come from one of
/// `eligible[g]` (indices below `senders`). Every group must have an eligible sender.
pub fn min_max_assignment(volumes: &[f64], eligible: &[Vec<usize>], senders: usize) -> Assignment {
    let total: f64 = volumes.iter().sum();
    if total <= 0.0 || senders == 0 {
        return Assignment {
            flows: vec![Vec::new(); volumes.len()],
            bottleneck: 0.0,
        };
    }
    // A sender alone eligible for a group must take all of it: a lower start for the search.
    let mut lo = total / senders as f64;
    for (v, el) in volumes.iter().zip(eligible) {
        if el.len() == 1 {
            lo = lo.max(*v);
        }
    }
    let mut hi = total;
    let feasible =
        |cap: f64| probe(volumes, eligible, senders, cap).0 >= total * (1.0 - 1e-12) - EPS;
    if feasible(lo) {
        hi = lo;
    } else {
        while hi - lo > hi * 1e-9 + 1e-9 {
            let mid = 0.5 * (lo + hi);
            if feasible(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
    }
    let (_, g, ids) = probe(volumes, eligible, senders, hi);
    let flows = ids
        .iter()
        .map(|edges| {
            edges
                .iter()
                .map(|&(k, e)| (k, g.edges[e ^ 1].cap))
                .filter(|&(_, f)| f > EPS)
                .collect()
        })
        .collect();
    Assignment {
        flows,
        bottleneck: hi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_to_balance_and_respects_forced_senders() {
        // 10 units any of {0,1}, 4 units only from 0: optimum 7 / 7.
        let a = min_max_assignment(&[10.0, 4.0], &[vec![0, 1], vec![0]], 2);
        assert!((a.bottleneck - 7.0).abs() < 1e-6, "{}", a.bottleneck);
        let from0: f64 = a
            .flows
            .iter()
            .flatten()
            .filter(|f| f.0 == 0)
            .map(|f| f.1)
            .sum();
        assert!((from0 - 7.0).abs() < 1e-6);
        // A group that only sender 1 may serve bounds the optimum from below.
        let a = min_max_assignment(&[1.0, 9.0], &[vec![0, 1], vec![1]], 2);
        assert!((a.bottleneck - 9.0).abs() < 1e-6);
    }
}
