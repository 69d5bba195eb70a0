"""`edge-lora combine` against PEFT's ``add_weighted_adapter``: every method's delta weights on tied and
untied GQA models, inputs with different ranks, alphas, scaling rules and target sets and a negative
weight; DARE with PEFT drawing our masks; new tokens; bad input; the provenance `inspect` shows."""

from __future__ import annotations

import numpy as np
import pytest
from factories import random_adapter
from tiny_models import load_hf

from converters.peft import export_peft
from edge_lora.adapter import Adapter
from edge_lora.app.cli import main
from edge_lora.combine import (
    METHODS,
    CombineConfig,
    Source,
    canonical_signs,
    combine_adapters,
    dare_keep_mask,
)
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

WEIGHTS = [1.0, -0.6]
SVD_METHODS = [m for m in METHODS if m.endswith("svd")]
FACTOR_METHODS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def _inputs(md: ModelDir, same_rank: bool) -> dict[str, Adapter]:
    """Two adapters that differ in alpha, scaling rule and targets (and in rank unless ``same_rank``)."""
    a = random_adapter(md, seed=1, rank=4, alpha=8.0, modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    b = random_adapter(
        md,
        seed=2,
        rank=4 if same_rank else 6,
        alpha=5.0,
        rslora=True,
        mixed_ranks=0 if same_rank else 2,  # per-module ranks: PEFT's rank_pattern
        modules=["q_proj", "k_proj", "gate_proj", "up_proj"],
    )
    return {"a": a, "b": b}


def _peft_deltas(md: ModelDir, inputs: dict[str, Adapter], tmp_path, method: str, **kwargs) -> dict:
    """PEFT's combined adapter "c": ``{module: B @ A}`` (its scaling is 1: r = lora_alpha = new rank)."""
    from peft import PeftModel

    model = load_hf(md.path)
    for i, (name, adapter) in enumerate(inputs.items()):
        folder = export_peft(adapter, tmp_path / f"peft_{name}")
        if i == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(list(inputs), WEIGHTS, "c", combination_type=method, **kwargs)
    deltas = {}
    for key, layer in model.base_model.model.named_modules():
        if hasattr(layer, "lora_A") and "c" in layer.lora_A:
            deltas[key] = (layer.lora_B["c"].weight @ layer.lora_A["c"].weight).detach().numpy()
    return deltas


def _ours(inputs: dict[str, Adapter], config: CombineConfig) -> Adapter:
    return combine_adapters([Source(n, a, w) for (n, a), w in zip(inputs.items(), WEIGHTS)], config)


def _max_diff(ours: Adapter, theirs: dict) -> float:
    assert set(ours.modules) == set(theirs)  # the union of the inputs' targets
    return max(float(np.abs(ours.delta(m) - theirs[m]).max()) for m in theirs)


def _peft_kwargs(method: str) -> tuple[dict, CombineConfig]:
    config = CombineConfig(method=method, seed=7)
    kwargs: dict = {}
    if method in SVD_METHODS:
        # rank 4 <= every module's delta rank: a null-space singular vector is arbitrary (torch and numpy pick
        # different ones) and the clamp's quantile would see it
        config.rank, config.clamp = 4, 0.98
        kwargs.update(svd_rank=4, svd_clamp=0.98)
    if method not in ("cat", "linear", "svd"):
        config.density, config.majority_sign = 0.6, "total" if "dare" in method else "frequency"
        kwargs.update(density=0.6, majority_sign_method=config.majority_sign)
    return kwargs, config


def _feed_our_masks(monkeypatch, md: ModelDir, inputs: dict, ours: Adapter, config: CombineConfig) -> list:
    """Make PEFT's ``torch.bernoulli`` return our DARE masks, in the order PEFT asks for them."""
    import torch

    queue = []
    svd = config.method.endswith("svd")
    for module in _model_order(md, ours):
        present = [i for i, a in enumerate(inputs.values()) if module in a.modules]
        for part in ("delta",) if svd else ("lora_A", "lora_B"):
            for i in present:
                w = list(inputs.values())[i].modules[module]
                shape = {"lora_A": w.a.shape, "lora_B": w.b.shape, "delta": (w.b.shape[0], w.a.shape[1])}[
                    part
                ]
                queue.append(dare_keep_mask(config.seed, module, part, i, shape, config.density))

    def bernoulli(probs, *args, **kwargs):
        mask = queue.pop(0)
        assert tuple(probs.shape) == mask.shape
        return torch.from_numpy(mask.astype(np.float32))

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return queue


def _canonical_torch_svd(monkeypatch) -> None:
    """PEFT's SVD with each singular pair's sign fixed by our rule (combine.canonical_signs): the signs
    are arbitrary (torch's and numpy's LAPACK pick differently) and the clamp's quantile depends on them."""
    import torch

    svd = torch.linalg.svd

    def fixed(x, *args, **kwargs):
        u, s, vh = svd(x, *args, **kwargs)
        u, s, vh = canonical_signs(u.numpy(), s.numpy(), vh.numpy())
        return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)

    monkeypatch.setattr(torch.linalg, "svd", fixed)


