/*
 * blkstress: an append-only record writer on a virtio-blk disk that catches any lost,
 * stale, duplicated or corrupt block.
 *
 * Command line: seed=N (default 1; a disk that already holds records keeps its own),
 * records=N (power off after writing N records in this boot; 0 = for ever), rate=N
 * (records per second, 0 = as fast as it can), window=N (the newest records re-read at
 * each check, default 512, 0 = every record on the disk), format=1 (overwrite a disk whose
 * sector 0 is not a blkstress header), and the disk itself in Linux's format
 * virtio_mmio.device=<size>@<base>:<irq> (several may be given; the first virtio-mmio
 * version 2 transport with DeviceID 2 is used).
 *
 * The driver: virtio-mmio version 2 (virtio 1.x), VIRTIO_F_VERSION_1 plus FLUSH and
 * SIZE_MAX when offered, queue 0 (16 entries or QueueNumMax) in static memory, one request
 * at a time, completion by polling the used ring (interrupts suppressed, never enabled).
 *
 * Disk format, in 512-byte sectors, little-endian u64 words:
 *   sector 0        header: [0] "BLKSHDR1"  [1] format version 1  [2] seed
 *                     [3] committed records (total ever written)  [4] record slots
 *                     [5] record size 512  [6] first record sector 8  [7..62] zero
 *                     [63] checksum of words 0..62
 *   sectors 1..7    unused
 *   sector 8 + s    record slot s = N mod slots (slots = capacity - 8) holds record N:
 *                     [0] "BLKSREC1"  [1] N  [2] seed
 *                     [3..62] payload gen(seed, N, word)  [63] checksum of words 0..62
 * When record N = slots is due the disk is full: blkstress says so once and wraps
 * around, overwriting the oldest records.
 *
 * Each step writes record N, flushes, reads the record back and compares it, re-reads the
 * header and checks it still holds the count this guest last committed, then writes the
 * header with the new count and flushes. Every 64 records (and before powering off)
 * it prints "blkstress: records N", re-reads the newest `window` records and the next 256
 * older ones in rotation (so every record is re-read now and then). At start, a disk that
 * already holds records gets the same check and is continued after them. A block that a
 * migration or restore lost, left stale or damaged shows as
 *   blkstress: CORRUPTION record <N>: <what> (sector <S>, <when>)
 *   blkstress: CORRUPTION header: <what>
 *   blkstress: CORRUPTION queue: <what>     (the virtqueue's used ring went wrong)
 * after which blkstress stops writing (halts) so the evidence stays on the disk.
 */
#include "../rt/rt.h"
#include "../rt/virtio.h"

#define SECTOR 512u
#define WORDS (SECTOR / 8)
#define FIRST_REC 8ull
#define HDR_MAGIC 0x31524448534b4c42ull /* "BLKSHDR1" */
#define REC_MAGIC 0x31434552534b4c42ull /* "BLKSREC1" */
#define FORMAT_VERSION 1
#define CHECK_EVERY 64
#define MAX_REPORTS 8
#define SWEEP 256 /* older records checked per periodic check, in rotation */
#define LOW_LIMIT (4ull << 30) /* identity-mapped by the entry stub */

/* virtio-mmio registers (virtio 1.x, section 4.2.2). */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_VENDOR_ID 0x00c
#define VM_DEVICE_FEATURES 0x010
#define VM_DEVICE_FEATURES_SEL 0x014
#define VM_DRIVER_FEATURES 0x020
#define VM_DRIVER_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INTERRUPT_STATUS 0x060
#define VM_INTERRUPT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LOW 0x080
#define VM_QUEUE_DESC_HIGH 0x084
#define VM_QUEUE_DRIVER_LOW 0x090
#define VM_QUEUE_DRIVER_HIGH 0x094
#define VM_QUEUE_DEVICE_LOW 0x0a0
#define VM_QUEUE_DEVICE_HIGH 0x0a4
#define VM_CONFIG_GENERATION 0x0fc
#define VM_CONFIG 0x100

