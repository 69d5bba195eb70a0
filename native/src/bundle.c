/* bundle.json: parsed and checked as edge_lora/bundle.py does, with the same messages. */
#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "el_internal.h"

#define FORMAT "edge-lora-bundle"
#define FORMAT_VERSION 1
#define REEXPORT "re-export the bundle"

static bool valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || i + len > n) return false;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80) return false;
        i += len;
    }
    return true;
}

static char *dup_string(const cJSON *item) {
    return cJSON_IsString(item) && item->valuestring ? el_strdup(item->valuestring) : NULL;
}

/* Python's repr() of a parsed JSON value, as the Python runtime's messages show it (bounded). */
static void json_repr(const cJSON *item, char *buf, size_t size) {
    size_t o = 0;
    buf[0] = '\0';
#define PUT(...) (o += (size_t)snprintf(buf + o, o < size ? size - o : 0, __VA_ARGS__), o = o < size ? o : size - 1)
    if (!item || cJSON_IsNull(item)) {
        PUT("None");
    } else if (cJSON_IsBool(item)) {
        PUT("%s", cJSON_IsTrue(item) ? "True" : "False");
    } else if (cJSON_IsString(item)) {
        char q[512];
        PUT("%s", el_quote(item->valuestring, q, sizeof q));
    } else if (cJSON_IsNumber(item)) {
        double v = item->valuedouble;
        if (v == (double)(long long)v && v > -1e15 && v < 1e15) PUT("%lld", (long long)v);
        else PUT("%.17g", v);
    } else { /* a list or a dict: its items in order */
        bool dict = cJSON_IsObject(item);
        PUT("%c", dict ? '{' : '[');
        const cJSON *child;
        cJSON_ArrayForEach(child, item) {
            char inner[256];
            if (child != item->child) PUT(", ");
            if (dict) {
                char q[256];
                PUT("%s: ", el_quote(child->string, q, sizeof q));
            }
            json_repr(child, inner, sizeof inner);
            PUT("%s", inner);
        }
        PUT("%c", dict ? '}' : ']');
    }
#undef PUT
}

static bool is_int(const cJSON *item) {
    return cJSON_IsNumber(item) && item->valuedouble == (double)(long long)item->valuedouble;
}

el_status el_bundle_resolve(const el_bundle *b, const char *rel, char **out) {
    char q[600];
    *out = NULL;
    if (!rel || !*rel)
        return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: file entry %s is not a relative path",
                       rel ? "''" : "None");
    bool escapes = rel[0] == '/' || strchr(rel, '\\') != NULL;
    for (const char *part = rel; !escapes && part;) { /* a ".." component anywhere */
        const char *end = strchr(part, '/');
        size_t len = end ? (size_t)(end - part) : strlen(part);
        escapes = len == 2 && part[0] == '.' && part[1] == '.';
        part = end ? end + 1 : NULL;
    }
    if (escapes)
        return el_fail(EL_ERR_BUNDLE, b->manifest, "a bundle only references files inside its own folder",
                       "bundle.json: file entry %s points outside the bundle", el_quote(rel, q, sizeof q));
    char *full = el_join(b->root, rel);
    if (!full) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    char real_root[PATH_MAX], real_full[PATH_MAX];
    bool inside = true;
    if (realpath(full, real_full) && realpath(b->root, real_root)) {
        size_t n = strlen(real_root);
        inside = strncmp(real_full, real_root, n) == 0 && (real_full[n] == '/' || real_full[n] == '\0');
    } else {
        struct stat st; /* missing: refused later as missing, unless it is a dangling link */
        inside = !(lstat(full, &st) == 0 && S_ISLNK(st.st_mode));
    }
    if (!inside) {
        free(full);
        return el_fail(EL_ERR_BUNDLE, b->manifest, "copy the bundle with its files, not links to them",
                       "bundle.json: file entry %s is a link that leaves the bundle", el_quote(rel, q, sizeof q));
    }
    *out = full;
    return EL_OK;
}

