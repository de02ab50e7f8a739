//! Packed batches: sequences of different lengths laid side by side in as few rows as
//! fit, instead of one right-padded row each. A row (on CPU up to twice the longest
//! item's width) holds several sequences; each attends only to itself and counts its
//! positions from 0 (`AttentionMask::from_segments`), so every sequence computes what
//! it would alone, and the padding that a batch of mixed lengths carries is not
//! computed. (A reward model's batch of K responses per prompt was 28 % padding.)
//!
//! On CPU, sequences that begin with the same tokens (a prompt's K responses, a DPO
//! pair, a GRPO group, SFT rows opening with the chat template) also share that
//! prefix when that saves at least 1/16 of the batch's tokens: it is laid once,
//! followed by each sequence's own rest, which sees the prefix and itself and counts
//! its positions on from the prefix's length (`AttentionMask::from_tree`). Each
//! sequence still computes what it would alone; the prefix is computed once instead of
//! once per sequence.
//! (LoRA dropout draws its mask per flat element, so sequences sharing a prefix share
//! its draw there; each sequence's own draw is distributed as before.)

use candle_core::{Device, Tensor};
use std::collections::HashMap;

use super::AttentionMask;
use crate::error::{Error, Result};

/// Sequences packed into (R, W) rows.
pub struct Packed {
    pub ids: Tensor, // (R, W) u32
    pub mask: AttentionMask,
    /// Where each sequence's tokens lie, in the order given.
    pub spans: Vec<Span>,
}

/// Where one sequence's tokens lie in the flattened (R·W) batch: its first `shared`
/// tokens from `prefix` (a prefix laid once for the sequences that share it; 0 tokens
/// when it shares none), the rest from `own`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub prefix: usize,
    pub shared: usize,
    pub own: usize,
}

impl Span {
    /// The flat index (into R·W) of the sequence's token `t`.
    pub fn flat(&self, t: usize) -> usize {
        if t < self.shared {
            self.prefix + t
        } else {
            self.own + t - self.shared
        }
    }
}

/// Sequences laid as one item: the first `shared` tokens of `members[0]` (which every
/// member begins with), then each member's rest in turn.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    members: Vec<usize>,
    shared: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups sequences that begin with the same tokens. In lexicographic order (where
/// sequences with long common prefixes are neighbours) a sequence joins the group
/// before it if their common prefix is at least a token and does not shrink the
/// group's saving, (members − 1) × shared tokens; else it starts a group. Sequences
/// not `eligible` (rows of several examples) stay alone. A batch whose groups would
/// save less than 1/`MIN_SAVING` of its tokens shares nothing. Groups come in the
/// order of their first member, members in the order given, so a batch with nothing to
/// share is laid out as without sharing.
fn share_prefixes(seqs: &[&[u32]], eligible: &[bool]) -> Vec<Group> {
    let alone = |i: usize| Group {
        members: vec![i],
        shared: 0,
    };
    let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| eligible[i]).collect();
    order.sort_by(|&a, &b| seqs[a].cmp(seqs[b]).then(a.cmp(&b)));
    let mut groups: Vec<Group> = vec![];
    for i in order {
        if let Some(g) = groups.last_mut() {
            let k = g.members.len();
            let l = common_prefix(&seqs[g.members[0]][..g.shared], seqs[i]);
            if l >= 1 && k * l >= (k - 1) * g.shared {
                g.members.push(i);
                g.shared = l;
                continue;
            }
        }
        groups.push(Group {
            members: vec![i],
            shared: seqs[i].len(),
        });
    }
    for g in &mut groups {
        g.members.sort_unstable();
        if g.members.len() == 1 {
            g.shared = 0;
        }
    }
    let saved: usize = groups
        .iter()
        .map(|g| (g.members.len() - 1) * g.shared)
        .sum();
    let total: usize = seqs.iter().map(|s| s.len()).sum();
    if saved * MIN_SAVING < total {
        return (0..seqs.len()).map(alone).collect();
    }
    groups.extend((0..seqs.len()).filter(|&i| !eligible[i]).map(alone));
    groups.sort_by_key(|g| g.members[0]);
    groups
}

