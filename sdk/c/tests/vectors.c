/*
 * vectors: check the SDK's frame code against a file of conformance vectors.
 *
 *   vectors FILE
 *
 * One vector per line; '#' comments and blank lines are ignored; fields are separated by
 * single spaces: `<class> <name> frame=<lowercase hex of header+payload> [key=value ...]`.
 *   valid           kind= flags= code= service= len= id= (decimal) payload=<hex>: decoding gives
 *                   exactly those fields, encoding gives exactly `frame`
 *   malformed       check=<truncated|magic|version|kind|flags|code>: the first failing check
 *   too_large       bound=<decimal>: only the payload bound fails
 *   caller_refused  caller=<reaction>: a valid header a caller may not send; the reaction is
 *                   the bridge's answer: malformed (7, closes), unknown_service (1),
 *                   payload_too_large / too_large (2), or a code number
 * Unknown classes and keys are skipped. Prints each failure with its line and name; exits 1
 * when any vector failed or the file holds none, 2 when it cannot be read.
 */
#define _POSIX_C_SOURCE 200809L

#include <acgi.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KEYS_MAX 32

struct vector {
    const char *klass;
    const char *name;
    const char *keys[KEYS_MAX];
    const char *values[KEYS_MAX];
    int count;
};

static const char *value_of(const struct vector *v, const char *key) {
    int i;
    for (i = 0; i < v->count; i++)
        if (strcmp(v->keys[i], key) == 0) return v->values[i];
    return NULL;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode hex into a malloc'd buffer; -1 on odd length or a bad digit. */
static int parse_hex(const char *text, uint8_t **out, size_t *len) {
    size_t n = strlen(text), i;
    *out = NULL;
    *len = 0;
    if (n % 2 != 0) return -1;
    *out = malloc(n / 2 + 1);
    if (*out == NULL) return -1;
    for (i = 0; i < n / 2; i++) {
        int hi = hex_digit(text[2 * i]), lo = hex_digit(text[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i] = (uint8_t)(hi * 16 + lo);
    }
    *len = n / 2;
    return 0;
}

static int parse_number(const char *text, unsigned long long max, unsigned long long *out) {
    unsigned long long value = 0;
    if (text == NULL || *text == '\0') return -1;
    for (; *text; text++) {
        if (*text < '0' || *text > '9') return -1;
        if (value > (max - (unsigned)(*text - '0')) / 10) return -1;
        value = value * 10 + (unsigned)(*text - '0');
    }
    *out = value;
    return 0;
}

static int reaction_code(const char *text) {
    size_t n;
    unsigned long long code;
    if (strcmp(text, "malformed") == 0 || strcmp(text, "malformed_frame") == 0 ||
        strcmp(text, "close") == 0)
        return 7;
    if (strcmp(text, "unknown_service") == 0) return 1;
    if (strcmp(text, "payload_too_large") == 0 || strcmp(text, "too_large") == 0) return 2;
    /* sdk/vectors' own form: "error<N>_close" or "error<N>_skip". */
    if (strncmp(text, "error", 5) == 0 && text[5] >= '0' && text[5] <= '9') {
        unsigned long long number = 0;
        const char *p = text + 5;
        while (*p >= '0' && *p <= '9' && number < 65536) number = number * 10 + (unsigned)(*p++ - '0');
        if ((strcmp(p, "_close") == 0 || strcmp(p, "_skip") == 0) && number < 65536)
            return (int)number;
    }
    /* "7", "error7", "code_7", "error-7": the trailing number. */
    n = strlen(text);
    while (n > 0 && text[n - 1] >= '0' && text[n - 1] <= '9') n--;
    if (text[n] != '\0' && parse_number(text + n, 65535, &code) == 0) return (int)code;
    return -1;
}

static int failures = 0, passed = 0, skipped = 0;

static void fail(long line, const struct vector *v, const char *why) {
    printf("FAIL line %ld %s %s: %s\n", line, v->klass, v->name, why);
    failures++;
}

static void check_field(long line, const struct vector *v, const char *key,
                        unsigned long long got, int *ok) {
    const char *text = value_of(v, key);
    unsigned long long want;
    char why[160];
    if (text == NULL) return;
    if (parse_number(text, 0xFFFFFFFFFFFFFFFFull, &want) < 0) {
        snprintf(why, sizeof why, "%s=%s is not a decimal number", key, text);
        fail(line, v, why);
        *ok = 0;
    } else if (want != got) {
        snprintf(why, sizeof why, "%s: decoded %llu, the vector says %llu", key, got, want);
        fail(line, v, why);
        *ok = 0;
    }
}

static void run_vector(long line, const struct vector *v) {
    const char *frame_hex = value_of(v, "frame");
    const char *bound_text = value_of(v, "bound");
    unsigned long long bound = ACGI_PAYLOAD_BYTES_MAX_CEILING;
    uint8_t *frame = NULL;
    size_t frame_len;
    acgi_header h;
    enum acgi_frame_check check;
    char why[256];
    int ok = 1;

    if (strcmp(v->klass, "valid") != 0 && strcmp(v->klass, "malformed") != 0 &&
        strcmp(v->klass, "too_large") != 0 && strcmp(v->klass, "caller_refused") != 0) {
        skipped++; /* a class this reader does not know */
        return;
    }
    if (frame_hex == NULL || parse_hex(frame_hex, &frame, &frame_len) < 0) {
        fail(line, v, "missing or bad frame= hex");
        free(frame);
        return;
    }
    if (bound_text != NULL && parse_number(bound_text, 0xFFFFFFFFull, &bound) < 0) {
        fail(line, v, "bound= is not a u32");
        free(frame);
        return;
    }
    memset(&h, 0, sizeof h);
    check = acgi_header_decode(frame, frame_len, (uint32_t)bound, &h);

    if (strcmp(v->klass, "valid") == 0) {
        const char *payload_hex = value_of(v, "payload");
        uint8_t *payload = NULL, encoded[ACGI_HEADER_BYTES];
        size_t payload_len = 0;
        if (check != ACGI_FRAME_OK) {
            snprintf(why, sizeof why, "decoding failed the %s check", acgi_frame_check_name(check));
            fail(line, v, why);
            free(frame);
            return;
        }
        check_field(line, v, "kind", h.kind, &ok);
        check_field(line, v, "flags", h.flags, &ok);
        check_field(line, v, "code", h.code, &ok);
        check_field(line, v, "service", h.service_id, &ok);
        check_field(line, v, "len", h.payload_len, &ok);
        check_field(line, v, "id", h.request_id, &ok);
        if (frame_len != ACGI_HEADER_BYTES + (size_t)h.payload_len) {
            snprintf(why, sizeof why, "frame is %zu bytes, header + payload_len is %zu", frame_len,
                     ACGI_HEADER_BYTES + (size_t)h.payload_len);
            fail(line, v, why);
            ok = 0;
        }
        if (payload_hex != NULL) {
            if (parse_hex(payload_hex, &payload, &payload_len) < 0) {
                fail(line, v, "bad payload= hex");
                ok = 0;
            } else if (payload_len != frame_len - ACGI_HEADER_BYTES ||
                       (payload_len > 0 &&
                        memcmp(payload, frame + ACGI_HEADER_BYTES, payload_len) != 0)) {
                fail(line, v, "the frame's payload is not payload=");
                ok = 0;
            }
            free(payload);
        }
        acgi_header_encode(&h, encoded);
        if (memcmp(encoded, frame, ACGI_HEADER_BYTES) != 0) {
            fail(line, v, "encoding the decoded header does not give the frame's header bytes");
            ok = 0;
        }
    } else if (strcmp(v->klass, "malformed") == 0) {
        const char *want = value_of(v, "check");
        if (want == NULL) {
            fail(line, v, "no check=");
            ok = 0;
        } else if (strcmp(want, acgi_frame_check_name(check)) != 0) {
            snprintf(why, sizeof why, "expected the %s check to fail first, got %s", want,
                     acgi_frame_check_name(check));
            fail(line, v, why);
            ok = 0;
        }
    } else if (strcmp(v->klass, "too_large") == 0) {
        if (bound_text == NULL) {
            fail(line, v, "no bound=");
            ok = 0;
        } else if (check != ACGI_FRAME_TOO_LARGE) {
            snprintf(why, sizeof why, "expected too_large at bound %llu, got %s", bound,
                     acgi_frame_check_name(check));
            fail(line, v, why);
            ok = 0;
        }
    } else { /* caller_refused */
        const char *want = value_of(v, "caller");
        int reaction, code;
        if (check != ACGI_FRAME_OK) {
            snprintf(why, sizeof why, "header should be valid, failed the %s check",
                     acgi_frame_check_name(check));
            fail(line, v, why);
            free(frame);
            return;
        }
        reaction = acgi_caller_frame_reaction(
            &h, bound_text != NULL ? (uint32_t)bound : ACGI_PAYLOAD_BYTES_MAX_DEFAULT);
        code = want != NULL ? reaction_code(want) : -1;
        if (want != NULL && code < 0) {
            printf("SKIP line %ld %s %s: unknown caller reaction %s\n", line, v->klass, v->name,
                   want);
            skipped++;
            free(frame);
            return;
        }
        if (reaction == 0 && code == ACGI_CODE_UNKNOWN_SERVICE) {
            /* Which services exist is the bridge's table, not the header's. */
            printf("SKIP line %ld %s %s: unknown service is decided by the bridge's table\n",
                   line, v->klass, v->name);
            skipped++;
            free(frame);
            return;
        }
        if (reaction == 0) {
            fail(line, v, "this SDK would let a caller send it");
            ok = 0;
        } else if (want != NULL && reaction != code) {
            snprintf(why, sizeof why, "the bridge answers error %d (%s), the vector says %s",
                     reaction, acgi_code_name(reaction), want);
            fail(line, v, why);
            ok = 0;
        }
    }
    if (ok) passed++;
    free(frame);
}

int main(int argc, char **argv) {
    FILE *file;
    char *text = NULL;
    size_t cap = 0;
    ssize_t got;
    long line = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: vectors FILE\n");
        return 2;
    }
    file = fopen(argv[1], "r");
    if (file == NULL) {
        perror(argv[1]);
        return 2;
    }
    while ((got = getline(&text, &cap, file)) != -1) {
        struct vector v;
        char *field, *save = NULL;
        line++;
        while (got > 0 && (text[got - 1] == '\n' || text[got - 1] == '\r')) text[--got] = '\0';
        if (got == 0 || text[0] == '#') continue;
        memset(&v, 0, sizeof v);
        for (field = strtok_r(text, " ", &save); field != NULL;
             field = strtok_r(NULL, " ", &save)) {
            char *eq;
            if (v.klass == NULL) {
                v.klass = field;
            } else if (v.name == NULL) {
                v.name = field;
            } else if ((eq = strchr(field, '=')) != NULL && v.count < KEYS_MAX) {
                *eq = '\0';
                v.keys[v.count] = field;
                v.values[v.count] = eq + 1;
                v.count++;
            }
        }
        if (v.klass == NULL) continue; /* a line of spaces */
        if (v.name == NULL) v.name = "(unnamed)";
        run_vector(line, &v);
    }
    free(text);
    fclose(file);
    printf("vectors %s: %d passed, %d failed, %d skipped\n", argv[1], passed, failures, skipped);
    if (passed + failures == 0) {
        printf("FAIL: %s holds no vector this reader knows\n", argv[1]);
        return 1;
    }
    return failures > 0 ? 1 : 0;
}