/* el_bundle_resolve for an entry of bundle.json as parsed: a value that is no string is named as it is. */
static el_status resolve_item(const el_bundle *b, const cJSON *item) {
    char *full = NULL;
    el_status st;
    if (cJSON_IsString(item) && item->valuestring[0]) {
        st = el_bundle_resolve(b, item->valuestring, &full);
    } else {
        char repr[512];
        json_repr(item, repr, sizeof repr);
        st = el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: file entry %s is not a relative path", repr);
    }
    free(full);
    return st;
}

const el_adapter_entry *el_bundle_adapter(const el_bundle *b, const char *name) {
    for (int i = 0; i < b->n_adapters; i++)
        if (strcmp(b->adapters[i].name, name) == 0) return &b->adapters[i];
    return NULL;
}

const el_file_record *el_bundle_file(const el_bundle *b, const char *rel) {
    for (int i = 0; i < b->n_files; i++)
        if (strcmp(b->files[i].rel, rel) == 0) return &b->files[i];
    return NULL;
}

el_status el_bundle_check_digest(const el_bundle *b, const char *rel, const char *sha256) {
    char q[600];
    const el_file_record *rec = el_bundle_file(b, rel);
    if (!rec || !rec->sha256[0])
        return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json records no hash for %s",
                       el_quote(rel, q, sizeof q));
    if (strcmp(rec->sha256, sha256) != 0)
        return el_fail(EL_ERR_HASH, b->root, "copy the bundle again from a trusted source",
                       "%s does not match its SHA-256 in bundle.json (modified or corrupt)", el_quote(rel, q, sizeof q));
    return EL_OK;
}

static el_status require(const el_bundle *b, const char *rel, char **full) {
    char q[600];
    el_status st = el_bundle_resolve(b, rel, full);
    if (st) return st;
    if (!el_is_file(*full)) {
        free(*full);
        *full = NULL;
        return el_fail(EL_ERR_BUNDLE, b->root, REEXPORT, "bundle file %s is missing or not a file",
                       el_quote(rel, q, sizeof q));
    }
    return EL_OK;
}

el_status el_bundle_read_verified(const el_bundle *b, const char *rel, el_bytes *out) {
    char *full = NULL;
    el_status st = require(b, rel, &full);
    if (st) return st;
    const el_file_record *rec = el_bundle_file(b, rel);
    size_t limit = rec && rec->bytes >= 0 ? (size_t)rec->bytes : SIZE_MAX;
    if (el_file_size(full) > (int64_t)limit) { /* never read more than bundle.json vouches for */
        free(full);
        return el_bundle_check_digest(b, rel, "");
    }
    if (!rec || !rec->sha256[0]) { /* refused before the file is read */
        free(full);
        return el_bundle_check_digest(b, rel, "");
    }
    st = el_read_file(full, limit, NULL, out);
    free(full);
    if (st) return st;
    char hex[EL_SHA256_HEX];
    el_sha256_hex(out->data, out->size, hex);
    st = el_bundle_check_digest(b, rel, hex);
    if (st) el_bytes_free(out);
    return st;
}

static el_status bad_key(const el_bundle *b, const char *key, const char *kind) {
    return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: key '%s' is missing or not a %s", key, kind);
}

static el_status bad_config(const el_bundle *b, const char *what) {
    return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: bad model config (%s)", what);
}

#define BAD_CONFIG "the model config is corrupt; use the config.json the model was trained with"

