/* The engine: a bundle's GGUF base on llama.cpp, one shared context that requests take turns on
 * (each cached position reused only by a request that would evaluate it under the same adapter set,
 * as runtime/llamacpp/backend.py), activated adapters (aLoRA) as runtime/activation.py, and the
 * generation loop of runtime/engine.py. */
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_internal.h"

#define DEFAULT_MAX_CTX 4096
#define DEFAULT_START_CTX 256
#define FINGERPRINT_KEY "edge_lora.base_fingerprint"

static pthread_once_t backend_once = PTHREAD_ONCE_INIT;

static void runs_truncate(el_engine *e, size_t n);

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)level, (void)text, (void)user;
}

static void backend_init(void) {
    if (sodium_init() < 0) abort(); /* only fails without a source of randomness: nothing can run */
    if (!getenv("EDGE_LORA_VERBOSE")) llama_log_set(quiet_log, NULL);
    llama_backend_init();
}

const char *el_version(void) { return "0.1.0"; }

el_engine_params el_engine_default_params(void) {
    el_engine_params p = {0};
    p.verify_hashes = 1;
    return p;
}

el_sampling el_sampling_default(void) {
    el_sampling s = {0};
    s.max_new_tokens = 64;
    s.top_p = 1.0f;
    s.repetition_penalty = 1.0f;
    return s;
}

static bool cpu_has_amx(void) { /* llama.cpp's AMX buffer type crashed on Q8_0/Q4_0 (runtime/llamacpp/lib.py) */
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return false;
    char line[8192];
    bool amx = false;
    while (!amx && fgets(line, sizeof line, f)) amx = strncmp(line, "flags", 5) == 0 && strstr(line, " amx_tile");
    fclose(f);
    return amx;
}

el_status el_sha256_file(const char *path, char hex[EL_SHA256_HEX]) {
    FILE *f = fopen(path, "rb");
    if (!f) return el_fail(EL_ERR_IO, path, NULL, "cannot open the file");
    crypto_hash_sha256_state state;
    crypto_hash_sha256_init(&state);
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) crypto_hash_sha256_update(&state, buf, n);
    bool failed = ferror(f);
    fclose(f);
    if (failed) return el_fail(EL_ERR_IO, path, NULL, "read error");
    unsigned char digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256_final(&state, digest);
    sodium_bin2hex(hex, EL_SHA256_HEX, digest, sizeof digest);
    return EL_OK;
}

/* A context of n_ctx positions over a model (the base or a merged variant); NULL with the error set. */
struct llama_context *el_make_context(el_engine *e, struct llama_model *model, int32_t n_ctx) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = cp.n_ubatch = (uint32_t)(e->n_batch < n_ctx ? e->n_batch : n_ctx);
    cp.n_seq_max = 1;
    cp.no_perf = true;
    cp.n_threads = cp.n_threads_batch = e->n_threads;
    if (e->precise) { /* f16 KV and flash attention cost ~1e-2 in logits; f32 is exact to ~1e-5 */
        cp.type_k = cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx)
        el_fail(EL_ERR_BACKEND, e->model_path, "lower n_ctx (memory) or n_gpu_layers",
                "llama.cpp could not create a context of %d tokens", n_ctx);
    return ctx;
}

/* Requests run on ctx from now on: its cache is unknown to us, its hidden states off. */
void el_activate(el_engine *e, struct llama_context *ctx) {
    e->ctx = ctx;
    e->n_ctx = (int32_t)llama_n_ctx(ctx);
    e->ctx_batch = e->n_batch < e->n_ctx ? e->n_batch : e->n_ctx; /* llama_decode takes no more per call */
    llama_set_embeddings(ctx, false);
    e->hidden_on = false;
    e->n_cache = 0;
    runs_truncate(e, 0);
    llama_memory_clear(llama_get_memory(ctx), false);
}

/* The base GGUF or a merged variant, with the engine's model settings. */
struct llama_model *el_load_gguf(el_engine *e, const char *path) {
    struct llama_model_params mp = llama_model_default_params();
    static ggml_backend_dev_t no_devices[1] = {NULL}; /* every tensor and op on the CPU, even in a GPU build */
    mp.devices = no_devices;
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = !cpu_has_amx();
    /* repacked weights are copied out of a mapping, whose pages then stay as a second copy: read the file */
    mp.load_mode = mp.use_extra_bufts ? LLAMA_LOAD_MODE_NONE : LLAMA_LOAD_MODE_MMAP;
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model)
        el_fail(EL_ERR_BACKEND, path, "the file is corrupt, truncated or from a newer format; re-export the bundle",
                "llama.cpp could not load this GGUF model");
    return model;
}

