/* An echo worker: a request is echoed, and one that starts with "fail:" is answered with a
 * service error carrying the rest. (The cross-SDK behaviour suite, tests/it/sdks.rs, runs it
 * beside its Rust and Python twins and expects identical answers.) */
#include <acgi.h>
#include <string.h>

static const char *echo(void *ctx, const uint8_t *req, size_t len, acgi_reply *reply) {
    (void)ctx;
    if (len >= 5 && memcmp(req, "fail:", 5) == 0)
        return acgi_reply_errorf(reply, "%.*s", (int)(len - 5), (const char *)req + 5);
    if (acgi_reply_write(reply, req, len) != 0) return "reply too large";
    return NULL;
}

int main(void) { return acgi_worker_serve(echo, NULL); }
