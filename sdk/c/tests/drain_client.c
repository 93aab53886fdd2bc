/*
 * drain_client: the C client across a binary upgrade of the bridge (tests/it/sdk_c.rs).
 *
 *   drain_client ADDR SERVICE idle   one call, "ready", wait for a line on stdin, one more call
 *   drain_client ADDR SERVICE busy   one call, "ready", then calls back to back until stdin has
 *                                    a line (or EOF)
 *
 * SERVICE must echo. Every reply is checked against its request. On success it prints
 * "calls=N retries=R" (R: acgi_client_drain_retries) and exits 0; the first failed or wrong
 * call is printed on stderr and exits 1.
 */
#define _POSIX_C_SOURCE 200809L

#include <acgi.h>

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One echo call of `text`, checked. 0, or -1 with the reason on stderr. */
static int echo_call(acgi_client *client, const char *service, const char *text) {
    uint8_t *reply = NULL;
    size_t reply_len = 0, len = strlen(text);
    acgi_error err;
    int same;
    if (acgi_client_call(client, service, text, len, 0, &reply, &reply_len, &err) < 0) {
        fprintf(stderr, "drain_client: call %s failed: kind=%s code=%d: %s\n", text,
                acgi_error_kind_name(err.kind), err.code, err.message);
        return -1;
    }
    same = reply_len == len && (len == 0 || memcmp(reply, text, len) == 0);
    free(reply);
    if (!same) {
        fprintf(stderr, "drain_client: the reply to %s differs\n", text);
        return -1;
    }
    return 0;
}

/* Whether stdin has a line or EOF (without waiting when `wait` is 0). */
static int stdin_ready(int wait) {
    struct pollfd pfd;
    pfd.fd = STDIN_FILENO;
    pfd.events = POLLIN;
    pfd.revents = 0;
    return poll(&pfd, 1, wait ? -1 : 0) > 0;
}

int main(int argc, char **argv) {
    acgi_client *client;
    acgi_error err;
    unsigned long calls = 0;
    char text[64];
    int busy, rc = 0;
    if (argc != 4 || (strcmp(argv[3], "idle") != 0 && strcmp(argv[3], "busy") != 0)) {
        fprintf(stderr, "usage: drain_client ADDR SERVICE idle|busy\n");
        return 2;
    }
    busy = strcmp(argv[3], "busy") == 0;
    client = acgi_client_connect(argv[1], &err);
    if (client == NULL) {
        fprintf(stderr, "drain_client: connect: %s\n", err.message);
        return 1;
    }
    if (echo_call(client, argv[2], "first") < 0) rc = 1;
    calls++;
    if (rc == 0) {
        printf("ready\n");
        fflush(stdout);
    }
    if (rc == 0 && !busy) {
        (void)stdin_ready(1);
        rc = echo_call(client, argv[2], "after the upgrade") < 0;
        calls++;
    }
    while (rc == 0 && busy && !stdin_ready(0)) {
        snprintf(text, sizeof text, "call %lu", calls);
        rc = echo_call(client, argv[2], text) < 0;
        calls++;
    }
    if (rc == 0)
        printf("calls=%lu retries=%llu\n", calls,
               (unsigned long long)acgi_client_drain_retries(client));
    acgi_client_close(client);
    return rc;
}
