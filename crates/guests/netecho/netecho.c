/*
 * netecho: a network echo host on a virtio-net NIC, for checking that a guest's network
 * keeps working across checkpoints, restores and live migrations.
 *
 * Command line: ip=A.B.C.D[/N] (required: the guest's IPv4 address; the prefix length is
 * accepted but not used: netecho only answers), and the NIC in Linux's format
 * virtio_mmio.device=<size>@<base>:<irq> (several may be given; the first virtio-mmio
 * version 2 transport with DeviceID 1 is used).
 *
 * It answers, and ignores everything else:
 *   - ARP requests for its address (a reply, padded to 60 bytes);
 *   - ICMP echo requests to its address (an echo reply, same id, sequence and payload;
 *     the request's ICMP checksum is checked, the reply's updated incrementally, the IP
 *     header's recomputed, TTL 64);
 *   - UDP datagrams to its address, port 7 (echo: addresses and ports swapped, same
 *     payload; the UDP checksum is left as it is, which swapping keeps correct);
 *   - TCP on port 7: an echo, one connection at a time (passive open; a SYN while one is
 *     open, a segment to another port or to no connection gets a RST: refused, not
 *     queued), one range of out-of-order data kept (in the ring, at its place), every
 *     out-of-order segment answered with a duplicate ACK, a window of the 16 KiB send
 *     ring's free space, MSS the only option,
 *     go-back-N retransmission on a timer, passive close (see "TCP echo" below). Its state
 *     is in guest memory, so an open connection migrates with the VM.
 * Only plain IPv4 (no options, no fragments, valid header checksum) sent to its MAC.
 * At start it sends one gratuitous ARP (an ARP request for its own address), then prints
 *   netecho: ready mac=<mac> ip=<ip>
 * and, every 2 seconds in which something was received or sent,
 *   netecho: rx <frames received> tx <frames sent>[ dropped <replies not sent>]
 *            [ tcp conns <established> echoed <bytes> rexmit <timeouts> rst <resets sent>]
 * ("dropped" only once a reply found the transmit queue full; the tcp part once TCP was
 * used), and "netecho: tcp connection reset ..." when a connection ends by a reset.
 * Errors are "netecho: error: ..." lines, after which it powers off (or halts).
 *
 * The driver: virtio-mmio version 2 through rt/virtio.h, VIRTIO_F_VERSION_1 and
 * VIRTIO_NET_F_MAC (the MAC from the configuration space; without it 02:00:<ip>), no
 * offloads, no mergeable buffers, so every frame has the 12-byte virtio_net_hdr_v1 in
 * front. Receive queue 0 is kept full of 1538-byte buffers (12 + 1526) from a pool with
 * as many again for transmit queue 1. Replies are built in place in the received buffer,
 * which goes on the transmit queue (a spare from the pool takes its place in the receive
 * queue at once) and back to the pool when the device has sent it. No copies, no
 * interrupts: the guest polls both used rings. Guests here may run by instruction
 * emulation at a few million instructions a second, so the per-frame path is short: the
 * only loops over a frame's bytes are the ICMP and TCP checksums (64 bytes per round) and
 * TCP's copies into and out of its ring (8 bytes per round).
 */
#include "../rt/rt.h"
#include "../rt/virtio.h"

#define NET_HDR 12u             /* virtio_net_hdr_v1 */
#define FRAME_MAX 1526u         /* 1514 + VLAN tag and slack */
#define BUF_LEN (NET_HDR + FRAME_MAX)
#define BUF_STRIDE 1552u        /* 16-aligned slots; the buffer starts 2 bytes in */
#define BUF_OFF 2u              /* so that the IP header is 4-byte aligned */
#define RXQ_MAX 256
#define TXQ_MAX 256
#define POOL (RXQ_MAX + TXQ_MAX)
#define RX_KICK_BATCH 32        /* refilled receive buffers published at once */
#define REPORT_SECONDS 2

#define F_NET_MAC (1ull << 5)

typedef u16 __attribute__((may_alias, aligned(1))) u16u;
typedef u32 __attribute__((may_alias, aligned(1))) u32u;
typedef u64 __attribute__((may_alias, aligned(1))) u64u;

static inline u16 htons(u16 v) { return __builtin_bswap16(v); }
#define ETH_P_IP 0x0008u        /* 0x0800 as loaded little-endian */
#define ETH_P_ARP 0x0608u       /* 0x0806 */

static u8 rx_ring[VIRTQ_MEM_BYTES(RXQ_MAX)] __attribute__((aligned(4096)));
static u8 tx_ring[VIRTQ_MEM_BYTES(TXQ_MAX)] __attribute__((aligned(4096)));
static u8 pool[POOL][BUF_STRIDE] __attribute__((aligned(4096)));
static u16 spare[POOL];         /* pool buffers in neither queue */
static u32 nspare;

static struct virtio_dev dev;
static struct virtq rxq, txq;
static u8 mac[6];
static u32 my_ip;               /* network byte order, as in a packet */
static u64 rx_frames, tx_frames, tx_dropped;

static const char *const known[] = {"ip", "virtio_mmio.device", 0};

