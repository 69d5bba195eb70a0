"""A corpus of bad inputs: every way an adapter, a PEFT folder or a bundle can arrive broken or hostile.

Built from one good adapter and one good bundle of a tiny base, each case a small mutation. The tests
(tests/test_bad_inputs.py) build it in a temporary folder; run this file to write it to
tests/data/bad/ for a look by hand or as seeds for the atheris harness:

    python tests/make_bad_corpus.py            # writes tests/data/bad/<case>/...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from security_helpers import make_adapter, make_core_bundle  # noqa: E402

from edge_lora.adapter import METADATA_KEY  # noqa: E402
from edge_lora.model_dir import ModelDir  # noqa: E402
from edge_lora.safetensors_file import serialize  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"
GIB = 1 << 30


@dataclass
class Case:
    name: str
    kind: str  # which loader: adapter, peft, bundle*, model_dir, backend_<b>, backend_adapter_<b>
    path: Path  # the file or folder handed to the loader
    expect: str  # a regex the one-line error must match


# --- safetensors surgery ----------------------------------------------------------------


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | bytes, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


def with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    header, body = split(data)
    edit(header)
    return join(header, body)


def with_meta(data: bytes, edit: Callable[[dict], None]) -> bytes:
    def change(header):
        meta = json.loads(header["__metadata__"][METADATA_KEY])
        edit(meta)
        header["__metadata__"][METADATA_KEY] = json.dumps(meta)

    return with_header(data, change)


def with_tensors(adapter, edit: Callable[[dict], None]) -> bytes:
    """Re-serialize the adapter's tensors after ``edit`` (values, shapes, names), metadata kept."""
    tensors = {}
    for m, w in adapter.modules.items():
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = w.a.copy(), w.b.copy()
    edit(tensors)
    return serialize(tensors, {METADATA_KEY: json.dumps(adapter.metadata(), sort_keys=True)})


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- the corpus -------------------------------------------------------------------------


