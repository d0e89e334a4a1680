//! Frame decoding: link layer -> IPv4/IPv6 -> TCP. Anything that cannot be made sense of is counted,
//! never raised.

pub const DLT_NULL: u32 = 0;
pub const DLT_EN10MB: u32 = 1;
/// Raw IP under the numbers different systems gave it (`DLT_RAW` is 12 or 14 in some headers, 101 in files).
pub const DLT_RAW_ALIASES: [u32; 3] = [12, 14, 101];
pub const DLT_LOOP: u32 = 108;
pub const DLT_LINUX_SLL: u32 = 113;
pub const DLT_IPV4: u32 = 228;
pub const DLT_IPV6: u32 = 229;
pub const DLT_LINUX_SLL2: u32 = 276;

/// Every link type `FrameDecoder` decodes; a capture whose interfaces have none of them is refused at open.
pub const SUPPORTED_LINK_TYPES: [u32; 10] =
    [DLT_NULL, DLT_EN10MB, 12, 14, 101, DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2];
/// The supported link types by the names users know them by, for error messages.
pub const SUPPORTED_LINKS: &str = "Ethernet, Linux SLL/SLL2, raw IP, BSD loopback";

pub fn is_supported_link(linktype: u32) -> bool {
    SUPPORTED_LINK_TYPES.contains(&linktype)
}

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
#[derive(Clone, Copy)]
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

/// Without the payload: it carries request heads, API keys among them.
impl std::fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("src", &self.src)
            .field("sport", &self.sport)
            .field("dst", &self.dst)
            .field("dport", &self.dport)
            .field("seq", &self.seq)
            .field("ack", &self.ack)
            .field("flags", &self.flags)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86DD;
const ETH_VLAN_TAGS: [u16; 3] = [0x8100, 0x88A8, 0x9100];
/// AF_INET6 differs between Linux, NetBSD, FreeBSD and macOS; AF_INET is 2 everywhere.
const BSD_AF_INET: u32 = 2;
const BSD_AF_INET6: [u32; 4] = [10, 24, 28, 30];

const IPPROTO_TCP: u8 = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTHENTICATION: u8 = 51;
const IPV6_DESTINATION_OPTIONS: u8 = 60;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct DecodeCounters {
    /// Truncated or inconsistent headers, in a frame the capture recorded whole.
    pub corrupt: u64,
    /// Frames the capture recorded only in part (its record shorter than the frame on the wire, as a
    /// small snap length leaves them) and that cannot be decoded from what it kept: their bytes are lost.
    pub cut_short: u64,
    /// IP fragments: not reassembled (TCP senders set Don't Fragment; live with several workers, the
    /// kernel reassembles IPv4 before the ring).
    pub fragments: u64,
    /// Other protocols (and ethertypes) we do not meter.
    pub not_tcp: u64,
    pub unsupported_link: u64,
}

/// Turns `(linktype, frame)` into a `Segment`, or None after counting why not.
#[derive(Default)]
pub struct FrameDecoder {
    pub counters: DecodeCounters,
}

/// Why a frame gave no segment; each is one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    Corrupt,
    Fragment,
    NotTcp,
    UnsupportedLink,
}

impl FrameDecoder {
    /// A frame recorded whole.
    pub fn decode<'a>(&mut self, linktype: u32, frame: &'a [u8]) -> Option<Segment<'a>> {
        self.decode_captured(linktype, frame, frame.len())
    }

    /// A frame as a capture recorded it: `wire_length` is its length on the wire, more than `frame` holds
    /// when the capture cut it short (its snap length). Such a frame is still used when what was kept holds
    /// all the segment has (its TCP header's fixed part and its whole payload: only options, padding or a
    /// trailer were cut); otherwise it is counted in `cut_short`, apart from `corrupt`.
    pub fn decode_captured<'a>(&mut self, linktype: u32, frame: &'a [u8], wire_length: usize) -> Option<Segment<'a>> {
        let cut = wire_length > frame.len();
        match decode(linktype, frame, cut) {
            Ok(segment) => Some(segment),
            Err(skip) => {
                let counter = match skip {
                    Skip::Corrupt if cut => &mut self.counters.cut_short,
                    Skip::Corrupt => &mut self.counters.corrupt,
                    Skip::Fragment => &mut self.counters.fragments,
                    Skip::NotTcp => &mut self.counters.not_tcp,
                    Skip::UnsupportedLink => &mut self.counters.unsupported_link,
                };
                *counter += 1;
                None
            }
        }
    }
}

/// The same number for both directions of a connection (None for a frame that is not TCP over IP), so
/// that workers can share the traffic by connection: both endpoints are hashed alone and then combined
/// by addition, which does not care which one is the source.
pub fn flow_hash(linktype: u32, frame: &[u8]) -> Option<u32> {
    flow_hash_captured(linktype, frame, frame.len())
}