def _model_order(md: ModelDir, adapter: Adapter) -> list[str]:
    from edge_lora.targets import linear_modules

    return [m for m in linear_modules(md.config, include_lm_head=True) if m in adapter.modules]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied GQA, tied GQA with q/k/v bias
@pytest.mark.parametrize("method", METHODS)
def test_delta_weights_equal_peft(model_dirs, tmp_path, monkeypatch, family, method):
    md = ModelDir(model_dirs[family])
    inputs = _inputs(md, same_rank=method in FACTOR_METHODS)  # PEFT needs one rank for those
    kwargs, config = _peft_kwargs(method)
    ours = _ours(inputs, config)
    queue = _feed_our_masks(monkeypatch, md, inputs, ours, config) if "dare" in method else []
    if method in SVD_METHODS:
        _canonical_torch_svd(monkeypatch)
    theirs = _peft_deltas(md, inputs, tmp_path, method, **kwargs)
    assert not queue  # PEFT drew exactly our masks
    diff = _max_diff(ours, theirs)
    print(f"{family} {method}: max |delta - PEFT's| = {diff:.2e}")
    assert diff < 1e-5
    assert max(float(np.abs(d).max()) for d in theirs.values()) > 0.05  # not comparing zeros
    if method in SVD_METHODS:
        assert {w.rank for w in ours.modules.values()} == {4}


def test_svd_without_clamp_equals_peft_unpatched(model_dirs, tmp_path):
    """Without a clamp the result does not depend on the SVD's signs: PEFT's own torch SVD as it is."""
    md = ModelDir(model_dirs["qwen2"])
    inputs = _inputs(md, same_rank=False)
    ours = _ours(inputs, CombineConfig("svd", rank=3))
    diff = _max_diff(ours, _peft_deltas(md, inputs, tmp_path, "svd", svd_rank=3))
    print(f"qwen2 svd rank 3, no clamp: max |delta - PEFT's| = {diff:.2e}")
    assert diff < 1e-5


def test_cat_is_the_stack_and_single_input_is_linear(model_dirs):
    md = ModelDir(model_dirs["llama"])
    inputs = _inputs(md, same_rank=False)
    cat = _ours(inputs, CombineConfig("cat"))
    for m, w in cat.modules.items():
        expected = sum(
            weight * a.delta(m) for (_, a), weight in zip(inputs.items(), WEIGHTS) if m in a.modules
        )
        np.testing.assert_allclose(cat.delta(m), expected, atol=1e-6)
        assert w.rank == sum(a.modules[m].rank for a in inputs.values() if m in a.modules)
    one = combine_adapters([Source("a", inputs["a"], 0.5)], CombineConfig("ties", density=0.2))
    assert one.extra["combined"]["method"] == "linear"  # as PEFT: one input is combined linearly
    for m in one.modules:
        np.testing.assert_allclose(one.delta(m), 0.5 * inputs["a"].delta(m), atol=1e-6)