static el_status load_model(el_engine *e, const char *quant) {
    el_bundle *b = &e->bundle;
    int pick = -1;
    for (int i = 0; i < b->n_gguf && pick < 0; i++)
        if (!quant || (b->gguf_quants[i] && strcmp(b->gguf_quants[i], quant) == 0)) pick = i;
    if (b->n_gguf == 0)
        return el_fail(EL_ERR_BUNDLE, b->root, "export with --backends gguf", "bundle has no gguf files");
    if (pick < 0)
        return el_fail(EL_ERR_BUNDLE, b->root, NULL, "bundle has no gguf model with quant=%s", quant);
    const char *rel = b->gguf_models[pick];
    el_status st = el_bundle_resolve(b, rel, &e->model_path);
    if (st) return st;
    char q[600];
    if (!el_is_file(e->model_path))
        return el_fail(EL_ERR_BUNDLE, b->root, "re-export the bundle", "bundle file %s is missing or not a file",
                       el_quote(rel, q, sizeof q));
    if (e->verify_hashes) {
        if (!el_bundle_file(b, rel) || !el_bundle_file(b, rel)->sha256[0]) return el_bundle_check_digest(b, rel, "");
        char hex[EL_SHA256_HEX];
        if ((st = el_sha256_file(e->model_path, hex)) || (st = el_bundle_check_digest(b, rel, hex))) return st;
    }
    e->quant = el_strdup(b->gguf_quants[pick] ? b->gguf_quants[pick] : "");
    e->model = el_load_gguf(e, e->model_path);
    if (!e->model || !e->quant) return e->model ? el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory") : EL_ERR_BACKEND;
    e->vocab = llama_model_get_vocab(e->model);
    e->n_vocab = llama_vocab_n_tokens(e->vocab);
    e->n_embd = llama_model_n_embd(e->model);
    if (e->n_vocab != b->vocab_size)
        return el_fail(EL_ERR_BUNDLE, e->model_path, "the bundle is inconsistent; re-export it",
                       "the GGUF has %d tokens, bundle.json says %d", e->n_vocab, b->vocab_size);
    char stored[512];
    if (llama_model_meta_val_str(e->model, FINGERPRINT_KEY, stored, sizeof stored) >= 0 &&
        strcmp(stored, b->base_fingerprint) != 0)
        return el_fail(EL_ERR_BUNDLE, e->model_path, "re-export the bundle",
                       "the GGUF was exported from another base than bundle.json names");
    return EL_OK;
}

el_status el_engine_open(const char *bundle_dir, const el_engine_params *params, el_engine **out) {
    el_clear_error();
    if (!out) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "out is NULL");
    *out = NULL;
    if (!bundle_dir) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "bundle_dir is NULL");
    pthread_once(&backend_once, backend_init);
    el_engine_params p = params ? *params : el_engine_default_params();
    el_engine *e = calloc(1, sizeof *e);
    if (!e) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    pthread_mutex_init(&e->registry, NULL);
    pthread_mutex_init(&e->ctx_lock, NULL);
    e->verify_hashes = p.verify_hashes != 0;
    e->precise = p.precise != 0;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    e->n_threads = p.n_threads > 0 ? p.n_threads : (int32_t)(cores > 0 ? cores : 1);
    e->n_batch = p.n_batch > 0 ? p.n_batch : 512;
    el_status st = el_bundle_open(bundle_dir, &e->bundle);
    if (!st && p.trusted_keys) {
        e->checked_trust = true;
        st = el_trust_open(&e->trust, &e->bundle, p.trusted_keys, p.n_trusted_keys);
    }
    if (!st) st = load_model(e, p.quant);
    if (!st) {
        int32_t model_max = e->bundle.max_position_embeddings;
        e->n_ctx_max = p.n_ctx > 0 ? p.n_ctx : (model_max < DEFAULT_MAX_CTX ? model_max : DEFAULT_MAX_CTX);
        int32_t start = p.n_ctx_start > 0 ? p.n_ctx_start : DEFAULT_START_CTX;
        e->n_ctx_start = start < e->n_ctx_max ? start : e->n_ctx_max;
        e->base_ctx = el_make_context(e, e->model, e->n_ctx_start);
        if (e->base_ctx) el_activate(e, e->base_ctx);
        else st = EL_ERR_BACKEND;
    }
    if (!st) {
        e->batch = llama_batch_init(e->n_batch, 0, 1);
        e->cache_tokens = NULL;
    }
    if (st) {
        el_status keep = st;
        char message[2048];
        snprintf(message, sizeof message, "%s", el_last_error());
        el_engine_free(e);
        el_fail(keep, NULL, NULL, "%s", message);
        return keep;
    }
    *out = e;
    return EL_OK;
}