/// `flow_hash` of a frame as a capture recorded it (see `FrameDecoder::decode_captured`): the frames the
/// decoder uses are the frames hashed, so that a connection's cut frames stay with its worker.
pub fn flow_hash_captured(linktype: u32, frame: &[u8], wire_length: usize) -> Option<u32> {
    let segment = decode(linktype, frame, wire_length > frame.len()).ok()?;
    let ends = endpoint_hash(&segment.src, segment.sport).wrapping_add(endpoint_hash(&segment.dst, segment.dport));
    Some((mix64(ends) >> 32) as u32)
}

fn endpoint_hash(address: &Address, port: u16) -> u64 {
    let mut hash = u64::from(port) << 8 | u64::from(address.is_v6());
    for chunk in address.bytes().chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = mix64(hash ^ u64::from_le_bytes(word));
    }
    hash
}

/// The finaliser of MurmurHash3: every input bit reaches every output bit (Linux hands out even client
/// ports, so the ports' low bits alone would not spread).
fn mix64(mut value: u64) -> u64 {
    value ^= value >> 33;
    value = value.wrapping_mul(0xff51_afd7_ed55_8ccd);
    value ^= value >> 33;
    value = value.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    value ^ value >> 33
}

/// `cut`: the capture kept less of the frame than was on the wire, so the IP length may run past the
/// frame's end; what lies past it must then be no more than the TCP header's options.
fn decode(linktype: u32, frame: &[u8], cut: bool) -> Result<Segment<'_>, Skip> {
    let (ethertype, offset) = network_layer(linktype, frame)?;
    match ethertype {
        ETH_IPV4 => ipv4(frame, offset, cut),
        ETH_IPV6 => ipv6(frame, offset, cut),
        _ => Err(Skip::NotTcp),
    }
}

fn u16_at(frame: &[u8], offset: usize) -> Option<u16> {
    let bytes = frame.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn u32_at(frame: &[u8], offset: usize) -> Option<u32> {
    let bytes = frame.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// (ethertype, offset of the IP header); a frame shorter than its link header is corrupt.
fn network_layer(linktype: u32, frame: &[u8]) -> Result<(u16, usize), Skip> {
    match linktype {
        DLT_EN10MB => {
            let (mut ethertype, mut offset) = (u16_at(frame, 12).ok_or(Skip::Corrupt)?, 14);
            while ETH_VLAN_TAGS.contains(&ethertype) {
                ethertype = u16_at(frame, offset + 2).ok_or(Skip::Corrupt)?;
                offset += 4;
            }
            Ok((ethertype, offset))
        }
        DLT_LINUX_SLL => Ok((u16_at(frame, 14).ok_or(Skip::Corrupt)?, 16)),
        DLT_LINUX_SLL2 => Ok((u16_at(frame, 0).ok_or(Skip::Corrupt)?, 20)),
        DLT_NULL | DLT_LOOP => {
            let written = u32_at(frame, 0).ok_or(Skip::Corrupt)?;
            // DLT_LOOP is big-endian as specified, DLT_NULL the writer's order; some writers differ, so a
            // family that is not one in the expected order is read in the other.
            let expected_big = linktype == DLT_LOOP || cfg!(target_endian = "big");
            let mut family = if expected_big { written } else { written.swap_bytes() };
            if family != BSD_AF_INET && !BSD_AF_INET6.contains(&family) {
                family = family.swap_bytes();
            }
            let ethertype = match family {
                BSD_AF_INET => ETH_IPV4,
                _ if BSD_AF_INET6.contains(&family) => ETH_IPV6,
                _ => 0,
            };
            Ok((ethertype, 4))
        }
        12 | 14 | 101 | DLT_IPV4 | DLT_IPV6 => {
            let ethertype = match frame.first().ok_or(Skip::Corrupt)? >> 4 {
                4 => ETH_IPV4,
                6 => ETH_IPV6,
                _ => 0,
            };
            Ok((ethertype, 0))
        }
        _ => Err(Skip::UnsupportedLink),
    }
}

fn ipv4(frame: &[u8], offset: usize, cut: bool) -> Result<Segment<'_>, Skip> {
    let header = frame.get(offset..offset + 10).ok_or(Skip::Corrupt)?;
    let version_ihl = header[0];
    let total_length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]);
    let protocol = header[9];
    let header_length = usize::from(version_ihl & 0x0F) * 4;
    if version_ihl >> 4 != 4 || header_length < 20 {
        return Err(Skip::Corrupt);
    }
    if protocol != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    if fragment & 0x3FFF != 0 {
        return Err(Skip::Fragment); // the more-fragments flag or a non-zero offset
    }
    // A zero total length is what segmentation offload leaves in a super-frame: trust the frame then.
    let end = if total_length == 0 { frame.len() } else { offset + total_length };
    if end > frame.len() && !cut || total_length != 0 && total_length < header_length {
        return Err(Skip::Corrupt);
    }
    // `tcp` needs 20 bytes past a header of at least 20 within `end` and the frame, so both addresses are
    // whole if it succeeds; until then they may be cut, and are taken as far as the frame goes.
    let src = frame.get(offset + 12..offset + 16).unwrap_or_default();
    let dst = frame.get(offset + 16..offset + 20).unwrap_or_default();
    tcp(frame, offset + header_length, end, src, dst)
}