/* "netecho: error: <a><b><c>", then power off (or halt where that is not possible). */
static __attribute__((noreturn)) void fail3(const char *a, const char *b, const char *c)
{
    puts("netecho: error: ");
    puts(a);
    puts(b);
    puts(c);
    putc('\n');
    poweroff_failed();
}

static __attribute__((noreturn)) void fail2(const char *a, const char *b) { fail3(a, b, ""); }
static __attribute__((noreturn)) void fail(const char *what) { fail3(what, "", ""); }

static inline u8 *buf(u64 i) { return pool[i] + BUF_OFF; }

/* ---- the address ---- */

/* Parses "A.B.C.D[/N]" up to a space or the end; 0 on success. */
static int parse_ip(const char *s, u32 *ip, u32 *prefix)
{
    u32 v = 0;
    for (int i = 0; i < 4; i++) {
        u32 n = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4) {
            n = n * 10 + (u32)(*s++ - '0');
            digits++;
        }
        if (!digits || n > 255)
            return -1;
        v |= n << (8 * i);
        if (i < 3 && *s++ != '.')
            return -1;
    }
    *prefix = 32;
    if (*s == '/') {
        u32 n = 0;
        int digits = 0;
        s++;
        while (*s >= '0' && *s <= '9' && digits < 3) {
            n = n * 10 + (u32)(*s++ - '0');
            digits++;
        }
        if (!digits || n > 32)
            return -1;
        *prefix = n;
    }
    if (*s && *s != ' ' && *s != '\t' && *s != '\n')
        return -1;
    *ip = v;
    return 0;
}

static void put_ip(u32 ip)
{
    for (int i = 0; i < 4; i++) {
        if (i)
            putc('.');
        put_dec((ip >> (8 * i)) & 0xff);
    }
}

static void put_mac(const u8 *m)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        if (i)
            putc(':');
        putc(hex[m[i] >> 4]);
        putc(hex[m[i] & 15]);
    }
}

/* ---- checksums (one's complement sums of little-endian loads, stored the same way) ---- */

static inline u16 fold(u64 s)
{
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffffffffu) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (u16)s;
}

/* s + w with the carry added back in (one's complement addition of 64-bit words). */
static inline u64 add_carry(u64 s, u64 w)
{
    s += w;
    return s + (s < w);
}

/* The folded sum of `len` bytes at p. The bulk goes 64 bytes per loop round through an
 * add-with-carry chain: under instruction emulation every instruction counts. */
static u16 sum_bytes(const u8 *p, u32 len)
{
    u64 s = 0;
    u64 blocks = len / 64;
    if (blocks) {
        __asm__("clc\n"
                "1:\n\t"
                "adcq 0(%[p]), %[s]\n\t"
                "adcq 8(%[p]), %[s]\n\t"
                "adcq 16(%[p]), %[s]\n\t"
                "adcq 24(%[p]), %[s]\n\t"
                "adcq 32(%[p]), %[s]\n\t"
                "adcq 40(%[p]), %[s]\n\t"
                "adcq 48(%[p]), %[s]\n\t"
                "adcq 56(%[p]), %[s]\n\t"
                "leaq 64(%[p]), %[p]\n\t" /* lea and dec keep CF for the next round */
                "decq %[n]\n\t"
                "jnz 1b\n\t"
                "adcq $0, %[s]"
                : [s] "+r"(s), [p] "+r"(p), [n] "+r"(blocks)
                :
                : "memory", "cc");
        len &= 63;
    }
    for (; len >= 8; p += 8, len -= 8)
        s = add_carry(s, *(const u64u *)p);
    if (len >= 4) {
        s = add_carry(s, *(const u32u *)p);
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        s = add_carry(s, *(const u16u *)p);
        p += 2;
        len -= 2;
    }
    if (len)
        s = add_carry(s, *p);
    return fold(s);
}

/* The IPv4 header's sum (20 bytes, no options). */
static inline u16 sum_ip_header(const u8 *ip)
{
    const u32u *w = (const u32u *)ip;
    return fold((u64)w[0] + w[1] + w[2] + w[3] + w[4]);
}

/* ---- frames ---- */

/* Ethernet: destination = the sender, source = us. */
static inline void eth_reply(u8 *f)
{
    *(u32u *)f = *(const u32u *)(f + 6);
    *(u16u *)(f + 4) = *(const u16u *)(f + 10);
    *(u32u *)(f + 6) = *(const u32u *)mac;
    *(u16u *)(f + 10) = *(const u16u *)(mac + 4);
}

static inline int to_us(const u8 *f)
{
    return *(const u32u *)f == *(const u32u *)mac && *(const u16u *)(f + 4) == *(const u16u *)(mac + 4);
}

/* "00 01 08 00 06 04 00 01": Ethernet, IPv4, 6, 4, request. */
#define ARP_REQUEST_HEAD 0x0100040600080100ull

/* An ARP request for our address: turned into the reply. Returns the frame length or 0. */
static u32 arp(u8 *f, u32 n)
{
    u8 *a = f + 14;
    if (n < 42 || *(const u64u *)a != ARP_REQUEST_HEAD || *(const u32u *)(a + 24) != my_ip)
        return 0;
    a[7] = 2; /* reply */
    /* target = the sender; sender = us */
    *(u32u *)(a + 18) = *(const u32u *)(a + 8);
    *(u16u *)(a + 22) = *(const u16u *)(a + 12);
    *(u32u *)(a + 24) = *(const u32u *)(a + 14);
    *(u32u *)(a + 8) = *(const u32u *)mac;
    *(u16u *)(a + 12) = *(const u16u *)(mac + 4);
    *(u32u *)(a + 14) = my_ip;
    eth_reply(f);
    /* Pad to the Ethernet minimum of 60. */
    *(u64u *)(f + 42) = 0;
    *(u64u *)(f + 50) = 0;
    *(u16u *)(f + 58) = 0;
    return 60;
}

