/* Adding and removing adapters with the Python runtime's checks in its order (runtime/engine.py,
 * add_adapter): the bytes read once, their SHA-256 against bundle.json and a trusted key's
 * signature judged on exactly those bytes, then the adapter's metadata (base fingerprint, token
 * rows), then llama.cpp's load of the same bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

#define FINGERPRINT_KEY "edge_lora.base_fingerprint"
#define MAX_ADAPTER_FILE ((size_t)4 << 30)

void el_loaded_free(el_loaded *a) {
    if (!a) return;
    free(a->invocation);
    if (a->lora) llama_adapter_lora_free(a->lora);
    if (a->variant_ctx) llama_free(a->variant_ctx);
    if (a->variant_model) llama_model_free(a->variant_model);
    free(a->variant_reason);
    el_adapter_meta_free(&a->meta);
    free(a->name);
    free(a);
}

static el_loaded *find(const el_engine *e, const char *name, int *index) {
    for (int i = 0; i < e->n_adapters; i++)
        if (strcmp(e->adapters[i]->name, name) == 0) {
            if (index) *index = i;
            return e->adapters[i];
        }
    return NULL;
}

static el_status not_loaded(const el_engine *e, const char *name) {
    char q[300], list[1024] = "";
    size_t o = 0;
    for (int i = 0; i < e->n_adapters && o < sizeof list - 1; i++)
        o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "", e->adapters[i]->name);
    return el_fail(EL_ERR_NOT_FOUND, NULL, "add_adapter() it first", "no adapter %s is loaded (loaded: %s)",
                   el_quote(name, q, sizeof q), o ? list : "none");
}

static el_status already(const char *name) {
    char q[300];
    return el_fail(EL_ERR_EXISTS, NULL, "remove_adapter() it first or pick another name",
                   "an adapter named %s is already loaded", el_quote(name, q, sizeof q));
}

static el_status fingerprint_fits(const el_engine *e, const char *path, const char *arch, const char *fingerprint) {
    const char *base = e->bundle.base_fingerprint;
    if (!fingerprint || !*fingerprint || !base || !*base || strcmp(fingerprint, base) == 0) return EL_OK;
    return el_fail(EL_ERR_INCOMPATIBLE, path, "wrong base model? export the adapter's own base, or retrain the adapter on this one",
                   "adapter was made for base %s %.19s\xe2\x80\xa6, not this base (%.19s\xe2\x80\xa6)", arch, fingerprint, base);
}

/* An activated adapter's (aLoRA) invocation tokens: base ids (runtime's Adapter.check_fits), kept. */
static el_status take_invocation(const el_engine *e, const char *path, const int64_t *ids, size_t n, el_loaded *a) {
    char past[160] = "";
    size_t o = 0;
    int n_past = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= e->n_vocab && n_past++ < 4)
            o += (size_t)snprintf(past + o, sizeof past - o, "%s%lld", o ? ", " : "", (long long)ids[i]);
    if (n_past)
        return el_fail(EL_ERR_INCOMPATIBLE, path, "wrong base model?",
                       "invocation token ids [%s] are past the base vocabulary (%d tokens)", past, e->n_vocab);
    if (!n) return EL_OK;
    a->invocation = malloc(n * sizeof(int32_t));
    if (!a->invocation) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) a->invocation[i] = (int32_t)ids[i];
    a->n_invocation = (int)n;
    return EL_OK;
}

/* A file's bytes: from the bundle (hash-checked unless verify_hashes is off), or from a path. */
static el_status read_adapter_file(el_engine *e, const char *rel, const char *path, el_bytes *out, char digest[EL_SHA256_HEX]) {
    el_status st;
    if (rel && e->verify_hashes) {
        if ((st = el_bundle_read_verified(&e->bundle, rel, out))) return st;
    } else {
        if (!el_is_file(path)) return el_fail(EL_ERR_IO, path, "check the path", "file not found");
        if ((st = el_read_file(path, MAX_ADAPTER_FILE, "adapter file is implausibly large", out))) return st;
    }
    el_sha256_hex(out->data, out->size, digest);
    if (e->checked_trust && (st = el_trust_vouch(&e->trust, &e->bundle, path, rel, rel != NULL, digest)))
        el_bytes_free(out);
    return st;
}