/// Sharing pays only when it saves enough: a batch shares prefixes when that lays at
/// least 1/16 fewer tokens. Pretraining's blocks that begin alike saved 0.1–1.5 % of a
/// batch's tokens, and sharing them made its steps 6 % slower (measured, cause not
/// located); SFT's rows (the chat template and a question's first words) save 11–20 %
/// and a reward model's K responses per prompt about 60 %.
const MIN_SAVING: usize = 16;

/// Where the sequences go: rows of `width` tokens, and each sequence's (row, offset),
/// in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub rows: usize,
    pub width: usize,
    pub place: Vec<(usize, usize)>,
}

/// First fit, longest first, into rows of `width` (≥ the longest). Ties keep the
/// given order, so the layout depends only on the lengths.
fn first_fit(lengths: &[usize], width: usize) -> Layout {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i])); // stable
    let mut used: Vec<usize> = vec![]; // tokens taken in each row
    let mut place = vec![(0, 0); lengths.len()];
    for i in order {
        let n = lengths[i];
        let row = match used.iter().position(|&u| u + n <= width) {
            Some(r) => r,
            None => {
                used.push(0);
                used.len() - 1
            }
        };
        place[i] = (row, used[row]);
        used[row] += n;
    }
    Layout {
        rows: used.len(),
        width,
        place,
    }
}

/// The layout with the fewest slots (rows × width) among rows from the longest
/// sequence's width up to `max_width`: the widths that split the total evenly into
/// r rows, for every r that gives such a width, and the longest's own. Rows as wide as
/// the longest alone leave most rows one sequence when lengths are alike (a reward
/// model's K responses: 75 % of the slots real); rows up to twice that fill 95 %.
/// A tie keeps the layout found first: rows as wide as the longest, else the wider.
/// Each width is tried once (n/2 + 1 first-fit passes at most).
pub fn layout(lengths: &[usize], max_width: usize) -> Layout {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let total: usize = lengths.iter().sum();
    let mut best = first_fit(lengths, longest);
    if longest == 0 {
        return best;
    }
    let max_width = max_width.max(longest);
    let mut r = total.div_ceil(max_width).max(1);
    let mut tried = 0;
    loop {
        let width = total.div_ceil(r).max(longest);
        if width == longest {
            return best;
        }
        r += 1;
        if width == tried {
            continue; // the same width as the last r: the same layout
        }
        tried = width;
        let l = first_fit(lengths, width);
        if l.rows * l.width < best.rows * best.width {
            best = l;
        }
    }
}

impl Packed {
    /// Each sequence is `head ++ tail` (a prompt and its response, or a whole sequence
    /// and nothing), one example; `pad` fills the rows' ends. On CPU, sequences that
    /// begin alike share their common prefix (see the module's comment).
    pub fn new(seqs: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        let seqs: Vec<Vec<u32>> = seqs.iter().map(|(h, t)| [*h, *t].concat()).collect();
        // Every token is example 1: one buffer of ones, sliced to each length.
        let ones = vec![1u32; seqs.iter().map(Vec::len).max().unwrap_or(0)];
        let items: Vec<(&[u32], &[u32])> =
            seqs.iter().map(|s| (&s[..], &ones[..s.len()])).collect();
        Self::of_rows(&items, pad, device)
    }

