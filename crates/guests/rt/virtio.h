/*
 * virtio-mmio (version 2, virtio 1.x) for Ferry's test guests: transports named on the
 * command line in Linux's format virtio_mmio.device=<size>@<base>:<irq>[:<id>], the
 * status and feature handshake, and split virtqueues driven by polling (interrupts
 * suppressed, never enabled).
 *
 * Use:
 *   struct virtio_dev dev;
 *   const char *why;
 *   if (virtio_mmio_find(cmdline, VIRTIO_ID_NET, &dev, "netecho", &why)) -> print why, stop
 *   if (virtio_negotiate(&dev, wanted, required, &accepted, &why))       -> print why, stop
 *   read the configuration space (virtio_config_*), set up each queue:
 *   static u8 ring[VIRTQ_MEM_BYTES(256)] __attribute__((aligned(4096)));
 *   struct virtq q;
 *   if (virtq_setup(&q, &dev, 0, 256, ring, &why))                        -> print why, stop
 *   virtio_driver_ok(&dev);
 * then virtq_add() buffers (several), virtq_kick() once, and poll virtq_get_used().
 *
 * Everything is identity-mapped below 4 GiB, so guest-physical = virtual addresses.
 * x86 only: stores are not reordered with stores nor loads with loads (TSO), so the read
 * and write barriers only stop the compiler; virtio_mb() is a full fence (a store
 * followed by a load of another location, e.g. publishing avail->idx and then reading
 * used->flags, needs one).
 */
#ifndef FERRY_GUEST_VIRTIO_H
#define FERRY_GUEST_VIRTIO_H

#include "rt.h"

/* ---- barriers and MMIO accessors ---- */

static inline void virtio_mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void virtio_rmb(void) { __asm__ volatile("" ::: "memory"); }
static inline void virtio_wmb(void) { __asm__ volatile("" ::: "memory"); }

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* ---- virtio-mmio registers (virtio 1.x, section 4.2.2) ---- */

#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 1u
#define VIRTIO_STATUS_DRIVER 2u
#define VIRTIO_STATUS_DRIVER_OK 4u
#define VIRTIO_STATUS_FEATURES_OK 8u
#define VIRTIO_STATUS_NEEDS_RESET 64u
#define VIRTIO_STATUS_FAILED 128u

/* Device-independent feature bits. */
#define VIRTIO_F_VERSION_1 (1ull << 32)

/* Device IDs. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* ---- split virtqueues (section 2.7) ---- */

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

/* The queue memory layout (driver-private): descriptor table at 0, available ring at
 * 16*n, used ring at the next 64-byte boundary, then one u64 token per descriptor. */
#define VIRTQ_ALIGN_UP(x, a) (((x) + (a) - 1) & ~((unsigned long)(a) - 1))
#define VIRTQ_AVAIL_OFF(n) (16ul * (n))
#define VIRTQ_USED_OFF(n) VIRTQ_ALIGN_UP(VIRTQ_AVAIL_OFF(n) + 6ul + 2ul * (n), 64)
#define VIRTQ_TOKENS_OFF(n) VIRTQ_ALIGN_UP(VIRTQ_USED_OFF(n) + 6ul + 8ul * (n), 64)
/* Bytes of memory (4096-aligned is best, 16-aligned is required) a queue of up to n
 * entries needs; n a power of 2. */
#define VIRTQ_MEM_BYTES(n) (VIRTQ_TOKENS_OFF(n) + 8ul * (n))

/* A driver's view of one split virtqueue. */
struct virtq {
    u64 notify;                 /* address of the transport's QueueNotify register */
    u16 index;                  /* queue index */
    u16 size;                   /* entries (a power of 2) */
    u16 num_free;               /* free descriptors */
    u16 free_head;              /* first free descriptor (a list through .next) */
    u16 avail_idx;              /* the driver's avail index, published by virtq_kick */
    u16 kicked_idx;             /* avail index at the last virtq_kick */
    u16 last_used;              /* next used entry virtq_get_used looks at */
    volatile struct virtq_desc *desc;
    volatile u16 *avail;        /* [0] flags, [1] idx, [2 + i] ring[i] */
    volatile u16 *used;         /* [0] flags, [1] idx, then the elements */
    volatile struct virtq_used_elem *used_ring;
    u64 *tokens;                /* the caller's token per chain head */
};

/* One buffer of a chain for virtq_add. */
struct virtq_buf {
    u64 addr;
    u32 len;
    u32 device_writes;          /* 1: the device writes it (in); 0: it reads it (out) */
};

/* ---- a transport ---- */

struct virtio_dev {
    u64 base;                   /* the register window (identity-mapped) */
    u64 size;                   /* its length from the command line */
    u32 irq;                    /* from the command line (unused: drivers here poll) */
    u32 device_id;
    u32 vendor_id;
    u64 features;               /* accepted by virtio_negotiate */
};

static inline u32 virtio_read32(const struct virtio_dev *d, u32 off) { return mmio_read32(d->base + off); }
static inline void virtio_write32(const struct virtio_dev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

/* Configuration space (offsets from 0x100). For fields wider than 32 bits or several
 * fields read together, repeat while the generation changes:
 *   do { g = virtio_config_generation(d); ... } while (virtio_config_generation(d) != g); */
static inline u32 virtio_config_generation(const struct virtio_dev *d) { return virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION); }
static inline u8 virtio_config8(const struct virtio_dev *d, u32 off) { return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off); }
static inline u16 virtio_config16(const struct virtio_dev *d, u32 off) { return mmio_read16(d->base + VIRTIO_MMIO_CONFIG + off); }
static inline u32 virtio_config32(const struct virtio_dev *d, u32 off) { return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off); }
/* A 64-bit field as two 32-bit reads, low half first (inside a generation loop). */
static inline u64 virtio_config64(const struct virtio_dev *d, u32 off)
{
    return (u64)virtio_config32(d, off) | (u64)virtio_config32(d, off + 4) << 32;
}

