/* Ed25519 signatures (libsodium), as edge_lora/signing.py: detached <file>.sig JSON records over a
 * domain prefix plus the file's SHA-256, keys named by the first 16 hex digits of their SHA-256. */
#include <cjson/cJSON.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "el_internal.h"

#define DOMAIN "edge-lora-signature-v1\n"
#define COPY_AGAIN "copy it again from a trusted source"
/* DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow it */
static const uint8_t SPKI_PREFIX[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};

static void key_id(const uint8_t raw[32], char out[17]) {
    uint8_t digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256(digest, raw, 32);
    sodium_bin2hex(out, 17, digest, 8);
}

static el_status key_from_raw(const uint8_t *raw, el_public_key *out) {
    memcpy(out->raw, raw, 32);
    key_id(out->raw, out->key_id);
    return EL_OK;
}

/* The base64 body of a PEM block of this label, decoded (bin has room for cap bytes). */
static bool pem_body(const char *text, const char *label, uint8_t *bin, size_t cap, size_t *len) {
    char begin[64], end[64];
    snprintf(begin, sizeof begin, "-----BEGIN %s-----", label);
    snprintf(end, sizeof end, "-----END %s-----", label);
    const char *b = strstr(text, begin);
    const char *e = b ? strstr(b, end) : NULL;
    if (!b || !e) return false;
    b += strlen(begin);
    return sodium_base642bin(bin, cap, b, (size_t)(e - b), " \t\r\n", len, NULL, sodium_base64_VARIANT_ORIGINAL) == 0;
}

el_status el_load_public_key(const char *path, el_public_key *out) {
    if (!el_is_file(path)) return el_fail(EL_ERR_IO, path, NULL, "key file not found or not a file");
    el_bytes data;
    if (el_file_size(path) > (int64_t)EL_MAX_KEY_BYTES)
        return el_fail(EL_ERR_IO, path, "pass an Ed25519 key file", "key file is implausibly large");
    el_status st = el_read_file(path, EL_MAX_KEY_BYTES, NULL, &data);
    if (st) return st;
    if (data.size == 32 && memcmp(data.data, "-----", 5) != 0) {
        st = key_from_raw(data.data, out);
        el_bytes_free(&data);
        return st;
    }
    const char *text = (const char *)data.data; /* el_read_file terminates it */
    size_t start = 0, stop = data.size;
    while (start < stop && strchr(" \t\r\n\v\f", text[start]) && text[start]) start++;
    while (stop > start && strchr(" \t\r\n\v\f", text[stop - 1])) stop--;
    uint8_t raw[32], der[256];
    size_t len = 0;
    if (stop - start == 64 &&
        sodium_hex2bin(raw, 32, text + start, 64, NULL, &len, NULL) == 0 && len == 32) {
        st = key_from_raw(raw, out);
    } else if (memchr(text, '\0', data.size) == NULL && pem_body(text, "PUBLIC KEY", der, sizeof der, &len)) {
        if (len == 44 && memcmp(der, SPKI_PREFIX, sizeof SPKI_PREFIX) == 0) st = key_from_raw(der + 12, out);
        else st = el_fail(EL_ERR_SIGNATURE, path, NULL, "the public key is not Ed25519");
    } else {
        st = el_fail(EL_ERR_SIGNATURE, path, "pass the .pub file `edge-lora keygen` wrote",
                     "not an Ed25519 public key (PEM, 32 raw bytes or 64 hex characters)");
    }
    el_bytes_free(&data);
    return st;
}

static el_status sig_fail(const char *sig_path, const char *hint, const char *message) {
    return el_fail(EL_ERR_SIGNATURE, sig_path, hint, "%s", message);
}

el_status el_signature_parse(const char *sig_path, const char *text, size_t size, char kid[EL_KEY_ID_MAX], uint8_t sha256[32],
                             uint8_t signature[64]) {
    cJSON *rec = cJSON_ParseWithLengthOpts(text, size + 1, NULL, true); /* + its terminator */
    if (!rec) return sig_fail(sig_path, "sign the file again", "signature file is not valid JSON");
    el_status st = EL_OK;
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(rec, "format");
    const cJSON *version = cJSON_GetObjectItemCaseSensitive(rec, "version");
    const cJSON *algorithm = cJSON_GetObjectItemCaseSensitive(rec, "algorithm");
    if (!cJSON_IsObject(rec) || !cJSON_IsString(format) || strcmp(format->valuestring, "edge-lora-signature")) {
        st = sig_fail(sig_path, NULL, "not an edge-lora signature file");
        goto done;
    }
    if (!cJSON_IsNumber(version) || version->valuedouble != 1 || !cJSON_IsString(algorithm) ||
        strcmp(algorithm->valuestring, "ed25519") != 0) {
        char v[64], a[128], q[128];
        if (cJSON_IsNumber(version)) snprintf(v, sizeof v, "%g", version->valuedouble);
        else snprintf(v, sizeof v, "%s", cJSON_IsString(version) ? el_quote(version->valuestring, q, sizeof q) : "None");
        snprintf(a, sizeof a, "%s", cJSON_IsString(algorithm) ? el_quote(algorithm->valuestring, q, sizeof q) : "None");
        st = el_fail(EL_ERR_SIGNATURE, sig_path, "upgrade edge-lora", "unsupported signature version/algorithm %s/%s",
                     v, a);
        goto done;
    }
    const char *keys[] = {"key_id", "sha256", "signature"};
    for (int i = 0; i < 3; i++) {
        if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(rec, keys[i]))) {
            st = el_fail(EL_ERR_SIGNATURE, sig_path, NULL, "signature file lacks '%s'", keys[i]);
            goto done;
        }
    }
    const char *hex = cJSON_GetObjectItemCaseSensitive(rec, "sha256")->valuestring;
    const char *b64 = cJSON_GetObjectItemCaseSensitive(rec, "signature")->valuestring;
    uint8_t hbuf[64], sbuf[128];
    size_t hlen = 0, slen = 0;
    const char *hend = NULL;
    if (sodium_hex2bin(hbuf, sizeof hbuf, hex, strlen(hex), NULL, &hlen, &hend) != 0 || *hend ||
        sodium_base642bin(sbuf, sizeof sbuf, b64, strlen(b64), NULL, &slen, NULL, sodium_base64_VARIANT_ORIGINAL) != 0) {
        st = sig_fail(sig_path, NULL, "signature file holds malformed hex or base64");
        goto done;
    }
    if (hlen != 32 || slen != 64) {
        st = sig_fail(sig_path, NULL, "signature file holds a hash or signature of the wrong length");
        goto done;
    }
    snprintf(kid, EL_KEY_ID_MAX, "%s", cJSON_GetObjectItemCaseSensitive(rec, "key_id")->valuestring);
    memcpy(sha256, hbuf, 32);
    memcpy(signature, sbuf, 64);
