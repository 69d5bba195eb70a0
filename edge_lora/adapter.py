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
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile, save_tensors
from edge_lora.targets import linear_modules

FORMAT_VERSION = 1
METADATA_KEY = "edge_lora"
EMBED_ROWS = "model.embed_tokens.added_rows"
HEAD_ROWS = "lm_head.added_rows"
# rows that replace base tokens' own rows (PEFT's trainable_token_indices on existing ids), with their ids in
# the metadata's "replaced_tokens"; like the new tokens' rows they apply only while the adapter is active
REPLACED_EMBED_ROWS = "model.embed_tokens.replaced_rows"
REPLACED_HEAD_ROWS = "lm_head.replaced_rows"
_ROWS = (EMBED_ROWS, HEAD_ROWS, REPLACED_EMBED_ROWS, REPLACED_HEAD_ROWS)
_REMAKE = "the file is corrupt or not written by edge-lora: train or export the adapter again"
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude)$")


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
    extra: dict = field(default_factory=dict)  # free-form provenance (trainer settings, source)

    @property
    def token_rows(self) -> bool:
        """Whether it adds tokens or replaces base tokens' rows (its requests see another vocabulary)."""
        return bool(self.added_tokens or self.replaced_tokens)

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
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike, dtype=np.float32) -> None:
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
    ) -> Adapter:
        """Read and validate an adapter file; with ``base`` / ``base_fingerprint`` also check it fits.

        ``data``: the file's bytes, already read (and hash-checked) by the caller; the tensors are
        views of them and ``path`` only names the file in errors."""
        path = Path(path)
        if data is None and path.is_dir():
            raise EdgeLoraError(
                "expected an adapter .safetensors file, found a directory",
                path=path,
                hint="for a PEFT directory use `edge-lora export --adapter DIR` or converters.peft.import_peft",
            )
        st = SafetensorsFile(path, data=data)
        meta = _read_metadata(st, path)
        _check_names_and_dtypes(st, path)
        if base is not None:
            _check_declared_shapes(st, base, path)
        tensors = st.read_all()  # only once the header passed every check
        bad = st.first_nonfinite()
        if bad is not None:
            raise EdgeLoraError(
                f"tensor {bad!r} holds NaN or Inf",
                path=path,
                hint="the training diverged or the file is corrupt",
            )
        modules_meta = meta["modules"]
        groups: dict[str, dict[str, np.ndarray]] = {}
        rows: dict[str, np.ndarray] = {}
        for name, arr in tensors.items():
            if name in _ROWS:
                rows[name] = arr.astype(np.float32, copy=False)
                continue
            match = _TENSOR.match(name)
            groups.setdefault(match["module"], {})[match["part"]] = (
                arr  # F16 stays F16: consumers widen where they need to
            )
        modules = {}
        for module, parts in groups.items():
            if "lora_A" not in parts or "lora_B" not in parts:
                raise EdgeLoraError(
                    f"module {module!r} needs both lora_A and lora_B", path=path, hint=_REMAKE
                )
            a, b = parts["lora_A"], parts["lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
                raise EdgeLoraError(
                    f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank",
                    path=path,
                    hint=_REMAKE,
                )
            info = modules_meta.get(module)
            if not isinstance(info, dict) or "alpha" not in info:
                raise EdgeLoraError(
                    f"module {module!r} has tensors but no rank/alpha in the metadata",
                    path=path,
                    hint=_REMAKE,
                )
            if info.get("rank", a.shape[0]) != a.shape[0]:
                raise EdgeLoraError(
                    f"module {module!r}: metadata rank {info.get('rank')} but tensors have rank {a.shape[0]}",
                    path=path,
                    hint=_REMAKE,
                )
            mag = parts.get("lora_magnitude")
            if mag is not None and mag.shape != (b.shape[0],):
                raise EdgeLoraError(
                    f"module {module!r}: lora_magnitude shape {list(mag.shape)} != [{b.shape[0]}]",
                    path=path,
                    hint=_REMAKE,
                )
            modules[module] = LoraWeights(a=a, b=b, alpha=_alpha(info["alpha"], module, path), magnitude=mag)
        embed_rows, head_rows = rows.get(EMBED_ROWS), rows.get(HEAD_ROWS)
        if not modules and embed_rows is None and REPLACED_EMBED_ROWS not in rows:
            raise EdgeLoraError("adapter holds no LoRA tensors", path=path, hint=_REMAKE)
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
            extra=meta.get("extra") or {},
        )
        if base is not None or base_fingerprint is not None:
            adapter.check_fits(base, base_fingerprint, path=path)
        return adapter

    def check_fits(self, base: ModelConfig | None, base_fingerprint: str | None = None, *, path=None) -> None:
        """Refuse an adapter made for another base, naming the base it was made for."""
        if base_fingerprint and self.base_fingerprint and base_fingerprint != self.base_fingerprint:
            raise EdgeLoraError(
                f"adapter was made for base {self.base_architecture} {self.base_fingerprint[:19]}…, not this base ({base_fingerprint[:19]}…)",
                path=path,
                hint="wrong base model? export the adapter's own base, or retrain the adapter on this one",
            )
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
                    f"module {module!r}: adapter shapes A{list(w.a.shape)} B{list(w.b.shape)} do not fit the base's [{out_f}, {in_f}]",
                    path=path,
                    hint="wrong base model?",
                )
        n_new, n_replaced = len(self.added_tokens), len(self.replaced_tokens)
        for rows, count in (
            (self.embed_rows, n_new),
            (self.head_rows, n_new),
            (self.replaced_embed_rows, n_replaced),
            (self.replaced_head_rows, n_replaced),
        ):
            if rows is not None and (rows.ndim != 2 or rows.shape != (count, base.hidden_size)):
                raise EdgeLoraError(
                    f"token rows {list(rows.shape)} do not fit hidden size "
                    f"{base.hidden_size} and {count} tokens",
                    path=path,
                    hint="wrong base model?",
                )
        bad = [i for i in self.replaced_tokens if not 0 <= i < base.vocab_size]
        if bad or (self.replaced_tokens and self.replaced_embed_rows is None):
            raise EdgeLoraError(
                f"replaced token ids {bad[:4] or self.replaced_tokens[:4]} are not base ids with rows",
                path=path,
                hint=_REMAKE,
            )


