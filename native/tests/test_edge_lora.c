/* The C test program: the library on a bundle the Python tests export (tests/test_native.py runs it).
 *   test_edge_lora BUNDLE_DIR ADAPTER_A ADAPTER_B [ACTIVATED]
 * Checks, each against the library itself (tests/test_native.py checks it against the Python
 * runtime): hot swaps and stacked sets equal fresh engines, the KV prefix reused only under the same
 * set, per-request sets from several threads, cancel, remove while a request holds an adapter, and
 * the errors (codes and one-line messages) for the caller's mistakes. With ACTIVATED (an activated
 * adapter, aLoRA, whose invocation is not in PROMPT): it acts only from its invocation on, the base
 * prefix before it is shared with other requests, and threads with it get what they get alone. */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_lora.h"

static int failures = 0;
#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        if (!(cond)) {                                                           \
            failures++;                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                 \
            fprintf(stderr, __VA_ARGS__);                                        \
            fprintf(stderr, " (last error: %s)\n", el_last_error());             \
        }                                                                        \
    } while (0)
#define MUST(call) CHECK((call) == EL_OK, "%s", #call)

enum { N_NEW = 12 };
static const int32_t PROMPT[] = {5, 17, 42, 99, 120, 7, 33};
static const size_t N_PROMPT = sizeof PROMPT / sizeof *PROMPT;

typedef struct { int32_t ids[N_NEW]; size_t n; } result;

static result greedy_on(el_engine *e, const int32_t *prompt, size_t n_prompt, const el_adapter_scale *set,
                        size_t n_set, int32_t max_new) {
    result r = {{0}, 0};
    el_sampling s = el_sampling_default();
    s.max_new_tokens = max_new;
    MUST(el_engine_generate(e, prompt, n_prompt, set ? set : (const el_adapter_scale *)"", n_set, &s, NULL, NULL,
                            r.ids, N_NEW, &r.n));
    return r;
}

static result greedy(el_engine *e, const el_adapter_scale *set, size_t n_set) {
    return greedy_on(e, PROMPT, N_PROMPT, set, n_set, N_NEW);
}

static bool same(result a, result b) { return a.n == b.n && memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0; }

static el_engine *open_engine(const char *dir) {
    el_engine *e = NULL;
    el_engine_params p = el_engine_default_params();
    p.n_threads = 2;
    p.precise = 1;
    MUST(el_engine_open(dir, &p, &e));
    if (!e) exit(1);
    return e;
}

static int stop_after_two(int32_t token, void *user) {
    (void)token;
    return ++*(int *)user >= 2;
}

typedef struct {
    el_engine *e;
    el_adapter_scale set[2];
    size_t n_set;
    result out;
    int rounds;
    bool ok;
    const int32_t *prompt; /* NULL: PROMPT */
    size_t n_prompt;
} job;

static void *run_job(void *arg) {
    job *j = arg;
    const int32_t *prompt = j->prompt ? j->prompt : PROMPT;
    size_t n_prompt = j->prompt ? j->n_prompt : N_PROMPT;
    result first = greedy_on(j->e, prompt, n_prompt, j->set, j->n_set, N_NEW);
    j->ok = true;
    for (int i = 0; i < j->rounds; i++) j->ok &= same(greedy_on(j->e, prompt, n_prompt, j->set, j->n_set, N_NEW), first);
    j->out = first;
    return NULL;
}

