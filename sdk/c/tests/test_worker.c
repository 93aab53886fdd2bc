/*
 * test_worker: a worker for the SDK's integration tests (tests/it/sdk_c.rs), run either
 * through acgi_worker_serve ("serve") or through the lower-level loop ("loop": poll on the
 * control fd, next_job without waiting, reply/fail), so both APIs face the real bridge.
 *
 * Requests are text commands:
 *   echo BYTES          -> BYTES (anything after "echo ", binary included)
 *   fail MESSAGE        -> a handler error with MESSAGE (error 8 for the caller)
 *   sleep MS PIDFILE    -> writes its pid to PIDFILE, sleeps MS (through SIGTERM), "slept"
 *   deadline            -> the caller's remaining ms as decimal text, "-1" for none
 *   big N               -> N bytes of 'x' (N over max_payload_bytes must become a Fail)
 * It says "test_worker: first queued job" on stderr the first time it gets a queued job.
 */
#define _POSIX_C_SOURCE 200809L

#include <acgi.h>

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct out {
    uint8_t *data;
    size_t len;
    int owned;
};

static int starts_with(const uint8_t *req, size_t len, const char *word) {
    size_t n = strlen(word);
    return len >= n && memcmp(req, word, n) == 0;
}

static void sleep_ms_fully(long ms) {
    struct timespec left;
    left.tv_sec = ms / 1000;
    left.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&left, &left) < 0 && errno == EINTR) {
    }
}

static int write_pid_file(const char *path) {
    char tmp[4096];
    FILE *f;
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return -1;
    f = fopen(tmp, "w");
    if (f == NULL) return -1;
    fprintf(f, "%ld\n", (long)getpid());
    if (fclose(f) != 0) return -1;
    return rename(tmp, path);
}

/* Run one command; NULL and *out on success, else an error message (static or in buf). */
static const char *run(acgi_worker *w, const uint8_t *req, size_t len, struct out *out,
                       char *buf, size_t buf_bytes) {
    static int queued_seen = 0;
    const acgi_job *job = acgi_worker_current_job(w);
    memset(out, 0, sizeof *out);
    if (job != NULL && job->queued && !queued_seen) {
        /* The tests look for this line in the bridge's log: queued jobs really came. */
        fprintf(stderr, "test_worker: first queued job, sequence %llu\n",
                (unsigned long long)job->sequence);
        queued_seen = 1;
    }
    if (starts_with(req, len, "echo ")) {
        out->data = (uint8_t *)(uintptr_t)(req + 5);
        out->len = len - 5;
        return NULL;
    }
    if (starts_with(req, len, "fail ")) {
        size_t n = len - 5 < buf_bytes - 1 ? len - 5 : buf_bytes - 1;
        memcpy(buf, req + 5, n);
        buf[n] = '\0';
        return buf;
    }
    if (starts_with(req, len, "deadline")) {
        snprintf(buf, buf_bytes, "%lld", (long long)acgi_worker_remaining_ms(w));
        out->data = (uint8_t *)buf;
        out->len = strlen(buf);
        return NULL;
    }
    if (starts_with(req, len, "sleep ") || starts_with(req, len, "big ")) {
        char text[4200], *end;
        long n;
        size_t tn = len < sizeof text - 1 ? len : sizeof text - 1;
        memcpy(text, req, tn);
        text[tn] = '\0';
        n = strtol(strchr(text, ' ') + 1, &end, 10);
        if (n < 0) return "negative number";
        if (text[0] == 'b') {
            out->data = malloc(n > 0 ? (size_t)n : 1);
            if (out->data == NULL) return "out of memory";
            memset(out->data, 'x', (size_t)n);
            out->len = (size_t)n;
            out->owned = 1;
            return NULL;
        }
        if (*end != ' ' || write_pid_file(end + 1) < 0) return "sleep needs MS PIDFILE";
        sleep_ms_fully(n);
        out->data = (uint8_t *)"slept";
        out->len = 5;
        return NULL;
    }
    return "unknown command";
}

static const char *serve_handler(void *ctx, const uint8_t *req, size_t len, acgi_reply *reply) {
    static char buf[4096];
    struct out out;
    const char *failed;
    (void)ctx;
    failed = run(acgi_reply_worker(reply), req, len, &out, buf, sizeof buf);
    /* A refused write (over max_payload_bytes) is turned into a Fail naming the sizes. */
    if (failed == NULL) (void)acgi_reply_write(reply, out.data, out.len);
    if (out.owned) free(out.data);
    return failed;
}

static int loop(void) {
    char why[256], buf[4096];
    acgi_worker *w = acgi_worker_open(ACGI_WORKER_SIGTERM | ACGI_WORKER_QUEUED, why, sizeof why);
    if (w == NULL) {
        fprintf(stderr, "test_worker: %s\n", why);
        return 1;
    }
    for (;;) {
        struct pollfd pfd;
        acgi_job job;
        struct out out;
        const char *failed;
        int sent;
        enum acgi_job_result got = acgi_worker_next_job(w, &job, 0);
        if (got == ACGI_JOB_AGAIN) {
            /* An event loop would poll its other descriptors here too. */
            pfd.fd = acgi_worker_fd(w);
            pfd.events = POLLIN;
            pfd.revents = 0;
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) break;
            continue; /* readable, or SIGTERM: next_job says which */
        }
        if (got == ACGI_JOB_EOF || got == ACGI_JOB_STOP) {
            acgi_worker_close(w);
            return 0;
        }
        if (got != ACGI_JOB_READY) {
            fprintf(stderr, "test_worker: %s\n", acgi_worker_error(w));
            acgi_worker_close(w);
            return 2;
        }
        failed = run(w, job.request, job.request_len, &out, buf, sizeof buf);
        sent = failed != NULL ? acgi_worker_fail(w, failed)
                              : acgi_worker_reply(w, out.data, out.len);
        if (out.owned) free(out.data);
        if (sent < 0) {
            fprintf(stderr, "test_worker: %s\n", acgi_worker_error(w));
            acgi_worker_close(w);
            return 2;
        }
    }
    acgi_worker_close(w);
    return 2;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "loop") == 0) return loop();
    return acgi_worker_serve(serve_handler, NULL);
}
