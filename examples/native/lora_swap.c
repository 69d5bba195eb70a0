/* The shape of a mobile app's native layer: load a bundle's GGUF base once, load its GGUF
 * adapters, and switch between them per request through llama.cpp's C API.
 *
 *   lora_swap BASE.gguf "PROMPT" [ADAPTER.gguf ...]
 *
 * For the base alone, each adapter alone, and (with two or more) all adapters stacked, it
 * prints one line: the set, the greedy token ids, then the text; the first line says which device
 * it took ("device: cpu (CPU)" or "device: gpu (Vulkan0: ...)"). Environment:
 *   DEVICE=cpu|gpu   where the model runs, chosen explicitly (default cpu): cpu keeps every tensor and
 *                    op on the CPU even in a GPU build (llama.cpp's defaults would offload to every GPU
 *                    device it lists, a software one included); gpu offloads every layer to the first
 *                    GPU device and fails when there is none
 *   N_PREDICT        tokens per request (default 16); generation also stops at a newline
 *   EXTRA_BUFTS=1    allow llama.cpp's repacked weight buffers (faster Q4_0 on AVX2; they crashed
 *                    on Intel AMX CPUs, so they stay off unless asked for)
 *
 * Two rules from llama.cpp: the KV cache is not cleared when adapters change (we clear it per
 * request), and a failed adapter load returns NULL (we check every pointer).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* One request: clear the cache, activate the adapter set, feed the prompt, decode greedily. */
static int generate(struct llama_context *ctx, const struct llama_vocab *vocab, const char *label,
                    struct llama_adapter_lora **set, float *scales, size_t n_set,
                    const llama_token *prompt, int n_prompt, int n_predict) {
    llama_memory_clear(llama_get_memory(ctx), false); /* cells only: zeroing the buffer costs ms per swap */
    if (llama_set_adapters_lora(ctx, n_set ? set : NULL, n_set, n_set ? scales : NULL) != 0) {
        fprintf(stderr, "error: cannot activate adapter set %s\n", label);
        return 1;
    }
    int n_vocab = llama_vocab_n_tokens(vocab);
    char text[4096] = {0};
    size_t text_len = 0;
    printf("%s:", label);
    struct llama_batch batch = llama_batch_get_one((llama_token *)prompt, n_prompt);
    llama_token token;
    for (int i = 0; i < n_predict; i++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "error: llama_decode failed\n");
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        token = 0;
        for (int v = 1; v < n_vocab; v++)
            if (logits[v] > logits[token]) token = v;
        if (llama_vocab_is_eog(vocab, token)) break;
        char piece[128];
        int n = llama_token_to_piece(vocab, token, piece, sizeof piece, 0, false);
        if (n < 0) n = 0;
        printf(" %d", token);
        if (text_len + n < sizeof text - 1) {
            memcpy(text + text_len, piece, n);
            text_len += n;
        }
        if (memchr(piece, '\n', n)) break; /* one answer per line */
        batch = llama_batch_get_one(&token, 1);
    }
    text[text_len] = 0;
    char *newline = strchr(text, '\n');
    if (newline) *newline = 0;
    printf(" | %s\n", text);
    return 0;
}

/* The GPU device for DEVICE=gpu (NULL for cpu); 0 on success, 1 after printing why not. */
static int pick_device(const char *want, ggml_backend_dev_t *gpu) {
    *gpu = NULL;
    if (strcmp(want, "cpu") == 0) return 0;
    if (strcmp(want, "gpu") != 0) {
        fprintf(stderr, "error: DEVICE=%s: unknown device (hint: cpu or gpu)\n", want);
        return 1;
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        enum ggml_backend_dev_type type = ggml_backend_dev_type(dev);
        if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) {
            *gpu = dev;
            return 0;
        }
    }
    fprintf(stderr, "error: DEVICE=gpu: llama.cpp lists no GPU device (hint: a GPU build of llama.cpp and "
                    "the GPU's driver, or DEVICE=cpu)\n");
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s BASE.gguf PROMPT [ADAPTER.gguf ...]\n", argv[0]);
        return 2;
    }
    const char *base_path = argv[1], *prompt_text = argv[2];
    int n_adapters = argc - 3;
    int n_predict = getenv("N_PREDICT") ? atoi(getenv("N_PREDICT")) : 16;

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    const char *want = getenv("DEVICE") && *getenv("DEVICE") ? getenv("DEVICE") : "cpu";
    ggml_backend_dev_t gpu;
    if (pick_device(want, &gpu) != 0) return 2;
    struct llama_model_params mparams = llama_model_default_params();
    ggml_backend_dev_t devices[2] = {gpu, NULL}; /* NULL-terminated; empty = no GPU at all */
    mparams.devices = devices;
    mparams.n_gpu_layers = gpu ? 999 : 0;
    mparams.use_extra_bufts = getenv("EXTRA_BUFTS") && atoi(getenv("EXTRA_BUFTS"));
    struct llama_model *model = llama_model_load_from_file(base_path, mparams);
    if (!model) {
        fprintf(stderr, "error: %s: cannot load the GGUF base (hint: pass gguf/model-<quant>.gguf from the bundle)\n", base_path);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = 256;
    cparams.n_batch = 256;
    cparams.type_k = GGML_TYPE_F32; /* exact KV cache: the output matches the Python runtime's precise mode */
    cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "error: cannot create a llama.cpp context\n");
        llama_model_free(model);
        return 1;
    }

    struct llama_adapter_lora **adapters = calloc(n_adapters + 1, sizeof *adapters);
    float *scales = calloc(n_adapters + 1, sizeof *scales);
    for (int i = 0; i < n_adapters; i++) {
        adapters[i] = llama_adapter_lora_init(model, argv[3 + i]);
        if (!adapters[i]) { /* NULL, not an exception: check it */
            fprintf(stderr, "error: %s: cannot load the LoRA adapter (hint: was it exported for this base?)\n", argv[3 + i]);
            return 1;
        }
        scales[i] = 1.0f;
    }

    if (gpu)
        printf("device: gpu (%s: %s)\n", ggml_backend_dev_name(gpu), ggml_backend_dev_description(gpu));
    else
        printf("device: cpu (CPU)\n");

    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    llama_token prompt[512];
    int n_prompt = llama_tokenize(vocab, prompt_text, (int)strlen(prompt_text), prompt, 512, false, false);
    if (n_prompt <= 0) {
        fprintf(stderr, "error: the prompt is empty or longer than 512 tokens\n");
        return 1;
    }

    int rc = generate(ctx, vocab, "base", NULL, NULL, 0, prompt, n_prompt, n_predict);
    for (int i = 0; i < n_adapters && rc == 0; i++) { /* swap: one adapter per request */
        char label[64];
        snprintf(label, sizeof label, "adapter%d", i + 1);
        rc = generate(ctx, vocab, label, &adapters[i], &scales[i], 1, prompt, n_prompt, n_predict);
    }
    if (n_adapters > 1 && rc == 0) /* stack: all of them at once */
        rc = generate(ctx, vocab, "stacked", adapters, scales, n_adapters, prompt, n_prompt, n_predict);

    for (int i = 0; i < n_adapters; i++) llama_adapter_lora_free(adapters[i]);
    free(adapters);
    free(scales);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
