//! hyper answers a request it cannot parse (400, 414, 431) itself, with an
//! empty body, before the service sees it. [`JsonErrors`] wraps a
//! connection's stream and gives those answers the API's `{"error": ...}`
//! body. It reads only the server's own output, never the client's bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose writes of hyper's own empty error answers get a JSON body.
pub(crate) struct JsonErrors<S> {
    inner: S,
    /// Rewritten bytes not yet written to `inner`.
    pending: Vec<u8>,
}

impl<S> JsonErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
        }
    }
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
/// always carry a JSON body). `None` leaves it as it is.
fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
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
    let body = format!(
        "{}\n",
        serde_json::json!({ "error": message(rest.get(..3)?) })
    );
    let mut out = Vec::with_capacity(buf.len() + body.len() + 40);
    out.extend_from_slice(&head[..at]);
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        match rewrite(buf) {
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
        let out = String::from_utf8(rewrite(head).unwrap()).unwrap();
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
            assert_eq!(rewrite(buf), None, "{}", String::from_utf8_lossy(buf));
        }
    }
}