static u32 tcp_input(const u8 *f, const u8 *ip, u8 *l4, u32 len);

/* An ICMP echo request or a UDP datagram to port 7, for our address: turned into the
 * reply; a TCP segment goes to tcp_input (which may answer with a RST, built here the
 * same way). Returns the frame length or 0. */
static u32 ipv4(u8 *f, u32 n)
{
    u8 *ip = f + 14;
    if (n < 14 + 28 || ip[0] != 0x45 || *(const u32u *)(ip + 16) != my_ip)
        return 0;
    u32 tot = htons(*(const u16u *)(ip + 2));
    if (tot < 28 || tot > n - 14)
        return 0;
    if (*(const u16u *)(ip + 6) & htons(0x3fff)) /* MF or a fragment offset */
        return 0;
    if (sum_ip_header(ip) != 0xffff)
        return 0;
    u8 *l4 = ip + 20;
    u32 len = tot - 20;
    if (ip[9] == 1) {
        if (*(const u16u *)l4 != 0x0008 /* type 8 (echo request), code 0 */)
            return 0;
        if (sum_bytes(l4, len) != 0xffff)
            return 0;
        l4[0] = 0; /* echo reply */
        /* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') with m = 0x0008, m' = 0. */
        u16 hc = *(const u16u *)(l4 + 2);
        *(u16u *)(l4 + 2) = (u16)~fold((u64)(u16)~hc + (u16)~0x0008u);
    } else if (ip[9] == 17) {
        if (*(const u16u *)(l4 + 2) != htons(7))
            return 0;
        u32 ulen = htons(*(const u16u *)(l4 + 4));
        if (ulen < 8 || ulen > len)
            return 0;
        /* Swap the ports; with the addresses swapped too the checksum still holds. */
        u16 sport = *(const u16u *)l4;
        *(u16u *)l4 = *(const u16u *)(l4 + 2);
        *(u16u *)(l4 + 2) = sport;
    } else if (ip[9] == 6) {
        u32 out = tcp_input(f, ip, l4, len);
        if (!out)
            return 0;
        tot = 20 + out;
        *(u16u *)(ip + 2) = htons((u16)tot);
    } else {
        return 0;
    }
    u32 src = *(const u32u *)(ip + 12);
    *(u32u *)(ip + 12) = my_ip;
    *(u32u *)(ip + 16) = src;
    ip[8] = 64; /* TTL */
    *(u16u *)(ip + 10) = 0;
    *(u16u *)(ip + 10) = (u16)~sum_ip_header(ip);
    eth_reply(f);
    return 14 + tot;
}

/* The reply to frame f of n bytes, built in place; its length, or 0 to drop it. */
static inline u32 answer(u8 *f, u32 n)
{
    if (n < 14)
        return 0;
    u16 type = *(const u16u *)(f + 12);
    if (type == ETH_P_IP)
        return to_us(f) ? ipv4(f, n) : 0;
    if (type == ETH_P_ARP)
        return arp(f, n);
    return 0;
}

/* ---- queues ---- */

static inline void rx_post(u64 i)
{
    virtq_add1(&rxq, (u64)buf(i), BUF_LEN, 1, i);
}

/* Sends pool buffer i holding a frame of `len` bytes after its header. */
static inline void tx_post(u64 i, u32 len)
{
    u8 *b = buf(i);
    *(u64u *)b = 0; /* flags, gso_type, hdr_len, gso_size */
    *(u32u *)(b + 8) = 0; /* csum_start, csum_offset; num_buffers (0 on transmit) */
    if (virtq_add1(&txq, (u64)b, NET_HDR + len, 0, i) < 0) {
        tx_dropped++;
        spare[nspare++] = (u16)i;
        return;
    }
    tx_frames++;
}

static __attribute__((noreturn)) void queue_broken(const char *which)
{
    puts("netecho: error: the device returned a bad descriptor on the ");
    puts(which);
    puts(" queue\n");
    halt_forever();
}

/* Takes back what the device has sent: to the receive queue if it has room, else spare. */
static void tx_reclaim(void)
{
    u64 i;
    u32 len;
    int r;
    while ((r = virtq_get_used(&txq, &i, &len)) == 0) {
        if (rxq.num_free)
            rx_post(i);
        else
            spare[nspare++] = (u16)i;
    }
    if (r == -2)
        queue_broken("transmit");
}

