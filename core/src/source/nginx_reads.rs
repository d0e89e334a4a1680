//! Where nginx reads a TLS connection's plaintext, read off its own code: `ngx_ssl_recv(c, buf, size)`,
//! which every nginx exports (its build links with `-Wl,-E` for dynamic modules) and through which all its
//! TLS reads go (HTTP/1.x, HTTP/2, streams, Lua cosockets). It calls `SSL_read(c->ssl->connection, buf,
//! size)` until that would block, so probing the library's read worker costs two entries and two returns
//! per request (the second read finds nothing); probed here, one hit suffices: the first call on the path
//! only a successful `SSL_read` takes, where the registers still hold its result, the buffer it filled
//! and `c`. The probes' loader (`tls_probes.rs`) probes the library's read worker when the code has
//! another shape.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
               Register};

use object::ObjectSymbol;

use super::tls_probes::{code_at, file_offset, find_symbol};

/// What the loader needs to probe nginx's reads.
#[derive(Debug, PartialEq)]
pub struct NginxReads {
    /// where `ngx_connection_t` holds `ssl` (an `ngx_ssl_connection_t *`, whose first field is the SSL*)
    pub ssl_field: u32,
    pub delivered: Delivered,
}

/// The call only a successful `SSL_read` leads to, and the registers that hold, there, what it returned
/// (a positive byte count), the buffer it filled, nginx's connection `c`, and `c->ssl` where one does
/// (the probe then reads the SSL* in one step instead of two).
#[derive(Debug, PartialEq)]
pub struct Delivered {
    /// its file offset
    pub at: u64,
    pub length: Register,
    pub buffer: Register,
    pub connection: Register,
    pub ssl_connection: Option<Register>,
}

/// nginx's read function in this executable, if it is an nginx whose code has the expected shape. None
/// otherwise: the TLS library's read worker is probed then.
pub fn nginx_reads(elf: &[u8]) -> Option<NginxReads> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let file = object::File::parse(elf).ok()?;
    let function = find_symbol(&file, "ngx_ssl_recv")?;
    let start = function.address();
    let (code, _) = code_at(&file, start, if function.size() > 0 { function.size() } else { 1024 })?;
    let path = read_path(code, start)?;
    let site = path.delivered?;
    Some(NginxReads { ssl_field: path.ssl_field, delivered: Delivered { at: file_offset(&file, site.at)?, ..site } })
}

/// What a register holds, followed from `ngx_ssl_recv`'s entry.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Holds {
    /// its first argument, `c`
    Connection,
    /// its second, `buf` (advanced past each read: the buffer the next read fills)
    Buffer,
    /// a field of `c`, at this offset
    Field(u32),
    /// the first word of the structure such a field points to
    FirstWordOf(u32),
    /// what `SSL_read` returned
    Result,
}

const CALLER_SAVED: [Register; 9] = [Register::RAX, Register::RCX, Register::RDX, Register::RSI, Register::RDI,
                                     Register::R8, Register::R9, Register::R10, Register::R11];
const CALLEE_SAVED: [Register; 6] = [Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14,
                                     Register::R15];

/// Registers and what they hold, as the instructions go by.
struct Tracker {
    held: HashMap<Register, Holds>,
    info: InstructionInfoFactory,
}

impl Tracker {
    fn step(&mut self, instruction: &Instruction) {
        if matches!(instruction.flow_control(), FlowControl::Call | FlowControl::IndirectCall) {
            CALLER_SAVED.iter().for_each(|register| {
                self.held.remove(register);
            });
            return;
        }
        let loaded = loads(instruction, &self.held);
        for used in self.info.info(instruction).used_registers() {
            if matches!(used.access(), OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite
                                       | OpAccess::ReadCondWrite) {
                self.held.remove(&used.register().full_register());
            }
        }
        if let Some(value) = loaded {
            self.held.insert(instruction.op0_register().full_register(), value);
        }
    }

    fn holds(&self, register: Register, value: Holds) -> bool {
        self.held.get(&register) == Some(&value)
    }

