"""Chat templates: the real templates of real models (llama.cpp's models/templates, plus the published
templates of SmolLM2, TinyLlama and Mistral 7B v0.1, which that folder lacks), rendered by us as
transformers renders them; the training data and `edge-lora chat` built on them; the GGUF carries
the template, and llama.cpp's own formatter is compared with it."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import llama_refs
import pytest

from edge_lora.chat_template import ChatTemplate

# The published templates (tokenizer_config.json "chat_template") of three models our families cover.
PUBLISHED = {
    "HuggingFaceTB-SmolLM2-Instruct": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a "
        "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
        "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    "TinyLlama-1.1B-Chat-v1.0": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    "mistralai-Mistral-7B-Instruct-v0.1": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
}
# the families edge-lora supports, by the template their instruct models ship
FAMILY_TEMPLATES = [
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    *PUBLISHED,
]
# the tiny test vocabulary's own special tokens stand in for each model's bos/eos (a token the
# tokenizer.json lacks would be added by transformers at load time, and by nobody on a device)
SPECIAL = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
SYSTEM = [{"role": "system", "content": "You are terse."}]
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def template_source(name: str) -> str:
    return PUBLISHED[name] if name in PUBLISHED else llama_refs.template(name)


def all_template_names() -> list[str]:
    return sorted(p.stem for p in (llama_refs.models_dir() / "templates").glob("*.jinja")) + list(PUBLISHED)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dirs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(model_dirs["qwen2"] / "tokenizer.json"), **SPECIAL)


def render_both(hf_tokenizer, source: str, messages: list[dict], generation: bool):
    """(transformers' text or its exception, ours or our exception)."""
    try:
        theirs = hf_tokenizer.apply_chat_template(
            messages, chat_template=source, tokenize=False, add_generation_prompt=generation
        )
    except Exception as err:  # noqa: BLE001  whatever the template raises
        theirs = err
    try:
        ours = ChatTemplate(source, dict(SPECIAL)).render(messages, generation)
    except Exception as err:  # noqa: BLE001
        ours = err
    return theirs, ours


def test_every_real_template_renders_as_transformers_does(hf_tokenizer):
    names = all_template_names()
    assert len(names) >= 60
    compared = 0
    for name in names:
        source = template_source(name)
        for messages, generation in (
            (SYSTEM + TURNS, False),
            (TURNS, False),
            (SYSTEM + TURNS[:3], True),
            (TURNS[:1], True),
        ):
            theirs, ours = render_both(hf_tokenizer, source, messages, generation)
            if isinstance(theirs, Exception):
                assert isinstance(ours, Exception), f"{name}: transformers refuses ({theirs}) but we rendered"
                continue
            assert ours == theirs, f"{name}: rendered differently"
            compared += 1
    assert compared >= 200, compared  # most templates take all four conversations


@pytest.fixture(scope="module")
def chat_model(model_dirs, tmp_path_factory):
    """family template name -> a tiny model directory whose tokenizer_config carries that template."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp("chat") / name
            shutil.copytree(model_dirs["qwen2"], root)
            config = json.loads((root / "tokenizer_config.json").read_text())
            config.update(SPECIAL, chat_template=template_source(name))
            (root / "tokenizer_config.json").write_text(json.dumps(config))
            made[name] = root
        return made[name]

    return get


@pytest.mark.parametrize("name", FAMILY_TEMPLATES)
def test_training_conversations_tokenize_as_transformers_does(chat_model, name):
    """The ids a {"messages"} line trains on are transformers' apply_chat_template ids; the loss mask
    covers the assistant replies and no user text."""
    from transformers import AutoTokenizer

    from edge_lora.train.data import Formatter

    model_dir = chat_model(name)
    messages = TURNS if "v0.1" in name else SYSTEM + TURNS
    example = Formatter(model_dir).encode({"messages": messages})
    theirs = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, tokenize=True, return_dict=False
    )
    assert example.ids.tolist() == list(theirs)
    tokenizer = Formatter(model_dir).tokenizer
    target_text = tokenizer.decode(example.ids[example.mask].tolist())
    assert "Hello! How can I help?" in target_text and "4" in target_text
    assert "Hi there" not in target_text and "What is 2+2?" not in target_text


def llama_format(source: str, messages: list[dict], generation: bool) -> str | None:
    """llama.cpp's own formatter (``llama_chat_apply_template``, no Jinja): None where it knows no format."""
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[
            llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
            for m in messages
        ]
    )
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(source.encode(), chat, len(messages), generation, buf, len(buf))
    return None if n < 0 else buf.raw[:n].decode("utf-8")


