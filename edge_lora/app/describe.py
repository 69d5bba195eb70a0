"""What is this file? A bundle, an adapter file, a PEFT directory, a model directory or a GGUF.

``describe(path)`` returns a plain dict (the CLI prints it as text or JSON): the kind, the base
it fits (architecture, fingerprint), and sizes. numpy only; the gguf package is imported lazily
for GGUF files. ``base`` (a bundle or model directory) adds a "fits" verdict for an adapter.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from edge_lora.adapter import Adapter
    from edge_lora.config import ModelConfig
    from edge_lora.token_rows import TokenId

BasePath = str | os.PathLike | None  # a bundle or model directory to judge the fit against


def describe(path: str | os.PathLike, base: str | os.PathLike | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise EdgeLoraError("not found", path=path)
    if path.is_dir():
        if (path / "bundle.json").is_file():
            return _bundle(path)
        if (path / "adapter_config.json").is_file():
            return _peft(path, base)
        if (path / "config.json").is_file():
            return _model_dir(path)
        raise EdgeLoraError(
            "not a bundle, PEFT directory or model directory",
            path=path,
            hint="expected bundle.json, adapter_config.json or config.json inside",
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _gguf(path)
    if path.suffix == ".safetensors":
        return _adapter(path, base)
    raise EdgeLoraError(
        "unrecognised file",
        path=path,
        hint="inspect reads bundles, .safetensors adapters, PEFT dirs, model dirs, .gguf",
    )


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _base_of(base: str | os.PathLike) -> tuple[ModelConfig, str | None, TokenId]:
    """(ModelConfig, fingerprint, vocabulary lookup) of a bundle or a model directory."""
    from edge_lora.bundle import Bundle
    from edge_lora.model_dir import ModelDir
    from edge_lora.token_rows import base_token_ids

    base = Path(base)
    if (base / "bundle.json").is_file():
        b = Bundle.open(base)
        return b.config, b.base_fingerprint, base_token_ids(b.require(b.tokenizer["tokenizer"]))
    md = ModelDir(base)
    return md.config, md.fingerprint, base_token_ids(md.tokenizer_path)


def _fits(adapter: Adapter, base: tuple[ModelConfig, str | None, TokenId] | None, path: Path) -> dict:
    """``base``: what :func:`_base_of` returned (None: no base given, no verdict). The checks are
    adding's own (Adapter.check_fits); ``why`` is the one line adding would print."""
    if base is None:
        return {}
    config, fingerprint, token_id = base
    try:
        adapter.check_fits(config, fingerprint, path=path, base_token_id=token_id)
        return {"fits": True}
    except EdgeLoraError as err:
        return {"fits": False, "why": str(err)}


def _has_variants(entry: dict) -> bool:
    from edge_lora.bundle import VARIANTS_KEY

    return isinstance(entry.get(VARIANTS_KEY), dict)


def _bundle(path: Path) -> dict:
    from edge_lora.bundle import VARIANTS_KEY, Bundle, adapter_files

    b = Bundle.open(path)
    files = lambda rel: b.files.get(rel, {}).get("bytes")  # noqa: E731
    backends = {
        name: [
            {**e, "bytes": _size(b.resolve(e["model"]).parent) if name == "onnx" else files(e["model"])}
            for e in entries
        ]
        for name, entries in b.backends.items()
    }
    return {
        "kind": "bundle",
        "path": str(path),
        "format_version": b.raw.get("format_version"),
        "created_by": b.raw.get("created_by"),
        "architecture": b.config.architecture,
        "base_fingerprint": b.base_fingerprint,
        "model": {
            "layers": b.config.num_hidden_layers,
            "hidden": b.config.hidden_size,
            "vocab": b.config.vocab_size,
        },
        "backends": backends,
        # the text the 4-bit scales were fitted to (docs/quantization.md); absent: no calibration
        **({"calibration": b.raw["calibration"]} if isinstance(b.raw.get("calibration"), dict) else {}),
        "adapters": {
            n: {
                "rank": e.get("rank"),
                "backends": [k for k in ("onnx", "gguf") if k in e],
                **({"gguf_merged_variant": e["gguf_merged"]} if "gguf_merged" in e else {}),
                # shipped merged into a copy of these GGUF bases (export --gguf-merged-variants)
                **({"gguf_variants": sorted(e[VARIANTS_KEY])} if _has_variants(e) else {}),
                **({"added_tokens": _tokens(e["added_tokens"])} if e.get("added_tokens") else {}),
                "bytes": sum(files(rel) or 0 for rel in adapter_files(e)),
            }
            for n, e in b.adapters.items()
        },
        "bytes": _size(path),
    }


