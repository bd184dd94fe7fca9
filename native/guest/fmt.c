/* fmt.c - number formatting and parsing into caller buffers (pure). */
#include "lib.h"

size_t fmt_u64(char *buf, uint64_t v)
{
	char tmp[20];
	size_t n = 0, i;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (i = 0; i < n; i++)
		buf[i] = tmp[n - 1 - i];
	return n;
}

size_t fmt_ipv4(char *buf, uint32_t addr_be)
{
	const uint8_t *b = (const uint8_t *)&addr_be;
	size_t n = 0;
	int i;

	for (i = 0; i < 4; i++) {
		if (i)
			buf[n++] = '.';
		n += fmt_u64(buf + n, b[i]);
	}
	return n;
}

int parse_u64(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	size_t i;

	if (len == 0)
		return -1;
	for (i = 0; i < len; i++) {
		unsigned d = (unsigned)(s[i] - '0');

		if (d > 9)
			return -1;
		if (v > (UINT64_MAX - d) / 10)
			return -2;
		v = v * 10 + d;
	}
	*out = v;
	return 0;
}
