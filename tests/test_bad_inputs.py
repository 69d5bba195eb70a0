"""Every case of the bad-input corpus against every loader: one-line error naming the file, bounded time and memory.

A case passes when its loader raises EdgeLoraError (never another exception), the message is one line,
names a file of the case, matches what went wrong, and the call took under a few seconds without the
process's peak memory growing (the memory bombs declare terabytes).
"""

from __future__ import annotations

import re
import resource
import signal
import time
from pathlib import Path

import pytest

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from make_bad_corpus import build_corpus
from security_helpers import RegistryEngine, make_adapter, make_core_bundle
from tiny_models import make_model_dir

TIME_LIMIT_S = 5
PEAK_GROWTH_LIMIT_MB = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("bad")
    other = make_model_dir(root / "_other_base", "llama", seed=1)
    return build_corpus(root / "cases", model_dirs["llama"], other)


@pytest.fixture(scope="module")
def base(model_dirs):
    return ModelDir(model_dirs["llama"])


@pytest.fixture(scope="module")
def good_engine(tmp_path_factory, model_dirs, base):
    root = make_core_bundle(tmp_path_factory.mktemp("good") / "bundle", model_dirs["llama"],
                            {"sql": make_adapter(base.config, base.fingerprint)})
    return RegistryEngine(root)


def core_loaders(case, base, engine):
    """The loaders that must refuse ``case``: (label, zero-argument call)."""
    from converters.peft import import_peft

    if case.kind == "adapter":
        return [("Adapter.load", lambda: Adapter.load(case.path, base=base.config, base_fingerprint=base.fingerprint)),
                ("Engine.add_adapter", lambda: engine.add_adapter(case.name, case.path))]
    if case.kind == "peft":
        return [("import_peft", lambda: import_peft(case.path, base=base.config, base_fingerprint=base.fingerprint))]
    if case.kind == "bundle":
        return [("Bundle.open", lambda: Bundle.open(case.path)), ("Engine", lambda: RegistryEngine(case.path))]
    if case.kind == "bundle_engine":
        return [("Engine", lambda: RegistryEngine(case.path))]
    if case.kind == "bundle_adapter":
        return [("Engine.add_adapter", lambda: RegistryEngine(case.path).add_adapter("sql"))]
    if case.kind == "model_dir":
        return [("ModelDir", lambda: ModelDir(case.path).fingerprint)]
    raise AssertionError(f"no loader for kind {case.kind}")


class _Timeout(Exception):
    pass


def refuse(call, case) -> EdgeLoraError:
    """Run ``call`` under a wall-clock alarm and a peak-memory watch; return the error it raised."""
    def on_alarm(signum, frame):
        raise _Timeout(f"{case.name}: still running after {TIME_LIMIT_S} s")

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIME_LIMIT_S)
    started = time.perf_counter()
    try:
        call()
    except EdgeLoraError as err:
        error = err
    else:
        raise AssertionError(f"{case.name}: accepted a bad input")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mb < PEAK_GROWTH_LIMIT_MB, f"{case.name}: peak memory grew {growth_mb:.0f} MB"
    assert time.perf_counter() - started < TIME_LIMIT_S
    return error


def check_message(err: EdgeLoraError, case) -> None:
    text = str(err)
    assert "\n" not in text, f"{case.name}: multi-line error {text!r}"
    assert re.search(case.expect, text), f"{case.name}: {text!r} does not match {case.expect!r}"
    assert err.path is not None and case.path.parent.name in err.path or case.name in err.path, \
        f"{case.name}: error does not name a file of the case: {text!r}"
    assert err.hint or case.name in _SELF_EXPLAINING, f"{case.name}: no hint saying what to do: {text!r}"


# Errors whose message alone says what to do (pass the right file / the file is gone).
_SELF_EXPLAINING = {"missing_adapter_file"}


def test_corpus_is_large_and_distinct(corpus):
    names = [c.name for c in corpus]
    assert len(names) == len(set(names)) >= 60


def test_every_core_loader_refuses_every_case(corpus, base, good_engine):
    failures, tried = [], 0
    for case in corpus:
        for label, call in core_loaders(case, base, good_engine):
            tried += 1
            try:
                check_message(refuse(call, case), case)
            except Exception as exc:  # collect all, so one run reports every weak loader
                failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {tried} refusals wrong:\n" + "\n".join(failures)
    assert good_engine.adapters == [], "a bad adapter was registered"
