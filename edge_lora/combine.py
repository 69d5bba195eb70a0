"""Several adapters for one base combined into one adapter: PEFT's ``add_weighted_adapter`` in numpy.

Methods (PEFT's names and semantics, peft/tuners/lora/model.py):

    cat                   A_i scaled by w_i * s_i stacked along the rank, B_i beside them: exactly the
                          stacked set {a: w_a, b: w_b}; rank = the sum of the inputs' ranks
    linear, ties, dare_linear, dare_ties, magnitude_prune
                          the A's merged with weights sign(w_i s_i) sqrt(|w_i s_i|), the B's with
                          sqrt(|w_i s_i|) (edge_lora/merge_methods.py); needs one rank per module
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                          the deltas s_i B_i A_i merged with weights w_i, then cut back to ``rank``
                          (default: the largest input rank) by an SVD, optionally clamped at a quantile

``s_i`` is each input's own scaling per module (alpha / r, or alpha / sqrt(r) for rsLoRA), so inputs may
differ in rank, alpha, scaling rule and targets; a module an input lacks counts as zero. The result holds
the scaling in its tensors: alpha = rank, standard scaling, scale 1. (PEFT gives the combined adapter the
first input's ``use_rslora``, which scales the result by sqrt(r) once more when that input was rsLoRA;
here the result's delta is the one its own rule defines.) A single input is combined by ``linear``, as
PEFT does. DARE masks are drawn from ``seed``, per module, tensor and input, so a seed reproduces a file.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.combine_tokens import union_tokens
from edge_lora.errors import EdgeLoraError
from edge_lora.merge_methods import SIGN_METHODS, merge

METHODS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
PRUNING = tuple(m for m in METHODS if m.startswith(("ties", "dare", "magnitude")))
TOKEN_METHODS = ("cat", "linear")  # the methods whose result stands for the stack, new tokens included
_PART_IDS = {"lora_A": 1, "lora_B": 2, "delta": 3}


@dataclass
class CombineConfig:
    method: str = "cat"
    rank: int | None = None  # the svd methods' rank; default the largest rank among the inputs
    density: float | None = None  # the fraction kept by the pruning methods, in (0, 1]
    majority_sign: str = "total"  # TIES' sign election: "total" or "frequency"
    clamp: float | None = None  # the svd methods: clamp U and V at this quantile of their values
    seed: int = 0  # DARE's random masks

    def check(self) -> None:
        if self.method not in METHODS:
            raise EdgeLoraError(f"unknown method {self.method!r}", hint=f"pick one of {', '.join(METHODS)}")
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank <= 0):
            raise EdgeLoraError(f"rank {self.rank} must be a positive integer")
        if self.density is not None and not (0 < self.density <= 1):
            raise EdgeLoraError(f"density {self.density} must be in (0, 1]")
        if self.method in PRUNING and self.density is None:
            raise EdgeLoraError(f"method {self.method} needs a density", hint="pass --density in (0, 1]")
        if self.majority_sign not in SIGN_METHODS:
            raise EdgeLoraError(f"majority sign method {self.majority_sign!r} is not 'total' or 'frequency'")
        if self.clamp is not None and not (0 < self.clamp <= 1):
            raise EdgeLoraError(f"clamp {self.clamp} must be a quantile in (0, 1]")


@dataclass
class Source:
    """One input: a name for messages and provenance, the adapter and its weight."""

    name: str
    adapter: Adapter
    weight: float
    path: str | os.PathLike | None = None
    info: dict = field(default_factory=dict)  # extra provenance (e.g. the file's sha256)


def combine_adapters(sources: list[Source], config: CombineConfig) -> Adapter:
    """The combined adapter (in memory); :func:`combine_to_file` writes it."""
    config.check()
    _check_sources(sources)
    method = "linear" if len(sources) == 1 else config.method
    if method not in TOKEN_METHODS and any(s.adapter.token_rows for s in sources):
        who = next(s.name for s in sources if s.adapter.token_rows)
        raise EdgeLoraError(
            f"adapter {who!r} adds or replaces token rows, which only cat and linear carry",
            hint="combine it with --method cat or linear",
        )
    invocations = {tuple(s.adapter.invocation_tokens) for s in sources}
    if len(invocations) > 1:  # one combined adapter has one place where it starts to act
        raise EdgeLoraError(
            "activated adapters (aLoRA) combine only with others of the same invocation tokens",
            hint="stack them per request instead: each acts from its own invocation",
        )
    tokens = union_tokens([(s.name, s.adapter) for s in sources])
    rank = config.rank or max(max((w.rank for w in s.adapter.modules.values()), default=1) for s in sources)
    modules = {}
    for module in _module_order(sources):
        present = [(i, s) for i, s in enumerate(sources) if module in s.adapter.modules]
        if method == "cat":
            modules[module] = _cat(module, present)
        elif method.endswith("_svd") or method == "svd":
            modules[module] = _svd(module, present, method, rank, config)
        else:
            modules[module] = _factors(module, present, method, config)
    combined = Adapter(
        modules=modules,
        base_architecture=_architecture(sources),
        base_fingerprint=next(
            (s.adapter.base_fingerprint for s in sources if s.adapter.base_fingerprint), None
        ),
        rslora=False,
        target_modules=sorted(modules),
        invocation_tokens=list(next(iter(invocations))),
        extra={"combined": provenance(sources, config, method, rank)},
    )
    tokens.apply_to(combined)
    return combined


def combine_to_file(sources: list[Source], config: CombineConfig, out: str | os.PathLike) -> Adapter:
    """Combine and write ``out`` atomically (a failure leaves no file)."""
    combined = combine_adapters(sources, config)
    combined.save(out)  # safetensors_file.save_tensors writes through edge_lora.atomic
    return combined


def provenance(sources: list[Source], config: CombineConfig, method: str, rank: int) -> dict:
    """What the combined adapter was made from, for its metadata (``inspect`` shows it)."""
    params = {k: v for k, v in asdict(config).items() if k != "method" and v is not None}
    params["rank"] = rank  # the svd methods' rank, also when it was the default
    if method not in PRUNING:
        params = {k: v for k, v in params.items() if k not in ("density", "majority_sign", "seed")}
    if not (method.endswith("svd")):
        params = {k: v for k, v in params.items() if k not in ("rank", "clamp")}
    if "dare" not in method:
        params.pop("seed", None)
    return {
        "method": method,
        "parameters": params,
        "sources": [
            {
                "name": s.name,
                "weight": float(s.weight),
                **({"path": str(s.path)} if s.path is not None else {}),
                "ranks": sorted({w.rank for w in s.adapter.modules.values()}),
                **s.info,
            }
            for s in sources
        ],
    }


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the methods, per module -------------------------------------------------------------------------


def _cat(module: str, present: list[tuple[int, Source]]) -> LoraWeights:
    a = [_f32(s.adapter.modules[module].a) * s.weight * s.adapter.scale(module) for _, s in present]
    b = [_f32(s.adapter.modules[module].b) for _, s in present]
    a_cat, b_cat = np.concatenate(a, axis=0), np.concatenate(b, axis=1)
    return LoraWeights(a=a_cat, b=b_cat, alpha=float(a_cat.shape[0]))


def _factors(
    module: str, present: list[tuple[int, Source]], method: str, config: CombineConfig
) -> LoraWeights:
    ranks = {s.name: s.adapter.modules[module].rank for _, s in present}
    if len(set(ranks.values())) > 1:
        raise EdgeLoraError(
            f"method {method} needs one rank per module, but {module} has ranks "
            + ", ".join(f"{r} ({n})" for n, r in ranks.items()),
            hint="use cat, or an svd method with --rank",
        )
    weights_a, weights_b = [], []
    for _, s in present:
        ws = s.weight * s.adapter.scale(module)
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
        weights_b.append(math.sqrt(abs(ws)))
    out = {}
    for part, weights in (("lora_A", weights_a), ("lora_B", weights_b)):
        tensors = [_f32(getattr(s.adapter.modules[module], part[-1].lower())) for _, s in present]
        out[part] = merge(
            method,
            tensors,
            weights,
            density=config.density or 1.0,
            sign_method=config.majority_sign,
            keep=_keeper(config, module, part, [i for i, _ in present]),
        )
    return LoraWeights(a=out["lora_A"], b=out["lora_B"], alpha=float(out["lora_A"].shape[0]))


def _svd(
    module: str, present: list[tuple[int, Source]], method: str, rank: int, config: CombineConfig
) -> LoraWeights:
    deltas = [
        (_f32(s.adapter.modules[module].b) @ _f32(s.adapter.modules[module].a))
        * np.float32(s.adapter.scale(module))
        for _, s in present
    ]
    base = "linear" if method == "svd" else method[: -len("_svd")]
    delta = merge(
        base,
        deltas,
        [s.weight for _, s in present],
        density=config.density or 1.0,
        sign_method=config.majority_sign,
        keep=_keeper(config, module, "delta", [i for i, _ in present]),
    )
    u, s, vh = canonical_signs(*np.linalg.svd(delta, full_matrices=False))
    r = min(rank, s.shape[0])  # a rank above min(out, in) adds nothing
    u = u[:, :r] @ np.diag(s[:r])
    vh = vh[:r, :]
    if config.clamp is not None:
        hi = np.quantile(np.concatenate([u.reshape(-1), vh.reshape(-1)]), config.clamp)
        u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
    return LoraWeights(a=vh.astype(np.float32), b=u.astype(np.float32), alpha=float(r))


def canonical_signs(u: np.ndarray, s: np.ndarray, vh: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each singular pair's sign fixed (the largest |entry| of its U column positive): an SVD's signs are
    arbitrary and differ between LAPACK builds, and ``--clamp``'s quantile depends on them."""
    k = s.shape[0]
    flip = np.sign(u[np.abs(u[:, :k]).argmax(axis=0), np.arange(k)])
    flip[flip == 0] = 1
    u, vh = u.copy(), vh.copy()
    u[:, :k] *= flip
    vh[:k] *= flip[:, None]
    return u, s, vh


