"""Sampling and stop strings, shared by both backends."""

import numpy as np
import pytest

from edge_lora.errors import EdgeLoraError
from runtime.engine import _find_stop, _longest_stop_prefix
from runtime.sampling import Sampler, SamplingParams


def test_greedy_takes_argmax():
    assert Sampler(SamplingParams())(np.array([0.1, 3.0, 2.0]), []) == 1


def test_repetition_penalty_demotes_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1


def test_top_k_one_is_greedy_and_seed_repeats():
    logits = np.random.default_rng(0).normal(size=50)
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits, []) == int(np.argmax(logits))
    draws = lambda: [Sampler(SamplingParams(temperature=1.0, seed=7))(logits, []) for _ in range(5)]  # noqa: E731
    assert draws() == draws()


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}


def test_bad_settings_are_refused():
    with pytest.raises(EdgeLoraError, match="top_p"):
        SamplingParams.from_kwargs(top_p=0.0)


def test_stop_string_helpers():
    assert _find_stop("hello\n\nworld", ["\n\n"]) == 5
    assert _find_stop("hello", ["\n\n"]) is None
    assert _longest_stop_prefix("abc\n", ["\n\n"]) == 1  # may be the start of a stop string
    assert _longest_stop_prefix("abc", ["\n\n", "END"]) == 0