void el_engine_free(el_engine *e) {
    if (!e) return;
    for (int i = 0; i < e->n_adapters; i++) el_loaded_free(e->adapters[i]); /* before the model they live on */
    free(e->adapters);
    free(e->default_set.items);
    free(e->applied.items);
    runs_truncate(e, 0);
    free(e->runs);
    free(e->cache_tokens);
    if (e->base_ctx) { /* a merged variant's context went with its adapter above */
        llama_batch_free(e->batch);
        if (e->have_embd_batch) llama_batch_free(e->embd_batch);
        llama_free(e->base_ctx);
    }
    if (e->model) llama_model_free(e->model);
    el_trust_free(&e->trust);
    el_bundle_free(&e->bundle);
    free(e->model_path);
    free(e->quant);
    pthread_mutex_destroy(&e->registry);
    pthread_mutex_destroy(&e->ctx_lock);
    free(e);
}

/* --- the shared context ---------------------------------------------------------------------- */

static bool same_set(const el_set *a, const el_set *b) {
    if (a->n != b->n) return false;
    for (int i = 0; i < a->n; i++)
        if (a->items[i].adapter != b->items[i].adapter || a->items[i].scale != b->items[i].scale) return false;
    return true;
}

static bool set_holds(const el_set *set, const el_loaded *a) {
    for (int i = 0; i < set->n; i++)
        if (set->items[i].adapter == a) return true;
    return false;
}

static el_status copy_set(el_set *dst, const el_set *src) {
    el_set_item *items = realloc(dst->items, ((size_t)src->n + 1) * sizeof *items);
    if (!items) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    if (src->n) memcpy(items, src->items, (size_t)src->n * sizeof *items);
    dst->items = items;
    dst->n = src->n;
    return EL_OK;
}

/* The cache's runs from position n on dropped (n 0: all of them). */
static void runs_truncate(el_engine *e, size_t n) {
    while (e->n_runs && e->runs[e->n_runs - 1].start >= n) {
        el_segment *run = &e->runs[--e->n_runs];
        free(run->set.items);
        run->set.items = NULL;
        run->set.n = 0;
    }
}

void el_forget_cache(el_engine *e) {
    llama_memory_clear(llama_get_memory(e->ctx), e->tainted); /* zeroed only after NaN/Inf (a masked NaN poisons) */
    e->tainted = false;
    e->n_cache = 0;
    runs_truncate(e, 0);
}

/* Positions begin..end of history, just evaluated under set, recorded as the cache's (it held begin). */
static el_status cache_extend(el_engine *e, const int32_t *history, size_t begin, size_t end, const el_set *set) {
    if (end > e->cap_cache) {
        int32_t *grown = realloc(e->cache_tokens, end * 2 * sizeof(int32_t));
        if (!grown) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        e->cache_tokens = grown;
        e->cap_cache = end * 2;
    }
    if (!e->n_runs || !same_set(&e->runs[e->n_runs - 1].set, set)) {
        if (e->n_runs == e->cap_runs) {
            int cap = e->cap_runs ? 2 * e->cap_runs : 4;
            el_segment *grown = realloc(e->runs, (size_t)cap * sizeof *grown);
            if (!grown) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
            e->runs = grown;
            e->cap_runs = cap;
        }
        el_segment *run = &e->runs[e->n_runs];
        run->start = begin;
        run->set.items = NULL;
        el_status st = copy_set(&run->set, set);
        if (st) return st;
        e->n_runs++;
    }
    memcpy(e->cache_tokens + begin, history + begin, (end - begin) * sizeof(int32_t));
    e->n_cache = end;
    return EL_OK;
}

/* The longest prefix of history (at most limit positions) the context holds evaluated under the very set
 * the plan gives each position: a base prefix serves every activated adapter's request. */
static size_t common_prefix(const el_engine *e, const el_segment *plan, int n_plan, const int32_t *history,
                            size_t limit) {
    size_t common = 0, stop = e->n_cache < limit ? e->n_cache : limit;
    int c = 0, r = 0, seen_c = -1, seen_r = -1;
    bool match = false;
    while (common < stop) {
        while (c + 1 < e->n_runs && e->runs[c + 1].start <= common) c++;
        while (r + 1 < n_plan && plan[r + 1].start <= common) r++;
        if (c != seen_c || r != seen_r) { /* sets compared once per pair of runs */
            match = same_set(&e->runs[c].set, &plan[r].set);
            seen_c = c, seen_r = r;
        }
        if (!match || e->cache_tokens[common] != history[common]) break;
        common++;
    }
    return common;
}

void el_cache_leave(el_engine *e, const el_loaded *a) {
    bool cached = false;
    for (int i = 0; i < e->n_runs; i++) cached |= set_holds(&e->runs[i].set, a);
    if (a->variant_ctx && e->ctx == a->variant_ctx) {
        el_activate(e, e->base_ctx);
    } else if (cached) {
        el_forget_cache(e);
    }
    if (e->applied_valid && set_holds(&e->applied, a)) { /* the base context lets go of its LoRA */
        llama_set_adapters_lora(e->base_ctx, NULL, 0, NULL);
        e->applied.n = 0;
    }
}