/* edge_lora/bundle.py's REQUIRED_MODEL_KEYS, then ModelConfig.validate's checks, in their order. */
static el_status parse_model(el_bundle *b, const cJSON *model) {
    static const char *required[] = {"architecture", "vocab_size", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"};
    enum { N = sizeof required / sizeof *required };
    char what[512] = "missing ";
    size_t o = strlen(what);
    int n_missing = 0;
    for (int i = 0; i < N; i++)
        if (!cJSON_GetObjectItemCaseSensitive(model, required[i]))
            o += (size_t)snprintf(what + o, sizeof what - o, "%s%s", n_missing++ ? ", " : "", required[i]);
    if (n_missing) return bad_config(b, what);
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(model, "architecture");
    if (!cJSON_IsString(arch)) return bad_config(b, "architecture is not a string");
    int64_t v[N];
    for (int i = 1; i < N; i++) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(model, required[i]);
        if (!is_int(item)) {
            snprintf(what, sizeof what, "%s is not an integer", required[i]);
            return bad_config(b, what);
        }
        v[i] = (int64_t)item->valuedouble;
    }
    for (int i = 1; i < N; i++)
        if (v[i] <= 0)
            return el_fail(EL_ERR_BUNDLE, b->manifest, BAD_CONFIG, "config value %s must be positive", required[i]);
    if (v[5] % v[6])
        return el_fail(EL_ERR_BUNDLE, b->manifest, BAD_CONFIG, "num_attention_heads must be a multiple of num_key_value_heads");
    if (v[7] % 2) return el_fail(EL_ERR_BUNDLE, b->manifest, BAD_CONFIG, "head_dim must be even for rotary embeddings");
    for (int i = 1; i < N; i++)
        if (v[i] > INT32_MAX) {
            snprintf(what, sizeof what, "%s is too large", required[i]);
            return bad_config(b, what);
        }
    b->architecture = el_strdup(arch->valuestring);
    b->vocab_size = (int32_t)v[1];
    b->hidden_size = (int32_t)v[2];
    const cJSON *pos = cJSON_GetObjectItemCaseSensitive(model, "max_position_embeddings");
    b->max_position_embeddings = is_int(pos) && pos->valuedouble > 0 && pos->valuedouble < INT32_MAX
                                     ? (int32_t)pos->valuedouble
                                     : 2048;
    b->tie_word_embeddings = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "tie_word_embeddings"));
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(model, "eos_token_id"), *e;
    b->n_eos = 0;
    if (is_int(eos)) b->eos[b->n_eos++] = (int32_t)eos->valuedouble;
    if (cJSON_IsArray(eos))
        cJSON_ArrayForEach(e, eos) if (is_int(e) && b->n_eos < 16) b->eos[b->n_eos++] = (int32_t)e->valuedouble;
    return b->architecture ? EL_OK : el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
}

/* The shapes edge_lora/bundle.py checks before any path: backends list objects, adapters are objects. */
static el_status check_shapes(const el_bundle *b, const cJSON *backends, const cJSON *adapters) {
    const cJSON *list, *e;
    cJSON_ArrayForEach(list, backends) {
        bool ok = cJSON_IsArray(list);
        if (ok) cJSON_ArrayForEach(e, list) ok &= cJSON_IsObject(e);
        if (!ok)
            return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: each backend lists entries as objects");
    }
    char q[600];
    cJSON_ArrayForEach(e, adapters) if (!cJSON_IsObject(e)) return el_fail(
        EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json: adapter %s is not an object", el_quote(e->string, q, sizeof q));
    return EL_OK;
}

/* Every file bundle.json names stays inside the bundle: the tokenizer, the files, the backends' models,
 * the adapters' files (in the entry's own key order), as edge_lora/bundle.py checks them. */
static el_status check_paths(const el_bundle *b, const cJSON *raw) {
    el_status st = resolve_item(b, cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(raw, "tokenizer"),
                                                                     "tokenizer"));
    const cJSON *e, *list, *k;
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(raw, "files")) {
        if (st) return st;
        char *full = NULL;
        st = el_bundle_resolve(b, e->string, &full);
        free(full);
    }
    cJSON_ArrayForEach(list, cJSON_GetObjectItemCaseSensitive(raw, "backends")) {
        cJSON_ArrayForEach(e, list) {
            if (st) return st;
            st = resolve_item(b, cJSON_GetObjectItemCaseSensitive(e, "model"));
        }
    }
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(raw, "adapters")) {
        cJSON_ArrayForEach(k, e) {
            if (st) return st;
            if (strcmp(k->string, "source") == 0 || strcmp(k->string, "onnx") == 0 || strcmp(k->string, "gguf") == 0)
                st = resolve_item(b, k);
        }
        const cJSON *variants = cJSON_GetObjectItemCaseSensitive(e, "gguf_variants"); /* last, as adapter_files() */
        if (cJSON_IsObject(variants)) {
            cJSON_ArrayForEach(k, variants) if (!st) st = resolve_item(b, k);
        } else if (variants && !st) {
            st = resolve_item(b, variants);
        }
    }
    return st;
}