#define ST_ACKNOWLEDGE 1u
#define ST_DRIVER 2u
#define ST_DRIVER_OK 4u
#define ST_FEATURES_OK 8u
#define ST_NEEDS_RESET 64u
#define ST_FAILED 128u

#define F_BLK_SIZE_MAX (1ull << 1)
#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define F_VERSION_1 (1ull << 32)

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_FLUSH 4u

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1

#define QSIZE 16
#define CHUNK_MAX (32u * 1024u) /* bytes per read while checking */

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[QSIZE];
    u16 avail_event;
};

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct virtq_desc desc[QSIZE] __attribute__((aligned(4096)));
static struct virtq_avail avail __attribute__((aligned(4096)));
static struct virtq_used used __attribute__((aligned(4096)));
static struct blk_req req __attribute__((aligned(16)));
static u8 req_status __attribute__((aligned(16)));
static u64 recbuf[WORDS] __attribute__((aligned(4096)));
static u64 hdrbuf[WORDS] __attribute__((aligned(4096)));
static u64 iobuf[CHUNK_MAX / 8] __attribute__((aligned(4096)));

static u64 mmio;        /* the transport's base (identity-mapped) */
static u16 qsize;       /* queue 0's size */
static u16 avail_idx;   /* next avail index the driver publishes */
static u16 used_seen;   /* used index the driver has consumed up to */
static int has_flush;
static u64 capacity;    /* in 512-byte sectors */
static u32 chunk_sectors;
static u64 tsc_per_sec; /* 0 when the VMM publishes no TSC frequency */

static const char *const known[] = {"seed", "records", "rate", "window", "format",
                                    "virtio_mmio.device", 0};

static inline u32 rd32(u32 off) { return *(volatile u32 *)(mmio + off); }
static inline void wr32(u32 off, u32 v) { *(volatile u32 *)(mmio + off) = v; }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static __attribute__((noreturn)) void fail(const char *what)
{
    puts("blkstress: error: ");
    puts(what);
    putc('\n');
    poweroff();
}

static __attribute__((noreturn)) void stop_after_corruption(void)
{
    puts("blkstress: stopped after corruption\n");
    halt_forever();
}

/* ---- options and the virtio_mmio.device= parser ---- */

static u64 option(const char *cmdline, const char *key, u64 def)
{
    return cmdline_option(cmdline, key, def, "blkstress");
}

/* Picks the first virtio_mmio.device= transport that is a version 2 virtio-blk (the
 * runtime's virtio layer parses the entries and probes each transport). */
static void find_disk(const char *cmdline)
{
    struct virtio_dev dev;
    const char *why;
    if (virtio_mmio_find(cmdline, VIRTIO_ID_BLOCK, &dev, "blkstress", &why))
        fail(why);
    mmio = dev.base;
    puts("blkstress: virtio-blk at ");
    put_hex(dev.base, 1);
    puts(" irq ");
    put_dec(dev.irq);
    puts(" vendor ");
    put_hex(dev.vendor_id, 8);
    putc('\n');
}

/* ---- virtio-blk driver ---- */

static u64 device_features(void)
{
    wr32(VM_DEVICE_FEATURES_SEL, 0);
    u64 lo = rd32(VM_DEVICE_FEATURES);
    wr32(VM_DEVICE_FEATURES_SEL, 1);
    u64 hi = rd32(VM_DEVICE_FEATURES);
    return hi << 32 | lo;
}

static void device_fail(const char *what)
{
    wr32(VM_STATUS, rd32(VM_STATUS) | ST_FAILED);
    fail(what);
}

static u32 config32(u32 off) { return rd32(VM_CONFIG + off); }