    /// Rows that may themselves hold several examples: each item is its tokens and
    /// their example numbers (1, 2, ... within the item, as `AttentionMask::
    /// from_segments` takes them). Examples stay apart when items share a row. On
    /// CPU, items of one example that begin alike share their common prefix.
    pub fn of_rows(items: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        // How many examples each item holds (its highest example number).
        let mut examples = Vec::with_capacity(items.len());
        for (i, (ids, segs)) in items.iter().enumerate() {
            if ids.len() != segs.len() {
                return Err(Error::Invalid(format!(
                    "packed item {i}: tokens and example numbers differ in length"
                )));
            }
            // 0 is padding in a mask, and numbers map to `first - 1 + e`.
            if segs.iter().any(|&e| e == 0 || e > u32::MAX / 2) {
                return Err(Error::Invalid(format!(
                    "packed item {i}: example numbers must count from 1"
                )));
            }
            examples.push(segs.iter().copied().max().unwrap_or(0));
        }
        let seqs: Vec<&[u32]> = items.iter().map(|(ids, _)| *ids).collect();
        // Items of one example (every number 1) may share, on CPU.
        let eligible: Vec<bool> = examples
            .iter()
            .map(|&e| e == 1 && device.is_cpu())
            .collect();
        let groups = share_prefixes(&seqs, &eligible);
        let lengths: Vec<usize> = groups
            .iter()
            .map(|g| {
                g.shared
                    + g.members
                        .iter()
                        .map(|&i| seqs[i].len() - g.shared)
                        .sum::<usize>()
            })
            .collect();
        let mut parents = HashMap::new();
        // Offsets within each item; the item's start is added below.
        let mut spans = vec![
            Span {
                prefix: 0,
                shared: 0,
                own: 0
            };
            seqs.len()
        ];
        let (ids, segments, starts) =
            Self::build(&lengths, pad, device, |k, ids, segments, first| {
                let g = &groups[k];
                if g.shared == 0 {
                    // One item as given: its examples numbered from `first`.
                    let i = g.members[0];
                    let (tokens, numbers) = items[i];
                    ids.copy_from_slice(tokens);
                    for (slot, &e) in segments.iter_mut().zip(numbers) {
                        *slot = first - 1 + e;
                    }
                    return first + examples[i];
                }
                // The prefix (example `first`), then each member's rest (its child).
                ids[..g.shared].copy_from_slice(&seqs[g.members[0]][..g.shared]);
                segments[..g.shared].fill(first);
                let mut next = first + 1;
                let mut at = g.shared;
                for &i in &g.members {
                    let rest = &seqs[i][g.shared..];
                    ids[at..at + rest.len()].copy_from_slice(rest);
                    segments[at..at + rest.len()].fill(next);
                    if !rest.is_empty() {
                        parents.insert(next, first);
                    }
                    spans[i] = Span {
                        prefix: 0,
                        shared: g.shared,
                        own: at,
                    };
                    at += rest.len();
                    next += 1;
                }
                next
            })?;
        for (g, &start) in groups.iter().zip(&starts) {
            for &i in &g.members {
                spans[i].prefix += start;
                spans[i].own += start;
            }
        }
        let width = segments[0].len();
        let mut mask = AttentionMask::from_tree(&segments, &parents, width, device)?;
        // Every example of every item, those wholly inside a shared prefix included.
        mask.sequences = examples.iter().map(|&e| e as usize).sum();
        Ok(Packed { ids, mask, spans })
    }

    /// The flat index (into R·W) of sequence `i`'s token `t`.
    pub fn flat(&self, i: usize, t: usize) -> usize {
        self.spans[i].flat(t)
    }