/* llama.cpp parses the very bytes that were checked: from memory, never the file again. */
static el_status load_lora(el_engine *e, const char *path, const el_bytes *bytes, struct llama_adapter_lora **out) {
    FILE *f = fmemopen(bytes->data, bytes->size, "rb");
    if (!f) return el_fail(EL_ERR_MEMORY, path, NULL, "cannot open the adapter's bytes as a stream");
    pthread_mutex_lock(&e->ctx_lock); /* adapters live on the shared model */
    *out = llama_adapter_lora_init_from_file_ptr(e->model, f);
    pthread_mutex_unlock(&e->ctx_lock);
    fclose(f);
    if (!*out)
        return el_fail(EL_ERR_INCOMPATIBLE, path, "wrong base model? re-export the adapter for this bundle",
                       "llama.cpp could not load this LoRA adapter");
    return EL_OK;
}

/* An adapter no GGUF LoRA can express (DoRA, LoRA on a tied head) runs as the bundle's merged copy of
 * the engine's GGUF base (export --gguf-merged-variants), on a context of its own. */
static el_status load_variant(el_engine *e, const el_adapter_entry *entry, el_loaded *a) {
    char q[300];
    const char *rel = NULL;
    for (int i = 0; i < entry->n_variants && !rel; i++)
        if (strcmp(entry->variant_quants[i], e->quant) == 0) rel = entry->variant_files[i];
    if (!rel)
        return el_fail(EL_ERR_INCOMPATIBLE, e->bundle.root,
                       "export the bundle with --gguf-merged-variants, or run it on the Python runtime",
                       "adapter %s runs on llama.cpp only as a merged variant of the base, and the bundle ships "
                       "none for %s", el_quote(entry->name, q, sizeof q), e->quant);
    char *path = NULL;
    el_status st = el_bundle_resolve(&e->bundle, rel, &path);
    if (!st && !el_is_file(path))
        st = el_fail(EL_ERR_BUNDLE, e->bundle.root, "re-export the bundle", "bundle file %s is missing or not a file",
                     el_quote(rel, q, sizeof q));
    if (!st && (e->verify_hashes || e->checked_trust)) { /* a base-sized file: hashed as it streams, loaded by path */
        char digest[EL_SHA256_HEX];
        st = el_sha256_file(path, digest);
        if (!st && e->verify_hashes) st = el_bundle_check_digest(&e->bundle, rel, digest);
        if (!st && e->checked_trust) st = el_trust_vouch(&e->trust, &e->bundle, path, rel, true, digest);
    }
    if (!st && !(a->variant_model = el_load_gguf(e, path))) st = EL_ERR_BACKEND;
    if (!st && llama_vocab_n_tokens(llama_model_get_vocab(a->variant_model)) != e->n_vocab)
        st = el_fail(EL_ERR_BUNDLE, path, "re-export the bundle", "the merged variant's vocabulary is not the base's");
    if (!st) {
        pthread_mutex_lock(&e->ctx_lock);
        a->variant_ctx = el_make_context(e, a->variant_model, e->n_ctx_start);
        pthread_mutex_unlock(&e->ctx_lock);
        if (!a->variant_ctx) st = EL_ERR_BACKEND;
    }
    /* bundle.json's note reads "merged into a variant of the base at add_adapter (REASON)": keep REASON */
    const char *why = strchr(entry->gguf_merged, '(');
    a->variant_reason = el_strdup(why ? why + 1 : entry->gguf_merged);
    if (a->variant_reason && why && *a->variant_reason) a->variant_reason[strlen(a->variant_reason) - 1] = '\0';
    free(path);
    return st;
}

