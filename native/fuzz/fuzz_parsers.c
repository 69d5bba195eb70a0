/* Fuzz target for everything the library parses from untrusted files before llama.cpp sees them:
 * bundle.json, .sig records and adapter (safetensors) headers. The first byte picks the parser.
 * libFuzzer's entry point: build with clang -fsanitize=fuzzer,address (without driver.c), or with
 * driver.c, which replays a corpus and mutates it (gcc, no libFuzzer needed). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "el_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t which = data[0] % 3;
    data++, size--;
    char *text = malloc(size + 1); /* the parsers get exactly `size` bytes, terminated as a file read is */
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    if (which == 0) {
        el_bundle bundle;
        el_bundle_parse("/nonexistent/edge-lora-fuzz-bundle", text, size, &bundle);
        el_bundle_free(&bundle);
    } else if (which == 1) {
        char key_id[EL_KEY_ID_MAX];
        uint8_t sha[32], sig[64];
        el_signature_parse("fuzz.sig", text, size, key_id, sha, sig);
    } else {
        el_adapter_meta meta;
        if (el_adapter_parse("fuzz.safetensors", (const uint8_t *)text, size, 320, 64, size % 2, &meta) == EL_OK)
            el_adapter_meta_free(&meta);
    }
    if (strchr(el_last_error(), '\n')) abort(); /* every message is one line */
    free(text);
    return 0;
}