/* An activated adapter x (aLoRA) beside the ordinary adapter a. */
static void check_activated(const char *dir, const char *a, const char *x) {
    el_engine *e = open_engine(dir);
    MUST(el_engine_add_adapter(e, a, NULL));
    MUST(el_engine_add_adapter(e, x, NULL));
    int32_t inv[16];
    size_t n_inv = 0, n_none = 1;
    CHECK(el_engine_adapter_invocation(e, x, NULL, 0, &n_inv) == EL_ERR_ARGUMENT && n_inv > 0 && n_inv <= 16,
          "the invocation's length (%zu) with no room for it", n_inv);
    if (n_inv == 0 || n_inv > 16) {
        el_engine_free(e);
        return;
    }
    MUST(el_engine_adapter_invocation(e, x, inv, 16, &n_inv));
    MUST(el_engine_adapter_invocation(e, a, inv + n_inv, 0, &n_none));
    CHECK(n_none == 0, "an ordinary adapter has no invocation");
    CHECK(el_engine_adapter_invocation(e, "nope", inv, 16, &n_none) == EL_ERR_NOT_FOUND, "unknown adapter");

    int32_t with[64], later[64]; /* PROMPT, the invocation (at most 16), one more token */
    memcpy(with, PROMPT, sizeof PROMPT);
    memcpy(with + N_PROMPT, inv, n_inv * sizeof(int32_t));
    with[N_PROMPT + n_inv] = 50;
    size_t n_with = N_PROMPT + n_inv + 1;
    memcpy(later, with, n_with * sizeof(int32_t));
    later[n_with - 1] = 51;
    el_adapter_scale only_x = {x, 1.0f}, both[2] = {{a, 0.5f}, {x, 1.0f}};

    /* no invocation: the activated adapter acts nowhere */
    CHECK(same(greedy(e, &only_x, 1), greedy(e, NULL, 0)), "x without its invocation is the base");
    el_adapter_scale half_a = {a, 0.5f};
    CHECK(same(greedy(e, both, 2), greedy(e, &half_a, 1)), "a and x without x's invocation is a alone");
    /* with it: x acts from the invocation on, the base before it */
    result rx = greedy_on(e, with, n_with, &only_x, 1, N_NEW), rb = greedy_on(e, with, n_with, NULL, 0, N_NEW);
    result rboth = greedy_on(e, with, n_with, both, 2, N_NEW);
    CHECK(!same(rx, rb), "x changes the output after its invocation");
    int32_t n_vocab = 0;
    MUST(el_engine_n_vocab(e, NULL, 0, &n_vocab));
    float *lx = malloc(n_with * (size_t)n_vocab * sizeof(float)), *lb = malloc(n_with * (size_t)n_vocab * sizeof(float));
    MUST(el_engine_logits(e, with, n_with, &only_x, 1, lx, n_with * (size_t)n_vocab));
    MUST(el_engine_logits(e, with, n_with, NULL, 0, lb, n_with * (size_t)n_vocab));
    float before = 0, after = 0;
    for (size_t i = 0; i < n_with * (size_t)n_vocab; i++) {
        float d = lx[i] > lb[i] ? lx[i] - lb[i] : lb[i] - lx[i];
        if (i < N_PROMPT * (size_t)n_vocab) before = d > before ? d : before;
        else after = d > after ? d : after;
    }
    CHECK(before < 1e-4f && after > 1e-3f, "x's logits: max |diff| to the base %g before its invocation, %g after",
          (double)before, (double)after);
    free(lx);
    free(lb);

    /* the base prefix is shared: x, then the base, then x again evaluate only what follows PROMPT */
    greedy_on(e, with, n_with, &only_x, 1, 1);
    int64_t mark = el_engine_n_evaluated(e);
    greedy_on(e, PROMPT, N_PROMPT - 1, NULL, 0, 1); /* a prefix of the cache: one position for its logits */
    CHECK(el_engine_n_evaluated(e) - mark == 1, "the base after x evaluated %lld positions",
          (long long)(el_engine_n_evaluated(e) - mark));
    greedy_on(e, with, n_with, &only_x, 1, 1);
    mark = el_engine_n_evaluated(e);
    result again = greedy_on(e, later, n_with, &only_x, 1, N_NEW);
    CHECK(el_engine_n_evaluated(e) - mark == 1 + (int64_t)again.n - (again.n == N_NEW),
          "x after x evaluated %lld positions", (long long)(el_engine_n_evaluated(e) - mark));
    el_engine *fresh = open_engine(dir);
    MUST(el_engine_add_adapter(fresh, x, NULL));
    CHECK(same(greedy_on(fresh, later, n_with, &only_x, 1, N_NEW), again), "x equals a fresh engine");
    CHECK(same(greedy_on(fresh, with, n_with, &only_x, 1, N_NEW), rx), "x equals a fresh engine");
    el_engine_free(fresh);

    /* threads with and without it take turns on the one context */
    job jobs[3] = {{.e = e, .set = {{x, 1.0f}}, .n_set = 1, .rounds = 3, .prompt = with, .n_prompt = n_with},
                   {.e = e, .n_set = 0, .rounds = 3, .prompt = with, .n_prompt = n_with},
                   {.e = e, .set = {{a, 0.5f}, {x, 1.0f}}, .n_set = 2, .rounds = 3, .prompt = with, .n_prompt = n_with}};
    pthread_t threads[3];
    for (int i = 0; i < 3; i++) pthread_create(&threads[i], NULL, run_job, &jobs[i]);
    for (int i = 0; i < 3; i++) pthread_join(threads[i], NULL);
    CHECK(jobs[0].ok && same(jobs[0].out, rx), "thread x");
    CHECK(jobs[1].ok && same(jobs[1].out, rb), "thread base");
    CHECK(jobs[2].ok && same(jobs[2].out, rboth), "thread a and x");
    el_engine_free(e);
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s BUNDLE_DIR ADAPTER_A ADAPTER_B [ACTIVATED]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1], *a = argv[2], *b = argv[3];
    el_engine *bad = NULL;

    CHECK(el_engine_open("/nonexistent/bundle", NULL, &bad) == EL_ERR_BUNDLE && !bad, "missing folder");
    CHECK(strstr(el_last_error(), "not a bundle directory") != NULL, "message: %s", el_last_error());

    el_engine *e = open_engine(dir);
    int32_t n_vocab = 0;
    MUST(el_engine_n_vocab(e, NULL, 0, &n_vocab));
    CHECK(n_vocab > 0, "n_vocab %d", n_vocab);
    CHECK(strncmp(el_engine_base_fingerprint(e), "sha256:", 7) == 0, "fingerprint %s", el_engine_base_fingerprint(e));

    /* adapters: add, duplicate, unknown */
    MUST(el_engine_add_adapter(e, a, NULL));
    MUST(el_engine_add_adapter(e, b, NULL));
    CHECK(el_engine_n_adapters(e) == 2, "two adapters");
    CHECK(el_engine_add_adapter(e, a, NULL) == EL_ERR_EXISTS, "added twice");
    CHECK(strstr(el_last_error(), "is already loaded") != NULL, "message: %s", el_last_error());
    CHECK(el_engine_add_adapter(e, "nope", NULL) == EL_ERR_NOT_FOUND, "unknown adapter");
    CHECK(strstr(el_last_error(), "bundle has no adapter 'nope'") != NULL, "message: %s", el_last_error());
    el_adapter_scale unknown = {"nope", 1.0f};
    result dummy;
    CHECK(el_engine_generate(e, PROMPT, N_PROMPT, &unknown, 1, NULL, NULL, NULL, dummy.ids, N_NEW, &dummy.n) ==
              EL_ERR_NOT_FOUND, "unknown in a set");
    CHECK(strstr(el_last_error(), "no adapter 'nope' is loaded") != NULL, "message: %s", el_last_error());

    /* swaps and stacks equal fresh engines; the cache never leaks across sets */
    el_adapter_scale only_a = {a, 1.0f}, only_b = {b, 1.0f}, stack[2] = {{a, 1.0f}, {b, 0.5f}};
    result base = greedy(e, NULL, 0), ra = greedy(e, &only_a, 1), rb = greedy(e, &only_b, 1);
    result ra2 = greedy(e, &only_a, 1), rs = greedy(e, stack, 2), base2 = greedy(e, NULL, 0);
    CHECK(same(ra, ra2) && same(base, base2), "a -> b -> a and base -> ... -> base repeat");
    CHECK(!same(base, ra) && !same(ra, rb), "the adapters change the output");
    el_engine *fresh = open_engine(dir);
    MUST(el_engine_add_adapter(fresh, b, NULL));
    MUST(el_engine_add_adapter(fresh, a, NULL));
    CHECK(same(greedy(fresh, stack, 2), rs), "stacked equals a fresh engine");
    CHECK(same(greedy(fresh, &only_b, 1), rb), "b equals a fresh engine");
    el_engine_free(fresh);

    /* logits agree with generation: the first greedy token is the argmax of the last row */
    float *logits = malloc(N_PROMPT * (size_t)n_vocab * sizeof(float));
    MUST(el_engine_logits(e, PROMPT, N_PROMPT, &only_a, 1, logits, N_PROMPT * (size_t)n_vocab));
    const float *last = logits + (N_PROMPT - 1) * (size_t)n_vocab;
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; i++) if (last[i] > last[best]) best = i;
    CHECK(ra.n > 0 && best == ra.ids[0], "argmax %d vs first token %d", best, ra.ids[0]);
    CHECK(el_engine_logits(e, PROMPT, N_PROMPT, NULL, 0, logits, 10) == EL_ERR_ARGUMENT, "small out buffer");
    free(logits);

    /* default set, bad ids, sampling */
    MUST(el_engine_set_adapters(e, &only_b, 1));
    result by_default = {{0}, 0};
    el_sampling s = el_sampling_default();
    s.max_new_tokens = N_NEW;
    MUST(el_engine_generate(e, PROMPT, N_PROMPT, NULL, 0, &s, NULL, NULL, by_default.ids, N_NEW, &by_default.n));
    CHECK(same(by_default, rb), "the default set is used when a request names none");
    int32_t bad_ids[] = {5, n_vocab + 3};
    CHECK(el_engine_generate(e, bad_ids, 2, NULL, 0, &s, NULL, NULL, dummy.ids, N_NEW, &dummy.n) == EL_ERR_ARGUMENT,
          "id past the vocabulary");
    CHECK(strstr(el_last_error(), "is outside the vocabulary") != NULL, "message: %s", el_last_error());
    s.temperature = 0.8f, s.top_k = 40, s.top_p = 0.9f, s.seed = 7;
    result s1 = {{0}, 0}, s2 = {{0}, 0};
    MUST(el_engine_generate(e, PROMPT, N_PROMPT, &only_a, 1, &s, NULL, NULL, s1.ids, N_NEW, &s1.n));
    MUST(el_engine_generate(e, PROMPT, N_PROMPT, &only_a, 1, &s, NULL, NULL, s2.ids, N_NEW, &s2.n));
    CHECK(same(s1, s2), "one seed, one sample");
    s.top_p = 0.0f;
    CHECK(el_engine_generate(e, PROMPT, N_PROMPT, NULL, 0, &s, NULL, NULL, dummy.ids, N_NEW, &dummy.n) == EL_ERR_ARGUMENT,
          "bad sampling settings");

    /* cancel: the callback stops it; the tokens so far are returned */
    int seen = 0;
    result cut = {{0}, 0};
    CHECK(el_engine_generate(e, PROMPT, N_PROMPT, &only_a, 1, NULL, stop_after_two, &seen, cut.ids, N_NEW, &cut.n) ==
              EL_ERR_CANCELLED, "cancelled");
    CHECK(cut.n == 2 && memcmp(cut.ids, ra.ids, 2 * sizeof(int32_t)) == 0, "two tokens before the cancel");

    /* threads, each with its own set, take turns on the one context: every result as alone */
    job jobs[4] = {{.e = e, .set = {{a, 1.0f}}, .n_set = 1, .rounds = 3},
                   {.e = e, .set = {{b, 1.0f}}, .n_set = 1, .rounds = 3},
                   {.e = e, .set = {{a, 1.0f}, {b, 0.5f}}, .n_set = 2, .rounds = 3},
                   {.e = e, .n_set = 0, .rounds = 3}};
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) pthread_create(&threads[i], NULL, run_job, &jobs[i]);
    for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
    CHECK(jobs[0].ok && same(jobs[0].out, ra), "thread a");
    CHECK(jobs[1].ok && same(jobs[1].out, rb), "thread b");
    CHECK(jobs[2].ok && same(jobs[2].out, rs), "thread stacked");
    CHECK(jobs[3].ok && same(jobs[3].out, base), "thread base");

    /* remove: gone from the default set and from requests; unknown names refused */
    MUST(el_engine_remove_adapter(e, b));
    CHECK(el_engine_remove_adapter(e, b) == EL_ERR_NOT_FOUND, "removed twice");
    CHECK(strstr(el_last_error(), "no adapter") != NULL, "message: %s", el_last_error());
    CHECK(same(greedy(e, NULL, 0), base), "the default set lost the removed adapter");
    MUST(el_engine_add_adapter(e, b, NULL));
    CHECK(same(greedy(e, &only_b, 1), rb), "added again, the same output");

    el_engine_free(e);
    el_engine_free(NULL);
    if (argc == 5) check_activated(dir, a, argv[4]);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_edge_lora: all checks passed\n");
    return 0;
}
