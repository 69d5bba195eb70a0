"""llama.cpp's own reference files: its tokenizer-test vocabularies and the chat templates of real models.

They ship in the llama-cpp-python source package of the installed version
(``vendor/llama.cpp/models/ggml-vocab-*.gguf`` with ``.gguf.inp`` test strings and ``.gguf.out``
expected ids, and ``models/templates/*.jinja``). The first use downloads that package through pip
(its cache makes later runs local) and keeps only those files under ``tests/data/`` (git-ignored),
never in the repository. A failed download is an error, never a skip.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.llama_cpp_source import installed_version, unpack_vendor

DATA = Path(__file__).parent / "data"
SEPARATOR = "__ggml_vocab_test__"


def models_dir() -> Path:
    """``tests/data/llama.cpp-<version>/models`` with the vocabularies and ``templates/``."""
    return unpack_vendor(
        DATA / f"llama.cpp-{installed_version()}" / "models",
        "models",
        lambda rel: rel[0].startswith("ggml-vocab-") or (rel[0] == "templates" and len(rel) == 2),
    )


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """The test strings of ``ggml-vocab-<name>.gguf`` and llama.cpp's expected ids for each, parsed
    as llama.cpp's tests/test-tokenizer-0.cpp does (strings end with a separator line; one line of
    ids per string). The ids are without special tokens (``add_special = false``, no special parsing)."""
    base = models_dir() / f"ggml-vocab-{name}.gguf"
    raw = base.with_name(base.name + ".inp").read_text(encoding="utf-8")
    texts = raw.split(f"\n{SEPARATOR}\n")
    if raw.endswith(f"\n{SEPARATOR}\n"):
        texts.pop()  # nothing after the last separator
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").splitlines()
    if len(texts) != len(lines):
        raise RuntimeError(f"{base.name}: {len(texts)} test strings but {len(lines)} lines of ids")
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


def template(name: str) -> str:
    """The text of ``models/templates/<name>.jinja``."""
    return (models_dir() / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
