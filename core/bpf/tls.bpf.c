// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/* The TLS library's plaintext, read where the gateway's own processes hand it to (or get it from)
 * OpenSSL: in an nginx, reads by one probe inside ngx_ssl_recv, on the call only a successful SSL_read
 * leads to (see ngx_read_delivered); elsewhere by an entry probe and a uretprobe on the internal read
 * worker ssl_read_internal; writes by an entry probe alone on the write worker ssl_write_internal (see
 * ssl_write_worker), the workers found by the loader (else entry probes and uretprobes on SSL_read,
 * SSL_read_ex, SSL_write and SSL_write_ex themselves); and SSL_set_fd (a connection starts), SSL_free
 * (it ends), SSL_shutdown and SSL_sendfile (they send on the socket outside a write). The socket behind
 * an SSL* is the one behind the descriptor SSL_set_fd is given (the kernel's struct sock gives the
 * 4-tuple through BTF); for a connection that began before the probes, nginx's c->fd, else the sock
 * layer's own tracepoints (sock_recv_length, sock_send_length) fired while that thread is inside an SSL
 * read. No kprobes, no kernel headers: CO-RE against /sys/kernel/btf/vmlinux. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define S_IFMT 0170000
#define S_IFSOCK 0140000
/* Plaintext bytes one ring-buffer record carries; a longer call is cut into pieces (a per-CPU value,
 * twice this, must stay under the kernel's 32 KiB per-CPU limit) */
#define PIECE 8192
/* Pieces one call may send (1 MiB: ngx_ssl_recv fills what nginx asks, its body buffer at most): past
 * PIECES * PIECE bytes the rest is counted truncated (the core sees a gap) */
#define PIECES 128

enum kind {
	KIND_READ = 0, KIND_WRITE = 1, KIND_OPEN = 2, KIND_CLOSE = 3, KIND_EXIT = 5,
	/* the write this thread sent at its entry did not go out (a send on its socket failed): the
	 * gateway calls again with the same bytes, so the core forgets this attempt's */
	KIND_WRITE_FAILED = 6,
	/* the stream's socket is not on a TLS port the agent meters (the gateway's own TLS to its upstream,
	 * its Admin API's port): the core forgets what it has of it, and nothing more of it is sent */
	KIND_UNMETERED = 7,
};

struct chunk_header {
	__u64 ssl;
	__u64 time_ns;
	__u32 pid;
	__u32 kind;
	/* where in this call's plaintext this piece begins, and the call's whole length */
	__u32 offset;
	__u32 call_len;
	__u32 len; /* bytes of plaintext that follow */
	__u16 family;
	__u16 local_port;
	__u16 remote_port;
	/* at SSL_free: the client had closed its side first (a FIN or RST was received) */
	__u16 client_left;
	/* the client's initial sequence number + 1, and the next byte the gateway reads, both as in TCP */
	__u32 client_isn;
	__u32 copied_seq;
	__u8 local_addr[16];
	__u8 remote_addr[16];
	__u32 tid;
	/* a write sent at its call's entry, before its outcome is known: the core holds it until the thread
	 * goes on (or a KIND_WRITE_FAILED for it comes) */
	__u32 at_entry;
	/* stream_pos is known (the stream's socket was): the count's generation, never 0 (see struct
	 * endpoint's); 0 when it is not */
	__u32 positioned;
	/* where this call's plaintext begins in its direction of the stream: the bytes of the calls before
	 * it since its socket was known. A call the ring had no room for is then a gap of known length in
	 * the core, as a lost segment is in TCP, and a write sent again one it already has. `other_pos`: the
	 * other direction's count then, as TCP's ACK (what the gateway had written when it read, what it had
	 * read when it wrote), by which the core tells which answers a gap held. At SSL_free: the bytes read
	 * in all, and in `other_pos` those written (what the stream's last records may have lost) */
	__u64 stream_pos;
	__u64 other_pos;
};

/* the scratch record: twice a piece, so that the verifier can bound a length by a mask */
struct chunk {
	struct chunk_header h;
	__u8 data[PIECE * 2];
};