static el_status copy_entries(el_bundle *b, const cJSON *raw) {
    const cJSON *gguf = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(raw, "backends"), "gguf");
    const cJSON *adapters = cJSON_GetObjectItemCaseSensitive(raw, "adapters");
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(raw, "files");
    size_t n_gguf = (size_t)cJSON_GetArraySize(gguf), n_adapters = (size_t)cJSON_GetArraySize(adapters);
    b->gguf_quants = calloc(n_gguf + 1, sizeof(char *));
    b->gguf_models = calloc(n_gguf + 1, sizeof(char *));
    b->adapters = calloc(n_adapters + 1, sizeof *b->adapters);
    b->files = calloc((size_t)cJSON_GetArraySize(files) + 1, sizeof *b->files);
    if (!b->gguf_quants || !b->gguf_models || !b->adapters || !b->files)
        return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, gguf) {
        b->gguf_quants[b->n_gguf] = dup_string(cJSON_GetObjectItemCaseSensitive(e, "quant"));
        b->gguf_models[b->n_gguf++] = dup_string(cJSON_GetObjectItemCaseSensitive(e, "model"));
    }
    cJSON_ArrayForEach(e, adapters) {
        el_adapter_entry *a = &b->adapters[b->n_adapters++];
        a->name = el_strdup(e->string);
        a->source = dup_string(cJSON_GetObjectItemCaseSensitive(e, "source"));
        a->gguf = dup_string(cJSON_GetObjectItemCaseSensitive(e, "gguf"));
        a->gguf_merged = dup_string(cJSON_GetObjectItemCaseSensitive(e, "gguf_merged"));
        const cJSON *variants = cJSON_GetObjectItemCaseSensitive(e, "gguf_variants"), *v;
        size_t n_variants = (size_t)cJSON_GetArraySize(variants);
        a->variant_quants = calloc(n_variants + 1, sizeof(char *));
        a->variant_files = calloc(n_variants + 1, sizeof(char *));
        if (!a->variant_quants || !a->variant_files) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        cJSON_ArrayForEach(v, variants) {
            a->variant_quants[a->n_variants] = el_strdup(v->string);
            a->variant_files[a->n_variants++] = dup_string(v);
        }
    }
    cJSON_ArrayForEach(e, files) {
        el_file_record *f = &b->files[b->n_files++];
        f->rel = el_strdup(e->string);
        f->bytes = -1;
        const cJSON *sha = cJSON_GetObjectItemCaseSensitive(e, "sha256");
        const cJSON *bytes = cJSON_GetObjectItemCaseSensitive(e, "bytes");
        if (cJSON_IsString(sha) && strlen(sha->valuestring) < EL_SHA256_HEX) strcpy(f->sha256, sha->valuestring);
        else if (cJSON_IsString(sha)) strcpy(f->sha256, "(too long)"); /* never equal to a digest */
        if (is_int(bytes) && bytes->valuedouble >= 0) f->bytes = (int64_t)bytes->valuedouble;
    }
    return EL_OK;
}

/* The deepest nesting of arrays and objects (outside strings): Python's parser gives up with a
 * RecursionError near 1000 levels, cJSON at CJSON_NESTING_LIMIT (1000). */
static int nesting_depth(const char *text, size_t size) {
    int depth = 0, deepest = 0;
    bool in_string = false;
    for (size_t i = 0; i < size; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > deepest) deepest = depth;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return deepest;
}