done:
    cJSON_Delete(rec);
    return st;
}

el_status el_verify_digest(const el_trust *trust, const char *path, const char *digest) {
    char *sig_path = malloc(strlen(path) + 5);
    if (!sig_path) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    sprintf(sig_path, "%s.sig", path);
    el_status st = EL_OK;
    el_bytes text = {0};
    if (!el_is_file(sig_path)) {
        st = el_fail(EL_ERR_SIGNATURE, path, "sign it with `edge-lora sign --key KEY FILE` on a trusted machine",
                     "no signature (expected a .sig file beside it)");
        goto done;
    }
    if (el_file_size(sig_path) > (int64_t)EL_MAX_SIG_BYTES) {
        st = sig_fail(sig_path, NULL, "signature file is implausibly large");
        goto done;
    }
    if ((st = el_read_file(sig_path, EL_MAX_SIG_BYTES, NULL, &text))) goto done;
    char kid[EL_KEY_ID_MAX];
    uint8_t sha[32], sig[64];
    if ((st = el_signature_parse(sig_path, (const char *)text.data, text.size, kid, sha, sig))) goto done;
    char recorded[EL_SHA256_HEX];
    sodium_bin2hex(recorded, sizeof recorded, sha, 32);
    if (strcmp(recorded, digest) != 0) {
        st = el_fail(EL_ERR_SIGNATURE, path, COPY_AGAIN, "file does not match its signature (modified after signing)");
        goto done;
    }
    const el_public_key *key = NULL;
    for (size_t i = 0; i < trust->n_keys && !key; i++)
        if (strcmp(trust->keys[i].key_id, kid) == 0) key = &trust->keys[i];
    if (!key) {
        st = el_fail(EL_ERR_SIGNATURE, path, "pass the signer's .pub file in trusted_keys / --key",
                     "signed by key %s, which is not a trusted key", kid);
        goto done;
    }
    uint8_t message[sizeof DOMAIN - 1 + 32];
    memcpy(message, DOMAIN, sizeof DOMAIN - 1);
    memcpy(message + sizeof DOMAIN - 1, sha, 32);
    if (crypto_sign_verify_detached(sig, message, sizeof message, key->raw) != 0)
        st = el_fail(EL_ERR_SIGNATURE, path, COPY_AGAIN, "signature is invalid (tampered file or signature)");
done:
    el_bytes_free(&text);
    free(sig_path);
    return st;
}

el_status el_trust_open(el_trust *trust, const el_bundle *bundle, const char *const *key_paths, size_t n) {
    memset(trust, 0, sizeof *trust);
    trust->keys = calloc(n + 1, sizeof *trust->keys);
    if (!trust->keys) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        el_status st = el_load_public_key(key_paths[i], &trust->keys[trust->n_keys]);
        if (st) return st;
        trust->n_keys++;
    }
    char *sig = malloc(strlen(bundle->manifest) + 5);
    if (!sig) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
    sprintf(sig, "%s.sig", bundle->manifest);
    trust->bundle_signed = el_is_file(sig);
    free(sig);
    if (!trust->bundle_signed) return EL_OK;
    /* a present but bad bundle signature is tampering: refuse the whole bundle */
    el_bytes manifest;
    el_status st = el_read_file(bundle->manifest, EL_MAX_MANIFEST_BYTES, NULL, &manifest);
    if (st) return st;
    char digest[EL_SHA256_HEX];
    el_sha256_hex(manifest.data, manifest.size, digest);
    el_bytes_free(&manifest);
    return el_verify_digest(trust, bundle->manifest, digest);
}

el_status el_trust_vouch(const el_trust *trust, const el_bundle *bundle, const char *path, const char *rel,
                         bool bundle_entry, const char *digest) {
    if (bundle_entry && trust->bundle_signed) return el_bundle_check_digest(bundle, rel, digest);
    if (trust->bundle_signed && rel && el_bundle_file(bundle, rel)) {
        char *sig = malloc(strlen(path) + 5);
        if (!sig) return el_fail(EL_ERR_MEMORY, NULL, NULL, "out of memory");
        sprintf(sig, "%s.sig", path);
        bool own = el_is_file(sig);
        free(sig);
        if (!own) return el_bundle_check_digest(bundle, rel, digest);
    }
    return el_verify_digest(trust, path, digest);
}

void el_trust_free(el_trust *trust) {
    free(trust->keys);
    memset(trust, 0, sizeof *trust);
}
