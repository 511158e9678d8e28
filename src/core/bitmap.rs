//! The out-of-sync bitmap: one bit per 4 KiB block of the data area, kept in
//! memory, with the persistence pages it has dirtied since the last save.

use std::collections::BTreeSet;

use super::ordering::Range;

pub const BLOCK: u64 = 4096;

#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    set: u64,
    bits_per_page: u64,
    dirty: BTreeSet<usize>,
}

impl Bitmap {
    /// A clear bitmap for `data_size` bytes; `bits_per_page` is the persistence unit.
    pub fn new(data_size: u64, bits_per_page: u64) -> Bitmap {
        assert!(
            bits_per_page > 0 && bits_per_page % 64 == 0,
            "page must hold whole words"
        );
        let bits = data_size.div_ceil(BLOCK);
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
            set: 0,
            bits_per_page,
            dirty: BTreeSet::new(),
        }
    }

    /// Loads persisted words (extra words and bits past the end are ignored).
    pub fn from_words(data_size: u64, bits_per_page: u64, words: &[u64]) -> Bitmap {
        let mut b = Bitmap::new(data_size, bits_per_page);
        for (dst, src) in b.words.iter_mut().zip(words) {
            *dst = *src;
        }
        b.mask_tail();
        b.set = b.words.iter().map(|w| w.count_ones() as u64).sum();
        b
    }

    fn mask_tail(&mut self) {
        let rem = self.bits % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of out-of-sync blocks.
    pub fn count(&self) -> u64 {
        self.set
    }

    pub fn bytes(&self) -> u64 {
        self.set * BLOCK
    }

    pub fn get(&self, block: u64) -> bool {
        debug_assert!(block < self.bits);
        self.words[(block / 64) as usize] >> (block % 64) & 1 == 1
    }

    fn put(&mut self, block: u64, value: bool) -> bool {
        let w = &mut self.words[(block / 64) as usize];
        let mask = 1u64 << (block % 64);
        let was = *w & mask != 0;
        if was != value {
            if value {
                *w |= mask;
                self.set += 1;
            } else {
                *w &= !mask;
                self.set -= 1;
            }
            self.dirty.insert((block / self.bits_per_page) as usize);
            true
        } else {
            false
        }
    }

    /// Blocks touched by a byte range (partial blocks included).
    pub fn blocks_touching(&self, r: Range) -> std::ops::Range<u64> {
        let first = r.start / BLOCK;
        let last = r.end.div_ceil(BLOCK).min(self.bits);
        first..last.max(first)
    }

    /// Marks every block the range touches; returns how many were newly set.
    pub fn set_range(&mut self, r: Range) -> u64 {
        let mut n = 0;
        for b in self.blocks_touching(r) {
            n += self.put(b, true) as u64;
        }
        n
    }

    /// Clears blocks `first..last`; returns how many were cleared.
    pub fn clear_blocks(&mut self, blocks: std::ops::Range<u64>) -> u64 {
        let mut n = 0;
        for b in blocks.start..blocks.end.min(self.bits) {
            n += self.put(b, false) as u64;
        }
        n
    }

    pub fn any_in(&self, r: Range) -> bool {
        self.blocks_touching(r).any(|b| self.get(b))
    }

    pub fn set_all(&mut self) {
        for b in 0..self.bits {
            self.put(b, true);
        }
    }

    /// ORs another node's bitmap into this one.
    pub fn merge(&mut self, words: &[u64]) {
        self.merge_at(0, words);
    }

    /// ORs another node's words into this one's, the first at word `first`;
    /// words past the end are ignored.
    pub fn merge_at(&mut self, first: usize, words: &[u64]) {
        let end = self.words.len();
        for (i, w) in (first..end).zip(words) {
            let add = *w & !self.words[i];
            if add != 0 {
                for bit in 0..64 {
                    if add >> bit & 1 == 1 {
                        let block = i as u64 * 64 + bit;
                        if block < self.bits {
                            self.put(block, true);
                        }
                    }
                }
            }
        }
    }

    /// The first set block at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut b = from;
        while b < self.bits {
            let wi = (b / 64) as usize;
            let w = self.words[wi] >> (b % 64);
            if w != 0 {
                let found = b + w.trailing_zeros() as u64;
                return (found < self.bits).then_some(found);
            }
            b = (wi as u64 + 1) * 64;
        }
        None
    }

    pub fn page_of(&self, block: u64) -> usize {
        (block / self.bits_per_page) as usize
    }

    /// Pages dirtied since the last `take_dirty`, and forgets them.
    pub fn take_dirty(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// Takes the dirty pages that cover `blocks`.
    pub fn take_dirty_in(&mut self, blocks: std::ops::Range<u64>) -> Vec<usize> {
        if blocks.is_empty() {
            return Vec::new();
        }
        let first = self.page_of(blocks.start);
        let last = self.page_of(blocks.end - 1);
        let pages: Vec<usize> = self.dirty.range(first..=last).copied().collect();
        for p in &pages {
            self.dirty.remove(p);
        }
        pages
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count() {
        let mut b = Bitmap::new(10 * BLOCK + 100, 64);
        assert_eq!(b.bits(), 11);
        assert_eq!(b.set_range(Range::new(100, 5000)), 2);
        assert_eq!(b.count(), 2);
        assert!(b.any_in(Range::new(4096, 1)));
        assert!(!b.any_in(Range::new(8192, 4096)));
        assert_eq!(b.set_range(Range::new(10 * BLOCK, 100)), 1);
        assert_eq!(b.next_set(0), Some(0));
        assert_eq!(b.next_set(2), Some(10));
        assert_eq!(b.clear_blocks(0..2), 2);
        assert_eq!(b.count(), 1);
        assert_eq!(b.take_dirty(), vec![0]);
        b.set_all();
        assert_eq!(b.count(), 11);
        let c = Bitmap::from_words(10 * BLOCK + 100, 64, b.words());
        assert_eq!(c.count(), 11);
    }

    #[test]
    fn merge_and_tail() {
        let mut a = Bitmap::new(130 * BLOCK, 64);
        a.merge(&[1, 0, u64::MAX]);
        assert_eq!(a.count(), 1 + 2);
        assert_eq!(a.next_set(1), Some(128));
        assert_eq!(a.take_dirty(), vec![0, 2]);
        assert_eq!(a.take_dirty_in(0..130), Vec::<usize>::new());
    }

    #[test]
    fn merge_at_an_offset_ignores_words_past_the_end() {
        let mut a = Bitmap::new(130 * BLOCK, 64);
        a.merge_at(1, &[1, u64::MAX, u64::MAX]);
        assert_eq!(a.count(), 1 + 2);
        assert_eq!(a.next_set(0), Some(64));
        assert_eq!(a.next_set(65), Some(128));
        a.merge_at(usize::MAX, &[u64::MAX]);
        assert_eq!(a.count(), 3);
    }
}
