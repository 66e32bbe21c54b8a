/* Map key and value types shared by the BPF programs (ridge.bpf.c, and
 * impair.bpf.c for the test impairment) and userspace. The Rust mirrors live in src/types.rs and check size and every
 * field offset at compile time: change both together.
 *
 * Rules: fixed-width types only, explicit padding fields (named _pad*), no
 * bool. Addresses, ports and SSRCs are in network byte order (as on the
 * wire); offsets and counters are in host byte order.
 */
#ifndef RIDGE_H
#define RIDGE_H

#include <linux/types.h>

/* Limits compiled into the maps. */
#define RIDGE_MAX_RATE_SOURCES 65536
#define RIDGE_MAX_RATE_EXEMPT 4096
#define RIDGE_MAX_STEER_FLOWS 65536
#define RIDGE_MAX_SHARDS 64
#define RIDGE_MAX_FWD_FLOWS 16384
#define RIDGE_FWD_MAX_DESTS 8
#define RIDGE_MAX_MESH_FLOWS 4096

/* Indices of the per-CPU counter array `ridge_stats`. */
enum ridge_stat {
	/* Guard: drops on media ports, by reason. */
	RIDGE_DROP_TRUNCATED = 0,    /* frame shorter than the IP total length */
	RIDGE_DROP_BAD_IP_LENGTH = 1, /* IP total/payload length inconsistent */
	RIDGE_DROP_BAD_UDP_LENGTH = 2, /* UDP length != IP payload length */
	RIDGE_DROP_FRAGMENT = 3,     /* first fragment of a fragmented datagram */
	RIDGE_DROP_RATE_LIMITED = 4, /* source over its rate */
	/* Guard: other outcomes. */
	RIDGE_GUARD_MEDIA_OK = 5,    /* valid packet on a media port */
	RIDGE_GUARD_NOT_MEDIA = 6,   /* not (attributable to) a media port: untouched */
	/* Forwarding (XDP and TC). */
	RIDGE_FWD_XDP_TX = 7,
	RIDGE_FWD_XDP_REDIRECT = 8,
	RIDGE_FWD_TC_COPIES = 9,     /* copies sent by the TC fan-out */
	RIDGE_FWD_SAMPLED = 10,      /* installed-flow packets handed to userspace */
	RIDGE_FWD_ERRORS = 11,       /* redirect/clone failures, unusable entries */
	/* Steering. */
	RIDGE_STEER_FLOW = 12,       /* known flow, sent to its shard */
	RIDGE_STEER_DEFAULT = 13,    /* unknown flow, sent to the default shard */
	RIDGE_STEER_HASH = 14,       /* unknown flow, left to the kernel's hash */
	RIDGE_STEER_ERRORS = 15,     /* shard slot empty, select failed, or an
				      * unusable STUN binding request */
	RIDGE_STEER_STUN_LEARNED = 16, /* unknown flow steered (and learned) by
					* the shard in its STUN USERNAME */
	/* Guard, again (appended: indices never move). */
	RIDGE_GUARD_RATE_EXEMPT = 17, /* media packet from a rate-exempt source
				       * while the rate limit is on (also counted
				       * as RIDGE_GUARD_MEDIA_OK when it passes) */
	/* Mesh transit forwarding (appended: indices never move). */
	RIDGE_MESH_FORWARDED = 18,   /* verified, re-signed and sent (XDP_TX or
				      * XDP_REDIRECT; also counted there) */
	RIDGE_MESH_BAD_TAG = 19,     /* tag did not verify: passed to userspace */
	RIDGE_MESH_TOO_OLD = 20,     /* index over RIDGE_MESH_MAX_AGE behind: dropped */
	RIDGE_STAT_COUNT = 21,
};

/* Guard configuration (array map `ridge_guard_cfg`, one element).
 * Rate limiting is GCRA (a token bucket expressed as a theoretical arrival
 * time): userspace turns rate/burst into these two numbers so that the BPF
 * side needs no division. interval_ns == 0 disables rate limiting. */
struct ridge_guard_cfg {
	__u64 interval_ns;  /* 1e9 / packets per second */
	__u64 tolerance_ns; /* interval_ns * (burst - 1) */
	__u32 exempt_any;   /* non-zero while ridge_rate_exempt has entries:
			     * with 0 the guard skips that lookup */
	__u32 _pad0;
};

