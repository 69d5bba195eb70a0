"""The files the quality rows compare, all made from the same full-precision Hugging Face folder in the
same run, cached under ``<bench cache>/quality/<key>`` (rebuilt when the exporters' sources, the
model or the list changes; a build that stops half way is redone, never half used):

ours      ``edge-lora export`` as its CLI does by default (converters.export, 4-bit scales fitted with
          ``--calibration auto``'s importance): ONNX fast (int4, int8, fp32) and portable (int4, int8) in
          two bundles, GGUF in every quant edge_lora.gguf_format.quant.QUANTS lists but f16/bf16; and the
          two default files with ``--calibration none`` (the scale search alone)
today     the two default files (ONNX int4, GGUF q4_0) from the exporter of :data:`BASELINE_REV`, before
          issue 32's quantizer work (its sources from ``git archive``), for the before/after rows
peers     llama.cpp's own quantizer (``llama_model_quantize``, q4_0 and q4_k_m) from our f32 GGUF of
          the same weights; the ONNX Runtime GenAI model builder (int4 CPU, its default and
          ``algo_config=k_quant_mixed``)

``plan_exports`` lists each row as an :class:`Export` (what to build, where its file is, how to score
and time it); ``build`` makes whatever is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# 16-bit files (ONNX fp16, GGUF f16/bf16) are left out: they score as full precision, which the fp32/f32
# rows check through the same engines, and scoring them costs minutes on 2 cores
FULL_ONNX_FAST = ("int4", "int8", "fp32")
SIXTEEN_BIT = ("f16", "bf16")
FULL_ONNX_PORTABLE = ("int4", "int8")
QUICK = {"onnx": ("int4",), "portable": (), "gguf": ("q4_0",), "peers": False}
PEER_GGUF = ("q4_0", "q4_k_m")  # llama.cpp's quantizer, from an f32 GGUF
BUILDER_OPTIONS = {"int4": [], "int4 k_quant_mixed": ["--extra_options", "algo_config=k_quant_mixed"]}
# our current defaults: the speed and size ratios are taken against these rows
DEFAULT_ONNX, DEFAULT_GGUF = "edge-lora onnx int4", "edge-lora gguf q4_0"
# "today's" defaults: the same two files from the exporter as it was before issue 32's quantizer work,
# exported in the same run from this commit's sources (``git archive``), so before and after are measured
# side by side
BASELINE_REV = "1e6ba8c"
TODAY = " today"  # label suffix of those rows
NO_CALIBRATION = " no calibration"  # label suffix of the default files exported with --calibration none


@dataclass
class Export:
    """One row: its label, format ("onnx" / "gguf" / "hf"), who made it, and how to reach its file."""

    label: str
    fmt: str
    source: str  # "full precision", "edge-lora", "llama.cpp quantize", "ORT GenAI builder"
    quant: str
    files: list[Path] = field(default_factory=list)  # its file, or its ONNX folder (graphs + weights)
    ppl: dict = field(default_factory=dict)  # benchmarks.quality_ppl spec, less the windows
    decode: dict = field(default_factory=dict)  # benchmarks.worker spec, less the common keys


def digest(hf_dir: Path, lists: dict) -> str:
    """The cache key: the model's fingerprint, the exporters' sources, the export lists."""
    from benchmarks.models import exporters_digest
    from edge_lora.model_dir import ModelDir

    text = json.dumps([ModelDir(hf_dir).fingerprint, exporters_digest(), lists], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lists_for(quick: bool) -> dict:
    """What a run exports: everything on a full run; the two default 4-bit files on a quick one."""
    from edge_lora.gguf_format.quant import QUANTS

    if quick:
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in QUICK.items()}, "today": False}
    return {
        "onnx": list(FULL_ONNX_FAST),
        "portable": list(FULL_ONNX_PORTABLE),
        "gguf": [q for q in QUANTS if q not in SIXTEEN_BIT],
        "peers": True,
        "today": True,
        "no_calibration": True,
    }


def plan_exports(hf_dir: Path, root: Path, lists: dict) -> list[Export]:
    """Every row of the quality table, the full-precision reference first."""
    main, portable = root / "bundle", root / "bundle-portable"
    rows = [
        Export(
            "full precision (transformers fp32)",
            "hf",
            "full precision",
            "fp32",
            sorted(hf_dir.glob("*.safetensors")),
            {"engine": "hf", "path": str(hf_dir)},
            {"kind": "peer-hf", "hf_dir": str(hf_dir)},
        )
    ]
    for bundle, variant, quants in ((main, "fast", lists["onnx"]), (portable, "portable", lists["portable"])):
        for q in quants:
            folder = bundle / "onnx" / f"{q}-{variant}"
            rows.append(
                Export(
                    f"edge-lora onnx {q}{'' if variant == 'fast' else ' portable'}",
                    "onnx",
                    "edge-lora",
                    q,
                    [folder],
                    {"engine": "ours-onnx", "path": str(bundle), "quant": q, "variant": variant},
                    {
                        "kind": "ours-onnx",
                        "backend": "onnx",
                        "bundle": str(bundle),
                        "quant": q,
                        "adapters": [],  # the bundle holds one variant: the runtime takes it
                    },
                )
            )
    for q in lists["gguf"]:
        path = main / "gguf" / f"model-{q}.gguf"
        rows.append(_gguf_row(f"edge-lora gguf {q}", "edge-lora", q, path, main))
    nocal = root / "bundle-nocal"
    if lists.get("no_calibration"):
        folder = nocal / "onnx" / "int4-fast"
        rows.append(
            Export(
                DEFAULT_ONNX + NO_CALIBRATION,
                "onnx",
                "edge-lora",
                "int4",
                [folder],
                {"engine": "ours-onnx", "path": str(nocal), "quant": "int4", "variant": "fast"},
                {
                    "kind": "ours-onnx",
                    "backend": "onnx",
                    "bundle": str(nocal),
                    "quant": "int4",
                    "adapters": [],
                },
            )
        )
        path = nocal / "gguf" / "model-q4_0.gguf"
        rows.append(_gguf_row(DEFAULT_GGUF + NO_CALIBRATION, "edge-lora", "q4_0", path, nocal))
    if lists.get("today"):
        rows += _today_rows(root / "bundle-today")
    if lists["peers"]:
        for q in PEER_GGUF:
            path = root / "peers" / f"llama-quantize-{q}.gguf"
            rows.append(_gguf_row(f"llama.cpp quantize {q}", "llama.cpp quantize", q, path, None))
        for name in BUILDER_OPTIONS:
            folder = root / "peers" / f"genai-{name.replace(' ', '-')}"
            rows.append(
                Export(
                    f"ORT GenAI builder {name}",
                    "onnx",
                    "ORT GenAI builder",
                    name,
                    [folder],
                    {"engine": "ort-folder", "path": str(folder)},
                    {"kind": "peer-genai", "folder": str(folder)},
                )
            )
    return rows


def _today_rows(bundle: Path) -> list[Export]:
    """Today's two default files (:data:`BASELINE_REV`'s exporter), scored and timed as ours are."""
    folder = bundle / "onnx" / "int4-fast"
    onnx = Export(
        DEFAULT_ONNX + TODAY,
        "onnx",
        "edge-lora today",
        "int4",
        [folder],
        {"engine": "ours-onnx", "path": str(bundle), "quant": "int4", "variant": "fast"},
        {"kind": "ours-onnx", "backend": "onnx", "bundle": str(bundle), "quant": "int4", "adapters": []},
    )
    gguf_file = bundle / "gguf" / "model-q4_0.gguf"
    return [onnx, _gguf_row(DEFAULT_GGUF + TODAY, "edge-lora today", "q4_0", gguf_file, bundle)]


def _gguf_row(label: str, source: str, quant: str, path: Path, bundle: Path | None) -> Export:
    """A GGUF row: scored by llama.cpp itself; timed by our runtime (our bundle) or llama.cpp's own
    ``Llama`` (a peer's file)."""
    if bundle is not None:
        decode = {"kind": "ours-llamacpp", "backend": "llamacpp", "bundle": str(bundle), "quant": quant}
        decode["adapters"] = []
    else:
        decode = {"kind": "peer-llamacpp", "gguf": str(path)}
    return Export(label, "gguf", source, quant, [path], {"engine": "gguf", "path": str(path)}, decode)


def build(hf_dir: Path, root: Path, lists: dict, say=print) -> dict[str, str]:
    """Make every file of ``plan_exports`` that is missing (ours, then today's and the peers'). Ours must
    build; a row of today's or a peer's that cannot be built here is returned as {label: error} and
    left out, the others go on."""
    from benchmarks.models import _build_into, _fresh

    recipe = {"lists": lists}
    main, portable = root / "bundle", root / "bundle-portable"
    gguf = list(lists["gguf"]) + (["f32"] if lists["peers"] and "f32" not in lists["gguf"] else [])
    if not _fresh(main, recipe):
        say(f"[quality] edge-lora export: onnx {lists['onnx']} (fast), gguf {gguf}")
        _build_into(main, recipe, lambda tmp: _export(hf_dir, tmp, "fast", lists["onnx"], gguf))
    if lists["portable"] and not _fresh(portable, recipe):
        say(f"[quality] edge-lora export: onnx {lists['portable']} (portable)")
        _build_into(portable, recipe, lambda tmp: _export(hf_dir, tmp, "portable", lists["portable"], []))
    if lists.get("no_calibration") and not _fresh(root / "bundle-nocal", recipe):
        say("[quality] edge-lora export --calibration none: onnx int4, gguf q4_0")
        build_nocal = lambda tmp: _export(hf_dir, tmp, "fast", ["int4"], ["q4_0"], "none")  # noqa: E731
        _build_into(root / "bundle-nocal", recipe, build_nocal)
    steps = {}
    if lists.get("today") and not _fresh(root / "bundle-today", recipe):
        labels = (DEFAULT_ONNX + TODAY, DEFAULT_GGUF + TODAY)
        steps[labels] = lambda: _build_into(
            root / "bundle-today", recipe, lambda tmp: _export_today(hf_dir, tmp, root)
        )
    if lists["peers"]:
        f32 = main / "gguf" / "model-f32.gguf"
        for q in PEER_GGUF:
            steps[(f"llama.cpp quantize {q}",)] = lambda q=q: _llama_quantize(f32, root / "peers", q, say)
        for name, extra in BUILDER_OPTIONS.items():
            folder = root / "peers" / f"genai-{name.replace(' ', '-')}"
            steps[(f"ORT GenAI builder {name}",)] = lambda f=folder, e=extra: _builder(hf_dir, f, e, say)
    errors = {}
    for labels, step in steps.items():
        try:
            step()
        except Exception as err:  # noqa: BLE001  a peer that cannot be built here is reported, not fatal
            say(f"[quality] {', '.join(labels)}: not built: {str(err)[-400:]}")
            errors.update({label: str(err)[-600:] for label in labels})
    return errors


def _export(
    hf_dir: Path, tmp: Path, variant: str, onnx: list[str], gguf: list[str], calibration: str = "auto"
) -> None:
    """``edge-lora export --calibration CALIBRATION`` into ``tmp/`` (the bundle is the folder itself, so
    it is written over the empty staging folder)."""
    from converters.export import ExportOptions, export_bundle
    from edge_lora.app.calibration import export_importance

    backends = (["onnx"] if onnx else []) + (["gguf"] if gguf else [])
    options = ExportOptions(
        backends=backends, onnx_quants=onnx, onnx_variant=variant, gguf_quants=gguf, force=True
    )
    options.importance = export_importance(calibration, hf_dir, onnx + gguf, say=lambda _: None)
    export_bundle(hf_dir, tmp, [], options, show_progress=False)


_EXPORT_TODAY = """
import sys
from converters.export import ExportOptions, export_bundle
import converters.export
assert converters.export.__file__.startswith(sys.argv[3]), converters.export.__file__
options = ExportOptions(onnx_quants=["int4"], gguf_quants=["q4_0"], force=True)
export_bundle(sys.argv[1], sys.argv[2], [], options, show_progress=False)
"""


def _export_today(hf_dir: Path, tmp: Path, root: Path) -> None:
    """:data:`BASELINE_REV`'s ``converters`` and ``edge_lora`` (``git archive`` of this checkout, unpacked
    once under ``root``) export the two default files into ``tmp`` in a process of their own."""
    import shutil
    import tarfile
    from io import BytesIO

    from benchmarks.pool import ROOT

    src = root / f"src-{BASELINE_REV}"
    if not (src / ".complete").is_file():
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", BASELINE_REV, "converters", "edge_lora"],
            capture_output=True,
            check=True,
        ).stdout
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
        (src / ".complete").write_text(BASELINE_REV + "\n")
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_TODAY, str(hf_dir), str(tmp), str(src)],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,  # ``python -c`` puts its working directory first on the path
    )
    if proc.returncode != 0:
        raise RuntimeError(f"today's export ({BASELINE_REV}) failed:\n{(proc.stderr or proc.stdout)[-2000:]}")


def _llama_quantize(f32: Path, out: Path, quant: str, say=print) -> None:
    """llama.cpp's own quantizer on our f32 GGUF (the file type by gguf-py's name for ``quant``)."""
    from converters.gguf_kquant import llama_quantize
    from edge_lora.gguf_format.quant import file_type

    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"llama-quantize-{quant}.gguf"
    if dst.is_file():
        return
    say(f"[quality] llama.cpp quantize {quant}")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    llama_quantize(f32, tmp, int(file_type(quant)))
    os.replace(tmp, dst)


def _builder(hf_dir: Path, out: Path, extra: list[str], say=print) -> None:
    """ONNX Runtime GenAI's model builder, int4 on the CPU, with ``extra`` options (as benchmarks.peers
    runs it); built into a sibling folder, then moved into place."""
    import shutil

    if (out / ".built").is_file():
        return
    say(f"[quality] onnxruntime_genai model builder int4 {' '.join(extra)}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp)]
    cmd += ["-p", "int4", "-e", "cpu", "-c", str(out.parent / "hf-cache"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"the onnxruntime_genai model builder failed:\n{(proc.stderr or proc.stdout)[-2000:]}"
        )
    (tmp / ".built").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
