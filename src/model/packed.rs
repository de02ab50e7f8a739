//! Packed batches: sequences of different lengths laid side by side in as few rows as
//! fit, instead of one right-padded row each. A row (on CPU up to twice the longest
//! sequence's width) holds several sequences; each attends only to itself and counts
//! its positions from 0 (`AttentionMask::from_segments`), so every sequence computes
//! what it would alone, and the padding that a batch of mixed lengths carries is not
//! computed. (A reward model's batch of K responses per prompt was 28 % padding.)

use candle_core::{Device, Tensor};

use super::AttentionMask;
use crate::error::{Error, Result};

/// Sequences packed into (R, W) rows.
pub struct Packed {
    pub ids: Tensor, // (R, W) u32
    pub mask: AttentionMask,
    /// Flat index into (R·W) of each sequence's first token, in the order given.
    pub starts: Vec<usize>,
}

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
    /// and nothing), one example; `pad` fills the rows' ends.
    pub fn new(seqs: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        let lengths: Vec<usize> = seqs.iter().map(|(h, t)| h.len() + t.len()).collect();
        Self::build(&lengths, pad, device, |i, ids, segments, first| {
            let (head, tail) = seqs[i];
            for (slot, &t) in ids.iter_mut().zip(head.iter().chain(tail)) {
                *slot = t;
            }
            segments.fill(first);
            first + 1
        })
    }

    /// Rows that may themselves hold several examples: each item is its tokens and
    /// their example numbers (1, 2, ... within the item, as `AttentionMask::
    /// from_segments` takes them). Examples stay apart when items share a row.
    pub fn of_rows(items: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
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
        }
        let lengths: Vec<usize> = items.iter().map(|(ids, _)| ids.len()).collect();
        Self::build(&lengths, pad, device, |i, ids, segments, first| {
            let (tokens, examples) = items[i];
            ids.copy_from_slice(tokens);
            for (slot, &e) in segments.iter_mut().zip(examples) {
                *slot = first - 1 + e;
            }
            first + examples.iter().copied().max().unwrap_or(0)
        })
    }

    /// Lays out items of `lengths`; `write(i, ids, segments, first)` fills item i's
    /// slots, numbering its examples from `first`, and returns the next free number
    /// (numbers are unique in the batch, so in each row).
    fn build(
        lengths: &[usize],
        pad: u32,
        device: &Device,
        mut write: impl FnMut(usize, &mut [u32], &mut [u32], u32) -> u32,
    ) -> Result<Self> {
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
        Ok(Packed {
            ids: Tensor::from_vec(ids, (rows, width), device)?,
            mask: AttentionMask::from_segments(&segments, width, device)?,
            starts,
        })
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
        assert_eq!(packed.starts, [0, 5, 8]);
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
        assert_eq!(p.starts, [0, 4, 7]);
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
