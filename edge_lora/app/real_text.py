"""Real English text for measuring a real model, from sources every Debian machine and every Python have.

evaluation   ``/usr/share/common-licenses/GPL-3`` (Debian's ``base-files`` package, on every Debian and
             Ubuntu system): the GNU GPL version 3, ~5,600 words of plain English prose, ~7k tokens with
             a 49k BPE vocabulary. Perplexity rows (benchmarks.quality_bench) are measured on it.
calibration  Python's own ``pydoc_data.topics`` (the standard library's help texts, in every CPython):
             technical English prose about Python, never overlapping the evaluation text. For
             anything that fits on data (importance weighting, scale search) so that what is measured
             on the evaluation text is not what the fit saw.

Both are tokenized once with the model's own ``tokenizer.json`` (no special tokens added) and cut
into windows of ``WINDOW`` tokens: every engine scores the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_lora.errors import EdgeLoraError

EVALUATION_FILE = Path("/usr/share/common-licenses/GPL-3")
WINDOW = 256


def evaluation_text(path: str | os.PathLike = EVALUATION_FILE) -> str:
    """The evaluation prose (the GPL-3 text by default)."""
    path = Path(path)
    text = read_text(
        path,
        "the evaluation text",
        "install Debian's base-files package (it ships /usr/share/common-licenses), "
        "or pass another plain-text file",
    )
    if len(text.split()) < 1000:
        raise EdgeLoraError(
            "the evaluation text is too short (under 1,000 words)", path=path, hint="pass a longer text"
        )
    return text


def read_text(path: str | os.PathLike, what: str, hint: str) -> str:
    """A UTF-8 file's text, or one line naming the file and what to do."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EdgeLoraError(f"cannot read {what} ({type(err).__name__})", path=path, hint=hint) from None


def calibration_text(max_chars: int = 400_000) -> str:
    """Python's own help texts (``pydoc_data.topics``), in a fixed order, up to ``max_chars``."""
    from pydoc_data.topics import topics

    parts, size = [], 0
    for key in sorted(topics):
        parts.append(topics[key])
        size += len(topics[key])
        if size >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def token_ids(tokenizer_json: str | os.PathLike, text: str) -> list[int]:
    """``text`` as the model's tokenizer encodes it, no special tokens added (the same ids for every
    engine: none of them tokenizes on its own)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer_json))
    except Exception as err:  # the Rust side raises a bare Exception on a bad file
        raise EdgeLoraError(
            f"cannot read the tokenizer ({str(err).splitlines()[0][:120]})",
            path=tokenizer_json,
            hint="pass the model folder's tokenizer.json",
        ) from None
    return tok.encode(text, add_special_tokens=False).ids


def windows(ids: list[int], window: int = WINDOW, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive, non-overlapping windows of ``window`` ids (the tail shorter than one is dropped)."""
    if window < 2:
        raise EdgeLoraError(f"a window needs at least 2 tokens (got {window})")
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def evaluation_windows(
    tokenizer_json: str | os.PathLike, window: int = WINDOW, max_windows: int | None = None
) -> list[list[int]]:
    """The evaluation text's windows for the model whose ``tokenizer.json`` this is."""
    return windows(token_ids(tokenizer_json, evaluation_text()), window, max_windows)


def calibration_windows(
    tokenizer_json: str | os.PathLike, window: int = WINDOW, max_windows: int | None = None
) -> list[list[int]]:
    """The calibration text's windows (never overlapping the evaluation text)."""
    return windows(token_ids(tokenizer_json, calibration_text()), window, max_windows)