fn ipv6(frame: &[u8], offset: usize, cut: bool) -> Result<Segment<'_>, Skip> {
    let header = frame.get(offset..offset + 7).ok_or(Skip::Corrupt)?;
    let payload_length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut next_header = header[6];
    if header[0] >> 4 != 6 {
        return Err(Skip::Corrupt);
    }
    let end = if payload_length == 0 { frame.len() } else { offset + 40 + payload_length }; // 0: jumbogram / offload
    if end > frame.len() && !cut {
        return Err(Skip::Corrupt);
    }
    let mut position = offset + 40;
    while matches!(next_header, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DESTINATION_OPTIONS | IPV6_AUTHENTICATION) {
        let extension = frame.get(position..position + 2).filter(|_| position + 2 <= end).ok_or(Skip::Corrupt)?;
        let (kind, length) = (extension[0], usize::from(extension[1]));
        let length = if next_header == IPV6_AUTHENTICATION { (length + 2) * 4 } else { (length + 1) * 8 };
        next_header = kind;
        position += length;
    }
    if next_header == IPV6_FRAGMENT {
        // an atomic fragment (offset 0, no more fragments: RFC 6946) is a whole packet; others are skipped
        let fragment = frame.get(position..position + 8).filter(|_| position + 8 <= end).ok_or(Skip::Corrupt)?;
        if u16::from_be_bytes([fragment[2], fragment[3]]) & 0xFFF9 != 0 {
            return Err(Skip::Fragment);
        }
        next_header = fragment[0];
        position += 8;
    }
    if next_header != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    let src = frame.get(offset + 8..offset + 24).unwrap_or_default();
    let dst = frame.get(offset + 24..offset + 40).unwrap_or_default();
    tcp(frame, position, end, src, dst)
}

