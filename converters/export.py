"""The bundle writer behind `edge-lora export`: a quantized base per backend plus separate adapters.

A fresh bundle is written into a hidden sibling folder and renamed into place at the end
(converters/bundle_staging.py), so an interrupted export leaves no half bundle under the target
name; each adapter's files come from converters/bundle_adapter_files.py. ``add_adapter`` writes the new
adapter files first and rewrites bundle.json (atomically) last, so the bundle is valid at every
moment. bundle.json records every file with its SHA-256; see edge_lora/bundle.py for the format.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

from converters.bundle_adapter_files import BACKENDS, load_adapter, write_adapter
from converters.bundle_staging import check_target, hash_files, make_readable, move_into_place, scratch_dir
from edge_lora import __version__
from edge_lora.adapter import Adapter
from edge_lora.adapter_dtype import check_adapter_dtype
from edge_lora.bundle import Bundle, adapter_files, sha256_file, write_manifest
from edge_lora.chat_template import TEMPLATE_FILE
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format import quant as gguf_quant
from edge_lora.importance import FILE_NAME as IMPORTANCE_FILE
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names as onnx_names
from edge_lora.token_rows import base_token_ids

ONNX_QUANTS = onnx_names.QUANTS
GGUF_QUANTS = gguf_quant.QUANTS
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class AdapterSource:
    """An adapter to put in a bundle: our .safetensors file or a PEFT directory, and its bundle name."""

    path: Path
    name: str

    @classmethod
    def parse(cls, spec: str) -> AdapterSource:
        """``PATH[:NAME]``; the name defaults to the file (or folder) name without its suffix."""
        path, _, name = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
        path = Path(path)
        name = name or path.name.removesuffix(".safetensors")
        check_adapter_name(name)
        return cls(path, name)


@dataclass
class ExportOptions:
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    onnx_quants: list[str] = field(default_factory=lambda: ["int4"])
    onnx_variant: str = "fast"
    gguf_quants: list[str] = field(default_factory=lambda: ["q4_0"])
    force: bool = False  # replace an existing bundle at the target
    adapter_dtype: str = "fp32"  # adapter files' values: fp32, fp16, int8 (edge_lora/adapter_dtype.py)
    # adapters no GGUF LoRA can express (DoRA, LoRA on a tied head) also merged into a copy of each GGUF
    # base, for runtimes that cannot merge at add time (the C library); a base-sized file each
    gguf_merged_variants: bool = False
    # per-column input importance from calibration text (edge_lora/importance.py): weighs the 4-bit
    # quantizers' scale search; written into the bundle so the trainer can rebuild the same base
    importance: Importance | None = None

    def validate(self) -> None:
        check_adapter_dtype(self.adapter_dtype)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise EdgeLoraError(
                f"unknown backend {unknown[0] if unknown else '(none)'!r}",
                hint=f"choose from {', '.join(BACKENDS)}",
            )
        for quant, known, flag in [(q, ONNX_QUANTS, "--onnx-quant") for q in self.onnx_quants] + [
            (q, GGUF_QUANTS, "--gguf-quant") for q in self.gguf_quants
        ]:
            if quant not in known:
                raise EdgeLoraError(
                    f"{flag} {quant!r} is not supported", hint=f"choose from {', '.join(known)}"
                )


class Progress:
    """One line per long step on stderr: what runs now, then how long it took."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr

    def step(self, what: str) -> _Step:
        return _Step(self, what)

    def notes(self, message: str) -> None:
        """A writer's progress callback that keeps only its notes (what the user should know), not its
        chatter."""
        if self.enabled and message.startswith("note:"):
            print(f"      {message}", file=self.stream, flush=True)


class _Step:
    def __init__(self, progress: Progress, what: str):
        self.progress, self.what = progress, what

    def __enter__(self) -> _Step:
        p = self.progress
        p.done += 1
        self.start = time.perf_counter()
        if p.enabled:
            print(f"[{p.done}/{p.total}] {self.what} ...", file=p.stream, flush=True)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.progress.enabled and kind is None:
            print(
                f"      done in {time.perf_counter() - self.start:.1f}s",
                file=self.progress.stream,
                flush=True,
            )


