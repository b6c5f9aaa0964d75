"""The runtime renders chat templates token for token as transformers' apply_chat_template does.

The templates: SmolLM2's own (the packaged model), and templates of the families of every
supported architecture written here in their published form (llama 3.2 with strftime_now, mistral
with raise_exception, qwen2.5, a qwen3-style one with namespace, tojson and loop controls, phi3,
gemma3), each applied by transformers and by the runtime to the same tokenizer.
"""

# ruff: noqa: E501  (the templates are written as their families publish them, on long lines)
from __future__ import annotations

import json

import pytest
from conflayers_runtime import GenerationError, load, read_manifest
from conflayers_runtime.chat_template import render, special_tokens
from tokenizers import Tokenizer

from conflayers_export.models import load_model
from tests.helpers import CHATML_TEMPLATE, build, tiny_model, write_tiny_folder

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

QWEN2 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == "user" %}
        {%- set ns.last_query_index = messages|length - 1 - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "assistant" and loop.index0 > ns.last_query_index %}
        {{- '<|im_start|>assistant\\n<think>\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- if message.meta is defined %}{{- '\\n' + message.meta | tojson }}{%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# {architecture: template}; every supported architecture has one (SmolLM2's covers llama too).
TEMPLATES = {
    "llama": LLAMA3,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "phi3": PHI3,
    "gemma3_text": GEMMA3,
    "chatml": CHATML_TEMPLATE,
}
SYSTEM = {"role": "system", "content": "You answer in one line. <b>&</b> \"quoted\""}
TURNS = [
    {"role": "user", "content": "  What is 2 + 2?\n"},
    {"role": "assistant", "content": "4, as ever."},
    {"role": "user", "content": "And 3 + 3? Café, naïve, 日本語."},
]
TOOL_TURN = {"role": "user", "content": "Look it up.", "meta": {"query": "<x> & é", "n": [1, 2]}}
CONVERSATIONS = [TURNS[:1], [SYSTEM, *TURNS], TURNS, [SYSTEM, *TURNS, TURNS[1], TOOL_TURN]]


def conversations(architecture: str) -> list[list[dict]]:
    """The conversations the template accepts (mistral's has no system turn)."""
    if architecture == "mistral":
        return [c for c in CONVERSATIONS if c[0]["role"] != "system"]
    return CONVERSATIONS


def assert_same_tokens(tokenizer, folder, template: str, architecture: str) -> None:
    """transformers' apply_chat_template and the runtime agree on every conversation, token for token."""
    tokenizer.chat_template = template
    runtime_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = special_tokens(folder)
    for messages in conversations(architecture):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        text = render(template, messages, special)
        assert text == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert runtime_tokenizer.encode(text, add_special_tokens=False).ids == list(expected["input_ids"])


@pytest.mark.real_model
@pytest.mark.parametrize("architecture", [*TEMPLATES, "smollm2"])
def test_templates_tokenize_as_transformers_on_smollm2s_tokenizer(smollm2, architecture):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)  # a copy: the fixture's stays as it is
    template = TEMPLATES.get(architecture, smollm2.tokenizer.chat_template)
    assert_same_tokens(tokenizer, smollm2.folder, template, architecture)


@pytest.mark.parametrize("architecture", TEMPLATES)
def test_templates_render_as_transformers(tmp_path, architecture):
    from transformers import AutoTokenizer

    folder = write_tiny_folder(tiny_model("llama")[0], tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"bos_token": "<30>", "eos_token": "<31>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)  # tokenizer.json now holds them as special tokens
    assert_same_tokens(tokenizer, folder, TEMPLATES[architecture], architecture)


def test_a_template_refusal_is_a_generation_error():
    with pytest.raises(GenerationError, match="roles must alternate"):
        render(MISTRAL, [TURNS[0], TURNS[0]], {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(GenerationError, match="list of"):
        render(MISTRAL, [], {})


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    source = write_tiny_folder(tiny_model("llama")[0], tmp_path_factory.mktemp("hf"), chat_template=QWEN2)
    loaded = load_model(str(source))
    folder = tmp_path_factory.mktemp("chat") / "artifact"
    build(folder, loaded, {"mid": [1]}, max_seq_len=512)
    return loaded, folder


def test_the_artifact_carries_the_template_and_load_renders_it(chat_artifact):
    loaded, folder = chat_artifact
    assert read_manifest(folder).artifacts.tokenizer.chat_template == QWEN2
    model = load(folder)
    for messages in CONVERSATIONS:
        assert model.encode(messages) == loaded.encode(messages)
    assert model.encode("Hi") == loaded.encode("Hi")  # text: one user turn
    result = model.generate(messages=[SYSTEM, *TURNS], max_new_tokens=6, mode="plain")
    assert result.token_ids == model.generate(loaded.encode([SYSTEM, *TURNS]), 6, mode="plain").token_ids


def test_an_artifact_without_a_template_falls_back_to_prefix_and_suffix(chat_artifact, tmp_path):
    _, folder = chat_artifact
    model = load(folder)
    model.chat_template = None  # as read from a manifest written before templates were carried
    model.chat_prefix, model.chat_suffix = "<u>", "</u>"
    assert model.encode("Hi") == model.tokenizer.encode("<u>Hi</u>", add_special_tokens=False).ids
    assert model.encode([{"role": "user", "content": "Hi"}]) == model.encode("Hi")
    with pytest.raises(GenerationError, match="one user turn"):
        model.encode(TURNS)