struct call {
	__u64 ssl;
	__u64 buf;
	__u64 ex_len; /* size_t * of the _ex forms and the workers, 0 for SSL_read/SSL_write */
	__u32 kind;
	__u32 active; /* between the call's entry and its return (a write sent at entry: until the next call) */
	__u32 at_entry; /* a write whose bytes were sent at its entry */
	__u32 learned; /* this call's stream has its socket: the sock tracepoints need not look */
	/* a write sent at entry: how far the gateway had read its socket then (tcp_sock's copied_seq) */
	__u32 copied_seq;
	/* a write sent at entry whose stream was positioned: its length, taken back from the position if the
	 * write fails (the gateway sends the same bytes again) */
	__u32 positioned_len;
};

struct stream_key {
	__u64 ssl;
	__u32 pid;
	__u32 pad;
};

struct endpoint {
	__u64 sk;
	__u16 family;
	__u16 local_port;
	__u16 remote_port;
	__u16 metered; /* local_port is one of the TLS ports */
	__u8 local_addr[16];
	__u8 remote_addr[16];
	/* plaintext bytes read and written since the socket was known, by KIND_READ and KIND_WRITE */
	__u64 position[2];
	/* which count this is, never 0: an entry evicted and learned again counts from 0 anew, and the core
	 * must not take its small numbers for bytes it already has */
	__u32 generation;
	/* the client's initial sequence number + 1, read once when the socket is learned (not at each read) */
	__u32 client_isn;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 << 20);
} chunks SEC(".maps");

/* Watched processes' children, as they fork, on a ring of their own: the agent learns of them ahead of the
 * records the chunks ring holds before them. A child inherits its parent's probes (see trace_events.rs),
 * so nothing waits on this to probe it. */
struct fork {
	__u32 child;
	__u32 parent;
	__u64 time_ns;
	__u32 kind; /* FORK_EXEC: `child` exec'd another program (parent is itself) */
	__u32 thread; /* the parent's thread that forked */
};
#define FORK_EXEC 1

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 10);
} forks SEC(".maps");

/* Where an nginx keeps what its read probe reads, found by the loader in its executable's code
 * (nginx_reads.rs); all zero in another process. */
struct nginx_layout {
	__u32 ssl_field; /* where ngx_connection_t holds `ssl`, whose first field is the SSL* */
	/* struct pt_regs slots (8-byte words) of the registers that hold, at ngx_read_delivered's probe, what
	 * SSL_read returned, the buffer it filled and the connection c */
	__u8 length;
	__u8 buffer;
	__u8 connection;
	__u8 ssl_connection; /* c->ssl, where a register holds it (else NO_REGISTER) */
};
#define NO_REGISTER 0xff

/* processes to watch (the gateway's): its PIDs are the keys */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct nginx_layout);
} watched SEC(".maps");

/* the TLS ports metered (--tls-port), set by the loader */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} tls_ports SEC(".maps");

/* the SSL call each thread is in, between entry and return: the thread's own storage, cheaper than a
 * map keyed by thread id */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct call);
} calls SEC(".maps");

/* each stream's socket, once the sock layer showed it */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct stream_key);
	__type(value, struct endpoint);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct chunk);
} scratch SEC(".maps");

/* 0: records the ring had no room for; 1: plaintext bytes never captured (past PIECES) or unreadable;
 * 2: calls seen but not followed (no room for the thread's call; at nginx's read site, a connection whose
 * SSL* could not be read): their bytes never reach the core */
#define UNFOLLOWED 2
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} losses SEC(".maps");

/* Records wake no one: the consumer reads the ring at least every 100 ms (the capture loop's poll), which
 * its 128 MiB hold many seconds of at the gateway's peak, and a wakeup is an interrupt on the gateway's
 * CPU (as asking how full the ring is would be a cache line shared with the consumer's). */
#define QUIET BPF_RB_NO_WAKEUP

static __always_inline void count(__u32 which, __u64 amount)
{
	__u64 *value = bpf_map_lookup_elem(&losses, &which);
	if (value)
		*value += amount;
}

static __always_inline int is_watched(void)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	return bpf_map_lookup_elem(&watched, &pid) != 0;
}

/* A uprobe traps in every process that has a perf event on it: the gateway's processes, and the agent's
 * own (which holds each trace event's program, and maps the same libssl for its own HTTPS), so a probe
 * that may run before the stream's socket is known checks the process. */
