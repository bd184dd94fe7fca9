/* kvproto.c - request parser: strict, allocation-free, never reads past len. */
#include "kvproto.h"

static int printable(char c)
{
	return c > 0x20 && c < 0x7f;
}

static int eq(const char *a, size_t n, const char *lit)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (!lit[i] || a[i] != lit[i])
			return 0;
	return lit[n] == 0;
}

int kv_parse(const char *buf, size_t len, struct kv_req *r)
{
	const char *tok[5];
	size_t tlen[5];
	size_t i = 0, ntok = 0, want;

	r->op = KV_OP_NONE;
	r->id = r->key = r->val = 0;
	r->id_len = r->key_len = r->val_len = 0;
	r->err = "bad-request";
	if (len > KV_REQ_MAX) {
		r->err = "too-long";
		return -1;
	}
	if (len && buf[len - 1] == '\n')
		len--;
	if (len && buf[len - 1] == '\r')
		len--;
	while (i < len) {
		size_t start;

		while (i < len && buf[i] == ' ')
			i++;
		if (i == len)
			break;
		start = i;
		while (i < len && buf[i] != ' ') {
			if (!printable(buf[i]))
				return -1;
			i++;
		}
		if (ntok == 5)
			return -1;
		tok[ntok] = buf + start;
		tlen[ntok++] = i - start;
	}
	if (ntok == 0)
		return -1;
	if (eq(tok[0], tlen[0], "PUT")) {
		r->op = KV_OP_PUT;
		want = 4;
	} else if (eq(tok[0], tlen[0], "GET")) {
		r->op = KV_OP_GET;
		want = 3;
	} else if (eq(tok[0], tlen[0], "INCR")) {
		r->op = KV_OP_INCR;
		want = 3;
	} else {
		return -1;
	}
	if (ntok != want) {
		r->op = KV_OP_NONE;
		return -1;
	}
	if (tlen[1] > KV_ID_MAX || tlen[2] > KV_KEY_MAX || (want == 4 && tlen[3] > KV_VAL_MAX)) {
		r->op = KV_OP_NONE;
		r->err = "too-long";
		return -1;
	}
	r->id = tok[1];
	r->id_len = (uint8_t)tlen[1];
	r->key = tok[2];
	r->key_len = (uint8_t)tlen[2];
	if (want == 4) {
		r->val = tok[3];
		r->val_len = (uint8_t)tlen[3];
	}
	r->err = 0;
	return 0;
}
