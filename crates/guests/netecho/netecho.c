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
 *     payload; the UDP checksum is left as it is, which swapping keeps correct).
 * Only plain IPv4 (no options, no fragments, valid header checksum) sent to its MAC.
 * At start it sends one gratuitous ARP (an ARP request for its own address), then prints
 *   netecho: ready mac=<mac> ip=<ip>
 * and, every 2 seconds in which something was received or sent,
 *   netecho: rx <frames received> tx <frames sent>[ dropped <replies not sent>]
 * ("dropped" only once a reply found the transmit queue full).
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
 * only loop over a frame's bytes is the ICMP checksum check (64 bytes per round).
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

/* An ICMP echo request or a UDP datagram to port 7, for our address: turned into the
 * reply. Returns the frame length or 0. */
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
    u64 period = (khz ? khz * 1000 : 2000000000ull) * REPORT_SECONDS;
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
        if (virtq_unkicked(&txq))
            virtq_kick(&txq);
        tx_reclaim();
        /* Publish refilled receive buffers in batches, or at once when the device's
         * supply gets low (it only needs telling when it has run out). */
        u16 unkicked = virtq_unkicked(&rxq);
        if (unkicked && (unkicked >= RX_KICK_BATCH ||
                         (u16)(rxq.kicked_idx - rxq.last_used) < rxq.size / 2))
            virtq_kick(&rxq);

        u64 now = rdtsc();
        if ((i64)(now - next_report) >= 0) {
            next_report = now + period;
            if (rx_frames != said_rx || tx_frames != said_tx || tx_dropped != said_drop) {
                puts("netecho: rx ");
                put_dec(rx_frames);
                puts(" tx ");
                put_dec(tx_frames);
                if (tx_dropped) {
                    puts(" dropped ");
                    put_dec(tx_dropped);
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