static __always_inline int enter(__u64 ssl, __u64 buf, __u64 ex_len, __u32 kind)
{
	if (!is_watched())
		return 0;
	struct call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!call) {
		count(UNFOLLOWED, 1);
		return 0;
	}
	call->ssl = ssl;
	call->buf = buf;
	call->ex_len = ex_len;
	call->kind = kind;
	call->active = 1;
	call->at_entry = 0;
	call->learned = 0;
	return 0;
}

static __always_inline struct endpoint *endpoint_of(__u64 ssl)
{
	struct stream_key key = { .ssl = ssl, .pid = bpf_get_current_pid_tgid() >> 32 };
	return bpf_map_lookup_elem(&endpoints, &key);
}

/* `endpoint`: the stream's socket, if known */
static __always_inline void fill_header(struct chunk_header *h, __u64 ssl, __u32 kind, struct endpoint *endpoint)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	h->ssl = ssl;
	h->pid = pid;
	h->kind = kind;
	h->time_ns = bpf_ktime_get_ns();
	h->offset = 0;
	h->call_len = 0;
	h->len = 0;
	h->client_left = 0;
	h->tid = (__u32)bpf_get_current_pid_tgid();
	h->at_entry = 0;
	h->positioned = 0;
	h->stream_pos = 0;
	h->other_pos = 0;
	if (endpoint) {
		h->family = endpoint->family;
		h->local_port = endpoint->local_port;
		h->remote_port = endpoint->remote_port;
		__builtin_memcpy(h->local_addr, endpoint->local_addr, 16);
		__builtin_memcpy(h->remote_addr, endpoint->remote_addr, 16);
		h->client_isn = 0;
		h->copied_seq = 0;
		/* on every read's record, not only a stream's first: the core takes its id base from the
		 * first it gets, which may be a later one (a record dropped, a stream the core re-created) */
		if (kind == KIND_READ) {
			struct tcp_sock *tp = (struct tcp_sock *)endpoint->sk;
			h->client_isn = endpoint->client_isn;
			h->copied_seq = BPF_CORE_READ(tp, copied_seq);
		}
	} else {
		h->client_isn = 0;
		h->copied_seq = 0;
		h->family = 0;
		h->local_port = 0;
		h->remote_port = 0;
		__builtin_memset(h->local_addr, 0, 16);
		__builtin_memset(h->remote_addr, 0, 16);
	}
}

/* The 4-tuple of a TCP socket, and whether it is on a metered port; 0 if it is not TCP over IP. */
static __always_inline int describe(struct sock *sk, struct endpoint *endpoint)
{
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	endpoint->sk = (__u64)sk;
	endpoint->family = family;
	endpoint->local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	endpoint->remote_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	endpoint->metered = bpf_map_lookup_elem(&tls_ports, &endpoint->local_port) != 0;
	endpoint->generation = (__u32)bpf_ktime_get_ns() | 1;
	/* rcv_nxt less the bytes received: the same all along the connection, but for the FIN's 1 */
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	endpoint->client_isn = BPF_CORE_READ(tp, rcv_nxt) - (__u32)BPF_CORE_READ(tp, bytes_received);
	if (family == AF_INET) {
		__u32 local = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 remote = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(endpoint->local_addr, &local, 4);
		__builtin_memcpy(endpoint->remote_addr, &remote, 4);
		return 1;
	}
	if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&endpoint->local_addr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&endpoint->remote_addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
		return 1;
	}
	return 0;
}

/* The socket behind file descriptor `fd` of the current process, or 0. */
static __always_inline struct sock *socket_of(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *table = BPF_CORE_READ(task, files, fdt);
	if (fd < 0 || (__u32)fd >= BPF_CORE_READ(table, max_fds))
		return 0;
	struct file **files = BPF_CORE_READ(table, fd);
	struct file *file = 0;
	if (bpf_probe_read_kernel(&file, sizeof(file), &files[fd]) || !file)
		return 0;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	struct socket *socket = BPF_CORE_READ(file, private_data);
	return BPF_CORE_READ(socket, sk);
}

struct pieces {
	__u64 buf;
	__u64 length;
};

/* Piece `index` of a call whose header is in the scratch record: bpf_loop's callback, so that the
 * verifier checks one piece, not each of PIECES */
