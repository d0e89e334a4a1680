//! Capture files: pcap or pcapng, optionally gzip-compressed, read a megabyte at a time.
//! (Ported from the Python `agent/source/capture_file.py` and `file_bytes.py`.)

use std::fmt;
use std::path::Path;

/// A capture that cannot be read at all; its Display is one line meant for the user.
#[derive(Debug)]
pub struct CaptureError(pub String);

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One record: capture time in seconds since the epoch, the link type of its interface, the frame.
pub struct Frame<'a> {
    pub time: f64,
    pub linktype: u32,
    pub data: &'a [u8],
}

pub struct CaptureFile {}

impl CaptureFile {
    pub fn open(_path: &Path) -> Result<CaptureFile, CaptureError> {
        unimplemented!("source helper")
    }

    /// The next frame, or None at the end of the file (or once the rest cannot be trusted).
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        unimplemented!("source helper")
    }

    /// Records that could not be used (each counted once, with its reason in `losses`).
    pub fn truncated_records(&self) -> u64 {
        unimplemented!("source helper")
    }

    /// (reason, count) for every kind of loss, in the order first seen, for the caller to log.
    pub fn losses(&self) -> Vec<(String, u64)> {
        unimplemented!("source helper")
    }
}