# llama.cpp's formatter is not the template: it agrees only where the template is a plain format.
LLAMA_AGREES = {
    "Qwen-Qwen2.5-7B-Instruct": SYSTEM + TURNS[:3],
    "HuggingFaceTB-SmolLM2-Instruct": SYSTEM + TURNS[:3],
    "mistralai-Mistral-7B-Instruct-v0.1": TURNS[:3],
}
MISTRAL_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}  # llama.cpp's formatter writes these as text
LLAMA_DIFFERS = {  # what the real template writes that llama.cpp's formatter leaves out
    "meta-llama-Llama-3.1-8B-Instruct": "the 'Cutting Knowledge Date' system header",
    "meta-llama-Llama-3.2-3B-Instruct": "the 'Cutting Knowledge Date' system header",
    "Qwen-Qwen2.5-7B-Instruct": "the default system prompt when the conversation has none",
    "TinyLlama-1.1B-Chat-v1.0": "the eos token and newline after each turn",
    "Mistral-Small-3.2-24B-Instruct-2506": "spaces: llama.cpp writes '[INST] text', the template '[INST]text'",
}


@pytest.mark.slow
def test_gguf_carries_the_template_and_llamacpp_formats_plain_templates_alike(chat_model, tmp_path):
    import llama_cpp

    from converters.export import ExportOptions, export_bundle
    from runtime.llamacpp import lib as llamacpp_lib
    from runtime.llamacpp import model as llamacpp_model

    llamacpp_lib.silence_log(False)
    for name, messages in LLAMA_AGREES.items():
        bundle = export_bundle(
            chat_model(name),
            tmp_path / name,
            [],
            ExportOptions(backends=["gguf"], gguf_quants=["f32"]),
            show_progress=False,
        )
        model = llamacpp_model.Model(next((bundle / "gguf").glob("*.gguf")))
        try:
            carried = llama_cpp.llama_model_chat_template(model.ptr, None).decode("utf-8")
        finally:
            model.free()
        assert carried == template_source(name)
        ours = ChatTemplate(carried, dict(MISTRAL_SPECIAL)).render(messages, True)
        # llama.cpp adds BOS as a token when it tokenizes, not as text
        assert llama_format(carried, messages, True) == ours.removeprefix(MISTRAL_SPECIAL["bos_token"]), name
    for name, what in LLAMA_DIFFERS.items():
        messages = TURNS[:3] if name in LLAMA_AGREES else SYSTEM + TURNS[:3]
        source = template_source(name)
        ours = (
            ChatTemplate(source, dict(MISTRAL_SPECIAL))
            .render(messages, True)
            .removeprefix(MISTRAL_SPECIAL["bos_token"])
        )
        assert llama_format(source, messages, True) not in (None, ours), (
            f"{name}: llama.cpp now writes {what}; update docs/mobile.md"
        )


def test_chat_uses_the_models_template_and_stops_at_its_end_of_turn(chat_model, tmp_path):
    from transformers import AutoTokenizer

    import runtime
    from converters.export import ExportOptions, export_bundle
    from edge_lora.app.conversation import Conversation

    model_dir = chat_model("Qwen-Qwen2.5-7B-Instruct")
    bundle = export_bundle(
        model_dir,
        tmp_path / "bundle",
        [],
        ExportOptions(backends=["onnx"], onnx_quants=["fp32"]),
        show_progress=False,
    )
    engine = runtime.load(bundle, backend="onnx")
    chat = Conversation(engine)
    assert chat.mode == "chat template"
    assert chat.stop_ids == [engine.tokenizer.token_to_id("<|im_end|>")]
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert chat.prompt("Hi there") == hf.apply_chat_template(
        TURNS[:1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    chat.record("Hi there", "Hello! How can I help?")
    assert chat.prompt("What is 2+2?") == hf.apply_chat_template(
        TURNS[:3], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    reply = engine.generate(chat.prompt("What is 2+2?"), max_new_tokens=8, stop_token_ids=chat.stop_ids)
    assert isinstance(reply, str)


def test_chat_without_a_template_stays_plain_text(model_dirs, tmp_path):
    import runtime
    from converters.export import ExportOptions, export_bundle
    from edge_lora.app.conversation import Conversation

    bundle = export_bundle(
        model_dirs["llama"],
        tmp_path / "bundle",
        [],
        ExportOptions(backends=["onnx"], onnx_quants=["fp32"]),
        show_progress=False,
    )
    chat = Conversation(runtime.load(bundle, backend="onnx"))
    assert chat.mode.startswith("plain text") and chat.stop_text == ["\n"] and chat.stop_ids == []
    assert chat.prompt("Hi") == chat.engine.tokenizer.encode("Hi")


def test_bundle_keeps_a_chat_template_file(chat_model, tmp_path):
    """Newer models keep the template in chat_template.jinja, not in tokenizer_config.json."""
    from converters.export import ExportOptions, export_bundle
    from edge_lora.bundle import Bundle

    model_dir = tmp_path / "model"
    shutil.copytree(chat_model("Qwen-Qwen2.5-7B-Instruct"), model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "chat_template.jinja").write_text(config.pop("chat_template"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    bundle = Bundle.open(
        export_bundle(
            model_dir,
            tmp_path / "bundle",
            [],
            ExportOptions(backends=["onnx"], onnx_quants=["fp32"]),
            show_progress=False,
        )
    )
    assert bundle.tokenizer["chat_template"] == "chat_template.jinja"
    assert ChatTemplate.find(config, bundle.root).source == (model_dir / "chat_template.jinja").read_text()
    bundle.verify_file("chat_template.jinja")  # hashed with the other files