def dare_keep_mask(
    seed: int, module: str, part: str, index: int, shape: tuple[int, ...], density: float
) -> np.ndarray:
    """DARE's keep mask for input ``index``'s tensor ``part`` of ``module``: each value kept with
    probability ``density``; a function of its arguments only, so one seed gives one file."""
    key = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, key, _PART_IDS[part], index])
    return rng.random(shape) < density


def _keeper(config: CombineConfig, module: str, part: str, indices: list[int]):
    density = config.density or 1.0
    return lambda i, shape: dare_keep_mask(config.seed, module, part, indices[i], shape, density)


# --- checks -------------------------------------------------------------------------------------------


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _module_order(sources: list[Source]) -> list[str]:
    seen: dict[str, None] = {}
    for s in sources:
        seen.update(dict.fromkeys(s.adapter.modules))
    return list(seen)


def _architecture(sources: list[Source]) -> str:
    known = [
        s.adapter.base_architecture for s in sources if s.adapter.base_architecture not in ("", "unknown")
    ]
    return known[0] if known else sources[0].adapter.base_architecture


def _check_sources(sources: list[Source]) -> None:
    if not sources:
        raise EdgeLoraError("nothing to combine", hint="pass at least one --adapter")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise EdgeLoraError(f"adapter {sorted(n for n in names if names.count(n) > 1)[0]!r} is given twice")
    for s in sources:
        if (
            isinstance(s.weight, bool)
            or not isinstance(s.weight, (int, float))
            or not math.isfinite(s.weight)
        ):
            raise EdgeLoraError(f"adapter {s.name!r}: weight {s.weight!r} is not a finite number")
        if s.adapter.dora:
            raise EdgeLoraError(
                f"adapter {s.name!r} is DoRA: its magnitudes cannot be combined "
                "(PEFT's add_weighted_adapter drops them)",
                path=s.path,
                hint="stack it at run time, or fold it into the base with `edge-lora merge`",
            )
        _check_finite(s)
    _check_same_base(sources)


