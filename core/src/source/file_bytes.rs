//! The bytes of a capture file, a megabyte at a time, inflated when it is gzip-compressed.
//!
//! Damaged or cut-short gzip data is reported only after everything before the damage was handed over, so
//! that the capture reader can keep the good records and count the rest. The gzip framing (header, trailer,
//! members one after another) is read here around flate2's raw inflater because its readers return an
//! error *instead of* the output of the read that met the damage; the raw inflater keeps that output.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use flate2::{Crc, Decompress, FlushDecompress, Status};

pub(crate) const CHUNK: usize = 1 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// What one inflater call may write: a call that meets damage keeps its output, so this only bounds how
/// far past a megabyte a chunk may go.
const INFLATE_PIECE: usize = 64 << 10;

/// The path names something other than a regular file (a FIFO, a directory, a device).
#[derive(Debug)]
pub(crate) enum OpenError {
    NotARegularFile,
    Os(io::Error),
}

/// Opened non-blocking (a FIFO without a writer would block the open itself) and checked with fstat
/// before any read: a replay reads the file more than once (a check, then each worker).
pub(crate) fn open_regular_file(path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(OpenError::Os)?;
    if !file.metadata().map_err(OpenError::Os)?.is_file() {
        return Err(OpenError::NotARegularFile);
    }
    Ok(file)
}

/// An error's text without Rust's " (os error N)" suffix (what strerror says, as the Python shows it),
/// on one line.
pub(crate) fn os_message(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match error.raw_os_error() {
        Some(code) => text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text).to_owned(),
        None => text,
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(crate) type Source = Box<dyn Read + Send + Sync>;

enum Decoding {
    Undecided,
    Plain,
    Gzip(Box<Gzip>),
}

/// The file's bytes, about a megabyte per `read_chunk`, inflated if the file starts as gzip does.
pub(crate) struct FileBytes {
    source: Source,
    decoding: Decoding,
}

impl FileBytes {
    pub(crate) fn new(source: Source) -> FileBytes {
        FileBytes { source, decoding: Decoding::Undecided }
    }

    /// Appends the next chunk to `out`: Ok(false) at the end, Err(reason) once the rest cannot be read
    /// (whatever came before the damage was appended by an earlier call).
    pub(crate) fn read_chunk(&mut self, out: &mut Vec<u8>) -> Result<bool, String> {
        match &mut self.decoding {
            Decoding::Plain => read_raw(&mut self.source, out).map_err(|error| os_message(&error)),
            Decoding::Gzip(gzip) => gzip.read_chunk(&mut self.source, out),
            Decoding::Undecided => {
                let start = out.len();
                let more = read_raw(&mut self.source, out).map_err(|error| os_message(&error))?;
                if out[start..].starts_with(&GZIP_MAGIC) {
                    let input = out.split_off(start);
                    let mut gzip = Box::new(Gzip::new(input));
                    let more = gzip.read_chunk(&mut self.source, out);
                    self.decoding = Decoding::Gzip(gzip);
                    return more;
                }
                self.decoding = Decoding::Plain;
                Ok(more)
            }
        }
    }
}

/// Up to a megabyte of the file appended to `out`; false at its end.
fn read_raw(source: &mut Source, out: &mut Vec<u8>) -> io::Result<bool> {
    Ok(source.take(CHUNK as u64).read_to_end(out)? > 0)
}

/// Concatenated gzip members (what `cat a.gz b.gz` makes), inflated into the caller's buffer.
struct Gzip {
    input: Vec<u8>,
    position: usize,
    /// None between members: a new one starts only if more input follows.
    member: Option<Member>,
    /// The damage found after the output before it was handed over; reported by the next call.
    damage: Option<String>,
    finished: bool,
    /// The inflater writes here, then the bytes are appended: a bounded write without unsafe code.
    piece: Box<[u8]>,
}

impl Gzip {
    fn new(input: Vec<u8>) -> Gzip {
        Gzip { input, position: 0, member: None, damage: None, finished: false, piece: vec![0; INFLATE_PIECE].into() }
    }

    fn read_chunk(&mut self, source: &mut Source, out: &mut Vec<u8>) -> Result<bool, String> {
        if let Some(damage) = self.damage.take() {
            return Err(damage);
        }
        if self.finished {
            return Ok(false);
        }
        let start = out.len();
        loop {
            if self.position == self.input.len() {
                self.input.clear();
                self.position = 0;
                match read_raw(source, &mut self.input) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.finished = true;
                        if self.member.is_some() {
                            self.damage =
                                Some("compressed file ended before the end-of-stream marker was reached".into());
                        }
                        return Ok(out.len() > start || self.damage.is_some());
                    }
                    Err(error) => {
                        self.finished = true;
                        self.damage = Some(os_message(&error));
                        return Ok(true);
                    }
                }
            }
            let member = self.member.get_or_insert_with(Member::new);
            match member.feed(&self.input[self.position..], &mut self.piece, out) {
                Ok((consumed, ended)) => {
                    self.position += consumed;
                    if ended {
                        self.member = None; // another member may follow
                    }
                }
                Err(damage) => {
                    self.finished = true;
                    self.damage = Some(format!("invalid gzip data: {damage}"));
                    return Ok(true);
                }
            }
            if out.len() - start >= CHUNK {
                return Ok(true);
            }
        }
    }
}

