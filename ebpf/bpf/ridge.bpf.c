/* Ridge kernel fast path.
 *
 *   ridge_guard   XDP: parse, drop malformed and over-rate packets on media ports
 *   ridge_xdp     XDP: the guard, then forwarding of installed mesh transit
 *                 flows (SRTP tag verified and re-signed) and single-destination
 *                 plain-RTP flows (XDP_TX / XDP_REDIRECT)
 *   ridge_fanout  TC (clsact ingress): 1->N forwarding with bpf_clone_redirect
 *   ridge_steer   SK_REUSEPORT: send each datagram to the shard owning its flow
 *
 * Types shared with userspace are in ridge.h. See ../README.md for the design
 * and what each verdict means.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ridge.h"

/* No GPL-only helper is used, so the project's licence applies. */
char LICENSE[] SEC("license") = "Apache-2.0";

/* ---- maps ---------------------------------------------------------------- */

/* Indexed by UDP port (host order): non-zero for ports that carry media.
 * An array, not a hash: its lookup is inlined by the verifier. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} ridge_media_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ridge_guard_cfg);
} ridge_guard_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RIDGE_MAX_RATE_SOURCES);
	__type(key, struct ridge_src_key);
	__type(value, struct ridge_rate_state);
} ridge_rate SEC(".maps");

/* Sources the rate limit does not apply to (peer nodes' mesh links): a
 * plain hash, not LRU, so an entry stays until userspace removes it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RIDGE_MAX_RATE_EXEMPT);
	__type(key, struct ridge_src_key);
	__type(value, __u8);
} ridge_rate_exempt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RIDGE_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} ridge_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RIDGE_MAX_STEER_FLOWS);
	__type(key, struct ridge_steer_key);
	__type(value, __u32);
} ridge_steer_flows SEC(".maps");

/* Sized, not typed: the kernel takes no BTF key/value types for this map. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, RIDGE_MAX_SHARDS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} ridge_steer_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ridge_steer_cfg);
} ridge_steer_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RIDGE_MAX_FWD_FLOWS);
	__type(key, struct ridge_fwd_key);
	__type(value, struct ridge_fwd_entry);
} ridge_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RIDGE_MAX_FWD_FLOWS);
	__type(key, __u32);
	__type(value, struct ridge_fwd_stats);
} ridge_fwd_stats SEC(".maps");

/* Mesh transit flows: 5-tuple + SSRC -> keys and rewrite. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RIDGE_MAX_MESH_FLOWS);
	__type(key, struct ridge_fwd_key);
	__type(value, struct ridge_mesh_entry);
} ridge_mesh_fwd SEC(".maps");

/* Per-flow SRTP index state at the entry's state_slot. Shared by all CPUs
 * (an index is the flow's, not a CPU's); see struct ridge_mesh_state. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RIDGE_MAX_MESH_FLOWS);
	__type(key, __u32);
	__type(value, struct ridge_mesh_state);
} ridge_mesh_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RIDGE_MAX_MESH_FLOWS);
	__type(key, __u32);
	__type(value, struct ridge_mesh_stats);
} ridge_mesh_stats SEC(".maps");

/* How many mesh flows are installed: while none is, media packets skip the
 * ridge_mesh_fwd hash lookup (an array lookup is inlined; a hash lookup
 * costs a call and a hash, ~6 ns). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ridge_mesh_cfg);
} ridge_mesh_cfg SEC(".maps");

/* ---- helpers ------------------------------------------------------------- */

#define ETH_P_8021AD_ 0x88A8
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define RTP_MIN_HEADER 12
#define RIDGE_FWD_TTL 64

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ridge_stats, &idx);
	if (v)
		*v += 1;
}

struct vlan_hdr_ {
	__be16 tci;
	__be16 proto;
};

struct ipv6_ext_ {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct ipv6_frag_ {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* What the guard learnt about a packet it accepted. */
struct ridge_pkt {
	__u32 l3_off;
	__u32 l4_off;
	__u8 is_ipv6;
	__u8 _pad[3];
};

enum guard_verdict {
	GUARD_NOT_MEDIA, /* not attributable to a media port: pass untouched */
	GUARD_DROP,
	GUARD_OK,
};

static __always_inline int guard_drop(__u32 reason)
{
	stat_inc(reason);
	return GUARD_DROP;
}

static __always_inline int is_media_port(__u16 port_be)
{
	__u32 port = bpf_ntohs(port_be);
	__u8 *media = bpf_map_lookup_elem(&ridge_media_ports, &port);
	return media && *media;
}

/* GCRA per source address. Concurrent CPUs may race on one source's state;
 * the worst case is that a few extra packets get through. An exempt source
 * is never over its rate, and neither reads the clock nor takes (or
 * refreshes) a slot in the LRU. The exemption lookup (a hash lookup, ~20 ns)
 * is skipped while userspace says the set is empty. */
static __always_inline int over_rate(const struct ridge_src_key *src)
{
	__u32 zero = 0;
	struct ridge_guard_cfg *cfg = bpf_map_lookup_elem(&ridge_guard_cfg, &zero);
	if (!cfg || cfg->interval_ns == 0)
		return 0;
	if (cfg->exempt_any) {
		__u8 *exempt = bpf_map_lookup_elem(&ridge_rate_exempt, src);
		if (exempt && *exempt) {
			stat_inc(RIDGE_GUARD_RATE_EXEMPT);
			return 0;
		}
	}
	__u64 now = bpf_ktime_get_ns();
	struct ridge_rate_state *st = bpf_map_lookup_elem(&ridge_rate, src);
	if (!st) {
		struct ridge_rate_state fresh = { .tat_ns = now + cfg->interval_ns };
		bpf_map_update_elem(&ridge_rate, src, &fresh, BPF_ANY);
		return 0;
	}
	__u64 tat = st->tat_ns;
	if (tat < now)
		tat = now;
	if (tat - now > cfg->tolerance_ns)
		return 1;
	st->tat_ns = tat + cfg->interval_ns;
	return 0;
}

/* Checks UDP length against the IP payload length and the source's rate.
 * l4_off/ip_payload: where the UDP header starts and how long the IP payload
 * (from there) claims to be; the frame is known to hold all of it. */
static __always_inline int guard_udp(void *data, void *end, __u32 l4_off, __u32 ip_payload,
				     const struct ridge_src_key *src)
{
	if (l4_off > 0xffff)
		return guard_drop(RIDGE_DROP_TRUNCATED);
	struct udphdr *udp = data + l4_off;
	if ((void *)(udp + 1) > end)
		return guard_drop(RIDGE_DROP_TRUNCATED);
	__u32 ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(*udp) || ulen != ip_payload)
		return guard_drop(RIDGE_DROP_BAD_UDP_LENGTH);
	if (over_rate(src))
		return guard_drop(RIDGE_DROP_RATE_LIMITED);
	stat_inc(RIDGE_GUARD_MEDIA_OK);
	return GUARD_OK;
}

static __always_inline int guard_ipv4(void *data, void *end, __u32 off, struct ridge_pkt *p)
{
	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > end)
		return GUARD_NOT_MEDIA;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_UDP)
		return GUARD_NOT_MEDIA;
	__u16 frag = bpf_ntohs(ip->frag_off);
	/* A later fragment has no UDP header, so no port: it is not ours. Without
	 * its first fragment (dropped below when it is for a media port) the
	 * kernel's reassembly discards it. */
	if (frag & IP_OFFSET)
		return GUARD_NOT_MEDIA;
	__u32 ihl = ip->ihl * 4;
	__u16 *ports = (void *)ip + ihl;
	if ((void *)(ports + 2) > end)
		return GUARD_NOT_MEDIA;
	if (!is_media_port(ports[1]))
		return GUARD_NOT_MEDIA;

	if (frag & IP_MF)
		return guard_drop(RIDGE_DROP_FRAGMENT);
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl + sizeof(struct udphdr))
		return guard_drop(RIDGE_DROP_BAD_IP_LENGTH);
	if ((__u64)off + tot_len > (__u64)(end - data))
		return guard_drop(RIDGE_DROP_TRUNCATED);

	struct ridge_src_key src = {};
	src.addr[10] = 0xff;
	src.addr[11] = 0xff;
	__builtin_memcpy(&src.addr[12], &ip->saddr, 4);
	p->l3_off = off;
	p->l4_off = off + ihl;
	p->is_ipv6 = 0;
	return guard_udp(data, end, off + ihl, tot_len - ihl, &src);
}