/* The context a set runs on (the base's, or a merged variant's); refuses a set that cannot run. */
static el_status set_context(el_engine *e, const el_set *set, struct llama_context **target) {
    const el_loaded *variant = NULL;
    char q[300];
    for (int i = 0; i < set->n; i++) {
        const el_loaded *a = set->items[i].adapter;
        if (a->removed)
            return el_fail(EL_ERR_NOT_FOUND, NULL, "add it again, or retry without it",
                           "adapter %s was removed while this request ran", el_quote(a->name, q, sizeof q));
        if (a->variant_ctx) variant = a;
    }
    if (variant && (set->n > 1 || set->items[0].scale != 1.0f))
        return el_fail(EL_ERR_INCOMPATIBLE, NULL, "stack or scale it on the ONNX backend, or engine.merge() it into the base",
                       "adapter %s runs on llama.cpp as a merged variant of the base (%s): alone and at scale 1.0 only",
                       el_quote(variant->name, q, sizeof q), variant->variant_reason);
    *target = variant ? variant->variant_ctx : e->base_ctx;
    return EL_OK;
}

/* Apply a set on the active context. Within one context the cache stays: its runs say under which set
 * each position was evaluated (runtime/llamacpp/backend.py, _use_set). A variant's context has no LoRA. */
static el_status apply_set(el_engine *e, const el_set *set) {
    if (e->ctx != e->base_ctx || (e->applied_valid && same_set(set, &e->applied))) return EL_OK;
    struct llama_adapter_lora *loras[64];
    float scales[64];
    size_t n = 0;
    for (int i = 0; i < set->n; i++) {
        el_loaded *a = set->items[i].adapter;
        if (!a->lora) continue; /* new tokens only */
        if (n == 64) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "at most 64 adapters in one set");
        loras[n] = a->lora;
        scales[n++] = set->items[i].scale;
    }
    e->applied_valid = false;
    if (llama_set_adapters_lora(e->ctx, n ? loras : NULL, n, n ? scales : NULL) != 0)
        return el_fail(EL_ERR_BACKEND, e->model_path, "an adapter may belong to another base model",
                       "llama.cpp refused the adapter set");
    el_status st = copy_set(&e->applied, set);
    e->applied_valid = st == EL_OK;
    return st;
}

/* At least `needed` positions: the active context made again at double size (at most n_ctx_max), for
 * whichever model it runs (the base or a variant), empty, no LoRA applied. Beyond n_ctx_max the decode
 * refuses, saying so. */
static void make_room(el_engine *e, size_t needed, const el_set *set) {
    if ((int64_t)needed <= e->n_ctx || e->n_ctx >= e->n_ctx_max) return;
    int32_t size = 2 * e->n_ctx > (int32_t)needed ? 2 * e->n_ctx : (int32_t)needed;
    if (size > e->n_ctx_max) size = e->n_ctx_max;
    struct llama_context *old = e->ctx;
    el_loaded *owner = NULL;
    for (int i = 0; i < set->n && !owner; i++)
        if (set->items[i].adapter->variant_ctx == old) owner = set->items[i].adapter;
    const struct llama_model *model = llama_get_model(old);
    int32_t old_size = e->n_ctx;
    llama_free(old); /* first: the two caches are never held at once */
    struct llama_context *fresh = el_make_context(e, (struct llama_model *)model, size);
    if (!fresh) fresh = el_make_context(e, (struct llama_model *)model, old_size); /* keep serving at the old size */
    if (!fresh) abort(); /* the context it replaces was just this size: only a broken allocator lands here */
    if (owner) {
        owner->variant_ctx = fresh;
    } else {
        e->base_ctx = fresh;
        e->applied_valid = false;
    }
    el_activate(e, fresh);
}

/* Every segment's set checked (the request's own context), that context active with room for n. */
static el_status prepare(el_engine *e, const el_segment *plan, int n_plan, size_t n) {
    struct llama_context *target = NULL;
    for (int k = 0; k < n_plan; k++) {
        el_status st = set_context(e, &plan[k].set, &target);
        if (st) return st;
    }
    if (e->ctx != target) el_activate(e, target); /* its cache is another request's: emptied */
    make_room(e, n, &plan[n_plan - 1].set);
    return EL_OK;
}

static el_status decode_batch(el_engine *e, struct llama_batch *b) {
    int32_t status = llama_decode(e->ctx, *b);
    if (status != 0)
        return el_fail(EL_ERR_BACKEND, e->model_path, "the context may be full (raise n_ctx) or out of memory",
                       "llama.cpp failed to evaluate the batch (llama_decode status %d)", status);
    return EL_OK;
}

static void hidden_states(el_engine *e, bool on) {
    if (on != e->hidden_on) {
        llama_set_embeddings(e->ctx, on);
        e->hidden_on = on;
    }
}