/* Rate-limiter key (LRU hash `ridge_rate`): the source address; IPv4 as
 * IPv4-mapped IPv6 (::ffff:a.b.c.d). */
struct ridge_src_key {
	__u8 addr[16];
};

/* Rate-limit exemptions (hash `ridge_rate_exempt`, key struct
 * ridge_src_key, value __u8 non-zero): sources never rate-limited, such as
 * peer nodes whose mesh links carry many rooms. Every other check applies. */

/* Rate-limiter state: the theoretical arrival time of the next packet. */
struct ridge_rate_state {
	__u64 tat_ns;
};

/* Steering key (hash `ridge_steer_flows`): the flow as the shard sockets
 * see it. Addresses IPv4-mapped for IPv4. */
struct ridge_steer_key {
	__u8 src_addr[16];
	__u8 dst_addr[16];
	__u16 src_port;
	__u16 dst_port;
};

/* Steering configuration (array `ridge_steer_cfg`, one element). */
struct ridge_steer_cfg {
	__u32 use_default;   /* 0: unknown flows use the kernel's hash */
	__u32 default_shard; /* index into ridge_steer_socks */
};

/* Forwarding key (hash `ridge_fwd`): IPv4 UDP 5-tuple (the protocol is
 * always UDP) plus the RTP SSRC, as received. */
struct ridge_fwd_key {
	__u32 src_addr;
	__u32 dst_addr;
	__u16 src_port;
	__u16 dst_port;
	__u32 ssrc;
};

/* One destination of a forwarded flow: the rewritten headers. */
struct ridge_fwd_dest {
	__u32 dst_addr;
	__u32 src_addr;
	__u16 dst_port;
	__u16 src_port;
	__u32 ssrc;       /* new SSRC, network order */
	__u32 ts_offset;  /* added to the RTP timestamp, mod 2^32 */
	__u16 seq_offset; /* added to the RTP sequence number, mod 2^16 */
	__u16 _pad0;
	__u32 ifindex;    /* egress interface */
	__u8 dst_mac[6];
	__u8 src_mac[6];
};

/* Forwarding value. */
struct ridge_fwd_entry {
	__u32 n_dests;      /* 1..=RIDGE_FWD_MAX_DESTS */
	__u32 sample_every; /* hand 1 in N packets to userspace; 0 = never */
	__u32 stats_slot;   /* index into ridge_fwd_stats, owned by this entry */
	__u32 _pad0;
	struct ridge_fwd_dest dests[RIDGE_FWD_MAX_DESTS];
};

/* Per-entry counters (per-CPU array `ridge_fwd_stats`, at the entry's
 * stats_slot: an array lookup is inlined, a hash lookup is not). */
struct ridge_fwd_stats {
	__u64 packets;   /* received packets forwarded in the kernel */
	__u64 bytes;     /* their size, L2 frame */
	__u64 copies;    /* packets sent (packets x destinations) */
	__u64 sampled;   /* packets handed to userspace as samples */
	__u64 errors;    /* redirect or clone failures */
	__u32 sample_countdown;
	__u32 _pad0;
};

/* Mesh transit flows (hash `ridge_mesh_fwd`, key struct ridge_fwd_key as
 * received). Every packet on a mesh link is SRTP with the NULL cipher and
 * the NULL_SIPHASH24_80 auth profile: body (the whole RTP packet) || tag,
 * tag = the first 10 bytes of SipHash-2-4-128(key, ROC as 4 bytes big-endian
 * || 4 zero bytes || body) (h1 little-endian, then h2's two low bytes).
 * Keys are (k0, k1) as SipHash reads them: little-endian u64s of key bytes
 * 0..8 and 8..16. */
#define RIDGE_MESH_TAG_LEN 10
#define RIDGE_MESH_MAX_RTP 1472 /* RTP packet with tag: 1500 - 20 - 8 */
#define RIDGE_MESH_MAX_AGE 1024 /* indices further behind the highest: dropped */
#define RIDGE_MESH_IN_VALID 1u  /* ridge_mesh_state.flags: in_highest is set */
#define RIDGE_MESH_OUT_VALID 2u /* ridge_mesh_state.flags: out_highest is set */

