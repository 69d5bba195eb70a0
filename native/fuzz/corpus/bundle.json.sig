{
  "format": "edge-lora-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "193ba3862f3fe97a",
  "file": "bundle.json",
  "sha256": "001162fcedd52f028fd3aab542df075d4137985c6b8d3d582b99726d94da1b3b",
  "signature": "5ETuMd1QOkLqzgxvplQDjcGLlsHQTWFpS+hA0KB3aBk8C+SV0EuVDw8UxUe80T37cGpVlUCXKOdh8SnvFbEQBA=="
}
