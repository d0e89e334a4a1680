//! The kernel's TPACKET_V3 receive ring, mapped from a socket the control plane set up.
//!
//! The kernel fills whole blocks of packets and hands each block over by flipping its status word, so a
//! block of thousands of packets costs one wake-up instead of one system call per packet. The Python
//! control plane sets the socket up (version, filter, ring size, bind, a fanout group for several); this
//! maps the ring from the socket's descriptor and reads it. The map does not keep the descriptor: a
//! process that only watches how full the ring is (a forked watcher) keeps the map alone.
//!
//! A ring can outlive the process that read it (a service manager keeps the socket across a restart), so
//! a map starts where the kernel's hand-over is: at the oldest block handed over and not read, or at the
//! block being filled. Blocks are numbered by the kernel as it opens them, which orders them.
//!
//! This is the one module with `unsafe`: the ring is memory the kernel writes. Every offset the kernel's
//! headers give is checked against the block before it is read.

use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::capture_file::Frame;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;

// struct tpacket_block_desc: version, offset_to_priv, then struct tpacket_hdr_v1: block_status, num_pkts,
// offset_to_first_pkt, blk_len, seq_num, ts_first_pkt, ts_last_pkt (48 bytes in all).
const BLOCK_STATUS: usize = 8;
const BLOCK_PACKETS: usize = 12;
const BLOCK_FIRST_PACKET: usize = 16;
const BLOCK_SEQUENCE: usize = 24; // the kernel numbers blocks from 1 as it opens them; never opened: 0
const BLOCK_HEADER: usize = 48;
// struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac, tp_net, ...
const PACKET_HEADER: usize = 28;

/// One mapped ring. Blocks are read in the order the kernel fills them.
pub struct Ring {
    /// The map's start, page-aligned; null once unmapped.
    base: *mut u8,
    block_bytes: usize,
    block_count: usize,
    linktype: u32,
    /// The block the kernel hands over next.
    next: usize,
    /// The kernel's number of the last block read (0 before the first).
    pub last_sequence: u64,
    /// Blocks read are left handed over, for the next reader of the socket to read again (a stop that
    /// finishes what is in flight reads past the point where its successor begins).
    pub leave_read_blocks: bool,
    /// Frames the kernel cut (larger than a block), or that a block's headers placed outside it: counted,
    /// never handed over silently short.
    pub truncated: u64,
}