def test_dare_reproducible_from_seed(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    for seed, name in ((1, "a"), (2, "b")):
        random_adapter(md, seed=seed).save(tmp_path / f"{name}.safetensors")
    inputs = ["--adapter", str(tmp_path / "a.safetensors"), "--adapter", str(tmp_path / "b.safetensors")]

    def run(out: str, seed: int) -> bytes:
        options = ["--method", "dare_ties", "--density", "0.5", "--seed", str(seed)]
        assert main(["combine", *inputs, *options, "--out", str(tmp_path / out)]) == 0
        return (tmp_path / out).read_bytes()

    first = run("1.safetensors", 3)
    assert first == run("2.safetensors", 3) and first != run("3.safetensors", 4)


def _with_tokens(adapter: Adapter, tokens: list[str], seed: int, hidden: int) -> Adapter:
    rng = np.random.default_rng(seed)
    adapter.added_tokens = tokens
    adapter.embed_rows = rng.normal(size=(len(tokens), hidden)).astype(np.float32)
    adapter.head_rows = rng.normal(size=(len(tokens), hidden)).astype(np.float32)
    return adapter


def test_new_tokens_union_and_clash(model_dirs):
    md = ModelDir(model_dirs["llama"])
    h = md.config.hidden_size
    a = _with_tokens(random_adapter(md, seed=1), ["<x>", "<y>"], 1, h)
    b = random_adapter(md, seed=2)
    b.added_tokens, b.embed_rows, b.head_rows = ["<x>"], a.embed_rows[:1].copy(), a.head_rows[:1].copy()
    for method in ("cat", "linear"):
        c = combine_adapters([Source("a", a, 1.0), Source("b", b, 0.5)], CombineConfig(method))
        assert c.added_tokens == ["<x>", "<y>"]
        np.testing.assert_array_equal(c.embed_rows, a.embed_rows)
        np.testing.assert_array_equal(c.head_rows, a.head_rows)
    clash = _with_tokens(random_adapter(md, seed=3), ["<z>"], 3, h)
    with pytest.raises(EdgeLoraError, match="adapters 'a' and 'z' both define new token 0"):
        combine_adapters([Source("a", a, 1.0), Source("z", clash, 1.0)], CombineConfig("cat"))
    with pytest.raises(EdgeLoraError, match="only cat and linear carry"):
        combine_adapters([Source("a", a, 1.0), Source("b", b, 1.0)], CombineConfig("svd"))


def test_dora_refused_in_one_line(model_dirs):
    md = ModelDir(model_dirs["llama"])
    dora = random_adapter(md, seed=1, dora=True)
    with pytest.raises(EdgeLoraError, match="'d' is DoRA: its magnitudes cannot be combined"):
        combine_adapters(
            [Source("a", random_adapter(md, seed=2), 1.0), Source("d", dora, 1.0)], CombineConfig()
        )


def test_linear_refuses_different_ranks_naming_them(model_dirs):
    md = ModelDir(model_dirs["llama"])
    inputs = _inputs(md, same_rank=False)
    with pytest.raises(
        EdgeLoraError, match=r"needs one rank per module, but .*q_proj has ranks 4 \(a\), 6 \(b\)"
    ):
        _ours(inputs, CombineConfig("linear"))


@pytest.fixture
def files(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    random_adapter(md, seed=1).save(tmp_path / "a.safetensors")
    random_adapter(md, seed=2, rank=8).save(tmp_path / "b.safetensors")
    return md, tmp_path


def test_cli_writes_provenance_that_inspect_shows(files, capsys):
    md, tmp = files
    out = tmp / "c.safetensors"
    code = main(
        [
            "combine",
            "--adapter",
            f"{tmp / 'a.safetensors'}:1.0",
            "--adapter",
            f"{tmp / 'b.safetensors'}:-0.5",
            "--method",
            "svd",
            "--rank",
            "6",
            "--base",
            str(md.path),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    c = Adapter.load(out, base=md.config, base_fingerprint=md.fingerprint)
    info = c.extra["combined"]
    assert info["method"] == "svd" and info["parameters"] == {"rank": 6}
    assert [(s["name"], s["weight"]) for s in info["sources"]] == [("a", 1.0), ("b", -0.5)]
    assert len(info["sources"][0]["sha256"]) == 64
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method: svd" in text and "rank: 6" in text
    assert any("name=b" in line and "weight=-0.5" in line for line in text.splitlines())


def _bad_peft_nan(tmp, md):
    adapter = random_adapter(md, seed=3)
    folder = export_peft(adapter, tmp / "nan_peft")
    from edge_lora.safetensors_file import SafetensorsFile, save_tensors

    st = SafetensorsFile(folder / "adapter_model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    first = sorted(tensors)[0]
    tensors[first][0, 0] = np.nan
    save_tensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("other_base", [], "were made for different bases"),
        ("unknown_method", ["--method", "average"], "unknown method 'average'"),
        ("rank_zero", ["--method", "svd", "--rank", "0"], "rank 0 must be a positive integer"),
        ("density_zero", ["--method", "ties", "--density", "0"], r"density 0.0 must be in \(0, 1\]"),
        ("density_big", ["--method", "dare_linear", "--density", "1.5"], r"density 1.5 must be in \(0, 1\]"),
        ("nan_input", [], "holds NaN or Inf"),
        ("nan_peft", [], "holds NaN or Inf"),
        ("weights_count", ["--weights", "1.0"], "gives 1 weights for 2 adapters"),
        ("nan_weight", ["--weights", "1.0,nan"], "is not a finite number"),
    ],
)
def test_bad_input_one_line_and_no_file(files, model_dirs, tmp_path, capsys, case, extra, message):
    md, tmp = files
    second = tmp / "b.safetensors"
    if case == "other_base":
        from tiny_models import make_model_dir

        other = ModelDir(make_model_dir(tmp / "other", "llama", seed=5))
        second = tmp / "other.safetensors"
        random_adapter(other, seed=2).save(second)
    elif case == "nan_input":
        bad = random_adapter(md, seed=2)
        next(iter(bad.modules.values())).b[0, 0] = np.inf
        second = tmp / "nan.safetensors"
        bad.save(second)
    elif case == "nan_peft":
        second = _bad_peft_nan(tmp, md)
    out = tmp / "out.safetensors"
    capsys.readouterr()
    code = main(
        [
            "combine",
            "--adapter",
            str(tmp / "a.safetensors"),
            "--adapter",
            str(second),
            *extra,
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert __import__("re").search(message, err), err
    assert not out.exists() and not list(tmp.glob(".out.safetensors.*"))


def test_peft_directory_input_with_base(files):
    md, tmp = files
    b = Adapter.load(tmp / "b.safetensors")
    export_peft(b, tmp / "b_peft")
    out = tmp / "mixed.safetensors"
    spec = ["--adapter", f"{tmp / 'a.safetensors'}:1.0", "--adapter", f"{tmp / 'b_peft'}:0.5"]
    assert main(["combine", *spec, "--base", str(md.path), "--out", str(out)]) == 0
    c = Adapter.load(out, base=md.config, base_fingerprint=md.fingerprint)
    a = Adapter.load(tmp / "a.safetensors")
    assert c.base_fingerprint == md.fingerprint  # a PEFT dir records none: the base gives it
    for m in c.modules:
        np.testing.assert_allclose(c.delta(m), a.delta(m) + 0.5 * b.delta(m), atol=1e-6)
