//! The pgoutput decoder (protocol versions 1 to 4).
