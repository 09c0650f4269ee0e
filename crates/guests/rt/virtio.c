/* virtio-mmio (version 2) transports and split virtqueues for Ferry's test guests. */
#include "virtio.h"

#define LOW_LIMIT (4ull << 30) /* identity-mapped by the entry stub */

static int is_end(char c) { return c == 0 || c == ' ' || c == '\t' || c == '\n'; }

static void put_token(const char *s)
{
    while (!is_end(*s))
        putc(*s++);
}

/* Linux's memparse: decimal or 0x hex, optional K/M/G suffix. Returns the end or 0. */
static const char *parse_num(const char *s, u64 *out)
{
    u64 v = 0;
    int digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;; s++, digits++) {
            char c = *s;
            u64 d;
            if (c >= '0' && c <= '9')
                d = (u64)(c - '0');
            else if (c >= 'a' && c <= 'f')
                d = (u64)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                d = (u64)(c - 'A' + 10);
            else
                break;
            v = v << 4 | d;
        }
    } else {
        for (; *s >= '0' && *s <= '9'; s++, digits++)
            v = v * 10 + (u64)(*s - '0');
    }
    if (!digits)
        return 0;
    switch (*s) {
    case 'k': case 'K': v <<= 10; s++; break;
    case 'm': case 'M': v <<= 20; s++; break;
    case 'g': case 'G': v <<= 30; s++; break;
    default: break;
    }
    *out = v;
    return s;
}

int virtio_mmio_parse(const char *v, u64 *size, u64 *base, u64 *irq)
{
    const char *s = parse_num(v, size);
    if (!s || *s != '@')
        return -1;
    s = parse_num(s + 1, base);
    if (!s || *s != ':')
        return -1;
    s = parse_num(s + 1, irq);
    if (!s)
        return -1;
    if (*s == ':') {
        u64 id;
        s = parse_num(s + 1, &id);
        if (!s)
            return -1;
    }
    return is_end(*s) ? 0 : -1;
}

int virtio_mmio_find(const char *cmdline, u32 device_id, struct virtio_dev *dev,
                     const char *guest, const char **why)
{
    static const char key[] = "virtio_mmio.device";
    int entries = 0, legacy = 0;
    const char *p = cmdline;
    const char *v;
    while ((v = cmdline_get(p, key)) != 0) {
        u64 size, base, irq;
        p = v;
        entries++;
        if (virtio_mmio_parse(v, &size, &base, &irq)) {
            puts(guest);
            puts(": cannot parse virtio_mmio.device=");
            put_token(v);
            puts("; skipping it\n");
            continue;
        }
        if (size < VIRTIO_MMIO_CONFIG || base >= LOW_LIMIT || base + size > LOW_LIMIT ||
            (base & 3)) {
            puts(guest);
            puts(": virtio_mmio.device=");
            put_token(v);
            puts(" is too small, misaligned or above 4 GiB; skipping it\n");
            continue;
        }
        u32 magic = mmio_read32(base + VIRTIO_MMIO_MAGIC_VALUE);
        if (magic != VIRTIO_MMIO_MAGIC) {
            puts(guest);
            puts(": no virtio-mmio magic at ");
            put_hex(base, 1);
            puts(" (found ");
            put_hex(magic, 8);
            puts("); skipping it\n");
            continue;
        }
        u32 id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
        if (id != device_id) {
            /* 0: an empty transport (QEMU's microvm has many); others: another kind. */
            if (id) {
                puts(guest);
                puts(": skipping virtio device type ");
                put_dec(id);
                puts(" at ");
                put_hex(base, 1);
                putc('\n');
            }
            continue;
        }
        u32 version = mmio_read32(base + VIRTIO_MMIO_VERSION);
        if (version != 2) {
            puts(guest);
            puts(": virtio device type ");
            put_dec(id);
            puts(" at ");
            put_hex(base, 1);
            puts(" is virtio-mmio version ");
            put_dec(version);
            puts(", not 2 (modern); skipping it\n");
            legacy++;
            continue;
        }
        dev->base = base;
        dev->size = size;
        dev->irq = (u32)irq;
        dev->device_id = id;
        dev->vendor_id = mmio_read32(base + VIRTIO_MMIO_VENDOR_ID);
        dev->features = 0;
        return 0;
    }
    if (!entries)
        *why = "no virtio_mmio.device=<size>@<base>:<irq> on the command line";
    else if (legacy)
        *why = "only legacy (virtio-mmio version 1) transports of that type; QEMU: "
               "-global virtio-mmio.force-legacy=false";
    else
        *why = "no transport of that type (DeviceID) among the virtio_mmio.device= entries";
    return -1;
}

