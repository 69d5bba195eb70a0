/* An edge-lora adapter file (safetensors, docs/adapter-format.md): its header and metadata checked
 * as edge_lora/adapter_format.py and edge_lora/token_rows.py check them, and its token rows (new
 * tokens, replaced base rows) read as float32. The LoRA tensors themselves reach llama.cpp through
 * the bundle's GGUF LoRA; here only their count matters. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "el_internal.h"

#define REMAKE "the file is corrupt or not written by edge-lora: train or export the adapter again"
#define CORRUPT "the file is corrupt or truncated: copy or export it again"
#define FORMAT_VERSION 1
#define MAX_HEADER (100u * 1000u * 1000u)
#define INVOCATION_KEY "alora_invocation_tokens"
#define MAGNITUDE ".lora_magnitude"

static const char *ROW_TENSORS[4] = {"model.embed_tokens.added_rows", "lm_head.added_rows",
                                     "model.embed_tokens.replaced_rows", "lm_head.replaced_rows"};

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) { /* zero or subnormal */
        float v = ldexpf((float)mant, -24);
        return sign ? -v : v;
    }
    bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* One row tensor [rows x width] as float32 (malloc'd), after its header entry is checked. */
static el_status read_rows(const char *path, const cJSON *info, const uint8_t *data, size_t data_size,
                           const char *name, int expected_rows, int32_t hidden, float **out) {
    char q[300];
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(info, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(info, "shape");
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(info, "data_offsets");
    if (!cJSON_IsString(dtype) || !cJSON_IsArray(shape) || cJSON_GetArraySize(offsets) != 2)
        return el_fail(EL_ERR_INCOMPATIBLE, path, CORRUPT, "not a valid safetensors header: tensor %s",
                       el_quote(name, q, sizeof q));
    size_t width = strcmp(dtype->valuestring, "F32") == 0 ? 4 : 2;
    bool bf16 = strcmp(dtype->valuestring, "BF16") == 0;
    if (width == 2 && !bf16 && strcmp(dtype->valuestring, "F16") != 0)
        return el_fail(EL_ERR_INCOMPATIBLE, path, "store LoRA weights as F32, F16 or BF16",
                       "tensor %s has dtype %s; adapters hold float tensors", el_quote(name, q, sizeof q),
                       dtype->valuestring);
    double rows = cJSON_GetArraySize(shape) == 2 ? cJSON_GetArrayItem(shape, 0)->valuedouble : -1;
    double cols = cJSON_GetArraySize(shape) == 2 ? cJSON_GetArrayItem(shape, 1)->valuedouble : -1;
    if (rows != expected_rows)
        return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE,
                       "%s does not hold one row for each of the %d tokens the metadata lists", name, expected_rows);
    if (cols != hidden)
        return el_fail(EL_ERR_INCOMPATIBLE, path, "wrong base model?", "%s [%d, %.0f] do not fit hidden size %d", name,
                       expected_rows, cols, hidden);
    double begin = cJSON_GetArrayItem(offsets, 0)->valuedouble, end = cJSON_GetArrayItem(offsets, 1)->valuedouble;
    size_t n = (size_t)expected_rows * (size_t)hidden;
    if (begin < 0 || end > (double)data_size || end - begin != (double)(n * width))
        return el_fail(EL_ERR_INCOMPATIBLE, path, CORRUPT,
                       "not a valid safetensors file: tensor %s lies outside the file", el_quote(name, q, sizeof q));
    float *rows_out = malloc((n ? n : 1) * sizeof(float));
    if (!rows_out) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    const uint8_t *src = data + (size_t)begin;
    for (size_t i = 0; i < n; i++) {
        if (width == 4) {
            memcpy(&rows_out[i], src + 4 * i, 4);
        } else {
            uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
            if (bf16) {
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&rows_out[i], &bits, 4);
            } else {
                rows_out[i] = half_to_float(h);
            }
        }
    }
    *out = rows_out;
    return EL_OK;
}

