/* The shape of a mobile app's native layer, on libedge_lora (native/include/edge_lora.h): open a
 * bundle once, add its adapters by name (checked against bundle.json as the Python runtime checks
 * them), and pick the adapter set per request.
 *
 *   chat_adapters BUNDLE_DIR "PROMPT" [ADAPTER[=SCALE] ...]
 *
 * It generates greedily for the base alone, each adapter alone and (with two or more) all of them
 * stacked, each at its SCALE (default 1.0). Tokens stream through the token callback, which prints
 * each one's text (el_engine_token_text) as it comes and stops the request at a newline, so each
 * set prints one line:
 *
 *   LABEL: TEXT [ids: ID ...]
 *
 * LABEL is "base", the adapter's argument ("sql", "tone=0.5") or the stacked arguments joined by
 * '+'. A failed call prints el_last_error() (one line: "PATH: what is wrong (hint: what to do)")
 * and exits 1; a bad command line exits 2. Environment:
 *   N_PREDICT   tokens per request (default 16)
 *   THREADS     llama.cpp threads (default every core)
 *   PRECISE=1   f32 KV cache, no flash attention: the tokens of the Python runtime's precise mode
 *
 * The library runs on the CPU only for now: there is no device choice (DEVICE=gpu) in it yet. An app
 * that needs llama.cpp's GPU offload today calls llama.cpp's C API directly (docs/mobile.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_lora.h"

#define MAX_PROMPT 4096
#define MAX_LABEL 512

/* What the token callback needs: where to write the text, and the set the token belongs to. */
typedef struct stream {
    el_engine *engine;
    const el_adapter_scale *set;
    size_t n_set;
    int failed; /* token_text failed: its message is in error */
    char error[1024];
} stream;

static int on_token(int32_t token, void *user_data) {
    stream *s = user_data;
    char piece[256];
    size_t n = 0;
    if (el_engine_token_text(s->engine, s->set, s->n_set, token, piece, sizeof piece, &n) != EL_OK) {
        snprintf(s->error, sizeof s->error, "%s", el_last_error());
        s->failed = 1;
        return 1;
    }
    char *newline = memchr(piece, '\n', n);
    fwrite(piece, 1, newline ? (size_t)(newline - piece) : n, stdout);
    fflush(stdout);
    return newline != NULL; /* one answer per line: a newline ends the request */
}

static int fail(void) {
    fprintf(stderr, "%s\n", el_last_error());
    return 1;
}

/* One request: the set's greedy tokens, streamed, then their ids. 0 on success. */
static int run(el_engine *engine, const char *label, const el_adapter_scale *set, size_t n_set,
               const int32_t *prompt, size_t n_prompt, int32_t n_predict) {
    el_sampling greedy = el_sampling_default(); /* temperature 0: greedy */
    greedy.max_new_tokens = n_predict;
    int32_t *ids = malloc((size_t)n_predict * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "chat_adapters: out of memory\n");
        return 1;
    }
    stream s = {.engine = engine, .set = set, .n_set = n_set};
    size_t n_ids = 0;
    printf("%s: ", label);
    fflush(stdout);
    el_status st = el_engine_generate(engine, prompt, n_prompt, set, n_set, &greedy, on_token, &s, ids,
                                      (size_t)n_predict, &n_ids);
    if (st == EL_ERR_CANCELLED && s.failed) {
        printf("\n");
        fprintf(stderr, "%s\n", s.error);
        free(ids);
        return 1;
    }
    if (st != EL_OK && st != EL_ERR_CANCELLED) { /* cancelled: our newline stop, the tokens so far stand */
        printf("\n");
        free(ids);
        return fail();
    }
    printf(" [ids:");
    for (size_t i = 0; i < n_ids; i++) printf(" %d", ids[i]);
    printf("]\n");
    free(ids);
    return 0;
}

/* "NAME" or "NAME=SCALE" into item (its name a copy to free). 0 on success, 1 out of memory, 2 bad. */
static int parse_adapter(const char *arg, el_adapter_scale *item) {
    const char *eq = strrchr(arg, '=');
    size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
    item->scale = 1.0f;
    if (eq) {
        char *end;
        item->scale = strtof(eq + 1, &end);
        if (len == 0 || end == eq + 1 || *end) {
            fprintf(stderr, "%s: not NAME or NAME=SCALE (hint: e.g. sql or sql=0.5)\n", arg);
            return 2;
        }
    }
    char *name = malloc(len + 1);
    if (!name) return 1;
    memcpy(name, arg, len);
    name[len] = 0;
    item->name = name;
    return 0;
}

static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : fallback;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR PROMPT [ADAPTER[=SCALE] ...]\n", argv[0]);
        return 2;
    }
    const char *bundle_dir = argv[1], *prompt_text = argv[2];
    size_t n_adapters = (size_t)(argc - 3);
    int32_t n_predict = env_int("N_PREDICT", 16);
    if (n_predict <= 0) {
        fprintf(stderr, "N_PREDICT=%s: not a positive number (hint: e.g. N_PREDICT=16)\n", getenv("N_PREDICT"));
        return 2;
    }

    char stacked_label[MAX_LABEL] = "";
    for (size_t i = 0; i < n_adapters; i++) {
        size_t used = strlen(stacked_label);
        snprintf(stacked_label + used, sizeof stacked_label - used, "%s%s", i ? "+" : "", argv[3 + i]);
    }
    el_adapter_scale *set = calloc(n_adapters + 1, sizeof *set);
    if (!set) {
        fprintf(stderr, "chat_adapters: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n_adapters; i++) {
        int bad = parse_adapter(argv[3 + i], &set[i]);
        if (bad == 1) fprintf(stderr, "chat_adapters: out of memory\n");
        if (bad) {
            for (size_t k = 0; k < i; k++) free((char *)set[k].name);
            free(set);
            return bad;
        }
    }

    el_engine_params params = el_engine_default_params();
    params.n_threads = env_int("THREADS", 0);
    params.precise = env_int("PRECISE", 0);
    el_engine *engine = NULL;
    int rc = el_engine_open(bundle_dir, &params, &engine) != EL_OK ? fail() : 0;
    for (size_t i = 0; i < n_adapters && rc == 0; i++) /* by bundle name: hash, signature, base checked */
        if (el_engine_add_adapter(engine, set[i].name, NULL) != EL_OK) rc = fail();

    static int32_t prompt[MAX_PROMPT];
    size_t n_prompt = 0;
    if (rc == 0 && el_engine_tokenize(engine, prompt_text, 1, prompt, MAX_PROMPT, &n_prompt) != EL_OK) rc = fail();
    if (rc == 0 && n_prompt == 0) {
        fprintf(stderr, "PROMPT: the prompt has no tokens (hint: pass some text)\n");
        rc = 1;
    }

    static const el_adapter_scale none[1];
    if (rc == 0) rc = run(engine, "base", none, 0, prompt, n_prompt, n_predict); /* n_set 0: the base alone */
    for (size_t i = 0; i < n_adapters && rc == 0; i++) /* swap: one adapter per request */
        rc = run(engine, argv[3 + i], &set[i], 1, prompt, n_prompt, n_predict);
    if (n_adapters > 1 && rc == 0) /* stack: all of them in one request */
        rc = run(engine, stacked_label, set, n_adapters, prompt, n_prompt, n_predict);

    el_engine_free(engine); /* NULL after a failed open: nothing to free */
    for (size_t i = 0; i < n_adapters; i++) free((char *)set[i].name);
    free(set);
    return rc;
}
