"""Training data: JSONL in three shapes, tokenized with a loss mask, truncated, optionally packed.

One example per line, any of:

* ``{"text": "..."}`` -- every token is a target;
* ``{"prompt": "...", "completion": "..."}`` -- only the completion (and the end-of-sequence token) is;
* ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}`` -- rendered
  with the model's chat template exactly as transformers renders it (``edge_lora.chat_template``);
  only the assistant turns (with their end-of-turn marker) are targets. A model without a template
  gets ChatML.

The whole file is checked before training starts; every bad line is reported as ``file:line``.

Activated LoRA (``--alora-invocation``): every example must contain the invocation tokens (as the text
tokenizes inside the example) with at least one target token after their last occurrence's start;
otherwise the adapter could not change that example's loss, and the run is refused naming the examples.
Target tokens at or before the invocation are kept (they train nothing: the model is the base there)
and counted, so the trainer can warn about them (``stats["before_invocation"]``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.chat_template import ChatTemplate
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import torch

    from edge_lora.model_dir import ModelDir

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 8


@dataclass
class Example:
    ids: np.ndarray  # int64 [T]
    mask: np.ndarray  # bool [T]: token i is a training target (predicted from position i-1)
    # int32 [T]: which packed example each token belongs to (None: one example)
    segments: np.ndarray | None = None

    @property
    def targets(self) -> int:
        return int(self.mask[1:].sum())


# --- reading and validating ---------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Parse and validate every line; raise one error naming each bad ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError("data file not found", path=path)
    records, errors = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                errors.append(f"{path}:{lineno}: not UTF-8")
                continue
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            why = _check_record(record)
            if why:
                errors.append(f"{path}:{lineno}: {why}")
                continue
            records.append(record)
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED]) + (
            f"; and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        )
        raise EdgeLoraError(
            f"{len(errors)} bad line(s): {shown}",
            path=path,
            hint='each line needs {"text": ...}, {"prompt": ..., "completion": ...} '
            'or {"messages": [{"role", "content"}...]}',
        )
    if not records:
        raise EdgeLoraError("no examples in the file", path=path)
    return records


def _check_record(record: object) -> str | None:
    if not isinstance(record, dict):
        return "a line must be a JSON object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                return f"messages[{i}] needs string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "a conversation needs at least one assistant message to train on"
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            return "'prompt' and 'completion' must both be strings"
        if not record["completion"]:
            return "'completion' is empty"
        return None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return "'text' must be a non-empty string"
        return None
    return f"no 'text', 'prompt'/'completion' or 'messages' key (found {sorted(record)[:5]})"


# --- tokenizing ---------------------------------------------------------------------------


class Formatter:
    """Turns records into :class:`Example` with the model's tokenizer and chat template."""

    def __init__(self, model_dir: str | os.PathLike | ModelDir, added_tokens: list[str] | None = None):
        from tokenizers import Tokenizer

        from edge_lora.model_dir import ModelDir

        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        self.tokenizer = Tokenizer.from_file(str(md.tokenizer_path))
        self.base_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.added_tokens = list(added_tokens or [])
        if self.added_tokens:
            from tokenizers import AddedToken

            from edge_lora.token_rows import check_new_token_strings

            # the same refusal as adding such an adapter: one string would have two ids
            check_new_token_strings(self.added_tokens, self.tokenizer.token_to_id, md.tokenizer_path)
            self.tokenizer.add_tokens(
                [AddedToken(t, special=False, normalized=False) for t in self.added_tokens]
            )
        # new tokens get the ids after the model's embedding rows (config.vocab_size), which can exceed the
        # tokenizer's size (Qwen2.5 pads 151665 tokens to 151936 rows): the tokenizer's ids are moved up
        self.new_id_shift = md.config.vocab_size - self.base_vocab if self.added_tokens else 0
        self.model_vocab = md.config.vocab_size
        self.template = ChatTemplate.find(md.tokenizer_config, md.path)
        self.template_source = self.template.origin
        self.eos_id = self._id(self.template.special.get("eos_token"))
        if self.eos_id is None and md.config.eos_token_id:
            self.eos_id = md.config.eos_token_id[0]

    def _id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages, add_generation_prompt)

    def encode(self, record: dict) -> Example:
        if "messages" in record:
            return self._encode_chat(record["messages"])
        eos = [] if self.eos_id is None else [self.eos_id]
        if "text" in record:
            ids = self.tokenizer.encode(record["text"], add_special_tokens=True).ids + eos
            return Example(self._model_ids(ids), np.ones(len(ids), bool))
        prompt = self.tokenizer.encode(record["prompt"], add_special_tokens=True).ids
        completion = self.tokenizer.encode(record["completion"], add_special_tokens=False).ids + eos
        mask = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
        return Example(self._model_ids(prompt + completion), mask)

    def encode_text(self, text: str) -> list[int]:
        """``text`` as the model's ids (new tokens after its rows), special tokens added as the
        tokenizer does."""
        return self._model_ids(self.tokenizer.encode(text).ids).tolist()

    def invocation_tokens(self, text: str) -> list[int]:
        """An aLoRA invocation ``text`` as the model's ids, with no special tokens added (as a completion
        or a rendered conversation is tokenized); refused when it has none or uses a new token."""
        ids = self._model_ids(self.tokenizer.encode(text, add_special_tokens=False).ids).tolist()
        if not ids:
            raise EdgeLoraError(
                f"--alora-invocation {text!r} tokenizes to no tokens",
                hint="give the text that marks the start of the adapter's turn",
            )
        if any(i >= self.model_vocab for i in ids):
            raise EdgeLoraError(
                f"--alora-invocation {text!r} uses a token from --add-tokens",
                hint="the invocation must be made of the base's own tokens",
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        """The model's ids back to text (the inverse of the new tokens' move)."""
        top = self.base_vocab + self.new_id_shift
        return self.tokenizer.decode([i - self.new_id_shift if i >= top else i for i in ids])

    def _model_ids(self, ids: list[int]) -> np.ndarray:
        out = np.asarray(ids, np.int64)
        if self.new_id_shift:
            out[out >= self.base_vocab] += self.new_id_shift
        return out

    def _encode_chat(self, messages: list[dict]) -> Example:
        full = self.render(messages)
        spans = []  # character spans of the assistant turns in `full`
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if full.startswith(upto) and upto.startswith(prefix):
                spans.append((len(prefix), len(upto)))
            else:  # a template that rewrites earlier turns: find the content after the prefix
                start = full.find(m["content"], min(len(prefix), len(full)))
                if start < 0:
                    start = full.find(m["content"])
                if start >= 0:
                    spans.append((start, start + len(m["content"])))
        enc = self.tokenizer.encode(full, add_special_tokens=False)
        ids = self._model_ids(enc.ids)
        mask = np.zeros(len(ids), bool)
        for k, (s, _) in enumerate(enc.offsets):
            mask[k] = any(a <= s < b for a, b in spans)
        return Example(ids, mask)


# --- building the dataset -----------------------------------------------------------------


def build_examples(
    records: list[dict],
    formatter: Formatter,
    seq_len: int,
    *,
    packing: bool = False,
    invocation: list[int] | None = None,
    path: str | os.PathLike | None = None,
) -> tuple[list[Example], dict]:
    """Tokenize, truncate to ``seq_len``, drop examples with nothing left to learn, optionally pack.
    With aLoRA ``invocation`` tokens, each kept example is checked (see the module docstring; ``path``
    names the data file in the error)."""
    examples, stats = [], {"examples": len(records), "truncated": 0, "dropped": 0}
    missing, unreached, before = [], [], 0  # example numbers (1-based, as in the file)
    for k, record in enumerate(records, 1):
        ex = formatter.encode(record)
        if len(ex.ids) > seq_len:
            stats["truncated"] += 1
            ex = Example(ex.ids[:seq_len], ex.mask[:seq_len])
        if ex.targets == 0:
            stats["dropped"] += 1
            continue
        if invocation:
            start = invocation_start(ex.ids, invocation)
            if start < 0:
                missing.append(k)
            elif not ex.mask[start + 1 :].any():  # token t is predicted at position t-1 >= start
                unreached.append(k)
            else:
                before += bool(ex.mask[1 : start + 1].any())
        examples.append(ex)
    if invocation:
        _refuse_unactivated(missing, unreached, len(records), invocation, path)
        stats["before_invocation"] = before
    if packing:
        examples = pack(examples, seq_len)
    return examples, stats


def invocation_start(ids: np.ndarray, invocation: list[int]) -> int:
    """Where the last occurrence of ``invocation`` in ``ids`` starts, or -1 (PEFT's aLoRA rule)."""
    n = len(invocation)
    if n == 0 or len(ids) < n:
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(ids), n)
    hits = np.flatnonzero((windows == np.asarray(invocation, dtype=windows.dtype)).all(1))
    return int(hits[-1]) if len(hits) else -1