/* ---- TCP echo on port 7 ----
 *
 * One connection at a time, passive open only. Every byte received in order is put in
 * the send ring and echoed; the ring is also the retransmission queue (bytes leave it when
 * the peer acknowledges them), and its free space is the advertised window, so the
 * window's right edge never moves back. A segment ahead of the expected one is answered
 * with a duplicate ACK and kept at its place in the ring if it extends the one range kept
 * ahead (else dropped); a peer without SACK otherwise ends its recovery after a migration
 * in a backed-off timeout. Retransmission is go-back-N: when the
 * timer expires, sending restarts at the first unacknowledged byte (the timer doubles on
 * each expiry, from TCP_RTO_MS to TCP_RTO_MAX_MS, and the connection is reset after
 * TCP_GIVE_UP expiries in a row). Closing is passive: after the peer's FIN the ring is
 * drained, then our FIN goes out and its ACK ends the connection (no TIME-WAIT: the
 * peer, which closed first, keeps that). The only option sent is MSS (in the SYN/ACK);
 * the only one read is the peer's MSS. Everything here lives in guest memory, so a
 * connection moves with the VM. */

#define TCP_PORT 7
#define SNDBUF 16384u           /* the ring; a power of two */
#define TCP_MSS_OURS 1460u      /* 1500 - 40: what our receive buffers hold */
#define TCP_MSS_DEFAULT 536u    /* RFC 1122, without the peer's MSS option */
#define TCP_RTO_MS 200u
#define TCP_RTO_MAX_MS 3200u
#define TCP_GIVE_UP 12u
#define TCP_BURST 16u           /* segments sent per loop round at most */

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

static inline u32 htonl(u32 v) { return __builtin_bswap32(v); }
/* Sequence-space comparison: a before b. */
static inline int seq_lt(u32 a, u32 b) { return (int)(a - b) < 0; }

enum tcp_state { TCP_LISTEN, TCP_SYN_RCVD, TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_LAST_ACK };

static struct {
    enum tcp_state state;
    u32 peer_ip;                /* network byte order */
    u16 peer_port;              /* network byte order */
    u8 peer_mac[6];
    u32 iss;
    u32 snd_una;                /* first unacknowledged sequence number */
    u32 snd_nxt;                /* next to send (moves back to snd_una on a timeout) */
    u32 snd_max;                /* highest sent + 1 */
    u32 snd_wnd;                /* the peer's window, from its last acceptable ACK */
    u32 mss;                    /* largest segment we send */
    u32 rcv_nxt;
    u32 head;                   /* ring index of the byte at snd_una */
    u32 buffered;               /* bytes in the ring: received, not yet acknowledged */
    u32 fin_rcvd;
    u32 ack_now;                /* an ACK is owed */
    u32 dupacks;                /* pure ACKs owed, one per out-of-order segment */
    u32 ooo_seq, ooo_len;       /* one range received ahead of rcv_nxt, kept in the ring */
    u32 timeouts;               /* expiries in a row */
    u64 rto;                    /* the current timeout, TSC ticks */
    u64 rto_at;                 /* when the timer expires; 0: not running */
    u16 ip_id;
} tcp;
static u8 ring[SNDBUF] __attribute__((aligned(64)));
static u64 ticks_per_ms;
static u64 now_tsc;             /* rdtsc() at the top of each loop round */
static u64 tcp_conns, tcp_echoed, tcp_rexmits, tcp_resets_sent;

/* 8 bytes at a time (memcpy in rt goes byte by byte; under emulation that counts). */
static void copy(u8 *d, const u8 *s, u32 n)
{
    for (; n >= 8; d += 8, s += 8, n -= 8)
        *(u64u *)d = *(const u64u *)s;
    while (n--)
        *d++ = *s++;
}

/* The TCP checksum's sum (pseudo-header included) over `len` bytes at l4. */
static inline u16 tcp_sum(const u8 *l4, u32 len, u32 src, u32 dst)
{
    return fold((u64)sum_bytes(l4, len) + src + dst + htons(6) + htons((u16)len));
}

static void tcp_arm(void) { tcp.rto_at = now_tsc + tcp.rto; }

static void tcp_close(void)
{
    tcp.state = TCP_LISTEN;
    tcp.rto_at = 0;
}

/* The peer's MSS option in a SYN, or the default. */
static u32 peer_mss(const u8 *l4, u32 hlen)
{
    u32 i = 20;
    while (i < hlen) {
        u8 kind = l4[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= hlen || l4[i + 1] < 2 || i + l4[i + 1] > hlen)
            break;
        if (kind == 2 && l4[i + 1] == 4) {
            u32 m = htons(*(const u16u *)(l4 + i + 2));
            if (m < 64)
                m = 64;
            return m < TCP_MSS_OURS ? m : TCP_MSS_OURS;
        }
        i += l4[i + 1];
    }
    return TCP_MSS_DEFAULT;
}

/* Sends one segment of the connection: `flags`, sequence number `seq`, `n` bytes of the
 * ring from offset `off` past snd_una (and the MSS option on a SYN). 0 if no buffer. */