static __always_inline int guard_ipv6(void *data, void *end, __u32 off, struct ridge_pkt *p)
{
	struct ipv6hdr *ip6 = data + off;
	if ((void *)(ip6 + 1) > end)
		return GUARD_NOT_MEDIA;
	if (ip6->version != 6)
		return GUARD_NOT_MEDIA;
	__u8 next = ip6->nexthdr;
	__u32 l4 = off + sizeof(*ip6);
	int fragmented = 0;

	/* Up to three extension headers (hop-by-hop, routing, destination
	 * options, fragment) before UDP; anything deeper is not ours. */
#pragma unroll
	for (int i = 0; i < 3; i++) {
		if (next == IPPROTO_UDP)
			break;
		if (next == IPPROTO_FRAGMENT) {
			struct ipv6_frag_ *fh = data + l4;
			if ((void *)(fh + 1) > end)
				return GUARD_NOT_MEDIA;
			if (bpf_ntohs(fh->frag_off) & 0xFFF8)
				return GUARD_NOT_MEDIA; /* later fragment: no UDP header */
			fragmented = 1;
			next = fh->nexthdr;
			l4 += sizeof(*fh);
		} else if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
			struct ipv6_ext_ *eh = data + l4;
			if ((void *)(eh + 1) > end)
				return GUARD_NOT_MEDIA;
			next = eh->nexthdr;
			l4 += (eh->hdrlen + 1) * 8;
		} else {
			return GUARD_NOT_MEDIA;
		}
	}
	if (next != IPPROTO_UDP || l4 > 0xffff)
		return GUARD_NOT_MEDIA;
	__u16 *ports = data + l4;
	if ((void *)(ports + 2) > end)
		return GUARD_NOT_MEDIA;
	if (!is_media_port(ports[1]))
		return GUARD_NOT_MEDIA;

	if (fragmented)
		return guard_drop(RIDGE_DROP_FRAGMENT);
	__u32 payload = bpf_ntohs(ip6->payload_len);
	__u32 ext_len = l4 - off - sizeof(*ip6);
	if (payload < ext_len + sizeof(struct udphdr))
		return guard_drop(RIDGE_DROP_BAD_IP_LENGTH); /* includes jumbograms (0) */
	if ((__u64)off + sizeof(*ip6) + payload > (__u64)(end - data))
		return guard_drop(RIDGE_DROP_TRUNCATED);

	struct ridge_src_key src;
	__builtin_memcpy(src.addr, &ip6->saddr, 16);
	p->l3_off = off;
	p->l4_off = l4;
	p->is_ipv6 = 1;
	return guard_udp(data, end, l4, payload - ext_len, &src);
}

static __always_inline int guard(struct xdp_md *ctx, struct ridge_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return GUARD_NOT_MEDIA;
	__be16 proto = eth->h_proto;
	__u32 off = sizeof(*eth);

	/* 802.1Q and 802.1ad (QinQ): up to two tags. */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		struct vlan_hdr_ *vh = data + off;
		if ((void *)(vh + 1) > end)
			return GUARD_NOT_MEDIA;
		proto = vh->proto;
		off += sizeof(*vh);
	}

	int verdict = GUARD_NOT_MEDIA;
	if (proto == bpf_htons(ETH_P_IP))
		verdict = guard_ipv4(data, end, off, p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		verdict = guard_ipv6(data, end, off, p);
	if (verdict == GUARD_NOT_MEDIA)
		stat_inc(RIDGE_GUARD_NOT_MEDIA);
	return verdict;
}

/* ---- forwarding: shared pieces ------------------------------------------- */

/* RFC 1624 eqn. 3 on one 16-bit word; byte order does not matter as long as
 * the checksum and the words are read the same way. */
static __always_inline void csum_replace16(__u16 *csum, __u16 old, __u16 new)
{
	__u32 s = (__u16)~*csum;
	s += (__u16)~old;
	s += new;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	*csum = (__u16)~s;
}

/* The received RTP packet is a candidate for forwarding: RTP version 2 and
 * not RTCP (RFC 5761: second byte 192..223, i.e. payload types 64..95 with
 * the marker bit, which covers SR/RR/SDES/BYE/APP = 72..76). STUN (first
 * byte 0..3) and DTLS (20..63) fail the version check (RFC 7983). */
static __always_inline int is_forwardable_rtp(const __u8 *rtp)
{
	if ((rtp[0] & 0xC0) != 0x80)
		return 0;
	return rtp[1] < 192 || rtp[1] > 223;
}

