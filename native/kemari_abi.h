/*
 * kemari_abi.h - the ABI shared by Kemari guest images, the VMM and the
 * device backends (kvm driver).
 *
 * One header, included by the freestanding guest (native/guest/), by the VMM
 * core (native/vmm.c) and, through cffi, by the Python backends. Keep it
 * free of anything but fixed-width types, structs and integer #defines so
 * that cffi's cdef can parse it (see kemari_agent/native_build.py).
 *
 * Model: Xen's split drivers. The guest owns three shared rings in its own
 * memory; each ring has producer/consumer indices and *event thresholds*
 * (req_event / rsp_event, as in xen/include/public/io/ring.h) so that a
 * side only signals the other when the other asked to be signalled.
 *
 *  - The guest signals a backend by writing to the device's doorbell port
 *    (`out`). That exit is the event Kemari taps: the vCPU is stopped there,
 *    the checkpoint is taken, and only then does the backend consume the
 *    ring and perform the I/O. In epoch mode the guest runs on and block
 *    requests stay in flight until the checkpoint of the epoch that covers
 *    them is acknowledged. Responses always come in ring order.
 *  - Backends signal the guest by advancing rsp_prod. An idle guest writes
 *    to KEMARI_PORT_BLOCK (the PV analogue of SCHEDOP_block); the VMM keeps
 *    the vCPU stopped until some ring has rsp_prod past its rsp_event, or
 *    the timeout (microseconds, 0 = none) passes.
 *  - Requests in [rsp_prod, req_prod) are "in flight". A backend keeps no
 *    other state: after a restore or a failover it attaches to the rings
 *    by setting its consumer index to rsp_prod and redoing those requests
 *    (the XenbusStateAttached idea); outgoing I/O is safe to redo.
 *
 * All indices are free-running uint32 counters; slot = index % RING_SIZE.
 * Buffers are guest-physical addresses (the guest is identity mapped).
 */
#ifndef KEMARI_ABI_H
#define KEMARI_ABI_H

#include <stdint.h>

#define KEMARI_ABI_VERSION        1
#define KEMARI_BOOT_MAGIC         0x49524d4b   /* "KMRI" little-endian */
#define KEMARI_PAGE_SIZE          4096

/* ---- guest-physical layout ------------------------------------------- */
#define KEMARI_GDT_GPA            0x1000       /* written by the VMM */
#define KEMARI_BOOT_INFO_GPA      0x2000       /* struct kemari_boot_info */
#define KEMARI_BLK_RING_GPA       0x3000       /* struct kemari_blk_ring */
#define KEMARI_NET_TX_RING_GPA    0x4000       /* struct kemari_net_ring */
#define KEMARI_NET_RX_RING_GPA    0x5000       /* struct kemari_net_ring */
#define KEMARI_PAGE_TABLE_GPA     0x10000      /* PML4, PDPT, 4 PDs: 0x10000-0x15fff */
#define KEMARI_IMAGE_GPA          0x100000     /* flat image, entry point at its first byte */
#define KEMARI_MAX_IMAGE_BYTES    0x400000     /* 4 MiB of text+data (bss may extend further) */
/* The initial stack pointer is the top of guest RAM (boot_info.mem_bytes). */

/* ---- ports ------------------------------------------------------------ */
#define KEMARI_PORT_CONSOLE       0x3f8        /* out8: one console byte */
#define KEMARI_PORT_BLK_NOTIFY    0x500        /* out32: block ring has requests (tapped) */
#define KEMARI_PORT_NET_NOTIFY    0x504        /* out32: net tx ring has requests (tapped) */
#define KEMARI_PORT_BLOCK         0x508        /* out32 timeout_us: block until an event */
#define KEMARI_PORT_EXIT          0x50c        /* out32 code: power off (0 = clean) */

/* ---- boot info (VMM writes it before the first instruction) ----------- */
#define KEMARI_BOOT_NET           0x1          /* a NIC is attached */
#define KEMARI_BOOT_DISK          0x2          /* a disk is attached */

