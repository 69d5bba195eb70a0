"""Property tests for the surfaces new tokens and DoRA opened: token metadata and rows, DoRA magnitudes,
PEFT's ``trainable_token_indices`` and ``modules_to_save`` tables, and ``.onnx_adapter`` files handed to
the runtime as adapters.

Each property: an input is refused with one line naming the file, or accepted and fully usable; and
``inspect --base`` judges a file exactly as adding it does (same verdict, same line). ``EDGE_LORA_FUZZ=N``
runs N inputs per property (default 60); each test prints its count and its slowest input (a hang would
show there)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from factories import build_bundle, random_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from converters.peft import export_peft, import_peft
from converters.peft_tokens import model_dir_rows
from edge_lora.adapter import Adapter
from edge_lora.adapter_format import (
    EMBED_ROWS,
    HEAD_ROWS,
    METADATA_KEY,
    REPLACED_EMBED_ROWS,
    REPLACED_HEAD_ROWS,
)
from edge_lora.app.describe import describe
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import save_tensors
from edge_lora.token_rows import base_token_ids
from runtime.new_tokens import combine

EXAMPLES = int(os.environ.get("EDGE_LORA_FUZZ", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PEFT = "base_model.model."
DELTA = "model.embed_tokens.token_adapter.trainable_tokens_delta"


class Tally:
    """Inputs tried and the slowest one, printed at the end of a test (run with -s to see them)."""

    def __init__(self, name: str) -> None:
        self.name, self.tried, self.refused, self.slowest = name, 0, 0, 0.0

    def time(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.tried += 1
            self.slowest = max(self.slowest, time.perf_counter() - start)

    def report(self) -> None:
        print(
            f"\nfuzz {self.name}: {self.tried} inputs, {self.refused} refused, "
            f"slowest {1000 * self.slowest:.1f} ms"
        )


@pytest.fixture(scope="module")
def base(model_dirs):
    return ModelDir(model_dirs["llama"])  # an untied head: output rows are needed and checked


@pytest.fixture(scope="module")
def token_id(base):
    return base_token_ids(base.tokenizer_path)


def one_line(err: EdgeLoraError, path: Path) -> None:
    assert "\n" not in str(err) and str(path) in str(err), str(err)


def add_verdict(path: Path, base: ModelDir, token_id) -> tuple[Adapter | None, str | None]:
    """What adding the file does: the adapter, or the refusal's one line."""
    try:
        return Adapter.load(
            path, base=base.config, base_fingerprint=base.fingerprint, base_token_id=token_id
        ), None
    except EdgeLoraError as err:
        one_line(err, path)
        return None, str(err)


def inspect_agrees(path: Path, base: ModelDir, refusal: str | None) -> None:
    """`inspect --base` refuses (broken: raises; for this base: fits False) with adding's line, or fits."""
    try:
        info = describe(path, base.path)
    except EdgeLoraError as err:
        assert refusal == str(err), (refusal, str(err))
        return
    assert info["fits"] is (refusal is None), (refusal, info)
    assert info.get("why") == refusal


def usable(adapter: Adapter, base: ModelDir) -> None:
    """Accepted means usable: the request vocabulary builds, every row finite and in place."""
    vocab = combine([("x", adapter)], base.config)
    assert vocab.n == len(adapter.added_tokens) and vocab.rows == vocab.n + len(adapter.replaced_tokens)
    if vocab.rows:
        assert vocab.embed.shape == vocab.head.shape == (vocab.rows, base.config.hidden_size)
        assert np.isfinite(vocab.embed).all() and np.isfinite(vocab.head).all()


# --- new-token metadata and rows ---------------------------------------------------------------------

rows_shape = st.one_of(st.none(), st.tuples(st.integers(0, 4), st.sampled_from([64, 63, 65, 0])))


