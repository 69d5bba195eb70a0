/* Files: whole reads with a size limit, SHA-256 (libsodium), paths. */
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "el_internal.h"

bool el_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

bool el_is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int64_t el_file_size(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
    return (int64_t)st.st_size;
}

el_status el_read_file(const char *path, size_t max_bytes, const char *too_large, el_bytes *out) {
    out->data = NULL;
    out->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return el_fail(EL_ERR_IO, path, NULL, "cannot open the file (%s)", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { /* checked on the open file: no swap between */
        close(fd);
        return el_fail(EL_ERR_IO, path, NULL, "not a regular file");
    }
    if ((uint64_t)st.st_size > max_bytes) {
        close(fd);
        return el_fail(EL_ERR_IO, path, NULL, "%s", too_large ? too_large : "file is implausibly large");
    }
    size_t size = (size_t)st.st_size;
    uint8_t *data = malloc(size + 1); /* +1: a terminator for text files, and malloc(0) */
    if (!data) {
        close(fd);
        return el_fail(EL_ERR_MEMORY, path, NULL, "out of memory reading %zu bytes", size);
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, data + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break; /* a file that shrank while read */
        got += (size_t)n;
    }
    close(fd);
    if (got != size) {
        free(data);
        return el_fail(EL_ERR_IO, path, NULL, "the file changed size while it was read");
    }
    data[size] = '\0';
    out->data = data;
    out->size = size;
    return EL_OK;
}

void el_bytes_free(el_bytes *bytes) {
    free(bytes->data);
    bytes->data = NULL;
    bytes->size = 0;
}

void el_sha256_hex(const uint8_t *data, size_t size, char hex[EL_SHA256_HEX]) {
    unsigned char digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256(digest, data, size);
    sodium_bin2hex(hex, EL_SHA256_HEX, digest, sizeof digest);
}

char *el_strdup(const char *text) {
    size_t n = strlen(text) + 1;
    char *copy = malloc(n);
    if (copy) memcpy(copy, text, n);
    return copy;
}

char *el_join(const char *dir, const char *rel) {
    size_t a = strlen(dir), b = strlen(rel);
    char *out = malloc(a + b + 2);
    if (!out) return NULL;
    memcpy(out, dir, a);
    size_t o = a;
    if (a && dir[a - 1] != '/') out[o++] = '/';
    memcpy(out + o, rel, b + 1);
    return out;
}
