//! The swap device's block allocator: one bit per block in 64-bit words,
//! and over them a summary tree (the role of FreeBSD's `blist`): for each
//! group of words, the free run at its start, at its end and the longest
//! inside, combined upwards. An allocation looks near a next-fit cursor
//! first (the device fills in order, so runs written together lie
//! together), then asks the tree for the leftmost run of the length wanted
//! or, if there is none, of the longest there is: O(log n), however
//! fragmented the device. A 64 GiB device is 2 MiB of bits and as much of
//! tree.

/// Words per leaf of the summary tree.
const GROUP: usize = 8;
/// Blocks the cursor look covers before the tree is asked.
const NEAR: usize = 64 * GROUP;

/// Free runs of a span of blocks: at its start, at its end, the longest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Runs {
    len: usize,
    pre: usize,
    suf: usize,
    best: usize,
}

impl Runs {
    /// A span wholly in use.
    fn used(len: usize) -> Runs {
        Runs {
            len,
            ..Runs::default()
        }
    }

    /// The runs of one word (1 = in use).
    fn of_word(w: u64) -> Runs {
        let free = !w;
        // One step per run of free blocks, not per block.
        let (mut x, mut best) = (free, 0);
        while x != 0 {
            x >>= x.trailing_zeros();
            let run = x.trailing_ones();
            best = best.max(run as usize);
            x = x.checked_shr(run).unwrap_or(0);
        }
        Runs {
            len: 64,
            pre: free.trailing_ones() as usize,
            suf: free.leading_ones() as usize,
            best,
        }
    }

    /// The runs of `l` followed by `r`.
    fn join(l: Runs, r: Runs) -> Runs {
        Runs {
            len: l.len + r.len,
            pre: if l.pre == l.len { l.len + r.pre } else { l.pre },
            suf: if r.suf == r.len { r.len + l.suf } else { r.suf },
            best: l.best.max(r.best).max(l.suf + r.pre),
        }
    }
}

/// Which blocks are in use.
pub(crate) struct BlockMap {
    /// Bit `b % 64` of word `b / 64`: block `b` is in use. Bits past the
    /// last block are set, so they never look free.
    words: Vec<u64>,
    /// The summary tree: node 1 is the root, node `i`'s children are `2i`
    /// and `2i + 1`, leaves (from `leaves`) cover `GROUP` words each.
    tree: Vec<Runs>,
    leaves: usize,
    blocks: usize,
    in_use: u64,
    /// Where the next search starts (next fit).
    cursor: usize,
}