static long send_piece(__u64 index, struct pieces *call)
{
	__u32 zero = 0;
	struct chunk *chunk = bpf_map_lookup_elem(&scratch, &zero);
	__u64 offset = index * PIECE;
	if (!chunk || offset >= call->length)
		return 1;
	__u64 size = call->length - offset;
	if (size > PIECE)
		size = PIECE;
	chunk->h.offset = offset;
	chunk->h.len = size;
	if (bpf_probe_read_user(chunk->data, size & (PIECE * 2 - 1), (void *)(call->buf + offset))) {
		count(1, size);
		chunk->h.len = 0; /* still sent: the core learns the bytes are missing */
		size = 0;
	}
	__u64 bytes = sizeof(struct chunk_header) + (size & (PIECE * 2 - 1));
	if (bpf_ringbuf_output(&chunks, chunk, bytes, QUIET))
		count(0, 1);
	return 0;
}

/* One call's plaintext, cut into pieces, into the ring; `endpoint`: its stream's socket, if known. */
static __always_inline int send_call(__u64 ssl, __u32 kind, __u64 buf, __u64 length, __u32 at_entry,
				     struct endpoint *endpoint)
{
	if (length == 0 || length > 0xffffffff)
		return 0;
	if (endpoint && !endpoint->metered)
		return 0; /* a connection of the gateway's on another port */
	__u32 zero = 0;
	struct chunk *chunk = bpf_map_lookup_elem(&scratch, &zero);
	if (!chunk)
		return 0;
	fill_header(&chunk->h, ssl, kind, endpoint);
	chunk->h.call_len = length;
	chunk->h.at_entry = at_entry;
	chunk->h.positioned = endpoint ? endpoint->generation : 0;
	chunk->h.stream_pos = endpoint ? __sync_fetch_and_add(&endpoint->position[kind & 1], length) : 0;
	chunk->h.other_pos = endpoint ? endpoint->position[(kind & 1) ^ 1] : 0;
	struct pieces call = { .buf = buf, .length = length };
	bpf_loop(PIECES, send_piece, &call, 0);
	if (length > (__u64)PIECES * PIECE)
		count(1, length - (__u64)PIECES * PIECE);
	return 0;
}

static __always_inline int leave(long ret)
{
	struct call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (!call || !call->active || call->at_entry)
		return 0;
	call->active = 0;
	struct call done = *call;
	__u64 length;
	if (done.ex_len) {
		if (ret <= 0)
			return 0;
		size_t got = 0;
		if (bpf_probe_read_user(&got, sizeof(got), (void *)done.ex_len))
			return 0;
		length = got;
	} else {
		if (ret <= 0)
			return 0;
		length = ret;
	}
	return send_call(done.ssl, done.kind, done.buf, length, 0, endpoint_of(done.ssl));
}

/* `endpoint`: the stream's socket, if known (every caller has it at hand) */
static __always_inline void send_marker(__u64 ssl, __u32 kind, __u16 client_left, struct endpoint *endpoint)
{
	struct chunk_header h = {};
	fill_header(&h, ssl, kind, endpoint);
	h.client_left = client_left;
	/* at SSL_set_fd the counts begin (both 0); at SSL_free they are the stream's totals */
	if ((kind == KIND_OPEN || kind == KIND_CLOSE) && endpoint) {
		h.positioned = endpoint->generation;
		h.stream_pos = endpoint->position[KIND_READ];
		h.other_pos = endpoint->position[KIND_WRITE];
	}
	if (bpf_ringbuf_output(&chunks, &h, sizeof(h), QUIET))
		count(0, 1);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_enter, void *ssl, void *buf, int num)
{
	return enter((__u64)ssl, (__u64)buf, 0, KIND_READ);
}

SEC("uprobe")
int BPF_KPROBE(ssl_read_ex_enter, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	return enter((__u64)ssl, (__u64)buf, (__u64)readbytes, KIND_READ);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_enter, void *ssl, const void *buf, int num)
{
	return enter((__u64)ssl, (__u64)buf, 0, KIND_WRITE);
}

