//! Zero-page detection: the first round sends every page, but an all-zero
//! page goes as a marker, never as 4 KiB of zeros.

/// Bytes checked between early exits: big enough for the compiler to
/// vectorise the OR over it, small enough to stop soon on a non-zero page.
const BLOCK: usize = 256;

/// True if every byte of `buf` is zero. Memory-bandwidth bound: ORs 256-byte
/// blocks as 16-byte words (the compiler turns this into vector loads) and
/// stops at the first block that is not zero.
pub fn is_zero_page(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u128;
        for w in block.chunks_exact(16) {
            let mut b = [0u8; 16];
            b.copy_from_slice(w);
            acc |= u128::from_ne_bytes(b);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_non_zero_pages() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero_page(&page));
        for i in [0, 1, 15, 16, 255, 256, 2048, 4095] {
            page[i] = 0x80;
            assert!(!is_zero_page(&page), "byte {i} set");
            page[i] = 0;
        }
        assert!(is_zero_page(&[]));
        assert!(is_zero_page(&[0u8; 7]));
        assert!(!is_zero_page(&[0, 0, 0, 0, 0, 0, 1]));
        // Unaligned slices and odd lengths.
        let big = vec![0u8; 4096 * 3 + 5];
        assert!(is_zero_page(&big[1..4097]));
        assert!(is_zero_page(&big[3..]));
        let mut odd = vec![0u8; 1000];
        odd[999] = 1;
        assert!(!is_zero_page(&odd));
    }
}