/* Logits of the batch's i-th output position: the model's, then hidden @ head^T for added rows. */
static el_status row_logits(el_engine *e, const el_vocab *v, int32_t i, float *out) {
    const float *logits = llama_get_logits_ith(e->ctx, i);
    if (!logits)
        return el_fail(EL_ERR_BACKEND, e->model_path, "report this with the bundle",
                       "llama.cpp returned no logits for this batch");
    memcpy(out, logits, (size_t)e->n_vocab * sizeof(float));
    int rows = v->n_new + v->n_replaced;
    if (rows) {
        const float *hidden = llama_get_embeddings_ith(e->ctx, i);
        if (!hidden)
            return el_fail(EL_ERR_BACKEND, e->model_path, "report this with the bundle",
                           "llama.cpp returned no hidden states for this batch");
        for (int r = 0; r < rows; r++) {
            const float *h = v->head + (size_t)r * (size_t)e->n_embd;
            double acc = 0;
            for (int32_t k = 0; k < e->n_embd; k++) acc += (double)hidden[k] * h[k];
            out[e->n_vocab + r] = (float)acc;
        }
    }
    uint32_t non_finite = 0; /* NaN or Inf: an all-ones exponent; a bit test the compiler vectorizes */
    for (int32_t k = 0; k < e->n_vocab + rows; k++) {
        uint32_t bits;
        memcpy(&bits, &out[k], sizeof bits);
        non_finite |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    if (non_finite) e->tainted = true;
    return EL_OK;
}

typedef enum { WANT_NONE, WANT_LAST, WANT_ALL } el_want; /* which logits a decode returns */

/* Evaluate ids at positions start..; logits of none (a prompt segment before an activated adapter's),
 * of the last position, or of every one. Runs of base ids go in as tokens, runs of added ids as their
 * embedding rows (llama_batch.embd). */
static el_status decode(el_engine *e, const el_vocab *v, const int32_t *ids, size_t n, size_t start, el_want want,
                        float *out) {
    if ((int64_t)(start + n) > e->n_ctx)
        return el_fail(EL_ERR_CONTEXT, NULL, "raise n_ctx or shorten the prompt", "%zu tokens exceed the context of %d",
                       start + n, e->n_ctx);
    bool all = want == WANT_ALL, last = want == WANT_LAST;
    int rows = v->n_new + v->n_replaced;
    size_t width = (size_t)e->n_vocab + (size_t)rows;
    size_t i = 0;
    while (i < n) {
        bool added = ids[i] >= e->n_vocab;
        size_t j = i + 1;
        while (j < n && j - i < (size_t)e->ctx_batch && (ids[j] >= e->n_vocab) == added) j++;
        /* with added rows in the set, hidden states come out only where logits are wanted */
        bool last_run = j == n;
        if (added && !e->have_embd_batch) {
            e->embd_batch = llama_batch_init(e->n_batch, e->n_embd, 1);
            e->have_embd_batch = true;
        }
        struct llama_batch *b = added ? &e->embd_batch : &e->batch;
        size_t m = j - i;
        /* the last position alone when only it is wanted and hidden states are on (they cost every position) */
        if (rows && last && last_run && m > 1) {
            j = n - 1;
            m = j - i;
        }
        b->n_tokens = (int32_t)m;
        bool want_any = all || (last && j == n);
        hidden_states(e, rows && want_any);
        for (size_t k = 0; k < m; k++) {
            if (added) memcpy(b->embd + k * (size_t)e->n_embd, v->embed + (size_t)(ids[i + k] - e->n_vocab) * (size_t)e->n_embd,
                              (size_t)e->n_embd * sizeof(float));
            else b->token[k] = ids[i + k];
            b->pos[k] = (llama_pos)(start + i + k);
            b->n_seq_id[k] = 1;
            b->seq_id[k][0] = 0;
            b->logits[k] = all || (last && j == n && k == m - 1);
        }
        el_status st = decode_batch(e, b);
        if (st) return st;
        if (all)
            for (size_t k = 0; k < m; k++)
                if ((st = row_logits(e, v, (int32_t)k, out + (i + k) * width))) return st;
        if (last && j == n && (st = row_logits(e, v, -1, out))) return st;
        i = j;
    }
    return EL_OK;
}

/* history[from..n) evaluated segment by segment, each under its own set; recorded as the cache's. */
static el_status evaluate(el_engine *e, const el_segment *plan, int n_plan, const el_vocab *v, const int32_t *history,
                          size_t n, size_t from, el_want want, float *out) {
    size_t width = (size_t)e->n_vocab + (size_t)(v->n_new + v->n_replaced);
    el_status st = EL_OK;
    for (int k = 0; k < n_plan && !st; k++) {
        size_t begin = plan[k].start > from ? plan[k].start : from;
        size_t end = k + 1 < n_plan ? plan[k + 1].start : n;
        if (end <= begin) continue;
        el_want here = end < n ? (want == WANT_ALL ? WANT_ALL : WANT_NONE) : want;
        if (!(st = apply_set(e, &plan[k].set)) &&
            !(st = decode(e, v, history + begin, end - begin, begin, here, want == WANT_ALL ? out + begin * width : out))) {
            e->evaluated += (int64_t)(end - begin);
            st = cache_extend(e, history, begin, end, &plan[k].set);
        }
    }
    if (st) el_forget_cache(e); /* a half-evaluated batch leaves the cache unknown */
    return st;
}

el_status el_advance(el_engine *e, const el_segment *plan, int n_plan, const el_vocab *v, const int32_t *history,
                     size_t n, float *logits_out) {
    pthread_mutex_lock(&e->ctx_lock);
    el_status st = prepare(e, plan, n_plan, n);
    if (!st) {
        size_t common = common_prefix(e, plan, n_plan, history, n - 1); /* at least one token for logits */
        if (common < e->n_cache) { /* after NaN/Inf the dropped cells are zeroed: a masked NaN still poisons */
            if (!e->tainted && llama_memory_seq_rm(llama_get_memory(e->ctx), 0, (llama_pos)common, -1)) {
                e->n_cache = common;
                runs_truncate(e, common);
            } else {
                el_forget_cache(e);
                common = 0;
            }
        }
        st = evaluate(e, plan, n_plan, v, history, n, common, WANT_LAST, logits_out);
    }
    pthread_mutex_unlock(&e->ctx_lock);
    return st;
}

el_status el_full_logits(el_engine *e, const el_segment *plan, int n_plan, const el_vocab *v, const int32_t *ids,
                         size_t n, float *out) {
    pthread_mutex_lock(&e->ctx_lock);
    el_status st = prepare(e, plan, n_plan, n);
    if (!st) {
        el_forget_cache(e);
        st = evaluate(e, plan, n_plan, v, ids, n, 0, WANT_ALL, out);
    }
    pthread_mutex_unlock(&e->ctx_lock);
    return st;
}

/* --- activated adapters (aLoRA): where each adapter of a request starts to act ----------------- */

/* The start of the last occurrence of pattern in ids; -1 when it does not occur. */
static long last_occurrence(const int32_t *ids, size_t n, const int32_t *pattern, int m) {
    if (m <= 0 || (size_t)m > n) return -1;
    for (size_t start = n - (size_t)m + 1; start-- > 0;)
        if (ids[start] == pattern[0] && memcmp(ids + start, pattern, (size_t)m * sizeof(int32_t)) == 0)
            return (long)start;
    return -1;
}

void el_plan_free(el_segment *segments, int n_segments) {
    for (int k = 0; segments && k < n_segments; k++) free(segments[k].set.items);
    free(segments);
}

/* runtime/activation.py, activation_plan: an activated adapter acts from the start of the last
 * occurrence of its invocation tokens on and nowhere in a prompt without them; an ordinary one acts
 * everywhere. One segment per distinct start, under the adapters acting from there (in the set's order). */
el_status el_plan(const el_set *set, const int32_t *ids, size_t n, el_segment **out, int *n_out) {
    *out = NULL;
    *n_out = 0;
    size_t slots = (size_t)set->n + 1;
    long *starts = malloc(slots * sizeof *starts);
    el_segment *plan = calloc(slots, sizeof *plan);
    int n_plan = 1; /* plan[0].start == 0 */
    if (!starts || !plan) {
        free(starts);
        free(plan);
        return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    }
    for (int i = 0; i < set->n; i++) {
        const el_loaded *a = set->items[i].adapter;
        starts[i] = a->n_invocation ? last_occurrence(ids, n, a->invocation, a->n_invocation) : 0;
        bool known = false;
        for (int k = 0; k < n_plan; k++) known |= starts[i] < 0 || plan[k].start == (size_t)starts[i];
        if (known) continue;
        int k = n_plan++; /* kept ascending */
        for (; k > 0 && plan[k - 1].start > (size_t)starts[i]; k--) plan[k] = plan[k - 1];
        plan[k].start = (size_t)starts[i];
    }
    el_status st = EL_OK;
    for (int k = 0; k < n_plan && !st; k++) {
        plan[k].set.items = calloc(slots, sizeof *plan[k].set.items);
        if (!plan[k].set.items) {
            st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
            break;
        }
        for (int i = 0; i < set->n; i++)
            if (starts[i] >= 0 && (size_t)starts[i] <= plan[k].start) plan[k].set.items[plan[k].set.n++] = set->items[i];
    }
    free(starts);
    if (st) {
        el_plan_free(plan, n_plan);
        return st;
    }
    *out = plan;
    *n_out = n_plan;
    return EL_OK;
}

int64_t el_engine_n_evaluated(const el_engine *e) {
    if (!e) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&e->ctx_lock);
    int64_t n = e->evaluated;
    pthread_mutex_unlock((pthread_mutex_t *)&e->ctx_lock);
    return n;
}