struct kemari_boot_info {
    uint32_t magic;                            /* KEMARI_BOOT_MAGIC */
    uint32_t abi_version;                      /* KEMARI_ABI_VERSION */
    uint64_t mem_bytes;                        /* guest RAM size */
    uint64_t disk_sectors;                     /* 512-byte sectors */
    uint32_t flags;                            /* KEMARI_BOOT_* */
    uint8_t  mac[6];
    uint8_t  pad0[2];
    uint32_t ipv4_addr;                        /* network byte order */
    uint32_t ipv4_netmask;                     /* network byte order */
    uint32_t ipv4_gateway;                     /* network byte order, 0 = none */
    uint32_t pad1;
    uint64_t args[8];                          /* image parameters (stress: see below) */
    char     cmdline[256];                     /* NUL-terminated, informational */
};

/* stress image: args[0] pages dirtied per I/O event, args[1] events/s (0 = flat out),
 * args[2] working-set pages (pages cycled through; 0 = pages per event),
 * args[3] stop after this many events, args[4] what the working set holds at
 * boot (KEMARI_STRESS_FILL_*). */
#define KEMARI_STRESS_ARG_PAGES   0
#define KEMARI_STRESS_ARG_RATE    1
#define KEMARI_STRESS_ARG_WSET    2
#define KEMARI_STRESS_ARG_FILL    4
#define KEMARI_STRESS_FILL_NONE   0            /* zeros (each dirtied page: one counter) */
#define KEMARI_STRESS_FILL_TEXT   1            /* words: compresses like text, ~1.5x by LZ4 */
#define KEMARI_STRESS_FILL_RANDOM 2            /* incompressible */

/* ---- rings ------------------------------------------------------------ */
#define KEMARI_RING_SIZE          32           /* slots per ring, power of two */

struct kemari_ring_hdr {
    uint32_t req_prod;                         /* guest: requests produced */
    uint32_t req_event;                        /* backend: notify when req_prod passes this */
    uint32_t rsp_prod;                         /* backend: responses produced */
    uint32_t rsp_event;                        /* guest: wake me when rsp_prod passes this */
    uint8_t  pad[48];
};

/* block: one contiguous buffer per request (max KEMARI_BLK_MAX_SECTORS) */
#define KEMARI_BLK_SECTOR_SIZE    512
#define KEMARI_BLK_MAX_SECTORS    128          /* 64 KiB */
#define KEMARI_BLK_OP_READ        0
#define KEMARI_BLK_OP_WRITE       1            /* completes only once durable */
#define KEMARI_BLK_OP_FLUSH       2

#define KEMARI_STATUS_OK          0
#define KEMARI_STATUS_EIO         (-1)         /* backend I/O error */
#define KEMARI_STATUS_ENOSPC      (-2)         /* host disk full: nothing was written */
#define KEMARI_STATUS_EINVAL      (-3)         /* malformed request (bounds, op, gpa) */

struct kemari_blk_request {
    uint64_t id;                               /* echoed in the response */
    uint64_t sector;
    uint64_t buf_gpa;
    uint32_t nr_sectors;
    uint8_t  op;                               /* KEMARI_BLK_OP_* */
    uint8_t  pad[3];
};

struct kemari_blk_response {
    uint64_t id;
    int16_t  status;                           /* KEMARI_STATUS_* */
    uint8_t  op;
    uint8_t  pad[5];
};

union kemari_blk_slot {
    struct kemari_blk_request req;
    struct kemari_blk_response rsp;
    uint8_t  raw[64];
};

struct kemari_blk_ring {
    struct kemari_ring_hdr hdr;
    union kemari_blk_slot slot[KEMARI_RING_SIZE];
};

/* net: tx requests carry a frame; rx requests post an empty buffer that the
 * backend fills (the response gives the frame length). Frames are raw
 * Ethernet, no FCS. */
#define KEMARI_NET_MTU            1500
#define KEMARI_NET_FRAME_MAX      1514         /* MTU + Ethernet header */
#define KEMARI_NET_BUF_SIZE       2048

struct kemari_net_request {
    uint64_t id;
    uint64_t buf_gpa;
    uint16_t len;                              /* tx: frame length; rx: buffer size */
    uint8_t  pad[6];
};

struct kemari_net_response {
    uint64_t id;
    uint16_t len;                              /* rx: frame length */
    int16_t  status;                           /* KEMARI_STATUS_* */
    uint8_t  pad[4];
};

union kemari_net_slot {
    struct kemari_net_request req;
    struct kemari_net_response rsp;
    uint8_t  raw[64];
};

struct kemari_net_ring {
    struct kemari_ring_hdr hdr;
    union kemari_net_slot slot[KEMARI_RING_SIZE];
};

#endif /* KEMARI_ABI_H */
