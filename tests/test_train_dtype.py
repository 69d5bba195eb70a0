"""``--compute-dtype auto``: fp32 by rule where bf16 is not native or the model is tiny, else measured
(the faster of a few timed passes in each dtype), leaving the weights, gradients and random state as
the run would have them in that dtype."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from edge_lora.train import devices
from edge_lora.train.devices import PROBE_MIN_PARAMS, Dist, resolve_compute_dtype
from edge_lora.train.dtype_probe import measure_dtypes

CPU = torch.device("cpu")


def test_rule_and_when_it_measures(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_compute_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_compute_dtype("fp32", CPU) == torch.float32
    assert resolve_compute_dtype("auto", CPU, PROBE_MIN_PARAMS) is None  # native bf16, real size: measure
    assert resolve_compute_dtype("auto", CPU, PROBE_MIN_PARAMS - 1) == torch.float32  # tiny: fp32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_compute_dtype("auto", CPU, PROBE_MIN_PARAMS) == torch.float32  # emulated bf16: fp32


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.base.requires_grad_(False)
        self.lora = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return (self.base(x.to(self.base.weight.dtype)).float() * self.lora).sum()


@pytest.mark.parametrize("faster", [torch.float32, torch.bfloat16])
def test_measured_choice_is_the_faster_and_leaves_no_trace(faster):
    torch.manual_seed(0)
    model = Tiny()
    weight = model.base.weight.detach().clone()
    calls = []

    def run_pass(bf16: bool) -> None:
        calls.append(bf16)
        time.sleep(0.02 if bf16 == (faster == torch.float32) else 0.0)  # the slower dtype sleeps
        model(torch.randn(2, 8)).backward()  # draws from the RNG, as dropout would

    state = torch.get_rng_state()
    choice = measure_dtypes(model, run_pass, Dist(), CPU)
    assert choice.dtype == faster and choice.how == "measured"
    assert calls == [False] * 3 + [True] * 3  # one warm-up and two timed passes per dtype
    assert choice.seconds["float32" if faster == torch.float32 else "bfloat16"] < 0.02
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    assert model.lora.grad is None and model.lora.dtype == torch.float32
    assert model.base.weight.dtype == faster
    if faster == torch.float32:
        assert torch.equal(model.base.weight, weight)  # the fp32 weights came back bit for bit
    assert "measured" in choice.describe()


def test_trainer_measures_logs_and_trains_as_the_chosen_dtype_would(tmp_path, model_dirs, monkeypatch):
    """The trainer's own probe, forced on a tiny model: the choice is logged, and the adapter equals
    the one a run forced to that dtype writes (the probe's passes left no trace)."""
    import json

    from test_train_loop import make_data, tensors
    from tiny_models import quick_train_config

    from edge_lora.train.trainer import train

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(devices, "PROBE_MIN_PARAMS", 0)
    data = make_data(tmp_path / "d.jsonl", "text", n=8)
    auto = quick_train_config(tmp_path, model_dirs["llama"], data, dropout=0.1, eval_split=0)
    train(auto)
    records = [json.loads(line) for line in open(auto.log_path)]
    chosen = next(r for r in records if r.get("event") == "compute_dtype")
    assert chosen["how"] == "measured" and set(chosen["pass_seconds"]) == {"float32", "bfloat16"}
    assert chosen["dtype"] in ("float32", "bfloat16")
    forced = quick_train_config(
        tmp_path,
        model_dirs["llama"],
        data,
        dropout=0.1,
        eval_split=0,
        compute_dtype="fp32" if chosen["dtype"] == "float32" else "bf16",
        out=str(tmp_path / "forced.safetensors"),
        log_file=str(tmp_path / "forced.jsonl"),
    )
    train(forced)
    for name, value in tensors(auto.out).items():
        np.testing.assert_array_equal(value, tensors(forced.out)[name])