/* --- requests -------------------------------------------------------------------------------- */

static el_status check_ids(const el_engine *e, const int32_t *ids, size_t n, int32_t size) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= size)
            return el_fail(EL_ERR_ARGUMENT, NULL,
                           ids[i] >= e->n_vocab ? "an id past the base vocabulary needs the adapter that adds it" : NULL,
                           "token id %d is outside the vocabulary (0..%d)", ids[i], size - 1);
    if ((int64_t)n > e->n_ctx_max)
        return el_fail(EL_ERR_CONTEXT, NULL, "shorten the prompt", "%zu tokens exceed the context of %d", n, e->n_ctx_max);
    return EL_OK;
}

/* A request's set and vocabulary; release with end_request. */
static el_status begin_request(el_engine *e, const el_adapter_scale *set, size_t n_set, el_set *s, el_vocab *v) {
    memset(v, 0, sizeof *v);
    el_status st = el_set_resolve(e, set, n_set, s);
    if (st) return st;
    if ((st = el_vocab_combine(e, s, v))) el_set_release(e, s);
    return st;
}

static void end_request(el_engine *e, el_set *s, el_vocab *v) {
    el_vocab_free(v);
    el_set_release(e, s);
}

static int32_t *model_ids(const el_vocab *v, const int32_t *ids, size_t n) {
    int32_t *out = malloc((n ? n : 1) * sizeof(int32_t));
    if (out)
        for (size_t i = 0; i < n; i++) out[i] = el_vocab_to_model(v, ids[i]);
    return out;
}

