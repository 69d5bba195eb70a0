/* One-line errors, per thread: "PATH: what is wrong (hint: what to do)", as edge_lora/errors.py. */
#include <stdio.h>
#include <string.h>

#include "el_internal.h"

static _Thread_local char last_error[2048];

const char *el_last_error(void) { return last_error; }

void el_clear_error(void) { last_error[0] = '\0'; }

el_status el_fail(el_status status, const char *path, const char *hint, const char *fmt, ...) {
    char message[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    int n = path ? snprintf(last_error, sizeof last_error, "%s: %s", path, message)
                 : snprintf(last_error, sizeof last_error, "%s", message);
    if (hint && n >= 0 && (size_t)n < sizeof last_error)
        snprintf(last_error + n, sizeof last_error - (size_t)n, " (hint: %s)", hint);
    for (char *c = last_error; *c; c++) /* one line, whatever a path or a foreign message holds */
        if (*c == '\n' || *c == '\r') *c = ' ';
    return status;
}

const char *el_quote(const char *text, char *buf, size_t size) {
    /* Python's repr() of a str: single quotes unless the text holds one and no double quote */
    char q = (strchr(text, '\'') && !strchr(text, '"')) ? '"' : '\'';
    size_t o = 0;
    if (size < 3) return "";
    buf[o++] = q;
    for (const char *c = text; *c && o + 3 < size; c++) {
        if (*c == q || *c == '\\') {
            buf[o++] = '\\';
            buf[o++] = *c;
        } else if (*c == '\n') {
            buf[o++] = '\\';
            buf[o++] = 'n';
        } else {
            buf[o++] = *c;
        }
    }
    buf[o++] = q;
    buf[o] = '\0';
    return buf;
}

const char *el_status_name(el_status status) {
    switch (status) {
    case EL_OK: return "ok";
    case EL_ERR_ARGUMENT: return "argument";
    case EL_ERR_IO: return "io";
    case EL_ERR_BUNDLE: return "bundle";
    case EL_ERR_HASH: return "hash";
    case EL_ERR_SIGNATURE: return "signature";
    case EL_ERR_INCOMPATIBLE: return "incompatible";
    case EL_ERR_NOT_FOUND: return "not_found";
    case EL_ERR_EXISTS: return "exists";
    case EL_ERR_BACKEND: return "backend";
    case EL_ERR_CANCELLED: return "cancelled";
    case EL_ERR_MEMORY: return "memory";
    case EL_ERR_CONTEXT: return "context";
    }
    return "unknown";
}
