/*
 * zlib_worker: an acgi-bridge worker that wraps zlib's blocking compress2/uncompress.
 *
 * Request:  one op byte, then data.
 *   'c' DATA            -> reply: u32 LE length of DATA, then DATA compressed (zlib format)
 *   'u' LEN32 ZDATA     -> reply: the LEN32 bytes ZDATA inflates to (the output of 'c' is a
 *                          valid input of 'u', so 'u' + reply('c' + x) == x)
 * Errors (unknown op, corrupt data, a length over the bridge's max_payload_bytes) reach the
 * caller as error 8 (service error) with zlib's reason.
 *
 * Register it with: [[service]] id = 20, name = "zlib", exec = "/path/to/zlib_worker"
 */
#include <acgi.h>

#include <stdint.h>
#include <string.h>
#include <zlib.h>

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static const char *compress_op(const uint8_t *data, size_t len, acgi_reply *reply) {
    /* The worst case, or what the payload bound leaves: compress2 says Z_BUF_ERROR when the
     * compressed form does not fit. */
    size_t room = acgi_reply_space(reply);
    uLongf out_len = compressBound((uLong)len);
    uint8_t *out;
    int rc;
    if (len > UINT32_MAX || room < 4) return "input too large";
    if (out_len > room - 4) out_len = (uLongf)(room - 4);
    out = acgi_reply_reserve(reply, 4 + (size_t)out_len);
    if (out == NULL) return "out of memory";
    put_u32(out, (uint32_t)len);
    rc = compress2(out + 4, &out_len, data, (uLong)len, Z_DEFAULT_COMPRESSION);
    if (rc == Z_BUF_ERROR)
        return acgi_reply_errorf(reply, "compressed form of %zu bytes would be over the bridge's "
                                        "payload bound", len);
    if (rc != Z_OK) return acgi_reply_errorf(reply, "compress2: %s", zError(rc));
    acgi_reply_commit(reply, 4 + (size_t)out_len);
    return NULL;
}

static const char *uncompress_op(const uint8_t *data, size_t len, acgi_reply *reply) {
    uint32_t original;
    uLongf out_len;
    uint8_t *out;
    int rc;
    if (len < 4) return "'u' needs a 4-byte original length, then the zlib data";
    original = get_u32(data);
    /* Bounded by the bridge's payload bound before allocating: reserve refuses more. */
    out = acgi_reply_reserve(reply, original);
    if (out == NULL)
        return acgi_reply_errorf(reply, "original length %u is over the bridge's payload bound",
                                 (unsigned)original);
    out_len = original;
    rc = uncompress(out, &out_len, data + 4, (uLong)(len - 4));
    if (rc != Z_OK) return acgi_reply_errorf(reply, "uncompress: %s", zError(rc));
    if (out_len != original)
        return acgi_reply_errorf(reply, "uncompress: %lu bytes, the header said %u",
                                 (unsigned long)out_len, (unsigned)original);
    acgi_reply_commit(reply, out_len);
    return NULL;
}

static const char *handle(void *ctx, const uint8_t *request, size_t len, acgi_reply *reply) {
    (void)ctx;
    if (len == 0) return "empty request: send 'c' or 'u' followed by the data";
    switch (request[0]) {
    case 'c': return compress_op(request + 1, len - 1, reply);
    case 'u': return uncompress_op(request + 1, len - 1, reply);
    default:
        return acgi_reply_errorf(reply, "unknown op byte 0x%02x: use 'c' or 'u'",
                                 (unsigned)request[0]);
    }
}

int main(void) { return acgi_worker_serve(handle, NULL); }
