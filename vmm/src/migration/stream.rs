//! The migration stream: one format for a file and for a socket.
//!
//! ```text
//! stream header  "BLIMPMIG" | version u32 | flags u32 | region count u32
//!                | (gpa u64, size u64) per RAM region | crc32c u32
//! records        36-byte record header + payload, numbered from 0:
//!                tag u32 | seq u32 | round u32 | pages u32 | gpa u64
//!                | payload length u32 | payload crc32c u32
//!                | header crc32c u32 (over the 32 bytes before it)
//!   ZERO         pages [gpa, gpa + pages * 4 KiB) are all zero; no payload
//!   DATA         payload = the pages' bytes (at most 1 MiB a record)
//!   STAT         payload = the serialized VM state (exactly one, after the pages)
//!   TEND         trailer, payload = records before it u64 | page data bytes u64
//!                | zero pages u64
//! ```
//!
//! All integers are little-endian. A page may appear in several rounds
//! (rounds never go backwards); the last record for a page wins, and a ZERO
//! record really zeroes pages that an earlier round filled. Every record
//! header and payload is checksummed, records are numbered, and the trailer
//! counts what came before it, so a corrupted, truncated or spliced stream
//! is refused with the byte offset and record number where it went wrong,
//! and the reader hands out the state only when everything verified.

use std::io::{self, BufReader, BufWriter, Read, Write};

use arch::MemoryLayout;
use devices::{GuestMemory, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::dirty::{AtomicPageBitmap, GpaRun};
use super::limits::max_state_bytes;
use super::zero::is_zero_page;
use crate::memory::GuestRam;

pub const MAGIC: [u8; 8] = *b"BLIMPMIG";
/// The format version this build writes. Version 2 has the records of
/// version 1; over a socket it is followed by the switchover handshake
/// ([`super::handshake`]), which version 1 sources do not do.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build reads (files of version 1 restore as before).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The first version whose live streams end with the switchover handshake.
pub const HANDSHAKE_VERSION: u32 = 2;
/// Header flag: the stream comes from a live migration (as opposed to a
/// migrate-to-file). Informational.
pub const FLAG_LIVE: u32 = 1 << 0;
const KNOWN_FLAGS: u32 = FLAG_LIVE;
/// Largest DATA record payload: contiguous runs are batched up to this.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
const MAX_RECORD_PAGES: u64 = MAX_RECORD_BYTES as u64 / PAGE_SIZE;
pub use super::limits::{MAX_REGIONS, MAX_STATE_BYTES};

const RECORD_HEADER_LEN: usize = 36;
const TRAILER_LEN: u32 = 24;
const IO_BUFFER: usize = 1 << 20;

const TAG_ZERO: u32 = u32::from_le_bytes(*b"ZERO");
const TAG_DATA: u32 = u32::from_le_bytes(*b"DATA");
const TAG_STATE: u32 = u32::from_le_bytes(*b"STAT");
const TAG_TRAILER: u32 = u32::from_le_bytes(*b"TEND");

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Guest RAM as [`StreamWriter`] reads it: its memory, and where it may
/// hold data (what lies elsewhere reads as zero and is recorded as zero
/// pages without being read, see [`crate::memory::GuestRam::data_parts`]).
pub trait RamPages {
    fn memory(&self) -> &GuestMemory;
    /// Calls `part(gpa, len)` for each piece of `[gpa, gpa + len)` that may
    /// hold data, in order.
    fn data_parts(&self, gpa: u64, len: u64, part: &mut dyn FnMut(u64, u64));
}

/// Plain guest memory: all of it may hold data.
impl RamPages for GuestMemory {
    fn memory(&self) -> &GuestMemory {
        self
    }
    fn data_parts(&self, gpa: u64, len: u64, part: &mut dyn FnMut(u64, u64)) {
        part(gpa, len);
    }
}

impl RamPages for GuestRam {
    fn memory(&self) -> &GuestMemory {
        GuestRam::memory(self)
    }
    fn data_parts(&self, gpa: u64, len: u64, part: &mut dyn FnMut(u64, u64)) {
        GuestRam::data_parts(self, gpa, len, part);
    }
}

/// One RAM region of a guest memory layout, as the stream and the VM state
/// record it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
}

impl std::fmt::Display for RamRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, +{} MiB)", self.gpa, self.size >> 20)
    }
}

/// The regions of `layout`, in address order.
pub fn layout_ranges(layout: &MemoryLayout) -> Vec<RamRange> {
    layout
        .regions()
        .iter()
        .map(|r| RamRange {
            gpa: r.start,
            size: r.size,
        })
        .collect()
}

/// "[0x0, +512 MiB) [0x100000000, +1024 MiB)", for error messages.
pub fn describe_layout(ranges: &[RamRange]) -> String {
    let parts: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    if parts.is_empty() {
        "no RAM".to_string()
    } else {
        parts.join(" ")
    }
}

/// Is `[gpa, gpa + pages * 4 KiB)` page-aligned and inside one region?
fn range_in(layout: &[RamRange], gpa: u64, pages: u64) -> bool {
    let Some(end) = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| gpa.checked_add(len))
    else {
        return false;
    };
    gpa.is_multiple_of(PAGE_SIZE)
        && pages > 0
        && layout
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.gpa.saturating_add(r.size))
}

/// A record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecordHeader {
    tag: u32,
    seq: u32,
    round: u32,
    pages: u32,
    gpa: u64,
    payload_len: u32,
    payload_crc: u32,
}

impl RecordHeader {
    fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&self.tag.to_le_bytes());
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.round.to_le_bytes());
        b[12..16].copy_from_slice(&self.pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.gpa.to_le_bytes());
        b[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<Self, StreamErrorKind> {
        let stored = le32(&b[32..36]);
        let computed = crc32c::crc32c(&b[..32]);
        if stored != computed {
            return Err(StreamErrorKind::RecordHeaderChecksum { stored, computed });
        }
        Ok(Self {
            tag: le32(&b[0..4]),
            seq: le32(&b[4..8]),
            round: le32(&b[8..12]),
            pages: le32(&b[12..16]),
            gpa: le64(&b[16..24]),
            payload_len: le32(&b[24..28]),
            payload_crc: le32(&b[28..32]),
        })
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn tag_name(tag: u32) -> String {
    let b = tag.to_le_bytes();
    if b.iter().all(|c| c.is_ascii_alphanumeric()) {
        String::from_utf8_lossy(&b).into_owned()
    } else {
        format!("{tag:#010x}")
    }
}

/// Counts kept by the writer and checked against the trailer by the reader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Records before the trailer (pages and state).
    pub records: u64,
    /// Pages sent with their bytes.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes of page data (DATA payloads).
    pub page_bytes: u64,
    /// Bytes of the state section.
    pub state_bytes: u64,
    /// Bytes of the whole stream so far, headers included.
    pub stream_bytes: u64,
}

// ---------------------------------------------------------------------------
// Writer

/// Errors writing a stream.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing the migration stream at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("migration stream: {what} called {when}")]
    Order {
        what: &'static str,
        when: &'static str,
    },
    #[error(
        "pages at {gpa:#x} (+{pages} pages) are not page-aligned or not inside one RAM region of {layout}"
    )]
    OutsideLayout {
        gpa: u64,
        pages: u64,
        layout: String,
    },
    #[error("page data of {len} bytes at {gpa:#x} is not a whole number of 4 KiB pages")]
    PartialPage { gpa: u64, len: usize },
    #[error("round {round} comes after round {last}: rounds never go backwards")]
    RoundBackwards { round: u32, last: u32 },
    #[error("state section of {len} bytes exceeds the {max} byte limit")]
    StateTooLarge { len: usize, max: u32 },
    #[error("{count} RAM regions exceed the stream's limit of {max}")]
    TooManyRegions { count: usize, max: u32 },
    #[error("reading guest memory at {gpa:#x} (+{len} bytes): {reason}")]
    GuestRead {
        gpa: u64,
        len: usize,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    New,
    Pages,
    StateWritten,
}

