/* kvproto.h - the kv request grammar (DESIGN.md section 6, a contract). */
#ifndef GUEST_KVPROTO_H
#define GUEST_KVPROTO_H

#include <stddef.h>
#include <stdint.h>

#define KV_ID_MAX   32
#define KV_KEY_MAX  64
#define KV_VAL_MAX  64
/* Longest valid datagram: "INCR"/"PUT" forms are shorter than
 * "PUT <32> <64> <64>" = 166 bytes; allow a trailing "\r\n". */
#define KV_REQ_MAX  (4 + KV_ID_MAX + 1 + KV_KEY_MAX + 1 + KV_VAL_MAX + 2)

enum kv_op { KV_OP_NONE = 0, KV_OP_PUT = 1, KV_OP_INCR = 2, KV_OP_GET = 3 };

struct kv_req {
	int op;
	const char *id, *key, *val;    /* point into the datagram */
	uint8_t id_len, key_len, val_len;
	const char *err;               /* reason when kv_parse fails */
};

/* Parse one datagram. Returns 0, or -1 with r->err set ("too-long",
 * "bad-request"). Tokens are separated by one or more spaces; one trailing
 * "\n" or "\r\n" is ignored (as `echo ... | nc -u` sends). */
int kv_parse(const char *buf, size_t len, struct kv_req *r);

#endif