SEC("uprobe")
int BPF_KPROBE(ssl_write_ex_enter, void *ssl, const void *buf, size_t num, size_t *written)
{
	return enter((__u64)ssl, (__u64)buf, (__u64)written, KIND_WRITE);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_return, int ret)
{
	return leave(ret);
}

/* c->ssl->connection, or 0; `connection` is c->ssl where the caller has it, else 0 */
static __always_inline __u64 ssl_of(__u64 c, __u32 ssl_field, __u64 connection)
{
	__u64 ssl = 0;
	if (!connection &&
	    (bpf_probe_read_user(&connection, sizeof(connection), (void *)(c + (ssl_field & 0xfff))) || !connection))
		return 0;
	if (bpf_probe_read_user(&ssl, sizeof(ssl), (void *)connection))
		return 0;
	return ssl;
}

/* The general registers at the probe, as 8-byte words in struct pt_regs's order: the verifier allows
 * context reads at constant offsets only, so they are copied out to be indexed. */
#define WORDS 15
struct words {
	__u64 word[WORDS];
};

static __always_inline void copy_registers(struct words *to, struct pt_regs *regs)
{
	to->word[0] = regs->r15;
	to->word[1] = regs->r14;
	to->word[2] = regs->r13;
	to->word[3] = regs->r12;
	to->word[4] = regs->bp;
	to->word[5] = regs->bx;
	to->word[6] = regs->r11;
	to->word[7] = regs->r10;
	to->word[8] = regs->r9;
	to->word[9] = regs->r8;
	to->word[10] = regs->ax;
	to->word[11] = regs->cx;
	to->word[12] = regs->dx;
	to->word[13] = regs->si;
	to->word[14] = regs->di;
}

static __always_inline __u64 register_at(struct words *regs, __u8 slot)
{
	return slot < WORDS ? regs->word[slot] : 0;
}

/* The socket found for a stream begun before the probes: kept, and if it is on a port not metered, the
 * core told to forget what it may have of the stream. */
static __always_inline void remember_begun(struct stream_key *key, struct endpoint *endpoint)
{
	bpf_map_update_elem(&endpoints, key, endpoint, BPF_ANY);
	if (!endpoint->metered)
		send_marker(key->ssl, KIND_UNMETERED, 0, endpoint);
}

/* A connection begun before the probes, at its first read: its socket from nginx's c->fd (the fourth
 * word of ngx_connection_t in every nginx: data, read, write, fd). */
static __always_inline struct endpoint *learn_from_fd(__u64 ssl, __u64 c)
{
	int fd = -1;
	struct endpoint endpoint = {};
	if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(c + 24)))
		return 0;
	struct sock *sk = socket_of(fd);
	if (!sk || !describe(sk, &endpoint))
		return 0;
	struct stream_key key = { .ssl = ssl, .pid = bpf_get_current_pid_tgid() >> 32 };
	remember_begun(&key, &endpoint);
	return bpf_map_lookup_elem(&endpoints, &key);
}

/* The one probe of a read where the loader found, in ngx_ssl_recv, the call only a successful SSL_read
 * leads to: the registers hold its byte count, the buffer it filled and c there. One trap per request,
 * where the entry and return of ngx_ssl_recv take two (and the library's read worker four). */
SEC("uprobe")
int ngx_read_delivered(struct pt_regs *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct nginx_layout *layout = bpf_map_lookup_elem(&watched, &pid);
	if (!layout || !layout->ssl_field)
		return 0;
	struct words regs;
	copy_registers(&regs, ctx);
	__s32 length = (__s32)register_at(&regs, layout->length);
	if (length <= 0)
		return 0;
	__u64 c = register_at(&regs, layout->connection);
	__u64 ssl = ssl_of(c, layout->ssl_field, register_at(&regs, layout->ssl_connection));
	if (!ssl) {
		count(UNFOLLOWED, 1);
		return 0;
	}
	struct endpoint *endpoint = endpoint_of(ssl);
	if (!endpoint)
		endpoint = learn_from_fd(ssl, c);
	return send_call(ssl, KIND_READ, register_at(&regs, layout->buffer), length, 0, endpoint);
}

/* ssl_write_internal(s, buf, num, ...), without a uretprobe: the bytes are all in buf at entry, and
 * a write either sends them all or fails (OpenSSL's writes are not partial unless the gateway asks, and
 * nginx does not); a failure shows as a failed send on the stream's socket while the call is the
 * thread's latest (sock_send_failed below), and the gateway then calls again with the same bytes. This saves
 * the return's trap into the kernel on every response. */