static el_status add_from_bundle(el_engine *e, const el_adapter_entry *entry, el_loaded *a) {
    char q[300];
    char *source_path = NULL, *gguf_path = NULL;
    el_bytes source = {0}, gguf = {0};
    char digest[EL_SHA256_HEX];
    el_status st = el_bundle_resolve(&e->bundle, entry->source, &source_path);
    if (!st && !el_is_file(source_path))
        st = el_fail(EL_ERR_BUNDLE, e->bundle.root, "re-export the bundle", "bundle file %s is missing or not a file",
                     el_quote(entry->source, q, sizeof q));
    if (!st) st = read_adapter_file(e, entry->source, source_path, &source, digest);
    if (!st) st = el_adapter_parse(source_path, source.data, source.size, e->bundle.vocab_size, e->bundle.hidden_size,
                                   e->bundle.tie_word_embeddings, &a->meta);
    el_bytes_free(&source);
    if (!st) st = fingerprint_fits(e, source_path, a->meta.architecture, a->meta.fingerprint);
    if (!st) st = el_check_new_token_strings(e, source_path, &a->meta.rows);
    if (!st) st = take_invocation(e, source_path, a->meta.invocation, (size_t)a->meta.n_invocation, a);
    if (!st && a->n_invocation && !entry->gguf && entry->gguf_merged) /* bundle.json edited: export writes none */
        st = el_fail(EL_ERR_BUNDLE, e->bundle.root, "re-export the bundle",
                     "adapter %s is an activated adapter (aLoRA), which no merged variant of the base can express",
                     el_quote(entry->name, q, sizeof q));
    if (!st && !entry->gguf && entry->gguf_merged) {
        st = load_variant(e, entry, a);
    } else if (!st && a->meta.n_modules > 0) {
        if (!entry->gguf) {
            st = el_fail(EL_ERR_BUNDLE, e->bundle.root, "export the bundle with --backends gguf",
                         "adapter %s has no GGUF file in the bundle", el_quote(entry->name, q, sizeof q));
        } else {
            st = el_bundle_resolve(&e->bundle, entry->gguf, &gguf_path);
            if (!st && !el_is_file(gguf_path))
                st = el_fail(EL_ERR_BUNDLE, e->bundle.root, "re-export the bundle", "bundle file %s is missing or not a file",
                             el_quote(entry->gguf, q, sizeof q));
            if (!st) st = read_adapter_file(e, entry->gguf, gguf_path, &gguf, digest);
            if (!st) st = load_lora(e, gguf_path, &gguf, &a->lora);
            el_bytes_free(&gguf);
        }
    }
    free(source_path);
    free(gguf_path);
    return st;
}

static el_status add_from_path(el_engine *e, const char *path, el_loaded *a) {
    el_bytes bytes = {0};
    char digest[EL_SHA256_HEX];
    el_status st = read_adapter_file(e, NULL, path, &bytes, digest);
    if (st) return st;
    if (bytes.size < 4 || memcmp(bytes.data, "GGUF", 4) != 0) {
        el_bytes_free(&bytes);
        return el_fail(EL_ERR_INCOMPATIBLE, path, "convert it with `edge-lora export --add-adapter`, then add it by name",
                       "not a GGUF LoRA adapter (the library takes the .gguf adapters `edge-lora export` writes)");
    }
    st = load_lora(e, path, &bytes, &a->lora);
    el_bytes_free(&bytes);
    if (st) return st;
    char fingerprint[512] = "", arch[128] = "None";
    llama_adapter_meta_val_str(a->lora, FINGERPRINT_KEY, fingerprint, sizeof fingerprint);
    llama_adapter_meta_val_str(a->lora, "general.architecture", arch, sizeof arch);
    a->meta.n_modules = 1;
    st = fingerprint_fits(e, path, arch, fingerprint);
    /* an activated adapter (aLoRA): llama.cpp reads its invocation from adapter.alora.invocation_tokens */
    uint64_t n = st ? 0 : llama_adapter_get_alora_n_invocation_tokens(a->lora);
    const llama_token *tokens = n ? llama_adapter_get_alora_invocation_tokens(a->lora) : NULL;
    if (n && tokens) {
        int64_t *ids = malloc(n * sizeof(int64_t));
        if (!ids) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        for (uint64_t i = 0; i < n; i++) ids[i] = (uint32_t)tokens[i]; /* stored as uint32 in the GGUF */
        st = take_invocation(e, path, ids, (size_t)n, a);
        free(ids);
    }
    return st;
}