/* 1 in N packets of a flow go to userspace instead of the kernel path; the
 * first packet after install is one of them. Per CPU. */
static __always_inline int sample_due(const struct ridge_fwd_entry *e, struct ridge_fwd_stats *st)
{
	if (e->sample_every == 0)
		return 0;
	if (st->sample_countdown == 0) {
		st->sample_countdown = e->sample_every - 1;
		st->sampled += 1;
		stat_inc(RIDGE_FWD_SAMPLED);
		return 1;
	}
	st->sample_countdown -= 1;
	return 0;
}

/* Offsets of the fields the forwarder rewrites in an untagged IPv4 frame
 * without IP options. */
#define OFF_ETH 0
#define OFF_IP 14
#define OFF_IP_TTL (OFF_IP + 8)
#define OFF_IP_CSUM (OFF_IP + 10)
#define OFF_IP_SRC (OFF_IP + 12)
#define OFF_IP_DST (OFF_IP + 16)
#define OFF_UDP (OFF_IP + 20)
#define OFF_UDP_SPORT (OFF_UDP + 0)
#define OFF_UDP_DPORT (OFF_UDP + 2)
#define OFF_UDP_CSUM (OFF_UDP + 6)
#define OFF_RTP (OFF_UDP + 8)
#define OFF_RTP_SEQ (OFF_RTP + 2)
#define OFF_RTP_TS (OFF_RTP + 4)
#define OFF_RTP_SSRC (OFF_RTP + 8)
#define FWD_MIN_FRAME (OFF_RTP + RTP_MIN_HEADER)

/* ---- forwarding: XDP, one destination ----------------------------------- */

static __always_inline void set16(__u16 *field, __u16 v, __u16 *ipsum, __u16 *udpsum)
{
	__u16 old = *field;
	if (old == v)
		return;
	*field = v;
	if (ipsum)
		csum_replace16(ipsum, old, v);
	if (udpsum)
		csum_replace16(udpsum, old, v);
}

/* The headers every XDP rewrite sets: MACs, a fresh TTL, addresses and
 * ports, with the IP checksum (and the UDP checksum, if udpsum) updated
 * incrementally. */
static __always_inline void xdp_rewrite_l2_l4(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp,
					      const struct ridge_fwd_dest *d, __u16 *udpsum)
{
	__u16 *ipsum = &ip->check;
	__u16 *ipw = (__u16 *)ip;
	__u16 w[2];

	__builtin_memcpy(eth->h_dest, d->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, d->src_mac, ETH_ALEN);

	/* The relay sends a new datagram, as its userspace socket would: fresh
	 * TTL. TTL shares a word with the protocol; only the IP checksum covers it. */
	__u16 ttl_word = ipw[4];
	ip->ttl = RIDGE_FWD_TTL;
	csum_replace16(ipsum, ttl_word, ipw[4]);

	__builtin_memcpy(w, &d->src_addr, 4);
	set16(&ipw[6], w[0], ipsum, udpsum);
	set16(&ipw[7], w[1], ipsum, udpsum);
	__builtin_memcpy(w, &d->dst_addr, 4);
	set16(&ipw[8], w[0], ipsum, udpsum);
	set16(&ipw[9], w[1], ipsum, udpsum);
	set16(&udp->source, d->src_port, NULL, udpsum);
	set16(&udp->dest, d->dst_port, NULL, udpsum);
}

/* Fills *key and returns 0 if the frame may be forwarded in XDP (untagged
 * IPv4 without options, UDP, RTP version 2 with a full header, not RTCP);
 * -1 otherwise. */
static __always_inline int xdp_fwd_key(struct xdp_md *ctx, const struct ridge_pkt *p,
				       struct ridge_fwd_key *key)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (p->is_ipv6 || p->l3_off != OFF_IP)
		return -1; /* IPv6 and VLAN-tagged flows stay in userspace */
	if (data + FWD_MIN_FRAME > end)
		return -1;
	struct iphdr *ip = data + OFF_IP;
	struct udphdr *udp = data + OFF_UDP;
	__u8 *rtp = data + OFF_RTP;
	if (ip->ihl != 5 || bpf_ntohs(udp->len) < sizeof(*udp) + RTP_MIN_HEADER)
		return -1;
	if (!is_forwardable_rtp(rtp))
		return -1;
	key->src_addr = ip->saddr;
	key->dst_addr = ip->daddr;
	key->src_port = udp->source;
	key->dst_port = udp->dest;
	__builtin_memcpy(&key->ssrc, rtp + 8, 4);
	return 0;
}

static __always_inline int xdp_forward(struct xdp_md *ctx, const struct ridge_fwd_key *key)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + FWD_MIN_FRAME > end)
		return XDP_PASS;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + OFF_IP;
	struct udphdr *udp = data + OFF_UDP;
	__u8 *rtp = data + OFF_RTP;

	struct ridge_fwd_entry *e = bpf_map_lookup_elem(&ridge_fwd, key);
	if (!e || e->n_dests != 1)
		return XDP_PASS; /* unknown flow, or a fan-out for the TC program */
	__u32 slot = e->stats_slot;
	struct ridge_fwd_stats *st = bpf_map_lookup_elem(&ridge_fwd_stats, &slot);
	if (!st) {
		stat_inc(RIDGE_FWD_ERRORS);
		return XDP_PASS;
	}
	if (sample_due(e, st))
		return XDP_PASS;

	const struct ridge_fwd_dest *d = &e->dests[0];
	__u16 *udpsum = udp->check ? &udp->check : NULL; /* IPv4: 0 means none */
	__u16 *rtpw = (__u16 *)rtp;
	__u16 w[2];

	xdp_rewrite_l2_l4(eth, ip, udp, d, udpsum);

	set16(&rtpw[1], bpf_htons(bpf_ntohs(rtpw[1]) + d->seq_offset), NULL, udpsum);
	__u32 ts;
	__builtin_memcpy(&ts, rtp + 4, 4);
	ts = bpf_htonl(bpf_ntohl(ts) + d->ts_offset);
	__builtin_memcpy(w, &ts, 4);
	set16(&rtpw[2], w[0], NULL, udpsum);
	set16(&rtpw[3], w[1], NULL, udpsum);
	__builtin_memcpy(w, &d->ssrc, 4);
	set16(&rtpw[4], w[0], NULL, udpsum);
	set16(&rtpw[5], w[1], NULL, udpsum);
	if (udpsum && *udpsum == 0)
		*udpsum = 0xFFFF; /* a computed 0 is sent as all ones (RFC 768) */

	st->packets += 1;
	st->bytes += end - data;
	st->copies += 1;
	if (d->ifindex == ctx->ingress_ifindex) {
		stat_inc(RIDGE_FWD_XDP_TX);
		return XDP_TX;
	}
	stat_inc(RIDGE_FWD_XDP_REDIRECT);
	return bpf_redirect(d->ifindex, 0);
}

