"""Chat templates: the built-in default, files, and the sandbox."""

import pytest

from lcjax.serve.chat_template import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError, resolve_chat_template

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


def test_default_layout():
    text = ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES)
    assert text == "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"
    assert ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES[1:], add_generation_prompt=False) == "<|user|>\nHi\n"


def test_file_wins_over_the_tokenizer(tmp_path):
    class Tok:
        chat_template = "tokenizer's"
        bos_token, eos_token = "<s>", "</s>"

    path = tmp_path / "t.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}{{ eos_token }}")
    assert resolve_chat_template(str(path), Tok()).render(MESSAGES) == "<s>BE TERSE.HI</s>"
    assert resolve_chat_template(None, Tok()).render(MESSAGES) == "tokenizer's"
    assert resolve_chat_template(None, object()).source == DEFAULT_TEMPLATE


def test_template_errors_are_value_errors_and_the_sandbox_holds():
    with pytest.raises(ChatTemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="may not set"):
        ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES, extra={"messages": []})
    assert issubclass(ChatTemplateError, ValueError)  # the API answers 400


def test_tools_tool_calls_and_tool_results_render_and_parse_back():
    from lcjax.serve.tool_parser import parse_tool_calls

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]
    text = ChatTemplate(DEFAULT_TEMPLATE).render(messages, tools=tools)
    assert text.startswith("<|system|>\nTools:\n")
    assert '{"name": "get_weather", "parameters": {"type": "object"}}\n<|user|>\nWeather?\n' in text
    assert text.endswith("<|tool|>\n-3 C\n<|assistant|>\n")
    assistant = text.split("<|assistant|>\n")[1].split("<|tool|>")[0]
    content, calls = parse_tool_calls(assistant, ["get_weather"])  # what the model is taught to write
    assert content is None and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    # No tools: the layout is unchanged.
    assert ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES, tools=None) == ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="may not set"):
        ChatTemplate(DEFAULT_TEMPLATE).render(MESSAGES, extra={"tools": []})