SEC("uprobe")
int BPF_KPROBE(ssl_write_worker, void *ssl, const void *buf, size_t num)
{
	/* a known stream is a watched process's (ssl_set_fd and the socket's learning check) */
	struct endpoint *endpoint = endpoint_of((__u64)ssl);
	if (!endpoint && !is_watched())
		return 0;
	struct call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0,
						 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!call) {
		count(UNFOLLOWED, 1);
		return 0;
	}
	call->ssl = (__u64)ssl;
	call->buf = (__u64)buf;
	call->ex_len = 0; /* (the fourth argument is `flags` from OpenSSL 3.2 on: not read) */
	call->kind = KIND_WRITE;
	call->active = 1;
	call->at_entry = 1;
	call->copied_seq = 0;
	call->positioned_len = 0;
	if (endpoint) {
		struct tcp_sock *tp = (struct tcp_sock *)endpoint->sk;
		call->copied_seq = BPF_CORE_READ(tp, copied_seq);
		if (endpoint->metered && num > 0 && num <= 0xffffffff)
			call->positioned_len = num;
	}
	return send_call((__u64)ssl, KIND_WRITE, (__u64)buf, num, 1, endpoint);
}

/* SSL_shutdown sends the close_notify alert, SSL_sendfile a file over kernel TLS: a failed send then is
 * not the last write's. */
SEC("uprobe")
int BPF_KPROBE(ssl_shutdown, void *ssl)
{
	struct call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (call)
		call->active = 0;
	return 0;
}

/* A connection starts on socket fd: its 4-tuple is known from its first byte, and a connection on a port not
 * metered never reaches the core. */
SEC("uprobe")
int BPF_KPROBE(ssl_set_fd, void *ssl, int fd)
{
	if (!is_watched())
		return 0;
	struct stream_key key = { .ssl = (__u64)ssl, .pid = bpf_get_current_pid_tgid() >> 32 };
	struct endpoint endpoint = {};
	struct sock *sk = socket_of(fd);
	int found = sk && describe(sk, &endpoint);
	if (found) {
		bpf_map_update_elem(&endpoints, &key, &endpoint, BPF_ANY);
		if (!endpoint.metered)
			return 0;
	} else {
		bpf_map_delete_elem(&endpoints, &key); /* an SSL* freed and allocated again: not the old socket */
	}
	send_marker((__u64)ssl, KIND_OPEN, 0, found ? &endpoint : 0);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_free, void *ssl)
{
	if (!ssl || !is_watched())
		return 0;
	struct stream_key key = { .ssl = (__u64)ssl, .pid = bpf_get_current_pid_tgid() >> 32 };
	struct endpoint *endpoint = bpf_map_lookup_elem(&endpoints, &key);
	if (!endpoint) {
		send_marker((__u64)ssl, KIND_CLOSE, 0, 0);
		return 0;
	}
	if (endpoint->metered) {
		struct sock *sk = (struct sock *)endpoint->sk;
		__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);
		send_marker((__u64)ssl, KIND_CLOSE, state == TCP_CLOSE_WAIT || state == TCP_CLOSE, endpoint);
	}
	bpf_map_delete_elem(&endpoints, &key);
	return 0;
}

/* A send failed (EAGAIN: the socket's buffer is full; or the connection broke) while the thread's latest
 * SSL call is a write sent at entry: if the socket is that stream's, the write did not go out. */
static __always_inline void write_failed(struct call *call, struct sock *sk)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct stream_key key = { .ssl = call->ssl, .pid = pid };
	struct endpoint *endpoint = bpf_map_lookup_elem(&endpoints, &key);
	if (!endpoint || endpoint->sk != (__u64)sk)
		return;
	call->active = 0;
	/* the gateway has read from this socket since the write's entry: the write's call is over (a write
	 * does not receive), and this is another call's send (an alert inside a read, whose entry nginx's
	 * read probe does not see) */
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	if (BPF_CORE_READ(tp, copied_seq) != call->copied_seq)
		return;
	if (call->positioned_len)
		__sync_fetch_and_add(&endpoint->position[KIND_WRITE], -(__u64)call->positioned_len);
	if (endpoint->metered)
		send_marker(call->ssl, KIND_WRITE_FAILED, 0, endpoint);
}

