//! The order in which a hot-switching step runs its buckets and the route its gradients take
//! (DESIGN §2.3, orchestration): the one with the fewest switch elements, found exhaustively
//! (at most 720 orders for 6 buckets). The runtime runs it and the cost model prices it, from
//! this one function.

/// A step's switches: where the parameters come from for each bucket and where the gradients go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The buckets in the order they run.
    pub order: Vec<usize>,
    /// Gradients travel from strategy to strategy and go home once (`true`), or each
    /// strategy's go home after it (`false`).
    pub chain: bool,
    /// Every switch of the step, `(from, to)` layouts (members), in the order they happen.
    pub switches: Vec<(usize, usize)>,
}

/// The route of buckets `todo` (indices), bucket `b` running under member `member_of(b)`, the
/// instantiation member `inst` holding the weights; `moved(a, b)` is the elements a switch
/// from `a`'s layout to `b`'s moves. Parameters for a bucket come from the cheapest layout that
/// already holds them (the instantiation's, or an earlier bucket's strategy's).
pub fn route(
    todo: &[usize],
    member_of: &dyn Fn(usize) -> usize,
    inst: usize,
    moved: &dyn Fn(usize, usize) -> usize,
) -> Route {
    let m = member_of;
    let source = |o: &[usize], k: usize| -> usize {
        std::iter::once(inst)
            .chain(o[..k].iter().map(|&b| m(b)))
            .min_by_key(|&l| (moved(l, m(o[k])), l))
            .unwrap_or(inst)
    };
    let params =
        |o: &[usize]| -> usize { (0..o.len()).map(|k| moved(source(o, k), m(o[k]))).sum() };
    let star = |o: &[usize]| -> usize { o.iter().map(|&b| moved(m(b), inst)).sum() };
    let chain = |o: &[usize]| -> usize {
        o.windows(2).map(|w| moved(m(w[0]), m(w[1]))).sum::<usize>()
            + o.last().map_or(0, |&b| moved(m(b), inst))
    };
    let mut best = (todo.to_vec(), false);
    let mut best_cost = usize::MAX;
    let mut cur = todo.to_vec();
    permute(&mut cur, 0, &mut |o| {
        let p = params(o);
        for (c, is_chain) in [(p + star(o), false), (p + chain(o), true)] {
            if c < best_cost {
                best_cost = c;
                best = (o.to_vec(), is_chain);
            }
        }
    });
    let (order, is_chain) = best;
    // The switches, as the runtime makes them.
    let mut switches = Vec::new();
    let mut here: Option<usize> = None;
    for k in 0..order.len() {
        let i = m(order[k]);
        if i != inst {
            switches.push((source(&order, k), i));
        }
        let dest = if is_chain { i } else { inst };
        if !is_chain && i != inst {
            switches.push((i, inst));
        }
        if let Some(l) = here {
            if l != dest {
                switches.push((l, dest));
            }
        }
        here = Some(dest);
    }
    if let Some(l) = here {
        if l != inst {
            switches.push((l, inst));
        }
    }
    Route {
        order,
        chain: is_chain,
        switches,
    }
}

fn permute(v: &mut Vec<usize>, k: usize, f: &mut dyn FnMut(&[usize])) {
    if k + 1 >= v.len() {
        f(v);
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, f);
        v.swap(k, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_with_the_fewest_elements_and_its_switches() {
        // Members 0 (inst), 1, 2; buckets 0→1, 1→2. From 1 to 2 is cheap, from 0 to either
        // dear: 2's parameters come from 1, and the gradients chain 2 → 1 → home... or the
        // cheapest.
        let cost = |a: usize, b: usize| -> usize {
            match (a.min(b), a.max(b)) {
                (x, y) if x == y => 0,
                (1, 2) => 1,
                _ => 100,
            }
        };
        let r = route(&[0, 1], &|b| b + 1, 0, &cost);
        assert_eq!(r.order, vec![0, 1]);
        // Params: 0→1 (100), 1→2 (1); gradients chained: 1→2 (1), 2→0 (100).
        assert!(r.chain);
        assert_eq!(r.switches, vec![(0, 1), (1, 2), (1, 2), (2, 0)]);
        // One bucket under the instantiation: nothing moves.
        let r = route(&[5], &|_| 0, 0, &cost);
        assert!(r.switches.is_empty());
        let mut seen = Vec::new();
        permute(&mut vec![0, 1, 2], 0, &mut |o| seen.push(o.to_vec()));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6);
    }
}