def _read_metadata(st: SafetensorsFile, path) -> dict:
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
        raise EdgeLoraError("adapter metadata is not valid JSON", path=path, hint=_REMAKE) from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("modules"), dict)
        or not isinstance(meta.get("base"), dict)
    ):
        raise EdgeLoraError("adapter metadata lacks 'modules' or 'base'", path=path, hint=_REMAKE)
    for key, kinds in (
        ("target_modules", (list, type(None))),
        ("added_tokens", (list, type(None))),
        ("extra", (dict, type(None))),
        ("scaling", (str, type(None))),
    ):
        if not isinstance(meta.get(key), kinds):
            raise EdgeLoraError(f"adapter metadata {key!r} has the wrong type", path=path, hint=_REMAKE)
    if not all(
        isinstance(t, str) for t in (meta.get("target_modules") or []) + (meta.get("added_tokens") or [])
    ):
        raise EdgeLoraError(
            "adapter metadata lists non-string module or token names", path=path, hint=_REMAKE
        )
    replaced = meta.get("replaced_tokens")
    if replaced is not None and not (
        isinstance(replaced, list)
        and all(type(i) is int for i in replaced)
        and len(set(replaced)) == len(replaced)
    ):
        raise EdgeLoraError(
            "adapter metadata 'replaced_tokens' is not a list of distinct token ids", path=path, hint=_REMAKE
        )
    if not isinstance(meta["base"].get("fingerprint"), (str, type(None))):
        raise EdgeLoraError("adapter metadata base fingerprint is not a string", path=path, hint=_REMAKE)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EdgeLoraError(
            f"adapter format version {version!r} is not supported (this edge-lora reads <= {FORMAT_VERSION})",
            path=path,
            hint="upgrade edge-lora",
        )
    return meta


def _check_declared_shapes(st: SafetensorsFile, base: ModelConfig, path) -> None:
    """Refuse tensors the base cannot use from their header alone, before reading any data.

    The header is checked against the file size, but a large (even sparse) file can still declare
    gigabytes; the base bounds every dimension of a usable adapter.
    """
    shapes = linear_modules(base, include_lm_head=True)
    for name, info in st.tensors.items():
        match = _TENSOR.match(name)
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
                f"module {match['module']!r}: adapter shapes {match['part']}{list(dims)} do not fit the base's "
                f"[{out_f}, {in_f}]",
                path=path,
                hint="wrong base model?",
            )


def _alpha(value, module: str, path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeLoraError(
            f"module {module!r}: alpha {value!r} is not a finite number", path=path, hint=_REMAKE
        )
    return float(value)


def _check_names_and_dtypes(st: SafetensorsFile, path) -> None:
    """Refuse foreign tensor names and dtypes from the header, before any data is read."""
    for name, info in st.tensors.items():
        if info.dtype not in ("F32", "F16", "BF16"):
            raise EdgeLoraError(
                f"tensor {name!r} has dtype {info.dtype}; adapters hold float tensors",
                path=path,
                hint="store LoRA weights as F32, F16 or BF16",
            )
        if name not in _ROWS and not _TENSOR.match(name):
            raise EdgeLoraError(
                f"unexpected tensor {name!r}", path=path, hint="adapter tensors are <module>.lora_A / .lora_B"
            )
