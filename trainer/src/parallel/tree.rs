//! The canonical summation order: one fixed binary tree over the canonical indices of
//! what a step sums (its micro-batches' gradients, the chunks of a gradient norm), so
//! that the sum has the same bits however the leaves are spread over ranks.
//!
//! Node [lo, hi) splits at lo + the largest power of two below hi - lo. A rank holding
//! a contiguous block of leaves sums each maximal node inside its block itself
//! (`Tree::nodes_within`), streaming its leaves in order with one partial sum per open
//! level (`Tree::siblings` says when two partials merge); whoever combines the ranks'
//! partials finishes the same tree (`Tree::combine`). Floating-point addition is
//! commutative, so `a + b` and `b + a` agree and only the tree's shape matters.
//!
//! The split rule makes the tree indifferent to zero leaves appended at the end: the
//! tree over n leaves padded with zeros to n' computes, for every n' >= n, the sum the
//! tree over the n leaves computes (the splits of the first n leaves are the same, and
//! adding an exact 0 changes nothing). A norm summed over chunks of a padded layout is
//! therefore the same whatever the padding, which depends on the number of ranks.

use std::ops::Range;

/// Where node [lo, hi) (hi - lo >= 2) splits.
fn split(lo: usize, hi: usize) -> usize {
    let n = hi - lo;
    lo + (1usize << (usize::BITS - 1 - (n - 1).leading_zeros()))
}

/// The canonical tree over `leaves` leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    leaves: usize,
}

impl Tree {
    /// The tree over leaves 0 .. `leaves`.
    pub fn new(leaves: usize) -> Self {
        Self { leaves }
    }

    /// The leaves.
    pub fn leaves(&self) -> usize {
        self.leaves
    }

    /// The maximal nodes inside `block`, in order: what a rank holding `block` sums.
    pub fn nodes_within(&self, block: Range<usize>) -> Vec<Range<usize>> {
        fn go(lo: usize, hi: usize, block: &Range<usize>, out: &mut Vec<Range<usize>>) {
            if hi <= block.start || lo >= block.end || lo >= hi {
                return;
            }
            if block.start <= lo && hi <= block.end {
                out.push(lo..hi);
                return;
            }
            let mid = split(lo, hi);
            go(lo, mid, block, out);
            go(mid, hi, block, out);
        }
        let mut out = Vec::new();
        go(0, self.leaves, &block, &mut out);
        out
    }

    /// Whether adjacent nodes `left` and `right` are the two children of one node.
    pub fn siblings(&self, left: &Range<usize>, right: &Range<usize>) -> bool {
        if left.end != right.start {
            return false;
        }
        let (mut lo, mut hi) = (0, self.leaves);
        while hi - lo >= 2 {
            if lo == left.start && hi == right.end {
                return split(lo, hi) == left.end;
            }
            let mid = split(lo, hi);
            match left.start < mid {
                true if right.end <= mid => hi = mid,
                false => lo = mid,
                true => return false,
            }
        }
        false
    }

    /// The sum of `parts` (nodes of this tree tiling `root`, in order) in the tree's
    /// order; None when `parts` do not tile it.
    pub fn combine<T>(
        &self,
        root: Range<usize>,
        parts: Vec<(Range<usize>, T)>,
        add: &mut impl FnMut(T, T) -> T,
    ) -> Option<T> {
        fn go<T>(
            lo: usize,
            hi: usize,
            parts: &mut std::iter::Peekable<std::vec::IntoIter<(Range<usize>, T)>>,
            add: &mut impl FnMut(T, T) -> T,
        ) -> Option<T> {
            if parts.peek().is_some_and(|(r, _)| *r == (lo..hi)) {
                return parts.next().map(|(_, v)| v);
            }
            if hi - lo < 2 {
                return None;
            }
            let mid = split(lo, hi);
            let a = go(lo, mid, parts, add)?;
            let b = go(mid, hi, parts, add)?;
            Some(add(a, b))
        }
        let mut iter = parts.into_iter().peekable();
        let out = go(root.start, root.end, &mut iter, add)?;
        iter.next().is_none().then_some(out)
    }
}

/// Leaf partial sums pushed in order, merged as soon as two are siblings: what a rank
/// streams its block's leaves through. Holds at most one partial per tree level.
#[derive(Debug)]
pub struct Partials<T> {
    open: Vec<(Range<usize>, T)>,
}

impl<T> Default for Partials<T> {
    fn default() -> Self {
        Self { open: Vec::new() }
    }
}

