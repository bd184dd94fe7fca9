/*
 * testguest.c - a tiny deterministic guest for the VMM's own tests
 * (tests/kvm/test_machine.py). Not a product image.
 *
 * boot_info.args[0] selects the job:
 *   1  compute: a pseudo-random walk over a 64 KiB table with integer and
 *      SSE arithmetic; every args[2] iterations it writes the iteration
 *      number to PORT_STEP (a place to stop and snapshot); at the end it
 *      writes the 32-bit digest of everything to PORT_RESULT, the full
 *      64-bit digest to MAILBOX[0], and powers off.
 *   2  dirty: waits at PORT_STEP; on each step, writes to MAILBOX[2]
 *      pages starting at page MAILBOX[1] (stride MAILBOX[3] pages), value
 *      MAILBOX[4]; MAILBOX[0] == 0 ends it.
 */
#include <stdint.h>
#include "kemari_abi.h"

#define PORT_STEP    0x600
#define PORT_RESULT  0x604
#define MAILBOX      ((volatile uint64_t *)0x9000)
#define BOOT         ((volatile struct kemari_boot_info *)KEMARI_BOOT_INFO_GPA)

static inline void out32(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static uint32_t table[16384];

static uint64_t compute(uint64_t iters, uint64_t every)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    double acc = 0.0, growth = 1.0;
    for (uint64_t i = 0; i < iters; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        table[(x >> 33) & 16383] ^= (uint32_t)(x >> 7);
        acc += (double)(x >> 40) * 1e-9;
        growth = growth * 1.0000001 + 1e-12 * (double)(i & 1023);
        if (every && i % every == 0)
            out32(PORT_STEP, (uint32_t)(i / every));
    }
    uint64_t h = 1469598103934665603ULL;
    for (int k = 0; k < 16384; k++) {
        h ^= table[k];
        h *= 1099511628211ULL;
    }
    return h ^ x ^ (uint64_t)(acc * 1000.0) ^ ((uint64_t)(growth * 1e6) << 1);
}

static void dirty(void)
{
    for (;;) {
        out32(PORT_STEP, 0);
        if (!MAILBOX[0])
            return;
        volatile uint8_t *base = (volatile uint8_t *)(MAILBOX[1] * KEMARI_PAGE_SIZE);
        for (uint64_t i = 0; i < MAILBOX[2]; i++)
            base[i * MAILBOX[3] * KEMARI_PAGE_SIZE] = (uint8_t)MAILBOX[4];
    }
}

void main(void)
{
    switch (BOOT->args[0]) {
    case 1: {
        uint64_t r = compute(BOOT->args[1], BOOT->args[2]);
        MAILBOX[0] = r;
        out32(PORT_RESULT, (uint32_t)r);
        break;
    }
    case 2:
        dirty();
        break;
    }
    out32(KEMARI_PORT_EXIT, 0);
    for (;;)
        ;
}

__asm__(".section .text.start, \"ax\"\n.globl _start\n_start:\n"
        "  and $-16, %rsp\n  call main\n1: jmp 1b\n");