/* ---- forwarding: XDP, mesh transit (SRTP NULL cipher, SipHash tag) ------- */

/* SipHash-2-4 with 128-bit output (Aumasson & Bernstein's reference
 * siphash() with outlen 16), over msg = ROC (4 bytes, big-endian) || 4 zero
 * bytes || body, body being the RTP packet in the frame. The first message
 * word is the ROC block alone, so body words start at the RTP header and are
 * read straight from the frame as little-endian u64s (BPF is little-endian
 * on every JIT this runs on; unaligned packet loads are allowed where the
 * CPU has efficient unaligned access, i.e. x86-64 and arm64). */
#define MESH_MAX_BODY (RIDGE_MESH_MAX_RTP - RIDGE_MESH_TAG_LEN)
#define MESH_MAX_WORDS (MESH_MAX_BODY / 8)

static __always_inline __u64 rotl64(__u64 x, int b)
{
	return (x << b) | (x >> (64 - b));
}

#define SIPROUND(v0, v1, v2, v3)                                                                   \
	do {                                                                                       \
		v0 += v1;                                                                          \
		v1 = rotl64(v1, 13);                                                               \
		v1 ^= v0;                                                                          \
		v0 = rotl64(v0, 32);                                                               \
		v2 += v3;                                                                          \
		v3 = rotl64(v3, 16);                                                               \
		v3 ^= v2;                                                                          \
		v0 += v3;                                                                          \
		v3 = rotl64(v3, 21);                                                               \
		v3 ^= v0;                                                                          \
		v2 += v1;                                                                          \
		v1 = rotl64(v1, 17);                                                               \
		v1 ^= v2;                                                                          \
		v2 = rotl64(v2, 32);                                                               \
	} while (0)

/* mesh_siphash's arguments and result, in one struct on the caller's stack
 * (a global function returns a single scalar). */
struct mesh_sip {
	__u64 key[2];   /* (k0, k1) */
	__u32 body_len; /* RTP packet without its tag, at OFF_RTP */
	__u32 roc;      /* rollover counter of the packet's index */
	__u64 h1;       /* out: tag bytes 0..8, little-endian */
	__u64 h2;       /* out: its low two bytes are tag bytes 8..10 */
};

/* The tag of the RTP packet at OFF_RTP. 0, or -1 if body_len is over
 * MESH_MAX_BODY or a word lies outside the frame (the caller has checked
 * that body and tag are in the frame, so that cannot happen, but the
 * verifier wants every packet access checked).
 *
 * A global function (not static, never inlined): the verifier checks it
 * once, on its own, with an unknown body_len, instead of walking its
 * 182-iteration loop again for every path that reaches each call site
 * (inlined twice into ridge_xdp, the program went over the verifier's
 * million-instruction limit). It only reads the packet, so the caller's
 * packet pointers stay valid across the call. */
__attribute__((noinline)) int mesh_siphash(struct xdp_md *ctx, struct mesh_sip *a)
{
	if (!a)
		return -1;
	const __u8 *rtp = (void *)(long)ctx->data + OFF_RTP;
	const void *end = (void *)(long)ctx->data_end;
	__u32 body_len = a->body_len;
	if (body_len > MESH_MAX_BODY)
		return -1;
	__u64 k0 = a->key[0], k1 = a->key[1];
	__u64 v0 = k0 ^ 0x736f6d6570736575ULL;
	__u64 v1 = k1 ^ 0x646f72616e646f6dULL ^ 0xee;
	__u64 v2 = k0 ^ 0x6c7967656e657261ULL;
	__u64 v3 = k1 ^ 0x7465646279746573ULL;

	/* Word 0: the ROC in network order, then four zero bytes. */
	__u64 m = __builtin_bswap32(a->roc);
	v3 ^= m;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	v0 ^= m;

	__u32 words = body_len / 8;
	const __u8 *w = rtp;
	for (__u32 i = 0; i < MESH_MAX_WORDS; i++) {
		if (i >= words)
			break;
		/* Keeps the bounds check in the loop, where the verifier sees it:
		 * clang would otherwise hoist it as one trip-count computation. */
		asm volatile("" : "+r"(w));
		if ((const void *)(w + 8) > end)
			return -1;
		m = *(const __u64 *)w;
		v3 ^= m;
		SIPROUND(v0, v1, v2, v3);
		SIPROUND(v0, v1, v2, v3);
		v0 ^= m;
		w += 8;
	}

	/* The last 0..7 bytes, little-endian, under the length byte. The tag
	 * follows the body, so 8 bytes are always there to load; the bytes
	 * past the body are masked off. */
	const __u8 *t = rtp + (body_len & ~7u);
	if ((const void *)(t + 8) > end)
		return -1;
	__u32 rest = body_len & 7;
	__u64 tail = *(const __u64 *)t & ((1ULL << (rest * 8)) - 1);
	__u64 b = ((__u64)((8 + body_len) & 0xff) << 56) | tail;
	v3 ^= b;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	v0 ^= b;

	v2 ^= 0xee;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	a->h1 = v0 ^ v1 ^ v2 ^ v3;
	v1 ^= 0xdd;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	a->h2 = v0 ^ v1 ^ v2 ^ v3;
	return 0;
}

/* RFC 3711 section 3.3.1: the packet index of sequence number seq given the
 * highest index so far, as userspace's estimate_index: a packet that would
 * fall before ROC 0 is placed at ROC 0. (ROC 2^32 - 1 + 1 wraps to 0 here,
 * where userspace refuses the index as exhausted; 2^48 packets never
 * happen.) */
static __always_inline __u64 mesh_index(__u64 highest, __u16 seq)
{
	__u32 roc = highest >> 16;
	__s32 s_l = highest & 0xffff;
	__s32 s = seq;
	__u32 v = roc;
	if (s_l < 32768) {
		if (s - s_l > 32768)
			v = roc ? roc - 1 : 0;
	} else if (s_l - 32768 > s) {
		v = roc + 1;
	}
	return ((__u64)v << 16) | seq;
}

