"""Every case of the bad-input corpus against every loader: one-line error naming the file, bounded time
and memory.

A case passes when its loader raises EdgeLoraError (never another exception), the message is one line,
names a file of the case, matches what went wrong, and the call took under a few seconds without the
process's peak memory growing (the memory bombs declare terabytes).
"""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest
from gpu_env import child_env
from make_bad_corpus import build_backend_corpus, build_corpus
from security_helpers import RegistryEngine, make_adapter, make_core_bundle
from tiny_models import make_model_dir

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

# a hang guard, not a speed test: a case takes ~0.1 s, but a loaded 2-core CI machine once took 7 s over one
TIME_LIMIT_S = 30
PEAK_GROWTH_LIMIT_MB = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("bad")
    other = make_model_dir(root / "_other_base", "llama", seed=1)
    return build_corpus(root / "cases", model_dirs["llama"], other)


@pytest.fixture(scope="module")
def backend_corpus(tmp_path_factory, model_dirs, base):
    from converters.export import AdapterSource, ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bad_backend")
    make_adapter(base.config, base.fingerprint).save(root / "sql.safetensors")
    bundle = export_bundle(
        base.path,
        root / "good",
        [AdapterSource(root / "sql.safetensors", "sql")],
        ExportOptions(onnx_quants=["int8"], gguf_quants=["q8_0"]),
        show_progress=False,
    )
    return build_backend_corpus(root / "cases", bundle)


@pytest.fixture(scope="module")
def base(model_dirs):
    return ModelDir(model_dirs["llama"])


@pytest.fixture(scope="module")
def good_engine(tmp_path_factory, model_dirs, base):
    root = make_core_bundle(
        tmp_path_factory.mktemp("good") / "bundle",
        model_dirs["llama"],
        {"sql": make_adapter(base.config, base.fingerprint)},
    )
    return RegistryEngine(root)


def core_loaders(case, base, engine):
    """The loaders that must refuse ``case``: (label, zero-argument call)."""
    from converters.peft import import_peft

    if case.kind == "adapter":
        return [
            (
                "Adapter.load",
                lambda: Adapter.load(case.path, base=base.config, base_fingerprint=base.fingerprint),
            ),
            ("Engine.add_adapter", lambda: engine.add_adapter(case.name, case.path)),
        ]
    if case.kind == "peft":
        return [
            (
                "import_peft",
                lambda: import_peft(case.path, base=base.config, base_fingerprint=base.fingerprint),
            )
        ]
    if case.kind == "bundle":
        return [
            ("Bundle.open", lambda: Bundle.open(case.path)),
            ("Engine", lambda: RegistryEngine(case.path)),
        ]
    if case.kind == "bundle_engine":
        return [("Engine", lambda: RegistryEngine(case.path))]
    if case.kind == "bundle_adapter":
        return [("Engine.add_adapter", lambda: RegistryEngine(case.path).add_adapter("sql"))]
    if case.kind == "model_dir":
        return [("ModelDir", lambda: ModelDir(case.path).fingerprint)]
    if case.kind.startswith("backend_"):
        import runtime

        backend = case.kind.rsplit("_", 1)[-1]
        if case.kind.startswith("backend_adapter_"):

            def with_adapter():
                engine = runtime.load(case.path, backend=backend)
                engine.add_adapter("sql")
                engine.generate_ids(
                    [5, 6, 7], runtime.SamplingParams.from_kwargs(max_new_tokens=2), adapters={"sql": 1.0}
                )

            return [(f"{backend} with adapter", with_adapter)]
        return [(f"runtime.load({backend})", lambda: runtime.load(case.path, backend=backend))]
    raise AssertionError(f"no loader for kind {case.kind}")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def bounded(case, allowance_mb: float = 0.0):
    """Fail the case if its body runs past TIME_LIMIT_S (an alarm interrupts a hang) or grows peak memory
    by more than PEAK_GROWTH_LIMIT_MB (plus ``allowance_mb`` where reading the input whole is the job)."""

    def on_alarm(signum, frame):
        raise _Timeout(f"{case.name}: still running after {TIME_LIMIT_S} s")

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIME_LIMIT_S)
    started = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mb < PEAK_GROWTH_LIMIT_MB + allowance_mb, (
        f"{case.name}: peak memory grew {growth_mb:.0f} MB"
    )
    assert time.perf_counter() - started < TIME_LIMIT_S, (
        f"{case.name}: took {time.perf_counter() - started:.1f} s"
    )