el_status el_bundle_parse(const char *root, const char *text, size_t size, el_bundle *b) {
    memset(b, 0, sizeof *b);
    b->root = el_strdup(root);
    b->manifest = el_join(root, "bundle.json");
    if (!b->root || !b->manifest) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    if (!valid_utf8((const unsigned char *)text, size))
        return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json is not valid JSON (UnicodeDecodeError)");
    cJSON *raw = cJSON_ParseWithLengthOpts(text, size + 1, NULL, true); /* + its terminator: nothing after the value */
    if (!raw)
        return el_fail(EL_ERR_BUNDLE, b->manifest, REEXPORT, "bundle.json is not valid JSON (%s)",
                       nesting_depth(text, size) >= 1000 ? "RecursionError" : "JSONDecodeError");
    el_status st = EL_OK;
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(raw, "format");
    if (!cJSON_IsObject(raw) || !cJSON_IsString(format) || strcmp(format->valuestring, FORMAT) != 0) {
        st = el_fail(EL_ERR_BUNDLE, b->manifest, "pass the folder `edge-lora export` wrote",
                     "bundle.json is not an edge-lora bundle manifest");
        goto done;
    }
    const cJSON *version = cJSON_GetObjectItemCaseSensitive(raw, "format_version");
    if (!(is_int(version) || cJSON_IsBool(version)) || (is_int(version) && version->valuedouble > FORMAT_VERSION)) {
        char repr[128];
        json_repr(version, repr, sizeof repr);
        st = el_fail(EL_ERR_BUNDLE, b->manifest, "upgrade edge-lora",
                     "bundle format version %s is newer than this edge-lora reads (%d)", repr, FORMAT_VERSION);
        goto done;
    }
    struct { const char *key; bool object; } keys[] = {{"model", true}, {"base_fingerprint", false},
        {"tokenizer", true}, {"backends", true}, {"adapters", true}, {"files", true}};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(raw, keys[i].key);
        if (keys[i].object ? !cJSON_IsObject(v) : !cJSON_IsString(v)) {
            st = bad_key(b, keys[i].key, keys[i].object ? "dict" : "str");
            goto done;
        }
    }
    if ((st = parse_model(b, cJSON_GetObjectItemCaseSensitive(raw, "model")))) goto done;
    b->base_fingerprint = dup_string(cJSON_GetObjectItemCaseSensitive(raw, "base_fingerprint"));
    const cJSON *backends = cJSON_GetObjectItemCaseSensitive(raw, "backends");
    if ((st = check_shapes(b, backends, cJSON_GetObjectItemCaseSensitive(raw, "adapters")))) goto done;
    if ((st = check_paths(b, raw))) goto done;
    st = copy_entries(b, raw);
done:
    cJSON_Delete(raw);
    return st;
}

el_status el_bundle_open(const char *root, el_bundle *b) {
    memset(b, 0, sizeof *b);
    if (!el_is_dir(root))
        return el_fail(EL_ERR_BUNDLE, root, "pass the folder `edge-lora export --out` wrote", "not a bundle directory");
    char *manifest = el_join(root, "bundle.json");
    if (!manifest) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    el_status st = EL_OK;
    if (!el_is_file(manifest)) {
        st = el_fail(EL_ERR_BUNDLE, root, "run `edge-lora export` again",
                     "no bundle.json: not a bundle, or its export did not finish");
    } else {
        el_bytes text;
        st = el_read_file(manifest, EL_MAX_MANIFEST_BYTES, NULL, &text);
        if (st == EL_ERR_IO && el_file_size(manifest) > (int64_t)EL_MAX_MANIFEST_BYTES)
            st = el_fail(EL_ERR_BUNDLE, manifest, REEXPORT, "bundle.json is implausibly large");
        if (!st) {
            st = el_bundle_parse(root, (const char *)text.data, text.size, b);
            el_bytes_free(&text);
        }
    }
    free(manifest);
    return st;
}

void el_bundle_free(el_bundle *b) {
    free(b->root);
    free(b->manifest);
    free(b->base_fingerprint);
    free(b->architecture);
    for (int i = 0; i < b->n_gguf; i++) {
        free(b->gguf_quants[i]);
        free(b->gguf_models[i]);
    }
    free(b->gguf_quants);
    free(b->gguf_models);
    for (int i = 0; i < b->n_adapters; i++) {
        free(b->adapters[i].name);
        free(b->adapters[i].source);
        free(b->adapters[i].gguf);
        free(b->adapters[i].gguf_merged);
        for (int k = 0; k < b->adapters[i].n_variants; k++) {
            free(b->adapters[i].variant_quants[k]);
            free(b->adapters[i].variant_files[k]);
        }
        free(b->adapters[i].variant_quants);
        free(b->adapters[i].variant_files);
    }
    free(b->adapters);
    for (int i = 0; i < b->n_files; i++) free(b->files[i].rel);
    free(b->files);
    memset(b, 0, sizeof *b);
}
