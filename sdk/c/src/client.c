/*
 * client.c: a blocking caller of docs/protocol.md Part I.
 *
 * Owns one connection, its request-id counter and its name cache. One call at a time: send
 * one frame, then read answers until the one with its request id arrives; answers for other
 * ids (late answers to calls that hit the io timeout) are read and dropped (§11, item 7).
 * Every answer header is checked (§1.2 plus the caller's view: only Reply, Error, Resolved and
 * Pong, flags 0) and its payload_len bounded before anything is allocated. After a protocol
 * error, an io error or a timeout inside a frame, the connection is closed and every later
 * call fails with ACGI_ERR_CLOSED.
 *
 * A draining bridge (a binary upgrade, §2.6) is the one failure handled here: a call answered
 * with error 6, or met by the drain notice (an Error 6 with request id 0) before its answer,
 * did not run, so it is sent again on a new connection to the address given at connect (names
 * resolved anew), at most ACGI_CLIENT_DRAIN_RETRIES_MAX times; a failed connect means no new
 * bridge took over, and the error 6 is returned. Nothing else is ever resent: only the notice
 * and error 6 promise that the request did not run.
 */
#define _POSIX_C_SOURCE 200809L

#include "frame.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct cached_name {
    char name[ACGI_SERVICE_NAME_BYTES_MAX + 1];
    uint32_t id;
};

struct acgi_client {
    int fd;
    char *addr; /* as given to acgi_client_connect, for a reconnect after a drain */
    uint64_t drain_retries;
    uint64_t next_request_id;
    uint32_t payload_max;
    uint32_t io_timeout_ms;
    struct cached_name names[ACGI_CLIENT_NAMES_CACHED_MAX];
    unsigned names_count;
    unsigned names_next; /* the slot to overwrite when the cache is full */
};

/* An answer frame read whole. */
struct answer {
    acgi_header h;
    uint8_t *payload; /* malloc'd, NULL when empty */
};

