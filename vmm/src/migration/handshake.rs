//! The switchover handshake of a live migration over a socket: after the
//! stream's trailer, the two sides exchange short messages so that at most
//! one of them ever runs the guest, and a destination that cannot take the
//! VM over leaves it running at the source.
//!
//! ```text
//! source                                     destination
//!   ... pages, state, trailer  ───────────▶  verify everything, build the VM
//!                              ◀───────────  ACK   (or NAK + reason: source resumes)
//!   give up ownership
//!   GO                         ───────────▶
//!                              ◀───────────  RUN   (sent before its vCPUs start)
//!   Migrated (terminal)                       vCPUs run
//! ```
//!
//! Each message: tag (4 ASCII bytes) | reason length u32 | reason (UTF-8,
//! at most [`MAX_REASON`] bytes) | crc32c u32 over everything before it.
//! All integers little-endian.
//!
//! Decisions on the source (see `docs/migration.md` for both state machines):
//! - no ACK before the timeout, a NAK, a closed or reset connection, or a
//!   damaged message: resume the guest, report `Failed` with the reason;
//! - ACK: send GO, then wait for RUN. RUN: the destination owns the VM.
//!   End of stream without RUN: the destination did not start (it starts only
//!   after writing RUN), so the source resumes. No answer at all before the
//!   timeout: the destination may or may not run, so the source stays paused
//!   and says so (two running copies are worse than none running).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Longest reason carried by a message.
pub const MAX_REASON: usize = 4096;
const HEADER_LEN: usize = 8;

/// A handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Destination: the whole stream verified and the VM is built.
    Ack,
    /// Destination: the stream or the VM was refused; the reason.
    Nak(String),
    /// Source: it gave up the VM; the destination may run it.
    Go,
    /// Destination: its vCPUs start now.
    Run,
}

