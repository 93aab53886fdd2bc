/*
 * acgi.h: the C SDK of acgi-bridge, protocol version 1 (docs/protocol.md is normative).
 *
 * Three layers, C99 and libc only:
 *
 *   - frames (acgi_header_*): check, decode and encode the 24-byte frame header of §1;
 *   - the worker (acgi_worker_*): a process the bridge starts for one service. Either hand
 *     acgi_worker_serve() a handler, or drive the lower-level loop (open, next_job,
 *     reply/fail) from your own event loop, polling acgi_worker_fd();
 *   - the blocking client (acgi_client_*): connect to a bridge, resolve names (cached), call.
 *
 * Nothing here is thread-safe: use one acgi_worker or acgi_client from one thread at a time.
 * Every length the other side sends is checked before it is used or allocated.
 */
#ifndef ACGI_H
#define ACGI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------
 * Bounds (all inclusive, in bytes unless named otherwise)
 * ------------------------------------------------------------------------------------------ */

/* The bridge's default max_payload_bytes (§4); a worker reads the real one from
 * ACGI_MAX_PAYLOAD_BYTES, a client's default reply bound is this. */
#define ACGI_PAYLOAD_BYTES_MAX_DEFAULT 16777216u
/* No bridge accepts a larger max_payload_bytes: any payload_len above it is a protocol error. */
#define ACGI_PAYLOAD_BYTES_MAX_CEILING 1073741824u
/* A handler's Fail message is cut to this many bytes (on a UTF-8 character boundary). */
#define ACGI_FAIL_MESSAGE_BYTES_MAX 65536u
/* Longest service name the bridge can know (§2.3). */
#define ACGI_SERVICE_NAME_BYTES_MAX 64u
/* Names a client caches (id per name, for the life of the connection); the oldest goes first. */
#define ACGI_CLIENT_NAMES_CACHED_MAX 32u
/* Bytes of an acgi_error message kept (the rest is cut). */
#define ACGI_ERROR_MESSAGE_BYTES_MAX 256u
/* Times one call (or resolve, or ping) is sent again on a new connection after a draining
 * bridge refused it (see "Draining bridges" below); the same bound as the Rust and Python
 * clients. */
#define ACGI_CLIENT_DRAIN_RETRIES_MAX 3u

/* ---------------------------------------------------------------------------------------------
 * Frames (§1)
 * ------------------------------------------------------------------------------------------ */

#define ACGI_HEADER_BYTES 24u
#define ACGI_MAGIC 0xAC6Bu
#define ACGI_VERSION 1u

enum acgi_kind {
    ACGI_KIND_REQUEST = 1,
    ACGI_KIND_REPLY = 2,
    ACGI_KIND_ERROR = 3,
    ACGI_KIND_RESOLVE = 4,
    ACGI_KIND_RESOLVED = 5,
    ACGI_KIND_PING = 6,
    ACGI_KIND_PONG = 7,
    ACGI_KIND_HELLO = 16,
    ACGI_KIND_JOB = 17,
    ACGI_KIND_DONE = 18,
    ACGI_KIND_FAIL = 19
};

#define ACGI_FLAG_IN_SLOT 0x0001u
#define ACGI_FLAG_TIMEOUT 0x0002u
#define ACGI_FLAG_QUEUED 0x0004u
#define ACGI_FLAGS_KNOWN (ACGI_FLAG_IN_SLOT | ACGI_FLAG_TIMEOUT | ACGI_FLAG_QUEUED)

/* Stable error codes of §3 (the `code` of an Error frame). */
enum acgi_code {
    ACGI_CODE_UNKNOWN_SERVICE = 1,
    ACGI_CODE_PAYLOAD_TOO_LARGE = 2,
    ACGI_CODE_OVERLOADED = 3,
    ACGI_CODE_WORKER_FAILED = 4,
    ACGI_CODE_TIMED_OUT = 5,
    ACGI_CODE_SHUTTING_DOWN = 6,
    ACGI_CODE_MALFORMED_FRAME = 7,
    ACGI_CODE_SERVICE_ERROR = 8,
    ACGI_CODE_SERVICE_UNAVAILABLE = 9,
    ACGI_CODE_DEADLINE_EXCEEDED = 10,
    ACGI_CODE_NOT_ALLOWED = 11
};

typedef struct acgi_header {
    uint8_t kind;
    uint16_t flags;
    uint16_t code;
    uint32_t service_id;
    uint32_t payload_len;
    uint64_t request_id;
} acgi_header;