int virtio_reset(struct virtio_dev *d)
{
    virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
    for (int i = 0; virtio_read32(d, VIRTIO_MMIO_STATUS) != 0; i++) {
        if (i > 1000000)
            return -1;
        cpu_relax();
    }
    return 0;
}

u64 virtio_device_features(const struct virtio_dev *d)
{
    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 lo = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u64 hi = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
    return hi << 32 | lo;
}

void virtio_fail(struct virtio_dev *d)
{
    virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_read32(d, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_FAILED);
}

int virtio_negotiate(struct virtio_dev *d, u64 wanted, u64 required, u64 *accepted,
                     const char **why)
{
    if (virtio_reset(d)) {
        *why = "the device does not finish its reset";
        return -1;
    }
    virtio_write32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_write32(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    required |= VIRTIO_F_VERSION_1;
    u64 offered = virtio_device_features(d);
    if ((offered & required) != required) {
        virtio_fail(d);
        *why = (offered & VIRTIO_F_VERSION_1) ? "the device does not offer a required feature"
                                               : "the device does not offer VIRTIO_F_VERSION_1";
        return -1;
    }
    u64 want = offered & (wanted | required);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)want);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(want >> 32));
    virtio_write32(d, VIRTIO_MMIO_STATUS,
                   VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_read32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        virtio_fail(d);
        *why = "the device refused the features (FEATURES_OK did not stick)";
        return -1;
    }
    d->features = want;
    *accepted = want;
    return 0;
}

int virtq_setup(struct virtq *q, const struct virtio_dev *d, u16 index, u16 max_size, void *mem,
                const char **why)
{
    virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY)) {
        *why = "the queue is already live after a reset";
        return -1;
    }
    u32 max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0) {
        *why = "the queue does not exist (QueueNumMax 0)";
        return -1;
    }
    if (max > max_size)
        max = max_size;
    u16 size = 1;
    while ((u32)size * 2 <= max)
        size = (u16)(size * 2);

    u8 *m = mem;
    /* The layout follows the size the queue gets, which fits in what max_size needs. */
    memset(m, 0, VIRTQ_MEM_BYTES(size));
    q->notify = d->base + VIRTIO_MMIO_QUEUE_NOTIFY;
    q->index = index;
    q->size = size;
    q->desc = (volatile struct virtq_desc *)m;
    q->avail = (volatile u16 *)(m + VIRTQ_AVAIL_OFF(size));
    q->used = (volatile u16 *)(m + VIRTQ_USED_OFF(size));
    q->used_ring = (volatile struct virtq_used_elem *)(m + VIRTQ_USED_OFF(size) + 4);
    q->tokens = (u64 *)(m + VIRTQ_TOKENS_OFF(size));
    for (u16 i = 0; i < size; i++)
        q->desc[i].next = (u16)(i + 1 < size ? i + 1 : 0);
    q->free_head = 0;
    q->num_free = size;
    q->avail_idx = 0;
    q->kicked_idx = 0;
    q->last_used = 0;
    q->avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT;

    u64 desc = (u64)q->desc, avail = (u64)q->avail, used = (u64)q->used;
    virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)avail);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)used);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
    virtio_mb();
    virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    virtio_mb();
    virtio_write32(d, VIRTIO_MMIO_STATUS,
                   VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                       VIRTIO_STATUS_DRIVER_OK);
}

u32 virtio_ack_interrupt(const struct virtio_dev *d)
{
    u32 isr = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    return isr;
}

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n_out, unsigned n_in,
              u64 token)
{
    unsigned n = n_out + n_in;
    if (n == 0 || n > q->num_free)
        return -1;
    u16 head = q->free_head, i = head;
    for (unsigned k = 0; k < n; k++) {
        volatile struct virtq_desc *d = &q->desc[i];
        d->addr = bufs[k].addr;
        d->len = bufs[k].len;
        d->flags = (u16)((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        i = d->next;
    }
    q->free_head = i;
    q->num_free = (u16)(q->num_free - n);
    q->tokens[head] = token;
    q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
    q->avail_idx++;
    return head;
}

int virtq_kick(struct virtq *q)
{
    if (q->avail_idx == q->kicked_idx)
        return 0;
    virtio_wmb(); /* descriptors and ring entries before the index */
    q->avail[1] = q->avail_idx;
    q->kicked_idx = q->avail_idx;
    virtio_mb(); /* the index before reading the device's flags */
    if (q->used[0] & VIRTQ_USED_F_NO_NOTIFY)
        return 0;
    mmio_write32(q->notify, q->index);
    return 1;
}
