//! hyper answers a request it cannot parse (400, 414, 431) itself, with an
//! empty body, before the service sees it. [`JsonErrors`] wraps a
//! connection's stream and gives those answers the API's `{"error": ...}`
//! body. It rewrites only the server's own output; of the client's bytes it
//! only watches the header lines for a `Transfer-Encoding` whose last coding
//! is not `chunked` (hyper refuses such a request with its own 400, e.g. a
//! lone `Transfer-Encoding: gzip`): that answer becomes a 501, as RFC 9112
//! section 6.1 has it for a transfer coding the server does not implement,
//! and as the service answers `gzip, chunked`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose writes of hyper's own empty error answers get a JSON body.
pub(crate) struct JsonErrors<S> {
    inner: S,
    /// Rewritten bytes not yet written to `inner`.
    pending: Vec<u8>,
    /// The client's bytes since the last line end (at most [`LINE_MAX`]).
    line: Vec<u8>,
    /// A header line since the server's last answer names a transfer
    /// coding other than a final `chunked`.
    bad_te: bool,
}

/// Enough of a header line to see its name and codings; the rest of a
/// longer line is not kept (hyper limits header sizes itself).
const LINE_MAX: usize = 256;

/// The message of the 501 for an unsupported transfer coding (the same as
/// the service's).
pub(crate) const UNSUPPORTED_TE: &str =
    "unsupported Transfer-Encoding (only chunked is implemented)";

impl<S> JsonErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
            line: Vec::new(),
            bad_te: false,
        }
    }

    /// Watch bytes the client sent.
    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if unsupported_te_line(&self.line) {
                    self.bad_te = true;
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

/// Whether a header line is a `Transfer-Encoding` whose last coding is not
/// `chunked`.
fn unsupported_te_line(line: &[u8]) -> bool {
    const NAME: &[u8] = b"transfer-encoding:";
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < NAME.len() || !line[..NAME.len()].eq_ignore_ascii_case(NAME) {
        return false;
    }
    let last = line[NAME.len()..]
        .split(|&b| b == b',')
        .map(|c| c.trim_ascii())
        .rfind(|c| !c.is_empty());
    !last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// The message of hyper's own answer with this status.
fn message(status: &[u8]) -> &'static str {
    match status {
        b"400" => "malformed HTTP request",
        b"414" => "request URI too long",
        b"431" => "request headers too large",
        _ => "cannot parse the HTTP request",
    }
}

/// Rewrite `buf` if it is the head of hyper's own error answer: a 4xx or
/// 5xx with `content-length: 0` and no content type (the service's errors
/// always carry a JSON body). `None` leaves it as it is. With `bad_te`, a
/// 400 becomes a 501 for the unsupported transfer coding.
fn rewrite(buf: &[u8], bad_te: bool) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"\r\ncontent-length: 0\r\n";
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    if !matches!(rest.first(), Some(b'4' | b'5')) {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..end];
    let at = head.windows(EMPTY.len()).position(|w| w == EMPTY)?;
    if head
        .windows(b"content-type:".len())
        .any(|w| w.eq_ignore_ascii_case(b"content-type:"))
    {
        return None;
    }
    let status = rest.get(..3)?;
    let te_501 = bad_te && status == b"400";
    let msg = if te_501 {
        UNSUPPORTED_TE
    } else {
        message(status)
    };
    let body = format!("{}\n", serde_json::json!({ "error": msg }));
    let mut out = Vec::with_capacity(buf.len() + body.len() + 40);
    if te_501 {
        // "HTTP/1.1 400 Bad Request" -> "HTTP/1.1 501 Not Implemented".
        let status_end = head.windows(2).position(|w| w == b"\r\n")?;
        out.extend_from_slice(b"HTTP/1.1 501 Not Implemented");
        out.extend_from_slice(&head[status_end..at]);
    } else {
        out.extend_from_slice(&head[..at]);
    }
    out.extend_from_slice(
        format!(
            "\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&head[at + EMPTY.len()..]);
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(&buf[end..]);
    Some(out)
}

impl<S: AsyncWrite + Unpin> JsonErrors<S> {
    /// Write out what a rewrite left pending.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = buf.filled()[before..].to_vec();
            self.saw(&new);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        let bad_te = std::mem::take(&mut self.bad_te);
        match rewrite(buf, bad_te) {
            Some(out) => {
                // The whole of `buf` is taken; the rewrite goes out first
                // thing on the next write, flush or shutdown.
                self.pending = out;
                let _ = self.drain(cx)?;
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answer_gets_a_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(rewrite(head, false).unwrap()).unwrap();
        let body = "{\"error\":\"request headers too large\"}\n";
        assert_eq!(
            out,
            format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: x\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[test]
    fn service_answers_are_left_alone() {
        for buf in [
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"{\"error\":\"x\"}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert_eq!(rewrite(buf, false), None, "{}", String::from_utf8_lossy(buf));
            assert_eq!(rewrite(buf, true), None, "{}", String::from_utf8_lossy(buf));
        }
    }

    #[test]
    fn a_400_after_an_unsupported_transfer_coding_is_a_501() {
        let head = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let out = String::from_utf8(rewrite(head, true).unwrap()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 501 Not Implemented\r\nconnection: close\r\ncontent-type: application/json\r\n"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "{\"error\":\"unsupported Transfer-Encoding (only chunked is implemented)\"}\n"
            ),
            "{out}"
        );
        // Other statuses keep theirs.
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(
            String::from_utf8(rewrite(head, true).unwrap())
                .unwrap()
                .starts_with("HTTP/1.1 431")
        );
    }

    #[test]
    fn transfer_encoding_lines() {
        for (line, bad) in [
            (&b"Transfer-Encoding: gzip\r"[..], true),
            (b"transfer-encoding:gzip", true),
            (b"TRANSFER-ENCODING: chunked, gzip\r", true),
            (b"Transfer-Encoding: \r", true),
            (b"Transfer-Encoding: chunked\r", false),
            (b"Transfer-Encoding: gzip, Chunked \r", false),
            (b"X-Transfer-Encoding: gzip\r", false),
            (b"Content-Type: gzip\r", false),
            (b"Transfer", false),
        ] {
            assert_eq!(
                unsupported_te_line(line),
                bad,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let mut j = JsonErrors::new(());
        j.saw(b"PATCH /vm HTTP/1.1\r\nHost: x\r\nTransfer-Enc");
        assert!(!j.bad_te);
        j.saw(b"oding: gzip\r\n\r\n");
        assert!(j.bad_te);
    }
}