// SAFETY: the map belongs to this Ring alone (nothing else in the process holds its address), so it may
// move to another thread with it.
unsafe impl Send for Ring {}
// SAFETY: `&self` methods only load the blocks' status and count words, through atomics; every access that
// reads or hands back a block takes `&mut self`, so sharing a `&Ring` between threads is sound.
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps the ring of `fd`, a packet socket whose PACKET_RX_RING was set to `block_count` blocks of
    /// `block_bytes`; its frames are reported with `linktype`.
    pub fn map(fd: RawFd, block_bytes: usize, block_count: usize, linktype: u32) -> io::Result<Ring> {
        let size = block_bytes.checked_mul(block_count).filter(|_| block_bytes >= BLOCK_HEADER && block_count > 0);
        let Some(size) = size.filter(|_| block_bytes.is_multiple_of(8)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: a null hint makes the kernel pick fresh addresses, so no existing memory is touched; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let (next, last_sequence, leave_read_blocks, truncated) = (0, 0, false, 0);
        let mut ring = Ring { base: base.cast(), block_bytes, block_count, linktype, next, last_sequence, leave_read_blocks, truncated };
        ring.next = ring.handed_over_next();
        Ok(ring)
    }

    /// Where reading starts: the oldest block handed over and not read yet (a previous reader of the socket
    /// may have left some), else the block the kernel opened last, which it is filling. A fresh ring: block 0.
    /// The block being filled is found first: the kernel hands a block over and then opens the next, so a
    /// look at the ready blocks first could miss one handed over meanwhile and start past it.
    fn handed_over_next(&self) -> usize {
        let being_filled = (0..self.block_count).rev().max_by_key(|&block| self.sequence(block)).unwrap_or(0);
        let oldest_ready = (0..self.block_count).filter(|&block| self.is_ready(block)).min_by_key(|&block| self.sequence(block));
        oldest_ready.unwrap_or(being_filled)
    }

    /// The kernel's number of `block` (0 if never opened, or unmapped).
    fn sequence(&self, block: usize) -> u64 {
        if self.base.is_null() || block >= self.block_count {
            return 0;
        }
        // `block < block_count` and `BLOCK_SEQUENCE + 8 <= BLOCK_HEADER <= block_bytes`: the word lies in the
        // map; the map is page-aligned and block_bytes a multiple of 8, so the word is 8-aligned.
        // SAFETY: an in-bounds, aligned word of a live map, which the kernel writes concurrently: atomic only.
        unsafe { AtomicU64::from_ptr(self.base.add(block * self.block_bytes + BLOCK_SEQUENCE).cast()) }.load(Ordering::Acquire)
    }

    /// The number of the block the kernel opened last: once a block of at least this number has been read,
    /// every packet captured before this call has been read.
    pub fn current_sequence(&self) -> u64 {
        (0..self.block_count).map(|block| self.sequence(block)).max().unwrap_or(0)
    }

    /// The words at `offset` (a multiple of 4 below BLOCK_HEADER) of every block's header, or none once
    /// unmapped.
    fn header_word(&self, block: usize, offset: usize) -> Option<&AtomicU32> {
        if self.base.is_null() || block >= self.block_count {
            return None;
        }
        // `block < block_count` and `offset + 4 <= BLOCK_HEADER <= block_bytes`, so the word lies in the map,
        // which lives as long as `self`; the map is page-aligned, block_bytes a multiple of 8 and offset of 4.
        // SAFETY: an in-bounds, 4-aligned word of a live map; the kernel and other processes change it
        // concurrently, which is why it is only ever touched through an atomic.
        Some(unsafe { AtomicU32::from_ptr(self.base.add(block * self.block_bytes + offset).cast()) })
    }

    fn is_ready(&self, block: usize) -> bool {
        self.header_word(block, BLOCK_STATUS)
            .is_some_and(|status| status.load(Ordering::Acquire) & TP_STATUS_USER != 0)
    }

    /// Hands every frame of the next block to `on_frame`, then gives the block back to the kernel.
    /// Returns how many frames it held, or None when the next block is not ready yet.
    pub fn next_block(&mut self, mut on_frame: impl FnMut(Frame<'_>)) -> Option<usize> {
        // Acquire pairs with the kernel's barrier before it sets the status: the block's contents are
        // visible once the status says it is ours.
        if !self.is_ready(self.next) {
            return None;
        }
        // The block lies in the map (`next < block_count`, checked by `is_ready`); another process sharing
        // the map only reads the status word.
        // SAFETY: while the status says TP_STATUS_USER the kernel writes none of the block, until the status
        // is set back below, after this slice's last use.
        let block = unsafe { std::slice::from_raw_parts(self.base.add(self.next * self.block_bytes), self.block_bytes) };
        let word = |offset: usize| {
            block.get(offset..offset + 4).map(|bytes| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        };
        let count = word(BLOCK_PACKETS).unwrap_or(0) as usize;
        let mut position = word(BLOCK_FIRST_PACKET).unwrap_or(0) as usize;
        let mut handed = 0;
        while handed < count {
            let frame = block.get(position..position + PACKET_HEADER).and_then(|header| {
                let field = |at: usize| u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
                let (seconds, nanoseconds, captured, length) = (field(4), field(8), field(12) as usize, field(16));
                let start = position + usize::from(u16::from_ne_bytes([header[24], header[25]]));
                let data = block.get(start..start.checked_add(captured)?)?;
                Some((field(0) as usize, f64::from(seconds) + f64::from(nanoseconds) * 1e-9, data, captured as u64 != u64::from(length)))
            });
            let Some((next_offset, time, data, cut)) = frame else {
                self.truncated += (count - handed) as u64; // headers pointing outside the block
                break;
            };
            // a frame the kernel cut is counted in `truncated` (above the decoder's counters), as before
            on_frame(Frame { time, linktype: self.linktype, data, wire_length: data.len() });
            self.truncated += u64::from(cut);
            handed += 1;
            if handed < count && next_offset < PACKET_HEADER {
                self.truncated += (count - handed) as u64; // a count the packets' offsets do not bear out
                break;
            }
            position += next_offset;
        }
        self.last_sequence = self.sequence(self.next);
        // Release: our reads of the block happen before the kernel may refill it.
        if let Some(status) = self.header_word(self.next, BLOCK_STATUS).filter(|_| !self.leave_read_blocks) {
            status.store(TP_STATUS_KERNEL, Ordering::Release);
        }
        self.next = (self.next + 1) % self.block_count;
        Some(handed)
    }

    /// How full the ring is: the share of blocks handed over and not yet read.
    pub fn ready_fraction(&self) -> f64 {
        if self.base.is_null() {
            return 0.0;
        }
        let ready = (0..self.block_count).filter(|&block| self.is_ready(block)).count();
        ready as f64 / self.block_count as f64
    }

    /// Packets in blocks handed over but not read yet (what a stop would leave unread).
    pub fn pending_packets(&self) -> u64 {
        (0..self.block_count)
            .filter(|&block| self.is_ready(block))
            .filter_map(|block| self.header_word(block, BLOCK_PACKETS))
            .map(|count| u64::from(count.load(Ordering::Relaxed)))
            .sum()
    }

    /// Unmaps the ring (also done on drop); afterwards no block is ever ready.
    pub fn unmap(&mut self) {
        if !self.base.is_null() {
            // SAFETY: `base` and the size are those mmap returned, and no slice into the map outlives a
            // `next_block` call, so nothing refers to the memory any more.
            unsafe { libc::munmap(self.base.cast(), self.block_bytes * self.block_count) };
            self.base = ptr::null_mut();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    const BLOCK: usize = 4096;

    /// A block as the kernel lays it out: (seconds, nanoseconds, frame, original length) packets.
    fn block(ready: bool, packets: &[(u32, u32, &[u8], u32)]) -> Vec<u8> {
        let mut bytes = vec![0u8; BLOCK];
        let put = |bytes: &mut Vec<u8>, at: usize, value: u32| bytes[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        put(&mut bytes, 0, 3);
        put(&mut bytes, BLOCK_STATUS, u32::from(ready));
        put(&mut bytes, BLOCK_PACKETS, packets.len() as u32);
        put(&mut bytes, BLOCK_FIRST_PACKET, BLOCK_HEADER as u32);
        let mut position = BLOCK_HEADER;
        for (index, (seconds, nanoseconds, frame, length)) in packets.iter().enumerate() {
            let mac = 32 + 2; // the kernel aligns the network header; the frame starts at tp_mac
            let next = if index + 1 == packets.len() { 0 } else { (mac + frame.len()).next_multiple_of(16) };
            for (at, value) in [(0, next as u32), (4, *seconds), (8, *nanoseconds), (12, frame.len() as u32), (16, *length)] {
                put(&mut bytes, position + at, value);
            }
            bytes[position + 24..position + 26].copy_from_slice(&(mac as u16).to_ne_bytes());
            bytes[position + mac..position + mac + frame.len()].copy_from_slice(frame);
            position += next;
        }
        bytes
    }

    fn ring_file(blocks: &[Vec<u8>]) -> File {
        let path = std::env::temp_dir().join(format!("ring-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for block in blocks {
            file.write_all(block).unwrap();
        }
        file
    }

    fn status_in_file(file: &mut File, block: usize) -> u32 {
        let mut word = [0u8; 4];
        file.seek(SeekFrom::Start((block * BLOCK + BLOCK_STATUS) as u64)).unwrap();
        file.read_exact(&mut word).unwrap();
        u32::from_ne_bytes(word)
    }

    fn frames_of(ring: &mut Ring) -> Option<Vec<(f64, u32, Vec<u8>)>> {
        let mut frames = Vec::new();
        ring.next_block(|frame| frames.push((frame.time, frame.linktype, frame.data.to_vec())))?;
        Some(frames)
    }

    #[test]
    fn ready_blocks_are_read_in_turn_and_handed_back() {
        let mut file = ring_file(&[
            block(true, &[(1_700_000_000, 5, b"first", 5), (1_700_000_001, 999_999_999, b"second frame", 12)]),
            block(true, &[(1_700_000_002, 0, b"third", 5)]),
            block(false, &[]),
        ]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 3, 1).unwrap();
        assert_eq!(ring.ready_fraction(), 2.0 / 3.0);
        assert_eq!(ring.pending_packets(), 3);
        assert_eq!(frames_of(&mut ring).unwrap(), [
            (1_700_000_000.0 + 5.0 * 1e-9, 1, b"first".to_vec()),
            (1_700_000_001.0 + 999_999_999.0 * 1e-9, 1, b"second frame".to_vec()),
        ]);
        assert_eq!(status_in_file(&mut file, 0), TP_STATUS_KERNEL);
        assert_eq!(status_in_file(&mut file, 1), TP_STATUS_USER);
        assert_eq!(frames_of(&mut ring).unwrap().len(), 1);
        assert!(frames_of(&mut ring).is_none(), "the third block is the kernel's");
        assert_eq!((ring.ready_fraction(), ring.pending_packets(), ring.truncated), (0.0, 0, 0));
    }

    /// `block` as the kernel numbered it when it opened it.
    fn numbered(mut block: Vec<u8>, sequence: u64) -> Vec<u8> {
        block[BLOCK_SEQUENCE..BLOCK_SEQUENCE + 8].copy_from_slice(&sequence.to_ne_bytes());
        block
    }

    fn set_status_in_file(file: &mut File, block: usize, status: u32) {
        file.seek(SeekFrom::Start((block * BLOCK + BLOCK_STATUS) as u64)).unwrap();
        file.write_all(&status.to_ne_bytes()).unwrap();
    }

    #[test]
    fn a_ring_left_by_a_previous_reader_is_read_from_its_oldest_block_handed_over() {
        // the kernel wrapped around: block 1 is being filled, blocks 2, 3 and 0 are waiting, oldest first
        let file = ring_file(&[
            numbered(block(true, &[(3, 0, b"third", 5)]), 5),
            numbered(block(false, &[]), 6),
            numbered(block(true, &[(1, 0, b"first", 5)]), 3),
            numbered(block(true, &[(2, 0, b"second", 6)]), 4),
        ]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 4, 1).unwrap();
        assert_eq!(ring.current_sequence(), 6);
        let mut read = Vec::new();
        while let Some(frames) = frames_of(&mut ring) {
            read.push((ring.last_sequence, frames[0].2.clone()));
        }
        assert_eq!(read, [(3, b"first".to_vec()), (4, b"second".to_vec()), (5, b"third".to_vec())]);
    }

    #[test]
    fn with_nothing_waiting_a_ring_left_by_a_previous_reader_is_read_from_the_block_being_filled() {
        let mut file = ring_file(&[
            numbered(block(false, &[]), 7),
            numbered(block(false, &[(9, 0, b"next", 4)]), 8),
            numbered(block(false, &[]), 5),
            numbered(block(false, &[]), 6),
        ]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 4, 1).unwrap();
        assert!(frames_of(&mut ring).is_none());
        set_status_in_file(&mut file, 2, TP_STATUS_USER); // an old block: not the next to come
        assert!(frames_of(&mut ring).is_none());
        set_status_in_file(&mut file, 1, TP_STATUS_USER); // the kernel hands the block it was filling over
        assert_eq!(frames_of(&mut ring).unwrap()[0].2, b"next");
        assert_eq!(ring.last_sequence, 8);
    }

    #[test]
    fn blocks_read_can_be_left_for_the_next_reader() {
        let mut file = ring_file(&[
            numbered(block(true, &[(1, 0, b"first", 5)]), 1),
            numbered(block(true, &[(2, 0, b"second", 6)]), 2),
            numbered(block(false, &[]), 3),
        ]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 3, 1).unwrap();
        assert_eq!(frames_of(&mut ring).unwrap()[0].2, b"first");
        ring.leave_read_blocks = true;
        assert_eq!(frames_of(&mut ring).unwrap()[0].2, b"second");
        assert_eq!((status_in_file(&mut file, 0), status_in_file(&mut file, 1)), (TP_STATUS_KERNEL, TP_STATUS_USER));
        let mut next_reader = Ring::map(file.as_raw_fd(), BLOCK, 3, 1).unwrap();
        assert_eq!(frames_of(&mut next_reader).unwrap()[0].2, b"second");
        assert!(frames_of(&mut next_reader).is_none());
    }

    #[test]
    fn frames_the_kernel_cut_are_counted() {
        let file = ring_file(&[block(true, &[(1, 0, b"cut", 9000), (1, 0, b"whole", 5)]), block(false, &[])]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 2, 113).unwrap();
        assert_eq!(frames_of(&mut ring).unwrap().len(), 2);
        assert_eq!(ring.truncated, 1);
    }

    #[test]
    fn headers_pointing_outside_the_block_are_counted_not_read() {
        let mut past_end = block(true, &[(1, 0, b"one", 3), (1, 0, b"two", 3)]);
        past_end[BLOCK_HEADER..BLOCK_HEADER + 4].copy_from_slice(&(BLOCK as u32).to_ne_bytes());
        let mut long_frame = block(true, &[(1, 0, b"one", 3)]);
        long_frame[BLOCK_HEADER + 12..BLOCK_HEADER + 16].copy_from_slice(&u32::MAX.to_ne_bytes());
        let mut bad_first = block(true, &[(1, 0, b"one", 3)]);
        bad_first[BLOCK_FIRST_PACKET..BLOCK_FIRST_PACKET + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        let mut too_many = block(true, &[(1, 0, b"one", 3)]);
        too_many[BLOCK_PACKETS..BLOCK_PACKETS + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        let file = ring_file(&[past_end, long_frame, bad_first, too_many]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 4, 1).unwrap();
        assert_eq!(frames_of(&mut ring).unwrap().len(), 1);
        assert_eq!(ring.truncated, 1);
        assert_eq!(frames_of(&mut ring).unwrap().len(), 0);
        assert_eq!(frames_of(&mut ring).unwrap().len(), 0);
        assert_eq!(ring.truncated, 3);
        assert_eq!(frames_of(&mut ring).unwrap().len(), 1, "the last packet's zero offset ends the block");
        assert_eq!(ring.truncated, 3 + u64::from(u32::MAX) - 1);
        assert_eq!(ring.ready_fraction(), 0.0);
    }

    #[test]
    fn an_unmapped_ring_has_nothing_ready() {
        let file = ring_file(&[block(true, &[(1, 0, b"one", 3)]), block(true, &[])]);
        let mut ring = Ring::map(file.as_raw_fd(), BLOCK, 2, 1).unwrap();
        ring.unmap();
        ring.unmap();
        assert!(frames_of(&mut ring).is_none());
        assert_eq!((ring.ready_fraction(), ring.pending_packets()), (0.0, 0));
    }

    #[test]
    fn a_ring_that_cannot_be_mapped_is_an_error() {
        assert!(Ring::map(-1, BLOCK, 2, 1).is_err());
        let file = ring_file(&[]);
        assert_eq!(Ring::map(file.as_raw_fd(), 40, 2, 1).err().and_then(|error| error.raw_os_error()), Some(libc::EINVAL));
        assert!(Ring::map(file.as_raw_fd(), BLOCK, 0, 1).is_err());
        assert!(Ring::map(file.as_raw_fd(), usize::MAX / 2 + 8, 4, 1).is_err());
    }
}