impl<T> Partials<T> {
    /// Pushes leaf `index` and merges what `tree` joins (`add(left, right)`).
    pub fn push(&mut self, tree: &Tree, index: usize, value: T, add: &mut impl FnMut(T, T) -> T) {
        self.push_node(tree, index..index + 1, value, add);
    }

    /// Pushes the partial sum of node `range` (the next in order) and merges what `tree`
    /// joins.
    pub fn push_node(
        &mut self,
        tree: &Tree,
        range: Range<usize>,
        value: T,
        add: &mut impl FnMut(T, T) -> T,
    ) {
        let mut node = (range, value);
        while let Some((range, _)) = self.open.last() {
            if !tree.siblings(range, &node.0) {
                break;
            }
            let (left, l) = self.open.pop().expect("checked above");
            node = (left.start..node.0.end, add(l, node.1));
        }
        self.open.push(node);
    }

    /// The open partials, in order.
    pub fn nodes(&self) -> &[(Range<usize>, T)] {
        &self.open
    }

    /// Takes the last open partial out.
    pub fn pop(&mut self) -> Option<(Range<usize>, T)> {
        self.open.pop()
    }

    /// Takes the open partials out.
    pub fn take(&mut self) -> Vec<(Range<usize>, T)> {
        std::mem::take(&mut self.open)
    }

    /// Whether nothing is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree's sum written out as a string, to compare shapes.
    fn shape(tree: &Tree, root: Range<usize>, parts: Vec<(Range<usize>, String)>) -> String {
        tree.combine(root, parts, &mut |a, b| format!("({a}+{b})"))
            .expect("parts tile the root")
    }

    #[test]
    fn every_block_split_gives_the_sum_of_one_rank() {
        // For every leaf count and every split of it into contiguous blocks, the ranks'
        // maximal nodes (each summed locally by `Partials`) combine to the one-rank sum.
        for leaves in 1..=13usize {
            let tree = Tree::new(leaves);
            let whole: Vec<_> = (0..leaves).map(|i| (i..i + 1, i.to_string())).collect();
            let want = shape(&tree, 0..leaves, whole);
            for ranks in 1..=leaves {
                if leaves % ranks != 0 {
                    continue;
                }
                let per = leaves / ranks;
                let mut parts = Vec::new();
                for r in 0..ranks {
                    let mut p = Partials::default();
                    for i in r * per..(r + 1) * per {
                        p.push(&tree, i, i.to_string(), &mut |a, b| format!("({a}+{b})"));
                    }
                    let nodes: Vec<_> = p.nodes().iter().map(|(r, _)| r.clone()).collect();
                    assert_eq!(nodes, tree.nodes_within(r * per..(r + 1) * per));
                    parts.extend(p.take());
                }
                assert_eq!(
                    shape(&tree, 0..leaves, parts),
                    want,
                    "{leaves} leaves, {ranks} ranks"
                );
            }
        }
    }

    #[test]
    fn zero_padding_at_the_end_keeps_the_shape() {
        for n in 1..=17usize {
            let real: Vec<_> = (0..n).map(|i| (i..i + 1, format!("x{i}"))).collect();
            let want = shape(&Tree::new(n), 0..n, real);
            for padded in n..=40 {
                let leaves: Vec<_> = (0..padded)
                    .map(|i| (i..i + 1, if i < n { format!("x{i}") } else { "0".into() }))
                    .collect();
                let got = Tree::new(padded)
                    .combine(0..padded, leaves, &mut |a: String, b: String| match (
                        a.as_str(),
                        b.as_str(),
                    ) {
                        (x, "0") => x.to_string(),
                        ("0", y) => y.to_string(),
                        _ => format!("({a}+{b})"),
                    })
                    .unwrap();
                assert_eq!(got, want, "{n} leaves padded to {padded}");
            }
        }
    }

    #[test]
    fn parts_that_do_not_tile_are_refused() {
        let tree = Tree::new(4);
        assert!(tree
            .combine(0..4, vec![(0..2, 1), (3..4, 1)], &mut |a, b| a + b)
            .is_none());
        assert!(tree
            .combine(0..4, vec![(0..1, 1), (1..3, 1), (3..4, 1)], &mut |a, b| a
                + b)
            .is_none());
        assert_eq!(
            tree.combine(0..4, vec![(0..2, 1), (2..4, 2)], &mut |a, b| a + b),
            Some(3)
        );
    }
}