@FUZZ
@given(data=st.data())
def test_token_metadata_and_rows(base, token_id, tmp_path, data):
    tally = _tallies.setdefault("token metadata and rows", Tally("token metadata and rows"))
    known = base_string(base)
    tokens = data.draw(
        st.lists(
            st.sampled_from(["<a>", "<b>", "", known, "<a>", "\u00e9\u00e9"]) | st.text(max_size=6),
            max_size=4,
        )
    )
    replaced = data.draw(
        st.none()
        | st.lists(st.integers(-2, base.config.vocab_size + 2), max_size=3, unique=True)
        | st.sampled_from([[1, 1], ["3"], [True], 5])
    )
    adapter = random_adapter(base, 1, rank=2, modules=["q_proj"], fingerprint=base.fingerprint)
    meta = adapter.metadata()
    meta["added_tokens"] = tokens
    if replaced is not None:
        meta["replaced_tokens"] = replaced
    tensors = {f"{m}.lora_{p}": getattr(w, p.lower()) for m, w in adapter.modules.items() for p in ("A", "B")}
    for name in (EMBED_ROWS, HEAD_ROWS, REPLACED_EMBED_ROWS, REPLACED_HEAD_ROWS):
        shape = data.draw(rows_shape, label=name)
        if shape is not None:
            rows = np.random.default_rng(len(tensors)).normal(size=shape).astype(np.float32)
            if rows.size and data.draw(st.booleans(), label="nan"):
                rows.flat[0] = np.nan
            tensors[name] = rows
    path = tmp_path / f"t{tally.tried}.safetensors"
    save_tensors(path, tensors, {METADATA_KEY: json.dumps(meta)})
    adapter, refusal = tally.time(add_verdict, path, base, token_id)
    tally.refused += refusal is not None
    inspect_agrees(path, base, refusal)
    if adapter is not None:
        usable(adapter, base)
        assert known not in adapter.added_tokens and "" not in adapter.added_tokens


