/* Shared by the library's sources; not installed. */
#ifndef EL_INTERNAL_H
#define EL_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "edge_lora.h"

#define EL_MAX_MANIFEST_BYTES (16u * 1024u * 1024u)
#define EL_MAX_SIG_BYTES (64u * 1024u)
#define EL_MAX_KEY_BYTES (64u * 1024u)
#define EL_SHA256_HEX 65 /* 64 hex digits and the terminator */
#define EL_KEY_ID_MAX 129 /* a .sig's key_id as written (ours are 16 hex digits) */

/* --- errors (errors.c) --------------------------------------------------------------------- */

/* Record "PATH: message (hint: HINT)" as this thread's last error and return status. path and
 * hint may be NULL. The message is printf-formatted. */
el_status el_fail(el_status status, const char *path, const char *hint, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void el_clear_error(void);
/* The text of a Python repr() of a string: 'text' (what the Python runtime's messages show). */
const char *el_quote(const char *text, char *buf, size_t size);

/* --- files (files.c) ----------------------------------------------------------------------- */

typedef struct el_bytes {
    uint8_t *data;
    size_t size;
} el_bytes;

bool el_is_dir(const char *path);
bool el_is_file(const char *path);
int64_t el_file_size(const char *path); /* -1: missing or not a regular file */
/* Read a whole regular file of at most max_bytes (EL_ERR_IO with a message otherwise). */
el_status el_read_file(const char *path, size_t max_bytes, const char *too_large, el_bytes *out);
void el_bytes_free(el_bytes *bytes);
void el_sha256_hex(const uint8_t *data, size_t size, char hex[EL_SHA256_HEX]);
char *el_join(const char *dir, const char *rel); /* malloc'd "dir/rel" */
char *el_strdup(const char *text);
/* Whether the top-level member `key` of the JSON object `text` writes its numbers as integers (`3`,
 * not `3.0` or `3e0`); true where it has none or is absent. A key written with escapes is not found. */
bool el_json_member_integers(const char *text, const char *key);

/* --- bundle.json (bundle.c) ---------------------------------------------------------------- */

typedef struct el_file_record {
    char *rel;
    char sha256[EL_SHA256_HEX]; /* "" when bundle.json records none */
    int64_t bytes;               /* -1 when bundle.json records none */
} el_file_record;

typedef struct el_adapter_entry {
    char *name;
    char *source;      /* the adapter file (.safetensors) */
    char *gguf;        /* its GGUF LoRA, NULL when the bundle has none */
    char *gguf_merged; /* why it runs as a merged variant of the base instead, NULL otherwise */
    char **variant_quants, **variant_files; /* its merged copies of the GGUF bases (gguf_variants) */
    int n_variants;
} el_adapter_entry;

typedef struct el_bundle {
    char *root;
    char *manifest; /* root/bundle.json */
    char *base_fingerprint;
    char *architecture;
    int32_t vocab_size, hidden_size, max_position_embeddings;
    bool tie_word_embeddings;
    int32_t eos[16];
    int n_eos;
    char **gguf_quants, **gguf_models; /* the backends.gguf entries, in order */
    int n_gguf;
    el_adapter_entry *adapters;
    int n_adapters;
    el_file_record *files;
    int n_files;
} el_bundle;

/* Parse and check bundle.json's text (text[size] must be its NUL terminator); root is the bundle folder (for paths in messages and the
 * checks that files stay inside it). */
el_status el_bundle_parse(const char *root, const char *text, size_t size, el_bundle *out);
el_status el_bundle_open(const char *root, el_bundle *out);
void el_bundle_free(el_bundle *bundle);
/* The absolute path of a bundle entry, refusing anything that escapes the bundle (malloc'd). */
el_status el_bundle_resolve(const el_bundle *bundle, const char *rel, char **out);
const el_adapter_entry *el_bundle_adapter(const el_bundle *bundle, const char *name);
const el_file_record *el_bundle_file(const el_bundle *bundle, const char *rel);
/* A bundle file read whole and checked against its SHA-256 in bundle.json (never more bytes than
 * bundle.json records). */
el_status el_bundle_read_verified(const el_bundle *bundle, const char *rel, el_bytes *out);
el_status el_bundle_check_digest(const el_bundle *bundle, const char *rel, const char *sha256);

/* --- signatures (signing.c) ---------------------------------------------------------------- */

typedef struct el_public_key {
    uint8_t raw[32];
    char key_id[17];
} el_public_key;

typedef struct el_trust {
    el_public_key *keys;
    size_t n_keys;
    bool bundle_signed; /* bundle.json.sig exists (and verified at open) */
} el_trust;

el_status el_load_public_key(const char *path, el_public_key *out);
/* A .sig file's text parsed and shape-checked; sig_path names it in messages. */
el_status el_signature_parse(const char *sig_path, const char *text, size_t size, char key_id[EL_KEY_ID_MAX],
                             uint8_t sha256[32], uint8_t signature[64]);
/* Refuse bytes of `path` (digest: their SHA-256 hex) unless `path`.sig verifies under a trusted key. */
el_status el_verify_digest(const el_trust *trust, const char *path, const char *digest);
el_status el_trust_open(el_trust *trust, const el_bundle *bundle, const char *const *key_paths, size_t n);
/* The runtime's rule: a bundle adapter's bytes are vouched for by a signed bundle.json, any other
 * file by its own .sig (see edge_lora/signing.py, AdapterTrust.vouch). */
el_status el_trust_vouch(const el_trust *trust, const el_bundle *bundle, const char *path, const char *rel,
                         bool bundle_entry, const char *digest);
void el_trust_free(el_trust *trust);

/* --- safetensors adapter header (adapter_file.c) ------------------------------------------- */

typedef struct el_token_rows {
    char **added_tokens; /* the new tokens' strings, ids vocab_size + i */
    int n_added;
    int32_t *replaced; /* base ids whose rows the adapter replaces */
    int n_replaced;
    float *embed;    /* [(n_added + n_replaced) x hidden]: the new tokens', then the replaced ids' */
    float *head;     /* the same for the output (the embed rows on a tied base) */
} el_token_rows;

typedef struct el_adapter_meta {
    char *fingerprint;  /* NULL when the adapter names none */
    char *architecture;
    int n_modules;      /* LoRA modules (0: new tokens only) */
    el_token_rows rows;
    int64_t *invocation; /* an activated adapter's (aLoRA) invocation tokens, as listed; NULL otherwise */
    int n_invocation;
} el_adapter_meta;

/* An edge-lora adapter file (safetensors) parsed: its metadata, and its token rows as float32. */
el_status el_adapter_parse(const char *path, const uint8_t *data, size_t size, int32_t vocab_size, int32_t hidden_size,
                           bool tied, el_adapter_meta *out);
void el_adapter_meta_free(el_adapter_meta *meta);

/* --- sampling (sampling.c) ----------------------------------------------------------------- */

typedef struct el_sampler {
    el_sampling params;
    uint64_t state[4];
    float *scratch;
    int32_t *order;
    size_t capacity;
} el_sampler;

el_status el_sampler_init(el_sampler *sampler, const el_sampling *params);
/* The next token from logits [n_vocab]; history: the request's tokens so far (repetition penalty). */
int32_t el_sampler_pick(el_sampler *sampler, const float *logits, int32_t n_vocab, const int32_t *history,
                        size_t n_history);
void el_sampler_free(el_sampler *sampler);

#endif
