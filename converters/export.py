"""The bundle writer behind `edge-lora export`: a quantized base per backend plus separate adapters.

A fresh bundle is written into a hidden sibling folder and renamed into place at the end, so an
interrupted export leaves no half bundle under the target name. ``add_adapter`` writes the new
adapter files first and rewrites bundle.json (atomically) last, so the bundle is valid at every
moment. bundle.json records every file with its SHA-256; see edge_lora/bundle.py for the format.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora import __version__
from edge_lora.adapter import Adapter
from edge_lora.adapter_dtype import GGUF_DTYPE, SOURCE_DTYPE, check_adapter_dtype, rounded
from edge_lora.atomic import exchange_paths
from edge_lora.bundle import MANIFEST, Bundle, sha256_file, write_manifest
from edge_lora.chat_template import TEMPLATE_FILE
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format import quant as gguf_quant
from edge_lora.gguf_format.lora_adapter import merged_variant_reason
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names as onnx_names
from edge_lora.onnx_format.layout import read_layout

BACKENDS = ("onnx", "gguf")
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

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr

    def step(self, what: str):
        return _Step(self, what)

    def notes(self, message: str) -> None:
        """A writer's progress callback that keeps only its notes (what the user should know), not its chatter."""
        if self.enabled and message.startswith("note:"):
            print(f"      {message}", file=self.stream, flush=True)


class _Step:
    def __init__(self, progress: Progress, what: str):
        self.progress, self.what = progress, what

    def __enter__(self):
        p = self.progress
        p.done += 1
        self.start = time.perf_counter()
        if p.enabled:
            print(f"[{p.done}/{p.total}] {self.what} ...", file=p.stream, flush=True)
        return self

    def __exit__(self, kind, err, tb):
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