/// Writes a migration stream to `W` (a file, a socket, `/dev/null`) through
/// a large buffer.
pub struct StreamWriter<W: Write> {
    out: BufWriter<W>,
    phase: Phase,
    layout: Vec<RamRange>,
    seq: u32,
    last_round: u32,
    /// A ZERO record not written yet, grown while contiguous zero runs follow.
    pending_zero: Option<(u32, u64, u64)>,
    stats: StreamStats,
    scratch: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: BufWriter::with_capacity(256 << 10, out),
            phase: Phase::New,
            layout: Vec::new(),
            seq: 0,
            last_round: 0,
            pending_zero: None,
            stats: StreamStats::default(),
            scratch: Vec::new(),
        }
    }

    /// Counts so far (`page_bytes` is the page data written).
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.out.write_all(bytes).map_err(|source| WriteError::Io {
            offset: self.stats.stream_bytes,
            source,
        })?;
        self.stats.stream_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Write the stream header for a guest with RAM `layout`.
    pub fn header(&mut self, layout: &[RamRange], flags: u32) -> Result<(), WriteError> {
        if self.phase != Phase::New {
            return Err(WriteError::Order {
                what: "header",
                when: "twice",
            });
        }
        let count = u32::try_from(layout.len())
            .ok()
            .filter(|c| *c <= MAX_REGIONS)
            .ok_or(WriteError::TooManyRegions {
                count: layout.len(),
                max: MAX_REGIONS,
            })?;
        let mut h = Vec::with_capacity(24 + layout.len() * 16);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        for r in layout {
            h.extend_from_slice(&r.gpa.to_le_bytes());
            h.extend_from_slice(&r.size.to_le_bytes());
        }
        h.extend_from_slice(&crc32c::crc32c(&h).to_le_bytes());
        self.put(&h)?;
        self.layout = layout.to_vec();
        self.phase = Phase::Pages;
        Ok(())
    }

    fn check_pages(
        &mut self,
        what: &'static str,
        round: u32,
        gpa: u64,
        pages: u64,
    ) -> Result<(), WriteError> {
        match self.phase {
            Phase::New => {
                return Err(WriteError::Order {
                    what,
                    when: "before the header",
                });
            }
            Phase::StateWritten => {
                return Err(WriteError::Order {
                    what,
                    when: "after the state",
                });
            }
            Phase::Pages => {}
        }
        if round < self.last_round {
            return Err(WriteError::RoundBackwards {
                round,
                last: self.last_round,
            });
        }
        if !range_in(&self.layout, gpa, pages) {
            return Err(WriteError::OutsideLayout {
                gpa,
                pages,
                layout: describe_layout(&self.layout),
            });
        }
        self.last_round = round;
        Ok(())
    }

    fn record(&mut self, mut h: RecordHeader, payload: &[u8]) -> Result<(), WriteError> {
        h.seq = self.seq;
        h.payload_len = payload.len() as u32;
        h.payload_crc = crc32c::crc32c(payload);
        self.put(&h.encode())?;
        self.put(payload)?;
        self.seq += 1;
        self.stats.records += 1;
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), WriteError> {
        let Some((round, gpa, pages)) = self.pending_zero.take() else {
            return Ok(());
        };
        self.record(
            RecordHeader {
                tag: TAG_ZERO,
                seq: 0,
                round,
                pages: pages as u32,
                gpa,
                payload_len: 0,
                payload_crc: 0,
            },
            &[],
        )
    }

    /// Record that `count` pages from `gpa` are all zero in `round`.
    /// Contiguous zero runs of one round are merged into one record.
    pub fn zero_pages(&mut self, round: u32, gpa: u64, count: u64) -> Result<(), WriteError> {
        if count == 0 && self.phase == Phase::Pages {
            return Ok(());
        }
        self.check_pages("zero_pages", round, gpa, count)?;
        if let Some((r, g, n)) = self.pending_zero {
            let merged = n + count;
            if r == round
                && g + n * PAGE_SIZE == gpa
                && merged <= u64::from(u32::MAX)
                && range_in(&self.layout, g, merged)
            {
                self.pending_zero = Some((r, g, merged));
                self.stats.zero_pages += count;
                return Ok(());
            }
        }
        self.flush_zero()?;
        let mut left = count;
        let mut at = gpa;
        // A record holds at most u32::MAX pages (16 TiB); keep the last part pending.
        while left > u64::from(u32::MAX) {
            self.pending_zero = Some((round, at, u64::from(u32::MAX)));
            self.flush_zero()?;
            left -= u64::from(u32::MAX);
            at += u64::from(u32::MAX) * PAGE_SIZE;
        }
        self.pending_zero = Some((round, at, left));
        self.stats.zero_pages += count;
        Ok(())
    }

    /// Record the bytes of the pages starting at `gpa` in `round` (`data`
    /// is a whole number of pages; it is cut into records of at most 1 MiB).
    pub fn data_pages(&mut self, round: u32, gpa: u64, data: &[u8]) -> Result<(), WriteError> {
        if data.is_empty() && self.phase == Phase::Pages {
            return Ok(());
        }
        if !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
            return Err(WriteError::PartialPage {
                gpa,
                len: data.len(),
            });
        }
        self.check_pages("data_pages", round, gpa, data.len() as u64 / PAGE_SIZE)?;
        self.flush_zero()?;
        for (i, chunk) in data.chunks(MAX_RECORD_BYTES).enumerate() {
            let pages = chunk.len() as u64 / PAGE_SIZE;
            self.record(
                RecordHeader {
                    tag: TAG_DATA,
                    seq: 0,
                    round,
                    pages: pages as u32,
                    gpa: gpa + (i * MAX_RECORD_BYTES) as u64,
                    payload_len: 0,
                    payload_crc: 0,
                },
                chunk,
            )?;
            self.stats.data_pages += pages;
            self.stats.page_bytes += chunk.len() as u64;
        }
        Ok(())
    }

    /// Read `run` from guest memory and record it in `round`: zero pages as
    /// markers, the others with their bytes, contiguous pages batched.
    pub fn send_ram(
        &mut self,
        ram: &impl RamPages,
        round: u32,
        run: GpaRun,
    ) -> Result<(), WriteError> {
        if run.pages == 0 && self.phase == Phase::Pages {
            return Ok(());
        }
        self.check_pages("send_ram", round, run.gpa, run.pages)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        if scratch.len() < MAX_RECORD_BYTES {
            scratch = vec![0; MAX_RECORD_BYTES];
        }
        let result = self.send_chunks(ram, round, run, &mut scratch);
        self.scratch = scratch;
        result
    }

    fn send_chunks(
        &mut self,
        ram: &impl RamPages,
        round: u32,
        run: GpaRun,
        buf: &mut [u8],
    ) -> Result<(), WriteError> {
        let mut parts = Vec::new();
        let mut done = 0;
        while done < run.pages {
            let n = (run.pages - done).min(MAX_RECORD_PAGES);
            let gpa = run.gpa + done * PAGE_SIZE;
            let end = gpa + n * PAGE_SIZE;
            // What the backing holds is read; its holes are zero pages,
            // recorded without a read (which would allocate them).
            parts.clear();
            ram.data_parts(gpa, n * PAGE_SIZE, &mut |at, len| parts.push((at, len)));
            let mut at = gpa;
            for &(start, len) in &parts {
                let stop = start
                    .saturating_add(len)
                    .next_multiple_of(PAGE_SIZE)
                    .min(end);
                let start = (start & !(PAGE_SIZE - 1)).clamp(at, end);
                if start > at {
                    self.zero_pages(round, at, (start - at) / PAGE_SIZE)?;
                }
                if stop > start {
                    self.send_read(ram.memory(), round, start, (stop - start) / PAGE_SIZE, buf)?;
                    at = stop;
                }
            }
            if end > at {
                self.zero_pages(round, at, (end - at) / PAGE_SIZE)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Read `n` pages (at most a record's) at `gpa` and record them: runs
    /// of zero pages as markers, the others with their bytes.
    fn send_read(
        &mut self,
        mem: &GuestMemory,
        round: u32,
        gpa: u64,
        n: u64,
        buf: &mut [u8],
    ) -> Result<(), WriteError> {
        let len = (n * PAGE_SIZE) as usize;
        mem.read_slice(&mut buf[..len], GuestAddress(gpa))
            .map_err(|e| WriteError::GuestRead {
                gpa,
                len,
                reason: e.to_string(),
            })?;
        let mut start = 0usize;
        while start < n as usize {
            let page = |i: usize| &buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
            let zero = is_zero_page(page(start));
            let mut end = start + 1;
            while end < n as usize && is_zero_page(page(end)) == zero {
                end += 1;
            }
            let at = gpa + start as u64 * PAGE_SIZE;
            if zero {
                self.zero_pages(round, at, (end - start) as u64)?;
            } else {
                let bytes = &buf[start * PAGE_SIZE as usize..end * PAGE_SIZE as usize];
                self.data_pages(round, at, bytes)?;
            }
            start = end;
        }
        Ok(())
    }

    /// Send every page set in `pages` (claiming them: the bitmap is empty
    /// afterwards, except for pages set again meanwhile) in `round`; hints
    /// may clear pages in it concurrently. Returns the number of pages sent.
    pub fn send_bitmap(
        &mut self,
        ram: &impl RamPages,
        round: u32,
        pages: &AtomicPageBitmap,
    ) -> Result<u64, WriteError> {
        let mut sent = 0;
        for run in pages.take_runs(MAX_RECORD_PAGES) {
            self.send_ram(ram, round, run)?;
            sent += run.pages;
        }
        Ok(sent)
    }

    /// Push out everything written so far (end of a live round, so the
    /// destination is not left waiting on a buffer).
    pub fn flush(&mut self) -> Result<(), WriteError> {
        self.flush_zero()?;
        self.out.flush().map_err(|source| WriteError::Io {
            offset: self.stats.stream_bytes,
            source,
        })
    }

    /// Write the state section (once, after all pages).
    pub fn state(&mut self, blob: &[u8]) -> Result<(), WriteError> {
        match self.phase {
            Phase::New => {
                return Err(WriteError::Order {
                    what: "state",
                    when: "before the header",
                });
            }
            Phase::StateWritten => {
                return Err(WriteError::Order {
                    what: "state",
                    when: "twice",
                });
            }
            Phase::Pages => {}
        }
        if blob.len() > MAX_STATE_BYTES as usize {
            return Err(WriteError::StateTooLarge {
                len: blob.len(),
                max: MAX_STATE_BYTES,
            });
        }
        self.flush_zero()?;
        self.blob_record(TAG_STATE, blob)?;
        self.stats.state_bytes = blob.len() as u64;
        self.phase = Phase::StateWritten;
        Ok(())
    }

    /// A record of the last round that carries `blob` instead of pages
    /// (the state, the trailer).
    fn blob_record(&mut self, tag: u32, blob: &[u8]) -> Result<(), WriteError> {
        self.record(
            RecordHeader {
                tag,
                seq: 0,
                round: self.last_round,
                pages: 0,
                gpa: 0,
                payload_len: 0,
                payload_crc: 0,
            },
            blob,
        )
    }

    /// Write the trailer and flush; returns the output and the counts.
    pub fn finish(mut self) -> Result<(W, StreamStats), WriteError> {
        if self.phase != Phase::StateWritten {
            return Err(WriteError::Order {
                what: "finish",
                when: "before the state",
            });
        }
        let mut t = Vec::with_capacity(TRAILER_LEN as usize);
        t.extend_from_slice(&self.stats.records.to_le_bytes());
        t.extend_from_slice(&self.stats.page_bytes.to_le_bytes());
        t.extend_from_slice(&self.stats.zero_pages.to_le_bytes());
        let records = self.stats.records;
        self.blob_record(TAG_TRAILER, &t)?;
        self.stats.records = records;
        let offset = self.stats.stream_bytes;
        let out = self.out.into_inner().map_err(|e| WriteError::Io {
            offset,
            source: e.into_error(),
        })?;
        Ok((out, self.stats))
    }
}

// ---------------------------------------------------------------------------
// Reader

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamErrorKind {
    #[error("bad magic {found:02x?}: this is not a Blimp migration stream")]
    BadMagic { found: [u8; 8] },
    #[error(
        "unsupported stream format version {found} (this Blimp reads versions {OLDEST_FORMAT_VERSION} to {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("unknown header flags {flags:#x}")]
    UnknownFlags { flags: u32 },
    #[error("header lists {count} RAM regions, at most {max} are allowed")]
    TooManyRegions { count: u32, max: u32 },
    #[error("stream header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error(
        "memory layout mismatch: the stream's guest has {stream}, the destination has {destination}"
    )]
    LayoutMismatch { stream: String, destination: String },
    #[error("unexpected end of stream in the {what}: got {got} of {wanted} bytes")]
    UnexpectedEof {
        what: &'static str,
        got: usize,
        wanted: usize,
    },
    #[error("reading the {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("record header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    RecordHeaderChecksum { stored: u32, computed: u32 },
    #[error(
        "{tag} record payload checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    PayloadChecksum {
        tag: String,
        stored: u32,
        computed: u32,
    },
    #[error("unknown record tag {tag}")]
    UnknownRecord { tag: String },
    #[error(
        "record number {found} found where record {expected} was due (records lost, repeated or reordered)"
    )]
    OutOfSequence { expected: u64, found: u32 },
    #[error("{tag} record of {pages} pages has a {len}-byte payload, {expected} expected")]
    BadPayloadLength {
        tag: String,
        pages: u32,
        len: u32,
        expected: u64,
    },
    #[error("DATA record of {pages} pages exceeds the {max}-page limit")]
    RecordTooLarge { pages: u32, max: u64 },
    #[error(
        "pages at {gpa:#x} (+{pages} pages) are not page-aligned or not inside the destination's RAM {layout}"
    )]
    RangeOutsideRam {
        gpa: u64,
        pages: u32,
        layout: String,
    },
    #[error("record of round {round} follows round {previous}: rounds never go backwards")]
    RoundBackwards { round: u32, previous: u32 },
    #[error("{tag} record after the state section")]
    AfterState { tag: String },
    #[error("trailer without a state section")]
    MissingState,
    #[error(
        "state section of {len} bytes exceeds the {max}-byte limit for a guest of {memory_mib} MiB (fixed part + 254 vCPUs + one balloon run per page)"
    )]
    StateTooLarge { len: u32, max: u32, memory_mib: u64 },
    #[error("header's memory layout {layout}: {reason}")]
    BadLayout { layout: String, reason: String },
    #[error("header's guest has {memory_mib} MiB of RAM, more than this host's {host_mib} MiB")]
    LargerThanHost { memory_mib: u64, host_mib: u64 },
    #[error("data follows the trailer: the stream must end there")]
    TrailingBytes,
    #[error("trailer {what} mismatch: the trailer says {stored}, the stream held {counted}")]
    TrailerMismatch {
        what: &'static str,
        stored: u64,
        counted: u64,
    },
    #[error("writing guest memory at {gpa:#x} (+{len} bytes): {reason}")]
    GuestWrite {
        gpa: u64,
        len: usize,
        reason: String,
    },
}