static el_status parse_metadata(const char *path, const cJSON *header, int32_t vocab_size, el_adapter_meta *m,
                                cJSON **meta_out) {
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(header, "__metadata__");
    const cJSON *raw = cJSON_GetObjectItemCaseSensitive(md, "edge_lora");
    if (!cJSON_IsString(raw)) {
        bool peft = false;
        const cJSON *t;
        cJSON_ArrayForEach(t, header) peft |= t->string && strncmp(t->string, "base_model.", 11) == 0;
        return el_fail(EL_ERR_INCOMPATIBLE, path,
                       peft ? "this looks like a PEFT file: import its directory with `edge-lora export --adapter DIR`"
                            : "make it with `edge-lora train` or import a PEFT directory",
                       "not an edge-lora adapter (no edge_lora metadata)");
    }
    cJSON *meta = cJSON_Parse(raw->valuestring);
    *meta_out = meta;
    if (!meta) return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "adapter metadata is not valid JSON");
    const cJSON *modules = cJSON_GetObjectItemCaseSensitive(meta, "modules");
    const cJSON *base = cJSON_GetObjectItemCaseSensitive(meta, "base");
    if (!cJSON_IsObject(meta) || !cJSON_IsObject(modules) || !cJSON_IsObject(base))
        return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "adapter metadata lacks 'modules' or 'base'");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(meta, "added_tokens");
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
        return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "adapter metadata 'added_tokens' has the wrong type");
    const cJSON *added_list = cJSON_IsArray(added) ? added : NULL, *t;
    cJSON_ArrayForEach(t, added_list) if (!cJSON_IsString(t)) return el_fail(
        EL_ERR_INCOMPATIBLE, path, REMAKE, "adapter metadata lists non-string module or token names");
    const cJSON *replaced = cJSON_GetObjectItemCaseSensitive(meta, "replaced_tokens");
    if (replaced && !cJSON_IsNull(replaced)) { /* ids written as integers: `3.0` is a float to Python */
        bool ok = cJSON_IsArray(replaced) && el_json_member_integers(raw->valuestring, "replaced_tokens");
        const cJSON *list = ok ? replaced : NULL;
        cJSON_ArrayForEach(t, list) {
            ok &= cJSON_IsNumber(t) && t->valuedouble == (double)(int64_t)t->valuedouble;
            for (const cJSON *u = t->next; ok && u; u = u->next) ok &= !(cJSON_IsNumber(u) && u->valuedouble == t->valuedouble);
        }
        if (!ok)
            return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE,
                           "adapter metadata 'replaced_tokens' is not a list of distinct token ids");
    }
    const cJSON *invocation = cJSON_GetObjectItemCaseSensitive(meta, INVOCATION_KEY);
    if (invocation && !cJSON_IsNull(invocation)) { /* activated adapter (aLoRA): non-negative base ids */
        bool ok = cJSON_IsArray(invocation) && cJSON_GetArraySize(invocation) > 0 &&
                  el_json_member_integers(raw->valuestring, INVOCATION_KEY);
        const cJSON *list = ok ? invocation : NULL;
        cJSON_ArrayForEach(t, list) ok &= cJSON_IsNumber(t) && t->valuedouble >= 0 && t->valuedouble < 9e15 &&
                                           t->valuedouble == (double)(int64_t)t->valuedouble;
        if (!ok)
            return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE,
                           "adapter metadata '" INVOCATION_KEY "' is not a non-empty list of token ids");
        m->n_invocation = cJSON_GetArraySize(invocation);
        m->invocation = malloc((size_t)m->n_invocation * sizeof(int64_t));
        if (!m->invocation) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        int i = 0;
        cJSON_ArrayForEach(t, invocation) m->invocation[i++] = (int64_t)t->valuedouble;
    }
    const cJSON *fp = cJSON_GetObjectItemCaseSensitive(base, "fingerprint");
    if (fp && !cJSON_IsNull(fp) && !cJSON_IsString(fp))
        return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "adapter metadata base fingerprint is not a string");
    const cJSON *version = cJSON_GetObjectItemCaseSensitive(meta, "format_version");
    if (!cJSON_IsNumber(version) || version->valuedouble > FORMAT_VERSION)
        return el_fail(EL_ERR_INCOMPATIBLE, path, "upgrade edge-lora",
                       "adapter format version %s is not supported (this edge-lora reads <= %d)",
                       cJSON_IsNumber(version) ? "newer" : "None", FORMAT_VERSION);
    m->fingerprint = cJSON_IsString(fp) ? el_strdup(fp->valuestring) : NULL;
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(base, "architecture");
    m->architecture = el_strdup(cJSON_IsString(arch) ? arch->valuestring : "None");
    m->n_modules = cJSON_GetArraySize(modules);
    int n_added = cJSON_GetArraySize(added), n_replaced = cJSON_GetArraySize(replaced);
    m->rows.added_tokens = calloc((size_t)n_added + 1, sizeof(char *));
    m->rows.replaced = calloc((size_t)n_replaced + 1, sizeof(int32_t));
    if (!m->rows.added_tokens || !m->rows.replaced) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    char q[300];
    cJSON_ArrayForEach(t, added_list) {
        for (int i = 0; i < m->rows.n_added; i++)
            if (strcmp(m->rows.added_tokens[i], t->valuestring) == 0 || !*t->valuestring)
                return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "metadata lists new token %s twice or empty",
                               el_quote(t->valuestring, q, sizeof q));
        if (!*t->valuestring)
            return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "metadata lists new token '' twice or empty");
        m->rows.added_tokens[m->rows.n_added++] = el_strdup(t->valuestring);
    }
    const cJSON *replaced_list = cJSON_IsArray(replaced) ? replaced : NULL;
    cJSON_ArrayForEach(t, replaced_list) {
        if (t->valuedouble < 0)
            return el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "replaced token ids include a negative id");
        if (t->valuedouble >= vocab_size)
            return el_fail(EL_ERR_INCOMPATIBLE, path, "wrong base model?",
                           "replaced token ids [%.0f] are past the base vocabulary (%d tokens)", t->valuedouble,
                           vocab_size);
        m->rows.replaced[m->rows.n_replaced++] = (int32_t)t->valuedouble;
    }
    return EL_OK;
}