#define RTP_X_CC_MASK 0x1F   /* first byte: extension bit and CSRC count */
#define RTP_X_NO_CSRC 0x10   /* extension, no CSRC */
#define RTP_EXT_HEADER 4     /* profile and length in 32-bit words */
#define NSEC_PER_SEC 1000000000ULL
#define ABS_SEND_TIME_SHIFT 18 /* 6.18 fixed point */
#define ABS_SEND_TIME_MASK 0xFFFFFF

/* 24-bit abs-send-time of d ns: floor(d * 2^18 / 1e9) mod 2^24, as
 * userspace's abs_send_time (dataplane/core/src/mesh/delay.rs) computes it in
 * 128 bits. Split in whole seconds and the rest, it takes no 128-bit
 * product: secs << 18 may overflow, but only its low 24 bits count, and
 * (frac << 18) / 1e9 is below 2^18, so the OR is the sum. */
static __always_inline __u32 abs_send_time(__u64 d)
{
	__u64 secs = d / NSEC_PER_SEC;
	__u64 frac = d - secs * NSEC_PER_SEC;
	return ((secs << ABS_SEND_TIME_SHIFT) | ((frac << ABS_SEND_TIME_SHIFT) / NSEC_PER_SEC)) &
	       ABS_SEND_TIME_MASK;
}

/* Restamps the abs-send-time element (RFC 8285 one-byte form, id
 * RIDGE_MESH_EXT_SEND_TIME, 3 bytes) of the RTP packet at rtp, whose body
 * (RTP packet without the SRTP tag) is body_len bytes, with this node's
 * send time: now - epoch_ns on CLOCK_MONOTONIC, 0 if epoch_ns is ahead.
 * The downstream's delay detector reads the element per sending socket, and
 * this node is the sender now. Leaves the packet alone unless the X bit is
 * set, there is no CSRC, the block is 0xBEDE and lies in the body; walks at
 * most RIDGE_MESH_EXT_MAX_ELEMS elements (padding bytes skipped, on top),
 * and stops, as userspace's find_one_byte does, at id 15 and at a malformed
 * id 0 with a length (a 0x00 byte is padding). */
static __always_inline void mesh_stamp_send_time(__u8 *rtp, void *end, __u32 body_len, __u64 epoch_ns)
{
	if ((void *)(rtp + RTP_MIN_HEADER + RTP_EXT_HEADER) > end)
		return;
	if ((rtp[0] & RTP_X_CC_MASK) != RTP_X_NO_CSRC)
		return;
	__u8 *ext = rtp + RTP_MIN_HEADER;
	if (ext[0] != 0xBE || ext[1] != 0xDE)
		return;
	__u32 block = (((__u32)ext[2] << 8) | ext[3]) * 4;
	if (RTP_MIN_HEADER + RTP_EXT_HEADER + block > body_len)
		return;
	__u8 *elems = ext + RTP_EXT_HEADER;
	__u32 pos = 0;
	__u32 seen = 0;
	/* Each step takes a padding byte or an element: as many padding bytes
	 * as elements at most. */
	for (int i = 0; i < 2 * RIDGE_MESH_EXT_MAX_ELEMS; i++) {
		if (pos >= block)
			return;
		__u8 *e = elems + pos;
		if ((void *)(e + 1) > end)
			return;
		__u8 b = e[0];
		if (b == 0) {
			pos += 1;
			continue;
		}
		__u32 id = b >> 4;
		__u32 len = (b & 0xF) + 1;
		if (id == 0 || id == 15 || pos + 1 + len > block)
			return;
		if (id == RIDGE_MESH_EXT_SEND_TIME && len == 3) {
			if ((void *)(e + 4) > end)
				return;
			__u64 now = bpf_ktime_get_ns();
			__u32 t = abs_send_time(now > epoch_ns ? now - epoch_ns : 0);
			e[1] = t >> 16;
			e[2] = t >> 8;
			e[3] = t;
			return;
		}
		if (++seen >= RIDGE_MESH_EXT_MAX_ELEMS)
			return;
		pos += 1 + len;
	}
}

/* A packet of an installed mesh transit flow: verify its tag with the
 * upstream key, rewrite it like xdp_forward (sequence number and timestamp
 * unchanged, the abs-send-time extension restamped), sign it with the
 * downstream key, send it. */