/* The socket a thread inside an SSL call sends on or receives from is that SSL*'s. Not during a write sent
 * at entry: with no return probe, the call may be over, and the thread sending on another socket. */
static __always_inline int learn_socket(struct sock *sk, int ret)
{
	struct call *call = bpf_task_storage_get(&calls, bpf_get_current_task_btf(), 0, 0);
	if (!call || !call->active)
		return 0;
	if (call->at_entry) {
		if (ret < 0)
			write_failed(call, sk);
		return 0;
	}
	if (call->learned)
		return 0;
	call->learned = 1;
	struct stream_key key = { .ssl = call->ssl, .pid = bpf_get_current_pid_tgid() >> 32 };
	if (bpf_map_lookup_elem(&endpoints, &key))
		return 0;
	struct endpoint endpoint = {};
	if (describe(sk, &endpoint))
		remember_begun(&key, &endpoint);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv, struct sock *sk, int ret, int flags)
{
	return learn_socket(sk, 0);
}

/* A send that failed: what an nginx's writes need of the sends (see ssl_write_worker), attached always. */
SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send_failed, struct sock *sk, int ret, int flags)
{
	return ret < 0 ? learn_socket(sk, ret) : 0;
}

/* The other sends, which learn a library call's socket: attached with sock_recv. Every send of the host
 * runs the two tracepoints' programs, some four per HTTPS request (the client's, the gateway's, its
 * upstream's), so an nginx alone is spared this one. */
SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send, struct sock *sk, int ret, int flags)
{
	return ret >= 0 ? learn_socket(sk, 0) : 0;
}

/* A watched process forks (nginx's master starting workers on a reload): the child, which inherited its
 * parent's probes, is watched at once, and the agent told. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(process_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 parent_pid = BPF_CORE_READ(parent, tgid);
	__u32 child_pid = BPF_CORE_READ(child, tgid);
	struct nginx_layout *layout = bpf_map_lookup_elem(&watched, &parent_pid);
	if (child_pid == parent_pid || !layout)
		return 0;
	/* the same executable (one that execs another is unwatched then: process_exec) */
	struct nginx_layout inherited = *layout;
	bpf_map_update_elem(&watched, &child_pid, &inherited, BPF_ANY);
	/* (one lost here is found by the agent's next look at the listeners, within seconds) */
	struct fork fork = { .child = child_pid, .parent = parent_pid, .time_ns = bpf_ktime_get_ns(), .kind = 0,
			     .thread = BPF_CORE_READ(parent, pid) };
	if (bpf_ringbuf_output(&forks, &fork, sizeof(fork), QUIET))
		count(0, 1);
	return 0;
}

/* A watched process execs (an nginx binary upgrade's new master): its layout and inherited probes are the
 * old program's, so it is not watched until the agent attaches it again, which it is told to. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(process_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	__u32 pid = BPF_CORE_READ(task, tgid);
	if (!bpf_map_lookup_elem(&watched, &pid))
		return 0;
	bpf_map_delete_elem(&watched, &pid);
	bpf_task_storage_delete(&calls, task); /* a call the old program was in is over */
	struct fork exec = { .child = pid, .parent = pid, .time_ns = bpf_ktime_get_ns(), .kind = FORK_EXEC,
			     .thread = pid };
	if (bpf_ringbuf_output(&forks, &exec, sizeof(exec), QUIET))
		count(0, 1);
	return 0;
}

/* A watched process ends: its streams are over (no SSL_free comes for them). */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(process_exit, struct task_struct *task)
{
	__u32 pid = BPF_CORE_READ(task, tgid);
	if (BPF_CORE_READ(task, pid) != pid || !bpf_map_lookup_elem(&watched, &pid))
		return 0;
	bpf_map_delete_elem(&watched, &pid);
	struct chunk_header h = { .pid = pid, .kind = KIND_EXIT, .time_ns = bpf_ktime_get_ns() };
	if (bpf_ringbuf_output(&chunks, &h, sizeof(h), 0))
		count(0, 1);
	return 0;
}