static int error_set(acgi_error *err, enum acgi_error_kind kind, int code, int sys_errno,
                     const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

static int error_set(acgi_error *err, enum acgi_error_kind kind, int code, int sys_errno,
                     const char *format, ...) {
    va_list args;
    if (err == NULL) return -1;
    err->kind = kind;
    err->code = code;
    err->sys_errno = sys_errno;
    switch (kind) {
    case ACGI_ERR_REMOTE: err->retry = acgi_code_retry(code); break;
    /* The request may have reached a worker: only an idempotent one may be sent again. */
    case ACGI_ERR_IO:
    case ACGI_ERR_CLOSED:
    case ACGI_ERR_IO_TIMEOUT: err->retry = ACGI_RETRY_IF_IDEMPOTENT; break;
    case ACGI_ERR_CONNECT: err->retry = ACGI_RETRY_YES; break;
    default: err->retry = ACGI_RETRY_NO; break;
    }
    va_start(args, format);
    vsnprintf(err->message, sizeof err->message, format, args);
    va_end(args);
    return -1;
}

const char *acgi_error_kind_name(enum acgi_error_kind kind) {
    switch (kind) {
    case ACGI_ERR_NONE: return "none";
    case ACGI_ERR_REMOTE: return "remote";
    case ACGI_ERR_CONNECT: return "connect";
    case ACGI_ERR_IO: return "io";
    case ACGI_ERR_CLOSED: return "closed";
    case ACGI_ERR_IO_TIMEOUT: return "io_timeout";
    case ACGI_ERR_PROTOCOL: return "protocol";
    case ACGI_ERR_REPLY_TOO_LARGE: return "reply_too_large";
    case ACGI_ERR_USAGE: return "usage";
    case ACGI_ERR_NOMEM: return "nomem";
    }
    return "?";
}

static void error_clear(acgi_error *err) {
    if (err == NULL) return;
    memset(err, 0, sizeof *err);
}

static void drop_connection(acgi_client *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

static int connect_unix(const char *path, acgi_error *err) {
    struct sockaddr_un sa;
    int fd;
    if (strlen(path) >= sizeof sa.sun_path)
        return error_set(err, ACGI_ERR_CONNECT, 0, 0, "socket path is over %zu bytes: %s",
                         sizeof sa.sun_path - 1, path);
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return error_set(err, ACGI_ERR_CONNECT, 0, errno, "socket: %s", strerror(errno));
    while (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int saved = errno;
        if (saved == EINTR) continue;
        close(fd);
        return error_set(err, ACGI_ERR_CONNECT, 0, saved, "connect %s: %s", path,
                         strerror(saved));
    }
    return fd;
}

static int connect_tcp(const char *host_port, acgi_error *err) {
    char host[256];
    const char *colon = strrchr(host_port, ':');
    const char *port;
    size_t host_len;
    struct addrinfo hints, *list, *ai;
    int fd = -1, rc, saved = 0, one = 1;
    if (colon == NULL || colon[1] == '\0')
        return error_set(err, ACGI_ERR_CONNECT, 0, 0, "address %s is not host:port or a path",
                         host_port);
    port = colon + 1;
    host_len = (size_t)(colon - host_port);
    if (host_len >= 2 && host_port[0] == '[' && host_port[host_len - 1] == ']') {
        host_port++;
        host_len -= 2;
    }
    if (host_len == 0 || host_len >= sizeof host)
        return error_set(err, ACGI_ERR_CONNECT, 0, 0, "bad host in %s", host_port);
    memcpy(host, host_port, host_len);
    host[host_len] = '\0';
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &list);
    if (rc != 0)
        return error_set(err, ACGI_ERR_CONNECT, 0, 0, "resolving %s: %s", host, gai_strerror(rc));
    for (ai = list; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        while ((rc = connect(fd, ai->ai_addr, ai->ai_addrlen)) < 0 && errno == EINTR) {
        }
        if (rc == 0) break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(list);
    if (fd < 0)
        return error_set(err, ACGI_ERR_CONNECT, 0, saved, "connect %s:%s: %s", host, port,
                         strerror(saved));
    /* Frames are small and latency matters (§1.1). */
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* A connected socket to `addr`, or -1 with err set. */
static int connect_addr(const char *addr, acgi_error *err) {
    if (strncmp(addr, "unix:", 5) == 0) return connect_unix(addr + 5, err);
    if (strncmp(addr, "tcp:", 4) == 0) return connect_tcp(addr + 4, err);
    if (strchr(addr, '/') != NULL) return connect_unix(addr, err);
    return connect_tcp(addr, err);
}

acgi_client *acgi_client_connect(const char *addr, acgi_error *err) {
    acgi_client *c;
    int fd;
    size_t addr_len;
    error_clear(err);
    if (addr == NULL || *addr == '\0') {
        error_set(err, ACGI_ERR_USAGE, 0, 0, "no address");
        return NULL;
    }
    fd = connect_addr(addr, err);
    if (fd < 0) return NULL;
    addr_len = strlen(addr);
    c = calloc(1, sizeof *c);
    if (c != NULL) c->addr = malloc(addr_len + 1);
    if (c == NULL || c->addr == NULL) {
        free(c);
        close(fd);
        error_set(err, ACGI_ERR_NOMEM, 0, 0, "out of memory");
        return NULL;
    }
    memcpy(c->addr, addr, addr_len + 1);
    c->fd = fd;
    c->next_request_id = 1;
    c->payload_max = ACGI_PAYLOAD_BYTES_MAX_DEFAULT;
    return c;
}

void acgi_client_close(acgi_client *c) {
    if (c == NULL) return;
    drop_connection(c);
    free(c->addr);
    free(c);
}

uint64_t acgi_client_drain_retries(const acgi_client *c) { return c->drain_retries; }

void acgi_client_set_payload_bytes_max(acgi_client *c, uint32_t bytes) {
    c->payload_max =
        bytes > ACGI_PAYLOAD_BYTES_MAX_CEILING ? ACGI_PAYLOAD_BYTES_MAX_CEILING : bytes;
}

void acgi_client_set_io_timeout_ms(acgi_client *c, uint32_t ms) {
    c->io_timeout_ms = ms > (uint32_t)0x7FFFFFFF ? (uint32_t)0x7FFFFFFF : ms;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read exactly `len` bytes. Returns 0, or -1 with err set (and the connection dropped unless
 * the error is a timeout before the first byte of a frame, *clean_timeout then set to 1). */
static int read_exact(acgi_client *c, uint8_t *buf, size_t len, int64_t deadline,
                      int frame_start, acgi_error *err) {
    size_t have = 0;
    while (have < len) {
        ssize_t n;
        if (deadline > 0) {
            struct pollfd pfd;
            int64_t left = deadline - now_ms();
            int ready;
            pfd.fd = c->fd;
            pfd.events = POLLIN;
            pfd.revents = 0;
            ready = left > 0 ? poll(&pfd, 1, (int)left) : 0;
            if (ready < 0 && errno == EINTR) continue;
            if (ready < 0) {
                int saved = errno;
                drop_connection(c);
                return error_set(err, ACGI_ERR_IO, 0, saved, "poll: %s", strerror(saved));
            }
            if (ready == 0) {
                int clean = frame_start && have == 0;
                if (!clean) drop_connection(c);
                return error_set(err, ACGI_ERR_IO_TIMEOUT, 0, 0,
                                 "no answer within %u ms%s", (unsigned)c->io_timeout_ms,
                                 clean ? "" : " (inside a frame: connection closed)");
            }
        }
        n = recv(c->fd, buf + have, len - have, 0);
        if (n > 0) {
            have += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n == 0 || errno == ECONNRESET) {
            /* §2.6: a reset is an orderly close; the request's outcome is unknown. */
            drop_connection(c);
            return error_set(err, ACGI_ERR_CLOSED, 0, 0,
                             "the bridge closed the connection before the answer arrived");
        }
        {
            int saved = errno;
            drop_connection(c);
            return error_set(err, ACGI_ERR_IO, 0, saved, "recv: %s", strerror(saved));
        }
    }
    return 0;
}

/* Read one whole answer frame, checked. A payload over the bound is skipped and reported as
 * ACGI_ERR_REPLY_TOO_LARGE with *a's header filled. */
static int read_answer(acgi_client *c, struct answer *a, int64_t deadline, acgi_error *err) {
    uint8_t head[ACGI_HEADER_BYTES];
    enum acgi_frame_check check;
    a->payload = NULL;
    if (read_exact(c, head, sizeof head, deadline, 1, err) < 0) return -1;
    check = acgi_header_decode(head, sizeof head, ACGI_PAYLOAD_BYTES_MAX_CEILING, &a->h);
    if (check != ACGI_FRAME_OK) {
        drop_connection(c);
        return error_set(err, ACGI_ERR_PROTOCOL, 0, 0, "the bridge sent a bad header (%s)",
                         acgi_frame_check_name(check));
    }
    if (a->h.flags != 0 || (a->h.kind != ACGI_KIND_REPLY && a->h.kind != ACGI_KIND_ERROR &&
                            a->h.kind != ACGI_KIND_RESOLVED && a->h.kind != ACGI_KIND_PONG)) {
        drop_connection(c);
        return error_set(err, ACGI_ERR_PROTOCOL, 0, 0,
                         "the bridge sent a frame of kind %u flags 0x%04x to a caller",
                         (unsigned)a->h.kind, (unsigned)a->h.flags);
    }
    if (a->h.payload_len > c->payload_max) {
        /* Checked before allocating: skip the payload in small pieces, keep the connection. */
        uint8_t sink[4096];
        size_t left = a->h.payload_len;
        while (left > 0) {
            size_t piece = left < sizeof sink ? left : sizeof sink;
            if (read_exact(c, sink, piece, deadline, 0, err) < 0) return -1;
            left -= piece;
        }
        return error_set(err, ACGI_ERR_REPLY_TOO_LARGE, 0, 0,
                         "answer of %u bytes is over this client's bound of %u bytes",
                         (unsigned)a->h.payload_len, (unsigned)c->payload_max);
    }
    if (a->h.payload_len > 0) {
        a->payload = malloc(a->h.payload_len);
        if (a->payload == NULL) {
            drop_connection(c);
            return error_set(err, ACGI_ERR_NOMEM, 0, 0, "out of memory for %u bytes",
                             (unsigned)a->h.payload_len);
        }
        if (read_exact(c, a->payload, a->h.payload_len, deadline, 0, err) < 0) {
            free(a->payload);
            a->payload = NULL;
            return -1;
        }
    }
    return 0;
}

/* §2.6: the drain notice, Error 6 with request id 0 (service id 0). */
static int is_drain_notice(const acgi_header *h) {
    return h->kind == ACGI_KIND_ERROR && h->code == ACGI_CODE_SHUTTING_DOWN && h->request_id == 0;
}

static int drained_error(acgi_error *err) {
    return error_set(err, ACGI_ERR_REMOTE, ACGI_CODE_SHUTTING_DOWN, 0,
                     "the bridge drained the connection (a binary upgrade) before answering: "
                     "the call did not run");
}

/* How long a failed send waits for the drain notice a closing bridge may have sent first. */
#define DRAIN_NOTICE_WAIT_MS 1000

/* A send failed with `saved`. A bridge that drained this connection sent its notice before
 * closing it, and the notice is still readable: then the frame did not run (error 6, resent by
 * the caller); otherwise the connection is closed or broken. */
static int send_failed(acgi_client *c, int saved, acgi_error *err) {
    int64_t deadline = now_ms() + DRAIN_NOTICE_WAIT_MS;
    struct answer a;
    acgi_error ignored;
    while (c->fd >= 0 && read_answer(c, &a, deadline, &ignored) == 0) {
        free(a.payload);
        if (is_drain_notice(&a.h)) {
            drop_connection(c);
            return drained_error(err);
        }
        /* A late answer to an abandoned call: look further. */
    }
    drop_connection(c);
    if (saved == EPIPE || saved == ECONNRESET)
        return error_set(err, ACGI_ERR_CLOSED, 0, saved, "the bridge closed the connection");
    return error_set(err, ACGI_ERR_IO, 0, saved, "send: %s", strerror(saved));
}

/* Send one frame and wait for the answer with its request id. */
static int round_trip(acgi_client *c, uint8_t kind, uint16_t flags, uint32_t service_id,
                      const uint8_t *prefix, size_t prefix_len, const void *payload, size_t len,
                      struct answer *a, acgi_error *err) {
    acgi_header h;
    uint64_t id;
    int64_t deadline;
    int rc;
    if (c->fd < 0)
        return error_set(err, ACGI_ERR_CLOSED, 0, 0, "the connection is closed");
    if (len > c->payload_max || prefix_len > c->payload_max - len)
        return error_set(err, ACGI_ERR_USAGE, 0, 0,
                         "request of %zu bytes is over this client's bound of %u bytes",
                         len + prefix_len, (unsigned)c->payload_max);
    id = c->next_request_id++;
    if (c->next_request_id == 0) c->next_request_id = 1; /* never 0 (§2.1) */
    memset(&h, 0, sizeof h);
    h.kind = kind;
    h.flags = flags;
    h.service_id = service_id;
    h.payload_len = (uint32_t)(prefix_len + len);
    h.request_id = id;
    if (prefix_len > 0) {
        /* Header, prefix and payload in one frame: encode the prefix into a copy. */
        uint8_t *joined = malloc(prefix_len + len);
        if (joined == NULL) return error_set(err, ACGI_ERR_NOMEM, 0, 0, "out of memory");
        memcpy(joined, prefix, prefix_len);
        if (len > 0) memcpy(joined + prefix_len, payload, len);
        rc = acgi_send_frame(c->fd, &h, joined, prefix_len + len);
        free(joined);
    } else {
        rc = acgi_send_frame(c->fd, &h, payload, len);
    }
    if (rc < 0) return send_failed(c, errno, err);
    deadline = c->io_timeout_ms > 0 ? now_ms() + c->io_timeout_ms : 0;
    for (;;) {
        if (read_answer(c, a, deadline, err) < 0) {
            if (err != NULL && err->kind == ACGI_ERR_REPLY_TOO_LARGE && a->h.request_id != id)
                continue; /* a late answer to an abandoned call */
            return -1;
        }
        if (a->h.request_id == id) return 0;
        if (a->h.kind == ACGI_KIND_ERROR && a->h.request_id == 0) {
            free(a->payload);
            a->payload = NULL;
            drop_connection(c);
            if (is_drain_notice(&a->h)) return drained_error(err);
            /* §2.6: the bridge found a frame of ours malformed and is closing. */
            return error_set(err, ACGI_ERR_REMOTE, a->h.code, 0,
                             "the bridge refused a frame as malformed and closed the connection");
        }
        free(a->payload); /* not ours: a late answer to a call that timed out here */
        a->payload = NULL;
    }
}

/* An Error answer as err; the message is the payload, cut to fit. */
static int remote_error(const struct answer *a, acgi_error *err) {
    size_t n = a->h.payload_len < ACGI_ERROR_MESSAGE_BYTES_MAX - 1
                   ? a->h.payload_len
                   : ACGI_ERROR_MESSAGE_BYTES_MAX - 1;
    error_set(err, ACGI_ERR_REMOTE, a->h.code, 0, "%s", "");
    if (err != NULL && n > 0) {
        memcpy(err->message, a->payload, n);
        err->message[n] = '\0';
    } else if (err != NULL) {
        snprintf(err->message, sizeof err->message, "%s", acgi_code_name(a->h.code));
    }
    return -1;
}

static int resolve_once(acgi_client *c, const char *name, uint32_t *id, acgi_error *err) {
    struct answer a;
    size_t len;
    unsigned i;
    error_clear(err);
    if (name == NULL) return error_set(err, ACGI_ERR_USAGE, 0, 0, "no service name");
    len = strlen(name);
    for (i = 0; i < c->names_count; i++) {
        if (strcmp(c->names[i].name, name) == 0) {
            *id = c->names[i].id;
            return 0;
        }
    }
    if (round_trip(c, ACGI_KIND_RESOLVE, 0, 0, NULL, 0, name, len, &a, err) < 0) return -1;
    if (a.h.kind == ACGI_KIND_ERROR) {
        int rc = remote_error(&a, err);
        free(a.payload);
        return rc;
    }
    free(a.payload);
    if (a.h.kind != ACGI_KIND_RESOLVED || a.h.payload_len != 0 || a.h.service_id == 0) {
        drop_connection(c);
        return error_set(err, ACGI_ERR_PROTOCOL, 0, 0,
                         "the bridge answered a Resolve with kind %u, service id %u",
                         (unsigned)a.h.kind, (unsigned)a.h.service_id);
    }
    *id = a.h.service_id;
    if (len <= ACGI_SERVICE_NAME_BYTES_MAX) {
        unsigned at;
        if (c->names_count < ACGI_CLIENT_NAMES_CACHED_MAX) {
            at = c->names_count++;
        } else {
            at = c->names_next; /* full: overwrite the oldest */
            c->names_next = (at + 1) % ACGI_CLIENT_NAMES_CACHED_MAX;
        }
        memcpy(c->names[at].name, name, len + 1);
        c->names[at].id = a.h.service_id;
    }
    return 0;
}

static int call_id_once(acgi_client *c, uint32_t service_id, const void *request,
                        size_t request_len, uint32_t timeout_ms, uint8_t **reply,
                        size_t *reply_len, acgi_error *err) {
    struct answer a;
    uint8_t prefix[4];
    int rc;
    error_clear(err);
    *reply = NULL;
    *reply_len = 0;
    if (request_len > 0 && request == NULL)
        return error_set(err, ACGI_ERR_USAGE, 0, 0, "no request bytes");
    if (timeout_ms > 0) {
        acgi_put_u32(prefix, timeout_ms);
        rc = round_trip(c, ACGI_KIND_REQUEST, ACGI_FLAG_TIMEOUT, service_id, prefix, 4, request,
                        request_len, &a, err);
    } else {
        rc = round_trip(c, ACGI_KIND_REQUEST, 0, service_id, NULL, 0, request, request_len, &a,
                        err);
    }
    if (rc < 0) return -1;
    if (a.h.kind == ACGI_KIND_ERROR) {
        rc = remote_error(&a, err);
        free(a.payload);
        return rc;
    }
    if (a.h.kind != ACGI_KIND_REPLY) {
        free(a.payload);
        drop_connection(c);
        return error_set(err, ACGI_ERR_PROTOCOL, 0, 0, "the bridge answered a Request with kind %u",
                         (unsigned)a.h.kind);
    }
    *reply = a.payload;
    *reply_len = a.h.payload_len;
    return 0;
}

/* Whether a draining bridge refused the frame (error 6: it did not run, §3). */
static int refused_by_drain(const acgi_error *err) {
    return err->kind == ACGI_ERR_REMOTE && err->code == ACGI_CODE_SHUTTING_DOWN;
}

/* After a drain: a new connection to the same address (names are resolved anew). 0, or -1
 * when nothing accepts it: no new bridge took over. */
static int reconnect(acgi_client *c) {
    acgi_error ignored;
    int fd = connect_addr(c->addr, &ignored);
    if (fd < 0) return -1;
    drop_connection(c);
    c->fd = fd;
    c->names_count = 0;
    c->names_next = 0;
    return 0;
}

/* Whether to send a failed operation again: a draining bridge refused it, retries are left,
 * and a new connection could be made (else its error 6 stands). */
static int resend_after_drain(acgi_client *c, const acgi_error *err, unsigned *retries) {
    if (!refused_by_drain(err) || *retries >= ACGI_CLIENT_DRAIN_RETRIES_MAX) return 0;
    if (reconnect(c) < 0) return 0;
    *retries += 1;
    c->drain_retries++;
    return 1;
}

int acgi_client_resolve(acgi_client *c, const char *name, uint32_t *id, acgi_error *err) {
    acgi_error local;
    acgi_error *e = err != NULL ? err : &local;
    unsigned retries = 0;
    for (;;) {
        int rc = resolve_once(c, name, id, e);
        if (rc == 0 || !resend_after_drain(c, e, &retries)) return rc;
    }
}

int acgi_client_call_id(acgi_client *c, uint32_t service_id, const void *request,
                        size_t request_len, uint32_t timeout_ms, uint8_t **reply,
                        size_t *reply_len, acgi_error *err) {
    acgi_error local;
    acgi_error *e = err != NULL ? err : &local;
    unsigned retries = 0;
    for (;;) {
        int rc = call_id_once(c, service_id, request, request_len, timeout_ms, reply, reply_len,
                              e);
        if (rc == 0 || !resend_after_drain(c, e, &retries)) return rc;
    }
}

int acgi_client_call(acgi_client *c, const char *service, const void *request,
                     size_t request_len, uint32_t timeout_ms, uint8_t **reply,
                     size_t *reply_len, acgi_error *err) {
    acgi_error local;
    acgi_error *e = err != NULL ? err : &local;
    unsigned retries = 0;
    uint32_t id;
    *reply = NULL;
    *reply_len = 0;
    for (;;) {
        /* The name again each time: a new connection resolves it anew. */
        int rc = resolve_once(c, service, &id, e);
        if (rc == 0)
            rc = call_id_once(c, id, request, request_len, timeout_ms, reply, reply_len, e);
        if (rc == 0 || !resend_after_drain(c, e, &retries)) return rc;
    }
}

static int ping_once(acgi_client *c, const void *payload, size_t len, acgi_error *err) {
    struct answer a;
    int same;
    error_clear(err);
    if (len > 4096)
        return error_set(err, ACGI_ERR_USAGE, 0, 0, "a Ping carries at most 4096 bytes");
    if (round_trip(c, ACGI_KIND_PING, 0, 0, NULL, 0, payload, len, &a, err) < 0) return -1;
    if (a.h.kind == ACGI_KIND_ERROR) {
        int rc = remote_error(&a, err);
        free(a.payload);
        return rc;
    }
    same = a.h.kind == ACGI_KIND_PONG && a.h.payload_len == len &&
           (len == 0 || memcmp(a.payload, payload, len) == 0);
    free(a.payload);
    if (!same) {
        drop_connection(c);
        return error_set(err, ACGI_ERR_PROTOCOL, 0, 0, "the Pong does not echo the Ping");
    }
    return 0;
}

int acgi_client_ping(acgi_client *c, const void *payload, size_t len, acgi_error *err) {
    acgi_error local;
    acgi_error *e = err != NULL ? err : &local;
    unsigned retries = 0;
    for (;;) {
        int rc = ping_once(c, payload, len, e);
        if (rc == 0 || !resend_after_drain(c, e, &retries)) return rc;
    }
}