static __always_inline int xdp_mesh(struct xdp_md *ctx, const struct ridge_mesh_entry *me)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	if (data + FWD_MIN_FRAME > end)
		return XDP_PASS;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + OFF_IP;
	struct udphdr *udp = data + OFF_UDP;
	__u8 *rtp = data + OFF_RTP;

	__u32 slot = me->state_slot;
	struct ridge_mesh_state *ms = bpf_map_lookup_elem(&ridge_mesh_state, &slot);
	struct ridge_mesh_stats *st = bpf_map_lookup_elem(&ridge_mesh_stats, &slot);
	if (!ms || !st) {
		stat_inc(RIDGE_FWD_ERRORS);
		return XDP_PASS;
	}

	/* The UDP length, not the frame's: the guard checked it against the IP
	 * length, and the frame may carry Ethernet padding after it. */
	__u32 rtp_len = bpf_ntohs(udp->len);
	if (rtp_len < sizeof(*udp) + RTP_MIN_HEADER + RIDGE_MESH_TAG_LEN ||
	    rtp_len > sizeof(*udp) + RIDGE_MESH_MAX_RTP) {
		st->passed += 1;
		return XDP_PASS;
	}
	rtp_len -= sizeof(*udp);
	__u32 body_len = rtp_len - RIDGE_MESH_TAG_LEN;
	__u8 *tag = rtp + body_len;
	if ((void *)(tag + RIDGE_MESH_TAG_LEN) > end || !(ms->flags & RIDGE_MESH_IN_VALID)) {
		st->passed += 1;
		return XDP_PASS;
	}

	__u16 seq = bpf_ntohs(*(__u16 *)(rtp + 2));
	__u64 in_highest = ms->in_highest;
	__u64 in_index = mesh_index(in_highest, seq);
	struct mesh_sip h = {
		.key = { me->in_key[0], me->in_key[1] },
		.body_len = body_len,
		.roc = in_index >> 16,
	};
	if (mesh_siphash(ctx, &h)) {
		st->passed += 1;
		return XDP_PASS;
	}
	__u64 got1 = *(__u64 *)tag;
	__u16 got2 = *(__u16 *)(tag + 8);
	if ((got1 ^ h.h1) | (__u16)(got2 ^ (__u16)h.h2)) {
		/* Userspace checks it again with its own context (and drops it). */
		st->bad_tag += 1;
		stat_inc(RIDGE_MESH_BAD_TAG);
		return XDP_PASS;
	}
	/* Too old: drop. A duplicate within the window is forwarded again on
	 * purpose: the upstream's retransmission of a packet this hop already
	 * sent may repair a loss on the next link; the next full node's replay
	 * window drops true duplicates. */
	if (in_index + RIDGE_MESH_MAX_AGE < in_highest) {
		st->too_old += 1;
		stat_inc(RIDGE_MESH_TOO_OLD);
		return XDP_DROP;
	}
	/* Plain stores: one flow's packets come in on one RX queue (RSS), so
	 * one CPU at a time updates its state. */
	if (in_index > in_highest)
		ms->in_highest = in_index;
	__u64 out_index = seq;
	if (ms->flags & RIDGE_MESH_OUT_VALID) {
		__u64 out_highest = ms->out_highest;
		out_index = mesh_index(out_highest, seq);
		if (out_index > out_highest)
			ms->out_highest = out_index;
	} else {
		ms->out_highest = out_index;
		ms->flags |= RIDGE_MESH_OUT_VALID;
	}

	const struct ridge_fwd_dest *d = &me->dest;
	/* UDP checksum 0 (none, legal over IPv4): the tag covers every byte of
	 * the RTP packet, and a new checksum would take another pass over it. */
	udp->check = 0;
	xdp_rewrite_l2_l4(eth, ip, udp, d, NULL);
	__builtin_memcpy(rtp + 8, &d->ssrc, 4);
	__u64 epoch_ns = me->send_epoch_ns;
	if (epoch_ns)
		mesh_stamp_send_time(rtp, end, body_len, epoch_ns);

	h.key[0] = me->out_key[0];
	h.key[1] = me->out_key[1];
	h.roc = out_index >> 16;
	if (mesh_siphash(ctx, &h)) {
		/* Cannot happen (see mesh_siphash); the frame is half rewritten. */
		stat_inc(RIDGE_FWD_ERRORS);
		return XDP_DROP;
	}
	*(__u64 *)tag = h.h1;
	*(__u16 *)(tag + 8) = (__u16)h.h2;

	st->packets += 1;
	st->bytes += end - data;
	stat_inc(RIDGE_MESH_FORWARDED);
	if (d->ifindex == ctx->ingress_ifindex) {
		stat_inc(RIDGE_FWD_XDP_TX);
		return XDP_TX;
	}
	stat_inc(RIDGE_FWD_XDP_REDIRECT);
	return bpf_redirect(d->ifindex, 0);
}

