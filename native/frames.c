/* frames.c - see frames.h. */
#include "frames.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

struct kframe {
    EVP_CIPHER_CTX *ctx;
    int encrypt;
    int keyed;
    int broken;             /* a frame failed: nothing more, whatever the key */
    uint64_t counter;       /* frames under this key: the next nonce */
    uint64_t done;          /* plaintext bytes under this key */
    uint64_t rekey_bytes;
};

struct kframe *kframe_new(int encrypt)
{
    struct kframe *k = calloc(1, sizeof(*k));
    if (!k)
        return NULL;
    k->ctx = EVP_CIPHER_CTX_new();
    k->encrypt = encrypt != 0;
    if (!k->ctx || EVP_CipherInit_ex(k->ctx, EVP_aes_256_gcm(), NULL, NULL, NULL,
                                     k->encrypt) != 1) {
        kframe_free(k);
        return NULL;
    }
    return k;
}

void kframe_free(struct kframe *k)
{
    if (!k)
        return;
    EVP_CIPHER_CTX_free(k->ctx);    /* clears the key schedule */
    free(k);
}

int kframe_set_key(struct kframe *k, const uint8_t *key, uint64_t rekey_bytes)
{
    if (k->broken)
        return KFRAME_FAILED;
    /* The default IV length of AES-GCM in OpenSSL is the 12 bytes used here. */
    if (EVP_CipherInit_ex(k->ctx, NULL, NULL, key, NULL, k->encrypt) != 1) {
        k->broken = 1;
        return KFRAME_FAILED;
    }
    k->keyed = 1;
    k->counter = 0;
    k->done = 0;
    k->rekey_bytes = rekey_bytes;
    return 0;
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* The next frame's nonce, counted; KFRAME_REKEY when this key is used up. */
static int next_nonce(struct kframe *k, uint32_t n, uint8_t nonce[12])
{
    if (k->broken)
        return KFRAME_FAILED;
    if (!k->keyed || k->done >= k->rekey_bytes)
        return KFRAME_REKEY;
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(k->counter >> (56 - 8 * i));
    k->counter++;
    k->done += n;
    return 0;
}

int64_t kframe_seal(struct kframe *k, const uint8_t *plain, uint32_t n, uint8_t *out)
{
    uint8_t nonce[12];
    int len, fin;
    if (n == 0 || n > KFRAME_MAX)
        return KFRAME_BAD_LENGTH;
    int rc = next_nonce(k, n, nonce);
    if (rc)
        return rc;
    put_be32(out, n);
    if (EVP_EncryptInit_ex(k->ctx, NULL, NULL, NULL, nonce) != 1
            || EVP_EncryptUpdate(k->ctx, NULL, &len, out, 4) != 1
            || EVP_EncryptUpdate(k->ctx, out + 4, &len, plain, (int)n) != 1
            || EVP_EncryptFinal_ex(k->ctx, out + 4 + len, &fin) != 1
            || EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_GCM_GET_TAG, 16, out + 4 + n) != 1) {
        k->broken = 1;      /* its nonce is spent, its frame unsent */
        return KFRAME_FAILED;
    }
    return (int64_t)n + KFRAME_OVERHEAD;
}

int64_t kframe_open(struct kframe *k, uint8_t *buf, uint64_t avail)
{
    uint8_t nonce[12];
    int len, fin;
    if (avail < 4)
        return 0;
    uint32_t n = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
    if (n == 0 || n > KFRAME_MAX)
        return KFRAME_BAD_LENGTH;
    if (avail < (uint64_t)n + KFRAME_OVERHEAD)
        return 0;
    int rc = next_nonce(k, n, nonce);
    if (rc)
        return rc;
    if (EVP_DecryptInit_ex(k->ctx, NULL, NULL, NULL, nonce) != 1
            || EVP_DecryptUpdate(k->ctx, NULL, &len, buf, 4) != 1
            || EVP_DecryptUpdate(k->ctx, buf + 4, &len, buf + 4, (int)n) != 1
            || EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_GCM_SET_TAG, 16, buf + 4 + n) != 1) {
        k->broken = 1;
        return KFRAME_FAILED;
    }
    if (EVP_DecryptFinal_ex(k->ctx, buf + 4 + len, &fin) != 1) {
        memset(buf + 4, 0, n);      /* no unauthenticated plaintext is left behind */
        k->broken = 1;
        return KFRAME_BAD_TAG;
    }
    return n;
}