/// The segment at `offset`, its IP packet ending at `end`: past the frame's end only for a frame the
/// capture cut short (`decode`), and then only within the header's options (no payload was lost).
fn tcp<'a>(frame: &'a [u8], offset: usize, end: usize, src: &[u8], dst: &[u8]) -> Result<Segment<'a>, Skip> {
    if offset + 20 > end {
        return Err(Skip::Corrupt);
    }
    let header = frame.get(offset..offset + 20).ok_or(Skip::Corrupt)?;
    let offset_flags = u16::from_be_bytes([header[12], header[13]]);
    let header_length = usize::from(offset_flags >> 12) * 4;
    if header_length < 20 || offset + header_length > end {
        return Err(Skip::Corrupt);
    }
    Ok(Segment {
        src: Address::new(src),
        sport: u16::from_be_bytes([header[0], header[1]]),
        dst: Address::new(dst),
        dport: u16::from_be_bytes([header[2], header[3]]),
        seq: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
        ack: u32::from_be_bytes([header[8], header[9], header[10], header[11]]),
        flags: (offset_flags & 0x3F) as u8,
        payload: if offset + header_length == end { &[] } else { frame.get(offset + header_length..end).ok_or(Skip::Corrupt)? },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT4: [u8; 4] = [10, 0, 0, 1];
    const SERVER4: [u8; 4] = [10, 0, 0, 2];
    const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const PAYLOAD: &[u8] = b"GET /orders HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    const PSH: u8 = 0x08;

    fn tcp_header(sport: u16, dport: u16, flags: u8, data_offset: u8) -> Vec<u8> {
        let mut header = Vec::new();
        header.extend_from_slice(&sport.to_be_bytes());
        header.extend_from_slice(&dport.to_be_bytes());
        header.extend_from_slice(&1000u32.to_be_bytes());
        header.extend_from_slice(&2000u32.to_be_bytes());
        header.push(data_offset << 4);
        header.push(flags);
        header.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0, 0]);
        header
    }

    fn segment_bytes(payload: &[u8]) -> Vec<u8> {
        let mut bytes = tcp_header(40000, 8000, TCP_ACK | PSH, 5);
        bytes.extend_from_slice(payload);
        bytes
    }

    /// An IPv4 packet: `options` of whole words, `total_length` None for the true one.
    fn ipv4_with(protocol: u8, fragment: u16, options: &[u8], total_length: Option<u16>, body: &[u8]) -> Vec<u8> {
        let header_length = 20 + options.len();
        let total = total_length.unwrap_or((header_length + body.len()) as u16);
        let mut packet = vec![0x40 | (header_length / 4) as u8, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 1]);
        packet.extend_from_slice(&fragment.to_be_bytes());
        packet.extend_from_slice(&[64, protocol, 0, 0]);
        packet.extend_from_slice(&CLIENT4);
        packet.extend_from_slice(&SERVER4);
        packet.extend_from_slice(options);
        packet.extend_from_slice(body);
        packet
    }

    fn ipv4(payload: &[u8]) -> Vec<u8> {
        ipv4_with(IPPROTO_TCP, 0, &[], None, &segment_bytes(payload))
    }

    /// An IPv6 packet whose `extensions` are (type, bytes) pairs, each `bytes` a whole header but its first byte.
    fn ipv6_with(extensions: &[(u8, Vec<u8>)], last: u8, body: &[u8]) -> Vec<u8> {
        let mut chain = Vec::new();
        for (index, (_, bytes)) in extensions.iter().enumerate() {
            chain.push(extensions.get(index + 1).map_or(last, |next| next.0));
            chain.extend_from_slice(bytes);
        }
        chain.extend_from_slice(body);
        let first = extensions.first().map_or(last, |extension| extension.0);
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&(chain.len() as u16).to_be_bytes());
        packet.extend_from_slice(&[first, 64]);
        packet.extend_from_slice(&CLIENT6);
        packet.extend_from_slice(&SERVER6);
        packet.extend_from_slice(&chain);
        packet
    }

    fn ipv6(payload: &[u8]) -> Vec<u8> {
        ipv6_with(&[], IPPROTO_TCP, &segment_bytes(payload))
    }

    fn ether(tags: &[u16], ethertype: u16, packet: &[u8]) -> Vec<u8> {
        let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        for tag in tags {
            frame.extend_from_slice(&tag.to_be_bytes());
            frame.extend_from_slice(&100u16.to_be_bytes());
        }
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        frame
    }

    fn sll(protocol: u16, packet: &[u8]) -> Vec<u8> {
        let mut frame = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
        frame.extend_from_slice(&protocol.to_be_bytes());
        frame.extend_from_slice(packet);
        frame
    }

    fn sll2(protocol: u16, packet: &[u8]) -> Vec<u8> {
        let mut frame = protocol.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
        frame.extend_from_slice(packet);
        frame
    }

    fn family(bytes: [u8; 4], packet: &[u8]) -> Vec<u8> {
        let mut frame = bytes.to_vec();
        frame.extend_from_slice(packet);
        frame
    }

    fn check_expected(segment: Option<Segment<'_>>, v6: bool) {
        let segment = segment.expect("a segment");
        let (client, server) = if v6 { (&CLIENT6[..], &SERVER6[..]) } else { (&CLIENT4[..], &SERVER4[..]) };
        assert_eq!(segment.src.bytes(), client);
        assert_eq!(segment.dst.bytes(), server);
        assert_eq!((segment.sport, segment.dport, segment.seq, segment.ack), (40000, 8000, 1000, 2000));
        assert_eq!(segment.flags, TCP_ACK | PSH);
        assert_eq!(segment.payload, PAYLOAD);
    }

    fn link_frames() -> Vec<(&'static str, u32, Vec<u8>, bool)> {
        let hop_by_hop = (IPV6_HOP_BY_HOP, vec![0, 1, 4, 0, 0, 0, 0]);
        let destination = (IPV6_DESTINATION_OPTIONS, vec![0, 1, 4, 0, 0, 0, 0]);
        let authentication = (IPV6_AUTHENTICATION, vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        vec![
            ("ethernet", DLT_EN10MB, ether(&[], ETH_IPV4, &ipv4(PAYLOAD)), false),
            ("ethernet-ipv6", DLT_EN10MB, ether(&[], ETH_IPV6, &ipv6(PAYLOAD)), true),
            ("802.1q", DLT_EN10MB, ether(&[0x8100], ETH_IPV4, &ipv4(PAYLOAD)), false),
            ("qinq", DLT_EN10MB, ether(&[0x88A8, 0x8100], ETH_IPV4, &ipv4(PAYLOAD)), false),
            ("qinq-ipv6", DLT_EN10MB, ether(&[0x9100, 0x8100], ETH_IPV6, &ipv6(PAYLOAD)), true),
            ("sll", DLT_LINUX_SLL, sll(ETH_IPV4, &ipv4(PAYLOAD)), false),
            ("sll-ipv6", DLT_LINUX_SLL, sll(ETH_IPV6, &ipv6(PAYLOAD)), true),
            ("sll2", DLT_LINUX_SLL2, sll2(ETH_IPV4, &ipv4(PAYLOAD)), false),
            ("sll2-ipv6", DLT_LINUX_SLL2, sll2(ETH_IPV6, &ipv6(PAYLOAD)), true),
            ("raw-12", 12, ipv4(PAYLOAD), false),
            ("raw-14", 14, ipv6(PAYLOAD), true),
            ("raw-101", 101, ipv4(PAYLOAD), false),
            ("ipv4-228", DLT_IPV4, ipv4(PAYLOAD), false),
            ("ipv6-229", DLT_IPV6, ipv6(PAYLOAD), true),
            ("null-ipv4", DLT_NULL, family(2u32.to_ne_bytes(), &ipv4(PAYLOAD)), false),
            ("null-ipv4-other-order", DLT_NULL, family(2u32.swap_bytes().to_ne_bytes(), &ipv4(PAYLOAD)), false),
            ("null-ipv6-linux", DLT_NULL, family(10u32.to_ne_bytes(), &ipv6(PAYLOAD)), true),
            ("null-ipv6-bsd", DLT_NULL, family(24u32.to_ne_bytes(), &ipv6(PAYLOAD)), true),
            ("null-ipv6-macos-big-endian", DLT_NULL, family(30u32.to_be_bytes(), &ipv6(PAYLOAD)), true),
            ("loop-ipv4", DLT_LOOP, family(2u32.to_be_bytes(), &ipv4(PAYLOAD)), false),
            ("loop-ipv6", DLT_LOOP, family(28u32.to_be_bytes(), &ipv6(PAYLOAD)), true),
            ("loop-little-endian", DLT_LOOP, family(2u32.to_le_bytes(), &ipv4(PAYLOAD)), false),
            ("ipv4-options", DLT_EN10MB,
             ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0, &[1, 1, 1, 1], None, &segment_bytes(PAYLOAD))), false),
            ("ipv4-dont-fragment", 101, ipv4_with(IPPROTO_TCP, 0x4000, &[], None, &segment_bytes(PAYLOAD)), false),
            ("ipv6-hop-by-hop", DLT_EN10MB,
             ether(&[], ETH_IPV6, &ipv6_with(std::slice::from_ref(&hop_by_hop), IPPROTO_TCP, &segment_bytes(PAYLOAD))), true),
            ("ipv6-three-extension-headers", 101,
             ipv6_with(&[hop_by_hop, authentication, destination], IPPROTO_TCP, &segment_bytes(PAYLOAD)), true),
        ]
    }

    #[test]
    fn every_supported_link_type_decodes_to_the_same_segment() {
        for (name, linktype, frame, v6) in link_frames() {
            let mut decoder = FrameDecoder::default();
            let segment = decoder.decode(linktype, &frame);
            assert!(segment.is_some(), "{name}");
            check_expected(segment, v6);
            assert_eq!(decoder.counters, DecodeCounters::default(), "{name}");
            assert!(is_supported_link(linktype), "{name}");
        }
    }

    #[test]
    fn fragments_are_counted_and_skipped() {
        let mut decoder = FrameDecoder::default();
        let body = segment_bytes(PAYLOAD);
        let first = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0x2000, &[], None, &body));
        let later = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 1, &[], None, &body));
        let v6 = ipv6_with(&[(IPV6_FRAGMENT, vec![0, 0, 1, 0, 0, 0, 7])], IPPROTO_TCP, &body);
        assert!(decoder.decode(DLT_EN10MB, &first).is_none());
        assert!(decoder.decode(DLT_EN10MB, &later).is_none());
        assert!(decoder.decode(101, &v6).is_none());
        assert_eq!(decoder.counters, DecodeCounters { fragments: 3, ..DecodeCounters::default() });
    }

    #[test]
    fn an_ipv6_atomic_fragment_is_a_whole_packet() {
        let mut decoder = FrameDecoder::default();
        let atomic = ipv6_with(&[(IPV6_FRAGMENT, vec![0, 0, 0, 0, 0, 0, 7])], IPPROTO_TCP, &segment_bytes(PAYLOAD));
        assert_eq!(decoder.decode(101, &atomic).map(|segment| segment.payload), Some(PAYLOAD));
        assert_eq!(decoder.counters, DecodeCounters::default());
    }

    fn with_byte(mut frame: Vec<u8>, index: usize, value: u8) -> Vec<u8> {
        frame[index] = value;
        frame
    }

    #[test]
    fn corrupt_frames_are_counted_never_raised() {
        let ether_ipv4 = ether(&[], ETH_IPV4, &ipv4(PAYLOAD));
        let (ip_at, tcp_at) = (14, 34);
        let mut cut_total = ether_ipv4.clone();
        cut_total.truncate(cut_total.len() - 10);
        let mut ihl_beyond = ipv4_with(IPPROTO_TCP, 0, &[], Some(40), &tcp_header(1, 8000, TCP_SYN, 5));
        ihl_beyond[0] = 0x4F;
        let ipv6_bare = |next: u8, payload_length: u16, rest: &[u8]| {
            let mut packet = ipv6_with(&[], next, rest);
            packet[4..6].copy_from_slice(&payload_length.to_be_bytes());
            packet
        };
        let mut ipv6_cut = ipv6(PAYLOAD);
        ipv6_cut.truncate(ipv6_cut.len() - 5);
        let cases: Vec<(&str, u32, Vec<u8>)> = vec![
            ("shorter-than-ethernet-header", DLT_EN10MB, ether_ipv4[..10].to_vec()),
            ("ethernet-header-only", DLT_EN10MB, ether_ipv4[..14].to_vec()),
            ("vlan-tag-cut", DLT_EN10MB, ether(&[0x8100], ETH_IPV4, &ipv4(PAYLOAD))[..15].to_vec()),
            ("ipv4-header-cut", DLT_EN10MB, ether_ipv4[..ip_at + 9].to_vec()),
            ("ipv4-total-length-beyond-frame", DLT_EN10MB, cut_total),
            ("ihl-below-5", DLT_EN10MB, with_byte(ether_ipv4.clone(), ip_at, 0x44)),
            ("ihl-beyond-total-length", 101, ihl_beyond),
            ("ipv4-version-not-4", DLT_EN10MB, with_byte(ether_ipv4.clone(), ip_at, 0x65)),
            ("tcp-header-cut", 101, ipv4_with(IPPROTO_TCP, 0, &[], None, &[0x1f, 0x40, 0x1f, 0x40, 0x1f, 0x40])),
            ("tcp-offset-below-5", DLT_EN10MB, with_byte(ether_ipv4.clone(), tcp_at + 12, 0x30)),
            ("tcp-offset-beyond-segment", 101, ipv4_with(IPPROTO_TCP, 0, &[], None, &tcp_header(1, 8000, 0, 15))),
            ("sll-cut", DLT_LINUX_SLL, vec![0; 10]),
            ("sll2-cut", DLT_LINUX_SLL2, vec![8]),
            ("sll2-header-only", DLT_LINUX_SLL2, sll2(ETH_IPV4, &[])),
            ("null-cut", DLT_NULL, vec![2, 0]),
            ("raw-empty", 101, vec![]),
            ("ipv6-payload-length-beyond-frame", 101, ipv6_cut),
            ("ipv6-header-cut", 101, ipv6(PAYLOAD)[..30].to_vec()),
            ("ipv6-header-cut-before-next-header", 101, ipv6(PAYLOAD)[..6].to_vec()),
            ("ipv6-version-not-6", DLT_EN10MB, ether(&[], ETH_IPV6, &with_byte(ipv6(PAYLOAD), 0, 0x70))),
            ("ipv6-extension-header-cut", 101, ipv6_bare(IPV6_HOP_BY_HOP, 1, &[IPPROTO_TCP])),
            ("ipv6-extension-runs-past-end", 101, ipv6_bare(IPV6_HOP_BY_HOP, 8, &[IPPROTO_TCP, 5, 0, 0, 0, 0, 0, 0])),
        ];
        for (name, linktype, frame) in cases {
            let mut decoder = FrameDecoder::default();
            assert!(decoder.decode(linktype, &frame).is_none(), "{name}");
            assert_eq!(decoder.counters, DecodeCounters { corrupt: 1, ..DecodeCounters::default() }, "{name}");
        }
    }

    #[test]
    fn every_truncation_of_a_frame_is_counted_never_raised() {
        let mut decoder = FrameDecoder::default();
        let frames = [(DLT_EN10MB, ether(&[], ETH_IPV4, &ipv4(PAYLOAD))), (101, ipv6(PAYLOAD)),
                      (DLT_LINUX_SLL2, sll2(ETH_IPV4, &ipv4(PAYLOAD)))];
        let mut total = 0;
        for (linktype, frame) in &frames {
            for length in 0..frame.len() {
                assert!(decoder.decode(*linktype, &frame[..length]).is_none());
            }
            total += frame.len() as u64;
        }
        assert_eq!(decoder.counters, DecodeCounters { corrupt: total, ..DecodeCounters::default() });
    }

    #[test]
    fn frames_the_capture_cut_short_are_counted_apart_or_used_if_nothing_they_carry_was_cut() {
        let counted = |decoder: &FrameDecoder| (decoder.counters.corrupt, decoder.counters.cut_short);
        // a request cut inside its payload, its TCP header, its IP header, its link header: its bytes are lost
        let request = ether(&[], ETH_IPV4, &ipv4(PAYLOAD));
        let request6 = ipv6(PAYLOAD);
        let mut decoder = FrameDecoder::default();
        for length in [60, 54, 40, 20, 10, 0] {
            assert!(decoder.decode_captured(DLT_EN10MB, &request[..length], request.len()).is_none(), "{length}");
        }
        for length in [70, 60, 40, 0] {
            assert!(decoder.decode_captured(101, &request6[..length], request6.len()).is_none(), "{length}");
        }
        assert_eq!(counted(&decoder), (0, 10));
        assert_eq!(flow_hash_captured(DLT_EN10MB, &request[..60], request.len()), None);
        // the same cut in a frame recorded whole (the record says it is all there was) is corrupt
        assert!(decoder.decode(DLT_EN10MB, &request[..60]).is_none());
        assert_eq!(counted(&decoder), (1, 10));

        // an ACK cut inside its TCP options (tcpdump -s 60 on loopback): no payload was lost, it is used
        let mut with_options = tcp_header(40000, 8000, TCP_ACK, 8);
        with_options.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        let ack = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0, &[], None, &with_options));
        assert_eq!(ack.len(), 66);
        let segment = decoder.decode_captured(DLT_EN10MB, &ack[..60], ack.len()).expect("a segment");
        assert_eq!((segment.sport, segment.dport, segment.seq, segment.ack, segment.flags), (40000, 8000, 1000, 2000, TCP_ACK));
        assert!(segment.payload.is_empty());
        assert_eq!(flow_hash_captured(DLT_EN10MB, &ack[..60], ack.len()), flow_hash(DLT_EN10MB, &ack));
        let ack6 = ipv6_with(&[], IPPROTO_TCP, &with_options);
        assert!(decoder.decode_captured(101, &ack6[..64], ack6.len()).is_some_and(|segment| segment.payload.is_empty()));
        // but not cut before the TCP header's fixed part, nor as a frame recorded whole
        assert!(decoder.decode_captured(DLT_EN10MB, &ack[..50], ack.len()).is_none());
        assert!(decoder.decode(DLT_EN10MB, &ack[..60]).is_none());
        assert_eq!(counted(&decoder), (2, 11));

        // a frame whose IP packet is whole, only its padding or trailer (FCS) cut: used, not counted
        let mut padded = ether(&[], ETH_IPV4, &ipv4(b"hi"));
        let ip_end = padded.len();
        padded.resize(64, 0xAA);
        assert_eq!(decoder.decode_captured(DLT_EN10MB, &padded[..ip_end], 64).map(|segment| segment.payload),
                   Some(&b"hi"[..]));
        assert_eq!(decoder.decode_captured(DLT_EN10MB, &request, request.len() + 4).map(|segment| segment.payload),
                   Some(PAYLOAD));
        assert_eq!(counted(&decoder), (2, 11));
        // a cut frame that is not TCP stays not TCP
        let udp = ether(&[], ETH_IPV4, &ipv4_with(17, 0, &[], None, &[0, 53, 0, 53, 0, 8, 0, 0]));
        assert!(decoder.decode_captured(DLT_EN10MB, &udp[..36], udp.len()).is_none());
        assert_eq!((decoder.counters.not_tcp, counted(&decoder)), (1, (2, 11)));
    }

    #[test]
    fn other_protocols_and_link_types_are_counted_apart_from_corruption() {
        let mut decoder = FrameDecoder::default();
        let udp = ether(&[], ETH_IPV4, &ipv4_with(17, 0, &[], None, &[0, 53, 0, 53, 0, 8, 0, 0]));
        let arp = ether(&[], 0x0806, &[0; 28]);
        let icmp6 = ipv6_with(&[], 58, &[128, 0, 0, 0]);
        assert!(decoder.decode(DLT_EN10MB, &udp).is_none());
        assert!(decoder.decode(DLT_EN10MB, &arp).is_none());
        assert!(decoder.decode(101, &icmp6).is_none());
        assert!(decoder.decode(DLT_NULL, &family(7u32.to_ne_bytes(), &ipv4(PAYLOAD))).is_none());
        assert!(decoder.decode(101, &[0x50; 40]).is_none());
        assert_eq!(decoder.counters.not_tcp, 5);
        assert!(decoder.decode(105, &ether(&[], ETH_IPV4, &ipv4(PAYLOAD))).is_none()); // 802.11
        assert_eq!(decoder.counters.unsupported_link, 1);
        assert_eq!(decoder.counters.corrupt, 0);
        assert!(!is_supported_link(105));
    }

    #[test]
    fn ethernet_padding_is_not_taken_as_payload() {
        for payload in [&b""[..], b"hi", b"GET"] {
            let plain = ether(&[], ETH_IPV4, &ipv4(payload));
            let options = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0, &[1; 4], None, &segment_bytes(payload)));
            let tagged = ether(&[0x8100], ETH_IPV4, &ipv4(payload));
            let cooked = sll(ETH_IPV4, &ipv4(payload));
            for (linktype, mut frame, padded_length) in
                [(DLT_EN10MB, plain, 60), (DLT_EN10MB, options, 64), (DLT_EN10MB, tagged, 64), (DLT_LINUX_SLL, cooked, 62)]
            {
                assert!(frame.len() < padded_length);
                frame.resize(padded_length, 0xAA);
                let mut decoder = FrameDecoder::default();
                assert_eq!(decoder.decode(linktype, &frame).map(|segment| segment.payload), Some(payload));
            }
        }
    }

    #[test]
    fn a_zero_length_of_an_offloaded_super_frame_trusts_the_frame() {
        let big = vec![b'x'; 3000];
        let v4 = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0, &[], Some(0), &segment_bytes(&big)));
        let mut v6 = ipv6(&big);
        v6[4..6].copy_from_slice(&[0, 0]);
        let mut decoder = FrameDecoder::default();
        assert_eq!(decoder.decode(DLT_EN10MB, &v4).map(|segment| segment.payload.len()), Some(3000));
        assert_eq!(decoder.decode(101, &v6).map(|segment| segment.payload.len()), Some(3000));
    }

    #[test]
    fn flags_are_reported() {
        let mut decoder = FrameDecoder::default();
        let syn = ipv4_with(IPPROTO_TCP, 0, &[], None, &tcp_header(1, 8000, TCP_SYN, 5));
        let fin = ipv4_with(IPPROTO_TCP, 0, &[], None, &tcp_header(1, 8000, TCP_FIN | TCP_ACK, 5));
        assert_eq!(decoder.decode(101, &syn).map(|segment| segment.flags), Some(TCP_SYN));
        assert_eq!(decoder.decode(101, &fin).map(|segment| segment.flags), Some(TCP_FIN | TCP_ACK));
    }

    fn reversed_ipv4(payload: &[u8]) -> Vec<u8> {
        let mut packet = ipv4_with(IPPROTO_TCP, 0, &[], None, &{
            let mut bytes = tcp_header(8000, 40000, TCP_ACK, 5);
            bytes.extend_from_slice(payload);
            bytes
        });
        packet[12..16].copy_from_slice(&SERVER4);
        packet[16..20].copy_from_slice(&CLIENT4);
        packet
    }

    #[test]
    fn flow_hash_is_the_same_for_both_directions_and_tells_connections_apart() {
        let forward = ether(&[], ETH_IPV4, &ipv4(PAYLOAD));
        let reverse = ether(&[], ETH_IPV4, &reversed_ipv4(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(flow_hash(DLT_EN10MB, &forward), flow_hash(DLT_EN10MB, &reverse));
        assert_eq!(flow_hash(DLT_LINUX_SLL2, &sll2(ETH_IPV4, &ipv4(b""))),
                   flow_hash(DLT_LINUX_SLL2, &sll2(ETH_IPV4, &reversed_ipv4(b""))));
        assert!(flow_hash(DLT_EN10MB, &forward).is_some());
        let other = ether(&[], ETH_IPV4, &ipv4_with(IPPROTO_TCP, 0, &[], None, &tcp_header(40001, 8000, 0, 5)));
        assert_ne!(flow_hash(DLT_EN10MB, &forward), flow_hash(DLT_EN10MB, &other));
        assert_eq!(flow_hash(DLT_EN10MB, &forward[..20]), None);
        assert_eq!(flow_hash(DLT_EN10MB, &forward[..25]), None);
        let udp = ether(&[], ETH_IPV4, &ipv4_with(17, 0, &[], None, &[0; 8]));
        assert_eq!(flow_hash(DLT_EN10MB, &udp), None);
    }

    #[test]
    fn flow_hash_spreads_even_client_ports_over_workers() {
        let mut shares = [0u32; 4];
        for port in (32768u16..40960).step_by(2) {
            let packet = ipv4_with(IPPROTO_TCP, 0, &[], None, &tcp_header(port, 8000, TCP_SYN, 5));
            shares[flow_hash(101, &packet).map_or(0, |hash| hash % 4) as usize] += 1;
        }
        assert!(shares.iter().all(|&share| (900..1150).contains(&share)), "{shares:?}");
    }
}