el_status el_engine_n_vocab(el_engine *e, const el_adapter_scale *set, size_t n_set, int32_t *n_vocab) {
    el_clear_error();
    if (!e || !n_vocab) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine or n_vocab is NULL");
    el_set s;
    el_vocab v;
    el_status st = begin_request(e, set, n_set, &s, &v);
    if (st) return st;
    *n_vocab = v.size;
    end_request(e, &s, &v);
    return EL_OK;
}

el_status el_engine_logits(el_engine *e, const int32_t *ids, size_t n, const el_adapter_scale *set, size_t n_set,
                           float *out, size_t capacity) {
    el_clear_error();
    if (!e || (!ids && n) || !out) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine, ids or out is NULL");
    if (!n) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "logits() needs at least one token");
    el_set s;
    el_vocab v;
    el_status st = begin_request(e, set, n_set, &s, &v);
    if (st) return st;
    size_t width = (size_t)e->n_vocab + (size_t)(v.n_new + v.n_replaced);
    float *raw = NULL;
    int32_t *mids = NULL;
    el_segment *plan = NULL;
    int n_plan = 0;
    if ((st = check_ids(e, ids, n, v.size))) goto done;
    if (capacity < n * (size_t)v.size) {
        st = el_fail(EL_ERR_ARGUMENT, NULL, NULL, "out holds %zu floats, %zu x %d are needed", capacity, n, v.size);
        goto done;
    }
    raw = malloc(n * width * sizeof(float));
    mids = model_ids(&v, ids, n);
    if (!raw || !mids) {
        st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        goto done;
    }
    if ((st = el_plan(&s, ids, n, &plan, &n_plan))) goto done; /* activated adapters: more than one segment */
    if ((st = el_full_logits(e, plan, n_plan, &v, mids, n, raw))) goto done;
    for (size_t i = 0; i < n; i++) el_vocab_from_model(&v, raw + i * width, out + i * (size_t)v.size);
done:
    el_plan_free(plan, n_plan);
    free(raw);
    free(mids);
    end_request(e, &s, &v);
    return st;
}

