/* console.c - output to the VMM's console port, one byte per `out`. */
#include "io.h"
#include "lib.h"
#include "../kemari_abi.h"

void con_putc(char c)
{
	out8(KEMARI_PORT_CONSOLE, (uint8_t)c);
}

void con_write(const char *s, size_t n)
{
	while (n--)
		con_putc(*s++);
}

void con_puts(const char *s)
{
	while (*s)
		con_putc(*s++);
}

void con_u64(uint64_t v)
{
	char b[20];

	con_write(b, fmt_u64(b, v));
}

void con_hex(uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	int shift;

	con_puts("0x");
	for (shift = 60; shift > 0 && !(v >> shift); shift -= 4)
		;
	for (; shift >= 0; shift -= 4)
		con_putc(digits[(v >> shift) & 0xf]);
}

void con_ipv4(uint32_t addr_be)
{
	char b[16];

	con_write(b, fmt_ipv4(b, addr_be));
}
