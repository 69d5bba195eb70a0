/* A libFuzzer-compatible driver for compilers without libFuzzer: every file of a corpus folder, then
 * `iterations` deterministic mutations of them (bit flips, byte changes, cuts, splices, repeats).
 *   fuzz_parsers CORPUS_DIR [ITERATIONS] */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct { uint8_t *data; size_t size; } input;

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint64_t next(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

static size_t mutate(uint8_t *buf, size_t size, size_t cap, const input *other) {
    switch (next() % 6) {
    case 0: if (size) buf[next() % size] ^= (uint8_t)(1u << (next() % 8)); break;
    case 1: if (size) buf[next() % size] = (uint8_t)"{}[]\",:0123456789-e.\\u \x00\xff"[next() % 26]; break;
    case 2: if (size) size = next() % size; break; /* truncate */
    case 3: { /* splice: the head of this one, the tail of another */
        size_t cut = size ? next() % size : 0, from = other->size ? next() % other->size : 0;
        size_t take = other->size - from < cap - cut ? other->size - from : cap - cut;
        memcpy(buf + cut, other->data + from, take);
        size = cut + take;
        break;
    }
    case 4: { /* repeat a slice (deep nesting, long strings) */
        if (!size) break;
        size_t at = next() % size, len = 1 + next() % 16, times = 1 + next() % 64;
        if (at + len > size) len = size - at;
        while (times-- && size + len <= cap) {
            memmove(buf + at + len, buf + at, size - at);
            size += len;
        }
        break;
    }
    default: if (size < cap) { size_t at = next() % (size + 1); memmove(buf + at + 1, buf + at, size - at); buf[at] = (uint8_t)next(); size++; }
    }
    return size;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR [ITERATIONS]\n", argv[0]);
        return 2;
    }
    long iterations = argc > 2 ? strtol(argv[2], NULL, 10) : 10000;
    DIR *dir = opendir(argv[1]);
    if (!dir) {
        fprintf(stderr, "%s: cannot open the corpus folder\n", argv[1]);
        return 2;
    }
    input corpus[256];
    size_t n = 0;
    struct dirent *entry;
    char path[4096];
    while ((entry = readdir(dir)) && n < 256) {
        if (entry->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", argv[1], entry->d_name);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        corpus[n].data = malloc((size_t)len + 1);
        corpus[n].size = fread(corpus[n].data, 1, (size_t)len, f);
        fclose(f);
        LLVMFuzzerTestOneInput(corpus[n].data, corpus[n].size);
        n++;
    }
    closedir(dir);
    if (!n) {
        fprintf(stderr, "%s: empty corpus\n", argv[1]);
        return 2;
    }
    size_t cap = 1 << 16;
    uint8_t *buf = malloc(cap);
    for (long i = 0; i < iterations; i++) {
        const input *seed = &corpus[next() % n];
        size_t size = seed->size < cap ? seed->size : cap;
        memcpy(buf, seed->data, size);
        for (int rounds = 1 + (int)(next() % 4); rounds; rounds--) size = mutate(buf, size, cap, &corpus[next() % n]);
        buf[0] = seed->data[0]; /* keep the parser the seed was made for */
        LLVMFuzzerTestOneInput(buf, size);
    }
    printf("fuzz_parsers: %zu corpus files and %ld mutations, no crash\n", n, iterations);
    for (size_t i = 0; i < n; i++) free(corpus[i].data);
    free(buf);
    return 0;
}