def load_adapter(
    path: str | os.PathLike, config: ModelConfig, base_fingerprint: str, base_table=None, base_rows=None
) -> Adapter:
    """Our adapter file or a PEFT directory, checked against the base it will ship with
    (``base_table``: see converters/tied_head.py, for PEFT's copy of a tied head)."""
    path = Path(path)
    if not path.exists():
        raise EdgeLoraError(
            "adapter not found", path=path, hint="pass an edge-lora adapter .safetensors or a PEFT directory"
        )
    if path.is_dir():
        from converters.peft import import_peft

        adapter = import_peft(path, base=config, base_table=base_table, base_rows=base_rows)
        adapter.base_fingerprint = adapter.base_fingerprint or base_fingerprint  # PEFT records no fingerprint
        return adapter
    return Adapter.load(path, base=config, base_fingerprint=base_fingerprint)


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
    _check_target(out, options.force)
    model = ModelDir(model_dir)
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise EdgeLoraError(
            f"two adapters share a name: {sorted({n for n in names if names.count(n) > 1})}",
            hint="give each one a name with PATH:NAME",
        )
    steps = (
        2
        + len(adapters)
        + ("onnx" in options.backends) * len(options.onnx_quants)
        + ("gguf" in options.backends) * len(options.gguf_quants)
    )
    progress = Progress(steps, enabled=show_progress)
    with progress.step("reading the base and checking adapters"):
        fingerprint = model.fingerprint
        from converters.peft_tokens import model_dir_rows
        from converters.tied_head import model_dir_check

        loaded = [
            (
                src.name,
                load_adapter(
                    src.path, model.config, fingerprint, model_dir_check(model), model_dir_rows(model)
                ),
            )
            for src in adapters
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _scratch_dir(out, "partial")
    try:
        manifest = _write_base(model, staging, options, progress)
        for name, adapter in loaded:
            with progress.step(f"adapter {name}"):
                manifest["adapters"][name] = _write_adapter(
                    staging,
                    name,
                    adapter,
                    model.config,
                    list(manifest["backends"]),
                    dtype=options.adapter_dtype,
                )
        with progress.step("hashing files and writing bundle.json"):
            _make_readable(staging)
            manifest["files"] = _hash_files(staging)
            write_manifest(staging, manifest)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def add_adapter(
    bundle_dir: str | os.PathLike,
    source: AdapterSource,
    *,
    replace: bool = False,
    show_progress: bool = True,
    adapter_dtype: str = "fp32",
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

        adapter = load_adapter(source.path, bundle.config, bundle.base_fingerprint, bundle_check(bundle))
        # a replacement goes to fresh file names: overwriting the files bundle.json vouches for would leave a
        # torn bundle if the process died before the new bundle.json is in place
        stem = f"{name}-{os.urandom(4).hex()}" if name in bundle.adapters else name
        entry = _write_adapter(
            bundle.root, name, adapter, bundle.config, list(bundle.backends), stem=stem, dtype=adapter_dtype
        )
        _make_readable(bundle.root / "adapters")
    with progress.step("updating bundle.json"):
        manifest = {k: v for k, v in bundle.raw.items() if k not in ("format", "format_version")}
        old = bundle.adapters.get(name, {})
        files = {
            k: v for k, v in bundle.files.items() if k not in {old.get(b) for b in ("source", "onnx", "gguf")}
        }
        for key in ("source", "onnx", "gguf"):
            if key in entry:
                path = bundle.root / entry[key]
                files[entry[key]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest["adapters"] = {**bundle.adapters, name: entry}
        manifest["files"] = dict(sorted(files.items()))
        write_manifest(bundle.root, manifest)
    for key in ("source", "onnx", "gguf"):  # a replaced adapter's files that the new one no longer uses
        if old.get(key) and old[key] not in files:
            (bundle.root / old[key]).unlink(missing_ok=True)
    return entry


# --- the pieces -------------------------------------------------------------------------


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise EdgeLoraError("output exists and is not a folder", path=out, hint="choose another --out")
    if any(out.iterdir()) and not force:
        what = "a bundle" if (out / MANIFEST).is_file() else "a non-empty folder"
        raise EdgeLoraError(
            f"output is already {what}",
            path=out,
            hint="pass --force to replace it, or `edge-lora export --add-adapter` to add adapters",
        )


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
                path = export_onnx(model, root / rel, quant=quant, variant=options.onnx_variant)
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
                    model, root / f"gguf/model-{quant}.gguf", quant=quant, progress=progress.notes
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
    }


def _write_adapter(
    root: Path,
    name: str,
    adapter: Adapter,
    config: ModelConfig,
    backends: list[str],
    stem: str | None = None,
    dtype: str = "fp32",
) -> dict:
    """The adapter's source file plus one file per backend (named ``stem``, default ``name``); returns its manifest entry."""
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
    writers = {
        "onnx": (".onnx_adapter", lambda _dtype: _onnx_adapter_writer(root)),
        "gguf": (".gguf", _gguf_adapter_writer),
    }
    for note in adapter.extra.get("notes") or []:
        print(f"note: adapter {name!r}: {note}", file=sys.stderr)
    for backend in [b for b in BACKENDS if b in backends]:
        suffix, writer = writers[backend]
        if backend == "gguf" and merged_variant_reason(adapter, config):
            # no GGUF LoRA can express it: the llama.cpp runtime merges it into a variant of the base when added
            reason = merged_variant_reason(adapter, config)
            entry["gguf_merged"] = f"merged into a variant of the base at add_adapter ({reason})"
            continue
        try:
            _write_via_temp(folder / f"{stem}{suffix}", lambda p: writer(dtype)(adapter, config, p))
            entry[backend] = f"adapters/{stem}{suffix}"
        except (
            EdgeLoraError
        ) as err:  # e.g. DoRA, or LoRA on a tied lm_head: this backend cannot apply it unmerged
            entry[f"{backend}_skipped"] = err.message
            print(
                f"note: adapter {name!r} has no {backend} file ({err.message}); the runtime can still merge it from the source",
                file=sys.stderr,
            )
    return entry


def _onnx_adapter_writer(root: Path):
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


def _gguf_adapter_writer(dtype: str = "fp32"):
    from edge_lora.gguf_format.lora_adapter import export_gguf_adapter

    return lambda adapter, config, path: export_gguf_adapter(adapter, config, path, dtype=GGUF_DTYPE[dtype])


def _write_via_temp(target: Path, write) -> None:
    """Let an exporter write a temporary name, then rename: a crash never leaves a torn file under ``target``."""
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")  # same suffix: writers may key on it
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _make_readable(root: Path) -> None:
    """Temporary files and folders are created private; a bundle is meant to be shipped and read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o755 if path.is_dir() else 0o644) & ~umask)


def _hash_files(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(root).as_posix()] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
    return files


def _scratch_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of ``out`` named after this process, so a later export can tell an abandoned one."""
    _remove_abandoned_scratch(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def _remove_abandoned_scratch(out: Path) -> None:
    """Remove the scratch folders that killed exports to ``out`` left behind (their process is gone)."""
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}-"
        for leftover in out.parent.glob(glob.escape(prefix) + "*"):
            pid = leftover.name[len(prefix) :].split("-", 1)[0]
            if leftover.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 elsewhere: never remove what might be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists() and exchange_paths(staging, out):  # one atomic swap: old or new, never neither
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old bundle
        return
    if out.exists():
        old = _scratch_dir(out, "old")
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