static int tcp_send(u8 flags, u32 seq, u32 off, u32 n)
{
    if (!nspare || !txq.num_free)
        return 0;
    u64 i = spare[--nspare];
    u8 *f = buf(i) + NET_HDR;
    *(u32u *)f = *(const u32u *)tcp.peer_mac;
    *(u16u *)(f + 4) = *(const u16u *)(tcp.peer_mac + 4);
    *(u32u *)(f + 6) = *(const u32u *)mac;
    *(u16u *)(f + 10) = *(const u16u *)(mac + 4);
    *(u16u *)(f + 12) = ETH_P_IP;
    u8 *ip = f + 14;
    u8 *l4 = ip + 20;
    u32 hlen = flags & TH_SYN ? 24 : 20;
    u32 l4len = hlen + n;
    *(u32u *)ip = 0x45u | (u32)htons((u16)(20 + l4len)) << 16;
    *(u16u *)(ip + 4) = htons(tcp.ip_id++);
    *(u16u *)(ip + 6) = htons(0x4000); /* DF */
    ip[8] = 64;
    ip[9] = 6;
    *(u16u *)(ip + 10) = 0;
    *(u32u *)(ip + 12) = my_ip;
    *(u32u *)(ip + 16) = tcp.peer_ip;
    *(u16u *)(ip + 10) = (u16)~sum_ip_header(ip);
    *(u16u *)l4 = htons(TCP_PORT);
    *(u16u *)(l4 + 2) = tcp.peer_port;
    *(u32u *)(l4 + 4) = htonl(seq);
    *(u32u *)(l4 + 8) = htonl(tcp.rcv_nxt);
    l4[12] = (u8)(hlen << 2);
    l4[13] = flags;
    u32 wnd = SNDBUF - tcp.buffered;
    *(u16u *)(l4 + 14) = htons((u16)(wnd > 0xffff ? 0xffff : wnd));
    *(u32u *)(l4 + 16) = 0; /* checksum, urgent pointer */
    if (flags & TH_SYN)
        *(u32u *)(l4 + 20) = 0x0402u | (u32)htons(TCP_MSS_OURS) << 16;
    if (n) {
        u32 at = (tcp.head + off) & (SNDBUF - 1);
        u32 first = SNDBUF - at < n ? SNDBUF - at : n;
        copy(l4 + hlen, ring + at, first);
        copy(l4 + hlen + first, ring, n - first);
    }
    *(u16u *)(l4 + 16) = (u16)~tcp_sum(l4, l4len, my_ip, tcp.peer_ip);
    tx_post(i, 14 + 20 + l4len);
    tcp.ack_now = 0;
    return 1;
}

/* What the connection owes: the SYN/ACK, echo data (within the peer's window), our FIN,
 * an ACK; and retransmission when the timer has expired. */
static void tcp_output(void)
{
    if (tcp.state == TCP_LISTEN)
        return;
    int probe = 0;
    if (tcp.rto_at && (i64)(now_tsc - tcp.rto_at) >= 0) {
        if (++tcp.timeouts > TCP_GIVE_UP) {
            tcp_send(TH_RST | TH_ACK, tcp.snd_nxt, 0, 0);
            tcp_resets_sent++;
            tcp_close();
            puts("netecho: tcp connection reset: no acknowledgement\n");
            return;
        }
        tcp.snd_nxt = tcp.snd_una; /* go back N */
        tcp.rto = tcp.rto * 2 > TCP_RTO_MAX_MS * ticks_per_ms ? TCP_RTO_MAX_MS * ticks_per_ms : tcp.rto * 2;
        tcp_arm();
        tcp_rexmits++;
        probe = 1; /* one segment even into a closed window */
    }
    if (tcp.state == TCP_SYN_RCVD) {
        if (tcp.snd_nxt == tcp.iss && tcp_send(TH_SYN | TH_ACK, tcp.iss, 0, 0)) {
            tcp.snd_nxt = tcp.snd_max = tcp.iss + 1;
            if (!tcp.rto_at)
                tcp_arm();
        }
        return;
    }
    /* Duplicate ACKs first: pure ACKs, the same window, before any data. */
    while (tcp.dupacks && tcp_send(TH_ACK, tcp.snd_nxt, 0, 0))
        tcp.dupacks--;
    for (u32 k = 0; k < TCP_BURST; k++) {
        u32 sent = tcp.snd_nxt - tcp.snd_una; /* ring bytes already sent (+1 once FIN is) */
        if (sent < tcp.buffered) {
            u32 n = tcp.buffered - sent;
            if (n > tcp.mss)
                n = tcp.mss;
            u32 room = tcp.snd_wnd > sent ? tcp.snd_wnd - sent : 0;
            if (n > room && !probe)
                n = room;
            if (!n || !tcp_send(TH_ACK | TH_PSH, tcp.snd_nxt, sent, n))
                break;
            probe = 0;
            tcp.snd_nxt += n;
        } else if (tcp.fin_rcvd && sent == tcp.buffered) {
            if (!tcp_send(TH_FIN | TH_ACK, tcp.snd_nxt, 0, 0))
                break;
            tcp.snd_nxt++;
            tcp.state = TCP_LAST_ACK;
        } else {
            break;
        }
        if (seq_lt(tcp.snd_max, tcp.snd_nxt))
            tcp.snd_max = tcp.snd_nxt;
        if (!tcp.rto_at)
            tcp_arm();
    }
    if (tcp.ack_now)
        tcp_send(TH_ACK, tcp.snd_nxt, 0, 0);
}

/* Turns the segment at l4 (len bytes, in frame f) into a RST answering it, in place;
 * returns its length. The caller swaps the addresses (the pseudo-header's sum does not
 * change with the order). */