const FLAG_HEADER_CRC: u8 = 0x02;
const FLAG_EXTRA: u8 = 0x04;
const FLAG_NAME: u8 = 0x08;
const FLAG_COMMENT: u8 = 0x10;
const FLAGS_RESERVED: u8 = 0xE0;
/// The optional header fields in the order they come.
const HEADER_FIELDS: [u8; 4] = [FLAG_EXTRA, FLAG_NAME, FLAG_COMMENT, FLAG_HEADER_CRC];

/// Where a member's reading is; the header is read a byte at a time so that no field, however long,
/// has to be held whole.
enum Stage {
    /// The 10 fixed bytes: magic, method, flags, time, extra flags, system.
    Fixed { have: u8, flags: u8 },
    ExtraLength { have: u8, length: u16 },
    Extra { remaining: u16 },
    Name,
    Comment,
    HeaderCrc { have: u8, value: u16 },
    Deflate,
    Trailer { have: u8, bytes: [u8; 8] },
}

struct Member {
    stage: Stage,
    flags: u8,
    header_crc: Crc,
    inflater: Decompress,
    data_crc: Crc,
}

impl Member {
    fn new() -> Member {
        Member {
            stage: Stage::Fixed { have: 0, flags: 0 },
            flags: 0,
            header_crc: Crc::new(),
            inflater: Decompress::new(false),
            data_crc: Crc::new(),
        }
    }

    /// The header field that follows `done` (0 after the fixed bytes), skipping those the flags leave out.
    fn next_field(&self, done: u8) -> Stage {
        let after = HEADER_FIELDS.iter().position(|&field| field == done).map_or(0, |index| index + 1);
        match HEADER_FIELDS[after..].iter().find(|&&field| self.flags & field != 0) {
            Some(&FLAG_EXTRA) => Stage::ExtraLength { have: 0, length: 0 },
            Some(&FLAG_NAME) => Stage::Name,
            Some(&FLAG_COMMENT) => Stage::Comment,
            Some(_) => Stage::HeaderCrc { have: 0, value: 0 },
            None => Stage::Deflate,
        }
    }

