/*
 * frame.c: the 24-byte frame header of docs/protocol.md §1, and the §3 code table.
 *
 * Owns the bytes of the header and nothing else: byte-wise little-endian, so it is right on
 * any host. Decoding never reads past `len` and checks in the order §1.2 gives.
 */
#define _POSIX_C_SOURCE 200809L

#include "frame.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

void acgi_put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)(v >> 8);
}

void acgi_put_u32(uint8_t *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (uint8_t)((v >> (8 * i)) & 0xFFu);
}

void acgi_put_u64(uint8_t *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (uint8_t)((v >> (8 * i)) & 0xFFu);
}

uint16_t acgi_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (uint16_t)(p[1] << 8)); }

uint32_t acgi_get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

uint64_t acgi_get_u64(const uint8_t *p) {
    return (uint64_t)acgi_get_u32(p) | ((uint64_t)acgi_get_u32(p + 4) << 32);
}

int acgi_kind_known(unsigned kind) {
    return (kind >= ACGI_KIND_REQUEST && kind <= ACGI_KIND_PONG) ||
           (kind >= ACGI_KIND_HELLO && kind <= ACGI_KIND_FAIL);
}

enum acgi_frame_check acgi_header_decode(const uint8_t *bytes, size_t len, uint32_t bound,
                                         acgi_header *out) {
    acgi_header h;
    if (bytes == NULL || len < ACGI_HEADER_BYTES) return ACGI_FRAME_TRUNCATED;
    if (acgi_get_u16(bytes) != ACGI_MAGIC) return ACGI_FRAME_MAGIC;
    if (bytes[2] != ACGI_VERSION) return ACGI_FRAME_VERSION;
    if (!acgi_kind_known(bytes[3])) return ACGI_FRAME_KIND;
    h.kind = bytes[3];
    h.flags = acgi_get_u16(bytes + 4);
    if ((h.flags & ~ACGI_FLAGS_KNOWN) != 0) return ACGI_FRAME_FLAGS;
    h.code = acgi_get_u16(bytes + 6);
    if (h.kind != ACGI_KIND_ERROR && h.code != 0) return ACGI_FRAME_CODE;
    h.service_id = acgi_get_u32(bytes + 8);
    h.payload_len = acgi_get_u32(bytes + 12);
    h.request_id = acgi_get_u64(bytes + 16);
    if (out != NULL) *out = h;
    return h.payload_len > bound ? ACGI_FRAME_TOO_LARGE : ACGI_FRAME_OK;
}

void acgi_header_encode(const acgi_header *h, uint8_t out[ACGI_HEADER_BYTES]) {
    acgi_put_u16(out, (uint16_t)ACGI_MAGIC);
    out[2] = (uint8_t)ACGI_VERSION;
    out[3] = h->kind;
    acgi_put_u16(out + 4, h->flags);
    acgi_put_u16(out + 6, h->code);
    acgi_put_u32(out + 8, h->service_id);
    acgi_put_u32(out + 12, h->payload_len);
    acgi_put_u64(out + 16, h->request_id);
}

const char *acgi_frame_check_name(enum acgi_frame_check check) {
    switch (check) {
    case ACGI_FRAME_OK: return "ok";
    case ACGI_FRAME_TRUNCATED: return "truncated";
    case ACGI_FRAME_MAGIC: return "magic";
    case ACGI_FRAME_VERSION: return "version";
    case ACGI_FRAME_KIND: return "kind";
    case ACGI_FRAME_FLAGS: return "flags";
    case ACGI_FRAME_CODE: return "code";
    case ACGI_FRAME_TOO_LARGE: return "too_large";
    }
    return "?";
}

