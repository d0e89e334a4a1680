//! Capture files: pcap or pcapng, optionally gzip-compressed, cut into records by hand a megabyte at a time.
//!
//! A record cut short at the end of the file (a capture still being written, a truncated copy), damaged
//! compressed data, or a record with an impossible length ends the reading; a packet that cannot be used
//! on its own (no timestamp, one no date can hold, an interface never described) is skipped. Each is
//! counted in `truncated_records` rather than raised (what came before is good), with its reason in
//! `losses()` for the caller to log once the file has been read.

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use super::file_bytes::{open_regular_file, os_message, FileBytes, OpenError, Source, CHUNK};
use super::frames::{is_supported_link, SUPPORTED_LINKS};

const PCAP_HEADER: usize = 24;
const PCAP_RECORD: usize = 16;
const PCAP_MICROSECONDS_LITTLE: [u8; 4] = [0xd4, 0xc3, 0xb2, 0xa1];
const PCAP_MICROSECONDS_BIG: [u8; 4] = [0xa1, 0xb2, 0xc3, 0xd4];
const PCAP_NANOSECONDS_LITTLE: [u8; 4] = [0x4d, 0x3c, 0xb2, 0xa1];
const PCAP_NANOSECONDS_BIG: [u8; 4] = [0xa1, 0xb2, 0x3c, 0x4d];

/// A section header block's type, the same in either byte order.
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
const PCAPNG_LITTLE_ENDIAN: [u8; 4] = [0x4d, 0x3c, 0x2b, 0x1a];
const PCAPNG_BIG_ENDIAN: [u8; 4] = [0x1a, 0x2b, 0x3c, 0x4d];
const BLOCK_SHB: u32 = 0x0A0D_0D0A;
const BLOCK_IDB: u32 = 1;
const BLOCK_PB: u32 = 2;
const BLOCK_SPB: u32 = 3;
const BLOCK_EPB: u32 = 6;
const OPTION_END: u16 = 0;
const OPTION_TSRESOL: u16 = 9;
const OPTION_TSOFFSET: u16 = 14;

/// Larger than any frame a capture holds (64 KiB super-frames): a larger one is a corrupt length.
const MAX_RECORD: u32 = 1 << 20;
/// pcapng blocks besides packets (name tables, TLS secrets) may be larger, not this large.
const MAX_BLOCK: u32 = 16 << 20;
/// 10000-01-01T00:00:00Z: no datetime holds a packet time from here on.
const LAST_SECOND: f64 = 253_402_300_800.0;

/// A capture that cannot be read at all; its Display is one line meant for the user.
#[derive(Debug)]
pub struct CaptureError(pub String);

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One record: capture time in seconds since the epoch, the link type of its interface, the frame, and
/// the frame's length on the wire (more than `data` holds when the capture cut it short: its snap length).
pub struct Frame<'a> {
    pub time: f64,
    pub linktype: u32,
    pub data: &'a [u8],
    pub wire_length: usize,
}

/// How one pcapng interface's packets count time: `seconds_added + ticks / ticks_per_second`.
struct Interface {
    linktype: u32,
    ticks_per_second: f64,
    seconds_added: i64,
}

enum Format {
    Pcap { big_endian: bool, divisor: f64, linktype: u32 },
    /// The current section's byte order and interfaces (a new section starts its own numbering).
    Pcapng { big_endian: bool, interfaces: Vec<Interface> },
}

/// What the buffer's next record gave.
enum Parsed {
    /// A frame at `start..end` of the buffer, in the record that begins at `record`.
    Frame { time: f64, linktype: u32, start: usize, end: usize, wire_length: usize, record: usize },
    /// A block that carries no packet.
    Skipped,
    /// A record that cannot be used, for this reason; the next one follows it.
    Lost(&'static str),
    /// Nothing from here on can be trusted to start where a record starts, for this reason.
    GiveUp(String),
    /// The buffer holds no whole record: more of the file is needed.
    NeedMore,
}

pub struct CaptureFile {
    bytes: FileBytes,
    buffer: Vec<u8>,
    /// Where the next record starts in `buffer`.
    offset: usize,
    /// The end of the file, or a point past which nothing can be trusted, was reached.
    exhausted: bool,
    format: Format,
    truncated_records: u64,
    losses: Vec<(String, u64)>,
    /// The smallest snap length the file declares (pcap header, pcapng interfaces), 0 for none.
    snap_length: u32,
}

fn u16_at(buffer: &[u8], offset: usize, big_endian: bool) -> u16 {
    let bytes = [buffer[offset], buffer[offset + 1]];
    if big_endian { u16::from_be_bytes(bytes) } else { u16::from_le_bytes(bytes) }
}

fn u32_at(buffer: &[u8], offset: usize, big_endian: bool) -> u32 {
    let bytes = [buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3]];
    if big_endian { u32::from_be_bytes(bytes) } else { u32::from_le_bytes(bytes) }
}