def _refuse_unactivated(
    missing: list[int],
    unreached: list[int],
    total: int,
    invocation: list[int],
    path: str | os.PathLike | None,
) -> None:
    def which(numbers: list[int]) -> str:
        more = f" and {len(numbers) - MAX_REPORTED} more" if len(numbers) > MAX_REPORTED else ""
        return ", ".join(map(str, numbers[:MAX_REPORTED])) + more

    if missing:
        raise EdgeLoraError(
            f"{len(missing)} of {total} examples lack the aLoRA invocation tokens {invocation} "
            f"(examples {which(missing)})",
            path=path,
            hint="put the --alora-invocation text right before each response, within --seq-len, where "
            "it tokenizes as it does alone (e.g. starting with a special token)",
        )
    if unreached:
        raise EdgeLoraError(
            f"in {len(unreached)} of {total} examples no target token follows the aLoRA invocation, so "
            f"the adapter cannot change their loss (examples {which(unreached)})",
            path=path,
            hint="put the --alora-invocation text before the response, not inside or after it",
        )


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Whole examples, in order, into rows of at most ``seq_len`` tokens, each token tagged with its
    example (``segments``): attention stays inside an example and positions restart at each one
    (see ``CausalLM.hidden_states``), so a packed row trains exactly as its examples one by one.
    An example's first token is never a target: nothing of it comes before."""
    rows, current = [], []
    for ex in examples:
        if current and sum(len(e.ids) for e in current) + len(ex.ids) > seq_len:
            rows.append(_join(current))
            current = []
        current.append(ex)
    if current:
        rows.append(_join(current))
    return rows