static u32 tcp_reset_reply(u8 *l4, u32 len, u32 hlen, u32 src, u32 dst)
{
    u8 flags = l4[13];
    u32 seq = htonl(*(const u32u *)(l4 + 4));
    u32 ack = htonl(*(const u32u *)(l4 + 8));
    u32 seglen = len - hlen + !!(flags & TH_SYN) + !!(flags & TH_FIN);
    u16 sport = *(const u16u *)l4;
    *(u16u *)l4 = *(const u16u *)(l4 + 2);
    *(u16u *)(l4 + 2) = sport;
    if (flags & TH_ACK) {
        *(u32u *)(l4 + 4) = htonl(ack);
        *(u32u *)(l4 + 8) = 0;
        l4[13] = TH_RST;
    } else {
        *(u32u *)(l4 + 4) = 0;
        *(u32u *)(l4 + 8) = htonl(seq + seglen);
        l4[13] = TH_RST | TH_ACK;
    }
    l4[12] = 5 << 4;
    *(u32u *)(l4 + 14) = 0; /* window, checksum */
    *(u16u *)(l4 + 18) = 0;
    *(u16u *)(l4 + 16) = (u16)~tcp_sum(l4, 20, src, dst);
    tcp_resets_sent++;
    return 20;
}

/* A segment ahead of rcv_nxt: its bytes go straight to their place in the ring (the
 * window guarantees the place is free: it lies between the ring's end and the window's
 * right edge, and neither acknowledgements nor in-order data move the bytes' place). One
 * range only: a segment that neither overlaps nor touches it is dropped (the peer sends
 * it again). The range joins the stream once the data before it arrives. */
static void tcp_keep_ahead(u32 seq, const u8 *data, u32 n)
{
    u32 off = seq - tcp.rcv_nxt;
    u32 room = SNDBUF - tcp.buffered;
    if (off >= room)
        return;
    if (n > room - off)
        n = room - off;
    if (tcp.ooo_len) {
        u32 end = tcp.ooo_seq + tcp.ooo_len;
        if (seq_lt(end, seq) || seq_lt(seq + n, tcp.ooo_seq))
            return;
        u32 start = seq_lt(seq, tcp.ooo_seq) ? seq : tcp.ooo_seq;
        u32 last = seq_lt(end, seq + n) ? seq + n : end;
        tcp.ooo_seq = start;
        tcp.ooo_len = last - start;
    } else {
        tcp.ooo_seq = seq;
        tcp.ooo_len = n;
    }
    u32 at = (tcp.head + tcp.buffered + off) & (SNDBUF - 1);
    u32 first = SNDBUF - at < n ? SNDBUF - at : n;
    copy(ring + at, data, first);
    copy(ring, data + first, n - first);
}

/* A TCP segment to our address (IP header at ip, `len` bytes of TCP at l4). Returns the
 * length of a reply built in place (a RST), or 0. */