fn pcapng_order(magic: Option<&[u8]>) -> Option<bool> {
    match magic? {
        magic if magic == PCAPNG_LITTLE_ENDIAN => Some(false),
        magic if magic == PCAPNG_BIG_ENDIAN => Some(true),
        _ => None,
    }
}

impl CaptureFile {
    /// Opens a regular file (anything else is refused before a read) and checks that it is a capture of a
    /// link type the agent decodes.
    pub fn open(path: &Path) -> Result<CaptureFile, CaptureError> {
        let name = path.display();
        match open_regular_file(path) {
            Ok(file) => CaptureFile::from_source(&name.to_string(), Box::new(file)),
            Err(OpenError::NotARegularFile) => Err(CaptureError(format!(
                "{name}: not a regular file; --read takes a pcap or pcapng file (optionally .gz)"
            ))),
            Err(OpenError::Os(error)) => Err(CaptureError(format!("{name}: cannot open ({})", os_message(&error)))),
        }
    }

    /// A capture held in memory (what the fuzzer and tests feed); `name` stands for its path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<CaptureFile, CaptureError> {
        CaptureFile::from_source(name, Box::new(Cursor::new(bytes)))
    }

    fn from_source(name: &str, source: Source) -> Result<CaptureFile, CaptureError> {
        let mut capture = CaptureFile {
            bytes: FileBytes::new(source),
            buffer: Vec::with_capacity(CHUNK),
            offset: 0,
            exhausted: false,
            format: Format::Pcap { big_endian: false, divisor: 1e6, linktype: 0 },
            truncated_records: 0,
            losses: Vec::new(),
            snap_length: 0,
        };
        while capture.buffer.len() < PCAP_HEADER {
            match capture.bytes.read_chunk(&mut capture.buffer) {
                Ok(true) => {}
                Ok(false) => break,
                Err(reason) => return Err(CaptureError(format!("{name}: unreadable capture ({reason})"))),
            }
        }
        let buffer = &capture.buffer;
        let magic = buffer.get(..4).unwrap_or_default();
        let linktypes = if [PCAP_MICROSECONDS_LITTLE, PCAP_MICROSECONDS_BIG, PCAP_NANOSECONDS_LITTLE,
                            PCAP_NANOSECONDS_BIG].iter().any(|pcap| magic == pcap) {
            if buffer.len() < PCAP_HEADER {
                return Err(CaptureError(format!("{name}: unreadable capture (the file ends inside its header)")));
            }
            let big_endian = magic == PCAP_MICROSECONDS_BIG || magic == PCAP_NANOSECONDS_BIG;
            let nanoseconds = magic == PCAP_NANOSECONDS_LITTLE || magic == PCAP_NANOSECONDS_BIG;
            let linktype = u32_at(buffer, 20, big_endian) & 0xFFFF; // the bits above: the FCS length
            capture.snap_length = u32_at(buffer, 16, big_endian);
            capture.format =
                Format::Pcap { big_endian, divisor: if nanoseconds { 1e9 } else { 1e6 }, linktype };
            capture.offset = PCAP_HEADER;
            vec![linktype]
        } else if magic == PCAPNG_MAGIC {
            let Some(big_endian) = pcapng_order(buffer.get(8..12)) else {
                return Err(CaptureError(format!(
                    "{name}: unreadable capture (a pcapng file without its byte-order magic)"
                )));
            };
            capture.format = Format::Pcapng { big_endian, interfaces: Vec::new() };
            capture.read_to_first_packet()
        } else {
            return Err(CaptureError(format!("{name}: not a pcap or pcapng capture")));
        };
        if let Some(first) = linktypes.first() {
            if !linktypes.iter().any(|&linktype| is_supported_link(linktype)) {
                return Err(CaptureError(format!(
                    "{name}: link type {first} is not one the agent decodes ({SUPPORTED_LINKS})"
                )));
            }
        }
        Ok(capture)
    }

    /// Reads up to the first packet, so that the interfaces described before it can be checked; the
    /// packet stays unread. Returns their link types.
    fn read_to_first_packet(&mut self) -> Vec<u32> {
        loop {
            match self.next_record() {
                Parsed::Frame { record, .. } => {
                    self.offset = record;
                    break;
                }
                _ => {
                    if !self.read_more() {
                        break;
                    }
                }
            }
        }
        match &self.format {
            Format::Pcapng { interfaces, .. } => interfaces.iter().map(|interface| interface.linktype).collect(),
            Format::Pcap { linktype, .. } => vec![*linktype],
        }
    }

    /// The next frame, or None at the end of the file (or once the rest cannot be trusted).
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        loop {
            match self.next_record() {
                Parsed::Frame { time, linktype, start, end, wire_length, .. } => {
                    return Some(Frame { time, linktype, data: &self.buffer[start..end], wire_length });
                }
                _ => {
                    if !self.read_more() {
                        return None;
                    }
                }
            }
        }
    }

    /// The buffer's next frame (`Parsed::Frame`) or `Parsed::NeedMore`, after counting the records
    /// that could not be used.
    fn next_record(&mut self) -> Parsed {
        loop {
            let parsed = match self.format {
                Format::Pcap { big_endian, divisor, linktype } => self.parse_pcap(big_endian, divisor, linktype),
                Format::Pcapng { .. } => self.parse_pcapng(),
            };
            match parsed {
                Parsed::Skipped => {}
                Parsed::Lost(reason) => self.lose(reason),
                Parsed::GiveUp(reason) => {
                    self.give_up(&reason);
                    return Parsed::NeedMore;
                }
                frame_or_need_more => return frame_or_need_more,
            }
        }
    }

    /// Records that could not be used (each counted once, with its reason in `losses`).
    pub fn truncated_records(&self) -> u64 {
        self.truncated_records
    }

    /// The smallest snap length the file declares (the pcap header's, or the smallest of the pcapng
    /// interfaces read so far), None if it declares none: frames longer than it were cut when captured.
    pub fn snap_length(&self) -> Option<u32> {
        (self.snap_length != 0).then_some(self.snap_length)
    }

    /// (reason, count) for every kind of loss, in the order first seen, for the caller to log.
    pub fn losses(&self) -> Vec<(String, u64)> {
        self.losses.clone()
    }

    /// Lets the file go; nothing more is read from it.
    pub fn close(&mut self) {
        self.bytes = FileBytes::new(Box::new(std::io::empty()));
        self.buffer = Vec::new();
        self.offset = 0;
        self.exhausted = true;
    }

    fn parse_pcap(&mut self, big_endian: bool, divisor: f64, linktype: u32) -> Parsed {
        let (buffer, offset) = (&self.buffer, self.offset);
        if offset + PCAP_RECORD > buffer.len() {
            return Parsed::NeedMore;
        }
        let seconds = u32_at(buffer, offset, big_endian);
        let fraction = u32_at(buffer, offset + 4, big_endian);
        let length = u32_at(buffer, offset + 8, big_endian);
        let wire_length = u32_at(buffer, offset + 12, big_endian) as usize;
        if length > MAX_RECORD {
            return Parsed::GiveUp(format!("a record claims {length} bytes"));
        }
        let (start, end) = (offset + PCAP_RECORD, offset + PCAP_RECORD + length as usize);
        if end > buffer.len() {
            return Parsed::NeedMore;
        }
        self.offset = end;
        let time = f64::from(seconds) + f64::from(fraction) / divisor;
        Parsed::Frame { time, linktype, start, end, wire_length, record: offset }
    }

    /// The buffer's next pcapng block.
    fn parse_pcapng(&mut self) -> Parsed {
        let CaptureFile { buffer, offset: next, format, snap_length, .. } = self;
        let Format::Pcapng { big_endian: order, interfaces } = format else { return Parsed::NeedMore };
        let offset = *next;
        if offset + 12 > buffer.len() {
            return Parsed::NeedMore;
        }
        let kind = u32_at(buffer, offset, *order);
        if kind == BLOCK_SHB {
            // a new section: its own byte order and interface numbering
            let Some(big_endian) = pcapng_order(buffer.get(offset + 8..offset + 12)) else {
                return Parsed::GiveUp("a section header without its byte-order magic".into());
            };
            *order = big_endian;
        }
        let length = u32_at(buffer, offset + 4, *order);
        if length < 12 || !length.is_multiple_of(4) || length > MAX_BLOCK {
            return Parsed::GiveUp(format!("a block claims {length} bytes"));
        }
        let length = length as usize;
        if offset + length > buffer.len() {
            return Parsed::NeedMore;
        }
        let (body, stop) = (offset + 8, offset + length - 4);
        if u32_at(buffer, stop, *order) as usize != length {
            return Parsed::GiveUp("a block whose two lengths differ".into());
        }
        *next += length;
        match kind {
            BLOCK_EPB | BLOCK_PB => {
                if stop - body < 20 {
                    return Parsed::Lost("packet blocks too short for their header");
                }
                let interface = if kind == BLOCK_EPB {
                    u32_at(buffer, body, *order) as usize
                } else {
                    usize::from(u16_at(buffer, body, *order)) // the obsolete Packet Block: then a drop count
                };
                let high = u64::from(u32_at(buffer, body + 4, *order));
                let low = u64::from(u32_at(buffer, body + 8, *order));
                let captured = u32_at(buffer, body + 12, *order) as usize;
                let wire_length = u32_at(buffer, body + 16, *order) as usize;
                let Some(interface) = interfaces.get(interface) else {
                    return Parsed::Lost("packets of an interface the file never described");
                };
                if captured > stop - body - 20 {
                    return Parsed::Lost("packet blocks shorter than the packet they hold");
                }
                // as the Python computes it: both terms rounded to f64, then added
                let time = interface.seconds_added as f64 + (high << 32 | low) as f64 / interface.ticks_per_second;
                if !(0.0..LAST_SECOND).contains(&time) {
                    return Parsed::Lost("packet times before 1970 or after 9999");
                }
                let start = body + 20;
                Parsed::Frame { time, linktype: interface.linktype, start, end: start + captured, wire_length, record: offset }
            }
            BLOCK_IDB => {
                if stop - body < 8 {
                    return Parsed::GiveUp("an interface description too short for its header".into());
                }
                let interface_snap_length = u32_at(buffer, body + 4, *order);
                if interface_snap_length != 0 && (*snap_length == 0 || interface_snap_length < *snap_length) {
                    *snap_length = interface_snap_length;
                }
                interfaces.push(describe_interface(&buffer[..stop], body, *order));
                Parsed::Skipped
            }
            BLOCK_SPB => Parsed::Lost("Simple Packet Blocks, which carry no timestamp"),
            BLOCK_SHB => {
                interfaces.clear();
                Parsed::Skipped
            }
            _ => Parsed::Skipped, // statistics, name resolution, secrets, custom blocks: no packets
        }
    }

    /// Appends the file's next chunk to what is left of the buffer. False at the end of the file, after
    /// counting how it ended if not cleanly (damaged, or cut inside a record).
    fn read_more(&mut self) -> bool {
        if self.exhausted {
            return false;
        }
        self.buffer.drain(..self.offset);
        self.offset = 0;
        match self.bytes.read_chunk(&mut self.buffer) {
            Ok(true) => true,
            Ok(false) => {
                self.exhausted = true;
                if !self.buffer.is_empty() {
                    self.lose("the file ends inside a record");
                }
                false
            }
            Err(reason) => {
                self.give_up(&format!("unreadable from here on ({reason})"));
                false
            }
        }
    }

    /// Stop reading: nothing after this point can be trusted to start where a record starts.
    fn give_up(&mut self, reason: &str) {
        self.lose(&format!("{reason}; the rest of the file is not read"));
        self.exhausted = true;
        self.offset = self.buffer.len();
    }

    /// Count a record that cannot be used.
    fn lose(&mut self, reason: &str) {
        self.truncated_records += 1;
        match self.losses.iter_mut().find(|(known, _)| known == reason) {
            Some((_, count)) => *count += 1,
            None => self.losses.push((reason.to_owned(), 1)),
        }
    }
}

