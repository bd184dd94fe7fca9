/*
 * frames.h - AES-256-GCM frames in C (docs/crypto.md, "Frames").
 *
 * kemari_agent/replication/frames.py owns the secret, derives each key with
 * HKDF and decides when to move to the next; this holds one direction's
 * current key in an OpenSSL cipher context kept between frames and counts
 * the frames sealed or opened under it, so the nonce (the counter, 12 bytes
 * big-endian) is made in one place only. A frame:
 *
 *     length (4 bytes, big-endian) | ciphertext of length bytes | tag (16)
 *
 * with the length as additional data. The Python sealer and opener stay the
 * reference (cryptography's AESGCM); tests/unit compare the two byte for byte.
 */
#ifndef KEMARI_FRAMES_H
#define KEMARI_FRAMES_H

#include <stdint.h>

#define KFRAME_KEY_SIZE 32
#define KFRAME_OVERHEAD 20
#define KFRAME_MAX 4194304

/* Returned by kframe_seal and kframe_open: */
#define KFRAME_REKEY -3        /* rekey_bytes sealed or opened: kframe_set_key first */
#define KFRAME_BAD_LENGTH -4   /* a frame of 0 or more than KFRAME_MAX bytes */
#define KFRAME_BAD_TAG -5      /* the frame failed authentication */
#define KFRAME_FAILED -6       /* OpenSSL refused, or an earlier frame failed: for good */

struct kframe;

/* A context for sealing (encrypt 1) or opening (encrypt 0); NULL when OpenSSL
 * has no memory. Call kframe_set_key before the first frame. */
struct kframe *kframe_new(int encrypt);
void kframe_free(struct kframe *k);

/* The next key: the frame counter starts again at 0, and after rekey_bytes of
 * plaintext the next call returns KFRAME_REKEY until the key changes again.
 * Returns 0, or KFRAME_FAILED. */
int kframe_set_key(struct kframe *k, const uint8_t *key, uint64_t rekey_bytes);

/* Seals plain[0..n) (1 <= n <= KFRAME_MAX) into out (n + KFRAME_OVERHEAD
 * bytes); returns that size or a KFRAME_ error, which seals nothing and uses
 * no nonce. plain may be out + 4, its place in the frame: sealed in place. */
int64_t kframe_seal(struct kframe *k, const uint8_t *plain, uint32_t n, uint8_t *out);

/* The frame at buf[0..avail): 0 when not all of it has arrived (a header
 * that says 0 or more than KFRAME_MAX bytes is KFRAME_BAD_LENGTH at once);
 * else it is opened in place: on success its plaintext is at buf + 4 and its
 * length is returned; after KFRAME_BAD_TAG its plaintext is zeroed and
 * every later call fails (the connection is over). */
int64_t kframe_open(struct kframe *k, uint8_t *buf, uint64_t avail);

#endif