int acgi_caller_frame_reaction(const acgi_header *h, uint32_t bound) {
    switch (h->kind) {
    case ACGI_KIND_REQUEST:
        if ((h->flags & ~(unsigned)ACGI_FLAG_TIMEOUT) != 0) return ACGI_CODE_MALFORMED_FRAME;
        if ((h->flags & ACGI_FLAG_TIMEOUT) != 0 && h->payload_len < 4)
            return ACGI_CODE_MALFORMED_FRAME;
        break;
    case ACGI_KIND_RESOLVE:
        if (h->flags != 0) return ACGI_CODE_MALFORMED_FRAME;
        if (h->payload_len > bound) return ACGI_CODE_PAYLOAD_TOO_LARGE;
        if (h->payload_len > ACGI_SERVICE_NAME_BYTES_MAX) return ACGI_CODE_UNKNOWN_SERVICE;
        return 0;
    case ACGI_KIND_PING:
        if (h->flags != 0) return ACGI_CODE_MALFORMED_FRAME;
        if (h->payload_len > 4096u) return ACGI_CODE_PAYLOAD_TOO_LARGE;
        break;
    default:
        return ACGI_CODE_MALFORMED_FRAME;
    }
    return h->payload_len > bound ? ACGI_CODE_PAYLOAD_TOO_LARGE : 0;
}

const char *acgi_code_name(int code) {
    switch (code) {
    case ACGI_CODE_UNKNOWN_SERVICE: return "unknown service";
    case ACGI_CODE_PAYLOAD_TOO_LARGE: return "payload too large";
    case ACGI_CODE_OVERLOADED: return "overloaded";
    case ACGI_CODE_WORKER_FAILED: return "worker failed";
    case ACGI_CODE_TIMED_OUT: return "timed out";
    case ACGI_CODE_SHUTTING_DOWN: return "shutting down";
    case ACGI_CODE_MALFORMED_FRAME: return "malformed frame";
    case ACGI_CODE_SERVICE_ERROR: return "service error";
    case ACGI_CODE_SERVICE_UNAVAILABLE: return "service unavailable";
    case ACGI_CODE_DEADLINE_EXCEEDED: return "deadline exceeded";
    case ACGI_CODE_NOT_ALLOWED: return "not allowed";
    default: return "unknown code";
    }
}

enum acgi_retry acgi_code_retry(int code) {
    switch (code) {
    case ACGI_CODE_OVERLOADED:
    case ACGI_CODE_SHUTTING_DOWN:
    case ACGI_CODE_SERVICE_UNAVAILABLE:
    case ACGI_CODE_DEADLINE_EXCEEDED:
        return ACGI_RETRY_YES;
    case ACGI_CODE_WORKER_FAILED:
    case ACGI_CODE_TIMED_OUT:
        return ACGI_RETRY_IF_IDEMPOTENT;
    default:
        return ACGI_RETRY_NO; /* 1, 2, 7, 8, 11 and every code this version does not know */
    }
}

int acgi_send_frame(int fd, const acgi_header *h, const void *payload, size_t len) {
    uint8_t head[ACGI_HEADER_BYTES];
    struct iovec iov[2];
    size_t total = ACGI_HEADER_BYTES + len;
    size_t sent = 0;
    acgi_header_encode(h, head);
    while (sent < total) {
        struct msghdr msg;
        ssize_t n;
        memset(&msg, 0, sizeof msg);
        if (sent < ACGI_HEADER_BYTES) {
            iov[0].iov_base = head + sent;
            iov[0].iov_len = ACGI_HEADER_BYTES - sent;
            iov[1].iov_base = (void *)(uintptr_t)payload; /* sendmsg does not write it */
            iov[1].iov_len = len;
            msg.msg_iovlen = len > 0 ? 2 : 1;
        } else {
            iov[0].iov_base = (uint8_t *)(uintptr_t)payload + (sent - ACGI_HEADER_BYTES);
            iov[0].iov_len = total - sent;
            msg.msg_iovlen = 1;
        }
        msg.msg_iov = iov;
        n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        sent += (size_t)n;
    }
    return 0;
}