    /// Lays out items of `lengths`; `write(i, ids, segments, first)` fills item i's
    /// slots, numbering its examples from `first`, and returns the next free number
    /// (numbers are unique in the batch, so in each row). Returns the (R, W) ids, the
    /// rows' example numbers and each item's flat start.
    fn build(
        lengths: &[usize],
        pad: u32,
        device: &Device,
        mut write: impl FnMut(usize, &mut [u32], &mut [u32], u32) -> u32,
    ) -> Result<(Tensor, Vec<Vec<u32>>, Vec<usize>)> {
        let longest = lengths.iter().copied().max().unwrap_or(0);
        if lengths.is_empty() || longest == 0 {
            return Err(Error::Invalid("no sequence to pack".into()));
        }
        // Wider rows cost the fused CPU attention nothing (each query visits only its
        // own sequence's keys); the composite attention of other devices scores every
        // key of a row, so there rows stay as wide as the longest sequence.
        let max_width = if device.is_cpu() {
            2 * longest
        } else {
            longest
        };
        let Layout { rows, width, place } = layout(lengths, max_width);
        let mut ids = vec![pad; rows * width];
        let mut segments = vec![vec![0u32; width]; rows];
        let mut starts = Vec::with_capacity(lengths.len());
        let mut next = 1;
        for (i, (&n, &(row, at))) in lengths.iter().zip(&place).enumerate() {
            let start = row * width + at;
            next = write(
                i,
                &mut ids[start..start + n],
                &mut segments[row][at..at + n],
                next,
            );
            starts.push(start);
        }
        Ok((
            Tensor::from_vec(ids, (rows, width), device)?,
            segments,
            starts,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn short_sequences_share_rows_and_long_ones_do_not() {
        // Width 5, longest first: 5 alone; 3 then a 2; the other 2 and the 1 together.
        let l = layout(&[2, 5, 3, 1, 2], 5);
        assert_eq!((l.rows, l.width), (3, 5));
        assert_eq!(l.place, [(1, 3), (0, 0), (1, 0), (2, 2), (2, 0)]);
        // Equal lengths fill rows in the given order.
        let l = layout(&[2, 2, 2], 2);
        assert_eq!((l.rows, l.width), (3, 2));
        assert_eq!(l.place, [(0, 0), (1, 0), (2, 0)]);
    }

    #[test]
    fn wider_rows_are_taken_when_they_waste_fewer_slots() {
        // As wide as the longest: 5 | 4 | 4 | 3, 20 slots for 16 tokens. Rows of 8
        // (16 over 2 rows): 5 + 3 | 4 + 4, no slot wasted.
        assert_eq!(layout(&[5, 4, 4, 3], 5).rows, 4);
        let l = layout(&[5, 4, 4, 3], 10);
        assert_eq!((l.rows, l.width), (2, 8));
        assert_eq!(l.place, [(0, 0), (1, 0), (1, 4), (0, 5)]);
        // Never wider than allowed, and no wider than needed: equal lengths stay
        // one per row when that wastes nothing.
        assert!(layout(&[7, 6, 6, 5, 2, 1], 9).width <= 9);
        assert_eq!(layout(&[3, 3, 3], 6).width, 3);
        // Every layout holds each sequence inside its row, without overlap.
        let lengths = [9, 3, 7, 7, 2, 5, 8, 1, 4, 6, 6, 3];
        let l = layout(&lengths, 18);
        let mut taken = vec![vec![false; l.width]; l.rows];
        for (&n, &(row, at)) in lengths.iter().zip(&l.place) {
            assert!(at + n <= l.width);
            for slot in &mut taken[row][at..at + n] {
                assert!(!*slot, "overlap");
                *slot = true;
            }
        }
        assert!(l.rows * l.width < lengths.len() * 9);
    }

    #[test]
    fn each_sequence_keeps_its_tokens_positions_and_keys() {
        let (a, b, c): (&[u32], &[u32], &[u32]) = (&[10, 11, 12, 13], &[20], &[30, 31]);
        let packed = Packed::new(&[(a, &[]), (b, &[21, 22]), (c, &[])], 0, &Device::Cpu).unwrap();
        // 9 tokens: rows of 4 would take three (a | b | c, 12 slots); rows of 5 take
        // two (a | b + c, 10 slots).
        assert_eq!(packed.ids.dims(), [2, 5]);
        let ids = flat(&packed.ids);
        assert_eq!(
            (0..3).map(|i| packed.flat(i, 0)).collect::<Vec<_>>(),
            [0, 5, 8]
        );
        assert_eq!(ids, [10, 11, 12, 13, 0, 20, 21, 22, 30, 31]);
        let pos = flat(&packed.mask.position_ids);
        assert_eq!(pos, [0, 1, 2, 3, 0, 0, 1, 2, 0, 1]);
        // c counts from 0 and sees only itself; the padding query sees nothing.
        let sees =
            |b: usize, t: usize| -> Vec<usize> { packed.mask.causal.visible(b, t).collect() };
        assert_eq!(sees(1, 3), [3]);
        assert_eq!(sees(1, 4), [3, 4]);
        assert_eq!(sees(1, 2), [0, 1, 2]);
        assert!(sees(0, 4).is_empty());
        assert_eq!(packed.mask.sequences, 3);
        // Off the CPU, rows stay as wide as the longest sequence (composite
        // attention scores every key of a row).
        let l = layout(&[4, 3, 2], 4);
        assert_eq!((l.rows, l.width), (3, 4));
    }

    #[test]
    fn sequences_that_begin_alike_share_their_prefix() {
        let all = |v: &[&[u32]]| -> Vec<Group> { share_prefixes(v, &vec![true; v.len()]) };
        let groups = all(&[&[1, 2, 3, 4], &[9], &[1, 2, 3, 5, 6], &[1, 2, 3, 4]]);
        assert_eq!(
            groups,
            [
                Group {
                    members: vec![0, 2, 3],
                    shared: 3
                },
                Group {
                    members: vec![1],
                    shared: 0
                }
            ]
        );
        // A third row sharing one token would cut the pair's saving of 5 to 3.
        let groups = all(&[&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], &[1, 9]]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].shared, 5);
        assert_eq!(groups[1].shared, 0);
        // Below the threshold `of_rows` lays every item whole, a row of two examples
        // among them: the shared first token is laid once per item (three times).
        let (a, b): (Vec<u32>, Vec<u32>) =
            ((1..=20).collect(), [1].into_iter().chain(30..49).collect());
        let items: [(&[u32], &[u32]); 3] =
            [(&a, &[1; 20]), (&b, &[1; 20]), (&[1, 2, 3], &[1, 1, 2])];
        let p = Packed::of_rows(&items, 0, &Device::Cpu).unwrap();
        assert!(p.spans.iter().all(|s| s.shared == 0), "{:?}", p.spans);
        assert_eq!(flat(&p.ids).iter().filter(|&&t| t == 1).count(), 3);
        assert_eq!(p.mask.sequences, 4);
        // Saving 1 token of 16 shares; 1 of 17 does not.
        let long: Vec<u32> = (10..24).collect();
        let groups = all(&[&[1], &[1], &long]);
        assert_eq!(groups.iter().map(|g| g.shared).collect::<Vec<_>>(), [1, 0]);
        let longer: Vec<u32> = (10..25).collect();
        let groups = all(&[&[1], &[1], &longer]);
        assert_eq!(
            groups.iter().map(|g| g.shared).collect::<Vec<_>>(),
            [0, 0, 0]
        );

        let (a, b, c, d): (&[u32], &[u32], &[u32], &[u32]) =
            (&[1, 2, 3], &[9], &[1, 2, 3, 5], &[1, 2]);
        let p = Packed::new(
            &[(a, &[4]), (b, &[]), (c, &[6]), (d, &[3, 4])],
            0,
            &Device::Cpu,
        )
        .unwrap();
        // One item of 7 (the prefix 1 2 3, then 4 | 5 6 | 4) and [9]: one row of 8.
        assert_eq!(flat(&p.ids), [1, 2, 3, 4, 5, 6, 4, 9]);
        let at = |i: usize, n: usize| -> Vec<usize> { (0..n).map(|t| p.flat(i, t)).collect() };
        assert_eq!(at(0, 4), [0, 1, 2, 3]);
        assert_eq!(at(1, 1), [7]);
        assert_eq!(at(2, 5), [0, 1, 2, 4, 5]);
        assert_eq!(at(3, 4), [0, 1, 2, 6]);
        assert_eq!(flat(&p.mask.position_ids), [0, 1, 2, 3, 3, 4, 3, 0]);
        let sees = |t: usize| -> Vec<usize> { p.mask.causal.visible(0, t).collect() };
        assert_eq!(sees(5), [0, 1, 2, 4, 5]);
        assert_eq!(sees(6), [0, 1, 2, 6]);
        assert_eq!(sees(7), [7]);
        assert_eq!(p.mask.sequences, 4);
        // A sequence that is all prefix has no tokens of its own.
        let p = Packed::new(&[(&[1, 2], &[]), (&[1, 2], &[3])], 0, &Device::Cpu).unwrap();
        assert_eq!(flat(&p.ids), [1, 2, 3]);
        assert_eq!((p.flat(0, 1), p.flat(1, 2)), (1, 2));
        assert_eq!(p.mask.sequences, 2);
        // Rows of one example share (the first two); a row of two examples does not,
        // though it begins alike.
        let items: [(&[u32], &[u32]); 3] = [
            (&[1, 2, 3], &[1, 1, 1]),
            (&[1, 2, 4], &[1, 1, 1]),
            (&[1, 2, 5], &[1, 1, 2]),
        ];
        let p = Packed::of_rows(&items, 0, &Device::Cpu).unwrap();
        assert_eq!(flat(&p.ids), [1, 2, 3, 4, 1, 2, 5]);
        assert_eq!(flat(&p.mask.position_ids), [0, 1, 2, 2, 0, 1, 0]);
        assert_eq!((p.flat(1, 1), p.flat(1, 2), p.flat(2, 0)), (1, 3, 4));
        assert_eq!(p.mask.sequences, 4);
        // Off the CPU nothing is shared (not tested here: no other device).
        let g = share_prefixes(&[&[1, 2], &[1, 2]], &[false, false]);
        assert_eq!(g.iter().map(|g| g.shared).collect::<Vec<_>>(), [0, 0]);
    }

    #[test]
    fn rows_of_several_examples_keep_them_apart_when_they_share_a_row() {
        // Item 0: two examples (2 + 2 tokens); item 1: one example of 3; item 2: one
        // of 1. Width 4: item 0 alone, items 1 and 2 together.
        let items: [(&[u32], &[u32]); 3] = [
            (&[1, 2, 3, 4], &[1, 1, 2, 2]),
            (&[5, 6, 7], &[1, 1, 1]),
            (&[8], &[1]),
        ];
        let p = Packed::of_rows(&items, 0, &Device::Cpu).unwrap();
        assert_eq!(p.ids.dims(), [2, 4]);
        assert_eq!((0..3).map(|i| p.flat(i, 0)).collect::<Vec<_>>(), [0, 4, 7]);
        assert_eq!(p.mask.sequences, 4);
        let pos = flat(&p.mask.position_ids);
        assert_eq!(pos, [0, 1, 0, 1, 0, 1, 2, 0]);
        let sees = |b: usize, t: usize| -> Vec<usize> { p.mask.causal.visible(b, t).collect() };
        assert_eq!(sees(0, 3), [2, 3]);
        assert_eq!(sees(1, 3), [3], "item 2 does not see item 1");
        assert!(Packed::of_rows(&[(&[1, 2], &[1])], 0, &Device::Cpu).is_err());
        assert!(Packed::of_rows(&[(&[1, 2], &[0, 1])], 0, &Device::Cpu).is_err());
        // A row of two examples shares a packed row with a third: all three apart.
        let items: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[1, 1, 2]), (&[4], &[1])];
        let p = Packed::of_rows(&items, 0, &Device::Cpu).unwrap();
        assert_eq!(p.ids.dims(), [1, 4]);
        assert_eq!(p.mask.sequences, 3);
        assert_eq!(flat(&p.mask.position_ids), [0, 1, 0, 0]);
        let sees = |t: usize| -> Vec<usize> { p.mask.causal.visible(0, t).collect() };
        assert_eq!(sees(2), [2]);
        assert_eq!(
            sees(3),
            [3],
            "the second item does not see the first's second example"
        );
    }
}
