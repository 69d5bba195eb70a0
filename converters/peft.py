"""PEFT interop: a PEFT LoRA directory to our adapter file and back.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Ranks come from the tensor
shapes and must be the ones the config states (``rank_pattern``, else ``r``): a config that lies
about them would rescale the adapter. Alphas come from ``alpha_pattern`` or ``lora_alpha``, the
scaling rule from ``use_rslora``. A directory holding only a pickled
``adapter_model.bin`` is refused: pickles run code when loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from converters.peft_tokens import BaseRows, check_config, take_tokens
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.adapter_format import INVOCATION_KEY, is_invocation_list
from edge_lora.atomic import atomic_write_text
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile, save_tensors
from edge_lora.token_rows import TokenId

_RESAVE = "save the adapter again with PEFT's save_pretrained"
PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$"
)
# PEFT saves a tied lm_head's own (= the embedding's) weight beside its LoRA (save_embedding_layers)
TIED_HEAD_BASE = "lm_head.base_layer.weight"
_PART = {
    "lora_A.weight": "a",
    "lora_B.weight": "b",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",
}


def is_peft_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _pattern_value(patterns: dict | None, module: str, default: object, cfg_path: Path) -> object:
    """PEFT's rule: a pattern key matches a module name ending in ``.key`` (or equal to it)."""
    if not isinstance(patterns, (dict, type(None))):
        raise EdgeLoraError(
            "adapter_config.json: rank/alpha patterns must be objects", path=cfg_path, hint=_RESAVE
        )
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error:
            raise EdgeLoraError(
                f"adapter_config.json: pattern {key!r} is not a valid regular expression",
                path=cfg_path,
                hint=_RESAVE,
            ) from None
        if hit:
            return value
    return default