def check_adapter_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise EdgeLoraError(
            f"bad adapter name {name!r}",
            hint="use letters, digits, '_', '-', '.' (up to 64, not starting with a dot)",
        )
    return name


def export_bundle(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    adapters: list[AdapterSource] = (),
    options: ExportOptions | None = None,
    *,
    show_progress: bool = True,
) -> Path:
    """Write a complete bundle at ``out``; returns its path."""
    options = options or ExportOptions()
    options.validate()
    out = Path(out)
    check_target(out, options.force)
    model = ModelDir(model_dir)
    _check_unique_names(adapters)
    steps = (
        2
        + len(adapters)
        + ("onnx" in options.backends) * len(options.onnx_quants)
        + ("gguf" in options.backends) * len(options.gguf_quants)
    )
    progress = Progress(steps, enabled=show_progress)
    with progress.step("reading the base and checking adapters"):
        loaded = _load_adapters(model, adapters)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = scratch_dir(out, "partial")
    try:
        _write_bundle(model, staging, loaded, options, progress)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_unique_names(adapters: list[AdapterSource]) -> None:
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise EdgeLoraError(
            f"two adapters share a name: {sorted({n for n in names if names.count(n) > 1})}",
            hint="give each one a name with PATH:NAME",
        )


def _load_adapters(model: ModelDir, adapters: list[AdapterSource]) -> list[tuple[str, Adapter]]:
    """Each adapter read and checked against the base (and, from PEFT, against its tables)."""
    fingerprint = model.fingerprint
    from converters.peft_tokens import model_dir_rows
    from converters.tied_head import model_dir_check

    token_id = base_token_ids(model.tokenizer_path) if adapters else None
    return [
        (
            src.name,
            load_adapter(
                src.path,
                model.config,
                fingerprint,
                model_dir_check(model),
                model_dir_rows(model),
                base_token_id=token_id,
            ),
        )
        for src in adapters
    ]


def _write_bundle(
    model: ModelDir,
    staging: Path,
    loaded: list[tuple[str, Adapter]],
    options: ExportOptions,
    progress: Progress,
) -> None:
    """Every file of the bundle into ``staging``, bundle.json last."""
    manifest = _write_base(model, staging, options, progress)
    for name, adapter in loaded:
        with progress.step(f"adapter {name}"):
            manifest["adapters"][name] = write_adapter(
                staging,
                name,
                adapter,
                model.config,
                list(manifest["backends"]),
                dtype=options.adapter_dtype,
                merged_variants=options.gguf_merged_variants,
            )
    with progress.step("hashing files and writing bundle.json"):
        make_readable(staging)
        manifest["files"] = hash_files(staging)
        write_manifest(staging, manifest)