struct ridge_mesh_entry {
	__u64 in_key[2];  /* SipHash key of the upstream link direction: verifies */
	__u64 out_key[2]; /* SipHash key of the downstream link direction: re-signs */
	struct ridge_fwd_dest dest; /* rewrite and egress (seq_offset, ts_offset: 0) */
	__u32 state_slot; /* index into ridge_mesh_state and ridge_mesh_stats,
			   * owned by this entry */
	__u32 _pad0;
	__u64 send_epoch_ns; /* CLOCK_MONOTONIC ns of this (transit) node's core
			      * epoch: a forwarded packet's abs-send-time
			      * extension (one-byte id RIDGE_MESH_EXT_SEND_TIME)
			      * is restamped with bpf_ktime_get_ns() - this.
			      * 0: the extension is left as it is. */
};

/* The RFC 8285 one-byte header extension element of mesh link RTP packets
 * that carries the 24-bit abs-send-time (6.18 fixed-point seconds since the
 * sending node's core epoch; abs_send_time in
 * dataplane/core/src/mesh/delay.rs). */
#define RIDGE_MESH_EXT_SEND_TIME 2
#define RIDGE_MESH_EXT_MAX_ELEMS 4 /* elements walked before giving up */

/* Mesh configuration (array `ridge_mesh_cfg`, one element). */
struct ridge_mesh_cfg {
	__u32 flows; /* entries in ridge_mesh_fwd (userspace keeps it equal, or
		      * above while an insert is under way): with 0 the XDP
		      * path skips that hash lookup */
	__u32 _pad0;
};

/* Per-flow SRTP index state (array `ridge_mesh_state`, NOT per-CPU: the
 * state belongs to the flow). Updated with plain stores: one flow's packets
 * arrive on one RX queue (RSS hashes the 5-tuple), so one CPU at a time. */
struct ridge_mesh_state {
	__u64 in_highest;  /* highest index accepted from upstream */
	__u64 out_highest; /* highest index sent downstream */
	__u32 flags;       /* RIDGE_MESH_IN_VALID | RIDGE_MESH_OUT_VALID */
	__u32 _pad0;
};

/* Per-flow counters (per-CPU array `ridge_mesh_stats`, at state_slot). */
struct ridge_mesh_stats {
	__u64 packets; /* verified, re-signed and sent */
	__u64 bytes;   /* their size, L2 frame */
	__u64 bad_tag; /* tag did not verify: passed to userspace */
	__u64 too_old; /* index too far behind: dropped */
	__u64 passed;  /* handed to userspace for any other reason (too short,
			* too long, no index state yet) */
};

/* Test impairment (impair.bpf.c, its own object): configuration (array map
 * `ridge_impair_cfg`, one element). A drop is decided per packet with
 * bpf_get_prandom_u32(). */
#define RIDGE_IMPAIR_PPM 1000000 /* loss_ppm at which every packet is dropped */
struct ridge_impair_cfg {
	__u32 loss_ppm; /* drop probability, parts per million (0..=RIDGE_IMPAIR_PPM) */
	__u32 udp_only; /* non-zero: only UDP over IPv4/IPv6 is impaired */
};

/* Test impairment counters (per-CPU array `ridge_impair_stats`, one
 * element). passed + dropped = packets subject to loss. */
struct ridge_impair_stats {
	__u64 passed;  /* subject to loss, let through */
	__u64 dropped; /* subject to loss, dropped (TC_ACT_SHOT) */
	__u64 exempt;  /* let through untouched: not UDP while udp_only is set */
};

/* The same sizes and offsets that src/types.rs asserts for the Rust
 * mirrors: a change on one side only fails one of the two builds. */