def base_string(base: ModelDir) -> str:
    """A string the tiny base's vocabulary has (a new token of that name must be refused)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(base.tokenizer_path)).id_to_token(7)


# --- DoRA magnitudes -----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_dora_magnitudes(base, token_id, tmp_path, data):
    tally = _tallies.setdefault("DoRA magnitudes", Tally("DoRA magnitudes"))
    adapter = random_adapter(base, 2, rank=2, modules=["q_proj"], fingerprint=base.fingerprint, dora=True)
    meta = adapter.metadata()
    tensors = {}
    for m, w in adapter.modules.items():
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = w.a, w.b
        out = w.b.shape[0]
        shape = data.draw(st.sampled_from([(out,), (out + 1,), (out, 1), (), (0,)]), label="shape")
        value = data.draw(
            st.floats(allow_nan=True, allow_infinity=True, width=32)
            | st.sampled_from([0.0, -1.0, 3e38, 1e-38])
        )
        mag = np.full(shape, value, dtype=np.float32)
        dtype = data.draw(st.sampled_from([np.float32, np.float16]), label="dtype")
        with np.errstate(over="ignore"):
            tensors[f"{m}.lora_magnitude"] = mag.astype(dtype)
    path = tmp_path / f"d{tally.tried}.safetensors"
    save_tensors(path, tensors, {METADATA_KEY: json.dumps(meta)})
    loaded, refusal = tally.time(add_verdict, path, base, token_id)
    tally.refused += refusal is not None
    inspect_agrees(path, base, refusal)
    if loaded is not None:  # accepted: the merge the runtime does is finite
        for module in loaded.modules:
            weight = base.get(f"{module}.weight").astype(np.float32)
            merged = loaded.merged_weight(module, weight)
            assert merged.shape == weight.shape and np.isfinite(merged).all(), module


# --- PEFT trainable_token_indices and modules_to_save --------------------------------------------------


@FUZZ
@given(data=st.data())
def test_peft_token_tables(base, token_id, tmp_path, data):
    tally = _tallies.setdefault("PEFT token tables", Tally("PEFT token tables"))
    vocab, hidden = base.config.vocab_size, base.config.hidden_size
    folder = tmp_path / f"p{tally.tried}"
    lora = random_adapter(base, 3, rank=2, modules=["q_proj"])
    export_peft(lora, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    st_path = folder / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    tensors = load_file(str(st_path))
    n = data.draw(st.integers(0, 3), label="new rows")
    width = data.draw(st.sampled_from([hidden, hidden, hidden + 1]), label="width")
    table = np.zeros((vocab + n, width), np.float32)
    table[:vocab, : min(width, hidden)] = base.get("model.embed_tokens.weight")[:, : min(width, hidden)]
    table[vocab:] = np.random.default_rng(n).normal(size=(n, width))
    if data.draw(st.booleans(), label="base row trained"):
        table[3, 0] += 1.0
    kind = data.draw(st.sampled_from(["trainable_token_indices", "modules_to_save"]), label="kind")
    if kind == "trainable_token_indices":
        indices = data.draw(
            st.lists(st.integers(-2, vocab + n + 2), max_size=4) | st.just(list(range(vocab, vocab + n))),
            label="indices",
        )
        cfg["trainable_token_indices"] = data.draw(st.sampled_from([{"embed_tokens": indices}, indices]))
        k = data.draw(st.sampled_from([len(indices), len(indices) + 1]), label="delta rows")
        tensors[PEFT + DELTA] = np.random.default_rng(k).normal(size=(k, width)).astype(np.float32)
        tensors[PEFT + "model.embed_tokens.token_adapter.base_layer.weight"] = table
    else:
        cfg["modules_to_save"] = data.draw(st.sampled_from([["embed_tokens", "lm_head"], ["embed_tokens"]]))
        tensors[PEFT + "model.embed_tokens.modules_to_save.weight"] = table
    head = np.zeros_like(table)
    head[:vocab, : min(width, hidden)] = base.get("lm_head.weight")[:, : min(width, hidden)]
    if data.draw(st.booleans(), label="lm_head saved"):
        suffix = "modules_to_save.weight" if kind == "modules_to_save" else "weight"
        tensors[PEFT + f"lm_head.{suffix}"] = head
    save_tensors(st_path, tensors)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    names = data.draw(st.lists(st.sampled_from(["<x>", "<y>", base_string(base)]), min_size=n, max_size=n))
    if data.draw(st.booleans(), label="tokenizer saved"):
        tok = json.loads(base.tokenizer_path.read_text())
        tok["added_tokens"] = list(tok.get("added_tokens") or []) + [
            {"id": vocab + i, "content": t, "special": False} for i, t in enumerate(names)
        ]
        (folder / "tokenizer.json").write_text(json.dumps(tok))

    def add():
        try:
            return import_peft(
                folder, base=base.config, base_rows=model_dir_rows(base), base_token_id=token_id
            )
        except EdgeLoraError as err:
            assert "\n" not in str(err), str(err)
            return None

    adapter = tally.time(add)
    tally.refused += adapter is None
    if adapter is not None:
        adapter.check_fits(base.config, base_token_id=token_id)
        usable(adapter, base)


# --- .onnx_adapter files handed to the runtime ---------------------------------------------------------


@pytest.fixture(scope="module")
def engines(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_onnx_adapter")
    adapter = random_adapter(base, 4, rank=2, fingerprint=base.fingerprint)
    adapter.added_tokens = ["<q>"]
    adapter.embed_rows = np.ones((1, base.config.hidden_size), np.float32)
    adapter.head_rows = np.ones((1, base.config.hidden_size), np.float32)
    bundle = build_bundle(base.path, root / "bundle", {"a": adapter}, backends=("onnx", "gguf"))
    blob = (bundle / "adapters" / "a.onnx_adapter").read_bytes()
    return blob, {b: runtime.load(bundle, backend=b, device="cpu") for b in ("onnx", "llamacpp")}


@FUZZ
@given(data=st.data())
def test_onnx_adapter_files_given_to_the_runtime(engines, data):
    tally = _tallies.setdefault(".onnx_adapter to the runtime", Tally(".onnx_adapter to the runtime"))
    blob, by_backend = engines
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 3), label="mutations")):
        pos = data.draw(st.integers(0, len(mutated) - 1), label="pos")
        kind = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]), label="kind")
        if kind == "flip":
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del mutated[pos:]
        else:
            mutated[pos : pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
        if not mutated:
            mutated = bytearray(b"\0")
    suffix = data.draw(st.sampled_from([".onnx_adapter", ".safetensors"]), label="suffix")
    backend = data.draw(st.sampled_from(sorted(by_backend)), label="backend")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(bytes(mutated))

        def add():
            try:
                by_backend[backend].add_adapter("x", path)
            except EdgeLoraError as err:
                one_line(err, path)
                return False
            by_backend[backend].remove_adapter("x")
            return True

        assert not tally.time(add), "an .onnx_adapter file was taken for an adapter"
        tally.refused += 1
        shutil.rmtree(tmp, ignore_errors=True)


_tallies: dict[str, Tally] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for tally in _tallies.values():
        tally.report()