el_status el_engine_generate(el_engine *e, const int32_t *prompt, size_t n_prompt, const el_adapter_scale *set,
                             size_t n_set, const el_sampling *sampling, el_token_callback callback, void *user_data,
                             int32_t *out, size_t capacity, size_t *n_out) {
    el_clear_error();
    if (n_out) *n_out = 0;
    if (!e || (!prompt && n_prompt) || (!out && capacity))
        return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine, prompt or out is NULL");
    if (!n_prompt) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "empty prompt");
    el_sampling params = sampling ? *sampling : el_sampling_default();
    el_sampler sampler;
    el_status st = el_sampler_init(&sampler, &params);
    if (st) return st;
    el_set s;
    el_vocab v;
    if ((st = begin_request(e, set, n_set, &s, &v))) {
        el_sampler_free(&sampler);
        return st;
    }
    size_t width = (size_t)e->n_vocab + (size_t)(v.n_new + v.n_replaced);
    size_t cap = n_prompt + (size_t)params.max_new_tokens + 1;
    int32_t *history = malloc(cap * sizeof(int32_t)), *mhistory = malloc(cap * sizeof(int32_t));
    float *raw = malloc(width * sizeof(float)), *logits = malloc((size_t)v.size * sizeof(float));
    size_t produced = 0;
    el_segment *plan = NULL; /* more than one segment: activated adapters (aLoRA) */
    int n_plan = 0;
    if (!history || !mhistory || !raw || !logits) {
        st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        goto done;
    }
    if ((st = check_ids(e, prompt, n_prompt, v.size))) goto done;
    memcpy(history, prompt, n_prompt * sizeof(int32_t));
    for (size_t i = 0; i < n_prompt; i++) mhistory[i] = el_vocab_to_model(&v, prompt[i]);
    size_t n = n_prompt;
    if ((st = el_plan(&s, prompt, n_prompt, &plan, &n_plan))) goto done;
    if ((st = el_advance(e, plan, n_plan, &v, mhistory, n, raw))) goto done; /* generation: the last set */
    for (int32_t step = 0; step < params.max_new_tokens; step++) {
        const float *view = raw; /* the model's columns are the request's, unless ids were replaced */
        if (v.n_replaced) {
            el_vocab_from_model(&v, raw, logits);
            view = logits;
        }
        int32_t token = el_sampler_pick(&sampler, view, v.size, history, n);
        if (token < 0) {
            st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
            break;
        }
        bool stop = false;
        for (int k = 0; k < e->bundle.n_eos; k++) stop |= token == e->bundle.eos[k];
        for (size_t k = 0; k < params.n_stop_token_ids; k++) stop |= token == params.stop_token_ids[k];
        if (stop) break;
        if (produced == capacity) {
            st = el_fail(EL_ERR_ARGUMENT, NULL, "pass a larger out buffer", "out holds %zu tokens, more were generated",
                         capacity);
            break;
        }
        out[produced++] = token;
        history[n] = token;
        mhistory[n++] = el_vocab_to_model(&v, token);
        if (callback && callback(token, user_data)) {
            st = el_fail(EL_ERR_CANCELLED, NULL, NULL, "generation cancelled by the token callback");
            break;
        }
        if ((int64_t)n >= e->n_ctx_max || step + 1 == params.max_new_tokens) break;
        if ((st = el_advance(e, plan, n_plan, &v, mhistory, n, raw))) break;
    }
done:
    if (n_out) *n_out = produced;
    el_plan_free(plan, n_plan);
    free(history);
    free(mhistory);
    free(raw);
    free(logits);
    el_sampler_free(&sampler);
    end_request(e, &s, &v);
    return st;
}

el_status el_engine_tokenize(el_engine *e, const char *text, int add_special, int32_t *tokens, size_t capacity,
                             size_t *n_tokens) {
    el_clear_error();
    if (!e || !text || !n_tokens) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine, text or n_tokens is NULL");
    size_t len = strlen(text);
    if (len > INT32_MAX / 2) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "text is too long");
    int32_t n = llama_tokenize(e->vocab, text, (int32_t)len, tokens, (int32_t)(capacity > INT32_MAX ? INT32_MAX : capacity),
                               add_special != 0, true);
    if (n == INT32_MIN) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "text is too long");
    *n_tokens = (size_t)(n < 0 ? -n : n);
    if (n < 0) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "tokens holds %zu ids, %d are needed", capacity, -n);
    return EL_OK;
}

el_status el_engine_token_text(el_engine *e, const el_adapter_scale *set, size_t n_set, int32_t token, char *buf,
                               size_t capacity, size_t *n_bytes) {
    el_clear_error();
    if (!e || !n_bytes || (!buf && capacity)) return el_fail(EL_ERR_ARGUMENT, NULL, NULL, "engine, buf or n_bytes is NULL");
    el_set s;
    el_vocab v;
    el_status st = begin_request(e, set, n_set, &s, &v);
    if (st) return st;
    if (token < 0 || token >= v.size) {
        st = el_fail(EL_ERR_ARGUMENT, NULL, NULL, "token id %d is outside the vocabulary (0..%d)", token, v.size - 1);
    } else if (token >= e->n_vocab) {
        const char *t = v.tokens[token - e->n_vocab];
        *n_bytes = strlen(t);
        if (*n_bytes > capacity) st = el_fail(EL_ERR_ARGUMENT, NULL, NULL, "buf holds %zu bytes, %zu are needed", capacity, *n_bytes);
        else memcpy(buf, t, *n_bytes);
    } else {
        int32_t n = llama_token_to_piece(e->vocab, token, buf, (int32_t)(capacity > INT32_MAX ? INT32_MAX : capacity), 0, false);
        *n_bytes = (size_t)(n < 0 ? -n : n);
        if (n < 0) st = el_fail(EL_ERR_ARGUMENT, NULL, NULL, "buf holds %zu bytes, %d are needed", capacity, -n);
    }
    end_request(e, &s, &v);
    return st;
}

int32_t el_engine_n_ctx(const el_engine *e) { return e ? e->n_ctx_max : 0; }

const char *el_engine_base_fingerprint(const el_engine *e) { return e ? e->bundle.base_fingerprint : NULL; }