el_status el_adapter_parse(const char *path, const uint8_t *data, size_t size, int32_t vocab_size, int32_t hidden,
                           bool tied, el_adapter_meta *m) {
    memset(m, 0, sizeof *m);
    if (size < 8) return el_fail(EL_ERR_INCOMPATIBLE, path, CORRUPT, "not a valid safetensors file: too short");
    uint64_t n = le64(data);
    if (n > MAX_HEADER || n > size - 8)
        return el_fail(EL_ERR_INCOMPATIBLE, path, CORRUPT, "not a valid safetensors header: header too large");
    cJSON *header = cJSON_ParseWithLengthOpts((const char *)data + 8, (size_t)n, NULL, false);
    if (!cJSON_IsObject(header)) {
        cJSON_Delete(header);
        return el_fail(EL_ERR_INCOMPATIBLE, path, CORRUPT, "not a valid safetensors header: invalid JSON");
    }
    cJSON *meta = NULL;
    el_status st = parse_metadata(path, header, vocab_size, m, &meta);
    const uint8_t *body = data + 8 + n;
    size_t body_size = size - 8 - (size_t)n;
    int counts[4] = {m->rows.n_added, m->rows.n_added, m->rows.n_replaced, m->rows.n_replaced};
    float *tables[4] = {NULL, NULL, NULL, NULL};
    for (int k = 0; k < 4 && !st; k++) {
        const cJSON *info = cJSON_GetObjectItemCaseSensitive(header, ROW_TENSORS[k]);
        if (info) st = read_rows(path, info, body, body_size, ROW_TENSORS[k], counts[k], hidden, &tables[k]);
    }
    if (!st && ((m->rows.n_added && !tables[0]) || (m->rows.n_replaced && !tables[2])))
        st = el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE,
                     "metadata lists %d %s but the file holds no embedding rows for them",
                     m->rows.n_added && !tables[0] ? m->rows.n_added : m->rows.n_replaced,
                     m->rows.n_added && !tables[0] ? "new tokens" : "replaced token ids");
    if (!st && !tied && m->rows.n_added && !tables[1])
        st = el_fail(EL_ERR_INCOMPATIBLE, path, "train the adapter again (the trainer saves lm_head rows)",
                     "adapter adds tokens to a base with an untied output layer but holds no output rows for them");
    if (!st && !tied && m->rows.n_replaced && !tables[3])
        st = el_fail(EL_ERR_INCOMPATIBLE, path, "import the adapter again",
                     "adapter replaces base token rows on a base with an untied output layer but holds no output "
                     "rows for them");
    bool dora = false; /* DoRA: a magnitude vector beside a module's A and B */
    const cJSON *tensor;
    cJSON_ArrayForEach(tensor, header) {
        size_t len = tensor->string ? strlen(tensor->string) : 0;
        dora |= len > strlen(MAGNITUDE) && strcmp(tensor->string + len - strlen(MAGNITUDE), MAGNITUDE) == 0;
    }
    if (!st && m->n_invocation && dora) /* PEFT has no aLoRA variant of DoRA either */
        st = el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "an activated adapter (aLoRA) cannot be DoRA");
    if (!st && m->n_invocation && (m->rows.n_added || m->rows.n_replaced)) /* its prompt before the invocation is the base's */
        st = el_fail(EL_ERR_INCOMPATIBLE, path, REMAKE, "an activated adapter (aLoRA) cannot add or replace tokens");
    size_t total = (size_t)(m->rows.n_added + m->rows.n_replaced) * (size_t)hidden;
    if (!st && total) { /* one table of new rows then replaced rows, as runtime/new_tokens.py stacks them */
        m->rows.embed = malloc(total * sizeof(float));
        m->rows.head = malloc(total * sizeof(float));
        if (!m->rows.embed || !m->rows.head) st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        size_t a = (size_t)m->rows.n_added * (size_t)hidden, r = (size_t)m->rows.n_replaced * (size_t)hidden;
        if (!st) {
            if (a) memcpy(m->rows.embed, tables[0], a * sizeof(float));
            if (r) memcpy(m->rows.embed + a, tables[2], r * sizeof(float));
            if (a) memcpy(m->rows.head, tied ? tables[0] : tables[1], a * sizeof(float));
            if (r) memcpy(m->rows.head + a, tied ? tables[2] : tables[3], r * sizeof(float));
        }
    }
    for (int k = 0; k < 4; k++) free(tables[k]);
    cJSON_Delete(meta);
    cJSON_Delete(header);
    if (st) el_adapter_meta_free(m);
    return st;
}

void el_adapter_meta_free(el_adapter_meta *m) {
    free(m->fingerprint);
    free(m->architecture);
    for (int i = 0; i < m->rows.n_added; i++) free(m->rows.added_tokens[i]);
    free(m->rows.added_tokens);
    free(m->rows.replaced);
    free(m->rows.embed);
    free(m->rows.head);
    free(m->invocation);
    memset(m, 0, sizeof *m);
}