static u32 tcp_input(const u8 *f, const u8 *ip, u8 *l4, u32 len)
{
    u32 src = *(const u32u *)(ip + 12), dst = *(const u32u *)(ip + 16);
    if (len < 20)
        return 0;
    u32 hlen = (u32)(l4[12] >> 4) * 4;
    if (hlen < 20 || hlen > len || tcp_sum(l4, len, src, dst) != 0xffff)
        return 0;
    u8 flags = l4[13];
    u16 sport = *(const u16u *)l4;
    int ours = tcp.state != TCP_LISTEN && src == tcp.peer_ip && sport == tcp.peer_port &&
               *(const u16u *)(l4 + 2) == htons(TCP_PORT);
    if (!ours) {
        if (flags & TH_RST)
            return 0;
        /* A SYN to the echo port with no connection open: a new connection. Anything
         * else (another port, an unknown connection, a second connection while one is
         * open) is refused with a RST. */
        if (tcp.state != TCP_LISTEN || (flags & (TH_SYN | TH_ACK | TH_FIN)) != TH_SYN ||
            *(const u16u *)(l4 + 2) != htons(TCP_PORT))
            return tcp_reset_reply(l4, len, hlen, src, dst);
        tcp.peer_ip = src;
        tcp.peer_port = sport;
        copy(tcp.peer_mac, f + 6, 6);
        tcp.mss = peer_mss(l4, hlen);
        tcp.rcv_nxt = htonl(*(const u32u *)(l4 + 4)) + 1;
        tcp.iss = (u32)(now_tsc >> 8);
        tcp.snd_una = tcp.snd_nxt = tcp.snd_max = tcp.iss;
        tcp.snd_wnd = htons(*(const u16u *)(l4 + 14));
        tcp.head = tcp.buffered = tcp.fin_rcvd = tcp.ack_now = tcp.dupacks = tcp.timeouts = 0;
        tcp.ooo_len = 0;
        tcp.rto = TCP_RTO_MS * ticks_per_ms;
        tcp.rto_at = 0;
        tcp.state = TCP_SYN_RCVD;
        return 0;
    }
    u32 seq = htonl(*(const u32u *)(l4 + 4));
    u32 ack = htonl(*(const u32u *)(l4 + 8));
    u32 wnd = htons(*(const u16u *)(l4 + 14));
    if (flags & TH_RST) {
        /* Accepted only at the expected sequence number or within our window. */
        if ((u32)(seq - tcp.rcv_nxt) <= SNDBUF - tcp.buffered) {
            tcp_close();
            puts("netecho: tcp connection reset by the peer\n");
        }
        return 0;
    }
    if (flags & TH_SYN) {
        if (tcp.state == TCP_SYN_RCVD && !(flags & TH_ACK) && seq + 1 == tcp.rcv_nxt)
            tcp.snd_nxt = tcp.iss; /* our SYN/ACK was lost: again */
        else
            tcp.ack_now = 1; /* a SYN inside the connection: a challenge ACK (RFC 5961) */
        return 0;
    }
    if (!(flags & TH_ACK))
        return 0;
    if (tcp.state == TCP_SYN_RCVD) {
        if (ack != tcp.iss + 1)
            return tcp_reset_reply(l4, len, hlen, src, dst);
        tcp.state = TCP_ESTABLISHED;
        tcp.snd_una = tcp.snd_nxt = tcp.snd_max = ack;
        tcp.snd_wnd = wnd;
        tcp.rto_at = 0;
        tcp.timeouts = 0;
        tcp_conns++;
    } else {
        u32 acked = ack - tcp.snd_una;
        if (acked <= tcp.snd_max - tcp.snd_una) {
            tcp.snd_wnd = wnd;
            if (acked) {
                /* Past the ring's bytes only with our FIN, which ends the connection. */
                if (acked > tcp.buffered) {
                    tcp_close();
                    return 0;
                }
                tcp.head = (tcp.head + acked) & (SNDBUF - 1);
                tcp.buffered -= acked;
                tcp.snd_una = ack;
                if (seq_lt(tcp.snd_nxt, ack))
                    tcp.snd_nxt = ack;
                tcp.rto = TCP_RTO_MS * ticks_per_ms;
                tcp.timeouts = 0;
                tcp.rto_at = 0;
                if (tcp.snd_una != tcp.snd_max || tcp.buffered)
                    tcp_arm();
            }
        }
    }
    u32 dlen = len - hlen;
    if (!dlen && !(flags & TH_FIN))
        return 0;
    tcp.ack_now = 1; /* data or FIN, new or not: acknowledge what we expect next */
    u32 have = tcp.rcv_nxt - seq; /* bytes of this segment we already hold */
    if (tcp.fin_rcvd || have > dlen) { /* ahead of rcv_nxt (out of order), or all old */
        /* One duplicate ACK per such segment, not one for the lot: three bring the
         * peer's fast retransmit instead of waiting for its timeout. */
        if (dlen && tcp.dupacks < TCP_BURST)
            tcp.dupacks++;
        if (!tcp.fin_rcvd && (int)have < 0 && dlen)
            tcp_keep_ahead(seq, l4 + hlen, dlen);
        return 0;
    }
    u32 take = dlen - have;
    u32 room = SNDBUF - tcp.buffered;
    if (take > room)
        take = room;
    if (take) {
        u32 at = (tcp.head + tcp.buffered) & (SNDBUF - 1);
        u32 first = SNDBUF - at < take ? SNDBUF - at : take;
        copy(ring + at, l4 + hlen + have, first);
        copy(ring, l4 + hlen + have + first, take - first);
        tcp.buffered += take;
        tcp.rcv_nxt += take;
        tcp_echoed += take;
    }
    /* The hole before the range kept ahead is filled: that range is in order now. */
    if (tcp.ooo_len && !seq_lt(tcp.rcv_nxt, tcp.ooo_seq)) {
        u32 end = tcp.ooo_seq + tcp.ooo_len;
        if (seq_lt(tcp.rcv_nxt, end) && !(flags & TH_FIN)) {
            u32 more = end - tcp.rcv_nxt;
            tcp.buffered += more;
            tcp.rcv_nxt += more;
            tcp_echoed += more;
        }
        tcp.ooo_len = 0;
    }
    if ((flags & TH_FIN) && have + take == dlen) {
        tcp.rcv_nxt++;
        tcp.fin_rcvd = 1;
        tcp.state = TCP_CLOSE_WAIT;
    }
    if (tcp.buffered && !tcp.rto_at)
        tcp_arm();
    return 0;
}

static void send_gratuitous_arp(void)
{
    if (!nspare)
        return;
    u64 i = spare[--nspare];
    u8 *f = buf(i) + NET_HDR;
    for (int k = 0; k < 6; k++) {
        f[k] = 0xff;
        f[6 + k] = mac[k];
    }
    *(u16u *)(f + 12) = ETH_P_ARP;
    u8 *a = f + 14;
    *(u64u *)a = ARP_REQUEST_HEAD;
    for (int k = 0; k < 6; k++) {
        a[8 + k] = mac[k];
        a[18 + k] = 0;
    }
    *(u32u *)(a + 14) = my_ip;
    *(u32u *)(a + 24) = my_ip;
    for (int k = 42; k < 60; k++)
        f[k] = 0;
    tx_post(i, 60);
    virtq_kick(&txq);
}

/* ---- setup ---- */

