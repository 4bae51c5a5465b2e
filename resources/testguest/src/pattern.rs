//! Deterministic page contents for `fill`/`verify`/`dirty`.
//!
//! Every u64 word of a filled page is a function of the fill seed, the
//! page's frame number and the page's version number (bumped by each
//! rewrite), so a page that was swapped with another page, lost, zeroed or
//! left at an older version is detected.

/// u64 words per 4 KiB page.
pub const PAGE_WORDS: usize = 512;

/// SplitMix64 finaliser (Steele, Lea, Flood 2014).
pub const fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Per-word increment: odd, so the 512 words of a page are all distinct.
const WORD_STEP: u64 = 0xd1b5_4a32_d192_ed03;

/// The value of word 0 of a page; word `i` is `base + i * WORD_STEP`.
pub const fn page_base(seed: u64, pfn: u64, version: u32) -> u64 {
    splitmix64(
        splitmix64(seed ^ 0x7465_7374_6775_6573)
            ^ pfn.wrapping_mul(0x2545_f491_4f6c_dd1d)
            ^ ((version as u64) << 40),
    )
}

/// Expected value of word `i` of a page whose word 0 is `base`.
pub const fn word(base: u64, i: usize) -> u64 {
    base.wrapping_add((i as u64).wrapping_mul(WORD_STEP))
}

/// Writes the pattern over one page.
#[inline]
pub fn fill_page(page: &mut [u64; PAGE_WORDS], base: u64) {
    let mut v = base;
    for w in page.iter_mut() {
        *w = v;
        v = v.wrapping_add(WORD_STEP);
    }
}

/// First word that differs from the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub word: usize,
    pub expected: u64,
    pub got: u64,
}

/// Checks one page; fast path compares whole pages, the slow path finds
/// the first bad word.
#[inline]
pub fn check_page(page: &[u64; PAGE_WORDS], base: u64) -> Result<(), Mismatch> {
    let mut v = base;
    let mut diff = 0u64;
    for &w in page.iter() {
        diff |= w ^ v;
        v = v.wrapping_add(WORD_STEP);
    }
    if diff == 0 {
        return Ok(());
    }
    for (i, &got) in page.iter().enumerate() {
        let expected = word(base, i);
        if got != expected {
            return Err(Mismatch {
                word: i,
                expected,
                got,
            });
        }
    }
    Ok(())
}

/// What the guest remembers about one frame: which fill (seed slot) wrote
/// it and at which version. 0 means "not filled".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record(pub u32);

/// Highest seed slot (slot 0 means "not filled").
pub const MAX_SEED_SLOTS: usize = 255;
/// Versions wrap at 24 bits, skipping 0.
pub const VERSION_MASK: u32 = 0x00ff_ffff;

impl Record {
    pub const EMPTY: Record = Record(0);

    pub fn new(slot: u8, version: u32) -> Record {
        debug_assert!(slot != 0);
        Record(u32::from(slot) | ((version & VERSION_MASK) << 8))
    }
    pub fn is_filled(self) -> bool {
        self.0 & 0xff != 0
    }
    pub fn slot(self) -> u8 {
        (self.0 & 0xff) as u8
    }
    pub fn version(self) -> u32 {
        self.0 >> 8
    }
    /// The same page one version later (wrapping, never 0).
    pub fn bumped(self) -> Record {
        let mut v = (self.version() + 1) & VERSION_MASK;
        if v == 0 {
            v = 1;
        }
        Record::new(self.slot(), v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let mut p = [0u64; PAGE_WORDS];
        let b = page_base(7, 0x1234, 1);
        fill_page(&mut p, b);
        assert_eq!(check_page(&p, b), Ok(()));
        assert_eq!(p[5], word(b, 5));
        p[77] ^= 1;
        assert_eq!(
            check_page(&p, b),
            Err(Mismatch {
                word: 77,
                expected: word(b, 77),
                got: word(b, 77) ^ 1
            })
        );
    }

    #[test]
    fn pattern_depends_on_seed_pfn_and_version() {
        let b = page_base(7, 100, 1);
        assert_ne!(b, page_base(8, 100, 1));
        assert_ne!(b, page_base(7, 101, 1));
        assert_ne!(b, page_base(7, 100, 2));
        let mut p = [0u64; PAGE_WORDS];
        fill_page(&mut p, b);
        assert!(check_page(&p, page_base(7, 101, 1)).is_err());
        assert!(check_page(&[0; PAGE_WORDS], b).is_err());
    }

    #[test]
    fn words_of_a_page_are_distinct() {
        let mut p = [0u64; PAGE_WORDS];
        fill_page(&mut p, page_base(1, 1, 1));
        let mut s = p.to_vec();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), PAGE_WORDS);
    }

    #[test]
    fn records() {
        let r = Record::new(3, 1);
        assert!(r.is_filled());
        assert!(!Record::EMPTY.is_filled());
        assert_eq!((r.slot(), r.version()), (3, 1));
        let r = r.bumped();
        assert_eq!((r.slot(), r.version()), (3, 2));
        let top = Record::new(9, VERSION_MASK);
        assert_eq!(top.bumped().version(), 1);
    }
}
