/* New tokens of one adapter set, as runtime/new_tokens.py: ids base + i in the order of the set's
 * adapters (sorted by name), replaced base ids in slots after them, clashes refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

#define SEPARATE "use them in separate requests"

static int by_id(const void *x, const void *y) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

el_status el_vocab_combine(const el_engine *e, const el_set *set, el_vocab *v) {
    memset(v, 0, sizeof *v);
    v->base = v->size = e->n_vocab;
    size_t hidden = (size_t)e->n_embd;
    int max_new = 0, max_replaced = 0;
    for (int i = 0; i < set->n; i++) {
        const el_token_rows *r = &set->items[i].adapter->meta.rows;
        max_new += r->n_added;
        max_replaced += r->n_replaced;
    }
    if (!max_new && !max_replaced) return EL_OK;
    size_t rows = (size_t)(max_new + max_replaced);
    v->tokens = calloc((size_t)max_new + 1, sizeof(char *));
    v->replaced = calloc((size_t)max_replaced + 1, sizeof(int32_t));
    v->embed = calloc(rows * hidden, sizeof(float));
    v->head = calloc(rows * hidden, sizeof(float));
    const char **owner = calloc((size_t)max_new + 1, sizeof(char *));
    /* replaced rows gathered per adapter first, sorted by id at the end */
    float *r_embed = calloc((size_t)max_replaced * hidden + 1, sizeof(float));
    float *r_head = calloc((size_t)max_replaced * hidden + 1, sizeof(float));
    const char **r_owner = calloc((size_t)max_replaced + 1, sizeof(char *));
    el_status st = EL_OK;
    char q1[300], q2[300], q3[300];
    if (!v->tokens || !v->replaced || !v->embed || !v->head || !owner || !r_embed || !r_head || !r_owner) {
        st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        goto done;
    }
    for (int s = 0; s < set->n && !st; s++) {
        const el_loaded *a = set->items[s].adapter;
        const el_token_rows *r = &a->meta.rows;
        for (int i = 0; i < r->n_added && !st; i++) {
            const char *text = r->added_tokens[i];
            const float *er = r->embed + (size_t)i * hidden, *hr = r->head + (size_t)i * hidden;
            if (i < v->n_new) {
                if (strcmp(v->tokens[i], text) != 0)
                    st = el_fail(EL_ERR_INCOMPATIBLE, NULL, SEPARATE, "adapters %s and %s both define token id %d (%s vs %s)",
                                 el_quote(owner[i], q1, sizeof q1), el_quote(a->name, q2, sizeof q2), e->n_vocab + i,
                                 el_quote(v->tokens[i], q3, sizeof q3), el_quote(text, q1, sizeof q1));
                else if (memcmp(v->embed + (size_t)i * hidden, er, hidden * sizeof(float)) ||
                         memcmp(v->head + (size_t)i * hidden, hr, hidden * sizeof(float)))
                    st = el_fail(EL_ERR_INCOMPATIBLE, NULL, SEPARATE, "adapters %s and %s both define token %s with different rows",
                                 el_quote(owner[i], q1, sizeof q1), el_quote(a->name, q2, sizeof q2), el_quote(text, q3, sizeof q3));
                continue;
            }
            for (int k = 0; k < v->n_new && !st; k++)
                if (strcmp(v->tokens[k], text) == 0)
                    st = el_fail(EL_ERR_INCOMPATIBLE, NULL, SEPARATE, "adapters %s and %s define token %s at different ids",
                                 el_quote(owner[k], q1, sizeof q1), el_quote(a->name, q2, sizeof q2), el_quote(text, q3, sizeof q3));
            if (st) break;
            v->tokens[v->n_new] = r->added_tokens[i];
            owner[v->n_new] = a->name;
            memcpy(v->embed + (size_t)v->n_new * hidden, er, hidden * sizeof(float));
            memcpy(v->head + (size_t)v->n_new * hidden, hr, hidden * sizeof(float));
            v->n_new++;
        }
        for (int j = 0; j < r->n_replaced && !st; j++) {
            int32_t k = r->replaced[j];
            const float *er = r->embed + (size_t)(r->n_added + j) * hidden, *hr = r->head + (size_t)(r->n_added + j) * hidden;
            int found = -1;
            for (int m = 0; m < v->n_replaced; m++)
                if (v->replaced[m] == k) found = m;
            if (found >= 0) {
                if (memcmp(r_embed + (size_t)found * hidden, er, hidden * sizeof(float)) ||
                    memcmp(r_head + (size_t)found * hidden, hr, hidden * sizeof(float)))
                    st = el_fail(EL_ERR_INCOMPATIBLE, NULL, SEPARATE,
                                 "adapters %s and %s both replace the rows of token id %d, differently",
                                 el_quote(r_owner[found], q1, sizeof q1), el_quote(a->name, q2, sizeof q2), k);
                continue;
            }
            v->replaced[v->n_replaced] = k;
            r_owner[v->n_replaced] = a->name;
            memcpy(r_embed + (size_t)v->n_replaced * hidden, er, hidden * sizeof(float));
            memcpy(r_head + (size_t)v->n_replaced * hidden, hr, hidden * sizeof(float));
            v->n_replaced++;
        }
    }
    if (!st && v->n_replaced) { /* slots in id order, after the new tokens */
        int32_t *sorted = malloc((size_t)v->n_replaced * sizeof(int32_t));
        if (!sorted) {
            st = el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
            goto done;
        }
        memcpy(sorted, v->replaced, (size_t)v->n_replaced * sizeof(int32_t));
        qsort(sorted, (size_t)v->n_replaced, sizeof(int32_t), by_id);
        for (int j = 0; j < v->n_replaced; j++) {
            int m = 0;
            while (v->replaced[m] != sorted[j]) m++;
            memcpy(v->embed + (size_t)(v->n_new + j) * hidden, r_embed + (size_t)m * hidden, hidden * sizeof(float));
            memcpy(v->head + (size_t)(v->n_new + j) * hidden, r_head + (size_t)m * hidden, hidden * sizeof(float));
        }
        memcpy(v->replaced, sorted, (size_t)v->n_replaced * sizeof(int32_t));
        free(sorted);
    }
    v->size = e->n_vocab + v->n_new;
