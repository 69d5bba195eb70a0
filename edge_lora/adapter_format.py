"""The adapter file's format below the :class:`~edge_lora.adapter.Adapter` it holds: tensor and
metadata names, and the checks of its header and metadata that run before any tensor data is read
(foreign names and dtypes, shapes the base cannot use, malformed or too new metadata)."""

from __future__ import annotations

import json
import math
import os
import re

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile
from edge_lora.targets import linear_modules

FORMAT_VERSION = 1
METADATA_KEY = "edge_lora"
EMBED_ROWS = "model.embed_tokens.added_rows"
HEAD_ROWS = "lm_head.added_rows"
# rows that replace base tokens' own rows (PEFT's trainable_token_indices on existing ids), with their ids in
# the metadata's "replaced_tokens"; like the new tokens' rows they apply only while the adapter is active
REPLACED_EMBED_ROWS = "model.embed_tokens.replaced_rows"
REPLACED_HEAD_ROWS = "lm_head.replaced_rows"
# activated LoRA (aLoRA): base-vocabulary ids whose last occurrence in a prompt starts the adapter's action
INVOCATION_KEY = "alora_invocation_tokens"
ROW_TENSORS = (EMBED_ROWS, HEAD_ROWS, REPLACED_EMBED_ROWS, REPLACED_HEAD_ROWS)
REMAKE = "the file is corrupt or not written by edge-lora: train or export the adapter again"
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude)$")


def is_invocation_list(value: object) -> bool:
    """Whether ``value`` is what an activated adapter's invocation may be: a non-empty list of
    non-negative ints (JSON ``3.0`` or ``true`` are not ids). The vocabulary bound is checked on load."""
    return isinstance(value, list) and bool(value) and all(type(i) is int and i >= 0 for i in value)


def read_metadata(st: SafetensorsFile, path: str | os.PathLike) -> dict:
    raw = st.metadata.get(METADATA_KEY)
    if raw is None:
        hint = (
            "this looks like a PEFT file: import its directory with `edge-lora export --adapter DIR`"
            if any(k.startswith("base_model.") for k in st.keys())
            else "make it with `edge-lora train` or import a PEFT directory"
        )
        raise EdgeLoraError("not an edge-lora adapter (no edge_lora metadata)", path=path, hint=hint)
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: hostile nesting depth
        raise EdgeLoraError("adapter metadata is not valid JSON", path=path, hint=REMAKE) from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("modules"), dict)
        or not isinstance(meta.get("base"), dict)
    ):
        raise EdgeLoraError("adapter metadata lacks 'modules' or 'base'", path=path, hint=REMAKE)
    for key, kinds in (
        ("target_modules", (list, type(None))),
        ("added_tokens", (list, type(None))),
        ("extra", (dict, type(None))),
        ("scaling", (str, type(None))),
    ):
        if not isinstance(meta.get(key), kinds):
            raise EdgeLoraError(f"adapter metadata {key!r} has the wrong type", path=path, hint=REMAKE)
    if not all(
        isinstance(t, str) for t in (meta.get("target_modules") or []) + (meta.get("added_tokens") or [])
    ):
        raise EdgeLoraError("adapter metadata lists non-string module or token names", path=path, hint=REMAKE)
    replaced = meta.get("replaced_tokens")
    if replaced is not None and not (
        isinstance(replaced, list)
        and all(type(i) is int for i in replaced)
        and len(set(replaced)) == len(replaced)
    ):
        raise EdgeLoraError(
            "adapter metadata 'replaced_tokens' is not a list of distinct token ids", path=path, hint=REMAKE
        )
    invocation = meta.get(INVOCATION_KEY)
    if invocation is not None and not is_invocation_list(invocation):
        raise EdgeLoraError(
            f"adapter metadata {INVOCATION_KEY!r} is not a non-empty list of token ids",
            path=path,
            hint=REMAKE,
        )
    if not isinstance(meta["base"].get("fingerprint"), (str, type(None))):
        raise EdgeLoraError("adapter metadata base fingerprint is not a string", path=path, hint=REMAKE)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeLoraError(
            f"adapter format version {version!r} is not supported (this edge-lora reads <= {FORMAT_VERSION})",
            path=path,
            hint="upgrade edge-lora",
        )
    return meta


def check_declared_shapes(st: SafetensorsFile, base: ModelConfig, path: str | os.PathLike) -> None:
    """Refuse tensors the base cannot use from their header alone, before reading any data.

    The header is checked against the file size, but a large (even sparse) file can still declare
    gigabytes; the base bounds every dimension of a usable adapter.
    """
    shapes = linear_modules(base, include_lm_head=True)
    for name, info in st.tensors.items():
        match = LORA_TENSOR.match(name)
        if not match or match["module"] not in shapes:
            continue  # named in the checks that follow
        out_f, in_f = shapes[match["module"]]
        expected = {"lora_A": (None, in_f), "lora_B": (out_f, None), "lora_magnitude": (out_f,)}[
            match["part"]
        ]
        dims = info.shape
        if len(dims) != len(expected) or any(
            d != e if e is not None else d > max(in_f, out_f) for d, e in zip(dims, expected)
        ):
            raise EdgeLoraError(
                f"module {match['module']!r}: adapter shapes {match['part']}{list(dims)} "
                f"do not fit the base's [{out_f}, {in_f}]",
                path=path,
                hint="wrong base model?",
            )


def alpha_value(value: object, module: str, path: str | os.PathLike) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeLoraError(
            f"module {module!r}: alpha {value!r} is not a finite number", path=path, hint=REMAKE
        )
    return float(value)


def check_names_and_dtypes(st: SafetensorsFile, path: str | os.PathLike) -> None:
    """Refuse foreign tensor names and dtypes from the header, before any data is read."""
    for name, info in st.tensors.items():
        if info.dtype not in ("F32", "F16", "BF16"):
            raise EdgeLoraError(
                f"tensor {name!r} has dtype {info.dtype}; adapters hold float tensors",
                path=path,
                hint="store LoRA weights as F32, F16 or BF16",
            )
        if name not in ROW_TENSORS and not LORA_TENSOR.match(name):
            raise EdgeLoraError(
                f"unexpected tensor {name!r}", path=path, hint="adapter tensors are <module>.lora_A / .lora_B"
            )
