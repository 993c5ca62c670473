//! The swap device's block allocator: one bit per block in 64-bit words,
//! searched from a next-fit cursor for a run of blocks, skipping a full
//! or a wholly free word in one step (the role of FreeBSD's `blist`, in a
//! flat bitmap: a 64 GiB device is 2 MiB of bits).

/// Which blocks are in use.
pub(crate) struct BlockMap {
    /// Bit `b % 64` of word `b / 64`: block `b` is in use.
    words: Vec<u64>,
    blocks: usize,
    in_use: u64,
    /// Where the next search starts (next fit): allocations march through
    /// the device, so runs written together lie together.
    cursor: usize,
}

impl BlockMap {
    /// A map of `blocks` free blocks.
    pub(crate) fn new(blocks: usize) -> BlockMap {
        BlockMap {
            words: vec![0; blocks.div_ceil(64)],
            blocks,
            in_use: 0,
            cursor: 0,
        }
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

    /// A run of up to `want` free blocks: the first run of `want` from the
    /// cursor, else from the start (runs do not wrap around the end), else
    /// the longest shorter run; `(first block, length)`, marked in use.
    /// `None` when the device is full.
    pub(crate) fn alloc(&mut self, want: usize) -> Option<(u64, usize)> {
        let want = want.min(self.blocks);
        if want == 0 || self.in_use == self.blocks as u64 {
            return None;
        }
        // From the cursor on; failing that, from the start up to where a
        // run straddling the cursor would end.
        let mut best = (0, 0);
        let straddle = (self.cursor + want).min(self.blocks);
        for (lo, hi) in [(self.cursor, self.blocks), (0, straddle)] {
            let (start, len) = self.search(lo, hi, want);
            if len > best.1 {
                best = (start, len);
            }
            if best.1 == want {
                break;
            }
        }
        let (start, len) = best;
        if len == 0 {
            return None;
        }
        for b in start..start + len {
            self.words[b / 64] |= 1 << (b % 64);
        }
        self.in_use += len as u64;
        self.cursor = (start + len) % self.blocks;
        Some((start as u64, len))
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

    /// Marks `block` free; a block already free (or past the end) is left
    /// alone.
    pub(crate) fn free(&mut self, block: u64) {
        let Ok(b) = usize::try_from(block) else {
            return;
        };
        if b < self.blocks && self.used(b) {
            self.words[b / 64] &= !(1 << (b % 64));
            self.in_use -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(m: &mut BlockMap, b: usize) {
        m.words[b / 64] |= 1 << (b % 64);
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
        assert_eq!(w.alloc(2), Some((3, 1)), "3 alone, not 3 and 0");
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
        for blocks in [1usize, 63, 64, 65, 200, 1000] {
            let mut m = BlockMap::new(blocks);
            let mut model = vec![false; blocks];
            for _ in 0..4000 {
                if rnd() % 3 == 0 {
                    let b = (rnd() % blocks as u64) as usize;
                    m.free(b as u64);
                    model[b] = false;
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