    /// A callee-saved register holding `value`: one a call does not change.
    fn kept(&self, value: Holds) -> Option<Register> {
        CALLEE_SAVED.into_iter().find(|register| self.holds(*register, value))
    }
}

struct ReadPath {
    ssl_field: u32,
    /// `Delivered` with a virtual address
    delivered: Option<Delivered>,
}

/// The offset of `ssl` in `ngx_connection_t` (0x90 in nginx 1.22, further on since 1.25 with its QUIC
/// field; Kong's OpenResty has its own), from the first call `ngx_ssl_recv` makes with
/// `c->ssl->connection` in rdi and `buf` in rsi, which is `SSL_read`'s; then the call only its success
/// leads to. Plausible offsets only (8-byte aligned, within the first 4 KiB): a wrong one would mislabel
/// every read.
fn read_path(code: &[u8], start: u64) -> Option<ReadPath> {
    let instructions: Vec<Instruction> = Decoder::with_ip(64, code, start, DecoderOptions::NONE).iter().take(512).collect();
    let mut tracker = Tracker {
        held: [(Register::RDI, Holds::Connection), (Register::RSI, Holds::Buffer)].into(),
        info: InstructionInfoFactory::new(),
    };
    let mut index = 0;
    while let Some(instruction) = instructions.get(index) {
        index += 1;
        match instruction.flow_control() {
            FlowControl::Call => {
                if let Some(Holds::FirstWordOf(field)) = tracker.held.get(&Register::RDI).copied() {
                    if !tracker.holds(Register::RSI, Holds::Buffer) || field % 8 != 0 || field >= 4096 {
                        return None;
                    }
                    let delivered = success_call(&instructions, index - 1, tracker);
                    return Some(ReadPath { ssl_field: field, delivered });
                }
            }
            // a jump forward is followed (what it skips is another path's); one back would loop
            FlowControl::UnconditionalBranch => {
                let target = instruction.near_branch_target();
                index = instructions.iter().position(|other| other.ip() == target && target > instruction.ip())?;
                continue;
            }
            // an indirect call may be SSL_read's (-fno-plt builds), which this reading cannot tell
            FlowControl::Return | FlowControl::Exception | FlowControl::IndirectBranch
            | FlowControl::IndirectCall => return None,
            _ => {}
        }
        tracker.step(instruction);
    }
    None
}

/// From the `SSL_read` call at `index`: its result tested (`test`, then `jle` past the success path or
/// `jg` to it; branches before that, such as a debug build's check of the log level, are followed where
/// they do not jump), then the first call on that path, reached without another branch, with the result,
/// the buffer and `c` all still in registers there. A call is an instruction the kernel emulates, so the
/// probe costs one trap and no single-step.
fn success_call(instructions: &[Instruction], index: usize, mut tracker: Tracker) -> Option<Delivered> {
    let buffer = tracker.kept(Holds::Buffer)?;
    let connection = tracker.kept(Holds::Connection)?;
    let Some(Holds::FirstWordOf(field)) = tracker.held.get(&Register::RDI).copied() else { return None };
    tracker.step(&instructions[index]);
    tracker.held.insert(Register::RAX, Holds::Result);
    let mut at = index + 1;
    // up to the test of the result and its branch
    let success = loop {
        let instruction = instructions.get(at)?;
        let straight = matches!(instruction.flow_control(), FlowControl::Next | FlowControl::ConditionalBranch);
        if !straight || at > index + 16 {
            return None;
        }
        if is_test_of_result(instruction, &tracker) {
            let branch = instructions.get(at + 1)?;
            break match branch.mnemonic() {
                Mnemonic::Jle => at + 2,
                Mnemonic::Jg => instructions.iter().position(|target| target.ip() == branch.near_branch_target())?,
                _ => return None,
            };
        }
        tracker.step(instruction);
        at += 1;
    };
    // nothing may jump into the stretch from the branch to the call: there the registers would be another
    // path's (a garbage positive length would copy and bill the wrong bytes)
    let entered = |ip: u64| instructions.iter().any(|other| {
        matches!(other.flow_control(), FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch)
            && other.near_branch_target() == ip
    });
    for (offset, instruction) in instructions.get(success..)?.iter().take(16).enumerate() {
        if offset > 0 && entered(instruction.ip()) {
            return None;
        }
        let ready = |tracker: &Tracker| {
            tracker.holds(buffer, Holds::Buffer) && tracker.holds(connection, Holds::Connection)
        };
        match instruction.flow_control() {
            FlowControl::Call if instruction.is_call_near() => {
                let holding = |value| CALLEE_SAVED.into_iter().chain(CALLER_SAVED).find(|r| tracker.holds(*r, value));
                let (length, ssl_connection) = (holding(Holds::Result)?, holding(Holds::Field(field)));
                return ready(&tracker)
                    .then_some(Delivered { at: instruction.ip(), length, buffer, connection, ssl_connection });
            }
            FlowControl::Next => tracker.step(instruction),
            _ => return None,
        }
    }
    None
}