/// A refused stream: where (byte offset of the header or record at fault,
/// or of the end of the stream; the record number) and why.
#[derive(Debug)]
pub struct StreamError {
    pub offset: u64,
    /// Number of the record at fault (`None`: the stream header).
    pub record: Option<u64>,
    pub kind: StreamErrorKind,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "migration stream refused at byte {}", self.offset)?;
        match self.record {
            Some(n) => write!(f, " (record {n})")?,
            None => write!(f, " (stream header)")?,
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// The stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub version: u32,
    pub flags: u32,
    pub layout: Vec<RamRange>,
}

impl StreamHeader {
    /// The memory layout the header describes, if this host could build
    /// it: the regions are exactly [`MemoryLayout::new`]'s for their total
    /// size, and the total is at most `host_ram` bytes (when known). Check
    /// this before allocating anything for the guest.
    pub fn memory_layout(&self, host_ram: Option<u64>) -> Result<MemoryLayout, StreamError> {
        let bad = |reason: String| StreamError {
            offset: 20,
            record: None,
            kind: StreamErrorKind::BadLayout {
                layout: describe_layout(&self.layout),
                reason,
            },
        };
        let size = self
            .layout
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .ok_or_else(|| bad("the sizes overflow".into()))?;
        let layout = MemoryLayout::new(size).map_err(|e| bad(e.to_string()))?;
        if layout_ranges(&layout) != self.layout {
            return Err(bad(format!(
                "a {} MiB guest is laid out as {}",
                size >> 20,
                describe_layout(&layout_ranges(&layout))
            )));
        }
        if let Some(host) = host_ram
            && size > host
        {
            return Err(StreamError {
                offset: 20,
                record: None,
                kind: StreamErrorKind::LargerThanHost {
                    memory_mib: size >> 20,
                    host_mib: host >> 20,
                },
            });
        }
        Ok(layout)
    }
}

/// What the destination's RAM holds before the restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Freshly mapped, all zero: a ZERO record only needs to clear pages
    /// that an earlier DATA record of this stream filled.
    Fresh,
    /// Anything: a ZERO record checks every page and clears the non-zero ones.
    Unknown,
}

/// A verified stream: its header, counts, and the state blob.
#[derive(Debug)]
pub struct Restored {
    pub header: StreamHeader,
    pub stats: StreamStats,
    /// Highest round number seen.
    pub last_round: u32,
    pub state: Vec<u8>,
}

/// Reads and verifies a migration stream and applies its pages.
pub struct StreamReader<R: Read> {
    input: BufReader<R>,
    offset: u64,
    header: Option<StreamHeader>,
    buf: Vec<u8>,
    /// Records read, the trailer included, once it verified.
    records: u64,
    /// Called with (guest address, length) before a page record is written
    /// (see [`StreamReader::reserve_with`]).
    reserve: Option<Reserve>,
}

/// See [`StreamReader::reserve_with`].
pub type Reserve = Box<dyn Fn(u64, u64) -> std::io::Result<()> + Send>;

