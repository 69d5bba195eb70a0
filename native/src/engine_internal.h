/* The engine's state, shared by engine.c (open, generate), adapters.c and vocab.c. */
#ifndef EL_ENGINE_INTERNAL_H
#define EL_ENGINE_INTERNAL_H

#include <pthread.h>

#include "el_internal.h"
#include "llama.h"

typedef struct el_loaded {
    char *name;
    struct llama_adapter_lora *lora; /* NULL: new tokens only, nothing for llama.cpp */
    el_adapter_meta meta;            /* its fingerprint and token rows */
    int users;                       /* requests holding it (under the registry lock) */
    bool removed;                    /* removed while requests held it: freed by the last one */
    struct llama_model *variant_model; /* DoRA, LoRA on a tied head: the bundle's merged copy of the base */
    struct llama_context *variant_ctx; /* and its own context (requests with it alone run there) */
    char *variant_reason;
    int32_t *invocation; /* an activated adapter (aLoRA): it acts from the last occurrence of these on */
    int n_invocation;
} el_loaded;

typedef struct el_set_item {
    el_loaded *adapter;
    float scale;
} el_set_item;

typedef struct el_set { /* a request's adapters, sorted by name, no zero scales */
    el_set_item *items;
    int n;
} el_set;

typedef struct el_segment { /* positions from start on run under set (runtime/activation.py, Segment) */
    size_t start;
    el_set set; /* items borrowed from the request's set (its users held) or owned by the cache's runs */
} el_segment;

typedef struct el_vocab { /* runtime/new_tokens.py's AddedVocab for one set */
    int32_t base, size;   /* size: base + new tokens */
    int n_new, n_replaced;
    char **tokens;        /* borrowed from the adapters */
    int32_t *replaced;    /* sorted base ids, slot size + j each */
    float *embed, *head;  /* [(n_new + n_replaced) x hidden] */
} el_vocab;

struct el_engine {
    el_bundle bundle;
    el_trust trust;
    bool checked_trust; /* trusted keys given: every adapter must be vouched for */
    bool verify_hashes;
    int32_t n_threads, n_ctx_max, n_ctx_start, n_batch;
    bool precise;
    struct llama_model *model;
    const struct llama_vocab *vocab;
    int32_t n_vocab, n_embd;
    pthread_mutex_t registry; /* the adapters and the default set */
    el_loaded **adapters;
    int n_adapters;
    el_set default_set;
    pthread_mutex_t ctx_lock; /* everything below: a llama_context is not thread-safe */
    struct llama_context *ctx;      /* the active context: the base's, or a merged variant's */
    struct llama_context *base_ctx; /* the base's */
    char *quant;                    /* the GGUF base's quant ("q4_0"), which picks a merged variant's file */
    int32_t n_ctx;     /* positions of the active context (doubles up to n_ctx_max) */
    int32_t ctx_batch; /* tokens per llama_decode on it: min(n_batch, n_ctx) */
    struct llama_batch batch, embd_batch;
    bool have_embd_batch, hidden_on, tainted;
    el_set applied; /* the set llama.cpp applies on ctx now; applied_valid says whether it is known */
    bool applied_valid;
    /* the positions the active context holds: their tokens, and the set each was evaluated under as runs
     * (start ascending, runs[0].start == 0, items owned); a request reuses a position only when both match */
    int32_t *cache_tokens;
    size_t n_cache, cap_cache;
    el_segment *runs;
    int n_runs, cap_runs;
    int64_t evaluated; /* positions llama.cpp evaluated (not reused from the cache) */
    char *model_path;
};

/* adapters.c */
el_status el_set_resolve(el_engine *e, const el_adapter_scale *set, size_t n_set, el_set *out); /* holds users */
void el_set_release(el_engine *e, el_set *set);
void el_loaded_free(el_loaded *a);
/* vocab.c */
el_status el_vocab_combine(const el_engine *e, const el_set *set, el_vocab *out);
void el_vocab_free(el_vocab *v);
int32_t el_vocab_to_model(const el_vocab *v, int32_t id);
/* logits of the model's vocabulary plus the added rows -> the request's view [size] */
void el_vocab_from_model(const el_vocab *v, const float *model_logits, float *out);
el_status el_check_new_token_strings(el_engine *e, const char *path, const el_token_rows *rows);
/* engine.c */
struct llama_context *el_make_context(el_engine *e, struct llama_model *model, int32_t n_ctx);
void el_activate(el_engine *e, struct llama_context *ctx);
struct llama_model *el_load_gguf(el_engine *e, const char *path);
el_status el_sha256_file(const char *path, char hex[EL_SHA256_HEX]);
/* A request's prompt cut where its activated adapters start (the first segment starts at 0); *segments
 * (malloc'd, items too) freed with el_plan_free. */
el_status el_plan(const el_set *set, const int32_t *ids, size_t n, el_segment **segments, int *n_segments);
void el_plan_free(el_segment *segments, int n_segments);
/* history evaluated, each segment under its set, the cached prefix reused position by position */
el_status el_advance(el_engine *e, const el_segment *plan, int n_plan, const el_vocab *v, const int32_t *history,
                     size_t n, float *logits_out /* [n_vocab + rows] */);
el_status el_full_logits(el_engine *e, const el_segment *plan, int n_plan, const el_vocab *v, const int32_t *ids,
                         size_t n, float *out /* [n x (n_vocab + rows)] */);
void el_forget_cache(el_engine *e);
/* Under the context lock: nothing cached or applied holds `a` any more (before it is freed). */
void el_cache_leave(el_engine *e, const el_loaded *a);

#endif