SEC("xdp")
int ridge_guard(struct xdp_md *ctx)
{
	struct ridge_pkt p = {};
	return guard(ctx, &p) == GUARD_DROP ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int ridge_xdp(struct xdp_md *ctx)
{
	struct ridge_pkt p = {};
	int verdict = guard(ctx, &p);
	if (verdict == GUARD_DROP)
		return XDP_DROP;
	if (verdict == GUARD_NOT_MEDIA)
		return XDP_PASS;
	struct ridge_fwd_key key = {};
	if (xdp_fwd_key(ctx, &p, &key))
		return XDP_PASS;
	/* Mesh transit flows first: userspace does not put an SRTP flow in the
	 * plain table, but if it did, the mesh entry (which re-signs) wins.
	 * While none is installed, the hash lookup is skipped. */
	__u32 zero = 0;
	struct ridge_mesh_cfg *mcfg = bpf_map_lookup_elem(&ridge_mesh_cfg, &zero);
	if (mcfg && mcfg->flows) {
		struct ridge_mesh_entry *me = bpf_map_lookup_elem(&ridge_mesh_fwd, &key);
		if (me)
			return xdp_mesh(ctx, me);
	}
	return xdp_forward(ctx, &key);
}

/* ---- forwarding: TC, 1 -> N ---------------------------------------------- */

/* The header words the fan-out rewrites, as they are in the packet now. */
struct fanout_state {
	__u16 src[2];
	__u16 dst[2];
	__u16 sport;
	__u16 dport;
	__u16 seq;
	__u16 ts[2];
	__u16 ssrc[2];
	__u16 _pad;
};

#define L4_FLAGS (BPF_F_MARK_MANGLED_0 | 2)

/* Writes one 16-bit word and fixes the checksums; the helpers know the
 * skb's checksum state (CHECKSUM_PARTIAL/COMPLETE/NONE). */
static __always_inline int tc_set16(struct __sk_buff *skb, __u32 off, __u16 *cur, __u16 v, int ip_hdr,
				    int pseudo)
{
	if (*cur == v)
		return 0;
	if (bpf_skb_store_bytes(skb, off, &v, 2, 0))
		return -1;
	if (ip_hdr && bpf_l3_csum_replace(skb, OFF_IP_CSUM, *cur, v, 2))
		return -1;
	if (bpf_l4_csum_replace(skb, OFF_UDP_CSUM, *cur, v, L4_FLAGS | (pseudo ? BPF_F_PSEUDO_HDR : 0)))
		return -1;
	*cur = v;
	return 0;
}

static __always_inline int tc_rewrite(struct __sk_buff *skb, struct fanout_state *s,
				      const struct ridge_fwd_dest *d, __u16 seq0, __u32 ts0)
{
	__u16 w[2];
	int err = 0;
	__u8 macs[2 * ETH_ALEN];
	__builtin_memcpy(macs, d->dst_mac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, d->src_mac, ETH_ALEN);
	err |= bpf_skb_store_bytes(skb, OFF_ETH, macs, sizeof(macs), 0);

	__builtin_memcpy(w, &d->src_addr, 4);
	err |= tc_set16(skb, OFF_IP_SRC, &s->src[0], w[0], 1, 1);
	err |= tc_set16(skb, OFF_IP_SRC + 2, &s->src[1], w[1], 1, 1);
	__builtin_memcpy(w, &d->dst_addr, 4);
	err |= tc_set16(skb, OFF_IP_DST, &s->dst[0], w[0], 1, 1);
	err |= tc_set16(skb, OFF_IP_DST + 2, &s->dst[1], w[1], 1, 1);
	err |= tc_set16(skb, OFF_UDP_SPORT, &s->sport, d->src_port, 0, 0);
	err |= tc_set16(skb, OFF_UDP_DPORT, &s->dport, d->dst_port, 0, 0);
	err |= tc_set16(skb, OFF_RTP_SEQ, &s->seq, bpf_htons(seq0 + d->seq_offset), 0, 0);
	__u32 ts = bpf_htonl(ts0 + d->ts_offset);
	__builtin_memcpy(w, &ts, 4);
	err |= tc_set16(skb, OFF_RTP_TS, &s->ts[0], w[0], 0, 0);
	err |= tc_set16(skb, OFF_RTP_TS + 2, &s->ts[1], w[1], 0, 0);
	__builtin_memcpy(w, &d->ssrc, 4);
	err |= tc_set16(skb, OFF_RTP_SSRC, &s->ssrc[0], w[0], 0, 0);
	err |= tc_set16(skb, OFF_RTP_SSRC + 2, &s->ssrc[1], w[1], 0, 0);
	return err;
}

SEC("classifier")
int ridge_fanout(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + FWD_MIN_FRAME > end) {
		if (skb->len < FWD_MIN_FRAME || bpf_skb_pull_data(skb, FWD_MIN_FRAME))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + FWD_MIN_FRAME > end)
			return TC_ACT_OK;
	}
	struct ethhdr *eth = data;
	struct iphdr *ip = data + OFF_IP;
	struct udphdr *udp = data + OFF_UDP;
	__u8 *rtp = data + OFF_RTP;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->version != 4 || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return TC_ACT_OK;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	__u32 ulen = bpf_ntohs(udp->len);
	if (OFF_IP + tot_len > skb->len || ulen != tot_len - 20 || ulen < sizeof(*udp) + RTP_MIN_HEADER)
		return TC_ACT_OK;
	if (!is_forwardable_rtp(rtp))
		return TC_ACT_OK;

	struct ridge_fwd_key key = {
		.src_addr = ip->saddr,
		.dst_addr = ip->daddr,
		.src_port = udp->source,
		.dst_port = udp->dest,
	};
	__builtin_memcpy(&key.ssrc, rtp + 8, 4);
	struct ridge_fwd_entry *e = bpf_map_lookup_elem(&ridge_fwd, &key);
	/* One destination is the XDP program's: a packet of such a flow that
	 * reaches TC is one XDP handed to userspace (a sample, or XDP is not
	 * attached), and must get there. */
	if (!e || e->n_dests < 2)
		return TC_ACT_OK;
	__u32 n = e->n_dests;
	__u32 slot = e->stats_slot;
	struct ridge_fwd_stats *st = bpf_map_lookup_elem(&ridge_fwd_stats, &slot);
	if (!st || n == 0 || n > RIDGE_FWD_MAX_DESTS) {
		stat_inc(RIDGE_FWD_ERRORS);
		return TC_ACT_OK;
	}
	if (sample_due(e, st))
		return TC_ACT_OK;

	struct fanout_state s;
	__builtin_memcpy(s.src, &ip->saddr, 4);
	__builtin_memcpy(s.dst, &ip->daddr, 4);
	s.sport = udp->source;
	s.dport = udp->dest;
	__builtin_memcpy(&s.seq, rtp + 2, 2);
	__builtin_memcpy(s.ts, rtp + 4, 4);
	__builtin_memcpy(s.ssrc, rtp + 8, 4);
	__u16 seq0 = bpf_ntohs(s.seq);
	__u32 ts0;
	__builtin_memcpy(&ts0, rtp + 4, 4);
	ts0 = bpf_ntohl(ts0);
	__u32 frame_len = skb->len;

	/* Fresh TTL (see xdp_forward): once, for all copies. */
	__u16 ttl_word_old, ttl_word_new;
	__builtin_memcpy(&ttl_word_old, (void *)ip + 8, 2);
	__u8 ttl = RIDGE_FWD_TTL;
	if (bpf_skb_store_bytes(skb, OFF_IP_TTL, &ttl, 1, 0))
		goto fail;
	if (bpf_skb_load_bytes(skb, OFF_IP_TTL, &ttl_word_new, 2) ||
	    bpf_l3_csum_replace(skb, OFF_IP_CSUM, ttl_word_old, ttl_word_new, 2))
		goto fail;

	st->packets += 1;
	st->bytes += frame_len;
	for (__u32 i = 0; i < RIDGE_FWD_MAX_DESTS; i++) {
		if (i >= n)
			break;
		const struct ridge_fwd_dest *d = &e->dests[i];
		if (tc_rewrite(skb, &s, d, seq0, ts0))
			goto fail;
		if (i + 1 == n) {
			st->copies += 1;
			stat_inc(RIDGE_FWD_TC_COPIES);
			return bpf_redirect(d->ifindex, 0);
		}
		if (bpf_clone_redirect(skb, d->ifindex, 0)) {
			st->errors += 1;
			stat_inc(RIDGE_FWD_ERRORS);
		} else {
			st->copies += 1;
			stat_inc(RIDGE_FWD_TC_COPIES);
		}
	}
	return TC_ACT_SHOT; /* unreachable: the last destination redirects */
fail:
	/* A half-rewritten packet must not reach userspace as if untouched. */
	st->errors += 1;
	stat_inc(RIDGE_FWD_ERRORS);
	return TC_ACT_SHOT;
}

/* ---- steering ------------------------------------------------------------ */

/* Fills `key` from the packet; `*udp` is set to the UDP header's offset
 * from the network header, `*udp_len` to the UDP length field (validated
 * by the kernel's UDP receive path before socket lookup). */