def _alpha(value: object, module: str, cfg_path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgeLoraError(
            f"adapter_config.json: alpha {value!r} for {module!r} is not a finite number",
            path=cfg_path,
            hint=_RESAVE,
        )
    return float(value)


def read_peft_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise EdgeLoraError(
            "not a PEFT adapter directory (no adapter_config.json)",
            path=path,
            hint="pass the folder PEFT's save_pretrained wrote",
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise EdgeLoraError(
            "adapter_config.json is not valid JSON", path=cfg_path, hint="save the adapter again with PEFT"
        ) from None
    if not isinstance(cfg, dict):
        raise EdgeLoraError(
            "adapter_config.json must hold a JSON object",
            path=cfg_path,
            hint="save the adapter again with PEFT",
        )
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EdgeLoraError(
            f"PEFT type {cfg.get('peft_type')!r} is not LoRA",
            path=cfg_path,
            hint="only LoRA adapters are supported",
        )
    check_config(cfg, cfg_path)  # modules_to_save / trainable_token_indices: token tables only
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise EdgeLoraError(
            "adapter trains biases (lora_bias / bias), which edge-lora does not import", path=cfg_path
        )
    if cfg.get("fan_in_fan_out"):
        raise EdgeLoraError(
            "fan_in_fan_out adapters (GPT-2 Conv1D) do not fit the Llama family", path=cfg_path
        )
    invocation = cfg.get(INVOCATION_KEY)
    if invocation is not None and not is_invocation_list(invocation):
        raise EdgeLoraError(
            "adapter_config.json: alora_invocation_tokens must be a non-empty list of token ids",
            path=cfg_path,
            hint=_RESAVE,
        )
    return cfg


def import_peft(
    path: str | os.PathLike,
    *,
    base: ModelConfig | None = None,
    base_fingerprint: str | None = None,
    base_table: Callable[[np.ndarray], bool] | None = None,
    base_rows: BaseRows | None = None,
    base_token_id: TokenId | None = None,
) -> Adapter:
    """Read a PEFT LoRA directory into an :class:`Adapter` (validated against ``base`` when given, and
    its new tokens against the base vocabulary's lookup ``base_token_id`` when given).

    ``base_table(saved)`` says whether a saved ``lm_head.base_layer.weight`` equals the base's tied
    table: equal, it is dropped with a note in ``extra["notes"]``; different (a fully trained head)
    or uncheckable, the directory is refused. ``base_rows(name, rows)`` does the same for the base-vocabulary
    rows of a resized embedding / lm_head that carries new tokens (see converters/peft_tokens.py)."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeLoraError("not a directory", path=path, hint="pass the folder PEFT's save_pretrained wrote")
    cfg = read_peft_config(path)
    st = SafetensorsFile(_weights_file(path))
    if base_rows is None and base_table is not None:  # the embedding rows can be checked with the table check

        def base_rows(name: str, rows: np.ndarray) -> bool | None:
            return base_table(rows) if name == "model.embed_tokens.weight" else None

    tokens = take_tokens(st, PREFIX, cfg, path, base, base_rows)
    parts, notes = _lora_parts(st, path / WEIGHTS_FILE, tokens.keys if tokens else set(), base, base_table)
    modules = _lora_modules(parts, cfg, path)
    if not modules and not (tokens and (tokens.tokens or tokens.replaced)):
        raise EdgeLoraError("adapter holds no LoRA tensors", path=path / WEIGHTS_FILE)
    adapter = _adapter(modules, cfg, base, base_fingerprint, notes)
    if tokens:  # new tokens and replaced base rows (converters/peft_tokens.py)
        adapter.added_tokens, adapter.embed_rows = tokens.tokens, tokens.embed_rows
        adapter.head_rows = tokens.head_rows
        adapter.replaced_tokens, adapter.replaced_embed_rows = tokens.replaced, tokens.replaced_embed
        adapter.replaced_head_rows = tokens.replaced_head
    if base is not None or base_token_id is not None:
        adapter.check_fits(base, path=path, base_token_id=base_token_id)
    return adapter


def _weights_file(path: Path) -> Path:
    """``adapter_model.safetensors``, or a refusal that says why (a pickled ``.bin`` is never loaded)."""
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickled = [p.name for p in path.glob("*.bin")]
    hint = (
        "convert it on a trusted machine: load with PEFT and "
        "save_pretrained(dir, safe_serialization=True); pickled files are never loaded"
        if pickled
        else "save the adapter with PEFT's save_pretrained"
    )
    raise EdgeLoraError(
        f"no {WEIGHTS_FILE}" + (f" (only pickled {', '.join(pickled)})" if pickled else ""),
        path=path,
        hint=hint,
    )


def _lora_parts(
    st: SafetensorsFile,
    weights: Path,
    token_keys: set[str],
    base: ModelConfig | None,
    base_table: Callable[[np.ndarray], bool] | None,
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """module -> {"a", "b", "m"} arrays from every LoRA key (token tables skipped), and the notes to keep."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    notes: list[str] = []
    for key in st.keys():
        if key in token_keys:
            continue
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name == TIED_HEAD_BASE:
            notes.append(_tied_head_base(st, key, weights, base, base_table))
            continue
        match = _KEY.match(name)
        if not match:
            raise EdgeLoraError(
                f"unexpected tensor {key!r}",
                path=weights,
                hint="only LoRA A/B (and DoRA magnitudes) are imported",
            )
        if st.tensors[key].dtype not in ("F32", "F16", "BF16"):
            raise EdgeLoraError(f"tensor {key!r} has dtype {st.tensors[key].dtype}", path=weights)
        arr = st.get(key).astype(np.float32)
        if not np.isfinite(arr).all():
            raise EdgeLoraError(f"tensor {key!r} holds NaN or Inf", path=weights)
        parts.setdefault(match["module"], {})[_PART[match["part"]]] = arr
    return parts, notes


def _lora_modules(parts: dict[str, dict[str, np.ndarray]], cfg: dict, path: Path) -> dict[str, LoraWeights]:
    """Each module's LoRA weights, its rank checked against the config's and its alpha read from it."""
    weights, cfg_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    default_alpha = cfg.get("lora_alpha", cfg.get("r", 8))
    modules = {}
    for module, p in sorted(parts.items()):
        if "a" not in p or "b" not in p:
            raise EdgeLoraError(f"module {module!r} lacks lora_A or lora_B", path=weights)
        if p["a"].ndim != 2 or p["b"].ndim != 2 or p["a"].shape[0] != p["b"].shape[1]:
            raise EdgeLoraError(
                f"module {module!r}: lora_A {list(p['a'].shape)} and lora_B {list(p['b'].shape)} "
                "disagree on the rank",
                path=weights,
            )
        _check_rank(cfg, module, p["a"].shape[0], cfg_path)
        alpha = _alpha(
            _pattern_value(cfg.get("alpha_pattern"), module, default_alpha, cfg_path), module, cfg_path
        )
        modules[module] = LoraWeights(a=p["a"], b=p["b"], alpha=alpha, magnitude=p.get("m"))
    return modules


def _check_rank(cfg: dict, module: str, rank: int, cfg_path: Path) -> None:
    """The rank the config gives ``module`` (``rank_pattern``, else ``r``) must be its tensors' rank.

    PEFT builds each module at that rank and scales it by alpha / rank: a config that lies about it
    (r=1e9 beside rank-8 tensors) would scale the adapter to nothing here and fail to load in PEFT."""
    unset = object()
    said = _pattern_value(cfg.get("rank_pattern"), module, unset, cfg_path)
    source = " (rank_pattern)" if said is not unset else ""
    if said is unset:
        if "r" not in cfg:  # nothing stated, so nothing to contradict
            return
        said = cfg["r"]
    if isinstance(said, bool) or not isinstance(said, (int, float)) or said != rank:
        raise EdgeLoraError(
            f"adapter_config.json says r={said!r}{source} but lora_A of {module} has rank {rank}",
            path=cfg_path,
            hint=_RESAVE,
        )


def _adapter(
    modules: dict[str, LoraWeights],
    cfg: dict,
    base: ModelConfig | None,
    base_fingerprint: str | None,
    notes: list[str],
) -> Adapter:
    mapping = cfg.get("auto_mapping")
    arch = (mapping.get("base_model_class") if isinstance(mapping, dict) else None) or "unknown"
    return Adapter(
        modules=modules,
        base_architecture=base.architecture if base else arch,
        base_fingerprint=base_fingerprint,
        rslora=bool(cfg.get("use_rslora", False)),
        target_modules=sorted(modules),
        invocation_tokens=list(cfg.get("alora_invocation_tokens") or []),
        extra={
            "imported_from": "peft",
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
            **({"notes": notes} if notes else {}),
        },
    )


def _tied_head_base(
    st: SafetensorsFile,
    key: str,
    weights: Path,
    base: ModelConfig | None,
    base_table: Callable[[np.ndarray], bool] | None,
) -> str:
    """Check the tied head's saved base weight against the base; returns the note for the adapter."""
    if base is not None and not base.tie_word_embeddings:
        raise EdgeLoraError(
            f"unexpected tensor {key!r} for an untied base",
            path=weights,
            hint="PEFT writes it for tied heads only: wrong base model?",
        )
    if base_table is None:
        raise EdgeLoraError(
            f"{key!r} (PEFT's copy of the tied output head) cannot be checked against the base here",
            path=weights,
            hint="import it with `edge-lora export`, which compares it to the base's table",
        )
    arr = st.get(key).astype(np.float32)
    if not base_table(arr):
        raise EdgeLoraError(
            f"{key!r} differs from the base's tied embedding table: the head itself was "
            "trained (a full-weight change, like modules_to_save), which is no LoRA adapter",
            path=weights,
            hint="merge it with PEFT (merge_and_unload) and export the merged model as the base",
        )
    return f"dropped {key} (PEFT's copy of the tied output head, equal to the base's embedding table)"


def export_peft(
    adapter: Adapter, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write a PEFT directory that ``PeftModel.from_pretrained`` loads to the same function."""
    if adapter.token_rows:
        raise EdgeLoraError(
            "adapters with new tokens have no PEFT LoRA equivalent", hint="export to a bundle instead"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {m: w.rank for m, w in adapter.modules.items()}
    alphas = {m: w.alpha for m, w in adapter.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(adapter.modules),
        "use_rslora": adapter.rslora,
        "use_dora": adapter.dora,
        "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "fan_in_fan_out": False,
        **({"alora_invocation_tokens": list(adapter.invocation_tokens)} if adapter.activated else {}),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for m, w in adapter.modules.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = w.a.astype(np.float32)
        tensors[f"{PREFIX}{m}.lora_B.weight"] = w.b.astype(np.float32)
        if w.magnitude is not None:
            tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = w.magnitude.astype(np.float32)
    save_tensors(out / WEIGHTS_FILE, tensors, {"format": "pt"})
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out
