"""The adapter file: one ``.safetensors`` with LoRA tensors and JSON metadata.

Tensors use PEFT's layout without its ``base_model.model.`` prefix:
``<module>.lora_A`` ``[r, in]``, ``<module>.lora_B`` ``[out, r]``, and for DoRA
``<module>.lora_magnitude`` ``[out]``. New tokens add ``model.embed_tokens.added_rows``
(and ``lm_head.added_rows`` on an untied base); rows that replace base tokens' rows while the
adapter is active are ``*.replaced_rows``, their ids the metadata's ``replaced_tokens``.
Metadata key ``edge_lora`` holds JSON:
format version, per-module rank and alpha, scaling rule, targets, base architecture and
base fingerprint. The full specification is docs/adapter-format.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from edge_lora.adapter_format import (
    EMBED_ROWS,
    FORMAT_VERSION,
    HEAD_ROWS,
    INVOCATION_KEY,
    LORA_TENSOR,
    METADATA_KEY,
    REMAKE,
    REPLACED_EMBED_ROWS,
    REPLACED_HEAD_ROWS,
    ROW_TENSORS,
    alpha_value,
    check_declared_shapes,
    check_names_and_dtypes,
    read_metadata,
)
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile, save_tensors
from edge_lora.targets import linear_modules
from edge_lora.token_rows import (
    TokenId,
    check_ids_in_vocab,
    check_new_token_strings,
    check_token_rows,
    check_token_rows_fit,
)


@dataclass
class LoraWeights:
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    alpha: float
    magnitude: np.ndarray | None = None  # DoRA: [out]

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    modules: dict[str, LoraWeights]
    base_architecture: str
    base_fingerprint: str | None = None
    rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    embed_rows: np.ndarray | None = None  # [n_new, hidden]
    head_rows: np.ndarray | None = None  # [n_new, hidden], untied bases only
    replaced_tokens: list[int] = field(default_factory=list)  # base ids whose rows this adapter replaces
    replaced_embed_rows: np.ndarray | None = None  # [n_replaced, hidden]
    replaced_head_rows: np.ndarray | None = None  # [n_replaced, hidden], untied bases only
    # activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): the adapter acts only from the start of
    # the last occurrence of these base-vocabulary ids in the prompt on; empty: active everywhere
    invocation_tokens: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # free-form provenance (trainer settings, source)

    @property
    def token_rows(self) -> bool:
        """Whether it adds tokens or replaces base tokens' rows (its requests see another vocabulary)."""
        return bool(self.added_tokens or self.replaced_tokens)

    @property
    def activated(self) -> bool:
        """An activated adapter (aLoRA): the prompt before its invocation tokens is the base's."""
        return bool(self.invocation_tokens)

    @property
    def dora(self) -> bool:
        return any(w.magnitude is not None for w in self.modules.values())

    def scale(self, module: str) -> float:
        w = self.modules[module]
        return w.alpha / (math.sqrt(w.rank) if self.rslora else w.rank)

    def delta(self, module: str) -> np.ndarray:
        """``scale * B @ A`` in float32: what plain LoRA adds to the weight ``[out, in]``."""
        w = self.modules[module]
        return (self.scale(module) * (w.b.astype(np.float32) @ w.a.astype(np.float32))).astype(np.float32)

    def merged_weight(self, module: str, weight: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The base weight with this module folded in (DoRA's renormalisation included).

        DoRA follows PEFT's ``set_scale``: ``scale`` multiplies the delta's scaling, inside the norm too
        (``m / ||W + scale * delta|| * (W + scale * delta)``)."""
        w = self.modules[module]
        merged = weight.astype(np.float32) + scale * self.delta(module)
        if w.magnitude is not None:
            norm = np.linalg.norm(merged.astype(np.float64), axis=1, keepdims=True)
            factor = w.magnitude.astype(np.float64)[:, None] / np.maximum(norm, 1e-12)
            merged = (factor * merged).astype(np.float32)
        return merged

    def num_parameters(self) -> int:
        return sum(
            w.a.size + w.b.size + (0 if w.magnitude is None else w.magnitude.size)
            for w in self.modules.values()
        )

    # --- file I/O ---------------------------------------------------------------------

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "base": {"architecture": self.base_architecture, "fingerprint": self.base_fingerprint},
            "scaling": "rslora" if self.rslora else "standard",
            "target_modules": self.target_modules or sorted(self.modules),
            "modules": {
                m: {"rank": w.rank, "alpha": float(w.alpha), "dora": w.magnitude is not None}
                for m, w in sorted(self.modules.items())
            },
            "added_tokens": self.added_tokens,
            **({"replaced_tokens": [int(i) for i in self.replaced_tokens]} if self.replaced_tokens else {}),
            **({INVOCATION_KEY: [int(i) for i in self.invocation_tokens]} if self.invocation_tokens else {}),
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike, dtype: DTypeLike = np.float32) -> None:
        tensors = {}
        for m, w in self.modules.items():
            tensors[f"{m}.lora_A"] = w.a.astype(dtype)
            tensors[f"{m}.lora_B"] = w.b.astype(dtype)
            if w.magnitude is not None:
                tensors[f"{m}.lora_magnitude"] = w.magnitude.astype(np.float32)
        if self.embed_rows is not None:
            tensors[EMBED_ROWS] = self.embed_rows.astype(np.float32)
        if self.head_rows is not None:
            tensors[HEAD_ROWS] = self.head_rows.astype(np.float32)
        for name, rows in (
            (REPLACED_EMBED_ROWS, self.replaced_embed_rows),
            (REPLACED_HEAD_ROWS, self.replaced_head_rows),
        ):
            if rows is not None:
                tensors[name] = rows.astype(np.float32)
        save_tensors(path, tensors, {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        base: ModelConfig | None = None,
        base_fingerprint: str | None = None,
        data: bytes | bytearray | memoryview | None = None,
        base_token_id: TokenId | None = None,
    ) -> Adapter:
        """Read and validate an adapter file; with ``base`` / ``base_fingerprint`` / ``base_token_id``
        also check it fits (see :meth:`check_fits`).

        ``data``: the file's bytes, already read (and hash-checked) by the caller; the tensors are
        views of them and ``path`` only names the file in errors."""
        path = Path(path)
        if data is None and path.is_dir():
            raise EdgeLoraError(
                "expected an adapter .safetensors file, found a directory",
                path=path,
                hint="for a PEFT directory use `edge-lora export --adapter DIR` "
                "or converters.peft.import_peft",
            )
        meta, tensors = _read_checked(SafetensorsFile(path, data=data), base, path)
        groups, rows = _split_tensors(tensors)
        modules = {
            module: _lora_weights(module, parts, meta["modules"].get(module), path)
            for module, parts in groups.items()
        }
        embed_rows, head_rows = rows.get(EMBED_ROWS), rows.get(HEAD_ROWS)
        if not modules and embed_rows is None and REPLACED_EMBED_ROWS not in rows:
            raise EdgeLoraError("adapter holds no LoRA tensors", path=path, hint=REMAKE)
        adapter = cls(
            modules=modules,
            base_architecture=str(meta["base"].get("architecture")),
            base_fingerprint=meta["base"].get("fingerprint"),
            rslora=meta.get("scaling") == "rslora",
            target_modules=list(meta.get("target_modules") or []),
            added_tokens=list(meta.get("added_tokens") or []),
            embed_rows=embed_rows,
            head_rows=head_rows,
            replaced_tokens=list(meta.get("replaced_tokens") or []),
            replaced_embed_rows=rows.get(REPLACED_EMBED_ROWS),
            replaced_head_rows=rows.get(REPLACED_HEAD_ROWS),
            invocation_tokens=list(meta.get(INVOCATION_KEY) or []),
            extra=meta.get("extra") or {},
        )
        check_token_rows(adapter, path)
        if adapter.activated and adapter.dora:  # PEFT has no aLoRA variant of DoRA either
            raise EdgeLoraError("an activated adapter (aLoRA) cannot be DoRA", path=path, hint=REMAKE)
        if adapter.activated and adapter.token_rows:  # its prompt before the invocation is the base's
            raise EdgeLoraError(
                "an activated adapter (aLoRA) cannot add or replace tokens", path=path, hint=REMAKE
            )
        if base is not None or base_fingerprint is not None or base_token_id is not None:
            adapter.check_fits(base, base_fingerprint, path=path, base_token_id=base_token_id)
        return adapter

    def check_fits(
        self,
        base: ModelConfig | None,
        base_fingerprint: str | None = None,
        *,
        path: str | os.PathLike | None = None,
        base_token_id: TokenId | None = None,
    ) -> None:
        """Refuse an adapter made for another base, naming the base it was made for; with
        ``base_token_id`` (the base vocabulary's lookup) also a new token the base already has."""
        if base_fingerprint and self.base_fingerprint and base_fingerprint != self.base_fingerprint:
            raise EdgeLoraError(
                f"adapter was made for base {self.base_architecture} {self.base_fingerprint[:19]}…, "
                f"not this base ({base_fingerprint[:19]}…)",
                path=path,
                hint="wrong base model? export the adapter's own base, or retrain the adapter on this one",
            )
        if base_token_id is not None:
            check_new_token_strings(self.added_tokens, base_token_id, path)
        if base is None:
            return
        if self.base_architecture != base.architecture:
            raise EdgeLoraError(
                f"adapter was made for a {self.base_architecture}, the base is a {base.architecture}",
                path=path,
                hint="wrong base model?",
            )
        shapes = linear_modules(base, include_lm_head=True)
        for module, w in self.modules.items():
            if module not in shapes:
                raise EdgeLoraError(
                    f"module {module!r} is not a linear layer of this base",
                    path=path,
                    hint="wrong base model?",
                )
            out_f, in_f = shapes[module]
            if w.a.shape[1] != in_f or w.b.shape[0] != out_f:
                raise EdgeLoraError(
                    f"module {module!r}: adapter shapes A{list(w.a.shape)} B{list(w.b.shape)} "
                    f"do not fit the base's [{out_f}, {in_f}]",
                    path=path,
                    hint="wrong base model?",
                )
        check_token_rows_fit(self, base, path)
        check_ids_in_vocab("invocation token ids", self.invocation_tokens, base, path)


def _read_checked(
    st: SafetensorsFile, base: ModelConfig | None, path: Path
) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata, tensors)``, the data read only once the header passed every check."""
    meta = read_metadata(st, path)
    check_names_and_dtypes(st, path)
    if base is not None:
        check_declared_shapes(st, base, path)
    tensors = st.read_all()  # only once the header passed every check
    bad = st.first_nonfinite()
    if bad is not None:
        raise EdgeLoraError(
            f"tensor {bad!r} holds NaN or Inf",
            path=path,
            hint="the training diverged or the file is corrupt",
        )
    return meta, tensors


def _split_tensors(
    tensors: dict[str, np.ndarray],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``({module: {lora_A|lora_B|lora_magnitude: array}}, {token-row tensor: fp32 array})``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    rows: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if name in ROW_TENSORS:
            rows[name] = arr.astype(np.float32, copy=False)
            continue
        match = LORA_TENSOR.match(name)
        # F16 stays F16: consumers widen where they need to
        groups.setdefault(match["module"], {})[match["part"]] = arr
    return groups, rows


def _lora_weights(module: str, parts: dict[str, np.ndarray], info: object, path: Path) -> LoraWeights:
    """One module's weights, its tensors checked against each other and against its metadata ``info``."""
    if "lora_A" not in parts or "lora_B" not in parts:
        raise EdgeLoraError(f"module {module!r} needs both lora_A and lora_B", path=path, hint=REMAKE)
    a, b = parts["lora_A"], parts["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise EdgeLoraError(
            f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank",
            path=path,
            hint=REMAKE,
        )
    if not isinstance(info, dict) or "alpha" not in info:
        raise EdgeLoraError(
            f"module {module!r} has tensors but no rank/alpha in the metadata",
            path=path,
            hint=REMAKE,
        )
    if info.get("rank", a.shape[0]) != a.shape[0]:
        raise EdgeLoraError(
            f"module {module!r}: metadata rank {info.get('rank')} but tensors have rank {a.shape[0]}",
            path=path,
            hint=REMAKE,
        )
    mag = parts.get("lora_magnitude")
    if mag is not None and mag.shape != (b.shape[0],):
        raise EdgeLoraError(
            f"module {module!r}: lora_magnitude shape {list(mag.shape)} != [{b.shape[0]}]",
            path=path,
            hint=REMAKE,
        )
    return LoraWeights(a=a, b=b, alpha=alpha_value(info["alpha"], module, path), magnitude=mag)