static __always_inline int steer_key(struct sk_reuseport_md *md, struct ridge_steer_key *key,
				     __u32 *udp, __u32 *udp_len)
{
	__u32 l4;
	if (md->eth_protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes_relative(md, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
			return -1;
		key->src_addr[10] = 0xff;
		key->src_addr[11] = 0xff;
		__builtin_memcpy(&key->src_addr[12], &ip.saddr, 4);
		key->dst_addr[10] = 0xff;
		key->dst_addr[11] = 0xff;
		__builtin_memcpy(&key->dst_addr[12], &ip.daddr, 4);
		l4 = ip.ihl * 4;
	} else if (md->eth_protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes_relative(md, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return -1;
		__builtin_memcpy(key->src_addr, &ip6.saddr, 16);
		__builtin_memcpy(key->dst_addr, &ip6.daddr, 16);
		l4 = sizeof(ip6); /* the socket layer has already seen UDP here */
		if (ip6.nexthdr != IPPROTO_UDP)
			return -1;
	} else {
		return -1;
	}
	struct udphdr uh;
	if (bpf_skb_load_bytes_relative(md, l4, &uh, sizeof(uh), BPF_HDR_START_NET))
		return -1;
	key->src_port = uh.source;
	key->dst_port = uh.dest;
	*udp = l4;
	*udp_len = bpf_ntohs(uh.len);
	return 0;
}

#define STUN_HEADER 20
#define STUN_MAGIC_COOKIE 0x2112A442
#define STUN_BINDING_REQUEST 0x0001
#define STUN_ATTR_USERNAME 0x0006
#define STUN_MAX_ATTRS 16

/* What the STUN parse of an unknown flow found. */
enum stun_shard {
	STUN_NOT_STUN = -1,  /* not a STUN binding request: no opinion */
	STUN_UNUSABLE = -2,  /* a binding request without a usable USERNAME */
};

static __always_inline int hex_digit(__u8 c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The shard named by the first two characters of the USERNAME of a STUN
 * binding request (our ufrag comes first in requests sent to us; the core
 * writes the shard there in lowercase hex). Reads through
 * bpf_skb_load_bytes_relative, so it works whether or not the payload is in
 * the skb's linear part, and a read past the end fails instead of reading
 * garbage. */
static __always_inline int stun_shard(struct sk_reuseport_md *md, __u32 udp, __u32 udp_len)
{
	__u32 off = udp + sizeof(struct udphdr);
	struct {
		__be16 type;
		__be16 length;
		__be32 cookie;
		__u8 txid[12];
	} hdr;
	if (bpf_skb_load_bytes_relative(md, off, &hdr, sizeof(hdr), BPF_HDR_START_NET))
		return STUN_NOT_STUN;
	/* The first two bits of a STUN message are 0; the cookie is fixed. */
	if (hdr.cookie != bpf_htonl(STUN_MAGIC_COOKIE) || (bpf_ntohs(hdr.type) & 0xC000))
		return STUN_NOT_STUN;
	if (hdr.type != bpf_htons(STUN_BINDING_REQUEST))
		return STUN_NOT_STUN;
	__u32 len = bpf_ntohs(hdr.length);
	/* The message must fill the datagram exactly (RFC 8489 over UDP): a
	 * truncated or padded request is not one the core would answer. */
	if ((len & 3) || udp_len != sizeof(struct udphdr) + STUN_HEADER + len)
		return STUN_UNUSABLE;
	/* Attributes start after the header and end at the message length,
	 * which is the datagram's (and a load past the packet fails anyway). */
	__u32 pos = STUN_HEADER;
	__u32 end = STUN_HEADER + len;
	for (int i = 0; i < STUN_MAX_ATTRS; i++) {
		if (pos + 4 > end)
			return STUN_UNUSABLE;
		__be16 attr[2];
		if (bpf_skb_load_bytes_relative(md, off + pos, attr, sizeof(attr),
						BPF_HDR_START_NET))
			return STUN_UNUSABLE;
		__u32 alen = bpf_ntohs(attr[1]);
		if (attr[0] == bpf_htons(STUN_ATTR_USERNAME)) {
			__u8 digits[2];
			if (alen < 2 || pos + 4 + alen > end)
				return STUN_UNUSABLE;
			if (bpf_skb_load_bytes_relative(md, off + pos + 4, digits, sizeof(digits),
							BPF_HDR_START_NET))
				return STUN_UNUSABLE;
			int hi = hex_digit(digits[0]);
			int lo = hex_digit(digits[1]);
			if (hi < 0 || lo < 0)
				return STUN_UNUSABLE;
			int shard = hi * 16 + lo;
			if (shard >= RIDGE_MAX_SHARDS)
				return STUN_UNUSABLE;
			return shard;
		}
		/* Values are padded to four bytes. pos stays small: end is at
		 * most 20 + 65535 and alen at most 65535. */
		pos += 4 + ((alen + 3) & ~3u);
	}
	return STUN_UNUSABLE;
}

SEC("sk_reuseport")
int ridge_steer(struct sk_reuseport_md *md)
{
	struct ridge_steer_key key = {};
	__u32 udp = 0, udp_len = 0;
	if (md->ip_protocol == IPPROTO_UDP && steer_key(md, &key, &udp, &udp_len) == 0) {
		__u32 *shard = bpf_map_lookup_elem(&ridge_steer_flows, &key);
		if (!shard) {
			/* Entries userspace made for a wildcard-bound group carry
			 * an all-zero local address. */
			struct ridge_steer_key any = key;
			__builtin_memset(any.dst_addr, 0, sizeof(any.dst_addr));
			shard = bpf_map_lookup_elem(&ridge_steer_flows, &any);
		}
		if (shard) {
			__u32 index = *shard;
			if (bpf_sk_select_reuseport(md, &ridge_steer_socks, &index, 0) == 0) {
				stat_inc(RIDGE_STEER_FLOW);
				return SK_PASS;
			}
			stat_inc(RIDGE_STEER_ERRORS);
		} else {
			/* Unknown: a STUN binding request names its shard in our
			 * ufrag. Learn the flow, so the DTLS and SRTP that follow
			 * on this 4-tuple go to the same shard. */
			int named = stun_shard(md, udp, udp_len);
			if (named >= 0) {
				__u32 index = named;
				if (bpf_sk_select_reuseport(md, &ridge_steer_socks, &index, 0) == 0) {
					if (bpf_map_update_elem(&ridge_steer_flows, &key, &index,
								BPF_ANY) == 0)
						stat_inc(RIDGE_STEER_STUN_LEARNED);
					else
						stat_inc(RIDGE_STEER_ERRORS);
					return SK_PASS;
				}
				stat_inc(RIDGE_STEER_ERRORS);
			} else if (named == STUN_UNUSABLE) {
				stat_inc(RIDGE_STEER_ERRORS);
			}
		}
	}
	__u32 zero = 0;
	struct ridge_steer_cfg *cfg = bpf_map_lookup_elem(&ridge_steer_cfg, &zero);
	if (cfg && cfg->use_default) {
		__u32 index = cfg->default_shard;
		if (bpf_sk_select_reuseport(md, &ridge_steer_socks, &index, 0) == 0) {
			stat_inc(RIDGE_STEER_DEFAULT);
			return SK_PASS;
		}
		stat_inc(RIDGE_STEER_ERRORS);
	}
	/* SK_PASS without a selection: the kernel picks by its own hash. */
	stat_inc(RIDGE_STEER_HASH);
	return SK_PASS;
}