/// An interface description's link type and how its packets count time (microseconds unless an option
/// says otherwise). `block` ends where the block's options must end.
fn describe_interface(block: &[u8], body: usize, big_endian: bool) -> Interface {
    let linktype = u32::from(u16_at(block, body, big_endian));
    let (mut ticks_per_second, mut seconds_added) = (1e6, 0);
    let mut position = body + 8;
    while position + 4 <= block.len() {
        let code = u16_at(block, position, big_endian);
        let length = usize::from(u16_at(block, position + 2, big_endian));
        let value = position + 4;
        if code == OPTION_END || value + length > block.len() {
            break;
        }
        if code == OPTION_TSRESOL && length >= 1 {
            let exponent = block[value]; // the high bit chooses powers of two over powers of ten
            ticks_per_second = if exponent & 0x80 != 0 {
                2f64.powi(i32::from(exponent & 0x7F))
            } else {
                power_of_ten(exponent)
            };
        } else if code == OPTION_TSOFFSET && length >= 8 {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&block[value..value + 8]);
            seconds_added = if big_endian { i64::from_be_bytes(bytes) } else { i64::from_le_bytes(bytes) };
        }
        position = value + length.next_multiple_of(4);
    }
    Interface { linktype, ticks_per_second, seconds_added }
}