def _adapter_summary(adapter: Adapter) -> dict:
    ranks = sorted({w.rank for w in adapter.modules.values()})
    return {
        "architecture": adapter.base_architecture,
        "base_fingerprint": adapter.base_fingerprint,
        "modules": len(adapter.modules),
        "ranks": ranks,
        "rslora": adapter.rslora,
        "dora": adapter.dora,
        "parameters": adapter.num_parameters(),
        "added_tokens": _tokens(adapter.added_tokens),
        "replaced_token_rows": adapter.replaced_tokens[:16] or None,
        "activated_by": adapter.invocation_tokens or None,  # aLoRA: acts from these ids on
        "combined": adapter.extra.get("combined"),  # provenance of `edge-lora combine`
    }


def _tokens(tokens: list[str]) -> str | None:
    """New tokens as one line: ``2: '<sql>', '</sql>'`` (the first 16)."""
    if not tokens:
        return None
    shown = ", ".join(repr(t) for t in tokens[:16])
    return f"{len(tokens)}: {shown}" + (", ..." if len(tokens) > 16 else "")


def _adapter(path: Path, base: BasePath) -> dict:
    """With a base, the file is read exactly as adding it reads it, so a refusal is adding's own line:
    raised when the file is broken in itself, the verdict (fits False) when it only does not fit."""
    from edge_lora.adapter import Adapter

    verdict = {}
    if base is None:
        adapter = Adapter.load(path)
    else:
        config, fingerprint, token_id = _base_of(base)
        try:
            adapter = Adapter.load(path, base=config, base_fingerprint=fingerprint, base_token_id=token_id)
            verdict = {"fits": True}
        except EdgeLoraError as err:
            try:
                adapter = Adapter.load(path)  # readable without the base: it only does not fit this one
            except EdgeLoraError:
                raise err from None
            verdict = {"fits": False, "why": str(err)}
    return {
        "kind": "adapter",
        "path": str(path),
        **_adapter_summary(adapter),
        "bytes": _size(path),
        **verdict,
    }


def _peft(path: Path, base: BasePath) -> dict:
    from converters.peft import import_peft

    # the base is read (and a model dir's fingerprint hashed) once, for the new tokens and the verdict
    base_info = _base_of(base) if base is not None else None
    config = base_info[0] if base_info else None  # new tokens are counted from a base vocabulary
    # describes; export checks the new tokens' base rows and a tied head's saved table against the base
    adapter = import_peft(path, base=config, base_rows=lambda name, rows: True, base_table=lambda saved: True)
    return {
        "kind": "peft",
        "path": str(path),
        "base_model_name_or_path": adapter.extra.get("base_model_name_or_path"),
        **_adapter_summary(adapter),
        "bytes": _size(path),
        **_fits(adapter, base_info, path),
    }


def _model_dir(path: Path) -> dict:
    from edge_lora.model_dir import ModelDir

    md = ModelDir(path)
    c = md.config
    params = sum(math.prod(md.shape(n)) for n in md.tensor_names())
    return {
        "kind": "model",
        "path": str(path),
        "architecture": c.architecture,
        "base_fingerprint": md.fingerprint,
        "model": {
            "layers": c.num_hidden_layers,
            "hidden": c.hidden_size,
            "vocab": c.vocab_size,
            "tied_embeddings": c.tie_word_embeddings,
        },
        "parameters": params,
        "dtype": md.weight_dtype(),
        "bytes": _size(path),
    }


def _gguf(path: Path) -> dict:
    from edge_lora.gguf_format.file_read import open_gguf

    reader = open_gguf(path)  # its layout checked first: gguf-py alone loops for ever on absurd counts

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.contents()
        return value

    arch = field("general.architecture")
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {
        "kind": "gguf-" + (field("general.type") or "model"),
        "path": str(path),
        "architecture": arch,
        "layers": field(f"{arch}.block_count"),
        "alpha": field("adapter.lora.alpha"),
        "activated_by": field("adapter.alora.invocation_tokens"),
        "tensors": len(reader.tensors),
        "tensor_types": kinds,
        "bytes": _size(path),
    }


def format_text(info: dict, indent: int = 0) -> str:
    """A readable, indented rendering of ``describe``'s dict."""
    lines = []
    pad = "  " * indent
    for key, value in info.items():
        if value is None or value == {}:
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(format_text(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            lines += [f"{pad}  - " + ", ".join(f"{k}={v}" for k, v in item.items()) for item in value]
        else:
            if key == "bytes":
                value = f"{value:,} bytes ({value / 1e6:.2f} MB)"
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines)