def _check_finite(s: Source) -> None:
    for module, w in s.adapter.modules.items():
        for part, arr in (("lora_A", w.a), ("lora_B", w.b)):
            if not np.isfinite(np.asarray(arr, np.float32)).all():
                raise EdgeLoraError(f"adapter {s.name!r}: {module}.{part} holds NaN or Inf", path=s.path)
        if not math.isfinite(w.alpha):
            raise EdgeLoraError(f"adapter {s.name!r}: {module} alpha {w.alpha} is not finite", path=s.path)


def _check_same_base(sources: list[Source]) -> None:
    """One base: fingerprints (where recorded), architectures and every shared module's shape agree."""
    first_fp = next((s for s in sources if s.adapter.base_fingerprint), None)
    for s in sources:
        fp = s.adapter.base_fingerprint
        if first_fp and fp and fp != first_fp.adapter.base_fingerprint:
            raise EdgeLoraError(
                f"adapters {first_fp.name!r} and {s.name!r} were made for different bases "
                f"({first_fp.adapter.base_fingerprint[:19]}… vs {fp[:19]}…)",
                path=s.path,
                hint="combine adapters trained on the same base model",
            )
    known = [s for s in sources if s.adapter.base_architecture not in ("", "unknown")]
    for s in known[1:]:
        if s.adapter.base_architecture != known[0].adapter.base_architecture:
            raise EdgeLoraError(
                f"adapters {known[0].name!r} and {s.name!r} were made for different bases "
                f"({known[0].adapter.base_architecture} vs {s.adapter.base_architecture})",
                path=s.path,
            )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for s in sources:
        for module, w in s.adapter.modules.items():
            shape = (w.b.shape[0], w.a.shape[1])
            seen = shapes.setdefault(module, (shape, s.name))
            if seen[0] != shape:
                raise EdgeLoraError(
                    f"adapters {seen[1]!r} and {s.name!r} disagree on {module}'s shape "
                    f"({list(seen[0])} vs {list(shape)}): different bases",
                    path=s.path,
                )
