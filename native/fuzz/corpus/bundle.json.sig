{
  "format": "edge-lora-signature",
  "version": 1,
  "algorithm": "ed25519",
  "key_id": "4647391e848a3338",
  "file": "bundle.json",
  "sha256": "9a903d00674206ba43dd3d9a019790f6b04e46e101cb0f850f54e7d766971de8",
  "signature": "3kvRXnp1GsMDO+LlUTpfFyCVJlWAytRoOZi98cK1OfGGLcQbJoxqbyu5PLSj88bOBowmSxVKzLiUAlPTuxCNDw=="
}
