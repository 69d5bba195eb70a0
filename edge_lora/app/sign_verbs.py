"""The `keygen`, `sign` and `verify` verbs: Ed25519 signatures for adapters and bundles.

    edge-lora keygen release                     # release.key (keep secret) + release.pub (ship)
    edge-lora sign --key release.key bundle/     # bundle.json.sig + one .sig per adapter file
    edge-lora sign --key release.key sql.safetensors
    edge-lora verify --key release.pub bundle/   # every hash, and the signature
    edge-lora verify bundle/                     # hashes only (integrity, not authenticity)

edge_lora/app/cli.py registers these with :func:`add_sign_arguments`; each verb's function returns an
exit code and raises EdgeLoraError for the CLI to print on one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_lora.errors import EdgeLoraError


def add_sign_arguments(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keygen", help="make an Ed25519 key pair for signing adapters and bundles")
    p.add_argument("prefix", help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)")
    p.set_defaults(func=run_keygen)

    p = subparsers.add_parser("sign", help="sign adapter files or a bundle with an Ed25519 private key")
    p.add_argument("--key", required=True, help="private key file from `edge-lora keygen`")
    p.add_argument("targets", nargs="+", help="adapter files and/or bundle folders")
    p.set_defaults(func=run_sign)

    p = subparsers.add_parser(
        "verify", help="check a bundle's hashes and signatures, or an adapter file's signature"
    )
    p.add_argument(
        "--key",
        action="append",
        default=None,
        help="trusted public key file (repeatable); "
        "without it a bundle's hashes are checked, not who signed it",
    )
    p.add_argument("targets", nargs="+", help="adapter files and/or bundle folders")
    p.set_defaults(func=run_verify)


def run_keygen(args: argparse.Namespace) -> int:
    from edge_lora.signing import generate_keypair

    key, pub = generate_keypair(args.prefix)
    print(f"wrote {key} (private: keep it off devices) and {pub} (public: pass it as trusted_keys / --key)")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from edge_lora.signing import load_private_key, sign_bundle, sign_file

    key = load_private_key(args.key)
    for target in map(Path, args.targets):
        written = sign_bundle(target, key) if target.is_dir() else [sign_file(target, key)]
        print(f"signed {target}: {', '.join(str(p) for p in written)}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from edge_lora.signing import load_trusted_keys, verify_bundle, verify_file

    keys = load_trusted_keys(args.key) if args.key else None
    for target in map(Path, args.targets):
        if target.is_dir():
            result = verify_bundle(target, keys)
            who = f"signed by {result['signer']}" if result["signer"] else "signature not checked (no --key)"
            print(f"{target}: OK, {result['files']} files match bundle.json, {who}")
        else:
            if keys is None:
                raise EdgeLoraError("verifying a single file needs --key PUBLIC_KEY", path=target)
            print(f"{target}: OK, signed by {verify_file(target, keys)}")
    return 0