/// `test %r,%r` on a register holding the result (32 or 64 bits).
fn is_test_of_result(instruction: &Instruction, tracker: &Tracker) -> bool {
    instruction.mnemonic() == Mnemonic::Test
        && instruction.op_count() == 2
        && instruction.op0_kind() == OpKind::Register
        && instruction.op1_kind() == OpKind::Register
        && instruction.op0_register() == instruction.op1_register()
        && tracker.holds(instruction.op0_register().full_register(), Holds::Result)
}

/// What a `mov` (or `movslq`) into a register puts there, in the terms of `Holds`; None for anything
/// else. Pointers move in 64 bits; the result, an int, also in 32.
fn loads(instruction: &Instruction, held: &HashMap<Register, Holds>) -> Option<Holds> {
    if !matches!(instruction.mnemonic(), Mnemonic::Mov | Mnemonic::Movsxd) || instruction.op0_kind() != OpKind::Register {
        return None;
    }
    let wide = instruction.op0_register().size() == 8;
    match instruction.op1_kind() {
        OpKind::Register => {
            let value = *held.get(&instruction.op1_register().full_register())?;
            let whole = instruction.op1_register().size() == 8 && wide && instruction.mnemonic() == Mnemonic::Mov;
            (whole || value == Holds::Result && instruction.op1_register().size() >= 4
                && instruction.op0_register().size() >= 4).then_some(value)
        }
        OpKind::Memory if wide && instruction.memory_index() == Register::None && instruction.memory_size().size() == 8 => {
            let displacement = u32::try_from(instruction.memory_displacement64()).ok()?;
            match held.get(&instruction.memory_base())? {
                Holds::Connection => Some(Holds::Field(displacement)),
                Holds::Field(field) if displacement == 0 => Some(Holds::FirstWordOf(*field)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The slot of `register` in the kernel's `struct pt_regs` on x86-64 (8-byte words), as the probe reads it.
pub fn pt_regs_slot(register: Register) -> Option<u8> {
    const ORDER: [Register; 15] = [Register::R15, Register::R14, Register::R13, Register::R12, Register::RBP,
                                   Register::RBX, Register::R11, Register::R10, Register::R9, Register::R8,
                                   Register::RAX, Register::RCX, Register::RDX, Register::RSI, Register::RDI];
    ORDER.iter().position(|candidate| *candidate == register).and_then(|slot| u8::try_from(slot).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_nginx_reads_through_ngx_ssl_recv() {
        let Ok(nginx) = std::fs::read("/usr/sbin/nginx") else {
            panic!("this test reads Debian's nginx (the gateway stand-in)");
        };
        let reads = nginx_reads(&nginx).expect("ngx_ssl_recv and where it finds the SSL*");
        // nginx 1.22's ngx_connection_t: 17 fields of 8 bytes (addr_text's two among them) before `ssl`
        assert_eq!(reads.ssl_field, 0x90);
        let file = object::File::parse(&*nginx).unwrap();
        let function = find_symbol(&file, "ngx_ssl_recv").unwrap();
        let (code, _) = code_at(&file, function.address(), function.size()).unwrap();
        // Debian's build: `n = SSL_read(...)` kept in rbp, buf in r13, c in rbx; the success path calls
        // ngx_ssl_handle_recv(c, n) first, with n in esi
        let delivered = reads.delivered;
        assert_eq!((delivered.length, delivered.buffer, delivered.connection, delivered.ssl_connection),
                   (Register::RBP, Register::R13, Register::RBX, Some(Register::R15)));
        let call = delivered.at - file_offset(&file, function.address()).unwrap();
        assert!(call > 0 && call < function.size());
        assert_eq!(code[usize::try_from(call).unwrap()], 0xE8, "a direct call, which the kernel emulates");
        let library = std::fs::read("/usr/lib/x86_64-linux-gnu/libssl.so.3").unwrap();
        assert_eq!(nginx_reads(&library), None, "a library, not an nginx");
        assert_eq!(nginx_reads(b"not an elf"), None);
    }

    const CALL: [u8; 5] = [0xE8, 0, 0, 0, 0];
    const KEEP_C: [u8; 3] = [0x48, 0x89, 0xFB]; // mov %rdi,%rbx
    const KEEP_BUF: [u8; 3] = [0x49, 0x89, 0xF5]; // mov %rsi,%r13
    const FIELD_98: [u8; 7] = [0x48, 0x8B, 0x93, 0x98, 0, 0, 0]; // mov 0x98(%rbx),%rdx
    const FIRST_WORD: [u8; 3] = [0x48, 0x8B, 0x3A]; // mov (%rdx),%rdi
    const PASS_BUF: [u8; 3] = [0x4C, 0x89, 0xEE]; // mov %r13,%rsi
    const KEEP_N: [u8; 3] = [0x48, 0x63, 0xE8]; // movslq %eax,%rbp
    const TEST_N: [u8; 2] = [0x85, 0xED]; // test %ebp,%ebp
    const RET: [u8; 1] = [0xC3];

    fn path(parts: &[&[u8]]) -> Option<ReadPath> {
        read_path(&parts.concat(), 0x1000)
    }

    #[test]
    fn the_ssl_field_is_followed_through_registers_and_a_call_clobbers_what_it_may() {
        let field = |parts: &[&[u8]]| path(parts).map(|found| found.ssl_field);
        // c kept in a callee-saved register across a call, then c->ssl->connection passed on with buf
        assert_eq!(field(&[&KEEP_C, &KEEP_BUF, &CALL, &FIELD_98, &FIRST_WORD, &PASS_BUF, &CALL]), Some(0x98));
        // another word of the structure is not the SSL*
        let second_word = [0x48, 0x8B, 0x7A, 0x08]; // mov 0x8(%rdx),%rdi
        assert_eq!(field(&[&KEEP_C, &FIELD_98, &second_word, &CALL, &RET]), None);
        // c and buf left in rdi and rsi, the arguments' registers, until a call may change them
        let field_from_rdi = [0x48, 0x8B, 0x97, 0x90, 0, 0, 0]; // mov 0x90(%rdi),%rdx
        assert_eq!(field(&[&field_from_rdi, &FIRST_WORD, &CALL]), Some(0x90));
        let rdx_first_word = [0x48, 0x8B, 0x02]; // mov (%rdx),%rax
        let rax_to_rdi = [0x48, 0x89, 0xC7]; // mov %rax,%rdi
        assert_eq!(field(&[&KEEP_BUF, &field_from_rdi, &rdx_first_word, &rax_to_rdi, &PASS_BUF, &CALL]), Some(0x90));
        assert_eq!(field(&[&KEEP_BUF, &CALL, &field_from_rdi, &FIRST_WORD, &PASS_BUF, &CALL, &RET]), None);
        // a register overwritten in between (xor %ebx,%ebx) no longer holds c
        let clear_rbx = [0x31, 0xDB];
        assert_eq!(field(&[&KEEP_C, &KEEP_BUF, &clear_rbx, &FIELD_98, &FIRST_WORD, &PASS_BUF, &CALL, &RET]), None);
        // an implausible offset (not 8-byte aligned) is refused, and SSL_get_error(ssl, n) is not SSL_read
        let field_odd = [0x48, 0x8B, 0x93, 0x9C, 0, 0, 0];
        assert_eq!(field(&[&KEEP_C, &KEEP_BUF, &field_odd, &FIRST_WORD, &PASS_BUF, &CALL]), None);
        let n_to_esi = [0x89, 0xC6]; // mov %eax,%esi
        assert_eq!(field(&[&KEEP_C, &FIELD_98, &FIRST_WORD, &n_to_esi, &CALL, &RET]), None);
        assert!(path(&[]).is_none());
    }

    #[test]
    fn the_success_paths_first_call_is_where_the_result_buffer_and_connection_are_read() {
        let head: [&[u8]; 6] = [&KEEP_C, &KEEP_BUF, &FIELD_98, &FIRST_WORD, &PASS_BUF, &CALL];
        let n_to_esi = [0x89, 0xEE]; // mov %ebp,%esi
        let c_to_rdi = [0x48, 0x89, 0xDF]; // mov %rbx,%rdi
        let jle = [0x7E, 0x08]; // jle past the success path
        let delivered = |tail: &[&[u8]]| path(&[&head[..], tail].concat()).and_then(|found| found.delivered);
        let found = delivered(&[&KEEP_N, &TEST_N, &jle, &n_to_esi, &c_to_rdi, &CALL, &RET]).expect("the call");
        assert_eq!((found.buffer, found.connection, found.ssl_connection), (Register::R13, Register::RBX, None));
        assert!(matches!(found.length, Register::RBP | Register::RSI), "{:?}", found.length);
        assert_eq!(found.at, 0x1000 + 24 + 3 + 2 + 2 + 2 + 3, "the call after the success branch");
        // `jg` jumps to the success path
        let jg = [0x7F, 0x01]; // jg over the ret
        let found = delivered(&[&KEEP_N, &TEST_N, &jg, &RET, &CALL, &RET]).expect("the call jg leads to");
        assert_eq!(found.at, 0x1000 + 24 + 3 + 2 + 2 + 1);
        // a branch before the call, the buffer register overwritten, or an untested result: no site
        assert_eq!(delivered(&[&KEEP_N, &TEST_N, &jle, &jle, &CALL]), None);
        let clobber_r13 = [0x4D, 0x31, 0xED]; // xor %r13,%r13
        assert_eq!(delivered(&[&KEEP_N, &TEST_N, &jle, &clobber_r13, &CALL]), None);
        assert_eq!(delivered(&[&KEEP_N, &c_to_rdi, &CALL]), None);
        // a jump from elsewhere onto the call: its registers may be another path's
        let jmp_back = [0xEB, 0xF8]; // jmp -8: from past the call and the ret, onto the call
        assert_eq!(delivered(&[&KEEP_N, &TEST_N, &jle, &n_to_esi, &CALL, &RET, &jmp_back]), None);
        let js = [0x78, 0x08]; // js: n == 0 would take the success path
        assert_eq!(delivered(&[&KEEP_N, &TEST_N, &js, &CALL]), None);
        // the SSL* is still found without a success site
        assert_eq!(path(&[&head[..], &[&RET]].concat()).map(|found| found.ssl_field), Some(0x98));
    }

    #[test]
    fn registers_map_to_their_pt_regs_slots() {
        assert_eq!(pt_regs_slot(Register::R15), Some(0));
        assert_eq!(pt_regs_slot(Register::RBX), Some(5));
        assert_eq!(pt_regs_slot(Register::RDI), Some(14));
        assert_eq!(pt_regs_slot(Register::RSP), None);
        assert_eq!(pt_regs_slot(Register::EAX), None, "full registers only");
    }
}