/* The outcome of the header checks of §1.2, in their order: the first failing one decides. */
enum acgi_frame_check {
    ACGI_FRAME_OK = 0,
    ACGI_FRAME_TRUNCATED, /* fewer than 24 bytes */
    ACGI_FRAME_MAGIC,
    ACGI_FRAME_VERSION,
    ACGI_FRAME_KIND,
    ACGI_FRAME_FLAGS,
    ACGI_FRAME_CODE,
    ACGI_FRAME_TOO_LARGE /* only payload_len > bound: not malformed, the header is decoded */
};

/* Check and decode the first `len` bytes of `bytes` (at most 24 are read). `out` is filled when
 * the result is ACGI_FRAME_OK or ACGI_FRAME_TOO_LARGE. */
enum acgi_frame_check acgi_header_decode(const uint8_t *bytes, size_t len, uint32_t bound,
                                         acgi_header *out);
/* Encode `h` as exactly ACGI_HEADER_BYTES bytes (magic and version are added). */
void acgi_header_encode(const acgi_header *h, uint8_t out[ACGI_HEADER_BYTES]);
/* "truncated", "magic", ... "too_large"; "ok". */
const char *acgi_frame_check_name(enum acgi_frame_check check);

/* What the bridge does with a header (that passed §1.2 checks 1-6) arriving from a caller:
 * 0 = it is acceptable; otherwise the code of the Error it answers with:
 * 7 (malformed: a kind a caller may not send, IN_SLOT or QUEUED set, TIMEOUT where not allowed;
 * the connection is closed), 1 (a Resolve name over 64 bytes), 2 (a Ping over 4096 bytes, or a
 * payload over `bound`). */
int acgi_caller_frame_reaction(const acgi_header *h, uint32_t bound);

/* Name of a §3 code ("unknown service", ...), "unknown code" for others. */
const char *acgi_code_name(int code);

/* Whether retrying the same request can help (§3). */
enum acgi_retry {
    ACGI_RETRY_NO = 0,
    ACGI_RETRY_YES = 1,            /* later, with backoff (codes 3, 6, 9, 10) */
    ACGI_RETRY_IF_IDEMPOTENT = 2   /* it may have run (codes 4, 5; a connection lost mid-call) */
};
enum acgi_retry acgi_code_retry(int code);

/* ---------------------------------------------------------------------------------------------
 * Worker (Part II)
 * ------------------------------------------------------------------------------------------ */

typedef struct acgi_worker acgi_worker;
typedef struct acgi_reply acgi_reply;

/* A handler: read `request_len` bytes at `request`, write the reply with acgi_reply_write /
 * acgi_reply_reserve, and return NULL for success, or an error message (which must stay valid
 * until the handler returns; acgi_reply_errorf gives one) that reaches the caller as error 8.
 * The request bytes are valid only during the call. */
typedef const char *(*acgi_handler)(void *ctx, const uint8_t *request, size_t request_len,
                                    acgi_reply *reply);

/* Append `len` bytes to the reply. 0 on success; -1 when the reply would exceed the bridge's
 * max_payload_bytes or memory ran out (the job then fails with a message saying so). */
int acgi_reply_write(acgi_reply *reply, const void *data, size_t len);
/* Room for `len` more bytes at the end of the reply, to fill in place; commit what was written
 * with acgi_reply_commit. NULL as for acgi_reply_write. Valid until the next reply call. */
uint8_t *acgi_reply_reserve(acgi_reply *reply, size_t len);
void acgi_reply_commit(acgi_reply *reply, size_t len);
/* Bytes that may still be written before the reply reaches max_payload_bytes. */
size_t acgi_reply_space(const acgi_reply *reply);
/* Bytes written so far. */
size_t acgi_reply_len(const acgi_reply *reply);
/* Drop what was written (e.g. before writing a different reply). */
void acgi_reply_clear(acgi_reply *reply);
/* Format an error message into storage the reply owns and return it, for
 * `return acgi_reply_errorf(reply, "bad op %c", op);`. */
