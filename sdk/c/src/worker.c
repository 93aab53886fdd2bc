/*
 * worker.c: the worker side of docs/protocol.md Part II.
 *
 * Owns the two descriptors the bridge passed (§6), the slot mapping (§7) and the control
 * socket's read buffer. The state word of the slot is only ever moved Filled -> Taken
 * (compare-and-swap, acquire) and Taken -> Replied (store, release), in the order of §7.2; no
 * other slot header field is written except reply_len. The bridge's bytes are untrusted: every
 * header is checked (§1.2, bound = ACGI_MAX_PAYLOAD_BYTES), every slot length is checked
 * against the capacity before it is used, and a violation ends the loop with ACGI_JOB_ERROR
 * (the process should then exit non-zero, §8.1).
 *
 *   idle --next_job: whole Job frame, slot taken--> job outstanding --reply/fail--> idle
 *
 * The request of a socket (copy-path or queued) job points into the read buffer, which is not
 * moved or reused until that job is answered.
 */
#define _POSIX_C_SOURCE 200809L

#include "frame.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "acgi worker.c needs the GCC/Clang __atomic builtins for the slot's state word"
#endif

/* Slot layout, §7.1. */
#define SLOT_MAGIC 0x544F4C53u
#define SLOT_ABI_VERSION 1u
#define SLOT_HEADER_BYTES 64u
#define SLOT_CAPACITY_BYTES_MIN 64u
#define SLOT_OFFSET_MAGIC 0
#define SLOT_OFFSET_ABI 4
#define SLOT_OFFSET_STATE 8
#define SLOT_OFFSET_CAPACITY 12
#define SLOT_OFFSET_REQUEST_LEN 16
#define SLOT_OFFSET_REPLY_LEN 20
#define SLOT_OFFSET_JOB_SEQUENCE 24
#define SLOT_OFFSET_DEADLINE_MS 32
#define SLOT_REQUEST_LEN_INLINE 0xFFFFFFFFu
#define SLOT_FILLED 1u
#define SLOT_TAKEN 2u
#define SLOT_REPLIED 3u

/* Initial read buffer; it grows to one whole frame (at most 24 + max_payload_bytes). */
#define IN_BYTES_INITIAL 65536u

struct acgi_reply {
    uint8_t *data;
    size_t len;
    size_t cap;
    size_t max;          /* the bridge's max_payload_bytes */
    size_t wanted;       /* the length a refused write asked for */
    int refused;         /* 0, or 1 over max, 2 out of memory */
    char *message;       /* acgi_reply_errorf's storage */
    acgi_worker *worker;
};

struct acgi_worker {
    int control_fd;
    uint8_t *map; /* the slot: 64-byte header, then the data area */
    size_t map_bytes;
    uint32_t capacity;
    uint32_t payload_max;
    unsigned options;
    /* Read buffer: bytes [in_head, in_tail) are received and not consumed. */
    uint8_t *in;
    size_t in_head;
    size_t in_tail;
    size_t in_cap;
    /* The outstanding job, if any, and the input bytes its frame holds. */
    int outstanding;
    int broken;
    acgi_job job;
    size_t job_frame_bytes;
    int64_t deadline_ms; /* monotonic, -1 none */
    char error[256];
};

/* SIGTERM: a flag, and a byte in a self-pipe so that a poll() about to start wakes too. */
static volatile sig_atomic_t stop_requested = 0;
static int sigterm_pipe[2] = {-1, -1};

static void on_sigterm(int signal_number) {
    int saved = errno;
    (void)signal_number;
    stop_requested = 1;
    if (sigterm_pipe[1] >= 0) {
        ssize_t ignored = write(sigterm_pipe[1], "x", 1);
        (void)ignored; /* a full pipe already wakes the poll */
    }
    errno = saved;
}

int acgi_worker_stop_requested(void) { return stop_requested != 0; }

static int set_fd_flags(int fd, int nonblock) {
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0) return -1;
    if (nonblock) {
        flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
    }
    return 0;
}

