"""Where each adapter of a request starts to act: activated adapters (aLoRA) as PEFT defines them.

An activated adapter (``Adapter.invocation_tokens``) acts from the start of the LAST occurrence of its
invocation tokens in the prompt on, and nowhere in a prompt without them; an ordinary adapter acts
everywhere. A request's prompt is therefore cut into segments, each evaluated under the adapters that
act from its first position on: the positions before an invocation are the base's (or the ordinary
adapters'), so their KV cache is the one every activated adapter shares. Generated tokens continue
under the last segment's set. PEFT computes the same from the ids it is given
(``peft.tuners.lora.variants.calculate_alora_offsets``): the prompt in ``generate``, the whole
sequence in a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edge_lora.adapter import Adapter


@dataclass(frozen=True)
class Segment:
    start: int  # the first prompt position it covers
    end: int  # one past its last
    adapters: dict[str, float]  # the adapters acting from its start on, with their scales


def last_occurrence(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """The start of the last occurrence of ``pattern`` in ``ids``; None when it does not occur."""
    n = len(pattern)
    if not n:
        return None
    first = pattern[0]
    for start in range(len(ids) - n, -1, -1):
        if ids[start] == first and list(ids[start : start + n]) == list(pattern):
            return start
    return None


def activation_plan(
    ids: Sequence[int], adapter_set: Mapping[str, float], adapters: Mapping[str, Adapter]
) -> list[Segment]:
    """The segments of a prompt (the first starts at 0): one unless the set holds activated adapters.

    ``adapters``: each name of ``adapter_set`` to its :class:`Adapter`."""
    starts: dict[str, int] = {}
    for name in adapter_set:
        invocation = adapters[name].invocation_tokens
        start = 0 if not invocation else last_occurrence(ids, invocation)
        if start is not None:  # an activated adapter whose invocation is missing acts nowhere
            starts[name] = start
    points = sorted({0, *starts.values()})
    return [
        Segment(p, end, {n: float(s) for n, s in adapter_set.items() if n in starts and starts[n] <= p})
        for p, end in zip(points, [*points[1:], len(ids)])
    ]
