//! A bounds-checked cursor over one payload. Every read checks the remaining length first,
//! so nothing here can index out of bounds or trust a length it has not compared with what is
//! left.

use super::error::DecodeError;
use crate::lsn::Lsn;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], pos: usize, kind: &'static str) -> Self {
        Reader { buf, pos, kind }
    }

    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// The whole payload, for loops that track their own position (see `Tuple::read`).
    #[inline]
    pub(crate) fn buf(&self) -> &'a [u8] {
        self.buf
    }

    /// Moves to a position a caller has already checked to be within the payload.
    #[inline]
    pub(crate) fn set_pos(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn error_at(&self, offset: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError::new(self.kind, offset, reason)
    }

    #[cold]
    fn short(&self, what: &str, needed: usize) -> DecodeError {
        self.short_at(self.pos, what, needed)
    }

    #[cold]
    pub(crate) fn short_at(&self, at: usize, what: &str, needed: usize) -> DecodeError {
        self.error_at(
            at,
            format!(
                "truncated: {what} needs {needed} bytes, {} remain",
                self.buf.len().saturating_sub(at)
            ),
        )
    }

    #[inline]
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        match self.buf.get(self.pos..self.pos + N) {
            Some(bytes) => {
                self.pos += N;
                // The slice has exactly N bytes: the conversion cannot fail.
                Ok(bytes.try_into().unwrap_or([0; N]))
            }
            None => Err(self.short(what, N)),
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&byte) => {
                self.pos += 1;
                Ok(byte)
            }
            None => Err(self.short(what, 1)),
        }
    }

    #[inline]
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    #[inline]
    pub(crate) fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    #[inline]
    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    #[inline]
    pub(crate) fn lsn(&mut self, what: &str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated UTF-8 string (the protocol's `String`).
    pub(crate) fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error_at(
                start,
                format!(
                    "{what} has no NUL terminator in the remaining {} bytes",
                    rest.len()
                ),
            ));
        };
        match std::str::from_utf8(&rest[..len]) {
            Ok(text) => {
                self.pos = start + len + 1;
                Ok(text.to_owned())
            }
            Err(error) => Err(self.error_at(
                start + error.valid_up_to(),
                format!("{what} is not valid UTF-8"),
            )),
        }
    }

    /// Skips `len` bytes and returns where they started, after checking they are there.
    pub(crate) fn skip(&mut self, len: usize, what: &str) -> Result<usize, DecodeError> {
        if len > self.remaining() {
            return Err(self.error_at(
                self.pos,
                format!(
                    "{what} of {len} bytes exceeds the remaining {} bytes",
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        self.pos += len;
        Ok(start)
    }

    /// Fails unless the whole payload was consumed: pgoutput messages have exact sizes, and
    /// trailing bytes mean the layout we assumed is not the one the server used.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.error_at(
                self.pos,
                format!(
                    "{} unexpected trailing bytes after the message",
                    self.remaining()
                ),
            ))
        }
    }
}