impl<R: Read> StreamReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input: BufReader::with_capacity(IO_BUFFER, input),
            offset: 0,
            header: None,
            buf: Vec::new(),
            records: 0,
            reserve: None,
        }
    }

    /// Have `reserve(gpa, len)` make room for each page record before it is
    /// written to guest memory: a file-backed RAM on a full filesystem
    /// answers ENOSPC there, where a write through the mapping would be a
    /// SIGBUS. Its error refuses the stream at that record.
    pub fn reserve_with(&mut self, reserve: Reserve) {
        self.reserve = Some(reserve);
    }

    /// After [`StreamReader::restore`]: refuse anything after the trailer
    /// (a file must end there). Not for a connection that carries more
    /// after the stream; use [`StreamReader::into_inner`] there.
    pub fn expect_end(&mut self) -> Result<(), StreamError> {
        let mut byte = [0u8; 1];
        loop {
            let kind = match self.input.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) => StreamErrorKind::TrailingBytes,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => StreamErrorKind::Io {
                    what: "end of the stream",
                    source,
                },
            };
            return Err(StreamError {
                offset: self.offset,
                record: Some(self.records),
                kind,
            });
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The input back, with the bytes read ahead past the stream's end
    /// (a socket may carry more after the trailer).
    pub fn into_inner(self) -> (R, Vec<u8>) {
        let rest = self.input.buffer().to_vec();
        (self.input.into_inner(), rest)
    }

    /// Fill `buf` completely; on a short stream, say how much came.
    fn read_full(
        input: &mut BufReader<R>,
        offset: &mut u64,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), StreamErrorKind> {
        let mut got = 0;
        while got < buf.len() {
            match input.read(&mut buf[got..]) {
                Ok(0) => {
                    *offset += got as u64;
                    return Err(StreamErrorKind::UnexpectedEof {
                        what,
                        got,
                        wanted: buf.len(),
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    *offset += got as u64;
                    return Err(StreamErrorKind::Io { what, source });
                }
            }
        }
        *offset += got as u64;
        Ok(())
    }

    /// Read and check the stream header (magic, version, flags, checksum).
    pub fn read_header(&mut self) -> Result<StreamHeader, StreamError> {
        if let Some(h) = &self.header {
            return Ok(h.clone());
        }
        let at = |offset, kind| StreamError {
            offset,
            record: None,
            kind,
        };
        let mut fixed = [0u8; 20];
        Self::read_full(
            &mut self.input,
            &mut self.offset,
            &mut fixed,
            "stream header",
        )
        .map_err(|k| at(self.offset, k))?;
        let mut found = [0u8; 8];
        found.copy_from_slice(&fixed[..8]);
        if found != MAGIC {
            return Err(at(0, StreamErrorKind::BadMagic { found }));
        }
        let version = le32(&fixed[8..12]);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(at(
                8,
                StreamErrorKind::UnsupportedVersion {
                    found: version,
                    supported: FORMAT_VERSION,
                },
            ));
        }
        let count = le32(&fixed[16..20]);
        if count > MAX_REGIONS {
            return Err(at(
                16,
                StreamErrorKind::TooManyRegions {
                    count,
                    max: MAX_REGIONS,
                },
            ));
        }
        let mut rest = vec![0u8; count as usize * 16 + 4];
        Self::read_full(
            &mut self.input,
            &mut self.offset,
            &mut rest,
            "stream header",
        )
        .map_err(|k| at(self.offset, k))?;
        let body = rest.len() - 4;
        let stored = le32(&rest[body..]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&fixed), &rest[..body]);
        if stored != computed {
            return Err(at(0, StreamErrorKind::HeaderChecksum { stored, computed }));
        }
        let flags = le32(&fixed[12..16]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(at(12, StreamErrorKind::UnknownFlags { flags }));
        }
        let layout = rest[..body]
            .chunks_exact(16)
            .map(|c| RamRange {
                gpa: le64(&c[..8]),
                size: le64(&c[8..]),
            })
            .collect();
        let h = StreamHeader {
            version,
            flags,
            layout,
        };
        self.header = Some(h.clone());
        Ok(h)
    }

    /// Verify the whole stream and apply its pages to `mem`, whose RAM
    /// layout is `layout` (it must equal the stream's). Returns the state
    /// blob only once the trailer verified. On error the destination memory
    /// may hold part of the stream and must not be run.
    pub fn restore(
        &mut self,
        mem: &GuestMemory,
        layout: &MemoryLayout,
        dest: Destination,
    ) -> Result<Restored, StreamError> {
        let header = self.read_header()?;
        let ours = layout_ranges(layout);
        if header.layout != ours {
            return Err(StreamError {
                offset: 20,
                record: None,
                kind: StreamErrorKind::LayoutMismatch {
                    stream: describe_layout(&header.layout),
                    destination: describe_layout(&ours),
                },
            });
        }
        let mut walk = RecordWalk {
            max_state: max_state_bytes(layout),
            memory_mib: layout.size() >> 20,
            ours,
            written: (dest == Destination::Fresh).then(|| AtomicPageBitmap::new(layout)),
            dest,
            stats: StreamStats::default(),
            last_round: 0,
            state: None,
        };
        loop {
            let start = self.offset;
            let seq = walk.stats.records;
            let fail = |kind| StreamError {
                offset: start,
                record: Some(seq),
                kind,
            };
            // Each record is checked whole (header, then payload and its
            // checksum) before it is applied.
            let h = self.next_record_header(seq, walk.state.is_some())?;
            walk.check(&h, seq).map_err(fail)?;
            let state_buf = self.read_payload(&h, seq)?;
            if h.tag == TAG_TRAILER {
                let payload = &self.buf[..TRAILER_LEN as usize];
                let blob = walk.check_trailer(payload).map_err(fail)?;
                walk.stats.stream_bytes = self.offset;
                self.records = walk.stats.records + 1;
                return Ok(Restored {
                    header,
                    stats: walk.stats,
                    last_round: walk.last_round,
                    state: blob,
                });
            }
            walk.apply(mem, &h, state_buf, &mut self.buf, self.reserve.as_ref())
                .map_err(fail)?;
            walk.stats.records += 1;
        }
    }

    /// Read and decode the next record header (`seq`; after the state
    /// section only the trailer may come).
    fn next_record_header(
        &mut self,
        seq: u64,
        after_state: bool,
    ) -> Result<RecordHeader, StreamError> {
        let start = self.offset;
        let mut hb = [0u8; RECORD_HEADER_LEN];
        let what = if after_state {
            "trailer header"
        } else {
            "record header"
        };
        if let Err(kind) = Self::read_full(&mut self.input, &mut self.offset, &mut hb, what) {
            return Err(StreamError {
                offset: self.offset,
                record: Some(seq),
                kind,
            });
        }
        RecordHeader::decode(&hb).map_err(|kind| StreamError {
            offset: start,
            record: Some(seq),
            kind,
        })
    }

    /// Read record `h`'s payload and verify its checksum: a state section
    /// into a buffer of its own (returned), anything else into `self.buf`.
    fn read_payload(&mut self, h: &RecordHeader, seq: u64) -> Result<Option<Vec<u8>>, StreamError> {
        let start = self.offset - RECORD_HEADER_LEN as u64;
        let len = h.payload_len as usize;
        let mut state_buf = Vec::new();
        let payload: &mut [u8] = if h.tag == TAG_STATE {
            state_buf = vec![0; len];
            &mut state_buf
        } else {
            if self.buf.len() < len {
                self.buf = vec![0; MAX_RECORD_BYTES];
            }
            &mut self.buf[..len]
        };
        let what = match h.tag {
            TAG_DATA => "page data",
            TAG_STATE => "state section",
            _ => "trailer",
        };
        if let Err(kind) = Self::read_full(&mut self.input, &mut self.offset, payload, what) {
            return Err(StreamError {
                offset: self.offset,
                record: Some(seq),
                kind,
            });
        }
        let computed = crc32c::crc32c(payload);
        if computed != h.payload_crc {
            return Err(StreamError {
                offset: start,
                record: Some(seq),
                kind: StreamErrorKind::PayloadChecksum {
                    tag: tag_name(h.tag),
                    stored: h.payload_crc,
                    computed,
                },
            });
        }
        Ok((h.tag == TAG_STATE).then_some(state_buf))
    }
}

/// What [`StreamReader::restore`] knows between records.
struct RecordWalk {
    /// The destination's RAM, as the stream must have it.
    ours: Vec<RamRange>,
    max_state: u32,
    memory_mib: u64,
    dest: Destination,
    /// Pages written so far (a fresh destination only).
    written: Option<AtomicPageBitmap>,
    stats: StreamStats,
    last_round: u32,
    /// The state section, once read.
    state: Option<Vec<u8>>,
}