def build_corpus(root: Path, model_dir: Path, other_model_dir: Path) -> list[Case]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    md, other = ModelDir(model_dir), ModelDir(other_model_dir)
    good = make_adapter(md.config, md.fingerprint, rank=4, seed=0)
    good_path = root / "good.safetensors"
    good.save(good_path)
    data = good_path.read_bytes()
    header, body = split(data)
    cases: list[Case] = []

    def adapter_bytes(name: str, blob: bytes, expect: str) -> None:
        path = root / name / "adapter.safetensors"
        path.parent.mkdir()
        path.write_bytes(blob)
        cases.append(Case(name, "adapter", path, expect))

    first = sorted(k for k in header if k != "__metadata__")[0]
    a_key, b_key = f"{Q}.lora_A", f"{Q}.lora_B"

    # structure of the file
    adapter_bytes("empty_file", b"", "too short|empty")
    adapter_bytes("four_bytes", b"\x10\x00\x00\x00", "too short")
    adapter_bytes("truncated_in_header", data[: 8 + len(split(data)[0]) // 2], "does not fit the file")
    adapter_bytes("truncated_in_data", data[: len(data) - len(body) // 2], "beyond the file|truncated")
    adapter_bytes("truncated_last_byte", data[:-1], "beyond the file|truncated")
    adapter_bytes("header_length_2_pow_63", struct.pack("<Q", 1 << 63) + data[8:], "header length exceeds")
    adapter_bytes(
        "header_length_one_past_file", struct.pack("<Q", len(data) - 7) + data[8:], "does not fit the file"
    )
    flipped = bytearray(data)
    flipped[8] ^= 0x80  # the opening brace becomes a non-ASCII byte
    adapter_bytes("bitflip_header_brace", bytes(flipped), "not valid JSON")
    adapter_bytes("header_not_utf8", join(b"\xff\xfe{}  ", body), "not valid JSON")
    adapter_bytes("header_is_a_list", join(b"[1, 2, 3]", body), "header: invalid type: sequence")
    adapter_bytes("header_nested_100k_deep", join(nested(100_000), body), "header: invalid type: sequence")
    adapter_bytes(
        "metadata_not_strings",
        with_header(data, lambda h: h.__setitem__("__metadata__", {"edge_lora": 5})),
        "integer `5`, expected a string",
    )
    adapter_bytes(
        "entry_not_object",
        with_header(data, lambda h: h.__setitem__(first, [1, 2])),
        "expected string or map",
    )
    adapter_bytes(
        "unknown_dtype",
        with_header(data, lambda h: h[first].__setitem__("dtype", "F8_Q")),
        "unknown variant `F8_Q`",
    )
    adapter_bytes(
        "negative_dim", with_header(data, lambda h: h[first].__setitem__("shape", [-4, 16])), "integer `-4`"
    )
    adapter_bytes(
        "shape_is_string",
        with_header(data, lambda h: h[first].__setitem__("shape", "4x16")),
        "expected a sequence",
    )
    adapter_bytes(
        "bool_offsets",
        with_header(data, lambda h: h[first].__setitem__("data_offsets", [False, True])),
        "boolean `false`",
    )
    adapter_bytes(
        "offsets_disagree_with_shape",
        with_header(data, lambda h: h[first].__setitem__("data_offsets", [0, 12])),
        "do not match its shape",
    )
    adapter_bytes(
        "offsets_reversed",
        with_header(data, lambda h: h[first].__setitem__("data_offsets", h[first]["data_offsets"][::-1])),
        "overlaps another, leaves a gap",
    )

    def past_end(h):
        size = h[first]["data_offsets"][1] - h[first]["data_offsets"][0]
        h[first]["data_offsets"] = [len(body), len(body) + size]

    adapter_bytes("offsets_past_end", with_header(data, past_end), "beyond the file")

    def overlap(h):
        keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[keys[0]], h[keys[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        start = a["data_offsets"][0] + 4
        if start + size > len(body):
            start = 0
        b["data_offsets"] = [start, start + size]

    adapter_bytes("overlapping_tensors", with_header(data, overlap), "overlap")

    def gap(h):  # 4 unused bytes after the first tensor: the old reader took this; safetensors refuses it
        for k in h:
            if k != "__metadata__" and h[k]["data_offsets"][0] > h[first]["data_offsets"][0]:
                h[k]["data_offsets"] = [o + 4 for o in h[k]["data_offsets"]]

    start = header[first]["data_offsets"][1]
    gapped = with_header(data, gap)
    adapter_bytes(
        "gap_between_tensors",
        gapped[: len(gapped) - len(body) + start] + bytes(4) + body[start:],
        "leaves a gap",
    )
    adapter_bytes("bytes_after_last_tensor", data + bytes(8), "bytes after it")

    def bomb(h):
        h[first].update(dtype="F32", shape=[1 << 20, 1 << 20], data_offsets=[0, 4 << 40])

    adapter_bytes("memory_bomb_4_tib_tensor", with_header(data, bomb), "beyond the file")

    def bomb_bf16(h):  # bf16 widening would double it: refused before any byte is read
        h[first].update(dtype="BF16", shape=[GIB], data_offsets=[0, 2 * GIB])

    adapter_bytes("memory_bomb_bf16_2_gib", with_header(data, bomb_bf16), "beyond the file")

    def sparse_giant(name: str, tensor: str, shape: list[int]) -> None:
        """A sparse file really as large as its header says: passes the size checks, costs no disk. The
        other tensors are packed back to back first: safetensors refuses the gap ``tensor`` would leave."""
        kept = sorted(
            (k for k in header if k not in ("__metadata__", tensor)), key=lambda k: header[k]["data_offsets"]
        )
        h, blobs, offset = {"__metadata__": header["__metadata__"]}, [], 0
        for k in kept:
            start, end = header[k]["data_offsets"]
            h[k] = {**header[k], "data_offsets": [offset, offset + end - start]}
            blobs.append(body[start:end])
            offset += end - start
        nbytes = 4 * int(np.prod(shape))
        h[tensor] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        path = root / name / "adapter.safetensors"
        path.parent.mkdir()
        path.write_bytes(join(h, b"".join(blobs)))
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size + nbytes)
        cases.append(Case(name, "adapter", path, "do not fit the base"))

    sparse_giant("sparse_256_mib_lora_a", f"{Q}.lora_A", [1024, 65536])  # rank 1024 x in 65536: no such base
    sparse_giant("sparse_256_mib_lora_b", f"{Q}.lora_B", [65536, 1024])

    # contents of the tensors
    adapter_bytes(
        "int32_tensor",
        with_tensors(good, lambda t: t.__setitem__(a_key, t[a_key].astype(np.int32))),
        "dtype I32",
    )
    adapter_bytes(
        "float64_tensor",
        with_tensors(good, lambda t: t.__setitem__(a_key, t[a_key].astype(np.float64))),
        "dtype F64",
    )
    adapter_bytes(
        "nan_in_lora_b", with_tensors(good, lambda t: t[b_key].__setitem__((0, 0), np.nan)), "NaN or Inf"
    )
    adapter_bytes(
        "inf_in_lora_a", with_tensors(good, lambda t: t[a_key].__setitem__((1, 2), np.inf)), "NaN or Inf"
    )
    adapter_bytes(
        "rank_mismatch_a_b", with_tensors(good, lambda t: t.__setitem__(a_key, t[a_key][:3])), "rank"
    )
    adapter_bytes(
        "rank_zero",
        with_tensors(good, lambda t: t.update({a_key: t[a_key][:0], b_key: t[b_key][:, :0]})),
        "rank",
    )
    adapter_bytes(
        "lora_a_one_dim",
        with_tensors(good, lambda t: t.__setitem__(a_key, t[a_key].ravel())),
        "rank|do not fit",
    )
    adapter_bytes(
        "lora_b_missing", with_tensors(good, lambda t: t.pop(b_key)), "needs both lora_A and lora_B"
    )
    adapter_bytes(
        "wrong_in_features",
        with_tensors(good, lambda t: t.__setitem__(a_key, np.zeros((4, 7), np.float32))),
        "do(es)? not fit the base",
    )
    adapter_bytes(
        "wrong_out_features",
        with_tensors(good, lambda t: t.__setitem__(b_key, np.zeros((5, 4), np.float32))),
        "do(es)? not fit the base",
    )

    def rename(t, new):
        t[f"{new}.lora_A"], t[f"{new}.lora_B"] = t.pop(a_key), t.pop(b_key)

    adapter_bytes(
        "unknown_module_name",
        with_meta(
            with_tensors(good, lambda t: rename(t, "model.layers.99.self_attn.q_proj")),
            lambda m: m["modules"].__setitem__("model.layers.99.self_attn.q_proj", {"rank": 4, "alpha": 8.0}),
        ),
        "not a linear layer",
    )
    adapter_bytes(
        "unexpected_tensor_name",
        with_tensors(good, lambda t: t.__setitem__("model.norm.weight", t[a_key])),
        "unexpected tensor",
    )
    adapter_bytes(
        "dora_magnitude_wrong_shape",
        with_meta(
            with_tensors(good, lambda t: t.__setitem__(f"{Q}.lora_magnitude", np.ones(3, np.float32))),
            lambda m: None,
        ),
        "lora_magnitude shape|do not fit",
    )

    # metadata
    adapter_bytes(
        "no_edge_lora_metadata",
        join({k: v for k, v in header.items() if k != "__metadata__"}, body),
        "no edge_lora metadata",
    )
    peft_like = {
        f"base_model.model.{k[:-7]}.lora_A.weight" if k.endswith("lora_A") else k: v
        for k, v in header.items()
        if k != "__metadata__"
    }
    adapter_bytes("peft_file_as_adapter", join(peft_like, body), "PEFT")
    adapter_bytes(
        "metadata_not_json",
        with_header(data, lambda h: h["__metadata__"].__setitem__(METADATA_KEY, "{oops")),
        "metadata is not valid JSON",
    )
    adapter_bytes(
        "metadata_nested_100k_deep",
        with_header(data, lambda h: h["__metadata__"].__setitem__(METADATA_KEY, nested(100_000).decode())),
        "metadata",
    )
    adapter_bytes("metadata_without_modules", with_meta(data, lambda m: m.pop("modules")), "lacks 'modules'")
    adapter_bytes(
        "metadata_future_version",
        with_meta(data, lambda m: m.__setitem__("format_version", 99)),
        "version 99",
    )
    adapter_bytes(
        "metadata_rank_lies",
        with_meta(data, lambda m: m["modules"][Q].__setitem__("rank", 8)),
        "metadata rank",
    )
    adapter_bytes(
        "metadata_alpha_missing", with_meta(data, lambda m: m["modules"][Q].pop("alpha")), "no rank/alpha"
    )
    adapter_bytes(
        "metadata_alpha_not_a_number",
        with_meta(data, lambda m: m["modules"][Q].__setitem__("alpha", "big")),
        "alpha",
    )
    adapter_bytes(
        "metadata_alpha_nan",
        with_meta(data, lambda m: m["modules"][Q].__setitem__("alpha", float("nan"))),
        "alpha",
    )
    adapter_bytes(
        "other_base_fingerprint",
        with_meta(data, lambda m: m["base"].__setitem__("fingerprint", other.fingerprint)),
        "made for base .*wrong base",
    )
    adapter_bytes(
        "other_architecture",
        with_meta(data, lambda m: m["base"].__setitem__("architecture", "MistralForCausalLM")),
        "made for a MistralForCausalLM",
    )

    for name, make in (
        ("directory_as_adapter", lambda p: p.mkdir()),
        ("missing_adapter_file", lambda p: None),
    ):
        path = root / name / "adapter.safetensors"
        path.parent.mkdir()
        make(path)
        cases.append(Case(name, "adapter", path, "directory|not found"))

    # PEFT folders
    def peft_dir(
        name: str, expect: str, config, weights: bytes | None, extra: dict[str, bytes] | None = None
    ) -> None:
        path = root / name
        path.mkdir()
        if config is not None:
            (path / "adapter_config.json").write_bytes(
                config if isinstance(config, bytes) else json.dumps(config).encode()
            )
        if weights is not None:
            (path / "adapter_model.safetensors").write_bytes(weights)
        for fname, blob in (extra or {}).items():
            (path / fname).write_bytes(blob)
        cases.append(Case(name, "peft", path, expect))

    peft_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    peft_dir(
        "peft_only_pickled_bin",
        "only pickled adapter_model.bin",
        peft_cfg,
        None,
        {"adapter_model.bin": b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."},
    )
    peft_dir("peft_config_malformed_json", "not valid JSON", b'{"r": 4,', None)
    peft_dir("peft_config_is_a_list", "JSON object", b"[4]", None)
    peft_dir("peft_not_lora", "not LoRA", {**peft_cfg, "peft_type": "IA3"}, None)
    peft_dir(
        "peft_truncated_weights",
        "does not fit the file|beyond the file|too short",
        peft_cfg,
        join(peft_like, body)[:200],
    )
    peft_dir("peft_no_config", "no adapter_config.json", None, join(peft_like, body))

    # bundles
    bundle_root = root / "_good_bundle"
    make_core_bundle(bundle_root, model_dir, {"sql": good})
    manifest = json.loads((bundle_root / "bundle.json").read_text())

    def bundle_case(
        name: str,
        expect: str,
        *,
        edit: Callable[[dict], None] | None = None,
        raw: bytes | None = None,
        after: Callable[[Path], None] | None = None,
        kind: str = "bundle",
    ) -> None:
        path = root / name
        shutil.copytree(bundle_root, path, symlinks=True)
        if edit is not None or raw is not None:
            m = json.loads(json.dumps(manifest))
            if edit is not None:
                edit(m)
            (path / "bundle.json").write_bytes(raw if raw is not None else json.dumps(m).encode())
        if after is not None:
            after(path)
        cases.append(Case(name, kind, path, expect))

    bundle_case("bundle_json_missing", "no bundle.json", after=lambda p: (p / "bundle.json").unlink())
    bundle_case("bundle_json_empty", "not valid JSON", raw=b"")
    bundle_case("bundle_json_malformed", "not valid JSON", raw=b'{"format": "edge-lora-bundle",')
    bundle_case("bundle_json_nested_100k_deep", "not valid JSON|nested", raw=nested(100_000))
    bundle_case(
        "bundle_json_is_a_directory",
        "no bundle.json",
        after=lambda p: ((p / "bundle.json").unlink(), (p / "bundle.json").mkdir()),
    )
    bundle_case(
        "bundle_json_wrong_format", "not an edge-lora bundle", edit=lambda m: m.__setitem__("format", "zip")
    )
    bundle_case("bundle_json_future_version", "newer", edit=lambda m: m.__setitem__("format_version", 7))
    bundle_case("bundle_json_missing_files_key", "'files' is missing", edit=lambda m: m.pop("files"))
    bundle_case("bundle_json_model_empty", "model config|missing", edit=lambda m: m.__setitem__("model", {}))
    bundle_case(
        "bundle_json_model_bad_types",
        "model config|must be|invalid",
        edit=lambda m: m["model"].update(hidden_size="big", num_attention_heads=0),
    )
    bundle_case(
        "bundle_entry_dotdot",
        "outside the bundle",
        edit=lambda m: m["adapters"]["sql"].__setitem__("source", "../good.safetensors"),
    )
    bundle_case(
        "bundle_entry_absolute",
        "outside the bundle",
        edit=lambda m: m["tokenizer"].__setitem__("tokenizer", "/etc/passwd"),
    )
    bundle_case(
        "bundle_entry_not_a_string",
        "not a relative path",
        edit=lambda m: m["adapters"]["sql"].__setitem__("source", {"x": 1}),
    )
    bundle_case(
        "bundle_files_symlink_out",
        "link that leaves the bundle",
        after=lambda p: (
            (p / "adapters" / "sql.safetensors").unlink(),
            os.symlink(good_path, p / "adapters" / "sql.safetensors"),
        ),
    )
    bundle_case(
        "bundle_dir_symlink_out",
        "link that leaves the bundle",
        after=lambda p: (
            shutil.rmtree(p / "adapters"),
            os.symlink(root / "_good_bundle" / "adapters", p / "adapters"),
        ),
    )
    bundle_case(
        "bundle_adapter_not_object", "is not an object", edit=lambda m: m["adapters"].__setitem__("sql", "x")
    )
    bundle_case(
        "bundle_backend_not_list",
        "entries as objects",
        edit=lambda m: m["backends"].__setitem__("onnx", "m.onnx"),
    )
    bundle_case(
        "bundle_tokenizer_missing",
        "missing or not a file",
        after=lambda p: (p / "tokenizer.json").unlink(),
        kind="bundle_engine",
    )
    bundle_case(
        "bundle_tokenizer_garbage",
        "tokenizer",
        after=lambda p: (p / "tokenizer.json").write_bytes(b"\x00garbage"),
        kind="bundle_engine",
    )

    def flip_adapter(p):
        f = p / "adapters" / "sql.safetensors"
        blob = bytearray(f.read_bytes())
        blob[-3] ^= 0x10
        f.write_bytes(bytes(blob))

    bundle_case(
        "bundle_adapter_bitflip_data", "does not match its SHA-256", after=flip_adapter, kind="bundle_adapter"
    )
    bundle_case(
        "bundle_adapter_no_hash",
        "records no hash",
        edit=lambda m: m["files"].pop("adapters/sql.safetensors"),
        kind="bundle_adapter",
    )
    bundle_case(
        "bundle_adapter_file_missing",
        "missing or not a file",
        after=lambda p: (p / "adapters" / "sql.safetensors").unlink(),
        kind="bundle_adapter",
    )

    not_a_dir = root / "bundle_is_a_file"
    not_a_dir.write_bytes(b"PK\x03\x04 a zip, not a folder")
    cases.append(Case("bundle_is_a_file", "bundle", not_a_dir, "not a bundle directory"))

    # a base model folder (what `edge-lora train/export` read)
    def model_case(name: str, expect: str, after: Callable[[Path], None]) -> None:
        path = root / name
        shutil.copytree(model_dir, path)
        after(path)
        cases.append(Case(name, "model_dir", path, expect))

    def only_pickle(p):
        (p / "model.safetensors").unlink()
        (p / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")

    model_case("model_only_pickled_bin", "no \\*.safetensors|pickled", only_pickle)
    model_case(
        "model_weights_truncated",
        "beyond the file|truncated",
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
    )
    model_case("model_config_malformed", "not valid JSON", lambda p: (p / "config.json").write_text("{"))
    model_case(
        "model_config_unsupported_arch",
        "unsupported architecture",
        lambda p: (p / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
    )
    return cases


def build_backend_corpus(root: Path, bundle: Path) -> list[Case]:
    """Broken backend files inside an otherwise good exported bundle (ONNX and GGUF, base and adapters).

    Most keep bundle.json's hash in step with the damage, so the backend's own parser is what must refuse.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((bundle / "bundle.json").read_text())
    onnx_model = manifest["backends"]["onnx"][0]["model"]
    gguf_model = manifest["backends"]["gguf"][0]["model"]
    entry = manifest["adapters"]["sql"]
    cases: list[Case] = []

    def case(
        name: str, kind: str, rel: str, damage: Callable[[Path], None], expect: str = ".", rehash: bool = True
    ) -> None:
        path = root / name
        shutil.copytree(bundle, path)
        damage(path / rel)
        if rehash:
            m = json.loads((path / "bundle.json").read_text())
            target = path / rel
            m["files"][rel] = {
                "sha256": hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else "0" * 64,
                "bytes": target.stat().st_size if target.is_file() else 0,
            }
            (path / "bundle.json").write_text(json.dumps(m))
        cases.append(Case(name, kind, path, expect))

    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])

    def empty(p: Path) -> None:
        p.write_bytes(b"")

    def garbage(p: Path) -> None:
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    def to_dir(p: Path) -> None:
        p.unlink()
        p.mkdir()

    def flip_last_byte(p: Path) -> None:
        blob = p.read_bytes()
        p.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))

    def gguf_header_lies(
        p: Path,
    ) -> None:  # tensor count field set to 2^40: a loader that trusts it allocates terabytes
        blob = bytearray(p.read_bytes())
        blob[8:16] = struct.pack("<Q", 1 << 40)
        p.write_bytes(bytes(blob))

    # the ONNX engine opens the LoRA graph (model.onnx) only for requests with adapters: use one to reach it.
    # No .onnx_adapter cases: the runtime builds its feeds from the checked .safetensors and never opens
    # that file (it is onnxruntime-genai's); test_add_once.py proves a garbage one changes nothing
    for label, rel, kind in (
        ("onnx_model", onnx_model, "backend_adapter_onnx"),
        ("gguf_model", gguf_model, "backend_llamacpp"),
        ("gguf_adapter", entry["gguf"], "backend_adapter_llamacpp"),
    ):
        case(f"{label}_truncated", kind, rel, truncate)
        case(f"{label}_empty", kind, rel, empty)
        case(f"{label}_garbage", kind, rel, garbage)
        case(f"{label}_is_a_directory", kind, rel, to_dir, "missing or not a file")
        case(
            f"{label}_bitflip_unhashed", kind, rel, flip_last_byte, "does not match its SHA-256", rehash=False
        )
    folder = onnx_model.rsplit("/", 1)[0]
    case("onnx_external_data_truncated", "backend_onnx", onnx_model + ".data", truncate)
    case("onnx_plain_model_truncated", "backend_onnx", f"{folder}/model.plain.onnx", truncate)
    case(
        "onnx_layout_malformed_json",
        "backend_onnx",
        f"{folder}/onnx_layout.json",
        lambda p: p.write_text('{"plain_model": '),
    )
    case("gguf_model_tensor_count_2_pow_40", "backend_llamacpp", gguf_model, gguf_header_lies)
    case("gguf_adapter_tensor_count_2_pow_40", "backend_adapter_llamacpp", entry["gguf"], gguf_header_lies)
    return cases


if __name__ == "__main__":
    from tiny_models import make_model_dir

    out = Path(__file__).parent / "data" / "bad"
    shutil.rmtree(out, ignore_errors=True)
    models = out.parent / "_models"
    base = make_model_dir(models / "llama", "llama")
    other = make_model_dir(models / "llama_other", "llama", seed=1)
    corpus = build_corpus(out, base, other)
    from converters.export import AdapterSource, ExportOptions, export_bundle

    md = ModelDir(base)
    make_adapter(md.config, md.fingerprint).save(models / "sql.safetensors")
    exported = export_bundle(
        base,
        models / "bundle",
        [AdapterSource(models / "sql.safetensors", "sql")],
        ExportOptions(onnx_quants=["int8"], gguf_quants=["q8_0"], force=True),
        show_progress=False,
    )
    corpus += build_backend_corpus(out / "backend", exported)
    print(f"{len(corpus)} cases written to {out}")