el_status el_engine_add_adapter(el_engine *e, const char *name, const char *path) {
    el_clear_error();
    if (!e || !name || !*name) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine or name is NULL or empty");
    pthread_mutex_lock(&e->registry);
    bool exists = find(e, name, NULL) != NULL;
    pthread_mutex_unlock(&e->registry);
    if (exists) return already(name);
    const el_adapter_entry *entry = NULL;
    if (!path) {
        entry = el_bundle_adapter(&e->bundle, name);
        if (!entry) {
            char q[300], list[1024] = "";
            size_t o = 0;
            for (int i = 0; i < e->bundle.n_adapters && o < sizeof list - 1; i++)
                o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "", e->bundle.adapters[i].name);
            return el_fail(EL_ERR_NOT_FOUND, e->bundle.root, NULL, "bundle has no adapter %s (has: %s)",
                           el_quote(name, q, sizeof q), o ? list : "none");
        }
    }
    el_loaded *a = calloc(1, sizeof *a);
    if (!a || !(a->name = el_strdup(name))) {
        free(a);
        return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    }
    el_status st = entry ? add_from_bundle(e, entry, a) : add_from_path(e, path, a);
    if (st) {
        pthread_mutex_lock(&e->ctx_lock);
        el_loaded_free(a);
        pthread_mutex_unlock(&e->ctx_lock);
        return st;
    }
    pthread_mutex_lock(&e->registry);
    bool raced = find(e, name, NULL) != NULL; /* another thread added the same name meanwhile */
    el_loaded **grown = raced ? NULL : realloc(e->adapters, ((size_t)e->n_adapters + 1) * sizeof *grown);
    if (grown) {
        e->adapters = grown;
        e->adapters[e->n_adapters++] = a;
    }
    pthread_mutex_unlock(&e->registry);
    if (grown) return EL_OK;
    pthread_mutex_lock(&e->ctx_lock);
    el_loaded_free(a);
    pthread_mutex_unlock(&e->ctx_lock);
    return raced ? already(name) : el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
}

el_status el_engine_remove_adapter(el_engine *e, const char *name) {
    el_clear_error();
    if (!e || !name) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine or name is NULL");
    pthread_mutex_lock(&e->registry);
    int index = -1;
    el_loaded *a = find(e, name, &index);
    if (!a) {
        el_status st = not_loaded(e, name);
        pthread_mutex_unlock(&e->registry);
        return st;
    }
    memmove(&e->adapters[index], &e->adapters[index + 1], (size_t)(e->n_adapters - index - 1) * sizeof *e->adapters);
    e->n_adapters--;
    int kept = 0; /* out of the default set too */
    for (int i = 0; i < e->default_set.n; i++)
        if (e->default_set.items[i].adapter != a) e->default_set.items[kept++] = e->default_set.items[i];
    e->default_set.n = kept;
    a->removed = true;
    bool in_use = a->users > 0;
    pthread_mutex_unlock(&e->registry);
    pthread_mutex_lock(&e->ctx_lock);
    el_cache_leave(e, a);
    if (!in_use) el_loaded_free(a);
    pthread_mutex_unlock(&e->ctx_lock);
    return EL_OK; /* in use: the last request holding it frees it (el_set_release) */
}

int32_t el_engine_n_adapters(const el_engine *e) {
    if (!e) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&e->registry);
    int32_t n = e->n_adapters;
    pthread_mutex_unlock((pthread_mutex_t *)&e->registry);
    return n;
}

const char *el_engine_adapter_name(const el_engine *e, int32_t i) {
    if (!e) return NULL;
    pthread_mutex_lock((pthread_mutex_t *)&e->registry);
    const char *name = i >= 0 && i < e->n_adapters ? e->adapters[i]->name : NULL;
    pthread_mutex_unlock((pthread_mutex_t *)&e->registry);
    return name;
}

static int by_name(const void *x, const void *y) {
    return strcmp(((const el_set_item *)x)->adapter->name, ((const el_set_item *)y)->adapter->name);
}