impl RecordWalk {
    /// Everything about record header `h` that can be checked before its
    /// payload is read.
    fn check(&mut self, h: &RecordHeader, seq: u64) -> Result<(), StreamErrorKind> {
        if u64::from(h.seq) != seq {
            return Err(StreamErrorKind::OutOfSequence {
                expected: seq,
                found: h.seq,
            });
        }
        let tag = tag_name(h.tag);
        if self.state.is_some() && h.tag != TAG_TRAILER {
            return Err(StreamErrorKind::AfterState { tag });
        }
        let expected_len = match h.tag {
            TAG_ZERO => 0,
            TAG_DATA => u64::from(h.pages) * PAGE_SIZE,
            TAG_TRAILER => u64::from(TRAILER_LEN),
            TAG_STATE => u64::from(h.payload_len),
            _ => return Err(StreamErrorKind::UnknownRecord { tag }),
        };
        if h.tag == TAG_DATA && u64::from(h.pages) > MAX_RECORD_PAGES {
            return Err(StreamErrorKind::RecordTooLarge {
                pages: h.pages,
                max: MAX_RECORD_PAGES,
            });
        }
        if u64::from(h.payload_len) != expected_len {
            return Err(StreamErrorKind::BadPayloadLength {
                tag,
                pages: h.pages,
                len: h.payload_len,
                expected: expected_len,
            });
        }
        if h.tag == TAG_STATE && h.payload_len > self.max_state {
            return Err(StreamErrorKind::StateTooLarge {
                len: h.payload_len,
                max: self.max_state,
                memory_mib: self.memory_mib,
            });
        }
        self.check_pages(h)
    }

    /// A page record's range lies in RAM and its round does not go back.
    fn check_pages(&mut self, h: &RecordHeader) -> Result<(), StreamErrorKind> {
        if h.tag != TAG_ZERO && h.tag != TAG_DATA {
            return Ok(());
        }
        if !range_in(&self.ours, h.gpa, u64::from(h.pages)) {
            return Err(StreamErrorKind::RangeOutsideRam {
                gpa: h.gpa,
                pages: h.pages,
                layout: describe_layout(&self.ours),
            });
        }
        if h.round < self.last_round {
            return Err(StreamErrorKind::RoundBackwards {
                round: h.round,
                previous: self.last_round,
            });
        }
        self.last_round = h.round;
        Ok(())
    }

    /// Apply a checked DATA, ZERO or STATE record (`buf` holds a DATA
    /// payload; ZERO uses it as scratch).
    fn apply(
        &mut self,
        mem: &GuestMemory,
        h: &RecordHeader,
        state_buf: Option<Vec<u8>>,
        buf: &mut Vec<u8>,
        reserve: Option<&Reserve>,
    ) -> Result<(), StreamErrorKind> {
        let len = h.payload_len as usize;
        match h.tag {
            TAG_DATA => {
                if let Some(reserve) = reserve {
                    reserve(h.gpa, len as u64).map_err(|e| StreamErrorKind::GuestWrite {
                        gpa: h.gpa,
                        len,
                        reason: format!("no room in guest RAM's backing file: {e}"),
                    })?;
                }
                mem.write_slice(&buf[..len], GuestAddress(h.gpa))
                    .map_err(|e| StreamErrorKind::GuestWrite {
                        gpa: h.gpa,
                        len,
                        reason: e.to_string(),
                    })?;
                if let Some(w) = &self.written {
                    w.set_range(devices::GpaRange::new(h.gpa, len as u64));
                }
                self.stats.data_pages += u64::from(h.pages);
                self.stats.page_bytes += len as u64;
            }
            TAG_ZERO => {
                if self.dest == Destination::Unknown && buf.len() < MAX_RECORD_BYTES {
                    *buf = vec![0; MAX_RECORD_BYTES];
                }
                zero_fill(mem, h.gpa, u64::from(h.pages), self.written.as_ref(), buf)?;
                self.stats.zero_pages += u64::from(h.pages);
            }
            _ => {
                self.stats.state_bytes = len as u64;
                self.state = state_buf;
            }
        }
        Ok(())
    }

    /// The trailer's counts against what was read; returns the state blob.
    fn check_trailer(&mut self, payload: &[u8]) -> Result<Vec<u8>, StreamErrorKind> {
        let Some(blob) = self.state.take() else {
            return Err(StreamErrorKind::MissingState);
        };
        let checks = [
            ("record count", le64(&payload[0..8]), self.stats.records),
            (
                "page byte count",
                le64(&payload[8..16]),
                self.stats.page_bytes,
            ),
            (
                "zero page count",
                le64(&payload[16..24]),
                self.stats.zero_pages,
            ),
        ];
        for (what, stored, counted) in checks {
            if stored != counted {
                return Err(StreamErrorKind::TrailerMismatch {
                    what,
                    stored,
                    counted,
                });
            }
        }
        Ok(blob)
    }
}

