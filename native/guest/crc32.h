/* crc32.h - CRC-32C (Castagnoli), the checksum of the kv disk log. */
#ifndef GUEST_CRC32_H
#define GUEST_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* crc32c(0, p, n) is the standard CRC-32C of p; pass a previous result as
 * `crc` to continue over more bytes. crc32c(0, "123456789", 9) == 0xe3069283. */
uint32_t crc32c(uint32_t crc, const void *p, size_t n);

#endif
