/* io.h - port I/O and compiler barriers for the guest (CPL 3, IOPL 3). */
#ifndef GUEST_IO_H
#define GUEST_IO_H

#include <stdint.h>

static inline void out8(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void out32(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

/* x86 is TSO: stores are not reordered with stores, loads not with loads;
 * a compiler barrier orders ring writes. mb() also orders store->load,
 * needed between "set rsp_event" and "re-check rsp_prod". */
#define barrier() __asm__ volatile("" : : : "memory")
#define wmb()     barrier()
#define rmb()     barrier()
#define mb()      __asm__ volatile("mfence" : : : "memory")

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#endif