/// Make `pages` pages from `gpa` zero. With `written` (a fresh destination),
/// only pages this stream filled can be non-zero; otherwise every page is
/// read and the non-zero ones are cleared (reading first keeps untouched
/// memory unallocated).
fn zero_fill(
    mem: &GuestMemory,
    gpa: u64,
    pages: u64,
    written: Option<&AtomicPageBitmap>,
    buf: &mut [u8],
) -> Result<(), StreamErrorKind> {
    let clear = |at: u64| {
        mem.write_slice(&ZERO_PAGE, GuestAddress(at))
            .map_err(|e| StreamErrorKind::GuestWrite {
                gpa: at,
                len: PAGE_SIZE as usize,
                reason: e.to_string(),
            })
    };
    if let Some(w) = written {
        // Only pages this stream filled can be non-zero; forget them as they are cleared.
        for run in w.take_range(devices::GpaRange::new(gpa, pages * PAGE_SIZE)) {
            for p in 0..run.pages {
                clear(run.gpa + p * PAGE_SIZE)?;
            }
        }
        return Ok(());
    }
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(MAX_RECORD_PAGES);
        let at = gpa + done * PAGE_SIZE;
        let len = (n * PAGE_SIZE) as usize;
        mem.read_slice(&mut buf[..len], GuestAddress(at))
            .map_err(|e| StreamErrorKind::GuestWrite {
                gpa: at,
                len,
                reason: e.to_string(),
            })?;
        for (i, page) in buf[..len].chunks_exact(PAGE_SIZE as usize).enumerate() {
            if !is_zero_page(page) {
                clear(at + i as u64 * PAGE_SIZE)?;
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn layout(size: u64) -> MemoryLayout {
        MemoryLayout::new(size).unwrap()
    }

    fn guest(l: &MemoryLayout) -> GuestMemory {
        let ranges: Vec<_> = l
            .regions()
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        GuestMemory::from_ranges(&ranges).unwrap()
    }

    fn fill(mem: &GuestMemory, gpa: u64, pages: u64, seed: u8) {
        for p in 0..pages {
            let mut page = vec![0u8; PAGE_SIZE as usize];
            for (i, b) in page.iter_mut().enumerate() {
                *b = seed.wrapping_add((i % 251) as u8).wrapping_add(p as u8) | 1;
            }
            mem.write_slice(&page, GuestAddress(gpa + p * PAGE_SIZE))
                .unwrap();
        }
    }

    fn read(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn send_all(w: &mut StreamWriter<Vec<u8>>, mem: &GuestMemory, l: &MemoryLayout, round: u32) {
        let bm = AtomicPageBitmap::new(l);
        bm.set_all();
        for run in bm.take_runs(256) {
            w.send_ram(mem, round, run).unwrap();
        }
    }

    fn restore(
        stream: &[u8],
        l: &MemoryLayout,
        dest: Destination,
    ) -> Result<(GuestMemory, Restored), StreamError> {
        let mem = guest(l);
        let r = StreamReader::new(stream).restore(&mem, l, dest)?;
        Ok((mem, r))
    }

    /// A small stream: round 1 sends all of a 16 MiB guest (three data runs,
    /// the rest zero), round 2 rewrites one page, zeroes another and adds one.
    fn sample() -> (Vec<u8>, GuestMemory, MemoryLayout) {
        let l = layout(16 * MIB);
        let src = guest(&l);
        fill(&src, 0, 2, 10);
        fill(&src, 0x10_0000, 1, 20);
        fill(&src, 0xff_f000, 1, 30);
        let mut w = StreamWriter::new(Vec::new());
        w.header(&layout_ranges(&l), 0).unwrap();
        send_all(&mut w, &src, &l, 1);
        // Round 2: page 1 is rewritten, page 0x100000 becomes zero, 0x5000 gets data.
        fill(&src, 0x1000, 1, 99);
        src.write_slice(&[0u8; 4096], GuestAddress(0x10_0000))
            .unwrap();
        fill(&src, 0x5000, 1, 40);
        for gpa in [0x1000, 0x5000, 0x10_0000] {
            w.send_ram(&src, 2, GpaRun { gpa, pages: 1 }).unwrap();
        }
        w.state(b"{\"hello\":\"state\"}").unwrap();
        let (out, stats) = w.finish().unwrap();
        assert_eq!(stats.stream_bytes, out.len() as u64);
        (out, src, l)
    }

    #[test]
    fn round_trip_last_round_wins_and_zero_marker_clears() {
        let (stream, src, l) = sample();
        for dest in [Destination::Fresh, Destination::Unknown] {
            let (mem, r) = restore(&stream, &l, dest).unwrap();
            assert_eq!(r.state, b"{\"hello\":\"state\"}");
            assert_eq!(r.last_round, 2);
            assert_eq!(r.header.layout, layout_ranges(&l));
            assert_eq!(read(&mem, 0, 16 << 20), read(&src, 0, 16 << 20), "{dest:?}");
            assert_eq!(
                read(&mem, 0x10_0000, 4096),
                vec![0u8; 4096],
                "zeroed in round 2"
            );
            // Round 1: 5 data pages; round 2: 3 pages, one of them a zero marker.
            assert_eq!(r.stats.data_pages, 4 + 2);
            assert_eq!(r.stats.page_bytes, 6 * 4096);
            assert_eq!(r.stats.zero_pages, 4096 - 4 + 1);
        }
    }

    #[test]
    fn zero_pages_cost_no_bytes_and_merge_into_few_records() {
        let l = layout(64 * MIB);
        let src = guest(&l);
        fill(&src, 32 * MIB, 3, 1);
        let mut w = StreamWriter::new(Vec::new());
        w.header(&layout_ranges(&l), FLAG_LIVE).unwrap();
        send_all(&mut w, &src, &l, 1);
        w.state(b"{}").unwrap();
        let (out, stats) = w.finish().unwrap();
        assert_eq!(stats.page_bytes, 3 * 4096);
        assert_eq!(stats.zero_pages, 64 * 256 - 3);
        // zero run, data run, zero run, state.
        assert_eq!(stats.records, 4);
        assert!(out.len() < 4 * 4096, "{} bytes", out.len());
        let (_, r) = restore(&out, &l, Destination::Fresh).unwrap();
        assert_eq!(r.header.flags, FLAG_LIVE);
    }

    #[test]
    fn zero_marker_clears_a_dirty_destination() {
        let (stream, src, l) = sample();
        let mem = guest(&l);
        fill(&mem, 0, 4096, 7); // garbage everywhere
        StreamReader::new(&stream[..])
            .restore(&mem, &l, Destination::Unknown)
            .unwrap();
        assert_eq!(read(&mem, 0, 16 << 20), read(&src, 0, 16 << 20));
    }

    #[test]
    fn two_region_guest_round_trips() {
        let l = layout((3 << 30) + 8 * MIB);
        let src = guest(&l);
        fill(&src, (3 << 30) - 0x2000, 2, 5);
        fill(&src, 1 << 32, 3, 6);
        let mut w = StreamWriter::new(Vec::new());
        w.header(&layout_ranges(&l), 0).unwrap();
        send_all(&mut w, &src, &l, 1);
        w.state(&[]).unwrap();
        let (out, _) = w.finish().unwrap();
        let (mem, _) = restore(&out, &l, Destination::Fresh).unwrap();
        assert_eq!(
            read(&mem, (3 << 30) - 0x2000, 0x2000),
            read(&src, (3 << 30) - 0x2000, 0x2000)
        );
        assert_eq!(read(&mem, 1 << 32, 0x3000), read(&src, 1 << 32, 0x3000));
    }

    /// Byte ranges of the sample stream's parts: (start, end, what).
    fn parts(stream: &[u8]) -> Vec<(usize, usize, u32)> {
        let mut v = Vec::new();
        let mut at = 20 + 16 + 4; // one region
        while at < stream.len() {
            let mut hb = [0u8; RECORD_HEADER_LEN];
            hb.copy_from_slice(&stream[at..at + RECORD_HEADER_LEN]);
            let h = RecordHeader::decode(&hb).unwrap();
            let end = at + RECORD_HEADER_LEN + h.payload_len as usize;
            v.push((at, end, h.tag));
            at = end;
        }
        v
    }

    #[test]
    fn every_flipped_byte_is_refused_where_it_is() {
        let (stream, _, l) = sample();
        let parts = parts(&stream);
        let header_len = parts[0].0;
        let mut checked = 0;
        for pos in 0..stream.len() {
            let rec = parts.iter().position(|p| pos >= p.0 && pos < p.1);
            let in_payload = rec.is_some_and(|i| pos >= parts[i].0 + RECORD_HEADER_LEN);
            // Every header byte; a sample of page bytes (the rest are alike).
            if in_payload && parts[rec.unwrap()].2 == TAG_DATA && pos % 61 != 0 {
                continue;
            }
            let mut bad = stream.clone();
            bad[pos] ^= 0x40;
            let e = restore(&bad, &l, Destination::Fresh)
                .err()
                .unwrap_or_else(|| panic!("flip at {pos} accepted"));
            checked += 1;
            match rec {
                None => {
                    assert_eq!(e.record, None, "flip at {pos}: {e}");
                    assert!(pos < header_len);
                    match pos {
                        0..8 => assert!(matches!(e.kind, StreamErrorKind::BadMagic { .. }), "{e}"),
                        8..12 => assert!(
                            matches!(e.kind, StreamErrorKind::UnsupportedVersion { .. }),
                            "{e}"
                        ),
                        16..20 => assert!(
                            matches!(
                                e.kind,
                                StreamErrorKind::TooManyRegions { .. }
                                    | StreamErrorKind::UnexpectedEof { .. }
                                    | StreamErrorKind::HeaderChecksum { .. }
                            ),
                            "{e}"
                        ),
                        _ => assert!(
                            matches!(e.kind, StreamErrorKind::HeaderChecksum { .. }),
                            "{e}"
                        ),
                    }
                }
                Some(i) => {
                    assert_eq!(e.record, Some(i as u64), "flip at {pos}: {e}");
                    assert_eq!(e.offset, parts[i].0 as u64, "flip at {pos}: {e}");
                    if in_payload {
                        assert!(
                            matches!(e.kind, StreamErrorKind::PayloadChecksum { .. }),
                            "flip at {pos}: {e}"
                        );
                    } else {
                        assert!(
                            matches!(e.kind, StreamErrorKind::RecordHeaderChecksum { .. }),
                            "flip at {pos}: {e}"
                        );
                    }
                }
            }
        }
        assert!(checked > 400);
        // The messages say where and why.
        let mut bad = stream.clone();
        let state = parts.iter().find(|p| p.2 == TAG_STATE).unwrap();
        bad[state.0 + RECORD_HEADER_LEN + 2] ^= 1;
        let msg = restore(&bad, &l, Destination::Fresh)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&format!("at byte {}", state.0)), "{msg}");
        assert!(
            msg.contains("STAT record payload checksum mismatch"),
            "{msg}"
        );
        let trailer = parts.last().unwrap();
        let mut bad = stream.clone();
        bad[trailer.0 + RECORD_HEADER_LEN] ^= 1;
        let msg = restore(&bad, &l, Destination::Fresh)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("record {}", parts.len() - 1))
                && msg.contains("TEND record payload checksum"),
            "{msg}"
        );
    }

    #[test]
    fn every_truncation_is_refused_at_the_end_of_the_stream() {
        let (stream, _, l) = sample();
        for len in 0..stream.len() {
            let e = restore(&stream[..len], &l, Destination::Fresh)
                .err()
                .unwrap_or_else(|| panic!("stream cut at {len} accepted"));
            assert!(
                matches!(e.kind, StreamErrorKind::UnexpectedEof { .. }),
                "cut at {len}: {e}"
            );
            assert_eq!(e.offset, len as u64, "cut at {len}: {e}");
        }
        let e = restore(&stream[..stream.len() - 1], &l, Destination::Fresh).unwrap_err();
        assert!(
            e.to_string()
                .contains("unexpected end of stream in the trailer"),
            "{e}"
        );
        let e = restore(&stream[..10], &l, Destination::Fresh).unwrap_err();
        assert!(
            e.to_string()
                .contains("in the stream header: got 10 of 20 bytes"),
            "{e}"
        );
    }

    #[test]
    fn bad_magic_and_version_are_named() {
        let (mut stream, _, l) = sample();
        stream[..8].copy_from_slice(b"NOTBLIMP");
        let e = restore(&stream, &l, Destination::Fresh).unwrap_err();
        assert!(
            e.to_string().contains("not a Blimp migration stream"),
            "{e}"
        );
        let (mut stream, _, l) = sample();
        stream[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = restore(&stream, &l, Destination::Fresh).unwrap_err();
        assert_eq!(e.offset, 8);
        assert!(
            e.to_string()
                .contains("unsupported stream format version 7"),
            "{e}"
        );
    }

    /// Set the header's version and fix its checksum.
    fn with_version(stream: &mut [u8], version: u32) {
        stream[8..12].copy_from_slice(&version.to_le_bytes());
        let count = le32(&stream[16..20]) as usize;
        let end = 20 + count * 16;
        let crc = crc32c::crc32c(&stream[..end]);
        stream[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn version_1_streams_still_restore_and_newer_ones_are_refused() {
        let (mut stream, _, l) = sample();
        with_version(&mut stream, 1);
        let (_, r) = restore(&stream, &l, Destination::Fresh).expect("a version 1 stream restores");
        assert_eq!(r.header.version, 1);
        with_version(&mut stream, FORMAT_VERSION + 1);
        let e = restore(&stream, &l, Destination::Fresh).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "unsupported stream format version {} (this Blimp reads versions 1 to {FORMAT_VERSION})",
                FORMAT_VERSION + 1
            )),
            "{e}"
        );
    }

    #[test]
    fn layout_mismatch_is_refused() {
        let (stream, _, _) = sample();
        let other = layout(32 * MIB);
        let e = restore(&stream, &other, Destination::Fresh).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e.kind, StreamErrorKind::LayoutMismatch { .. }),
            "{msg}"
        );
        assert!(msg.contains("+16 MiB") && msg.contains("+32 MiB"), "{msg}");
    }

    /// Hand-made streams with valid checksums but wrong contents.
    struct Raw {
        bytes: Vec<u8>,
        seq: u32,
    }

    impl Raw {
        fn new(l: &MemoryLayout) -> Self {
            let mut w = StreamWriter::new(Vec::new());
            w.header(&layout_ranges(l), 0).unwrap();
            let bytes = w.out.into_inner().unwrap();
            Self { bytes, seq: 0 }
        }
        fn rec(mut self, tag: u32, round: u32, gpa: u64, pages: u32, payload: &[u8]) -> Self {
            let h = RecordHeader {
                tag,
                seq: self.seq,
                round,
                pages,
                gpa,
                payload_len: payload.len() as u32,
                payload_crc: crc32c::crc32c(payload),
            };
            self.bytes.extend_from_slice(&h.encode());
            self.bytes.extend_from_slice(payload);
            self.seq += 1;
            self
        }
        fn trailer(self, records: u64, bytes: u64, zero: u64) -> Self {
            let mut t = records.to_le_bytes().to_vec();
            t.extend_from_slice(&bytes.to_le_bytes());
            t.extend_from_slice(&zero.to_le_bytes());
            self.rec(TAG_TRAILER, 0, 0, 0, &t)
        }
    }

    fn refused(raw: Raw, l: &MemoryLayout) -> StreamError {
        restore(&raw.bytes, l, Destination::Fresh).unwrap_err()
    }

    /// Restoring `raw` into `l` fails with an error of kind `$kind`
    /// (`$context` says which case, in the failure message); evaluates to
    /// the error.
    macro_rules! assert_refused {
        ($raw:expr, $l:expr, $kind:pat $(if $guard:expr)? $(, $context:literal)?) => {{
            let e = refused($raw, $l);
            assert!(
                matches!(e.kind, $kind $(if $guard)?),
                "{}{e}",
                concat!($($context, ": ")?)
            );
            e
        }};
    }

    #[test]
    fn well_formed_but_wrong_streams_are_refused() {
        let l = layout(16 * MIB);
        let page = vec![1u8; 4096];
        // Sanity: a correct hand-made stream is accepted.
        let ok = Raw::new(&l)
            .rec(TAG_DATA, 1, 0, 1, &page)
            .rec(TAG_STATE, 1, 0, 0, b"s")
            .trailer(2, 4096, 0);
        assert_eq!(
            restore(&ok.bytes, &l, Destination::Fresh).unwrap().1.state,
            b"s"
        );

        let e = assert_refused!(
            Raw::new(&l).rec(TAG_DATA, 1, 16 * MIB, 1, &page),
            &l,
            StreamErrorKind::RangeOutsideRam {
                gpa: 0x100_0000,
                pages: 1,
                ..
            }
        );
        assert!(
            e.to_string().contains("not inside the destination's RAM"),
            "{e}"
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_ZERO, 1, 16 * MIB - 4096, 2, &[]),
            &l,
            StreamErrorKind::RangeOutsideRam { .. }
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_ZERO, 1, 0x800, 1, &[]),
            &l,
            StreamErrorKind::RangeOutsideRam { .. },
            "unaligned"
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_ZERO, 1, u64::MAX - 4095, u32::MAX, &[]),
            &l,
            StreamErrorKind::RangeOutsideRam { .. },
            "overflow"
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_DATA, 1, 0, 2, &page),
            &l,
            StreamErrorKind::BadPayloadLength { .. }
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_DATA, 1, 0, 257, &[]),
            &l,
            StreamErrorKind::RecordTooLarge { .. }
        );
        let e = refused(
            Raw::new(&l).rec(u32::from_le_bytes(*b"WHAT"), 1, 0, 0, &[]),
            &l,
        );
        assert!(e.to_string().contains("unknown record tag WHAT"), "{e}");
        let e = assert_refused!(
            Raw::new(&l)
                .rec(TAG_ZERO, 2, 0, 1, &[])
                .rec(TAG_ZERO, 1, 0, 1, &[]),
            &l,
            StreamErrorKind::RoundBackwards {
                round: 1,
                previous: 2
            }
        );
        assert_eq!(e.record, Some(1));
        assert_refused!(
            Raw::new(&l)
                .rec(TAG_STATE, 1, 0, 0, b"s")
                .rec(TAG_ZERO, 1, 0, 1, &[]),
            &l,
            StreamErrorKind::AfterState { .. }
        );
        assert_refused!(
            Raw::new(&l)
                .rec(TAG_STATE, 1, 0, 0, b"s")
                .rec(TAG_STATE, 1, 0, 0, b"s"),
            &l,
            StreamErrorKind::AfterState { .. },
            "duplicate state"
        );
        assert_refused!(
            Raw::new(&l).rec(TAG_ZERO, 1, 0, 1, &[]).trailer(1, 0, 1),
            &l,
            StreamErrorKind::MissingState
        );
        // Trailer counts that disagree with the stream.
        let base = || {
            Raw::new(&l)
                .rec(TAG_DATA, 1, 0, 1, &page)
                .rec(TAG_ZERO, 1, 4096, 3, &[])
                .rec(TAG_STATE, 1, 0, 0, b"s")
        };
        for (raw, what) in [
            (base().trailer(4, 4096, 3), "record count"),
            (base().trailer(3, 8192, 3), "page byte count"),
            (base().trailer(3, 4096, 2), "zero page count"),
        ] {
            assert_refused!(raw, &l, StreamErrorKind::TrailerMismatch { what: w, .. } if w == what);
        }
        assert!(restore(&base().trailer(3, 4096, 3).bytes, &l, Destination::Fresh).is_ok());
        // A record repeated (spliced stream) breaks the numbering.
        let mut raw = Raw::new(&l).rec(TAG_ZERO, 1, 0, 1, &[]);
        let rec = raw.bytes[raw.bytes.len() - RECORD_HEADER_LEN..].to_vec();
        raw.bytes.extend_from_slice(&rec);
        assert_refused!(
            raw,
            &l,
            StreamErrorKind::OutOfSequence {
                expected: 1,
                found: 0
            }
        );
        // A trailer whose claimed payload length is wrong.
        assert_refused!(
            base().rec(TAG_TRAILER, 1, 0, 0, &[0; 8]),
            &l,
            StreamErrorKind::BadPayloadLength { .. }
        );
    }

    #[test]
    fn writer_refuses_misuse() {
        let l = layout(16 * MIB);
        let ranges = layout_ranges(&l);
        let mut w = StreamWriter::new(Vec::new());
        assert!(matches!(
            w.zero_pages(1, 0, 1),
            Err(WriteError::Order { .. })
        ));
        w.header(&ranges, 0).unwrap();
        assert!(matches!(
            w.header(&ranges, 0),
            Err(WriteError::Order { .. })
        ));
        assert!(matches!(
            w.zero_pages(1, 16 * MIB, 1),
            Err(WriteError::OutsideLayout { .. })
        ));
        assert!(matches!(
            w.data_pages(1, 0, &[0; 100]),
            Err(WriteError::PartialPage { .. })
        ));
        w.zero_pages(3, 0, 1).unwrap();
        assert!(matches!(
            w.zero_pages(2, 0, 1),
            Err(WriteError::RoundBackwards { round: 2, last: 3 })
        ));
        w.state(b"x").unwrap();
        assert!(matches!(
            w.data_pages(3, 0, &[1; 4096]),
            Err(WriteError::Order { .. })
        ));
        assert!(matches!(w.state(b"x"), Err(WriteError::Order { .. })));
        let no_state = {
            let mut w = StreamWriter::new(Vec::new());
            w.header(&ranges, 0).unwrap();
            w.finish()
        };
        assert!(matches!(no_state, Err(WriteError::Order { .. })));
    }

    #[test]
    fn bytes_after_the_trailer_are_handed_back() {
        let (mut stream, _, l) = sample();
        stream.extend_from_slice(b"NEXT");
        let mem = guest(&l);
        let mut r = StreamReader::new(&stream[..]);
        r.restore(&mem, &l, Destination::Fresh).unwrap();
        assert_eq!(r.offset(), stream.len() as u64 - 4);
        let (inner, mut rest) = r.into_inner();
        rest.extend_from_slice(inner);
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn expect_end_refuses_bytes_after_the_trailer() {
        let (stream, _, l) = sample();
        let mem = guest(&l);
        let mut r = StreamReader::new(&stream[..]);
        r.restore(&mem, &l, Destination::Fresh).unwrap();
        r.expect_end().unwrap();
        for extra in [&b"x"[..], &stream[..]] {
            let mut twice = stream.clone();
            twice.extend_from_slice(extra);
            let mut r = StreamReader::new(&twice[..]);
            r.restore(&mem, &l, Destination::Fresh).unwrap();
            let e = r.expect_end().unwrap_err();
            assert!(matches!(e.kind, StreamErrorKind::TrailingBytes), "{e}");
            assert_eq!(e.offset, stream.len() as u64);
            assert!(e.to_string().contains("follows the trailer"), "{e}");
        }
    }

    #[test]
    fn the_header_layout_must_be_one_this_host_builds() {
        let header = |layout: Vec<RamRange>| StreamHeader {
            version: FORMAT_VERSION,
            flags: 0,
            layout,
        };
        let ok = header(layout_ranges(&layout(256 * MIB)));
        assert_eq!(ok.memory_layout(None).unwrap(), layout(256 * MIB));
        assert_eq!(
            ok.memory_layout(Some(256 * MIB)).unwrap(),
            layout(256 * MIB)
        );
        let e = ok.memory_layout(Some(128 * MIB)).unwrap_err();
        assert!(
            matches!(e.kind, StreamErrorKind::LargerThanHost { .. }),
            "{e}"
        );
        let bad = [
            vec![],
            vec![RamRange { gpa: 0, size: 4096 }],
            vec![RamRange {
                gpa: 0x1000,
                size: 256 * MIB,
            }],
            vec![
                RamRange {
                    gpa: 0,
                    size: u64::MAX,
                },
                RamRange { gpa: 0, size: 2 },
            ],
            vec![RamRange {
                gpa: 0,
                size: 2 << 40,
            }],
            vec![RamRange {
                gpa: 0,
                size: 16 * MIB + 1,
            }],
            vec![
                RamRange {
                    gpa: 0,
                    size: 16 * MIB
                };
                2
            ],
        ];
        for l in bad {
            let e = header(l.clone()).memory_layout(None).unwrap_err();
            assert!(
                matches!(e.kind, StreamErrorKind::BadLayout { .. }),
                "{l:?}: {e}"
            );
        }
    }

    #[test]
    fn a_state_section_beyond_the_guest_limit_is_refused_at_its_header() {
        let l = layout(16 * MIB);
        let max = super::super::state::max_state_bytes(&l);
        let raw = Raw::new(&l).rec(TAG_STATE, 0, 0, 0, &vec![b' '; max as usize + 1]);
        let e = refused(raw, &l);
        match e.kind {
            StreamErrorKind::StateTooLarge {
                len,
                max: m,
                memory_mib,
            } => {
                assert_eq!((len, m, memory_mib), (max + 1, max, 16));
            }
            other => panic!("{other}"),
        }
    }

    /// A shared backing's holes are sent as zero pages without a read,
    /// which would allocate them: a snapshot of a ballooned memfd guest
    /// made the host give it all its memory again; on a full tmpfs under
    /// `file=PATH` the read was a SIGBUS and the VM was lost.
    #[test]
    fn holes_of_shared_ram_are_sent_as_zero_without_allocating_them() {
        use crate::config::MemoryBackend;
        use devices::RamDiscard;
        let path = std::env::temp_dir().join(format!("blimp-holes-{}", std::process::id()));
        let shm =
            std::path::Path::new("/dev/shm").join(format!("blimp-holes-{}", std::process::id()));
        for backing in [
            MemoryBackend::Memfd,
            MemoryBackend::File(path.clone()),
            MemoryBackend::File(shm.clone()),
        ] {
            let l = layout(64 * MIB);
            let ram = GuestRam::new(&l, &backing).unwrap();
            let src = ram.memory();
            // Data across a stripe boundary, a zero page that is allocated,
            // and a page discarded again (a hole once more).
            fill(src, 0x1ff_e000, 4, 3);
            src.write_slice(&[0u8; 4096], GuestAddress(0x30_0000))
                .unwrap();
            fill(src, 0x3f0_0000, 2, 7);
            ram.discard(devices::GpaRange::new(0x3f0_1000, 0x1000))
                .unwrap();
            let before = ram.allocated_bytes();
            assert_eq!(before, 6 * PAGE_SIZE, "{backing:?}: what the test wrote");
            let bm = AtomicPageBitmap::new(&l);
            bm.set_all();
            let mut w = StreamWriter::new(Vec::new());
            w.header(&layout_ranges(&l), 0).unwrap();
            assert_eq!(w.send_bitmap(&ram, 1, &bm).unwrap(), 64 * MIB / PAGE_SIZE);
            assert_eq!(
                ram.allocated_bytes(),
                before,
                "{backing:?}: nothing allocated by the send"
            );
            assert_eq!(w.stats().data_pages, 5, "{backing:?}");
            assert_eq!(
                w.stats().zero_pages,
                64 * MIB / PAGE_SIZE - 5,
                "{backing:?}"
            );
            w.state(b"").unwrap();
            let (out, _) = w.finish().unwrap();
            let (mem, _) = restore(&out, &l, Destination::Fresh).unwrap();
            for (gpa, len) in [(0x1ff_e000, 0x4000), (0x3f0_0000, 0x2000), (0, 0x1000)] {
                assert_eq!(
                    read(&mem, gpa, len),
                    read(src, gpa, len),
                    "{backing:?} at {gpa:#x}"
                );
            }
            drop(ram);
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&shm);
    }

    #[test]
    fn send_bitmap_claims_and_sends_the_set_pages() {
        let l = layout(16 * MIB);
        let src = guest(&l);
        fill(&src, 0x2000, 3, 9);
        let bm = AtomicPageBitmap::new(&l);
        bm.set_range(devices::GpaRange::new(0x1000, 0x5000));
        let mut w = StreamWriter::new(Vec::new());
        w.header(&layout_ranges(&l), 0).unwrap();
        assert_eq!(w.send_bitmap(&src, 1, &bm).unwrap(), 5);
        assert!(bm.is_empty());
        w.flush().unwrap();
        assert_eq!(w.stats().data_pages, 3);
        assert_eq!(w.stats().zero_pages, 2);
        w.zero_pages(1, 0, 0).unwrap();
        w.data_pages(1, 0, &[]).unwrap();
        w.state(b"").unwrap();
        let (out, _) = w.finish().unwrap();
        let (mem, _) = restore(&out, &l, Destination::Fresh).unwrap();
        assert_eq!(read(&mem, 0, 0x8000), read(&src, 0, 0x8000));
    }

    #[test]
    fn large_runs_are_cut_into_one_mib_records() {
        let l = layout(16 * MIB);
        let mut w = StreamWriter::new(Vec::new());
        w.header(&layout_ranges(&l), 0).unwrap();
        w.data_pages(1, 0, &vec![3u8; 3 * MIB as usize]).unwrap();
        w.state(b"").unwrap();
        let (out, stats) = w.finish().unwrap();
        assert_eq!(stats.records, 4);
        assert_eq!(stats.page_bytes, 3 * MIB);
        let (mem, _) = restore(&out, &l, Destination::Fresh).unwrap();
        assert_eq!(read(&mem, 0, 3 << 20), vec![3u8; 3 << 20]);
    }
}
