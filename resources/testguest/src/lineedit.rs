//! Terminal line editing for the serial console: what to echo for each
//! received byte and when a line is complete. Handles CR, LF and CRLF line
//! ends, backspace/DEL, Ctrl-U (kill line) and drops other control bytes.

/// Longest accepted line; further bytes are dropped (and not echoed).
pub const MAX_LINE: usize = 256;

pub struct LineEditor {
    buf: [u8; MAX_LINE],
    len: usize,
    last_was_cr: bool,
}

/// What feeding one byte produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing to echo.
    None,
    /// Echo these bytes.
    Echo(&'static [u8]),
    /// Echo the byte itself.
    EchoByte(u8),
    /// A line ended: echo a newline and take the line with
    /// [`LineEditor::take_line`].
    Line,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self::new()
    }
}

impl LineEditor {
    pub const fn new() -> Self {
        LineEditor {
            buf: [0; MAX_LINE],
            len: 0,
            last_was_cr: false,
        }
    }

    pub fn feed(&mut self, b: u8) -> Event {
        let after_cr = core::mem::replace(&mut self.last_was_cr, b == b'\r');
        match b {
            b'\n' if after_cr => Event::None, // second half of CRLF
            b'\r' | b'\n' => Event::Line,
            0x08 | 0x7f => {
                if self.len > 0 {
                    self.len -= 1;
                    Event::Echo(b"\x08 \x08")
                } else {
                    Event::None
                }
            }
            0x15 => {
                // Ctrl-U: erase the whole line.
                let n = core::mem::replace(&mut self.len, 0);
                if n > 0 {
                    Event::Echo(b"\r\x1b[K")
                } else {
                    Event::None
                }
            }
            0x20..=0x7e if self.len < MAX_LINE => {
                self.buf[self.len] = b;
                self.len += 1;
                Event::EchoByte(b)
            }
            _ => Event::None,
        }
    }

    /// The completed line (printable ASCII only, so always valid UTF-8);
    /// resets the editor for the next line.
    pub fn take_line(&mut self) -> LineBuf {
        let l = LineBuf {
            buf: self.buf,
            len: self.len,
        };
        self.len = 0;
        l
    }
}

/// A completed line, owned.
pub struct LineBuf {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl LineBuf {
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(e: &mut LineEditor, s: &[u8]) -> Vec<String> {
        let mut lines = vec![];
        for &b in s {
            if e.feed(b) == Event::Line {
                lines.push(e.take_line().as_str().to_string());
            }
        }
        lines
    }

    #[test]
    fn line_ends() {
        let mut e = LineEditor::new();
        assert_eq!(
            feed_all(&mut e, b"a\rb\nc\r\nd\n\n"),
            vec!["a", "b", "c", "d", ""]
        );
    }

    #[test]
    fn editing() {
        let mut e = LineEditor::new();
        assert_eq!(e.feed(0x7f), Event::None);
        assert_eq!(e.feed(b'x'), Event::EchoByte(b'x'));
        assert_eq!(e.feed(0x7f), Event::Echo(b"\x08 \x08"));
        assert_eq!(feed_all(&mut e, b"ab\x08c\x01\x1b\n"), vec!["ac"]);
        assert_eq!(feed_all(&mut e, b"junk\x15ok\n"), vec!["ok"]);
    }

    #[test]
    fn overlong_lines_are_truncated() {
        let mut e = LineEditor::new();
        let long = vec![b'z'; MAX_LINE + 10];
        for &b in &long {
            e.feed(b);
        }
        assert_eq!(e.feed(b'\n'), Event::Line);
        assert_eq!(e.take_line().as_str().len(), MAX_LINE);
    }
}