static void net_init(const char *cmdline)
{
    const char *why;
    if (virtio_mmio_find(cmdline, VIRTIO_ID_NET, &dev, "netecho", &why)) {
        fail2("no NIC (virtio-net): ", why);
    }
    u64 accepted;
    if (virtio_negotiate(&dev, F_NET_MAC, 0, &accepted, &why)) {
        fail2("virtio-net: ", why);
    }
    if (accepted & F_NET_MAC) {
        u32 gen;
        do {
            gen = virtio_config_generation(&dev);
            for (u32 k = 0; k < 6; k++)
                mac[k] = virtio_config8(&dev, k);
        } while (virtio_config_generation(&dev) != gen);
    } else {
        /* Locally administered, unicast, from the address. */
        mac[0] = 0x02;
        mac[1] = 0x00;
        *(u32u *)(mac + 2) = my_ip;
    }
    if (virtq_setup(&rxq, &dev, 0, RXQ_MAX, rx_ring, &why) ||
        virtq_setup(&txq, &dev, 1, TXQ_MAX, tx_ring, &why)) {
        virtio_fail(&dev);
        fail2("virtio-net queue: ", why);
    }
    for (u32 i = 0; i < POOL; i++) {
        if (i < rxq.size)
            rx_post(i);
        else
            spare[nspare++] = (u16)i;
    }
    virtio_driver_ok(&dev);
    virtq_kick(&rxq);

    puts("netecho: virtio-net at ");
    put_hex(dev.base, 1);
    puts(" irq ");
    put_dec(dev.irq);
    puts(" features offered=");
    put_hex(virtio_device_features(&dev), 16);
    puts(" accepted=");
    put_hex(accepted, 16);
    puts(" rxq=");
    put_dec(rxq.size);
    puts(" txq=");
    put_dec(txq.size);
    putc('\n');
}

void guest_main(const struct hvm_start_info *si)
{
    const char *cmdline = start_cmdline(si, known, "netecho");

    const char *ipv = cmdline_get(cmdline, "ip");
    u32 prefix; /* accepted, not used: netecho only answers */
    if (!ipv)
        fail("no address: ip=A.B.C.D/N is required (e.g. ip=10.0.0.2/24)");
    if (parse_ip(ipv, &my_ip, &prefix)) {
        char bad[40];
        unsigned k = 0;
        while (k + 1 < sizeof bad && ipv[k] && ipv[k] != ' ' && ipv[k] != '\t' && ipv[k] != '\n') {
            bad[k] = ipv[k];
            k++;
        }
        bad[k] = 0;
        fail3("bad ip=", k + 1 < sizeof bad ? bad : "(too long)",
              " (expected A.B.C.D or A.B.C.D/N, e.g. ip=10.0.0.2/24)");
    }

    u64 khz = tsc_khz();
    /* Without a TSC frequency from the VMM, assume 2 GHz. */
    ticks_per_ms = khz ? khz : 2000000ull;
    u64 period = ticks_per_ms * 1000 * REPORT_SECONDS;
    if (!khz)
        puts("netecho: no TSC frequency from the VMM; assuming 2 GHz for progress lines\n");

    net_init(cmdline);
    send_gratuitous_arp();

    puts("netecho: ready mac=");
    put_mac(mac);
    puts(" ip=");
    put_ip(my_ip);
    putc('\n');

    u64 next_report = rdtsc() + period;
    u64 said_rx = 0, said_tx = tx_frames, said_drop = 0;
    for (;;) {
        u64 i;
        u32 len;
        int r;
        now_tsc = rdtsc();
        while ((r = virtq_get_used(&rxq, &i, &len)) == 0) {
            rx_frames++;
            u32 out = len > NET_HDR && len <= BUF_LEN ? answer(buf(i) + NET_HDR, len - NET_HDR) : 0;
            if (out && txq.num_free) {
                /* This buffer is sent; a spare, if any, takes its place in the receive
                 * queue at once (else it goes back there once sent). */
                if (nspare)
                    rx_post(spare[--nspare]);
                tx_post(i, out);
            } else {
                if (out)
                    tx_dropped++;
                rx_post(i);
            }
        }
        if (r == -2)
            queue_broken("receive");
        tcp_output();
        if (virtq_unkicked(&txq))
            virtq_kick(&txq);
        tx_reclaim();
        /* Publish refilled receive buffers in batches, or at once when the device's
         * supply gets low (it only needs telling when it has run out). */
        u16 unkicked = virtq_unkicked(&rxq);
        if (unkicked && (unkicked >= RX_KICK_BATCH ||
                         (u16)(rxq.kicked_idx - rxq.last_used) < rxq.size / 2))
            virtq_kick(&rxq);

        if ((i64)(now_tsc - next_report) >= 0) {
            next_report = now_tsc + period;
            if (rx_frames != said_rx || tx_frames != said_tx || tx_dropped != said_drop) {
                puts("netecho: rx ");
                put_dec(rx_frames);
                puts(" tx ");
                put_dec(tx_frames);
                if (tx_dropped) {
                    puts(" dropped ");
                    put_dec(tx_dropped);
                }
                if (tcp_conns || tcp_resets_sent) {
                    puts(" tcp conns ");
                    put_dec(tcp_conns);
                    puts(" echoed ");
                    put_dec(tcp_echoed);
                    puts(" rexmit ");
                    put_dec(tcp_rexmits);
                    puts(" rst ");
                    put_dec(tcp_resets_sent);
                }
                putc('\n');
                said_rx = rx_frames;
                said_tx = tx_frames;
                said_drop = tx_dropped;
            }
        }
        cpu_relax();
    }
}