static void blk_init(void)
{
    wr32(VM_STATUS, 0); /* reset */
    for (int i = 0; rd32(VM_STATUS) != 0; i++) {
        if (i > 1000000)
            fail("the virtio-blk device does not finish its reset");
        cpu_relax();
    }
    wr32(VM_STATUS, ST_ACKNOWLEDGE);
    wr32(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

    u64 offered = device_features();
    if (!(offered & F_VERSION_1))
        device_fail("the virtio-blk device does not offer VIRTIO_F_VERSION_1");
    if (offered & F_BLK_RO)
        device_fail("the virtio-blk device is read-only");
    u64 want = F_VERSION_1 | (offered & (F_BLK_FLUSH | F_BLK_SIZE_MAX));
    wr32(VM_DRIVER_FEATURES_SEL, 0);
    wr32(VM_DRIVER_FEATURES, (u32)want);
    wr32(VM_DRIVER_FEATURES_SEL, 1);
    wr32(VM_DRIVER_FEATURES, (u32)(want >> 32));
    wr32(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd32(VM_STATUS) & ST_FEATURES_OK))
        device_fail("the virtio-blk device refused the features (FEATURES_OK did not stick)");
    has_flush = !!(want & F_BLK_FLUSH);

    /* Capacity (a 64-bit field read as two 32-bit halves) and size_max, consistently. */
    u32 gen, size_max = 0;
    do {
        gen = rd32(VM_CONFIG_GENERATION);
        capacity = (u64)config32(0) | (u64)config32(4) << 32;
        if (want & F_BLK_SIZE_MAX)
            size_max = config32(8);
    } while (rd32(VM_CONFIG_GENERATION) != gen);
    u32 chunk = CHUNK_MAX;
    if ((want & F_BLK_SIZE_MAX) && size_max < chunk)
        chunk = size_max;
    chunk_sectors = chunk / SECTOR;
    if (!chunk_sectors)
        chunk_sectors = 1;

    wr32(VM_QUEUE_SEL, 0);
    if (rd32(VM_QUEUE_READY))
        device_fail("virtio-blk queue 0 is already live after a reset");
    u32 max = rd32(VM_QUEUE_NUM_MAX);
    if (max < 3)
        device_fail("virtio-blk queue 0 is missing or has fewer than 3 entries");
    qsize = max < QSIZE ? (u16)max : QSIZE;
    wr32(VM_QUEUE_NUM, qsize);
    avail.flags = VRING_AVAIL_F_NO_INTERRUPT;
    wr32(VM_QUEUE_DESC_LOW, (u32)(u64)desc);
    wr32(VM_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
    wr32(VM_QUEUE_DRIVER_LOW, (u32)(u64)&avail);
    wr32(VM_QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
    wr32(VM_QUEUE_DEVICE_LOW, (u32)(u64)&used);
    wr32(VM_QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
    mb();
    wr32(VM_QUEUE_READY, 1);
    wr32(VM_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);

    puts("blkstress: features offered=");
    put_hex(offered, 16);
    puts(" accepted=");
    put_hex(want, 16);
    puts(" queue=");
    put_dec(qsize);
    puts(" flush=");
    put_dec((u64)has_flush);
    puts(" chunk=");
    put_dec((u64)chunk_sectors * SECTOR);
    putc('\n');
}

static const char *op_name(u32 type)
{
    return type == BLK_T_IN ? "read" : type == BLK_T_OUT ? "write" : "flush";
}

/* One request, waited for by polling the used ring; stops the guest on any failure. */
static void blk_io(u32 type, u64 sector, void *buf, u32 len)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    req_status = 0xff;
    /* Chain: header (device reads), data (device writes it for IN), status byte. */
    u16 last = type == BLK_T_FLUSH ? 1 : 2;
    desc[0].addr = (u64)&req;
    desc[0].len = sizeof req;
    desc[0].flags = VRING_DESC_F_NEXT;
    desc[0].next = 1;
    if (type != BLK_T_FLUSH) {
        desc[1].addr = (u64)buf;
        desc[1].len = len;
        desc[1].flags = VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0);
        desc[1].next = 2;
    }
    desc[last].addr = (u64)&req_status;
    desc[last].len = 1;
    desc[last].flags = VRING_DESC_F_WRITE;
    desc[last].next = 0;

    /* Descriptors, then the ring entry, then the index, then the notify. */
    avail.ring[avail_idx % qsize] = 0;
    mb();
    avail_idx++;
    *(volatile u16 *)&avail.idx = avail_idx;
    mb();
    wr32(VM_QUEUE_NOTIFY, 0);

    u64 start = rdtsc();
    int warned = 0;
    u16 now;
    while ((now = *(volatile u16 *)&used.idx) == used_seen) {
        cpu_relax();
        if (tsc_per_sec && !warned && rdtsc() - start > 10 * tsc_per_sec) {
            puts("blkstress: still waiting for the device: ");
            puts(op_name(type));
            puts(" sector ");
            put_dec(sector);
            putc('\n');
            warned = 1;
        }
    }
    mb();
    if ((u16)(now - used_seen) != 1) {
        puts("blkstress: CORRUPTION queue: used index went from ");
        put_dec(used_seen);
        puts(" to ");
        put_dec(now);
        puts(" with one request outstanding\n");
        stop_after_corruption();
    }
    struct virtq_used_elem e = *(volatile struct virtq_used_elem *)&used.ring[used_seen % qsize];
    used_seen = now;
    u32 isr = rd32(VM_INTERRUPT_STATUS);
    if (isr)
        wr32(VM_INTERRUPT_ACK, isr);
    if (e.id != 0) {
        puts("blkstress: CORRUPTION queue: used ring returned descriptor ");
        put_dec(e.id);
        puts(", expected 0\n");
        stop_after_corruption();
    }
    u8 st = *(volatile u8 *)&req_status;
    if (st != 0) {
        puts("blkstress: error: ");
        puts(op_name(type));
        if (type != BLK_T_FLUSH) {
            puts(" of ");
            put_dec(len / SECTOR);
            puts(" sectors at sector ");
            put_dec(sector);
        }
        puts(" failed with status ");
        put_dec(st);
        puts(st == 1 ? " (IOERR)" : st == 2 ? " (UNSUPP)" : st == 0xff ? " (not written)" : "");
        puts("; device status ");
        put_hex(rd32(VM_STATUS), 2);
        putc('\n');
        halt_forever();
    }
}

static void blk_flush(void)
{
    if (has_flush)
        blk_io(BLK_T_FLUSH, 0, 0, 0);
}

/* ---- records ---- */

static u64 mix64(u64 z)
{
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z;
}

static u64 gen(u64 seed, u64 n, u64 i)
{
    return mix64(seed * 0x9e3779b97f4a7c15ull ^ n * 0xc2b2ae3d27d4eb4full ^ i * 0x165667b19e3779f9ull);
}

static u64 checksum(const u64 *w)
{
    u64 h = 0xcbf29ce484222325ull;
    for (unsigned i = 0; i < WORDS - 1; i++) {
        h = (h ^ w[i]) * 0x9e3779b97f4a7c15ull;
        h = h << 31 | h >> 33;
    }
    return h;
}

static void make_record(u64 *w, u64 seed, u64 n)
{
    w[0] = REC_MAGIC;
    w[1] = n;
    w[2] = seed;
    for (unsigned i = 3; i < WORDS - 1; i++)
        w[i] = gen(seed, n, i);
    w[WORDS - 1] = checksum(w);
}

static void record_problem(u64 n)
{
    puts("blkstress: CORRUPTION record ");
    put_dec(n);
    puts(": ");
}

static void record_where(u64 sector, const char *when)
{
    puts(" (sector ");
    put_dec(sector);
    puts(", ");
    puts(when);
    puts(")\n");
}

/* Checks record n as read from `sector`; prints a CORRUPTION line and returns 1 if bad.
 * `wrote`, if given, is what this guest just wrote there (compared word for word);
 * otherwise the fast check is magic, sequence number, seed and checksum (the checksum
 * covers the payload), and only a failing record has its payload regenerated. */
static int check_record(const u64 *w, const u64 *wrote, u64 seed, u64 n, u64 sector,
                        const char *when)
{
    if (wrote) {
        unsigned i = 0;
        while (i < WORDS && w[i] == wrote[i])
            i++;
        if (i == WORDS)
            return 0;
    } else if (w[0] == REC_MAGIC && w[1] == n && w[2] == seed && checksum(w) == w[WORDS - 1]) {
        return 0;
    }
    if (w[0] != REC_MAGIC) {
        int zero = 1;
        for (unsigned i = 0; i < WORDS; i++)
            zero &= w[i] == 0;
        record_problem(n);
        if (zero) {
            puts("missing, the sector is all zeros");
        } else {
            puts("bad magic ");
            put_hex(w[0], 16);
        }
        record_where(sector, when);
        return 1;
    }
    u64 sum = checksum(w);
    if (w[1] != n) {
        record_problem(n);
        puts("wrong sequence number ");
        put_dec(w[1]);
        puts(w[1] < n ? " (an older record: stale or misplaced)"
                      : " (a newer record: misplaced)");
        if (sum != w[WORDS - 1])
            puts(" and bad checksum");
        record_where(sector, when);
        return 1;
    }
    if (sum != w[WORDS - 1]) {
        record_problem(n);
        puts("bad checksum: stored ");
        put_hex(w[WORDS - 1], 16);
        puts(" computed ");
        put_hex(sum, 16);
        record_where(sector, when);
        return 1;
    }
    if (w[2] != seed) {
        record_problem(n);
        puts("seed ");
        put_dec(w[2]);
        puts(", expected ");
        put_dec(seed);
        record_where(sector, when);
        return 1;
    }
    for (unsigned i = 3; i < WORDS - 1; i++) {
        u64 want = gen(seed, n, i);
        if (w[i] != want) {
            record_problem(n);
            puts("payload word ");
            put_dec(i);
            puts(" is ");
            put_hex(w[i], 16);
            puts(", expected ");
            put_hex(want, 16);
            record_where(sector, when);
            return 1;
        }
    }
    if (wrote) {
        /* Only a changed checksum word is left. */
        record_problem(n);
        puts("differs from what was written");
        record_where(sector, when);
        return 1;
    }
    return 0;
}

/* ---- the header ---- */

static u64 slots; /* record slots on this disk */

static void write_header(u64 seed, u64 count)
{
    for (unsigned i = 0; i < WORDS; i++)
        hdrbuf[i] = 0;
    hdrbuf[0] = HDR_MAGIC;
    hdrbuf[1] = FORMAT_VERSION;
    hdrbuf[2] = seed;
    hdrbuf[3] = count;
    hdrbuf[4] = slots;
    hdrbuf[5] = SECTOR;
    hdrbuf[6] = FIRST_REC;
    hdrbuf[WORDS - 1] = checksum(hdrbuf);
    blk_io(BLK_T_OUT, 0, hdrbuf, SECTOR);
    blk_flush();
}

static void header_problem(const char *what)
{
    puts("blkstress: CORRUPTION header: ");
    puts(what);
}

/* Reads the header into iobuf; returns 0 if it is a valid header, 1 if the sector is all
 * zeros, 2 if it holds something else, 3 if it is a damaged blkstress header (printed). */
static int read_header(void)
{
    blk_io(BLK_T_IN, 0, iobuf, SECTOR);
    const u64 *w = iobuf;
    if (w[0] != HDR_MAGIC) {
        for (unsigned i = 0; i < WORDS; i++)
            if (w[i])
                return 2;
        return 1;
    }
    u64 sum = checksum(w);
    if (sum != w[WORDS - 1]) {
        header_problem("bad checksum: stored ");
        put_hex(w[WORDS - 1], 16);
        puts(" computed ");
        put_hex(sum, 16);
        putc('\n');
        return 3;
    }
    if (w[1] != FORMAT_VERSION || w[5] != SECTOR || w[6] != FIRST_REC) {
        header_problem("unknown format version ");
        put_dec(w[1]);
        puts(" / record size ");
        put_dec(w[5]);
        puts(" / first sector ");
        put_dec(w[6]);
        putc('\n');
        return 3;
    }
    return 0;
}

/* Re-reads the header during the run and compares it with what this boot wrote. */
static int check_header(u64 seed, u64 count)
{
    int r = read_header();
    const u64 *w = iobuf;
    if (r == 1 || r == 2) {
        header_problem(r == 1 ? "sector 0 is all zeros" : "bad magic ");
        if (r == 2)
            put_hex(w[0], 16);
        puts(", expected count ");
        put_dec(count);
        putc('\n');
        return 1;
    }
    if (r)
        return 1;
    if (w[3] != count) {
        header_problem("count ");
        puts(w[3] < count ? "went backwards: " : "jumped ahead: ");
        put_dec(w[3]);
        puts(" on disk, ");
        put_dec(count);
        puts(" committed by this guest\n");
        return 1;
    }
    if (w[2] != seed || w[4] != slots) {
        header_problem("seed ");
        put_dec(w[2]);
        puts(" slots ");
        put_dec(w[4]);
        puts(", expected seed ");
        put_dec(seed);
        puts(" slots ");
        put_dec(slots);
        putc('\n');
        return 1;
    }
    return 0;
}

static u64 reports; /* CORRUPTION lines printed by the current check */

/* Re-reads and checks records [from, to) (all live); returns 1 if any is bad. Reports at
 * most MAX_REPORTS records. */
static int check_range(u64 seed, u64 from, u64 to, const char *when)
{
    int bad = 0;
    u64 n = from;
    while (n < to) {
        u64 slot = n % slots;
        u64 k = to - n;
        if (k > chunk_sectors)
            k = chunk_sectors;
        if (k > slots - slot)
            k = slots - slot; /* do not read past the last slot */
        blk_io(BLK_T_IN, FIRST_REC + slot, iobuf, (u32)(k * SECTOR));
        for (u64 j = 0; j < k; j++) {
            if (check_record(iobuf + j * WORDS, 0, seed, n + j, FIRST_REC + slot + j, when)) {
                bad = 1;
                if (++reports >= MAX_REPORTS) {
                    puts("blkstress: (more records not checked)\n");
                    return bad;
                }
            }
        }
        n += k;
    }
    return bad;
}

static u64 sweep_next; /* the next older record the sweep checks */

/* Checks the last `window` committed records (every live record if window is 0) and, when
 * older live records exist, the next SWEEP of them in rotation, so that every record on
 * the disk is re-read now and then. Returns 1 if any is bad. */
static int check_records(u64 seed, u64 count, u64 window, const char *when)
{
    u64 oldest = count > slots ? count - slots : 0;
    u64 tail = oldest;
    if (window && count - oldest > window)
        tail = count - window;
    reports = 0;
    int bad = check_range(seed, tail, count, when);
    if (tail > oldest && reports < MAX_REPORTS) {
        if (sweep_next < oldest || sweep_next >= tail)
            sweep_next = oldest;
        u64 end = tail - sweep_next > SWEEP ? sweep_next + SWEEP : tail;
        bad |= check_range(seed, sweep_next, end, when);
        sweep_next = end;
    }
    return bad;
}

/* How many records check_records reads at most. */
static u64 check_size(u64 count, u64 window)
{
    u64 live = count < slots ? count : slots;
    if (!window || live <= window)
        return live;
    return window + (live - window < SWEEP ? live - window : SWEEP);
}

static void records_line(u64 count)
{
    puts("blkstress: records ");
    put_dec(count);
    putc('\n');
}

void guest_main(const struct hvm_start_info *si)
{
    const char *cmdline = 0;
    if (si->magic != HVM_START_MAGIC)
        fail("no PVH start info");
    if (si->cmdline_paddr)
        cmdline = (const char *)si->cmdline_paddr;
    cmdline_check(cmdline, known, "blkstress");
    u64 seed = option(cmdline, "seed", 1);
    u64 limit = option(cmdline, "records", 0);
    u64 rate = option(cmdline, "rate", 0);
    u64 window = option(cmdline, "window", 512);
    u64 format = option(cmdline, "format", 0);

    u64 khz = tsc_khz();
    tsc_per_sec = khz * 1000;
    u64 tsc_per_rec = (rate && khz) ? tsc_per_sec / rate : 0;
    if (rate && !khz)
        puts("blkstress: no TSC frequency from the VMM; ignoring rate\n");

    find_disk(cmdline);
    blk_init();
    if (capacity < FIRST_REC + 1)
        fail("the disk is too small: it needs at least 9 sectors (4.5 KiB)");
    slots = capacity - FIRST_REC;
    puts("blkstress: capacity=");
    put_dec(capacity);
    puts(" slots=");
    put_dec(slots);
    puts(" seed=");
    put_dec(seed);
    puts(" rate=");
    put_dec(rate);
    puts(" window=");
    put_dec(window);
    putc('\n');

    /* A fresh disk, or one this guest wrote before. */
    u64 count = 0;
    int h = read_header();
    if (h == 3)
        stop_after_corruption();
    if (h == 2 && !format)
        fail("sector 0 holds no blkstress header (not a blkstress disk?); "
             "format=1 overwrites it");
    if (h == 0) {
        const u64 *w = iobuf;
        u64 disk_seed = w[2], disk_slots = w[4];
        count = w[3];
        if (!disk_slots) {
            puts("blkstress: CORRUPTION header: 0 record slots\n");
            stop_after_corruption();
        }
        if (disk_slots > slots) {
            puts("blkstress: error: the disk was formatted with ");
            put_dec(disk_slots);
            puts(" record slots but now has room for ");
            put_dec(slots);
            putc('\n');
            poweroff();
        }
        slots = disk_slots;
        if (disk_seed != seed) {
            puts("blkstress: the disk was written with seed=");
            put_dec(disk_seed);
            puts("; continuing with it\n");
            seed = disk_seed;
        }
        puts("blkstress: disk holds ");
        put_dec(count);
        puts(" records; checking ");
        put_dec(check_size(count, window));
        puts(" of them\n");
        if (check_records(seed, count, window, "at start"))
            stop_after_corruption();
    } else {
        puts(h == 1 ? "blkstress: new disk\n" : "blkstress: formatting over sector 0\n");
        write_header(seed, 0);
    }

    puts("blkstress: ready capacity=");
    put_dec(capacity);
    putc('\n');

    u64 written = 0;
    int full_said = count > slots;
    u64 next_at = rdtsc();
    for (;;) {
        u64 n = count;
        u64 sector = FIRST_REC + n % slots;
        if (n == slots && !full_said) {
            puts("blkstress: disk full after ");
            put_dec(n);
            puts(" records; wrapping around\n");
            full_said = 1;
        }
        make_record(recbuf, seed, n);
        blk_io(BLK_T_OUT, sector, recbuf, SECTOR);
        blk_flush();
        blk_io(BLK_T_IN, sector, iobuf, SECTOR);
        if (check_record(iobuf, recbuf, seed, n, sector, "read back after write"))
            stop_after_corruption();
        /* Just before it is overwritten, the header must still say what this guest last
         * committed: a restore or a migration that rolled the disk back shows here. */
        if (check_header(seed, count))
            stop_after_corruption();
        count = n + 1;
        write_header(seed, count);
        written++;

        int last = limit && written >= limit;
        if (count % CHECK_EVERY == 0 || last) {
            records_line(count);
            if (check_records(seed, count, window, "periodic check"))
                stop_after_corruption();
        }
        if (last) {
            puts("blkstress: done records=");
            put_dec(count);
            puts(" this boot=");
            put_dec(written);
            putc('\n');
            poweroff();
        }
        if (tsc_per_rec) {
            next_at += tsc_per_rec;
            u64 now;
            while ((i64)((now = rdtsc()) - next_at) < 0)
                cpu_relax();
            /* After a pause (checkpoint, migration) do not race to catch up. */
            if (now - next_at > tsc_per_sec)
                next_at = now;
        }
    }
}