done:
    free(owner);
    free(r_embed);
    free(r_head);
    free(r_owner);
    if (st) el_vocab_free(v);
    return st;
}

void el_vocab_free(el_vocab *v) {
    free(v->tokens);
    free(v->replaced);
    free(v->embed);
    free(v->head);
    int32_t base = v->base;
    memset(v, 0, sizeof *v);
    v->base = v->size = base;
}

int32_t el_vocab_to_model(const el_vocab *v, int32_t id) {
    for (int j = 0; j < v->n_replaced; j++)
        if (v->replaced[j] == id) return v->size + j;
    return id;
}

void el_vocab_from_model(const el_vocab *v, const float *model_logits, float *out) {
    memcpy(out, model_logits, (size_t)v->size * sizeof(float));
    for (int j = 0; j < v->n_replaced; j++) out[v->replaced[j]] = model_logits[v->size + j];
}

el_status el_check_new_token_strings(el_engine *e, const char *path, const el_token_rows *rows) {
    for (int i = 0; i < rows->n_added; i++) {
        const char *text = rows->added_tokens[i];
        int32_t ids[4];
        int32_t n = llama_tokenize(e->vocab, text, (int32_t)strlen(text), ids, 4, false, true);
        if (n != 1) continue;
        char piece[512];
        int32_t len = llama_token_to_piece(e->vocab, ids[0], piece, sizeof piece - 1, 0, true);
        if (len < 0 || (size_t)len != strlen(text) || memcmp(piece, text, (size_t)len) != 0) continue;
        char q[300], hint[128];
        snprintf(hint, sizeof hint, "add only strings the base lacks, or train the base's own token (id %d)", ids[0]);
        return el_fail(EL_ERR_INCOMPATIBLE, path, hint,
                       "new token %s is already in the base vocabulary as id %d: with the adapter active one string "
                       "would have two ids", el_quote(text, q, sizeof q), ids[0]);
    }
    return EL_OK;
}
