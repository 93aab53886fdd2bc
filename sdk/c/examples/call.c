/*
 * acgi-call: call one service through a bridge with the C client and print the reply.
 *
 *   acgi-call [-t TIMEOUT_MS] [-m MAX_REPLY_BYTES] [-i IO_TIMEOUT_MS] [-n COUNT] ADDR SERVICE
 *             [PAYLOAD]
 *
 * ADDR: a Unix socket path or host:port. SERVICE: a name, or a number for a service id.
 * PAYLOAD: the request bytes; without it, stdin is read (up to MAX_REPLY_BYTES, the bound
 * of both directions). The reply goes to stdout as raw bytes.
 * -n COUNT makes the same call COUNT times on one connection (the name is resolved once),
 * printing each reply and each error; the exit status is then the last call's.
 * Exit status: 0 reply; 3 the bridge answered an error; 4 a local or connection error;
 * 2 usage. On error one line on stderr:
 *   acgi-call: error code=N retry=no|yes|if-idempotent: MESSAGE   (the bridge's error)
 *   acgi-call: failed kind=KIND retry=...: MESSAGE   (local: acgi_error_kind_name)
 */
#define _POSIX_C_SOURCE 200809L

#include <acgi.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *retry_name(enum acgi_retry retry) {
    switch (retry) {
    case ACGI_RETRY_YES: return "yes";
    case ACGI_RETRY_IF_IDEMPOTENT: return "if-idempotent";
    default: return "no";
    }
}

static int parse_u32(const char *text, uint32_t *out) {
    char *end;
    unsigned long value;
    if (text == NULL || *text < '0' || *text > '9') return -1;
    value = strtoul(text, &end, 10);
    if (*end != '\0' || value > 0xFFFFFFFFul) return -1;
    *out = (uint32_t)value;
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: acgi-call [-t TIMEOUT_MS] [-m MAX_BYTES] [-i IO_TIMEOUT_MS] "
                    "[-n COUNT] ADDR SERVICE [PAYLOAD]\n");
    return 2;
}

int main(int argc, char **argv) {
    uint32_t timeout_ms = 0, max_bytes = ACGI_PAYLOAD_BYTES_MAX_DEFAULT, io_timeout_ms = 0, id;
    uint32_t count = 1, done;
    uint8_t *request = NULL, *reply = NULL;
    size_t request_len = 0, reply_len = 0;
    acgi_client *client;
    acgi_error err;
    int opt, rc = 0;

    while ((opt = getopt(argc, argv, "t:m:i:n:")) != -1) {
        uint32_t *target = opt == 't'   ? &timeout_ms
                           : opt == 'm' ? &max_bytes
                           : opt == 'i' ? &io_timeout_ms
                                        : &count;
        if (opt == '?' || parse_u32(optarg, target) < 0) return usage();
    }
    if (argc - optind < 2 || argc - optind > 3) return usage();
    if (argc - optind == 3) {
        request = (uint8_t *)argv[optind + 2];
        request_len = strlen(argv[optind + 2]);
    } else {
        size_t cap = 0;
        for (;;) {
            size_t n;
            if (request_len == cap) {
                uint8_t *grown;
                if (cap >= max_bytes) {
                    fprintf(stderr, "acgi-call: stdin is over %u bytes\n", (unsigned)max_bytes);
                    return 4;
                }
                cap = cap == 0 ? 65536 : cap * 2;
                grown = realloc(request, cap);
                if (grown == NULL) return 4;
                request = grown;
            }
            n = fread(request + request_len, 1, cap - request_len, stdin);
            if (n == 0) break;
            request_len += n;
        }
    }

    client = acgi_client_connect(argv[optind], &err);
    if (client == NULL) {
        if (argc - optind == 2) free(request);
        fprintf(stderr, "acgi-call: failed kind=%s retry=%s: %s\n",
                acgi_error_kind_name(err.kind),
                retry_name(err.retry), err.message);
        return 4;
    }
    acgi_client_set_payload_bytes_max(client, max_bytes);
    acgi_client_set_io_timeout_ms(client, io_timeout_ms);
    for (done = 0; done < count; done++) {
        if (parse_u32(argv[optind + 1], &id) == 0)
            rc = acgi_client_call_id(client, id, request, request_len, timeout_ms, &reply,
                                     &reply_len, &err);
        else
            rc = acgi_client_call(client, argv[optind + 1], request, request_len, timeout_ms,
                                  &reply, &reply_len, &err);
        if (rc < 0 && err.kind == ACGI_ERR_REMOTE) {
            fprintf(stderr, "acgi-call: error code=%d retry=%s: %s\n", err.code,
                    retry_name(err.retry), err.message);
            rc = 3;
        } else if (rc < 0) {
            fprintf(stderr, "acgi-call: failed kind=%s retry=%s: %s\n",
                    acgi_error_kind_name(err.kind),
                    retry_name(err.retry), err.message);
            rc = 4;
        } else if (reply_len > 0 && fwrite(reply, 1, reply_len, stdout) != reply_len) {
            rc = 4;
        }
        free(reply);
        reply = NULL;
    }
    if (argc - optind == 2) free(request);
    acgi_client_close(client);
    return rc;
}