/* Under the registry lock: the set's items, sorted by name, scale 0 left out. */
static el_status resolve_locked(el_engine *e, const el_adapter_scale *set, size_t n_set, el_set *out) {
    out->items = calloc(n_set + 1, sizeof *out->items);
    out->n = 0;
    if (!out->items) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    for (size_t i = 0; i < n_set; i++) {
        if (!set[i].name) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "adapter set entry %zu has no name", i);
        el_loaded *a = find(e, set[i].name, NULL);
        if (!a) return not_loaded(e, set[i].name);
        for (int k = 0; k < out->n; k++)
            if (out->items[k].adapter == a) {
                char q[300];
                return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "adapter %s is named twice in the set",
                               el_quote(a->name, q, sizeof q));
            }
        if (set[i].scale != 0.0f) out->items[out->n++] = (el_set_item){a, set[i].scale};
    }
    qsort(out->items, (size_t)out->n, sizeof *out->items, by_name);
    return EL_OK;
}

el_status el_set_resolve(el_engine *e, const el_adapter_scale *set, size_t n_set, el_set *out) {
    pthread_mutex_lock(&e->registry);
    el_status st;
    if (set || n_set) {
        st = resolve_locked(e, set, n_set, out);
    } else { /* the default set */
        out->items = calloc((size_t)e->default_set.n + 1, sizeof *out->items);
        out->n = e->default_set.n;
        st = out->items ? EL_OK : el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        if (!st && out->n) memcpy(out->items, e->default_set.items, (size_t)out->n * sizeof *out->items);
    }
    if (!st)
        for (int i = 0; i < out->n; i++) out->items[i].adapter->users++;
    pthread_mutex_unlock(&e->registry);
    if (st) {
        free(out->items);
        out->items = NULL;
        out->n = 0;
    }
    return st;
}

void el_set_release(el_engine *e, el_set *set) {
    el_loaded *gone[64];
    int n_gone = 0;
    pthread_mutex_lock(&e->registry);
    for (int i = 0; i < set->n; i++) {
        el_loaded *a = set->items[i].adapter;
        if (--a->users == 0 && a->removed && n_gone < 64) gone[n_gone++] = a;
    }
    pthread_mutex_unlock(&e->registry);
    if (n_gone) {
        pthread_mutex_lock(&e->ctx_lock);
        for (int i = 0; i < n_gone; i++) {
            el_cache_leave(e, gone[i]);
            el_loaded_free(gone[i]);
        }
        pthread_mutex_unlock(&e->ctx_lock);
    }
    free(set->items);
    set->items = NULL;
    set->n = 0;
}

el_status el_engine_set_adapters(el_engine *e, const el_adapter_scale *set, size_t n_set) {
    el_clear_error();
    if (!e || (!set && n_set)) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine or set is NULL");
    pthread_mutex_lock(&e->registry);
    el_set resolved;
    el_status st = resolve_locked(e, set, n_set, &resolved);
    if (!st) {
        free(e->default_set.items);
        e->default_set = resolved;
    } else {
        free(resolved.items);
    }
    pthread_mutex_unlock(&e->registry);
    return st;
}

el_status el_engine_adapter_invocation(el_engine *e, const char *name, int32_t *tokens, size_t capacity,
                                       size_t *n_tokens) {
    el_clear_error();
    if (!e || !name || !n_tokens || (!tokens && capacity))
        return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine, name, tokens or n_tokens is NULL");
    pthread_mutex_lock(&e->registry);
    const el_loaded *a = find(e, name, NULL);
    el_status st = a ? EL_OK : not_loaded(e, name);
    if (a) {
        *n_tokens = (size_t)a->n_invocation;
        if (*n_tokens > capacity)
            st = el_fail(EL_ERR_ARGUMENT, NULL, NULL, "tokens holds %zu ids, %zu are needed", capacity, *n_tokens);
        else if (*n_tokens)
            memcpy(tokens, a->invocation, *n_tokens * sizeof(int32_t));
    }
    pthread_mutex_unlock(&e->registry);
    return st;
}
