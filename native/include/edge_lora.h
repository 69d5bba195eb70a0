/* edge_lora.h: the edge-lora runtime as a C library, over llama.cpp's C API.
 *
 * Opens a bundle written by `edge-lora export`, adds and removes LoRA adapters with the checks the
 * Python runtime makes (SHA-256 against bundle.json, Ed25519 signatures against trusted keys, the
 * base's content fingerprint, new-token rows), and generates with a per-request adapter set: any
 * number of adapters, each with its own scale. Several threads may generate at once, each with its
 * own set; they take turns on one llama.cpp context, reusing each cached position only when it was
 * evaluated under the set the request evaluates it under.
 *
 * Activated adapters (aLoRA: GGUF key adapter.alora.invocation_tokens, PEFT's alora_invocation_tokens)
 * act only from the start of the last occurrence of their invocation tokens in the prompt on, and on
 * every generated token; in a prompt without them they act nowhere. The positions before an invocation
 * are evaluated without them, so requests of different activated adapters share that prefix's cache.
 *
 * Conventions (as llama.h): opaque handles, explicit frees, plain C types. Every call that can
 * fail returns an el_status; el_last_error() then holds the one-line message the Python runtime
 * prints for the same input ("PATH: what is wrong (hint: what to do)"), per thread, until the
 * thread's next call into the library.
 */
#ifndef EDGE_LORA_H
#define EDGE_LORA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EL_API __declspec(dllexport)
#else
#define EL_API __attribute__((visibility("default")))
#endif

#define EL_VERSION_MAJOR 0
#define EL_VERSION_MINOR 1

typedef enum el_status {
    EL_OK = 0,
    EL_ERR_ARGUMENT = 1,     /* a NULL handle, a bad value or an unknown name passed by the caller */
    EL_ERR_IO = 2,           /* a file is missing, unreadable or too large */
    EL_ERR_BUNDLE = 3,       /* bundle.json or a file it names is malformed, or escapes the bundle */
    EL_ERR_HASH = 4,         /* a file does not match its SHA-256 in bundle.json */
    EL_ERR_SIGNATURE = 5,    /* no trusted key vouches for an adapter, or a signature is bad */
    EL_ERR_INCOMPATIBLE = 6, /* an adapter made for another base, or one this backend cannot run */
    EL_ERR_NOT_FOUND = 7,    /* no such adapter in the bundle or among the loaded ones */
    EL_ERR_EXISTS = 8,       /* an adapter of that name is already loaded */
    EL_ERR_BACKEND = 9,      /* llama.cpp failed (load, context, decode) */
    EL_ERR_CANCELLED = 10,   /* the token callback asked to stop (tokens so far are returned) */
    EL_ERR_MEMORY = 11,      /* an allocation failed */
    EL_ERR_CONTEXT = 12,     /* the request does not fit the context (n_ctx) */
} el_status;

typedef struct el_engine el_engine; /* one bundle, one base model, its adapters */

typedef struct el_engine_params {
    const char *quant;        /* which GGUF of the bundle ("q4_0", ...); NULL: the first listed */
    int32_t n_threads;        /* 0: every core */
    int32_t n_ctx;            /* longest context a request may reach; 0: min(model's, 4096) */
    int32_t n_ctx_start;      /* KV positions made at load, doubled up to n_ctx on demand; 0: 256 */
    int32_t n_batch;          /* tokens per llama_decode; 0: 512 */
    int verify_hashes;        /* check the base and bundle adapters against bundle.json (default 1) */
    int precise;              /* f32 KV cache, no flash attention: logits within ~1e-5 of PyTorch */
    const char *const *trusted_keys; /* Ed25519 public key files (PEM, 32 raw bytes or 64 hex); */
    size_t n_trusted_keys;           /* with trusted_keys != NULL (even 0 keys) every adapter must be vouched for */
} el_engine_params;

typedef struct el_adapter_scale {
    const char *name; /* a loaded adapter */
    float scale;      /* 0 leaves it out */
} el_adapter_scale;

