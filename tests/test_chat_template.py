"""Chat templates: the text equals transformers' apply_chat_template; hostile templates are one ChatTemplateError
line, fast; the template and end-of-turn ids travel in the artifact metadata."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from craft.runtime import chat_template
from craft.runtime.artifact import (
    META_CHAT_TEMPLATE,
    META_EOT_IDS,
    Artifact,
    ArtifactError,
    ModelSpec,
)
from craft.runtime.chat_template import ChatTemplateError, render_chat

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises what Llama-3 / Qwen templates use: whitespace control, namespace, loop controls, tojson, raise_exception.
FEATURES = """{{- bos_token }}
{%- set ns = namespace(system='', n=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
    {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' ~ m.role) }}{% endif %}
    {%- set ns.n = ns.n + 1 %}
<|start|>{{ m.role }} #{{ ns.n }}
{{ m.content | trim }}{% if m.tool_calls is defined %} {{ m.tool_calls | tojson }}{% endif %}<|eot|>
{% endfor %}
{%- if ns.system %}[system: {{ ns.system }}]{% endif %}
{%- if add_generation_prompt %}<|start|>assistant
{% generation %}{% endgeneration %}{% endif %}"""
# Mistral v0.3-style: transformers passes tools and documents as none when not given
TOOLS = (
    "{{ bos_token }}{% if tools is not none %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% if documents is not none %}{{ documents | tojson }}{% endif %}"
    "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": 'Hi <b>&</b> "quoted" 日本 🙂'}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {
            "role": "user",
            "content": "  and  3+3?\n",
            "tool_calls": [{"name": "add", "arguments": {"a": 3, "b": "<3>"}}],
        },
    ],
]
HOSTILE = {
    "dunder attribute": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "bare dunder": "{{ messages.__class__ }}",
    "globals escape": "{{ cycler.__init__.__globals__.os }}",
    "self escape": "{{ self._TemplateReference__context }}",
    "mutation": "{{ messages.append({'role': 'x'}) }}",
    "nested huge loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge range": "{{ range(10**9) | list | length }}",
    "string bomb": "{{ 'a' * 10**9 }}",
    "doubling loop": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "percent width": "{{ '%0999999999d' % 1 }}",
    "center width": "{{ 'x' | center(10**9) }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "syntax": "{% for m in %}",
    "raise": "{{ raise_exception('Conversation roles must alternate') }}",
    "underscore namespace": "{% set ns = namespace() %}{% set ns._x = 1 %}",
    # values built inside one call, before its result could be measured
    "macro doubling": (
        "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{% set x = f('ab', 26) %}"
    ),
    "replace filter": "{% set x = ('x' * 1000000) | replace('x', 'y' * 50) %}",
    "tojson indent": "{% set x = messages | tojson(indent=100000000) %}",
    "join separator": "{% set x = range(100) | join('x' * 1000000) %}",
    "strftime width": "{% set x = strftime_now('%999Y' * 100000) %}",
    "batch fill": "{% set x = range(5) | batch(100000000, 'x') | list %}",
    "lipsum": "{% set x = lipsum(n=10000000) %}",
    # short values that are huge as text: 3,000 references to one 999,999-character string
    "joined references": "{% set x = (['x' * 999999] * 3000) | join %}",
    "references as JSON": "{% set x = (['x' * 999999] * 3000) | tojson %}",
    "printed references": "{{ ['x' * 999999] * 3000 }}",
    # ... and the same references turned into text by a method, an operator or a filter (fourth audit)
    "str.join method": "{% set x = ''.join(['x' * 900000] * 1000) %}",
    "str.join separator": "{% set x = ('x' * 900000).join(['', ''] * 500) %}",
    "format argument": "{% set x = '{}'.format(['x' * 900000] * 1000) %}",
    "format fields": "{% set x = ('{0}' * 1000).format('x' * 900000) %}",
    "percent argument": "{% set x = '%s' % (['x' * 900000] * 1000,) %}",
    "tilde": "{% set x = (['x' * 900000] * 1000) ~ '' %}",
    "trim filter": "{% set x = (['x' * 900000] * 1000) | trim %}",
    "wordcount filter": "{{ (['x' * 900000] * 1000) | wordcount }}",
    "lazy map": "{% set x = (['x' * 900000] * 1000) | map('upper') | list %}",
    "lazy map joined": "{% set x = ''.join((['x' * 900000] * 1000) | map('upper')) %}",
    # the ninth audit: + was not measured, nor what a block collects, nor these filters' arguments
    "plus doubling": "{% set s = 'x' * 1000000 %}{% set s = s + s %}{% set s = s + s %}{% set s = s + s %}",
    "block set": "{% set s = 'x' * 1000000 %}{% set x %}{% for i in range(2000) %}{{ s }}{% endfor %}{% endset %}",
    "macro output": (
        "{% macro m(s) %}{% for i in range(2000) %}{{ s }}{% endfor %}{% endmacro %}{% set x = m('x' * 999999) %}"
    ),
    "format_map width": "{% set x = '{a:>2000000000}'.format_map({'a': 'x'}) %}",
    "indent text": "{% set x = ('a' ~ '\\n' * 1000) | indent('y' * 999999) %}",
    "wordwrap string": "{% set x = ('ab ' * 30000) | wordwrap(1000, wrapstring='z' * 999999) %}",
    "nested tojson": "{% set l = ('x' * 499990) | list %}{% set x = [[[l]]] | tojson(indent=1000) %}",
    "huge template": "{{ messages[0].content }}" * 5000,
    # the eleventh audit: references doubled 60 times compare and hash for ever in one C call; widths the
    # format check missed; Python's compiler refusing deep nesting; values kept past the size bound one by one
    "compared references": (
        "{% set ns = namespace(a=[0], b=[0]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}"
    ),
    "unrolled references": "{% set a = [0] %}{% set b = [0] %}"
    + "{% set a = [a, a] %}{% set b = (b, b) %}" * 60
    + "{{ a == b }}",
    "hashed references": "{% set a = (0,) %}" + "{% set a = (a, a) %}" * 60 + "{{ {a: 1} }}",
    "percent precision": "{{ '%.999999999d' % 1 }}",
    "named percent width": "{{ '%(a)999999999s' % {'a': 'x'} }}",
    "star width": "{{ '%*d' % (999999999, 1) }}",
    "nested format width": "{{ '{0:{1}}'.format('x', '3999999999') }}",
    "z format width": "{{ '{:z99999999}'.format(1.5) }}",
    "format precision": "{{ '{:.99999999f}'.format(1.5) }}",
    "format filter precision": "{{ '%.99999999f' | format(1.5) }}",
    "nested ifs": "{% if 1 %}" * 101 + "x" + "{% endif %}" * 101,
    "nested fors": "{% for a in [1] %}" * 21 + "x" + "{% endfor %}" * 21,
    "long number literal": "{{ " + "1" * 5000 + " }}",
    "raise nested value": (
        "{% set ns = namespace(x=[]) %}{% for i in range(2000) %}{% set ns.x = [ns.x] %}{% endfor %}"
        "{{ raise_exception(ns.x) }}"
    ),
    "kept in a namespace": (
        "{% set ns = namespace(l=[]) %}{% for i in range(3000) %}{% set ns.l = ns.l + [('x' * 999000) ~ i] %}"
        "{% endfor %}"
    ),
    "unrolled sets": "{% set s = 'x' * 999000 %}" + "".join(f"{{% set a{i} = s ~ 'y' %}}" for i in range(40)),
    "unrolled blocks": "{% set s = 'x' * 999999 %}"
    + "".join(f"{{% set b{i} %}}{{{{ s }}}}{{% endset %}}" for i in range(40)),
}
# One multiplication of two huge integers runs in C, where the timer cannot stop it: refused by size.
NUMBER_BOMBS = {
    "squaring loop": (
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 5 }}"
    ),
    "power loop": "{% set ns = namespace(x=3) %}{% for i in range(8) %}{% set ns.x = ns.x ** 64 %}{% endfor %}",
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template", [CHATML, FEATURES, TOOLS], ids=["chatml", "features", "tools"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one", "multi"])
def test_equals_transformers(template, conversation, add_generation_prompt):
    pytest.importorskip("transformers", reason="transformers is the reference renderer; pip install transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    expected = render_jinja_template(
        conversations=[conversation],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
    )[0][0]
    got = render_chat(
        template, conversation, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )
    assert got == expected and len(got) > 20


def test_smollm2_template_from_its_gguf(smollm2_gguf):
    """The real template, as the GGUF carries it, gives the ChatML text SmolLM2 was tuned on."""
    from craft.export.source_tokenizer import read_gguf_tokenizer

    template = read_gguf_tokenizer(smollm2_gguf).chat_template
    text = render_chat(template, [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_fail_with_one_line(name):
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError) as error:
            render_chat(HOSTILE[name], CONVERSATIONS[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10  # stopped by a budget, not by exhausting the machine
    assert peak < 32 * 2**20  # refused before the value is built (a 1M-character bound is a few MB)
    message = str(error.value)
    assert "\n" not in message and message.startswith("chat template ")


# Real templates format message text and tool schemas: a "2024" in a message, a count above 1,000 as a
# value, truncate's length (it only shortens) were refused as widths (the eleventh audit).
BENIGN = {
    "format": "{% for m in messages %}{{ '{}: {}'.format(m.role, m.content) }}\n{% endfor %}",
    "percent": "{% for m in messages %}{{ '%s: %s' % (m.role, m.content) }}\n{% endfor %}",
    "format filter": "{% for m in messages %}{{ '%s: %s' | format(m.role, m.content) }}{% endfor %}",
    "values": "{{ 'Year {}'.format(2024) }} {{ '%d items' % 1500 }} {{ '{:>8}|{:.3f}'.format('x', 2.5) }}",
    "text filters": "{{ messages[0].content | indent(2) }}|{{ messages[0].content | wordwrap(10) }}|"
    "{{ messages[0].content | truncate(2000) }}",
    "tools": "{{ tools | tojson(indent=2) | indent(4) }}{% if messages[0].role in ('user', 'system') %}!{% endif %}",
    "literals": "{% set d = {'a': [1, (2, 3)], 'b': messages[0]} %}{{ d | tojson }}{% set x, y = 1, 2 %}{{ x + y }}",
}


@pytest.mark.parametrize("name", BENIGN)
def test_real_formatting_of_message_text_renders(name):
    conversation = [{"role": "user", "content": "What happened in 2024? Call 555-1234, 10000 times:\nnow."}]
    tools = [{"name": "count", "parameters": {"type": "integer", "maximum": 10000}}]
    got = render_chat(BENIGN[name], conversation, tools=tools)
    assert "2024" in got or "10000" in got or "1500" in got
    pytest.importorskip("transformers", reason="transformers is the reference renderer")
    from transformers.utils.chat_template_utils import render_jinja_template

    expected = render_jinja_template(
        conversations=[conversation], tools=tools, chat_template=BENIGN[name], add_generation_prompt=True
    )[0][0]
    assert got == expected


@pytest.mark.parametrize("name", NUMBER_BOMBS)
def test_huge_integers_are_refused_before_they_are_built(name):
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="a number of more than 4096 bits"):
        render_chat(NUMBER_BOMBS[name], CONVERSATIONS[1])
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("thread", [False, True], ids=["main thread", "worker thread"])
def test_a_loop_that_calls_nothing_is_stopped(monkeypatch, thread):
    """A loop over a long string calls nothing: only SIGALRM stopped it, and only on the main thread -
    Generator.chat from a server's worker thread ran 10^12 iterations. Each item is a step now."""
    import threading

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.5)
    template = "{% set s = 'a' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    outcome: list = []

    def render():
        try:
            render_chat(template, [])
        except ChatTemplateError as e:
            outcome.append(e)

    started = time.monotonic()
    if thread:
        worker = threading.Thread(target=render, daemon=True)
        worker.start()
        worker.join(timeout=30)
    else:
        render()
    assert time.monotonic() - started < 5 and outcome and "ran past its budget" in str(outcome[0])
    assert render_chat(CHATML, CONVERSATIONS[0])  # the timer is gone: the next render is not cut short


def test_loops_see_what_they_saw_before_the_step_count():
    """{% for %} items pass through environment.ticking: loop.length, loop.last, a filter and
    recursion still behave."""
    template = (
        "{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }} "
        "{% endfor %}{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
        "{% endif %}{% endfor %}"
    )
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat(template, messages) == "1/2 2/2! 123"


def test_messages_and_output_are_bounded():
    with pytest.raises(ChatTemplateError, match="only JSON values"):
        render_chat(CHATML, [{"role": "user", "content": object()}])
    with pytest.raises(ChatTemplateError, match="passed 100 characters"):
        render_chat(CHATML, [{"role": "user", "content": "x" * 200}], max_chars=100)
    # the template cannot change the caller's messages, and a None value is dropped as transformers does
    conversation = [{"role": "user", "content": "hi", "name": None}]
    assert render_chat("{{ messages[0] | tojson }}", conversation) == '{"role": "user", "content": "hi"}'
    assert conversation == [{"role": "user", "content": "hi", "name": None}]


# ---- artifact metadata ----

SPEC = ModelSpec(
    vocab_size=100,
    dim=8,
    n_layer=1,
    n_head=2,
    n_kv_head=2,
    head_dim=4,
    hidden_dim=16,
    context_length=32,
    rope_theta=10000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
)


def artifact(**extra) -> Artifact:
    return Artifact(
        spec=SPEC,
        tokenizer_kind="tokenizer.json",
        tokenizer_data=b"{}",
        bos_id=1,
        eos_id=2,
        pad_id=2,
        quantization="none",
        checkpoint_sha256="",
        craft_version="0",
        **extra,
    )


def test_chat_metadata_round_trip_and_defaults():
    meta = artifact(chat_template=CHATML, end_of_turn_ids=(0, 2)).to_metadata()
    again = Artifact.from_metadata(meta)
    assert again.chat_template == CHATML and again.end_of_turn_ids == (0, 2) and again.stop_ids == (0, 2)
    old = artifact().to_metadata()  # a craft-trained model, or a file written before these keys
    assert META_CHAT_TEMPLATE not in old and META_EOT_IDS not in old
    plain = Artifact.from_metadata(old)
    assert plain.chat_template is None and plain.end_of_turn_ids == () and plain.stop_ids == (2,)


@pytest.mark.parametrize("bad", ['[1, "x"]', "{}", "[100]", "[-1]", "not json"])
def test_malformed_end_of_turn_ids(bad):
    meta = artifact().to_metadata() | {META_EOT_IDS: bad}
    with pytest.raises(ArtifactError, match="malformed Craft metadata"):
        Artifact.from_metadata(meta)


@pytest.mark.parametrize("messages", [["hi"], "hi", [None], [("role", "user")]], ids=["strs", "str", "none", "pairs"])
def test_messages_that_are_not_dicts_are_one_line(messages):
    """plain(m).items() ran before the dict check: AttributeError: 'str' object has no attribute 'items'."""
    with pytest.raises(ChatTemplateError, match="chat messages must be a list of dicts with 'role' and 'content'"):
        render_chat(CHATML, messages)


def test_messages_nested_too_deeply_are_one_error():
    """plain() copied the messages outside the error handling: a bare RecursionError."""
    content: list = []
    for _ in range(100_000):
        content = [content]
    with pytest.raises(ChatTemplateError, match="nested too deeply"):
        render_chat(CHATML, [{"role": "user", "content": content}])


def test_each_thread_renders_on_its_own_budget():
    """The budget lived on the cached template's Environment, shared by every thread: one render's
    start reset another's count (a hostile loop in a worker thread never ran out) and steps taken
    in one thread were charged to another."""
    import threading

    env = chat_template.compile_template(CHATML).environment
    env.start_budget()
    for _ in range(10):
        env.tick()

    def other_render():  # another thread's render of the same template, nearly its whole budget
        env.start_budget()
        for _ in range(chat_template.MAX_ITERATIONS - 5):
            env.tick()

    worker = threading.Thread(target=other_render)
    worker.start()
    worker.join(timeout=60)
    for _ in range(10):
        env.tick()  # this thread's 20 steps: charged 1,000,005 when the count was shared


def test_a_loop_over_a_filtered_sequence_is_not_built_as_text_first():
    """A loop's iterable went through the sandbox's call checks: messages|reverse was built and
    measured as text, and two 600,000-character messages were refused though nothing printed them."""
    big = [{"role": "user", "content": "x" * 600_000}, {"role": "assistant", "content": "y" * 600_000}]
    assert render_chat("{% for m in messages|reverse %}{{ m.role }} {% endfor %}", big) == "assistant user "


def test_an_undefined_value_is_named_as_a_template_bug():
    """It read as the template refusing the conversation (raise_exception's wording)."""
    with pytest.raises(ChatTemplateError, match=r"failed to render \(it uses an undefined value: .*fromkeys"):
        render_chat("{% set d = dict.fromkeys(['a'], 1) %}{{ d }}", [{"role": "user", "content": "x"}])