    /// Consumes what it can of `input`, appending inflated bytes to `out`: (bytes consumed, whether the
    /// member ended), or what is wrong with it.
    fn feed(&mut self, input: &[u8], piece: &mut [u8], out: &mut Vec<u8>) -> Result<(usize, bool), &'static str> {
        let mut consumed = 0;
        while consumed < input.len() {
            if matches!(self.stage, Stage::Deflate) {
                let (used, ended) = self.inflate(&input[consumed..], piece, out)?;
                consumed += used;
                if !ended {
                    return Ok((consumed, false)); // a piece was written: the caller may hand it over first
                }
                self.stage = Stage::Trailer { have: 0, bytes: [0; 8] };
                continue;
            }
            let byte = input[consumed];
            consumed += 1;
            if self.header_byte(byte)? {
                return Ok((consumed, true));
            }
        }
        Ok((consumed, false))
    }

    /// One byte of the header or trailer; true once the trailer is complete and checked.
    fn header_byte(&mut self, byte: u8) -> Result<bool, &'static str> {
        if !matches!(self.stage, Stage::HeaderCrc { .. } | Stage::Trailer { .. }) {
            self.header_crc.update(&[byte]);
        }
        self.stage = match self.stage {
            Stage::Fixed { have, flags } => {
                match (have, byte) {
                    (0, 0x1f) | (1, 0x8b) | (2, 8) | (4..=9, _) => {}
                    (0 | 1, _) => return Err("incorrect header check"),
                    (2, _) => return Err("unknown compression method"),
                    (3, _) if byte & FLAGS_RESERVED != 0 => return Err("unknown header flags set"),
                    _ => {}
                }
                let flags = if have == 3 { byte } else { flags };
                if have < 9 {
                    Stage::Fixed { have: have + 1, flags }
                } else {
                    self.flags = flags;
                    self.next_field(0)
                }
            }
            Stage::ExtraLength { have: 0, .. } => Stage::ExtraLength { have: 1, length: u16::from(byte) },
            Stage::ExtraLength { length, .. } => match length | u16::from(byte) << 8 {
                0 => self.next_field(FLAG_EXTRA),
                remaining => Stage::Extra { remaining },
            },
            Stage::Extra { remaining: 1 } => self.next_field(FLAG_EXTRA),
            Stage::Extra { remaining } => Stage::Extra { remaining: remaining - 1 },
            Stage::Name if byte == 0 => self.next_field(FLAG_NAME),
            Stage::Comment if byte == 0 => self.next_field(FLAG_COMMENT),
            Stage::Name => Stage::Name,
            Stage::Comment => Stage::Comment,
            Stage::HeaderCrc { have: 0, .. } => Stage::HeaderCrc { have: 1, value: u16::from(byte) },
            Stage::HeaderCrc { value, .. } => {
                if value | u16::from(byte) << 8 != self.header_crc.sum() as u16 {
                    return Err("header crc mismatch");
                }
                Stage::Deflate
            }
            Stage::Deflate => Stage::Deflate, // never: `feed` inflates instead
            Stage::Trailer { have, mut bytes } => {
                bytes[usize::from(have)] = byte;
                if have < 7 {
                    Stage::Trailer { have: have + 1, bytes }
                } else {
                    if u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) != self.data_crc.sum() {
                        return Err("incorrect data check");
                    }
                    if u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != self.data_crc.amount() {
                        return Err("incorrect length check");
                    }
                    return Ok(true);
                }
            }
        };
        Ok(false)
    }

    /// Inflates at most a piece, appended to `out`: (bytes consumed, whether the deflate stream ended).
    /// What was inflated before damage is appended too.
    fn inflate(&mut self, input: &[u8], piece: &mut [u8], out: &mut Vec<u8>) -> Result<(usize, bool), &'static str> {
        let (read_before, written_before) = (self.inflater.total_in(), self.inflater.total_out());
        let status = self.inflater.decompress(input, piece, FlushDecompress::None);
        let used = (self.inflater.total_in() - read_before) as usize;
        let written = piece.get(..(self.inflater.total_out() - written_before) as usize).unwrap_or_default();
        self.data_crc.update(written);
        out.extend_from_slice(written);
        match status {
            Ok(Status::StreamEnd) => Ok((used, true)),
            Ok(_) if used == 0 && written.is_empty() => Err("invalid compressed data"), // no progress
            Ok(_) => Ok((used, false)),
            Err(_) => Err("invalid compressed data"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::{Compression, GzBuilder};
    use std::io::{Cursor, Write};

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// Every chunk until the end or the damage: (bytes, the damage if any, the chunk sizes).
    fn read_all(file: Vec<u8>) -> (Vec<u8>, Option<String>, Vec<usize>) {
        let mut bytes = FileBytes::new(Box::new(Cursor::new(file)));
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let before = out.len();
            match bytes.read_chunk(&mut out) {
                Ok(true) => sizes.push(out.len() - before),
                Ok(false) => return (out, None, sizes),
                Err(damage) => return (out, Some(damage), sizes),
            }
        }
    }

    fn data(size: usize) -> Vec<u8> {
        (0..size).map(|index| (index * 7 % 251) as u8).collect()
    }

    #[test]
    fn plain_files_come_a_megabyte_at_a_time() {
        let (out, damage, sizes) = read_all(data(CHUNK * 2 + 5));
        assert_eq!((out, damage, sizes), (data(CHUNK * 2 + 5), None, vec![CHUNK, CHUNK, 5]));
        assert_eq!(read_all(Vec::new()), (Vec::new(), None, vec![]));
        assert_eq!(read_all(vec![0x1f]), (vec![0x1f], None, vec![1]));
    }

    #[test]
    fn gzip_members_one_after_another_read_as_one_file() {
        let plain = data(300_000);
        let mut file = gzip(&plain[..1000]);
        file.extend(gzip(&plain[1000..]));
        file.extend(gzip(b""));
        assert_eq!(read_all(file), (plain, None, vec![300_000]));
    }

    #[test]
    fn optional_header_fields_are_skipped_and_the_header_crc_checked() {
        let plain = data(5000);
        let mut encoder = GzBuilder::new().filename("capture.pcap").comment("from a test").extra(vec![1, 2, 3])
            .write(Vec::new(), Compression::fast());
        encoder.write_all(&plain).unwrap();
        let mut file = encoder.finish().unwrap();
        assert_eq!(read_all(file.clone()).0, plain);
        // the same with a header CRC: flags |= FHCRC and the CRC16 inserted after the comment
        let header_end = 10 + 2 + 3 + "capture.pcap".len() + 1 + "from a test".len() + 1;
        file[3] |= FLAG_HEADER_CRC;
        let crc = { let mut crc = Crc::new(); crc.update(&file[..header_end]); crc.sum() as u16 };
        file.splice(header_end..header_end, crc.to_le_bytes());
        assert_eq!(read_all(file.clone()).0, plain);
        file[header_end] ^= 1;
        assert_eq!(read_all(file).1.as_deref(), Some("invalid gzip data: header crc mismatch"));
    }

    #[test]
    fn a_highly_compressible_file_is_inflated_a_megabyte_at_a_time() {
        let (out, damage, sizes) = read_all(gzip(&vec![0; 20 * CHUNK]));
        assert_eq!((out.len(), damage), (20 * CHUNK, None));
        assert!(sizes.iter().all(|&size| size < CHUNK + INFLATE_PIECE), "{sizes:?}");
    }

    #[test]
    fn a_gzip_cut_short_keeps_everything_before_the_cut() {
        let plain = data(200_000);
        let whole = gzip(&plain);
        for length in [3, 10, 11, 100, whole.len() / 2, whole.len() - 8, whole.len() - 1] {
            let (out, damage, _) = read_all(whole[..length].to_vec());
            assert_eq!(damage.as_deref(), Some("compressed file ended before the end-of-stream marker was reached"));
            assert_eq!(out, plain[..out.len()], "{length}");
            if length >= whole.len() - 8 {
                assert_eq!(out, plain);
            }
        }
    }

    #[test]
    fn damage_is_named_after_what_came_before_it() {
        let plain = data(100_000);
        let whole = gzip(&plain);
        let mut bad_crc = whole.clone();
        let at = bad_crc.len() - 8;
        bad_crc[at] ^= 1;
        let mut bad_length = whole.clone();
        let at = bad_length.len() - 1;
        bad_length[at] ^= 1;
        let mut trailing = whole.clone();
        trailing.extend_from_slice(&[0, 0, 0, 0]);
        let mut method = whole.clone();
        method[2] = 7;
        let mut flags = whole.clone();
        flags[3] = 0x80;
        for (file, expected) in [(bad_crc, "incorrect data check"), (bad_length, "incorrect length check"),
                                 (trailing, "incorrect header check"), (method, "unknown compression method"),
                                 (flags, "unknown header flags set")] {
            let (out, damage, _) = read_all(file);
            assert_eq!(damage, Some(format!("invalid gzip data: {expected}")));
            assert_eq!(out, plain[..out.len()]);
        }
        let mut flipped = whole;
        flipped[40] ^= 0xFF;
        assert!(read_all(flipped).1.is_some());
    }

    #[test]
    fn only_regular_files_open() {
        let directory = std::env::temp_dir();
        assert!(matches!(open_regular_file(&directory), Err(OpenError::NotARegularFile)));
        match open_regular_file(&directory.join("no-such-capture.pcap")) {
            Err(OpenError::Os(error)) => assert_eq!(os_message(&error), "No such file or directory"),
            _ => panic!("opened a missing file"),
        }
    }
}
