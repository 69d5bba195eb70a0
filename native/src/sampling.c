/* Sampling, as runtime/sampling.py: greedy, temperature, top-k, top-p, repetition penalty, a seed.
 * The same settings give the same choices as the Python runtime only for greedy decoding: the
 * random streams differ (xoshiro256** here, numpy's PCG64 there). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "el_internal.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static double next_unit(el_sampler *s) { /* xoshiro256**, a uniform double in [0, 1) */
    uint64_t *q = s->state, result = rotl(q[1] * 5, 7) * 9, t = q[1] << 17;
    q[2] ^= q[0];
    q[3] ^= q[1];
    q[1] ^= q[2];
    q[0] ^= q[3];
    q[2] ^= t;
    q[3] = rotl(q[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;
}

el_status el_sampler_init(el_sampler *s, const el_sampling *p) {
    memset(s, 0, sizeof *s);
    if (p->temperature < 0 || !(p->top_p > 0 && p->top_p <= 1) || p->top_k < 0 || !(p->repetition_penalty > 0) ||
        p->max_new_tokens < 0)
        return el_fail(EL_ERR_ARGUMENT, NULL, "temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0",
                       "bad sampling settings");
    s->params = *p;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->state[i] = splitmix64(&x);
    return EL_OK;
}

static el_status reserve(el_sampler *s, size_t n) {
    if (n <= s->capacity) return EL_OK;
    float *scratch = realloc(s->scratch, n * sizeof(float));
    if (scratch) s->scratch = scratch;
    int32_t *order = realloc(s->order, n * sizeof(int32_t));
    if (order) s->order = order;
    if (!scratch || !order) return EL_ERR_MEMORY;
    s->capacity = n;
    return EL_OK;
}

static _Thread_local const float *sort_key; /* qsort has no context argument in C11 */
static int by_prob_desc(const void *a, const void *b) {
    float x = sort_key[*(const int32_t *)a], y = sort_key[*(const int32_t *)b];
    return x < y ? 1 : x > y ? -1 : (*(const int32_t *)a - *(const int32_t *)b);
}

/* The first maximum (numpy's argmax where no NaN is past index 0; a NaN there gives 0, as the scalar
 * scan `v[i] > v[best]` does). Eight running maxima the compiler keeps in vector lanes, then the first
 * index holding the maximum: one vocabulary-sized scan per token costs ~1% of decode when done serially. */
static int32_t first_max(const float *v, int32_t n) {
    if (n <= 0 || v[0] != v[0]) return 0;
    float lane[8];
    for (int k = 0; k < 8; k++) lane[k] = v[0];
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) lane[k] = v[i + k] > lane[k] ? v[i + k] : lane[k];
    float top = lane[0];
    for (int k = 1; k < 8; k++) top = lane[k] > top ? lane[k] : top;
    for (; i < n; i++) top = v[i] > top ? v[i] : top;
    for (i = 0; i < n; i++)
        if (v[i] == top) return i;
    return 0;
}

int32_t el_sampler_pick(el_sampler *s, const float *logits, int32_t n_vocab, const int32_t *history, size_t n_history) {
    const el_sampling *p = &s->params;
    if (p->temperature == 0 && p->repetition_penalty == 1.0f) /* greedy: the first maximum, no copy */
        return first_max(logits, n_vocab);
    if (reserve(s, (size_t)n_vocab) != EL_OK) return -1;
    float *v = s->scratch;
    memcpy(v, logits, (size_t)n_vocab * sizeof(float));
    if (p->repetition_penalty != 1.0f)
        for (size_t i = 0; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= n_vocab) continue;
            bool seen = false; /* each distinct token once, as np.unique */
            for (size_t j = 0; j < i && !seen; j++) seen = history[j] == t;
            if (!seen) v[t] = v[t] > 0 ? v[t] / p->repetition_penalty : v[t] * p->repetition_penalty;
        }
    int32_t best = first_max(v, n_vocab);
    if (p->temperature == 0) return best;
    float top = v[best] / p->temperature;
    int32_t n = 0;
    for (int32_t i = 0; i < n_vocab; i++) s->order[n++] = i;
    for (int32_t i = 0; i < n_vocab; i++) v[i] = v[i] / p->temperature;
    int32_t keep = n_vocab;
    if (p->top_k && p->top_k < n_vocab) keep = p->top_k;
    /* probabilities of the kept tokens, most likely first */
    float *probs = v;
    double sum = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        probs[i] = expf(v[i] - top);
        sum += probs[i];
    }
    sort_key = probs;
    qsort(s->order, (size_t)n_vocab, sizeof(int32_t), by_prob_desc);
    if (keep < n_vocab) {
        float kth = probs[s->order[keep - 1]];
        while (keep < n_vocab && probs[s->order[keep]] == kth) keep++; /* ties with the k-th stay, as numpy */
    }
    sum = 0;
    for (int32_t i = 0; i < keep; i++) sum += probs[s->order[i]];
    if (p->top_p < 1.0f) {
        double cumulative = 0;
        int32_t kept = 0;
        while (kept < keep && cumulative < p->top_p * sum) cumulative += probs[s->order[kept++]];
        keep = kept > 0 ? kept : 1;
        sum = cumulative > 0 ? cumulative : probs[s->order[0]];
    }
    double r = next_unit(s) * sum, acc = 0;
    for (int32_t i = 0; i < keep; i++) {
        acc += probs[s->order[i]];
        if (r < acc) return s->order[i];
    }
    return s->order[keep - 1];
}

void el_sampler_free(el_sampler *s) {
    free(s->scratch);
    free(s->order);
    memset(s, 0, sizeof *s);
}