impl BlockMap {
    /// A map of `blocks` free blocks.
    pub(crate) fn new(blocks: usize) -> BlockMap {
        let mut words = vec![0; blocks.div_ceil(64)];
        if blocks % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last = !0 << (blocks % 64);
            }
        }
        let leaves = words.len().div_ceil(GROUP).next_power_of_two();
        let mut m = BlockMap {
            words,
            tree: vec![Runs::used(64 * GROUP); 2 * leaves],
            leaves,
            blocks,
            in_use: 0,
            cursor: 0,
        };
        for leaf in 0..m.words.len().div_ceil(GROUP) {
            m.tree[leaves + leaf] = m.leaf_runs(leaf);
        }
        for node in (1..leaves).rev() {
            m.tree[node] = Runs::join(m.tree[2 * node], m.tree[2 * node + 1]);
        }
        m
    }

    /// Blocks on the device.
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks as u64
    }

    /// Blocks in use.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use
    }

    fn used(&self, b: usize) -> bool {
        self.words[b / 64] >> (b % 64) & 1 != 0
    }

    fn leaf_runs(&self, leaf: usize) -> Runs {
        (leaf * GROUP..(leaf + 1) * GROUP)
            .map(|w| {
                self.words
                    .get(w)
                    .map_or(Runs::used(64), |&w| Runs::of_word(w))
            })
            .reduce(Runs::join)
            .unwrap_or_default()
    }

    /// Brings the tree up to date after word `w` changed.
    fn update(&mut self, w: usize) {
        let mut node = self.leaves + w / GROUP;
        self.tree[node] = self.leaf_runs(w / GROUP);
        while node > 1 {
            node /= 2;
            self.tree[node] = Runs::join(self.tree[2 * node], self.tree[2 * node + 1]);
        }
    }

    /// A run of up to `want` free blocks: near the cursor if a run of
    /// `want` is there, else the leftmost run of `want`, else the leftmost
    /// of the longest run there is (runs do not wrap around the end);
    /// `(first block, length)`, marked in use. `None` when the device is
    /// full.
    pub(crate) fn alloc(&mut self, want: usize) -> Option<(u64, usize)> {
        let want = want.min(self.blocks);
        if want == 0 || self.in_use == self.blocks as u64 {
            return None;
        }
        let near = (self.cursor + NEAR).min(self.blocks);
        let (start, len) = match self.search(self.cursor, near, want) {
            (start, len) if len == want => (start, len),
            _ => {
                let len = self.tree[1].best.min(want);
                if len == 0 {
                    return None;
                }
                (self.leftmost(len), len)
            }
        };
        for b in start..start + len {
            self.words[b / 64] |= 1 << (b % 64);
        }
        for w in start / 64..=(start + len - 1) / 64 {
            self.update(w);
        }
        self.in_use += len as u64;
        self.cursor = (start + len) % self.blocks;
        Some((start as u64, len))
    }

    /// The first block of the leftmost free run of at least `k` blocks;
    /// one exists (the root's longest run is at least `k`).
    fn leftmost(&self, k: usize) -> usize {
        let (mut node, mut base, mut span) = (1, 0, self.leaves * GROUP * 64);
        while node < self.leaves {
            let (l, r) = (self.tree[2 * node], self.tree[2 * node + 1]);
            span /= 2;
            if l.best >= k {
                node *= 2;
            } else if l.suf + r.pre >= k {
                return base + span - l.suf;
            } else {
                node = 2 * node + 1;
                base += span;
            }
        }
        let end = (base + GROUP * 64).min(self.blocks);
        self.search(base, end, k).0
    }

    /// The first run of `want` free blocks in `lo..hi`, or the longest
    /// shorter one there. Works a word at a time: a word's runs of used
    /// and free blocks are measured with `trailing_ones`/`trailing_zeros`.
    fn search(&self, lo: usize, hi: usize, want: usize) -> (usize, usize) {
        let (mut best, mut run_start, mut run) = ((0, 0), lo, 0);
        let mut b = lo;
        while b < hi {
            let avail = (64 - b % 64).min(hi - b);
            let mut w = self.words[b / 64] >> (b % 64);
            let mut i = 0;
            while i < avail {
                if w & 1 != 0 {
                    let k = (w.trailing_ones() as usize).min(avail - i);
                    run = 0;
                    w = w.checked_shr(k as u32).unwrap_or(0);
                    i += k;
                    continue;
                }
                let k = (w.trailing_zeros() as usize).min(avail - i);
                if run == 0 {
                    run_start = b + i;
                }
                run += k;
                if run >= want {
                    return (run_start, want);
                }
                if run > best.1 {
                    best = (run_start, run);
                }
                w = w.checked_shr(k as u32).unwrap_or(0);
                i += k;
            }
            b += avail;
        }
        best
    }

    /// Marks `blocks` free, bringing the summary up to date once per word
    /// touched rather than once per block.
    pub(crate) fn free_many(&mut self, blocks: impl Iterator<Item = u64>) {
        let mut last = None;
        for b in blocks {
            let Some(w) = self.clear(b) else { continue };
            if last.is_some_and(|l| l != w) {
                self.update(last.unwrap_or(w));
            }
            last = Some(w);
        }
        if let Some(w) = last {
            self.update(w);
        }
    }

    /// Clears `block`'s bit; the word it is in, if it changed.
    fn clear(&mut self, block: u64) -> Option<usize> {
        let b = usize::try_from(block).ok()?;
        if b >= self.blocks || !self.used(b) {
            return None;
        }
        self.words[b / 64] &= !(1 << (b % 64));
        self.in_use -= 1;
        Some(b / 64)
    }

    /// Marks `block` free; a block already free (or past the end) is left
    /// alone.
    #[cfg(test)]
    fn free(&mut self, block: u64) {
        if let Some(w) = self.clear(block) {
            self.update(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(m: &mut BlockMap, b: usize) {
        m.words[b / 64] |= 1 << (b % 64);
        m.update(b / 64);
        m.in_use += 1;
    }

    #[test]
    fn runs_come_whole_from_the_cursor_and_never_wrap() {
        let mut m = BlockMap::new(16);
        assert_eq!(m.alloc(4), Some((0, 4)));
        assert_eq!(m.alloc(4), Some((4, 4)));
        for b in [9, 11, 13, 15] {
            take(&mut m, b);
        }
        // 8, 10, 12, 14 free, alone: the longest run there is 1.
        assert_eq!(m.alloc(4), Some((8, 1)));
        m.free(2);
        m.free(2);
        assert_eq!(m.in_use(), 12);
        // From the cursor (9) to the end there are single blocks; from
        // the start, block 2 alone too: a run of 1.
        assert_eq!(m.alloc(2).map(|r| r.1), Some(1));
        // A run does not wrap: 15 and 0 are not one run.
        let mut w = BlockMap::new(4);
        assert_eq!(w.alloc(3), Some((0, 3)));
        w.free(0);
        let first = w.alloc(2).unwrap();
        assert_eq!(first.1, 1, "3 and 0 are not one run");
        let second = w.alloc(2).unwrap();
        let mut got = [first.0, second.0];
        got.sort_unstable();
        assert_eq!(got, [0, 3]);
    }

    #[test]
    fn a_full_device_says_so_and_freeing_is_idempotent() {
        let mut m = BlockMap::new(130);
        assert_eq!(m.alloc(200), Some((0, 130)));
        assert_eq!(m.alloc(1), None);
        m.free(129);
        m.free(129);
        m.free(1 << 40);
        assert_eq!(m.in_use(), 129);
        assert_eq!(m.alloc(4), Some((129, 1)));
    }

    #[test]
    fn the_summary_finds_a_far_run_and_the_longest_when_none_is_long_enough() {
        let blocks = 1 << 20;
        let mut m = BlockMap::new(blocks);
        assert_eq!(m.alloc(blocks), Some((0, blocks)));
        // Free 16 blocks far from the cursor (0) and a run of 5 before it.
        for b in 900_000..900_016 {
            m.free(b);
        }
        for b in 10..15 {
            m.free(b);
        }
        assert_eq!(m.alloc(16), Some((900_000, 16)));
        assert_eq!(m.alloc(16), Some((10, 5)), "the longest left");
        assert_eq!(m.alloc(1), None);
        assert_eq!(m.tree[1].best, 0);
    }

    /// Against a plain model: every allocation is free blocks, marked; no
    /// block is handed out twice; a run of `want` is found whenever one
    /// exists; counts agree.
    #[test]
    fn agrees_with_a_model_over_random_use() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for blocks in [1usize, 63, 64, 65, 200, 1000, 9000] {
            let mut m = BlockMap::new(blocks);
            let mut model = vec![false; blocks];
            for _ in 0..4000 {
                if rnd() % 3 == 0 {
                    let b = (rnd() % blocks as u64) as usize;
                    m.free(b as u64);
                    model[b] = false;
                    continue;
                }
                if rnd() % 7 == 0 {
                    // A run of frees, some twice, some past the end.
                    let first = rnd() % (blocks as u64 + 8);
                    let list: Vec<u64> = (first..first + 70).chain([first, first + 3]).collect();
                    m.free_many(list.iter().copied());
                    for &b in &list {
                        if let Some(u) = model.get_mut(b as usize) {
                            *u = false;
                        }
                    }
                    continue;
                }
                let want = 1 + (rnd() % 40) as usize;
                let longest = model.split(|&u| u).map(<[bool]>::len).max().unwrap_or(0);
                match m.alloc(want) {
                    None => assert_eq!(longest, 0, "refused with free blocks"),
                    Some((s, n)) => {
                        let s = s as usize;
                        assert!(n >= 1 && n <= want);
                        assert_eq!(n, want.min(longest), "the longest run, up to want");
                        for (b, used) in model.iter_mut().enumerate().skip(s).take(n) {
                            assert!(!*used, "block {b} handed out twice");
                            *used = true;
                        }
                    }
                }
                let used = model.iter().filter(|&&u| u).count() as u64;
                assert_eq!(m.in_use(), used);
                assert!((0..blocks).all(|b| m.used(b) == model[b]));
            }
        }
    }
}