def refuse(call, case) -> EdgeLoraError:
    """Run ``call`` bounded in time and memory; return the EdgeLoraError it raised."""
    with bounded(case):
        try:
            call()
        except EdgeLoraError as err:
            return err
    raise AssertionError(f"{case.name}: accepted a bad input")


def check_message(err: EdgeLoraError, case) -> None:
    text = str(err)
    assert "\n" not in text, f"{case.name}: multi-line error {text!r}"
    assert re.search(case.expect, text), f"{case.name}: {text!r} does not match {case.expect!r}"
    assert err.path is not None and case.path.parent.name in err.path or case.name in err.path, (
        f"{case.name}: error does not name a file of the case: {text!r}"
    )
    assert err.hint or case.name in _SELF_EXPLAINING, f"{case.name}: no hint saying what to do: {text!r}"


# Errors whose message alone says what to do (pass the right file / the file is gone).
_SELF_EXPLAINING = {"missing_adapter_file"}


def test_corpus_is_large_and_distinct(corpus):
    names = [c.name for c in corpus]
    assert len(names) == len(set(names)) >= 80


def test_every_core_loader_refuses_every_case(corpus, base, good_engine):
    refuse_all(corpus, base, good_engine)
    assert good_engine.adapters == [], "a bad adapter was registered"


def test_every_backend_refuses_broken_backend_files(backend_corpus, base, good_engine):
    assert len(backend_corpus) >= 20
    # load the backends' libraries first: their own cost (a Vulkan build of llama.cpp maps ~100 MB
    # of shaders at import) is not what a bad file costs
    import onnxruntime  # noqa: F401

    from runtime.llamacpp import lib as llamacpp_lib

    llamacpp_lib.llama_cpp()
    refuse_all(backend_corpus, base, good_engine)


def refuse_all(cases, base, engine) -> None:
    failures, tried = [], 0
    for case in cases:
        for label, call in core_loaders(case, base, engine):
            tried += 1
            try:
                check_message(refuse(call, case), case)
            except Exception as exc:  # collect all, so one run reports every weak loader
                failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    print(f"\n{len(cases)} cases, {tried} loader runs, {tried - len(failures)} clean refusals")
    assert not failures, f"{len(failures)} of {tried} refusals wrong:\n" + "\n".join(failures)


# --- the command line -------------------------------------------------------------------


def cli_commands(case, good_bundle: Path, scratch: Path) -> list[list[str]]:
    """The `edge-lora` invocations that read ``case``."""
    p = str(case.path)
    base_dir = scratch / "base"  # the test copies the base model here, for merge
    data = scratch / "data.jsonl"
    if case.kind in ("adapter", "peft"):
        return [
            ["export", "--quiet", "--add-adapter", str(good_bundle), f"{p}:bad"],
            ["merge", str(base_dir), p, "--out", str(scratch / "merged" / case.name)],
        ]
    if case.kind in ("bundle", "bundle_engine", "bundle_adapter"):
        adapter = ["--adapter", "sql"] if case.kind == "bundle_adapter" else []  # the bundle runs without it
        return [["verify", p], ["run", p, *adapter, "--prompt", "hi", "--max-new-tokens", "2"]]
    if case.kind == "model_dir":
        return [
            [
                "export",
                "--quiet",
                p,
                "--out",
                str(scratch / case.name),
                "--backends",
                "gguf",
                "--gguf-quant",
                "f32",
            ],
            [
                "train",
                "--model",
                p,
                "--data",
                str(data),
                "--out",
                str(scratch / f"{case.name}.safetensors"),
                "--steps",
                "1",
                "--no-progress",
            ],
        ]
    backend = case.kind.rsplit("_", 1)[-1]
    adapter = ["--adapter", "sql"] if case.kind.startswith("backend_adapter_") else []
    return [["run", p, "--backend", backend, *adapter, "--prompt", "hi", "--max-new-tokens", "2"]]


