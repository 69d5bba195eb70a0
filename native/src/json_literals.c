/* What cJSON does not keep: how a number was written. cJSON stores every number as a double, so
 * `3.0` and `3` parse alike; Python's json gives the first a float, which the runtime refuses where a
 * token id is due (edge_lora/adapter_format.py). This reads the literals of one top-level member. */
#include <stdbool.h>
#include <string.h>

#include "el_internal.h"

static const char *skip_space(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* Past a string literal starting at its opening quote (escapes skipped whole). */
static const char *skip_string(const char *p) {
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1]) p++;
    return *p ? p + 1 : p;
}

/* Past one value (a string, an object or array with everything inside, or a bare literal); where
 * `integers` is set, clears it on a number with a fraction or an exponent. */
static const char *skip_value(const char *p, bool *integers) {
    int depth = 0;
    do {
        p = skip_space(p);
        if (*p == '"') {
            p = skip_string(p);
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            depth--;
            p++;
        } else if (*p == ',' || *p == ':') {
            p++;
        } else if (*p) {
            const char *start = p;
            while (*p && !strchr(" \t\n\r,:]}", *p)) p++;
            bool number = *start == '-' || (*start >= '0' && *start <= '9');
            for (const char *c = start; integers && number && c < p; c++)
                if (*c == '.' || *c == 'e' || *c == 'E') *integers = false;
        }
    } while (*p && depth > 0);
    return p;
}

bool el_json_member_integers(const char *text, const char *key) {
    const char *p = skip_space(text);
    if (*p != '{') return true;
    size_t key_len = strlen(key);
    p++;
    while (*(p = skip_space(p)) == '"') {
        const char *name = p + 1, *after = skip_string(p);
        bool match = (size_t)(after - name - 1) == key_len && strncmp(name, key, key_len) == 0;
        p = skip_space(after);
        if (*p != ':') return true;
        bool integers = true;
        p = skip_value(p + 1, match ? &integers : NULL);
        if (match && !integers) return false; /* a repeated key: cJSON takes the first, so check each */
        p = skip_space(p);
        if (*p == ',') p++;
    }
    return true;
}
