/* Ridge test impairment: random packet loss on a TC hook, for integration
 * tests and benchmarks on kernels without the netem qdisc. Not used by the
 * relay itself; compiled into its own object (impair.bpf.o) so that loading
 * it creates none of the dataplane's maps.
 *
 *   ridge_impair  TC (egress or ingress; TCX, or a clsact filter): drops each
 *                 packet with probability loss_ppm / 1e6
 *
 * Types shared with userspace are in ridge.h. See ../README.md.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "ridge.h"

/* No GPL-only helper is used, so the project's licence applies. */
char LICENSE[] SEC("license") = "Apache-2.0";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ridge_impair_cfg);
} ridge_impair_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ridge_impair_stats);
} ridge_impair_stats SEC(".maps");

/* Extension headers walked in front of an IPv6 UDP header. */
#define IMPAIR_IPV6_EXT_MAX 4

/* Whether the packet is UDP over IPv4 or IPv6 (later fragments included:
 * losing one loses the datagram, as on a wire). Headers are read relative
 * to the network header, so this works on L2 and L3 devices alike; a header
 * outside the skb's linear part reads as "not UDP". A VLAN tag still in the
 * frame (no offload) makes skb->protocol 802.1Q: not UDP either. */
static __always_inline int is_udp(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 ip[10]; /* version/IHL .. protocol */
		if (bpf_skb_load_bytes_relative(skb, 0, ip, sizeof(ip), BPF_HDR_START_NET))
			return 0;
		return (ip[0] >> 4) == 4 && ip[9] == IPPROTO_UDP;
	}
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return 0;
	__u8 ip6[8]; /* version .. next header, hop limit */
	if (bpf_skb_load_bytes_relative(skb, 0, ip6, sizeof(ip6), BPF_HDR_START_NET))
		return 0;
	if ((ip6[0] >> 4) != 6)
		return 0;
	__u8 next = ip6[6];
	__u32 off = 40;
#pragma unroll
	for (int i = 0; i < IMPAIR_IPV6_EXT_MAX; i++) {
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT)
			break;
		__u8 ext[2]; /* next header, length */
		if (bpf_skb_load_bytes_relative(skb, off, ext, sizeof(ext), BPF_HDR_START_NET))
			return 0;
		off += next == IPPROTO_FRAGMENT ? 8 : (ext[1] + 1) * 8;
		next = ext[0];
	}
	return next == IPPROTO_UDP;
}

SEC("classifier")
int ridge_impair(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct ridge_impair_cfg *cfg = bpf_map_lookup_elem(&ridge_impair_cfg, &zero);
	struct ridge_impair_stats *st = bpf_map_lookup_elem(&ridge_impair_stats, &zero);
	if (!cfg || !st)
		return TC_ACT_UNSPEC;
	if (cfg->udp_only && !is_udp(skb)) {
		st->exempt += 1;
		return TC_ACT_UNSPEC;
	}
	/* r is uniform in [0, 1e6) without a division: (2^32-range random *
	 * 1e6) / 2^32. loss_ppm >= 1e6 drops everything, 0 nothing. */
	__u32 ppm = cfg->loss_ppm;
	if (ppm && (((__u64)bpf_get_prandom_u32() * RIDGE_IMPAIR_PPM) >> 32) < ppm) {
		st->dropped += 1;
		return TC_ACT_SHOT;
	}
	st->passed += 1;
	/* Not TC_ACT_OK: "no opinion" lets the next TCX program or clsact
	 * filter on this hook see the packet, as if no impairment were there. */
	return TC_ACT_UNSPEC;
}
