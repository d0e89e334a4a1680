//! Frame decoding: link layer -> IPv4/IPv6 -> TCP. Anything that cannot be made sense of is counted,
//! never raised. (Ported from the Python `agent/source/frames.py`; see its tests for the cases.)

pub const DLT_NULL: u32 = 0;
pub const DLT_EN10MB: u32 = 1;
pub const DLT_LOOP: u32 = 108;
pub const DLT_LINUX_SLL: u32 = 113;
pub const DLT_IPV4: u32 = 228;
pub const DLT_IPV6: u32 = 229;
pub const DLT_LINUX_SLL2: u32 = 276;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 or IPv6 address as on the wire, small and `Copy` (connections are keyed on it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Address {
    octets: [u8; 16],
    v6: bool,
}

impl Address {
    pub fn new(bytes: &[u8]) -> Address {
        let mut octets = [0u8; 16];
        let v6 = bytes.len() == 16;
        octets[..bytes.len().min(16)].copy_from_slice(&bytes[..bytes.len().min(16)]);
        Address { octets, v6 }
    }

    /// The address's bytes: 4 for IPv4, 16 for IPv6.
    pub fn bytes(&self) -> &[u8] {
        if self.v6 {
            &self.octets
        } else {
            &self.octets[..4]
        }
    }

    pub fn is_v6(&self) -> bool {
        self.v6
    }
}

/// One TCP segment, its payload borrowed from the frame.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub src: Address,
    pub sport: u16,
    pub dst: Address,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct DecodeCounters {
    pub corrupt: u64,
    pub fragments: u64,
    pub not_tcp: u64,
    pub unsupported_link: u64,
}

#[derive(Default)]
pub struct FrameDecoder {
    pub counters: DecodeCounters,
}

impl FrameDecoder {
    pub fn decode<'a>(&mut self, _linktype: u32, _frame: &'a [u8]) -> Option<Segment<'a>> {
        unimplemented!("source helper")
    }
}

/// The same number for both directions of a connection (None for a frame that is not TCP over IP).
pub fn flow_hash(_linktype: u32, _frame: &[u8]) -> Option<u32> {
    unimplemented!("source helper")
}
