"""An adapter's files in a bundle: the adapter read and checked against the base it ships with, then
its source ``.safetensors`` and one file per backend written under ``adapters/``, and the entry
bundle.json records for it. A backend that cannot apply the adapter unmerged gets no file, and the
entry says why (the runtime can still merge it from the source)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.bundle_staging import write_via_temp
from edge_lora.adapter import Adapter
from edge_lora.adapter_dtype import GGUF_DTYPE, SOURCE_DTYPE, rounded
from edge_lora.bundle import VARIANTS_KEY, sha256_file
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.lora_adapter import merged_variant_reason
from edge_lora.onnx_format import names as onnx_names
from edge_lora.onnx_format.layout import read_layout
from edge_lora.token_rows import TokenId

if TYPE_CHECKING:
    from converters.peft_tokens import BaseRows

BACKENDS = ("onnx", "gguf")
AdapterWriter = Callable[[Adapter, ModelConfig, Path], object]


def load_adapter(
    path: str | os.PathLike,
    config: ModelConfig,
    base_fingerprint: str,
    base_table: Callable[[np.ndarray], bool] | None = None,
    base_rows: BaseRows | None = None,
    base_token_id: TokenId | None = None,
) -> Adapter:
    """Our adapter file or a PEFT directory, checked against the base it will ship with
    (``base_table``: see converters/tied_head.py, for PEFT's copy of a tied head; ``base_token_id``: the
    base vocabulary's lookup, which refuses a new token the base already has)."""
    path = Path(path)
    if not path.exists():
        raise EdgeLoraError(
            "adapter not found", path=path, hint="pass an edge-lora adapter .safetensors or a PEFT directory"
        )
    if path.is_dir():
        from converters.peft import import_peft

        adapter = import_peft(
            path, base=config, base_table=base_table, base_rows=base_rows, base_token_id=base_token_id
        )
        adapter.base_fingerprint = adapter.base_fingerprint or base_fingerprint  # PEFT records no fingerprint
        return adapter
    return Adapter.load(path, base=config, base_fingerprint=base_fingerprint, base_token_id=base_token_id)


def write_adapter(
    root: Path,
    name: str,
    adapter: Adapter,
    config: ModelConfig,
    backends: list[str],
    stem: str | None = None,
    dtype: str = "fp32",
    merged_variants: bool = False,
) -> dict:
    """The adapter's source file plus one file per backend (named ``stem``, default ``name``);
    returns its manifest entry. ``merged_variants``: an adapter no GGUF LoRA can express also ships
    merged into a copy of each GGUF base of the bundle (for runtimes that cannot merge, the C library)."""
    stem = stem or name
    folder = root / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / f"{stem}.safetensors"
    adapter = rounded(adapter, dtype)  # every file below holds the same (rounded) values
    adapter.save(source, dtype=SOURCE_DTYPE[dtype])
    entry = {
        "source": f"adapters/{stem}.safetensors",
        "scale": 1.0,
        "rank": max((w.rank for w in adapter.modules.values()), default=0),
        "modules": len(adapter.modules),
        "dora": adapter.dora,
        "sha256": sha256_file(source),
        "base_fingerprint": adapter.base_fingerprint,
        "dtype": dtype,
        **({"added_tokens": list(adapter.added_tokens)} if adapter.added_tokens else {}),
    }
    for note in adapter.extra.get("notes") or []:
        print(f"note: adapter {name!r}: {note}", file=sys.stderr)
    for backend in [b for b in BACKENDS if b in backends]:
        _write_backend_file(root, folder, stem, name, backend, adapter, config, dtype, entry)
    if merged_variants and "gguf" in backends and merged_variant_reason(adapter, config):
        entry[VARIANTS_KEY] = _write_merged_variants(root, stem, adapter, config)
    return entry


def _write_merged_variants(root: Path, stem: str, adapter: Adapter, config: ModelConfig) -> dict:
    """The adapter merged at scale 1 into a copy of each GGUF base (``gguf/model-<quant>.gguf``), each
    tensor in its base's type (edge_lora/gguf_format/merge.py, precision "base"): what the Python runtime
    makes at add_adapter, made once here. ``{quant: file}``."""
    from edge_lora.gguf_format.merge import write_merged_gguf

    variants = {}
    for base in sorted((root / "gguf").glob("model-*.gguf")):
        quant = base.stem.removeprefix("model-")
        rel = f"adapters/{stem}.merged-{quant}.gguf"
        write_via_temp(root / rel, lambda p, base=base: write_merged_gguf(base, p, config, adapter, 1.0))
        variants[quant] = rel
    return variants


def _write_backend_file(
    root: Path,
    folder: Path,
    stem: str,
    name: str,
    backend: str,
    adapter: Adapter,
    config: ModelConfig,
    dtype: str,
    entry: dict,
) -> None:
    """One backend's file of the adapter, or the entry's note of why that backend has none."""
    writers = {
        "onnx": (".onnx_adapter", lambda _dtype: _onnx_adapter_writer(root)),
        "gguf": (".gguf", _gguf_adapter_writer),
    }
    suffix, writer = writers[backend]
    if backend == "gguf" and merged_variant_reason(adapter, config):
        # no GGUF LoRA can express it: the llama.cpp runtime merges it into a variant of the base when added
        reason = merged_variant_reason(adapter, config)
        entry["gguf_merged"] = f"merged into a variant of the base at add_adapter ({reason})"
        return
    try:
        write_via_temp(folder / f"{stem}{suffix}", lambda p: writer(dtype)(adapter, config, p))
        entry[backend] = f"adapters/{stem}{suffix}"
    except (
        EdgeLoraError
    ) as err:  # e.g. DoRA, or LoRA on a tied lm_head: this backend cannot apply it unmerged
        entry[f"{backend}_skipped"] = err.message
        print(
            f"note: adapter {name!r} has no {backend} file ({err.message}); "
            "the runtime can still merge it from the source",
            file=sys.stderr,
        )


def _onnx_adapter_writer(root: Path) -> AdapterWriter:
    """``export_onnx_adapter`` for the bundle at ``root``: refuses modules its graph has no slot for,
    and gives a DoRA adapter the weights of the bundle's most precise ONNX export for its norms."""
    from converters.onnx_export import export_onnx_adapter
    from edge_lora.onnx_format.weight_store import WeightStore

    order = {q: i for i, q in enumerate(("fp32", "fp16", "int8", "int4"))}
    layouts = sorted(
        root.glob(f"onnx/*/{onnx_names.LAYOUT_FILE}"), key=lambda p: order.get(p.parent.name.split("-")[0], 9)
    )

    def write(adapter: Adapter, config: ModelConfig, path: Path) -> Path:
        weights = None
        if layouts:
            layout = read_layout(layouts[0].parent / onnx_names.MODEL_FILE)
            missing = sorted(set(adapter.modules) - set(layout["lora_slots"]))
            if missing:
                raise EdgeLoraError(
                    f"the bundle's ONNX graph has no LoRA slot for {missing[0]!r}",
                    hint="re-export the bundle with this edge-lora",
                )
            if adapter.dora and not layout.get("dora"):
                raise EdgeLoraError(
                    "the bundle's ONNX graph predates the DoRA rescale input", hint="re-export the bundle"
                )
            weights = WeightStore(layout, layouts[0].parent / layout["data_file"]).module_weights(path)
        return export_onnx_adapter(adapter, config, path, weights=weights)

    return write


def _gguf_adapter_writer(dtype: str = "fp32") -> AdapterWriter:
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter

    return lambda adapter, config, path: export_gguf_adapter(adapter, config, path, dtype=GGUF_DTYPE[dtype])