static int install_sigterm(void) {
    struct sigaction action;
    if (sigterm_pipe[0] < 0) {
        if (pipe(sigterm_pipe) < 0) return -1;
        if (set_fd_flags(sigterm_pipe[0], 1) < 0 || set_fd_flags(sigterm_pipe[1], 1) < 0)
            return -1;
    }
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigterm;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; /* no SA_RESTART: a blocked wait returns EINTR */
    return sigaction(SIGTERM, &action, NULL);
}

static void set_error(acgi_worker *w, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void set_error(acgi_worker *w, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(w->error, sizeof w->error, format, args);
    va_end(args);
}

static void why_printf(char *why, size_t why_bytes, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void why_printf(char *why, size_t why_bytes, const char *format, ...) {
    va_list args;
    if (why == NULL || why_bytes == 0) return;
    va_start(args, format);
    vsnprintf(why, why_bytes, format, args);
    va_end(args);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Strict decimal: digits only, no sign, no overflow past `max`. */
static int parse_decimal(const char *text, unsigned long max, unsigned long *out) {
    unsigned long value = 0;
    if (text == NULL || *text == '\0') return -1;
    for (; *text != '\0'; text++) {
        unsigned digit;
        if (*text < '0' || *text > '9') return -1;
        digit = (unsigned)(*text - '0');
        if (value > (max - digit) / 10) return -1;
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

static uint32_t *slot_u32(const acgi_worker *w, size_t offset) {
    /* SAFETY-equivalent: the mapping is page-aligned and at least 128 bytes; offset is a
     * multiple of 4 below 64, so this is an aligned u32 of the slot header. */
    return (uint32_t *)(void *)(w->map + offset);
}

static uint64_t *slot_u64(const acgi_worker *w, size_t offset) {
    return (uint64_t *)(void *)(w->map + offset);
}

static int host_is_little_endian(void) {
    const uint16_t probe = 1;
    uint8_t first;
    memcpy(&first, &probe, 1);
    return first == 1;
}

acgi_worker *acgi_worker_open(unsigned options, char *why, size_t why_bytes) {
    unsigned long control_fd, slot_fd, payload_max = ACGI_PAYLOAD_BYTES_MAX_DEFAULT;
    const char *text;
    struct stat st;
    acgi_worker *w;
    void *map;
    acgi_header hello;
    uint8_t hello_payload[8];

    if (!host_is_little_endian()) {
        why_printf(why, why_bytes, "the slot is little-endian and this host is not");
        return NULL;
    }
    if (parse_decimal(getenv("ACGI_CONTROL_FD"), INT_MAX, &control_fd) < 0 ||
        fcntl((int)control_fd, F_GETFD) < 0) {
        why_printf(why, why_bytes,
                   "not started by acgi-bridge: ACGI_CONTROL_FD is not set or not an open "
                   "descriptor");
        return NULL;
    }
    if (parse_decimal(getenv("ACGI_SLOT_FD"), INT_MAX, &slot_fd) < 0 ||
        fcntl((int)slot_fd, F_GETFD) < 0) {
        why_printf(why, why_bytes,
                   "not started by acgi-bridge: ACGI_SLOT_FD is not set or not an open "
                   "descriptor");
        return NULL;
    }
    if (fstat((int)control_fd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
        why_printf(why, why_bytes, "ACGI_CONTROL_FD=%lu is not a socket", control_fd);
        return NULL;
    }
    text = getenv("ACGI_MAX_PAYLOAD_BYTES");
    if (text != NULL && (parse_decimal(text, ACGI_PAYLOAD_BYTES_MAX_CEILING, &payload_max) < 0 ||
                         payload_max == 0)) {
        why_printf(why, why_bytes, "ACGI_MAX_PAYLOAD_BYTES=%s is not a number from 1 to %u",
                   text, ACGI_PAYLOAD_BYTES_MAX_CEILING);
        return NULL;
    }
    if (fstat((int)slot_fd, &st) < 0) {
        why_printf(why, why_bytes, "slot: fstat: %s", strerror(errno));
        return NULL;
    }
    if (st.st_size < (off_t)(SLOT_HEADER_BYTES + SLOT_CAPACITY_BYTES_MIN) ||
        (uintmax_t)st.st_size > (uintmax_t)SLOT_HEADER_BYTES + UINT32_MAX ||
        (uintmax_t)st.st_size > (uintmax_t)SIZE_MAX) {
        why_printf(why, why_bytes, "slot memfd is %jd bytes: not a slot", (intmax_t)st.st_size);
        return NULL;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL) {
        why_printf(why, why_bytes, "out of memory");
        return NULL;
    }
    w->control_fd = (int)control_fd;
    w->payload_max = (uint32_t)payload_max;
    w->options = options;
    w->deadline_ms = -1;
    w->map_bytes = (size_t)st.st_size;
    map = mmap(NULL, w->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, (int)slot_fd, 0);
    if (map == MAP_FAILED) {
        why_printf(why, why_bytes, "slot: mmap: %s", strerror(errno));
        free(w);
        return NULL;
    }
    w->map = map;
    close((int)slot_fd); /* the mapping outlives the descriptor */
    w->capacity = (uint32_t)(w->map_bytes - SLOT_HEADER_BYTES);
    if (__atomic_load_n(slot_u32(w, SLOT_OFFSET_MAGIC), __ATOMIC_ACQUIRE) != SLOT_MAGIC ||
        __atomic_load_n(slot_u32(w, SLOT_OFFSET_ABI), __ATOMIC_RELAXED) != SLOT_ABI_VERSION ||
        __atomic_load_n(slot_u32(w, SLOT_OFFSET_CAPACITY), __ATOMIC_RELAXED) != w->capacity) {
        why_printf(why, why_bytes,
                   "slot header is invalid (magic, abi_version 1 and capacity %u expected)",
                   w->capacity);
        munmap(w->map, w->map_bytes);
        free(w);
        return NULL;
    }
    if (set_fd_flags(w->control_fd, 0) < 0 ||
        ((options & ACGI_WORKER_SIGTERM) != 0 && install_sigterm() < 0)) {
        why_printf(why, why_bytes, "setting up descriptors and SIGTERM: %s", strerror(errno));
        acgi_worker_close(w);
        return NULL;
    }
    w->in_cap = IN_BYTES_INITIAL;
    w->in = malloc(w->in_cap);
    if (w->in == NULL) {
        why_printf(why, why_bytes, "out of memory");
        acgi_worker_close(w);
        return NULL;
    }
    memset(&hello, 0, sizeof hello);
    hello.kind = ACGI_KIND_HELLO;
    hello.flags = (options & ACGI_WORKER_QUEUED) != 0 ? ACGI_FLAG_QUEUED : 0;
    hello.payload_len = sizeof hello_payload;
    acgi_put_u32(hello_payload, SLOT_ABI_VERSION);
    acgi_put_u32(hello_payload + 4, (uint32_t)getpid());
    if (acgi_send_frame(w->control_fd, &hello, hello_payload, sizeof hello_payload) < 0) {
        why_printf(why, why_bytes, "sending Hello: %s", strerror(errno));
        acgi_worker_close(w);
        return NULL;
    }
    return w;
}

void acgi_worker_close(acgi_worker *w) {
    if (w == NULL) return;
    if (w->map != NULL) munmap(w->map, w->map_bytes);
    /* The control socket stays open until the process exits: the bridge takes its closing as
     * the worker's end, and kills a worker that closes it while still running (exit handlers,
     * a sanitizer's leak check), which would hide the real exit status. */
    free(w->in);
    free(w);
}

int acgi_worker_fd(const acgi_worker *w) { return w->control_fd; }
uint32_t acgi_worker_slot_capacity(const acgi_worker *w) { return w->capacity; }
uint32_t acgi_worker_payload_bytes_max(const acgi_worker *w) { return w->payload_max; }
const char *acgi_worker_error(const acgi_worker *w) { return w->error; }

const acgi_job *acgi_worker_current_job(const acgi_worker *w) {
    return w->outstanding ? &w->job : NULL;
}

int64_t acgi_worker_remaining_ms(const acgi_worker *w) {
    int64_t left;
    if (!w->outstanding || w->deadline_ms < 0) return -1;
    left = w->deadline_ms - now_ms();
    return left > 0 ? left : 0;
}

/* Room for a whole frame of `frame_bytes` from in_head: compact, then grow. */
static int reserve_input(acgi_worker *w, size_t frame_bytes) {
    if (w->in_cap - w->in_head >= frame_bytes) return 0;
    if (w->in_head > 0) {
        memmove(w->in, w->in + w->in_head, w->in_tail - w->in_head);
        w->in_tail -= w->in_head;
        w->in_head = 0;
    }
    if (w->in_cap < frame_bytes) {
        size_t cap = w->in_cap;
        uint8_t *grown;
        while (cap < frame_bytes) cap = cap > SIZE_MAX / 2 ? frame_bytes : cap * 2;
        grown = realloc(w->in, cap);
        if (grown == NULL) {
            set_error(w, "out of memory for a frame of %zu bytes", frame_bytes);
            return -1;
        }
        w->in = grown;
        w->in_cap = cap;
    }
    return 0;
}

/* Make `need` unconsumed bytes available. Waits up to timeout_ms (-1 forever). */
static enum acgi_job_result fill(acgi_worker *w, size_t need, int timeout_ms) {
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    if (reserve_input(w, need) < 0) return ACGI_JOB_ERROR;
    while (w->in_tail - w->in_head < need) {
        int at_boundary = w->in_tail == w->in_head;
        struct pollfd fds[2];
        int wait_ms, ready;
        ssize_t n = recv(w->control_fd, w->in + w->in_tail, w->in_cap - w->in_tail, MSG_DONTWAIT);
        if (n > 0) {
            w->in_tail += (size_t)n;
            continue;
        }
        if (n == 0) {
            if (at_boundary) return ACGI_JOB_EOF;
            set_error(w, "the bridge closed the control socket inside a frame (%zu of %zu bytes)",
                      w->in_tail - w->in_head, need);
            return ACGI_JOB_ERROR;
        }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            set_error(w, "control socket: recv: %s", strerror(errno));
            return ACGI_JOB_ERROR;
        }
        if (at_boundary && (w->options & ACGI_WORKER_SIGTERM) && stop_requested)
            return ACGI_JOB_STOP;
        if (timeout_ms == 0) return ACGI_JOB_AGAIN;
        wait_ms = -1;
        if (timeout_ms > 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0) return ACGI_JOB_AGAIN;
            wait_ms = (int)left;
        }
        /* Wait in poll(POLLIN), not in recv: see protocol.md §11 item 11. */
        fds[0].fd = w->control_fd;
        fds[0].events = POLLIN;
        fds[0].revents = 0;
        fds[1].fd = (w->options & ACGI_WORKER_SIGTERM) ? sigterm_pipe[0] : -1;
        fds[1].events = POLLIN;
        fds[1].revents = 0;
        ready = poll(fds, 2, wait_ms);
        if (ready < 0 && errno != EINTR) {
            set_error(w, "control socket: poll: %s", strerror(errno));
            return ACGI_JOB_ERROR;
        }
        if (ready > 0 && (fds[1].revents & POLLIN)) {
            char drain[16];
            while (read(sigterm_pipe[0], drain, sizeof drain) > 0) {
            }
        }
    }
    return ACGI_JOB_READY;
}

enum acgi_job_result acgi_worker_next_job(acgi_worker *w, acgi_job *job, int timeout_ms) {
    acgi_header h;
    enum acgi_frame_check check;
    enum acgi_job_result got;
    size_t frame_bytes;
    uint32_t request_len;
    uint64_t sequence, deadline_remaining;

    if (w->outstanding) {
        set_error(w, "next_job called while job %llu is not answered",
                  (unsigned long long)w->job.sequence);
        return ACGI_JOB_ERROR;
    }
    if (w->broken) return ACGI_JOB_ERROR;
    /* SIGTERM between jobs: stop now (during a job it only sets the flag). */
    if ((w->options & ACGI_WORKER_SIGTERM) && stop_requested) return ACGI_JOB_STOP;
    got = fill(w, ACGI_HEADER_BYTES, timeout_ms);
    if (got != ACGI_JOB_READY) return got;
    check = acgi_header_decode(w->in + w->in_head, ACGI_HEADER_BYTES, w->payload_max, &h);
    if (check != ACGI_FRAME_OK) {
        set_error(w, "the bridge sent a bad frame header (%s)", acgi_frame_check_name(check));
        return ACGI_JOB_ERROR;
    }
    if (h.kind != ACGI_KIND_JOB) {
        set_error(w, "the bridge sent a frame of kind %u, not a Job", (unsigned)h.kind);
        return ACGI_JOB_ERROR;
    }
    if ((h.flags & ~(unsigned)(ACGI_FLAG_IN_SLOT | ACGI_FLAG_QUEUED)) != 0 ||
        h.flags == (ACGI_FLAG_IN_SLOT | ACGI_FLAG_QUEUED)) {
        set_error(w, "the bridge sent a Job with flags 0x%04x", (unsigned)h.flags);
        return ACGI_JOB_ERROR;
    }
    if ((h.flags & ACGI_FLAG_QUEUED) && !(w->options & ACGI_WORKER_QUEUED)) {
        set_error(w, "the bridge sent a queued Job, and this worker did not ask for them");
        return ACGI_JOB_ERROR;
    }
    if ((h.flags & ACGI_FLAG_IN_SLOT) && h.payload_len != 0) {
        set_error(w, "the bridge sent an in-slot Job with %u payload bytes on the socket",
                  (unsigned)h.payload_len);
        return ACGI_JOB_ERROR;
    }
    /* The whole frame first, so that an AGAIN leaves nothing half done. */
    frame_bytes = ACGI_HEADER_BYTES + (size_t)h.payload_len;
    got = fill(w, frame_bytes, timeout_ms);
    if (got == ACGI_JOB_EOF || got == ACGI_JOB_STOP) {
        /* Neither can happen inside a frame; fill reports EOF there as an error. */
        set_error(w, "the control socket ended inside a Job frame");
        return ACGI_JOB_ERROR;
    }
    if (got != ACGI_JOB_READY) return got;

    memset(job, 0, sizeof *job);
    job->sequence = h.request_id;
    w->deadline_ms = -1;
    if (h.flags & ACGI_FLAG_QUEUED) {
        /* §8.4: the slot belongs to the job ahead, or to nobody: do not touch it. */
        job->queued = 1;
        job->request = w->in + w->in_head + ACGI_HEADER_BYTES;
        job->request_len = h.payload_len;
    } else {
        uint32_t expected = SLOT_FILLED;
        if (!__atomic_compare_exchange_n(slot_u32(w, SLOT_OFFSET_STATE), &expected, SLOT_TAKEN, 0,
                                         __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            set_error(w, "a Job arrived and the slot is in state %u, not Filled (1)",
                      (unsigned)expected);
            return ACGI_JOB_ERROR;
        }
        sequence = __atomic_load_n(slot_u64(w, SLOT_OFFSET_JOB_SEQUENCE), __ATOMIC_RELAXED);
        request_len = __atomic_load_n(slot_u32(w, SLOT_OFFSET_REQUEST_LEN), __ATOMIC_RELAXED);
        deadline_remaining =
            __atomic_load_n(slot_u64(w, SLOT_OFFSET_DEADLINE_MS), __ATOMIC_RELAXED);
        if (sequence != h.request_id) {
            set_error(w, "the slot's job sequence %llu is not the Job's %llu",
                      (unsigned long long)sequence, (unsigned long long)h.request_id);
            return ACGI_JOB_ERROR;
        }
        if (h.flags & ACGI_FLAG_IN_SLOT) {
            if (request_len > w->capacity) {
                set_error(w, "in-slot Job with request_len %u over the capacity %u",
                          (unsigned)request_len, (unsigned)w->capacity);
                return ACGI_JOB_ERROR;
            }
            job->in_slot = 1;
            job->request = w->map + SLOT_HEADER_BYTES;
            job->request_len = request_len;
        } else {
            if (request_len != SLOT_REQUEST_LEN_INLINE) {
                set_error(w, "copy-path Job and the slot's request_len is %u, not 0xFFFFFFFF",
                          (unsigned)request_len);
                return ACGI_JOB_ERROR;
            }
            job->request = w->in + w->in_head + ACGI_HEADER_BYTES;
            job->request_len = h.payload_len;
        }
        if (deadline_remaining > 0) {
            /* Bounded so that the sum cannot overflow: a century is "no practical limit". */
            const uint64_t cap = (uint64_t)100 * 365 * 24 * 3600 * 1000;
            w->deadline_ms =
                now_ms() + (int64_t)(deadline_remaining < cap ? deadline_remaining : cap);
        }
    }
    w->job = *job;
    w->job_frame_bytes = job->in_slot ? ACGI_HEADER_BYTES : frame_bytes;
    w->outstanding = 1;
    return ACGI_JOB_READY;
}

/* The job is answered: give its frame's bytes back. */
static void finish_job(acgi_worker *w) {
    w->in_head += w->job_frame_bytes;
    if (w->in_head == w->in_tail) w->in_head = w->in_tail = 0;
    w->outstanding = 0;
    w->deadline_ms = -1;
}

static int send_answer(acgi_worker *w, uint8_t kind, uint16_t flags, const void *payload,
                       size_t len) {
    acgi_header h;
    int sent;
    memset(&h, 0, sizeof h);
    h.kind = kind;
    h.flags = flags;
    h.payload_len = (uint32_t)len;
    h.request_id = w->job.sequence;
    sent = acgi_send_frame(w->control_fd, &h, payload, len);
    if (sent < 0) {
        set_error(w, "control socket: sending the answer: %s", strerror(errno));
        w->broken = 1;
    }
    finish_job(w);
    return sent;
}

/* Taken -> Replied (§7.2): reply_len, then the state with release ordering. */
static void publish(acgi_worker *w, uint32_t reply_len) {
    __atomic_store_n(slot_u32(w, SLOT_OFFSET_REPLY_LEN), reply_len, __ATOMIC_RELAXED);
    __atomic_store_n(slot_u32(w, SLOT_OFFSET_STATE), SLOT_REPLIED, __ATOMIC_RELEASE);
}

int acgi_worker_fail(acgi_worker *w, const char *message) {
    size_t len, cut;
    if (!w->outstanding) {
        set_error(w, "fail called with no job outstanding");
        return -1;
    }
    /* The handler's message as it is, even empty (every SDK does the same); NULL is none. */
    if (message == NULL) message = "";
    len = strlen(message);
    cut = len < ACGI_FAIL_MESSAGE_BYTES_MAX ? len : ACGI_FAIL_MESSAGE_BYTES_MAX;
    if (cut > w->payload_max) cut = w->payload_max;
    /* Do not split a UTF-8 character: back up over continuation bytes at the cut. */
    while (cut > 0 && cut < len && ((unsigned char)message[cut] & 0xC0u) == 0x80u) cut--;
    if (!w->job.queued) publish(w, 0);
    return send_answer(w, ACGI_KIND_FAIL, 0, message, cut);
}

int acgi_worker_reply(acgi_worker *w, const void *reply, size_t reply_len) {
    if (!w->outstanding) {
        set_error(w, "reply called with no job outstanding");
        return -1;
    }
    if (reply_len > w->payload_max) {
        char message[160];
        snprintf(message, sizeof message,
                 "reply of %zu bytes is over the bridge's maximum of %u bytes", reply_len,
                 (unsigned)w->payload_max);
        return acgi_worker_fail(w, message);
    }
    if (reply_len > 0 && reply == NULL) return acgi_worker_fail(w, "handler returned no bytes");
    if (w->job.queued) return send_answer(w, ACGI_KIND_DONE, 0, reply, reply_len);
    if (reply_len <= w->capacity) {
        /* The reply may overlap the request in the data area. */
        if (reply_len > 0) memmove(w->map + SLOT_HEADER_BYTES, reply, reply_len);
        publish(w, (uint32_t)reply_len);
        return send_answer(w, ACGI_KIND_DONE, ACGI_FLAG_IN_SLOT, NULL, 0);
    }
    publish(w, 0);
    return send_answer(w, ACGI_KIND_DONE, 0, reply, reply_len);
}

/* ---- reply buffer ---- */

int acgi_reply_write(acgi_reply *r, const void *data, size_t len) {
    uint8_t *room = acgi_reply_reserve(r, len);
    if (room == NULL) return -1;
    if (len > 0) memcpy(room, data, len);
    acgi_reply_commit(r, len);
    return 0;
}

uint8_t *acgi_reply_reserve(acgi_reply *r, size_t len) {
    if (r->refused) return NULL;
    if (len > r->max - r->len) {
        r->refused = 1;
        r->wanted = len > SIZE_MAX - r->len ? SIZE_MAX : r->len + len;
        return NULL;
    }
    if (r->data == NULL || r->cap - r->len < len) {
        size_t cap = r->cap > 0 ? r->cap : 4096;
        uint8_t *grown;
        while (cap - r->len < len) cap = cap > r->max / 2 ? r->max : cap * 2;
        grown = realloc(r->data, cap > 0 ? cap : 1);
        if (grown == NULL) {
            r->refused = 2;
            r->wanted = r->len + len;
            return NULL;
        }
        r->data = grown;
        r->cap = cap;
    }
    return r->data + r->len;
}

void acgi_reply_commit(acgi_reply *r, size_t len) {
    if (len <= r->cap - r->len) r->len += len;
}

size_t acgi_reply_len(const acgi_reply *r) { return r->len; }
size_t acgi_reply_space(const acgi_reply *r) { return r->max - r->len; }

void acgi_reply_clear(acgi_reply *r) {
    r->len = 0;
    r->refused = 0;
    r->wanted = 0;
}

acgi_worker *acgi_reply_worker(acgi_reply *r) { return r->worker; }

const char *acgi_reply_errorf(acgi_reply *r, const char *format, ...) {
    va_list args;
    int needed;
    size_t bytes;
    va_start(args, format);
    needed = vsnprintf(NULL, 0, format, args);
    va_end(args);
    if (needed < 0) return "handler failed (its error message could not be formatted)";
    bytes = (size_t)needed + 1;
    if (bytes > ACGI_FAIL_MESSAGE_BYTES_MAX + 1) bytes = ACGI_FAIL_MESSAGE_BYTES_MAX + 1;
    free(r->message);
    r->message = malloc(bytes);
    if (r->message == NULL) return "handler failed (out of memory for its error message)";
    va_start(args, format);
    vsnprintf(r->message, bytes, format, args);
    va_end(args);
    return r->message;
}

int acgi_worker_serve(acgi_handler handler, void *ctx) {
    char why[256];
    acgi_reply reply;
    int status = 0;
    acgi_worker *w = acgi_worker_open(ACGI_WORKER_SIGTERM | ACGI_WORKER_QUEUED, why, sizeof why);
    if (w == NULL) {
        fprintf(stderr, "acgi worker: %s\n", why);
        return 1;
    }
    memset(&reply, 0, sizeof reply);
    reply.max = w->payload_max;
    reply.worker = w;
    for (;;) {
        acgi_job job;
        const char *failed;
        int sent;
        enum acgi_job_result got = acgi_worker_next_job(w, &job, -1);
        if (got == ACGI_JOB_EOF || got == ACGI_JOB_STOP) break;
        if (got != ACGI_JOB_READY) {
            fprintf(stderr, "acgi worker: %s\n", w->error);
            status = 2;
            break;
        }
        acgi_reply_clear(&reply);
        failed = handler(ctx, job.request, job.request_len, &reply);
        if (failed != NULL) {
            sent = acgi_worker_fail(w, failed);
        } else if (reply.refused == 1) {
            char message[160];
            snprintf(message, sizeof message,
                     "reply of %zu bytes is over the bridge's maximum of %u bytes", reply.wanted,
                     (unsigned)w->payload_max);
            sent = acgi_worker_fail(w, message);
        } else if (reply.refused == 2) {
            sent = acgi_worker_fail(w, "the worker ran out of memory for the reply");
        } else {
            sent = acgi_worker_reply(w, reply.data, reply.len);
        }
        if (sent < 0) {
            fprintf(stderr, "acgi worker: %s\n", w->error);
            status = 2;
            break;
        }
        /* A big reply buffer is not kept for the next, likely small, job. */
        if (reply.cap > (size_t)4 << 20) {
            free(reply.data);
            reply.data = NULL;
            reply.cap = 0;
        }
    }
    free(reply.data);
    free(reply.message);
    acgi_worker_close(w);
    return status;
}