const char *acgi_reply_errorf(acgi_reply *reply, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The worker running this reply's job (for acgi_worker_remaining_ms). */
acgi_worker *acgi_reply_worker(acgi_reply *reply);

/* Run a worker until the bridge closes the control socket or SIGTERM stops it (a job in hand
 * is finished and answered first). Prints the reason for a failure on stderr. Returns a
 * process exit status: 0 clean stop, 1 not started by a bridge or the slot is unusable, 2 the
 * bridge broke the protocol or the control socket failed. `int main(void) { return
 * acgi_worker_serve(handler, NULL); }` is a whole worker. */
int acgi_worker_serve(acgi_handler handler, void *ctx);

/* Options for the lower-level loop. */
#define ACGI_WORKER_QUEUED 0x1u  /* say QUEUED in Hello: accept queued jobs (§8.4) */
#define ACGI_WORKER_SIGTERM 0x2u /* install a SIGTERM handler: next_job then returns
                                    ACGI_JOB_STOP between jobs (see acgi_worker_serve) */

/* Attach to the control socket and slot inherited from the bridge (§6), check the slot, and
 * send Hello. NULL on failure, with the reason in `why` (if not NULL, `why_bytes` long). */
acgi_worker *acgi_worker_open(unsigned options, char *why, size_t why_bytes);
/* Unmap the slot and free the worker; call it just before exiting. The control socket is
 * left open (close-on-exec) for the process's exit to close: the bridge treats its closing as
 * the worker's end and SIGKILLs a process that closed it and is still running. */
void acgi_worker_close(acgi_worker *worker);
/* The control socket, to poll for POLLIN: a Job (or EOF) is readable. The SDK reads it with
 * MSG_DONTWAIT and writes answers blocking; do not read or write it yourself. */
int acgi_worker_fd(const acgi_worker *worker);
/* The data capacity of the slot, and the bridge's max_payload_bytes. */
uint32_t acgi_worker_slot_capacity(const acgi_worker *worker);
uint32_t acgi_worker_payload_bytes_max(const acgi_worker *worker);

typedef struct acgi_job {
    const uint8_t *request; /* valid until the job is answered */
    size_t request_len;
    uint64_t sequence;      /* the Job's request_id */
    int in_slot;            /* the request came in the slot (else on the socket) */
    int queued;             /* a queued job (§8.4): answered on the socket */
} acgi_job;

enum acgi_job_result {
    ACGI_JOB_ERROR = -1, /* the bridge broke the protocol or the socket failed: exit non-zero */
    ACGI_JOB_EOF = 0,    /* the bridge closed the socket: exit 0 */
    ACGI_JOB_READY = 1,  /* *job is filled: answer it with reply or fail */
    ACGI_JOB_AGAIN = 2,  /* no whole Job yet (only with timeout_ms >= 0) */
    ACGI_JOB_STOP = 3    /* SIGTERM (ACGI_WORKER_SIGTERM) arrived between jobs: exit 0 */
};

/* Wait up to `timeout_ms` (-1: forever, 0: not at all) for the next job. Only when no job is
 * outstanding. On ACGI_JOB_ERROR, acgi_worker_error says why. */
enum acgi_job_result acgi_worker_next_job(acgi_worker *worker, acgi_job *job, int timeout_ms);
/* Answer the outstanding job with a reply (slot when it fits, else socket; over
 * max_payload_bytes it becomes a Fail), or with a handler error (error 8 for the caller).
 * 0 on success, -1 when writing failed (acgi_worker_error says why). */
int acgi_worker_reply(acgi_worker *worker, const void *reply, size_t reply_len);
int acgi_worker_fail(acgi_worker *worker, const char *message);
/* The outstanding job (the one a handler is running), NULL when none. */
const acgi_job *acgi_worker_current_job(const acgi_worker *worker);
/* Milliseconds left before the outstanding job's caller deadline (§2.2a), at least 0; -1 when
 * it has none (or is queued: queued jobs carry no deadline). */
int64_t acgi_worker_remaining_ms(const acgi_worker *worker);
/* Whether SIGTERM arrived (with ACGI_WORKER_SIGTERM or under acgi_worker_serve). */
int acgi_worker_stop_requested(void);
/* The last error, "" when none. */
const char *acgi_worker_error(const acgi_worker *worker);

/* ---------------------------------------------------------------------------------------------
 * Blocking client (Part I)
 * ------------------------------------------------------------------------------------------ */

/* Draining bridges (a binary upgrade, `acgi-bridge upgrade`; protocol §2.6): a call answered
 * with error 6, or still unanswered when the bridge's drain notice (an Error 6 with request id
 * 0) arrives, did not run. The client then connects again to the address it was given, resolves
 * names anew, and sends the call again, at most ACGI_CLIENT_DRAIN_RETRIES_MAX times; the call
 * returns the error 6 (kind ACGI_ERR_REMOTE, retry ACGI_RETRY_YES) only when no new connection
 * can be made (no new bridge took over) or the retries are spent. So an upgrade of the bridge
 * fails no call. Nothing else is resent: a connection that closes without the notice leaves a
 * call's outcome unknown (ACGI_ERR_CLOSED, ACGI_RETRY_IF_IDEMPOTENT), for the program to
 * decide. acgi_client_drain_retries counts the resends. */
typedef struct acgi_client acgi_client;

/* Where an error came from. */
enum acgi_error_kind {
    ACGI_ERR_NONE = 0,
    ACGI_ERR_REMOTE,          /* the bridge answered Error; `code` is its §3 code */
    ACGI_ERR_CONNECT,         /* the address is bad or connecting failed */
    ACGI_ERR_IO,              /* reading or writing failed; the connection is closed */
    ACGI_ERR_CLOSED,          /* the bridge closed the connection: the outcome is unknown */
    ACGI_ERR_IO_TIMEOUT,      /* no answer within the client's io timeout */
    ACGI_ERR_PROTOCOL,        /* the bridge sent a frame this client cannot accept; closed */
    ACGI_ERR_REPLY_TOO_LARGE, /* the reply is over the client's reply bound (it was skipped) */
    ACGI_ERR_USAGE,           /* a bad argument (payload over the bound, ...) */
    ACGI_ERR_NOMEM
};

typedef struct acgi_error {
    enum acgi_error_kind kind;
    int code;               /* the §3 code for ACGI_ERR_REMOTE (any value: accept unknown ones),
                               0 otherwise */
    enum acgi_retry retry;  /* whether sending the request again can help */
    int sys_errno;          /* errno for CONNECT / IO, else 0 */
    char message[ACGI_ERROR_MESSAGE_BYTES_MAX];
} acgi_error;

/* "remote", "connect", "io", "closed", "io_timeout", "protocol", "reply_too_large", "usage",
 * "nomem"; "none". */
const char *acgi_error_kind_name(enum acgi_error_kind kind);

/* Connect to "unix:/path", "tcp:host:port", or bare: a path when it contains '/', else
 * host:port ("[::1]:7878" for IPv6). TCP gets TCP_NODELAY. NULL on failure (err filled). */
acgi_client *acgi_client_connect(const char *addr, acgi_error *err);
void acgi_client_close(acgi_client *client);
/* Largest reply payload accepted (default ACGI_PAYLOAD_BYTES_MAX_DEFAULT, at most the
 * ceiling); checked on the header, before anything is allocated. Also the largest request. */
void acgi_client_set_payload_bytes_max(acgi_client *client, uint32_t bytes);
/* Give up waiting for an answer after this long (0, the default: wait forever). An answer that
 * comes later is skipped; a timeout in the middle of a frame closes the connection. */
void acgi_client_set_io_timeout_ms(acgi_client *client, uint32_t ms);
/* The service id of `name`, asking the bridge on first use (then cached). 0 on success. */
int acgi_client_resolve(acgi_client *client, const char *name, uint32_t *id, acgi_error *err);

/* Call a service (by name: resolved and cached; or by id) and wait for its answer. On success
 * returns 0 and *reply (malloc'd, free() it; NULL when the reply is empty) of *reply_len bytes.
 * timeout_ms > 0 sets the TIMEOUT flag (§2.2a): if no worker takes the request in time it gets
 * error 10 without running. -1 on failure with err filled. */
int acgi_client_call(acgi_client *client, const char *service, const void *request,
                     size_t request_len, uint32_t timeout_ms, uint8_t **reply,
                     size_t *reply_len, acgi_error *err);
int acgi_client_call_id(acgi_client *client, uint32_t service_id, const void *request,
                        size_t request_len, uint32_t timeout_ms, uint8_t **reply,
                        size_t *reply_len, acgi_error *err);
/* Ping (payload at most 4096 bytes): 0 when the Pong came back identical. */
int acgi_client_ping(acgi_client *client, const void *payload, size_t len, acgi_error *err);
/* Calls (resolves, pings) sent again on a new connection so far because the bridge drained
 * the connection they were on: each did not run there. */
uint64_t acgi_client_drain_retries(const acgi_client *client);

#ifdef __cplusplus
}
#endif

#endif /* ACGI_H */