def _join(examples: list[Example]) -> Example:
    masks = [np.r_[False, e.mask[1:]] for e in examples]
    segments = np.concatenate([np.full(len(e.ids), k, np.int32) for k, e in enumerate(examples)])
    return Example(np.concatenate([e.ids for e in examples]), np.concatenate(masks), segments)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Carve a seeded random ``fraction`` (at least one example) off for evaluation."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = np.random.default_rng(seed).permutation(len(examples))
    eval_idx = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in eval_idx], [examples[i] for i in sorted(eval_idx)]


def collate(
    examples: list[Example], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded ``(ids [B, T], targets [B, T], segments [B, T] or None)`` torch tensors;
    ``targets[b, t]`` marks token t. Segments exist for packed rows; padding is segment -1."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.bool)
    packed = any(e.segments is not None for e in examples)
    segments = torch.full((len(examples), width), -1, dtype=torch.int32) if packed else None
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.from_numpy(e.ids)
        targets[b, : len(e.ids)] = torch.from_numpy(e.mask)
        if packed:
            segments[b, : len(e.ids)] = torch.from_numpy(e.segments) if e.segments is not None else 0
    targets[:, 0] = False
    return ids, targets, segments


class StepSampler:
    """Which examples make up optimizer step ``s``: a pure function of (seed, step), so a resumed
    run sees exactly the batches the uninterrupted run would have, and every data-parallel rank
    agrees on the global batch. Each epoch is a seeded permutation; the last batch of an epoch
    wraps around to its start so every step has the same global batch size."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = max(1, -(-n // global_batch))
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def step(self, s: int) -> np.ndarray:
        epoch, within = divmod(s, self.steps_per_epoch)
        perm = self._perm(epoch)
        idx = np.arange(within * self.global_batch, (within + 1) * self.global_batch) % self.n
        return perm[idx]

    def epoch_of(self, s: int) -> float:
        return s / self.steps_per_epoch