/// 10^exponent correctly rounded, as Python's `float(10 ** exponent)` (`powi` may be off by an ulp).
fn power_of_ten(exponent: u8) -> f64 {
    format!("1e{exponent}").parse().unwrap_or(f64::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;
    use std::path::PathBuf;

    const FIRST_UNREPRESENTABLE_SECOND: u64 = 253_402_300_800;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../captures").join(name)
    }

    /// Every frame as (time, linktype, bytes), then the records lost and why.
    type Outcome = (Vec<(f64, u32, Vec<u8>)>, u64, Vec<(String, u64)>);

    fn read_all(mut capture: CaptureFile) -> Outcome {
        let mut frames = Vec::new();
        while let Some(frame) = capture.next_frame() {
            frames.push((frame.time, frame.linktype, frame.data.to_vec()));
        }
        assert!(capture.next_frame().is_none(), "the end stays the end");
        (frames, capture.truncated_records(), capture.losses())
    }

    fn read_bytes(bytes: Vec<u8>) -> Outcome {
        read_all(CaptureFile::from_bytes("test.pcap", bytes).expect("a capture"))
    }

    fn open_error(bytes: Vec<u8>) -> String {
        match CaptureFile::from_bytes("test.pcap", bytes) {
            Ok(_) => panic!("opened"),
            Err(error) => error.to_string(),
        }
    }

    fn frame(index: usize) -> Vec<u8> {
        (0..40 + index % 50).map(|byte| (byte + index) as u8).collect()
    }

    fn pcap(big_endian: bool, nanoseconds: bool, linktype: u32, records: &[(u32, u32, Vec<u8>)]) -> Vec<u8> {
        let word = |value: u32| if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
        let mut file = word(if nanoseconds { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }).to_vec();
        file.extend_from_slice(&if big_endian { [0, 2, 0, 4] } else { [2, 0, 4, 0] });
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&word(65535));
        file.extend_from_slice(&word(linktype));
        for (seconds, fraction, data) in records {
            for value in [*seconds, *fraction, data.len() as u32, data.len() as u32] {
                file.extend_from_slice(&word(value));
            }
            file.extend_from_slice(data);
        }
        file
    }

    fn records(count: usize) -> Vec<(u32, u32, Vec<u8>)> {
        (0..count).map(|index| (1_700_000_000 + index as u32, 123_456 + index as u32, frame(index))).collect()
    }

    #[test]
    fn pcap_in_either_byte_order_with_micro_or_nanoseconds() {
        for (big_endian, nanoseconds) in [(false, false), (true, false), (false, true), (true, true)] {
            let (frames, lost, _) = read_bytes(pcap(big_endian, nanoseconds, 1, &records(5)));
            assert_eq!(lost, 0);
            let divisor = if nanoseconds { 1e9 } else { 1e6 };
            let expected: Vec<_> = records(5).into_iter()
                .map(|(seconds, fraction, data)| (f64::from(seconds) + f64::from(fraction) / divisor, 1, data))
                .collect();
            assert_eq!(frames, expected);
        }
    }

    #[test]
    fn the_wire_length_and_snap_length_are_read_from_pcap_and_pcapng() {
        let mut file = pcap(false, false, 1, &records(2));
        file[16..20].copy_from_slice(&60u32.to_le_bytes());
        let second = PCAP_HEADER + PCAP_RECORD + records(1)[0].2.len();
        file[second + 12..second + 16].copy_from_slice(&1514u32.to_le_bytes()); // orig_len
        let mut capture = CaptureFile::from_bytes("test.pcap", file).expect("a capture");
        assert_eq!(capture.snap_length(), Some(60));
        let lengths: Vec<(usize, usize)> =
            std::iter::from_fn(|| capture.next_frame().map(|frame| (frame.data.len(), frame.wire_length))).collect();
        assert_eq!(lengths, [(40, 40), (41, 1514)]);
        let unlimited = CaptureFile::from_bytes("test.pcap", {
            let mut file = pcap(false, false, 1, &records(1));
            file[16..20].copy_from_slice(&0u32.to_le_bytes());
            file
        });
        assert_eq!(unlimited.expect("a capture").snap_length(), None);

        let snapped = |snap: u32| {
            let mut body = 1u16.to_le_bytes().to_vec();
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&snap.to_le_bytes());
            block(false, BLOCK_IDB, &body)
        };
        let mut body = Vec::new();
        for value in [0u32, 0, 1, 40, 1514] {
            body.extend_from_slice(&value.to_le_bytes());
        }
        body.extend_from_slice(&frame(0));
        let file = [section_header(false), snapped(0), snapped(96), snapped(65535), block(false, BLOCK_EPB, &body)].concat();
        let mut capture = CaptureFile::from_bytes("test.pcapng", file).expect("a capture");
        assert_eq!(capture.snap_length(), Some(96));
        assert_eq!(capture.next_frame().map(|frame| (frame.data.len(), frame.wire_length)), Some((40, 1514)));
        assert_eq!(CaptureFile::from_bytes("test.pcapng", pcapng(1, |_| None)).expect("a capture").snap_length(), None);
    }

    #[test]
    fn the_fcs_length_in_the_link_type_word_is_ignored() {
        let (frames, _, _) = read_bytes(pcap(false, false, 0x1000_0001, &records(1)));
        assert_eq!(frames[0].1, 1);
    }

    #[test]
    fn what_cannot_be_opened_is_one_line() {
        assert_eq!(open_error(Vec::new()), "test.pcap: not a pcap or pcapng capture");
        assert_eq!(open_error(b"GET / HTTP/1.1\r\n\r\n".to_vec()), "test.pcap: not a pcap or pcapng capture");
        assert_eq!(open_error(pcap(false, false, 1, &[])[..20].to_vec()),
                   "test.pcap: unreadable capture (the file ends inside its header)");
        assert_eq!(open_error(vec![0x0a, 0x0d, 0x0d, 0x0a, 28, 0, 0, 0, 1, 2, 3, 4, 0, 0]),
                   "test.pcap: unreadable capture (a pcapng file without its byte-order magic)");
        assert_eq!(open_error(pcap(false, false, 999, &records(1))),
                   "test.pcap: link type 999 is not one the agent decodes (Ethernet, Linux SLL/SLL2, raw IP, BSD loopback)");
        assert!(open_error(gzip(&[1, 2, 3])[..12].to_vec()).starts_with("test.pcap: unreadable capture ("));
    }

    #[test]
    fn a_capture_cut_inside_a_record_keeps_the_records_before() {
        let whole = pcap(false, false, 1, &records(4));
        for cut in 1..40 {
            let (frames, lost, losses) = read_bytes(whole[..whole.len() - cut].to_vec());
            assert_eq!((frames.len(), lost), (3, 1), "{cut}");
            assert_eq!(losses, [("the file ends inside a record".to_string(), 1)]);
        }
        assert_eq!(read_bytes(pcap(false, false, 1, &[])).1, 0);
    }

    #[test]
    fn a_pcap_record_with_an_impossible_length_stops_there() {
        let mut file = pcap(false, false, 1, &records(3));
        let second = PCAP_HEADER + PCAP_RECORD + records(1)[0].2.len();
        file[second + 8..second + 12].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        let (frames, lost, losses) = read_bytes(file);
        assert_eq!((frames.len(), lost), (1, 1));
        assert_eq!(losses[0].0, "a record claims 1048577 bytes; the rest of the file is not read");
    }

    // pcapng, written block by block

    fn block(big_endian: bool, kind: u32, body: &[u8]) -> Vec<u8> {
        let word = |value: u32| if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
        let padded = body.len().next_multiple_of(4);
        let length = padded as u32 + 12;
        let mut bytes = word(kind).to_vec();
        bytes.extend_from_slice(&word(length));
        bytes.extend_from_slice(body);
        bytes.resize(8 + padded, 0);
        bytes.extend_from_slice(&word(length));
        bytes
    }

    fn section_header(big_endian: bool) -> Vec<u8> {
        let mut body = if big_endian { PCAPNG_BIG_ENDIAN } else { PCAPNG_LITTLE_ENDIAN }.to_vec();
        body.extend_from_slice(if big_endian { &[0, 1, 0, 0] } else { &[1, 0, 0, 0] });
        body.extend_from_slice(&[0xFF; 8]);
        block(big_endian, BLOCK_SHB, &body)
    }

    fn interface(linktype: u16, options: &[Vec<u8>]) -> Vec<u8> {
        let mut body = linktype.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 6]);
        for option in options {
            body.extend_from_slice(option);
        }
        if !options.is_empty() {
            body.extend_from_slice(&[0; 4]);
        }
        block(false, BLOCK_IDB, &body)
    }

    fn option(code: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = code.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(value.len() as u16).to_le_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(4 + value.len().next_multiple_of(4), 0);
        bytes
    }

    fn packet_in(big_endian: bool, interface: u32, ticks: u64, data: &[u8]) -> Vec<u8> {
        let word = |value: u32| if big_endian { value.to_be_bytes() } else { value.to_le_bytes() };
        let mut body = Vec::new();
        for value in [interface, (ticks >> 32) as u32, ticks as u32, data.len() as u32, data.len() as u32] {
            body.extend_from_slice(&word(value));
        }
        body.extend_from_slice(data);
        block(big_endian, BLOCK_EPB, &body)
    }

    fn packet(interface: u32, ticks: u64, data: &[u8]) -> Vec<u8> {
        packet_in(false, interface, ticks, data)
    }

    fn microseconds(index: usize) -> u64 {
        1_700_000_000_000_000 + index as u64 * 1_234
    }

    /// A one-interface Ethernet pcapng of `count` packets; `rewrite(index)` may put other blocks instead.
    fn pcapng(count: usize, rewrite: impl Fn(usize) -> Option<Vec<u8>>) -> Vec<u8> {
        let mut file = section_header(false);
        file.extend(interface(1, &[]));
        for index in 0..count {
            file.extend(rewrite(index).unwrap_or_else(|| packet(0, microseconds(index), &frame(index))));
        }
        file
    }

    fn time_of(index: usize) -> f64 {
        microseconds(index) as f64 / 1e6
    }

    #[test]
    fn pcapng_packets_keep_their_times_and_frames() {
        let (frames, lost, _) = read_bytes(pcapng(20, |_| None));
        assert_eq!(lost, 0);
        let expected: Vec<_> = (0..20).map(|index| (time_of(index), 1, frame(index))).collect();
        assert_eq!(frames, expected);
    }

    #[test]
    fn each_pcapng_interface_has_its_own_link_type_resolution_and_offset() {
        let mut file = section_header(false);
        file.extend(interface(1, &[option(OPTION_TSRESOL, &[9])]));
        file.extend(interface(101, &[option(OPTION_TSOFFSET, &1000i64.to_le_bytes())]));
        file.extend(interface(113, &[option(2, b"eth0"), option(OPTION_TSRESOL, &[0x80 | 10])]));
        file.extend(packet(0, microseconds(0) * 1000, &frame(0)));
        file.extend(packet(1, microseconds(1) - 1_000_000_000, &frame(1)));
        file.extend(packet(2, 1024 * 1_700_000_000 + 512, &frame(2)));
        let (frames, lost, _) = read_bytes(file);
        assert_eq!(lost, 0);
        assert_eq!(frames[0], (microseconds(0) as f64 * 1000.0 / 1e9, 1, frame(0)));
        assert_eq!(frames[1], (1000.0 + (microseconds(1) - 1_000_000_000) as f64 / 1e6, 101, frame(1)));
        assert_eq!(frames[2], (1_700_000_000.5, 113, frame(2)));
        assert!((frames[1].0 - time_of(1)).abs() < 1e-6);
    }

    #[test]
    fn ticks_per_second_are_exactly_pythons() {
        for exponent in 0..128u8 {
            assert_eq!(power_of_ten(exponent), format!("1e{exponent}").parse::<f64>().unwrap());
        }
        assert_eq!(power_of_ten(22), 1e22);
        assert_eq!(power_of_ten(23), 1e23);
    }

    #[test]
    fn a_big_endian_section_after_a_little_endian_one_numbers_its_own_interfaces() {
        let mut file = pcapng(3, |_| None);
        file.extend(section_header(true));
        let mut description = 101u16.to_be_bytes().to_vec();
        description.extend_from_slice(&[0; 6]);
        file.extend(block(true, BLOCK_IDB, &description));
        file.extend(packet_in(true, 0, microseconds(3), &frame(3)));
        file.extend(packet_in(true, 1, microseconds(4), &frame(4)));
        let (frames, lost, losses) = read_bytes(file);
        assert_eq!(frames.iter().map(|frame| frame.1).collect::<Vec<_>>(), [1, 1, 1, 101]);
        assert_eq!(frames[3], (time_of(3), 101, frame(3)));
        assert_eq!((lost, losses), (1, vec![("packets of an interface the file never described".into(), 1)]));
    }

    #[test]
    fn obsolete_packet_blocks_are_read_and_simple_ones_counted() {
        let file = pcapng(6, |index| match index {
            1 => {
                let mut body = 0u16.to_le_bytes().to_vec();
                body.extend_from_slice(&[0, 0]);
                let ticks = microseconds(1);
                for value in [(ticks >> 32) as u32, ticks as u32, 50, 50] {
                    body.extend_from_slice(&value.to_le_bytes());
                }
                body.extend(frame(1).iter().cycle().take(50));
                Some(block(false, BLOCK_PB, &body))
            }
            2 | 4 => Some(block(false, BLOCK_SPB, &[&(40u32.to_le_bytes())[..], &frame(2)[..40]].concat())),
            3 => Some([block(false, 5, &[0; 20]), block(false, 0x0BAD, &[1; 7]), packet(0, microseconds(3), &frame(3))]
                .concat()),
            _ => None,
        });
        let (frames, lost, losses) = read_bytes(file);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[1].0, time_of(1));
        assert_eq!(frames[1].2.len(), 50);
        assert_eq!((lost, losses), (2, vec![("Simple Packet Blocks, which carry no timestamp".into(), 2)]));
    }

    #[test]
    fn packets_that_cannot_be_used_alone_are_counted_and_skipped() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (packet(5, microseconds(0), &frame(0)), "packets of an interface the file never described"),
            (block(false, BLOCK_EPB, &[0; 16]), "packet blocks too short for their header"),
            ({
                let mut body = Vec::new();
                for value in [0u32, 0, 0, 100, 100] {
                    body.extend_from_slice(&value.to_le_bytes());
                }
                body.extend_from_slice(&[0; 40]);
                block(false, BLOCK_EPB, &body)
            }, "packet blocks shorter than the packet they hold"),
            (packet(0, FIRST_UNREPRESENTABLE_SECOND * 1_000_000, &frame(0)), "packet times before 1970 or after 9999"),
            (packet(0, (i64::MAX as u64 / 1_000_000) * 1_000_000, &frame(0)), "packet times before 1970 or after 9999"),
        ];
        for (replacement, reason) in cases {
            let (frames, lost, losses) = read_bytes(pcapng(5, |index| (index == 3).then(|| replacement.clone())));
            assert_eq!((frames.len(), lost), (4, 1), "{reason}");
            assert_eq!(losses, [(reason.to_string(), 1)]);
        }
        let last = packet(0, (FIRST_UNREPRESENTABLE_SECOND - 1) * 1_000_000, &frame(0));
        assert_eq!(read_bytes(pcapng(5, |index| (index == 0).then(|| last.clone()))).0.len(), 5);
    }

    #[test]
    fn a_negative_offset_takes_packets_before_1970() {
        let mut file = section_header(false);
        file.extend(interface(1, &[option(OPTION_TSOFFSET, &(-1_000_000_000_000i64).to_le_bytes())]));
        for index in 0..4 {
            file.extend(packet(0, microseconds(index), &frame(index)));
        }
        let (frames, lost, _) = read_bytes(file);
        assert_eq!((frames.len(), lost), (0, 4));
    }

    #[test]
    fn a_pcapng_cut_inside_its_last_block_counts_it() {
        let whole = pcapng(5, |_| None);
        let last = u32::from_le_bytes(whole[whole.len() - 4..].try_into().unwrap()) as usize;
        for cut in 1..last {
            let (frames, lost, losses) = read_bytes(whole[..whole.len() - last + cut].to_vec());
            assert_eq!((frames.len(), lost), (4, 1), "{cut}");
            assert_eq!(losses[0].0, "the file ends inside a record");
        }
    }

    #[test]
    fn a_pcapng_block_that_cannot_be_trusted_stops_the_reading() {
        let first_packet = section_header(false).len() + interface(1, &[]).len();
        let second_packet = first_packet + packet(0, 0, &frame(0)).len();
        let second_end = second_packet + packet(0, 0, &frame(1)).len();
        let with = |at: usize, bytes: &[u8]| {
            let mut file = pcapng(5, |_| None);
            file[at..at + bytes.len()].copy_from_slice(bytes);
            file
        };
        let short_description = [section_header(false), block(false, BLOCK_IDB, &[1, 0, 0, 0])].concat();
        let bad_section = [pcapng(2, |_| None), block(false, BLOCK_SHB, &[0; 16])].concat();
        for (file, reason, kept) in [
            (with(second_packet + 4, &7u32.to_le_bytes()), "a block claims 7 bytes", 1),
            (with(second_packet + 4, &(MAX_BLOCK + 4).to_le_bytes()), "a block claims 16777220 bytes", 1),
            (with(second_packet + 4, &4u32.to_le_bytes()), "a block claims 4 bytes", 1),
            (with(second_end - 4, &0u32.to_le_bytes()), "a block whose two lengths differ", 1),
            (short_description, "an interface description too short for its header", 0),
            (bad_section, "a section header without its byte-order magic", 2),
        ] {
            let (frames, lost, losses) = read_bytes(file);
            assert_eq!((frames.len(), lost), (kept, 1), "{reason}");
            assert_eq!(losses[0].0, format!("{reason}; the rest of the file is not read"));
        }
    }

    #[test]
    fn pcapng_interfaces_of_link_types_the_agent_does_not_decode() {
        let file = [section_header(false), interface(220, &[]), packet(0, 1, &[0; 64])].concat();
        assert_eq!(open_error(file),
                   "test.pcap: link type 220 is not one the agent decodes (Ethernet, Linux SLL/SLL2, raw IP, BSD loopback)");
        let mixed = [section_header(false), interface(1, &[]), interface(220, &[]), packet(1, 1, &[0; 40]),
                     packet(0, 2, &frame(0))].concat();
        assert_eq!(read_bytes(mixed).0.iter().map(|frame| frame.1).collect::<Vec<_>>(), [220, 1]);
        let no_packets = [section_header(false), interface(1, &[])].concat();
        assert_eq!(read_bytes(no_packets).1, 0);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_cut_or_damaged_keeps_what_came_before_and_counts_one_loss() {
        let plain = pcap(false, false, 1, &records(3000));
        let (whole, _, _) = read_bytes(plain.clone());
        let packed = gzip(&plain);
        let mut two_members = gzip(&plain[..5000]);
        two_members.extend(gzip(&plain[5000..]));
        assert_eq!(read_bytes(packed.clone()), (whole.clone(), 0, vec![]));
        assert_eq!(read_bytes(two_members), (whole.clone(), 0, vec![]));
        let mut opened = 0;
        for length in (2..packed.len()).step_by(997).chain([packed.len() - 1]) {
            let capture = match CaptureFile::from_bytes("test.pcap.gz", packed[..length].to_vec()) {
                Ok(capture) => capture,
                Err(error) => {
                    assert!(error.to_string().starts_with("test.pcap.gz: unreadable capture ("), "{error}");
                    continue;
                }
            };
            opened += 1;
            let (frames, lost, losses) = read_all(capture);
            assert_eq!(lost, 1, "{length}");
            assert!(losses[0].0.starts_with("unreadable from here on (compressed file ended"));
            assert_eq!(frames, whole[..frames.len()]);
        }
        assert!(opened > 10);
        assert_eq!(read_bytes(packed[..packed.len() - 1].to_vec()).0.len(), 3000);
        for position in (10..packed.len()).step_by(501) {
            let mut flipped = packed.clone();
            flipped[position] ^= 0xFF;
            if let Ok(capture) = CaptureFile::from_bytes("test.pcap.gz", flipped) {
                assert!(read_all(capture).1 <= 1);
            }
        }
    }

    #[test]
    fn the_recorded_fixtures_read_the_same_in_every_format() {
        let read = |name: &str| read_all(CaptureFile::open(&fixture(name)).expect("a fixture"));
        let (pcap, lost, _) = read("nginx-basic.pcap");
        assert_eq!((pcap.len(), lost), (204, 0));
        assert_eq!(read("nginx-basic-ng.pcapng"), (pcap.clone(), 0, vec![]));
        assert_eq!(read("nginx-basic-gz.pcap.gz"), (pcap, 0, vec![]));
    }

    #[test]
    fn only_regular_files_are_read() {
        let directory = std::env::temp_dir();
        let message = |path: &Path| match CaptureFile::open(path) {
            Ok(_) => panic!("opened {path:?}"),
            Err(error) => error.to_string(),
        };
        assert_eq!(message(&directory),
                   format!("{}: not a regular file; --read takes a pcap or pcapng file (optionally .gz)", directory.display()));
        let missing = directory.join("no-such-capture.pcap");
        assert_eq!(message(&missing), format!("{}: cannot open (No such file or directory)", missing.display()));
    }
}
