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
 * The driver: virtio-mmio version 2 (virtio 1.x) through rt/virtio.h, VIRTIO_F_VERSION_1
 * plus FLUSH and SIZE_MAX when offered, queue 0 (16 entries or QueueNumMax rounded down to
 * a power of 2) in static memory, one request at a time, completion by polling the used
 * ring (interrupts suppressed, never enabled).
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

#define F_BLK_SIZE_MAX (1ull << 1)
#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_FLUSH 4u

#define QSIZE 16
#define CHUNK_MAX (32u * 1024u) /* bytes per read while checking */

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static u8 ring[VIRTQ_MEM_BYTES(QSIZE)] __attribute__((aligned(4096)));
static struct blk_req req __attribute__((aligned(16)));
static u8 req_status __attribute__((aligned(16)));
static u64 recbuf[WORDS] __attribute__((aligned(4096)));
static u64 hdrbuf[WORDS] __attribute__((aligned(4096)));
static u64 iobuf[CHUNK_MAX / 8] __attribute__((aligned(4096)));

static struct virtio_dev dev; /* the disk's transport */
static struct virtq q;        /* its queue 0 */
static int has_flush;
static u64 capacity;    /* in 512-byte sectors */
static u32 chunk_sectors;
static u64 tsc_per_sec; /* 0 when the VMM publishes no TSC frequency */

static const char *const known[] = {"seed", "records", "rate", "window", "format",
                                    "virtio_mmio.device", 0};

static __attribute__((noreturn)) void fail2(const char *what, const char *why)
{
    puts("blkstress: error: ");
    puts(what);
    puts(why);
    putc('\n');
    poweroff_failed();
}

static __attribute__((noreturn)) void fail(const char *what) { fail2(what, ""); }

static __attribute__((noreturn)) void stop_after_corruption(void)
{
    puts("blkstress: stopped after corruption\n");
    halt_forever();
}

/* ---- options and the disk ---- */

static u64 option(const char *cmdline, const char *key, u64 def)
{
    return cmdline_option(cmdline, key, def, "blkstress");
}

/* Picks the first virtio_mmio.device= transport that is a version 2 virtio-blk (the
 * runtime's virtio layer parses the entries and probes each transport). */
static void find_disk(const char *cmdline)
{
    const char *why;
    if (virtio_mmio_find(cmdline, VIRTIO_ID_BLOCK, &dev, "blkstress", &why))
        fail(why);
    puts("blkstress: virtio-blk at ");
    put_hex(dev.base, 1);
    puts(" irq ");
    put_dec(dev.irq);
    puts(" vendor ");
    put_hex(dev.vendor_id, 8);
    putc('\n');
}

/* ---- virtio-blk driver ---- */

static __attribute__((noreturn)) void device_fail(const char *what, const char *why)
{
    virtio_fail(&dev);
    fail2(what, why);
}

static void blk_init(void)
{
    const char *why;
    u64 want;
    if (virtio_negotiate(&dev, F_BLK_FLUSH | F_BLK_SIZE_MAX, 0, &want, &why))
        fail2("virtio-blk: ", why);
    u64 offered = virtio_device_features(&dev);
    if (offered & F_BLK_RO)
        device_fail("the virtio-blk device is read-only", "");
    has_flush = !!(want & F_BLK_FLUSH);

    /* Capacity and size_max, consistently. */
    u32 gen, size_max = 0;
    do {
        gen = virtio_config_generation(&dev);
        capacity = virtio_config64(&dev, 0);
        if (want & F_BLK_SIZE_MAX)
            size_max = virtio_config32(&dev, 8);
    } while (virtio_config_generation(&dev) != gen);
    u32 chunk = CHUNK_MAX;
    if ((want & F_BLK_SIZE_MAX) && size_max < chunk)
        chunk = size_max;
    chunk_sectors = chunk / SECTOR;
    if (!chunk_sectors)
        chunk_sectors = 1;

    if (virtq_setup(&q, &dev, 0, QSIZE, ring, &why))
        device_fail("virtio-blk queue 0: ", why);
    if (q.size < 3)
        device_fail("virtio-blk queue 0 has fewer than 3 entries", "");
    virtio_driver_ok(&dev);

    puts("blkstress: features offered=");
    put_hex(offered, 16);
    puts(" accepted=");
    put_hex(want, 16);
    puts(" queue=");
    put_dec(q.size);
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
    struct virtq_buf bufs[3];
    unsigned n = 0, n_out = type == BLK_T_OUT ? 2 : 1;
    bufs[n++] = (struct virtq_buf){(u64)&req, sizeof req, 0};
    if (type != BLK_T_FLUSH)
        bufs[n++] = (struct virtq_buf){(u64)buf, len, type == BLK_T_IN};
    bufs[n++] = (struct virtq_buf){(u64)&req_status, 1, 1};
    int head = virtq_add(&q, bufs, n_out, n - n_out, 0);
    if (head < 0) {
        /* Cannot happen: the queue has 3 or more entries and each chain is freed. */
        puts("blkstress: CORRUPTION queue: no free descriptors with no request outstanding\n");
        stop_after_corruption();
    }
    virtq_kick(&q);

    u64 start = rdtsc();
    int warned = 0;
    while (!virtq_has_used(&q)) {
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
    u16 seen = q.last_used, now = q.used[1];
    if ((u16)(now - seen) != 1) {
        puts("blkstress: CORRUPTION queue: used index went from ");
        put_dec(seen);
        puts(" to ");
        put_dec(now);
        puts(" with one request outstanding\n");
        stop_after_corruption();
    }
    virtio_rmb(); /* the element after the index */
    u32 id = q.used_ring[seen & (q.size - 1)].id;
    if (id != (u32)head) {
        puts("blkstress: CORRUPTION queue: used ring returned descriptor ");
        put_dec(id);
        puts(", expected ");
        put_dec((u64)head);
        putc('\n');
        stop_after_corruption();
    }
    u64 token;
    u32 written;
    virtq_get_used(&q, &token, &written); /* frees the chain; the checks above passed */
    virtio_ack_interrupt(&dev);
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
        put_hex(virtio_read32(&dev, VIRTIO_MMIO_STATUS), 2);
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
    const char *cmdline = start_cmdline(si, known, "blkstress");
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
            poweroff_failed();
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