typedef struct el_sampling {
    int32_t max_new_tokens;         /* default 64 */
    float temperature;              /* 0: greedy (default) */
    int32_t top_k;                  /* 0: off */
    float top_p;                    /* 1: off */
    float repetition_penalty;       /* 1: off; > 1 divides positive logits of seen tokens */
    uint64_t seed;                  /* sampled generation is reproducible for one seed */
    const int32_t *stop_token_ids;  /* besides the model's end-of-generation tokens */
    size_t n_stop_token_ids;
} el_sampling;

/* Called with each new token; return non-zero to stop (the call then returns EL_ERR_CANCELLED). */
typedef int (*el_token_callback)(int32_t token, void *user_data);

EL_API const char *el_version(void);
EL_API const char *el_last_error(void); /* "" after a call that succeeded */
EL_API const char *el_status_name(el_status status);

EL_API el_engine_params el_engine_default_params(void);
EL_API el_sampling el_sampling_default(void);

/* Open a bundle folder. *out is NULL on failure. */
EL_API el_status el_engine_open(const char *bundle_dir, const el_engine_params *params, el_engine **out);
EL_API void el_engine_free(el_engine *engine);

/* Load an adapter without touching the base: from the bundle by name (path NULL), or from a GGUF
 * LoRA file `edge-lora export` wrote (path), under `name`. */
EL_API el_status el_engine_add_adapter(el_engine *engine, const char *name, const char *path);
EL_API el_status el_engine_remove_adapter(el_engine *engine, const char *name);
EL_API int32_t el_engine_n_adapters(const el_engine *engine);
/* The name of the i-th loaded adapter (valid until it is removed), NULL past the end. */
EL_API const char *el_engine_adapter_name(const el_engine *engine, int32_t i);

/* An activated adapter's (aLoRA) invocation token ids; *n_tokens 0 for an ordinary adapter. When the
 * count exceeds capacity, EL_ERR_ARGUMENT with the count set (as tokenize). */
EL_API el_status el_engine_adapter_invocation(el_engine *engine, const char *name, int32_t *tokens,
                                              size_t capacity, size_t *n_tokens);

/* The set requests use when they pass set == NULL; n_set 0: the base alone. */
EL_API el_status el_engine_set_adapters(el_engine *engine, const el_adapter_scale *set, size_t n_set);

/* The vocabulary of a request with this set: the base's plus its adapters' new tokens. */
EL_API el_status el_engine_n_vocab(el_engine *engine, const el_adapter_scale *set, size_t n_set,
                                   int32_t *n_vocab);
EL_API int32_t el_engine_n_ctx(const el_engine *engine);
/* Positions llama.cpp has evaluated since open (those reused from the KV cache not counted). */
EL_API int64_t el_engine_n_evaluated(const el_engine *engine);
EL_API const char *el_engine_base_fingerprint(const el_engine *engine);

/* Text to base token ids (llama.cpp's tokenizer of the base GGUF; add_special: BOS as the model
 * wants it). *n_tokens is the count; when it exceeds capacity, EL_ERR_ARGUMENT with the count set. */
EL_API el_status el_engine_tokenize(el_engine *engine, const char *text, int add_special, int32_t *tokens,
                                    size_t capacity, size_t *n_tokens);
/* One token's text (new tokens of the set included); *n_bytes as for tokenize. */
EL_API el_status el_engine_token_text(el_engine *engine, const el_adapter_scale *set, size_t n_set,
                                      int32_t token, char *buf, size_t capacity, size_t *n_bytes);

/* Logits of every position [n_ids x n_vocab(set)], row-major, into out (capacity floats). */
EL_API el_status el_engine_logits(el_engine *engine, const int32_t *ids, size_t n_ids,
                                  const el_adapter_scale *set, size_t n_set, float *out, size_t capacity);

/* Generate after prompt; new token ids go to out (at most capacity; *n_out counts them). set NULL:
 * the default set; n_set 0 with a non-NULL set: the base alone. callback may be NULL. */
EL_API el_status el_engine_generate(el_engine *engine, const int32_t *prompt, size_t n_prompt,
                                    const el_adapter_scale *set, size_t n_set, const el_sampling *sampling,
                                    el_token_callback callback, void *user_data, int32_t *out,
                                    size_t capacity, size_t *n_out);

#ifdef __cplusplus
}
#endif
#endif /* EDGE_LORA_H */