/* Parses one virtio_mmio.device= value "<size>@<base>:<irq>[:<id>]" (numbers decimal or
 * 0x hex, with an optional K/M/G suffix, as Linux's memparse); 0 on success. */
int virtio_mmio_parse(const char *v, u64 *size, u64 *base, u64 *irq);

/* Finds the first virtio_mmio.device= transport on the command line whose MagicValue is
 * "virt", whose Version is 2 and whose DeviceID is `device_id`, and fills *dev (features
 * 0). Entries it cannot use are mentioned on the console as "<guest>: ..." lines (empty
 * transports, DeviceID 0, silently). Returns 0, or -1 with *why saying what is missing
 * (no entries, only legacy version 1 transports, no such device). */
int virtio_mmio_find(const char *cmdline, u32 device_id, struct virtio_dev *dev,
                     const char *guest, const char **why);

/* Resets the device (waits for Status to read 0); 0, or -1 if it never does. */
int virtio_reset(struct virtio_dev *d);

/* The handshake up to FEATURES_OK: reset, ACKNOWLEDGE, DRIVER, read the offered features,
 * accept offered & (wanted | required) (VIRTIO_F_VERSION_1 is always required), write them,
 * set FEATURES_OK and check it stuck. Sets d->features and *accepted. Returns 0, or -1
 * with *why (and Status FAILED set). */
int virtio_negotiate(struct virtio_dev *d, u64 wanted, u64 required, u64 *accepted,
                     const char **why);

/* The 64 feature bits the device offers. */
u64 virtio_device_features(const struct virtio_dev *d);

/* Sets up queue `index` with min(QueueNumMax, max_size) entries, rounded down to a power
 * of 2, in `mem` (VIRTQ_MEM_BYTES(max_size) bytes, 16-aligned, zeroed here), with
 * interrupts suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT), and sets QueueReady. Call between
 * virtio_negotiate and virtio_driver_ok. Returns 0, or -1 with *why. */
int virtq_setup(struct virtq *q, const struct virtio_dev *d, u16 index, u16 max_size, void *mem,
                const char **why);

/* Sets DRIVER_OK: the device is live. */
void virtio_driver_ok(struct virtio_dev *d);

/* Sets FAILED in Status (the driver gives up on the device). */
void virtio_fail(struct virtio_dev *d);

/* Reads and acknowledges InterruptStatus; returns what was set (bit 0: used buffer,
 * bit 1: configuration change). Only needed to clear a level-triggered line. */
u32 virtio_ack_interrupt(const struct virtio_dev *d);

/* Adds a chain of n_out device-read buffers followed by n_in device-written ones (the
 * `device_writes` field of each is overridden by that split) to the available ring,
 * remembering `token` for virtq_get_used. Not visible to the device before virtq_kick.
 * Returns the head descriptor, or -1 if fewer than n_out + n_in descriptors are free. */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n_out, unsigned n_in,
              u64 token);

/* The common single-buffer case of virtq_add, without the loop. */
static inline int virtq_add1(struct virtq *q, u64 addr, u32 len, int device_writes, u64 token)
{
    if (!q->num_free)
        return -1;
    u16 head = q->free_head;
    volatile struct virtq_desc *d = &q->desc[head];
    q->free_head = d->next;
    q->num_free--;
    d->addr = addr;
    d->len = len;
    d->flags = device_writes ? VIRTQ_DESC_F_WRITE : 0;
    q->tokens[head] = token;
    q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
    q->avail_idx++;
    return head;
}

/* Buffers added since the last virtq_kick. */
static inline u16 virtq_unkicked(const struct virtq *q) { return (u16)(q->avail_idx - q->kicked_idx); }

/* Publishes the buffers added since the last kick (avail->idx) and, unless the device set
 * VIRTQ_USED_F_NO_NOTIFY, writes QueueNotify. Returns 1 if it notified. */
int virtq_kick(struct virtq *q);

/* 1 if the device has returned a buffer virtq_get_used has not yet taken. */
static inline int virtq_has_used(const struct virtq *q) { return q->used[1] != q->last_used; }

/* Takes the next used chain: returns 0 with its token and the length the device wrote
 * (*len may be 0), its descriptors freed; -1 if there is none; -2 if the device returned
 * a descriptor that is out of range (a device bug: the queue is broken). */
static inline int virtq_get_used(struct virtq *q, u64 *token, u32 *len)
{
    u16 last = q->last_used;
    if (q->used[1] == last)
        return -1;
    virtio_rmb(); /* the element after the index */
    volatile struct virtq_used_elem *e = &q->used_ring[last & (q->size - 1)];
    u32 id = e->id;
    *len = e->len;
    q->last_used = (u16)(last + 1);
    if (id >= q->size)
        return -2; /* a device bug; the caller may treat it as fatal */
    *token = q->tokens[id];
    /* Free the chain: find its tail, link it to the free list. */
    u16 n = 1, tail = (u16)id;
    while ((q->desc[tail].flags & VIRTQ_DESC_F_NEXT) && n < q->size) {
        tail = q->desc[tail].next & (q->size - 1);
        n++;
    }
    q->desc[tail].next = q->free_head;
    q->free_head = (u16)id;
    q->num_free = (u16)(q->num_free + n);
    return 0;
}

#endif