#define RIDGE_LAYOUT(type, size) _Static_assert(sizeof(type) == (size), #type " size")
#define RIDGE_AT(type, field, off) \
	_Static_assert(__builtin_offsetof(type, field) == (off), #type "." #field " offset")
RIDGE_LAYOUT(struct ridge_guard_cfg, 24);
RIDGE_AT(struct ridge_guard_cfg, tolerance_ns, 8);
RIDGE_AT(struct ridge_guard_cfg, exempt_any, 16);
RIDGE_LAYOUT(struct ridge_src_key, 16);
RIDGE_LAYOUT(struct ridge_rate_state, 8);
RIDGE_LAYOUT(struct ridge_steer_key, 36);
RIDGE_AT(struct ridge_steer_key, dst_addr, 16);
RIDGE_AT(struct ridge_steer_key, src_port, 32);
RIDGE_AT(struct ridge_steer_key, dst_port, 34);
RIDGE_LAYOUT(struct ridge_steer_cfg, 8);
RIDGE_AT(struct ridge_steer_cfg, default_shard, 4);
RIDGE_LAYOUT(struct ridge_fwd_key, 16);
RIDGE_AT(struct ridge_fwd_key, dst_addr, 4);
RIDGE_AT(struct ridge_fwd_key, src_port, 8);
RIDGE_AT(struct ridge_fwd_key, dst_port, 10);
RIDGE_AT(struct ridge_fwd_key, ssrc, 12);
RIDGE_LAYOUT(struct ridge_fwd_dest, 40);
RIDGE_AT(struct ridge_fwd_dest, src_addr, 4);
RIDGE_AT(struct ridge_fwd_dest, dst_port, 8);
RIDGE_AT(struct ridge_fwd_dest, src_port, 10);
RIDGE_AT(struct ridge_fwd_dest, ssrc, 12);
RIDGE_AT(struct ridge_fwd_dest, ts_offset, 16);
RIDGE_AT(struct ridge_fwd_dest, seq_offset, 20);
RIDGE_AT(struct ridge_fwd_dest, ifindex, 24);
RIDGE_AT(struct ridge_fwd_dest, dst_mac, 28);
RIDGE_AT(struct ridge_fwd_dest, src_mac, 34);
RIDGE_LAYOUT(struct ridge_fwd_entry, 16 + 40 * RIDGE_FWD_MAX_DESTS);
RIDGE_AT(struct ridge_fwd_entry, sample_every, 4);
RIDGE_AT(struct ridge_fwd_entry, stats_slot, 8);
RIDGE_AT(struct ridge_fwd_entry, dests, 16);
RIDGE_LAYOUT(struct ridge_fwd_stats, 48);
RIDGE_AT(struct ridge_fwd_stats, bytes, 8);
RIDGE_AT(struct ridge_fwd_stats, copies, 16);
RIDGE_AT(struct ridge_fwd_stats, sampled, 24);
RIDGE_AT(struct ridge_fwd_stats, errors, 32);
RIDGE_AT(struct ridge_fwd_stats, sample_countdown, 40);
RIDGE_LAYOUT(struct ridge_mesh_entry, 32 + 40 + 8 + 8);
RIDGE_AT(struct ridge_mesh_entry, out_key, 16);
RIDGE_AT(struct ridge_mesh_entry, dest, 32);
RIDGE_AT(struct ridge_mesh_entry, state_slot, 72);
RIDGE_AT(struct ridge_mesh_entry, _pad0, 76);
RIDGE_AT(struct ridge_mesh_entry, send_epoch_ns, 80);
RIDGE_LAYOUT(struct ridge_mesh_cfg, 8);
RIDGE_AT(struct ridge_mesh_cfg, _pad0, 4);
RIDGE_LAYOUT(struct ridge_mesh_state, 24);
RIDGE_AT(struct ridge_mesh_state, out_highest, 8);
RIDGE_AT(struct ridge_mesh_state, flags, 16);
RIDGE_AT(struct ridge_mesh_state, _pad0, 20);
RIDGE_LAYOUT(struct ridge_mesh_stats, 40);
RIDGE_AT(struct ridge_mesh_stats, bytes, 8);
RIDGE_AT(struct ridge_mesh_stats, bad_tag, 16);
RIDGE_AT(struct ridge_mesh_stats, too_old, 24);
RIDGE_AT(struct ridge_mesh_stats, passed, 32);
RIDGE_LAYOUT(struct ridge_impair_cfg, 8);
RIDGE_AT(struct ridge_impair_cfg, udp_only, 4);
RIDGE_LAYOUT(struct ridge_impair_stats, 24);
RIDGE_AT(struct ridge_impair_stats, dropped, 8);
RIDGE_AT(struct ridge_impair_stats, exempt, 16);

#endif
