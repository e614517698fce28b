//! What went wrong while decoding, and where.

use std::fmt;

/// A pgoutput payload that does not follow the documented layout.
///
/// It names the message kind (from the tag byte) and the byte offset of the field that
/// could not be read, so a report points straight at the bad byte of a captured payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    kind: &'static str,
    offset: usize,
    reason: String,
    /// Not a bad payload but a payload that does not fit the stream so far (a change for a
    /// relation never described): said differently, since no byte of it is wrong.
    stream: bool,
}

impl DecodeError {
    pub(crate) fn new(kind: &'static str, offset: usize, reason: impl Into<String>) -> Self {
        DecodeError {
            kind,
            offset,
            reason: reason.into(),
            stream: false,
        }
    }

    pub(crate) fn stream(kind: &'static str, reason: impl Into<String>) -> Self {
        DecodeError {
            kind,
            offset: 0,
            reason: reason.into(),
            stream: true,
        }
    }

    /// The message kind named after the protocol documentation ("Insert", "Stream Abort"),
    /// or "Unknown" when the tag byte itself was not recognised.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Byte offset into the payload (the tag byte is offset 0) of the field that failed.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What was wrong, without the kind and offset prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.stream {
            write!(f, "{}", self.reason)
        } else if self.kind == UNKNOWN {
            write!(
                f,
                "Malformed pgoutput message at byte {}: {}",
                self.offset, self.reason
            )
        } else {
            write!(
                f,
                "Malformed pgoutput {} message at byte {}: {}",
                self.kind, self.offset, self.reason
            )
        }
    }
}

impl std::error::Error for DecodeError {}

pub(crate) const UNKNOWN: &str = "Unknown";

/// A payload we cannot read is not something a retry fixes: the stream is stopped and the
/// operator told (the slot keeps the data).
impl From<DecodeError> for crate::error::Error {
    fn from(error: DecodeError) -> Self {
        crate::error::Error::with_source(
            crate::error::ErrorKind::Definite,
            "Decoding the replication stream failed; the slot keeps the data, report this payload",
            error,
        )
    }
}