impl Message {
    fn tag(&self) -> [u8; 4] {
        *match self {
            Message::Ack => b"ACK!",
            Message::Nak(_) => b"NAK!",
            Message::Go => b"GO!!",
            Message::Run => b"RUN!",
        }
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Ack => "ACK",
            Message::Nak(_) => "NAK",
            Message::Go => "GO",
            Message::Run => "RUN",
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let reason = match self {
            Message::Nak(r) => truncate_utf8(r, MAX_REASON).as_bytes(),
            _ => &[],
        };
        let mut b = Vec::with_capacity(HEADER_LEN + reason.len() + 4);
        b.extend_from_slice(&self.tag());
        b.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        b.extend_from_slice(reason);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why no valid message arrived.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer closed the connection before its {expected} message")]
    Closed { expected: &'static str },
    #[error("no {expected} message from the peer within {timeout:?}")]
    Timeout {
        expected: &'static str,
        timeout: Duration,
    },
    #[error("cancelled while waiting for the peer's {expected} message")]
    Cancelled { expected: &'static str },
    #[error("reading the peer's {expected} message: {source}")]
    Io {
        expected: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sending {what}: {source}")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("damaged {expected} message: {why}")]
    Damaged { expected: &'static str, why: String },
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// Send `msg` and flush.
pub fn send(w: &mut impl Write, msg: &Message) -> Result<(), HandshakeError> {
    let err = |source| HandshakeError::Send {
        what: msg.name(),
        source,
    };
    w.write_all(&msg.encode()).map_err(err)?;
    w.flush().map_err(err)
}

/// A stream whose reads time out (sockets with `SO_RCVTIMEO` set): each
/// read returns `WouldBlock`/`TimedOut` after a short while, so the wait
/// can be cancelled.
pub struct Waiter<'a> {
    /// Gives up (with `Cancelled`) when this returns true.
    pub cancelled: &'a dyn Fn() -> bool,
    pub timeout: Duration,
}

impl Waiter<'_> {
    /// Read one message; `expected` names it in errors.
    pub fn recv(
        &self,
        r: &mut impl Read,
        expected: &'static str,
    ) -> Result<Message, HandshakeError> {
        let deadline = Instant::now() + self.timeout;
        let mut header = [0u8; HEADER_LEN];
        self.read_exact(r, &mut header, expected, deadline)?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_REASON {
            return Err(HandshakeError::Damaged {
                expected,
                why: format!("reason of {len} bytes (at most {MAX_REASON})"),
            });
        }
        let mut rest = vec![0u8; len + 4];
        self.read_exact(r, &mut rest, expected, deadline)?;
        let stored = u32::from_le_bytes([rest[len], rest[len + 1], rest[len + 2], rest[len + 3]]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), &rest[..len]);
        if stored != computed {
            return Err(HandshakeError::Damaged {
                expected,
                why: format!("checksum {stored:#010x}, computed {computed:#010x}"),
            });
        }
        let reason = || String::from_utf8_lossy(&rest[..len]).into_owned();
        let msg = match &header[..4] {
            b"ACK!" => Message::Ack,
            b"NAK!" => Message::Nak(reason()),
            b"GO!!" => Message::Go,
            b"RUN!" => Message::Run,
            other => {
                return Err(HandshakeError::Damaged {
                    expected,
                    why: format!("unknown tag {:?}", String::from_utf8_lossy(other)),
                });
            }
        };
        if len != 0 && !matches!(msg, Message::Nak(_)) {
            return Err(HandshakeError::Damaged {
                expected,
                why: format!("{} message with a {len}-byte reason", msg.name()),
            });
        }
        Ok(msg)
    }

    fn read_exact(
        &self,
        r: &mut impl Read,
        buf: &mut [u8],
        expected: &'static str,
        deadline: Instant,
    ) -> Result<(), HandshakeError> {
        let mut got = 0;
        while got < buf.len() {
            if (self.cancelled)() {
                return Err(HandshakeError::Cancelled { expected });
            }
            match r.read(&mut buf[got..]) {
                Ok(0) => return Err(HandshakeError::Closed { expected }),
                Ok(n) => got += n,
                Err(e) if super::link::is_poll_timeout(&e) => {
                    if Instant::now() >= deadline {
                        return Err(HandshakeError::Timeout {
                            expected,
                            timeout: self.timeout,
                        });
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(HandshakeError::Closed { expected });
                }
                Err(source) => return Err(HandshakeError::Io { expected, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> bool {
        false
    }

    fn waiter() -> Waiter<'static> {
        Waiter {
            cancelled: &never,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Message::Ack,
            Message::Go,
            Message::Run,
            Message::Nak("layout mismatch: 512 MiB here".into()),
        ] {
            let bytes = m.encode();
            let got = waiter().recv(&mut bytes.as_slice(), "any").unwrap();
            assert_eq!(got, m);
        }
    }

    #[test]
    fn a_long_reason_is_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_REASON);
        let bytes = Message::Nak(long).encode();
        match waiter().recv(&mut bytes.as_slice(), "NAK").unwrap() {
            Message::Nak(r) => assert!(r.len() <= MAX_REASON && r.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damaged_and_short_messages_are_refused() {
        let good = Message::Ack.encode();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x20;
            let e = waiter().recv(&mut b.as_slice(), "ACK").unwrap_err();
            assert!(
                matches!(
                    e,
                    HandshakeError::Damaged { .. } | HandshakeError::Closed { .. }
                ),
                "byte {i}: {e}"
            );
        }
        for cut in 0..good.len() {
            let e = waiter().recv(&mut &good[..cut], "ACK").unwrap_err();
            assert!(matches!(e, HandshakeError::Closed { .. }), "cut {cut}: {e}");
        }
        // A huge announced reason is refused before anything is allocated.
        let mut b = b"NAK!".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = waiter().recv(&mut b.as_slice(), "ACK").unwrap_err();
        assert!(e.to_string().contains("reason of"), "{e}");
        // A reason on a message that carries none.
        let mut b = b"ACK!".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'x');
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let e = waiter().recv(&mut b.as_slice(), "ACK").unwrap_err();
        assert!(
            e.to_string().contains("ACK message with a 1-byte reason"),
            "{e}"
        );
    }

    #[test]
    fn a_silent_peer_times_out_and_a_cancel_ends_the_wait() {
        let (mut a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let w = Waiter {
            cancelled: &never,
            timeout: Duration::from_millis(150),
        };
        let t = Instant::now();
        let e = w.recv(&mut a, "ACK").unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout { .. }), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(150));
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let is_cancelled = || cancel.load(std::sync::atomic::Ordering::SeqCst);
        let w = Waiter {
            cancelled: &is_cancelled,
            timeout: Duration::from_secs(60),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let t = Instant::now();
            let e = w.recv(&mut a, "ACK").unwrap_err();
            assert!(matches!(e, HandshakeError::Cancelled { .. }), "{e}");
            assert!(t.elapsed() < Duration::from_secs(1));
        });
        drop(_b);
        let e = waiter().recv(&mut a, "ACK").unwrap_err();
        assert!(matches!(e, HandshakeError::Closed { .. }), "{e}");
    }
}