def add_adapter(
    bundle_dir: str | os.PathLike,
    source: AdapterSource,
    *,
    replace: bool = False,
    show_progress: bool = True,
    adapter_dtype: str = "fp32",
    gguf_merged_variants: bool = False,
) -> dict:
    """Add one adapter to an existing bundle without touching its base; returns its manifest entry."""
    bundle = Bundle.open(bundle_dir)
    name = check_adapter_name(source.name)
    if name in bundle.adapters and not replace:
        raise EdgeLoraError(
            f"bundle already has an adapter named {name!r}",
            path=bundle.root,
            hint="pick another name with PATH:NAME, or pass --replace",
        )
    progress = Progress(2, enabled=show_progress)
    with progress.step(f"adapter {name}"):
        from converters.tied_head import bundle_check

        token_id = base_token_ids(bundle.require(bundle.tokenizer["tokenizer"]))
        adapter = load_adapter(
            source.path, bundle.config, bundle.base_fingerprint, bundle_check(bundle), base_token_id=token_id
        )
        # a replacement goes to fresh file names: overwriting the files bundle.json vouches for would leave a
        # torn bundle if the process died before the new bundle.json is in place
        stem = f"{name}-{os.urandom(4).hex()}" if name in bundle.adapters else name
        entry = write_adapter(
            bundle.root,
            name,
            adapter,
            bundle.config,
            list(bundle.backends),
            stem=stem,
            dtype=adapter_dtype,
            merged_variants=gguf_merged_variants,
        )
        make_readable(bundle.root / "adapters")
    with progress.step("updating bundle.json"):
        manifest = {k: v for k, v in bundle.raw.items() if k not in ("format", "format_version")}
        old = bundle.adapters.get(name, {})
        files = {k: v for k, v in bundle.files.items() if k not in set(adapter_files(old))}
        for rel in adapter_files(entry):
            path = bundle.root / rel
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest["adapters"] = {**bundle.adapters, name: entry}
        manifest["files"] = dict(sorted(files.items()))
        write_manifest(bundle.root, manifest)
    for rel in adapter_files(old):  # a replaced adapter's files that the new one no longer uses
        if rel not in files:
            (bundle.root / rel).unlink(missing_ok=True)
    return entry


# --- the pieces -------------------------------------------------------------------------


def _write_base(model: ModelDir, root: Path, options: ExportOptions, progress: Progress) -> dict:
    tokenizer = {"tokenizer": "tokenizer.json"}
    shutil.copyfile(model.tokenizer_path, root / "tokenizer.json")
    if (model.path / "tokenizer_config.json").is_file():
        shutil.copyfile(model.path / "tokenizer_config.json", root / "tokenizer_config.json")
        tokenizer["config"] = "tokenizer_config.json"
    if (model.path / TEMPLATE_FILE).is_file():  # newer models keep the chat template beside the config
        shutil.copyfile(model.path / TEMPLATE_FILE, root / TEMPLATE_FILE)
        tokenizer["chat_template"] = TEMPLATE_FILE
    backends: dict[str, list[dict]] = {}
    if "onnx" in options.backends:
        from converters.onnx_export import export_onnx

        for quant in options.onnx_quants:
            rel = f"onnx/{quant}-{options.onnx_variant}"
            with progress.step(f"ONNX base {quant} ({options.onnx_variant})"):
                path = export_onnx(
                    model,
                    root / rel,
                    quant=quant,
                    variant=options.onnx_variant,
                    importance=options.importance,
                )
            backends.setdefault("onnx", []).append(
                {
                    "quant": quant,
                    "variant": options.onnx_variant,
                    "model": Path(path).relative_to(root).as_posix(),
                }
            )
    if "gguf" in options.backends:
        from converters.gguf_export import export_gguf

        for quant in options.gguf_quants:
            with progress.step(f"GGUF base {quant}"):
                path = export_gguf(
                    model,
                    root / f"gguf/model-{quant}.gguf",
                    quant=quant,
                    progress=progress.notes,
                    importance=options.importance,
                )
            backends.setdefault("gguf", []).append(
                {"quant": quant, "model": Path(path).relative_to(root).as_posix()}
            )
    return {
        "created_by": f"edge-lora {__version__}",
        "model": model.config.to_dict(),
        "base_fingerprint": model.fingerprint,
        "base_dtype": model.weight_dtype(),
        "tokenizer": tokenizer,
        "backends": backends,
        "adapters": {},
        "files": {},
        **_calibration_entry(root, options.importance),
    }


def _calibration_entry(root: Path, importance: Importance | None) -> dict:
    """The importance the 4-bit bases were quantized with, kept in the bundle (the trainer's
    ``--base-importance BUNDLE`` rebuilds the very same weights from it)."""
    if importance is None:
        return {}
    importance.save(root / IMPORTANCE_FILE)
    return {
        "calibration": {
            "file": IMPORTANCE_FILE,
            "source": importance.source,
            "tokens": importance.tokens,
            "sha256": importance.digest,
        }
    }