def test_cli_refuses_every_case_in_one_line(corpus, backend_corpus, tmp_path, model_dirs, base, capsys):
    from edge_lora.app.cli import main

    good_bundle = make_core_bundle(
        tmp_path / "good", model_dirs["llama"], {"sql": make_adapter(base.config, base.fingerprint)}
    )
    shutil.copytree(model_dirs["llama"], tmp_path / "base")
    (tmp_path / "data.jsonl").write_text('{"text": "select name from users"}\n')
    # one good run first: the libraries' own first-use memory (imports, arenas) is not what a bad file
    # costs, and whichever case ran first would be charged with it when this test runs alone
    assert main(["run", str(good_bundle), "--adapter", "sql", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    failures, tried = [], 0
    for case in corpus + backend_corpus:
        for argv in cli_commands(case, good_bundle, tmp_path):
            tried += 1
            capsys.readouterr()
            try:
                with bounded(case):
                    code = main(argv)
            except (AssertionError, _Timeout) as exc:
                failures.append(f"edge-lora {argv[0]} {case.name}: {exc}")
                continue
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            problem = (
                f"exit code {code}"
                if code == 0
                else "a traceback"
                if "Traceback" in err
                else f"{len(lines)} lines"
                if len(lines) != 1
                else "no file named"
                if case.name not in err
                else None
            )
            if problem:
                failures.append(
                    f"edge-lora {' '.join(argv[:1])} {case.name}: {problem}: {err.strip()[:300]!r}"
                )
    print(f"\n{tried} CLI runs, {tried - len(failures)} one-line non-zero exits")
    assert sorted(Bundle.open(good_bundle).adapters) == ["sql"], "the CLI added a bad adapter"
    assert not failures, f"{len(failures)} of {tried} CLI runs wrong:\n" + "\n".join(failures)


def test_cli_inspect_describes_or_refuses_every_case(corpus, backend_corpus, capsys):
    """`inspect` needs no base, so some cases are fine to describe; none may crash it (exit 1) or print a
    traceback.

    Without a base nothing bounds an adapter's size but its file: describing one may read it whole (the sparse
    giants really are 256 MiB), so the memory bound here allows three times the input's size."""
    from edge_lora.app.cli import main

    targets = [(c, c.path) for c in corpus + backend_corpus]
    targets += [
        (c, f)
        for c in backend_corpus
        for f in sorted(c.path.rglob("*"))
        if f.suffix in (".gguf", ".onnx", ".onnx_adapter")
    ]
    failures = []
    for case, path in targets:
        capsys.readouterr()
        size_mb = (
            sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
            / 2**20
        )
        with bounded(case, allowance_mb=3 * size_mb):
            code = main(["inspect", str(path)])
        err = capsys.readouterr().err
        if code not in (0, 2) or "Traceback" in err or (code == 2 and len(err.strip().splitlines()) != 1):
            failures.append(f"inspect {case.name} ({path.name}): exit {code}: {err.strip()[:300]!r}")
    assert not failures, f"{len(failures)} of {len(targets)} inspections wrong:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", ["memory_bomb_4_tib_tensor", "bundle_entry_dotdot", "peft_only_pickled_bin"])
def test_cli_process_exit_code_and_verbose_traceback(corpus, tmp_path, model_dirs, base, name):
    """The real process: non-zero exit, one line on stderr; --verbose adds the traceback."""
    import subprocess
    import sys

    case = next(c for c in corpus if c.name == name)
    good_bundle = make_core_bundle(
        tmp_path / "good", model_dirs["llama"], {"sql": make_adapter(base.config, base.fingerprint)}
    )
    argv = cli_commands(case, good_bundle, tmp_path)[0]
    env = child_env(PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def run(extra: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "edge_lora", *extra, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    quiet, verbose = run([]), run(["--verbose"])
    assert quiet.returncode == 2 and verbose.returncode == 2
    assert (
        len(quiet.stderr.strip().splitlines()) == 1
        and "Traceback" not in quiet.stderr
        and name in quiet.stderr
    )
    assert "Traceback" in verbose.stderr
