"""Render a model's chat template (Jinja, from its tokenizer_config.json or GGUF) into prompt text.

A template travels inside the model file, so it is untrusted input: it renders in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation of what it is given), sees only
plain JSON data, and is bounded in output size, loop iterations and time. Anything that goes
wrong is one ChatTemplateError line. The environment follows Hugging Face transformers'
apply_chat_template, so the text is the same: trim_blocks + lstrip_blocks, loop controls, a
`tojson` that does not escape HTML, `raise_exception`, `strftime_now`, `{% generation %}` blocks.

    text = render_chat(template, [{"role": "user", "content": "Hi"}], bos_token="<s>", eos_token="</s>")

Standard library + jinja2: the runtime imports this file.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import string
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

MAX_CHARS = 1_000_000  # rendered text; a whole context of any model we run is far below this
MAX_ITERATIONS = 1_000_000  # calls, range() steps and loop items, all together, in one render (per thread)
MAX_SECONDS = 5.0  # wall time of one render; real templates take milliseconds
MAX_WIDTH = 1000  # widths in format / indent / center; real templates use single digits
MAX_INT_BITS = 4096  # integers a template multiplies; real templates count messages
MAX_TEMPLATE_CHARS = 100_000  # a template's own text; real ones (tool calling included) are under 20,000
MAX_BUILT = 16 * MAX_CHARS  # text built in one render, all values together: real ones build a few times their output
AMPLIFYING = {"expandtabs", "ljust", "rjust", "zfill"}  # str methods that only pad: refused
# Filters and methods that never turn a container into text: not measured (messages|length in a loop
# over the messages would walk the conversation once per message)
NO_TEXT = {"length", "count", "first", "last", "list", "select", "reject", "selectattr", "rejectattr", "items"}
NO_TEXT |= {"keys", "values", "get", "attr", "default", "d", "reverse", "sort", "unique", "min", "max", "sum"}
# a %-format's conversion: its width and precision (digits, or * for one taken from the arguments)
PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?.", re.DOTALL)
BUDGET = threading.local()  # the running render's steps, deadline and text built, per thread (start_budget)


class ChatTemplateError(ValueError):
    """A chat template that does not parse, refuses the messages, or attempts something unsafe."""


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    max_chars: int = MAX_CHARS,
    **variables: Any,
) -> str:
    """The prompt text for `messages` (dicts with "role" and "content"), ending with the assistant's
    turn opener when add_generation_prompt. `variables` go to the template too (tools, documents,
    pad_token, ...), as apply_chat_template's keyword arguments do. ChatTemplateError on failure."""
    import jinja2

    compiled = compile_template(template)
    env = compiled.environment  # the Environment of make_environment, with its budget
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        got = type(messages).__name__ if not isinstance(messages, (list, tuple)) else "a list holding other values"
        raise ChatTemplateError(f"chat messages must be a list of dicts with 'role' and 'content', got {got}")
    try:
        chat = [{k: v for k, v in plain(m).items() if v is not None} for m in messages]
        # tools and documents are none unless given, as apply_chat_template passes them: `{% if tools is not
        # none %}` in a template (Mistral's) rendered an empty tools block, and `tools|tojson` failed
        context = plain({"bos_token": bos_token, "eos_token": eos_token, "tools": None, "documents": None, **variables})
    except RecursionError:
        raise ChatTemplateError("chat messages are nested too deeply to be JSON values") from None
    env.start_budget()
    out: list[str] = []
    size = 0
    try:
        with time_limit(MAX_SECONDS):
            for chunk in compiled.generate(messages=chat, add_generation_prompt=add_generation_prompt, **context):
                size += len(chunk)
                if size > max_chars:
                    raise ChatTemplateError(
                        f"chat template output passed {max_chars} characters; the template or the conversation "
                        "is too long"
                    )
                out.append(chunk)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template attempted an unsafe operation ({one_line(e)})") from None
    except jinja2.exceptions.UndefinedError as e:  # a bug in the template, or a helper this sandbox lacks
        raise ChatTemplateError(f"chat template failed to render (it uses an undefined value: {one_line(e)})") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception() and other template-level errors
        raise ChatTemplateError(f"chat template refused the conversation: {one_line(e)}") from None
    except (Exception, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed to render ({type(e).__name__}: {one_line(e)})") from None
    return "".join(out)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """ChatTemplateError once `seconds` pass, from a SIGALRM timer: the steps (calls, loop items)
    check the clock too, but one filter over a long text (wordwrap) is a single step. Only on the main
    thread of a Unix process whose interval timer is free (signals reach no other thread; a
    program's own timer is kept)."""
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return

    def expire(_signum, _frame):
        raise ChatTemplateError(f"chat template ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(e: BaseException) -> str:
    try:  # a template's raise_exception() may carry any value: a list nested 5,000 deep failed str() here
        text = str(e)
    except (RecursionError, ValueError, MemoryError):
        text = f"a {type(e).__name__} whose message cannot be shown"
    return " ".join(text.split())[:300]


def plain(value: Any) -> Any:
    """A copy made of JSON types only: the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value) if kind is bool else getattr(kind, f"__{kind.__name__}__")(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    raise ChatTemplateError(
        f"chat messages may hold only JSON values (str, number, bool, None, list, dict), got {type(value).__name__}"
    )


def check_size(value: Any) -> Any:
    """`value`, refused if its length passes MAX_CHARS (an argument: shallow, so messages|length in a loop
    does not walk the conversation each time)."""
    if isinstance(value, (str, list, dict)) and len(value) > MAX_CHARS:
        raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    return value


def check_built(value: Any) -> Any:
    """A value the template just built (a call's, an operator's, a literal's, a namespace's), refused
    past MAX_CHARS - a container as text, every reference counted: [a, a] doubled 60 times is a short
    list whose comparison or hash runs for ever in one C call - and its text charged to the render's
    MAX_BUILT (3,000 namespace items of 1M characters each, each one short enough, were 2.3 GB)."""
    check_size(value)
    if isinstance(value, str):
        charge(len(value))
    elif isinstance(value, (list, tuple, dict)):
        check_text_size(value)
        charge(len(value))
    return value


def charge(chars: int) -> None:
    """Count `chars` of new text against this render's MAX_BUILT."""
    BUDGET.built = getattr(BUDGET, "built", 0) + chars
    if BUDGET.built > MAX_BUILT:
        raise ChatTemplateError(f"chat template built more than {MAX_BUILT:,} characters of values in one render")


def check_text_size(value: Any, total: int = 0) -> int:
    """check_size for what is about to become text (printed, joined, JSON): a list of 3,000 references
    to one 1M-character string is short itself but 3 GB as text. Walks until the bound is passed;
    returns `total` plus the value's size as text (about: 8 for a number)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, dict)):
            total += len(item)
            pending.extend(item.items() if isinstance(item, dict) else item)
        else:
            total += 8
        if total > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS} as text")
    return total


def indented_size(value: Any, width: int) -> int:
    """The indentation json.dumps(value, indent=width) writes: width x depth for every item; stops
    counting past MAX_CHARS."""
    total, pending = 0, [(value, 1)]
    while pending and total <= MAX_CHARS:
        item, depth = pending.pop()
        if isinstance(item, (list, tuple, dict)):
            total += len(item) * (width * depth + 1)
            values = item.values() if isinstance(item, dict) else item
            pending.extend((v, depth + 1) for v in values if isinstance(v, (list, tuple, dict)))
    return total


class BoundedBuffer(list):
    """The list a template block renders into ({% set x %}...{% endset %}, a macro, a call block),
    refused as soon as its text passes MAX_CHARS: 2,000 prints of a 1M-character string were 2 GB."""

    size = 0

    def append(self, item: Any) -> None:
        self._add(len(item) if isinstance(item, str) else 8)
        super().append(item)

    def extend(self, items) -> None:
        items = list(items)
        self._add(sum(len(i) if isinstance(i, str) else 8 for i in items))
        super().extend(items)

    def _add(self, n: int) -> None:
        self.size += n
        charge(n)
        if self.size > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a block longer than {MAX_CHARS}")


def printable(value: Any) -> Any:
    """The environment's finalize: what a {{ ... }} prints, measured as text first."""
    check_text_size(value)
    return value


def bounded_list(items: Iterator) -> list:
    """A lazy sequence (what |map, |select and friends return) as a list, refused as soon as its items
    would pass MAX_CHARS as text: each item may be new text (|map("upper")), so nothing is built first."""
    out, total = [], 0
    for item in items:
        total = check_text_size(item, total + 1)
        out.append(item)
    return out


def bounded(value: Any) -> Any:
    """`value`, a lazy sequence made a bounded_list: any call may turn it into text. (Not jinja2's
    `loop`, an iterator too, which a call must not use up.)"""
    lazy = isinstance(value, Iterator) and type(value).__name__ != "LoopContext"
    return bounded_list(value) if lazy else value


def check_arguments(name: str, subject: Any, args: tuple) -> None:
    """Refuse the few operations whose result can be far larger than their inputs. Any call may turn a
    container it is given into text (|trim, |upper, "{}".format, str.join), so containers are measured
    as text."""
    for a in (subject, *args):
        check_size(a)
        if isinstance(a, (list, tuple, dict)) and name not in NO_TEXT:
            check_text_size(a)
    if name in AMPLIFYING:
        raise ChatTemplateError(f"chat template called {name}(), which chat templates do not need")
    if (
        name == "replace"
        and isinstance(subject, str)
        and len(args) >= 2
        and isinstance(args[0], str)
        and isinstance(args[1], str)
    ):
        grown = subject.count(args[0]) * max(len(args[1]) - len(args[0]), 0) if args[0] else len(subject) * len(args[1])
        if len(subject) + grown > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name in ("format", "format_map", "%") and isinstance(subject, str):  # each field may print a whole argument
        fields = subject.count("%") if name == "%" else subject.count("{")
        if fields * sum(check_text_size(a) for a in args) > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name == "join" and isinstance(subject, str) and args and hasattr(args[0], "__len__"):  # str.join(items)
        if len(subject) * max(len(args[0]) - 1, 0) > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name in ("join", "tojson", "string", "pprint"):
        check_text_size(subject)
    if name == "join" and args and isinstance(args[0], str):  # the separator repeats once per item
        items = len(subject) if hasattr(subject, "__len__") else None  # an iterator: only a short separator
        if len(args[0]) > MAX_WIDTH if items is None else len(args[0]) * max(items - 1, 0) > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name == "indent" and isinstance(subject, str) and args and isinstance(args[0], str):  # a text as the width
        if len(args[0]) * (subject.count("\n") + 1) > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name == "wordwrap" and isinstance(subject, str):  # wrapstring repeats once per line
        width = args[0] if args and isinstance(args[0], int) and not isinstance(args[0], bool) else 79
        wrap = next((a for a in args[1:] if isinstance(a, str)), "\n")  # positional or keyword
        if len(wrap) * (len(subject) // max(width, 1) + subject.count("\n") + 1) > MAX_CHARS:
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
    if name in ("format", "format_map", "%") and isinstance(subject, str):  # the format string's own widths only
        if any(w == "*" or (w and int(w) > MAX_WIDTH) for w in format_widths(subject, name)):
            raise ChatTemplateError(f"chat template asked {name} for a width above {MAX_WIDTH} (or one from a value)")
    if name in ("indent", "center", "batch", "slice"):  # their counts pad or fill: a width, not text, is checked
        if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_WIDTH for a in args):
            raise ChatTemplateError(f"chat template asked {name} for a width above {MAX_WIDTH}")


def format_widths(fmt: str, name: str) -> list[str]:
    """The widths and precisions a format string asks for: digits, "*" where a value gives one (a %-format's
    `*`, a nested "{1}" field). `format` is both str.format and the |format filter (a %-format): both read."""
    widths = []
    if name in ("%", "format"):
        for match in PERCENT_SPEC.finditer(fmt):
            widths += [match.group(1), match.group(2) or ""]
    if name in ("format", "format_map"):
        try:
            fields = list(string.Formatter().parse(fmt))
        except ValueError:  # not a str.format string (a %-format with a lone brace): str.format says so itself
            fields = []
        for _, _, spec, _ in fields:
            widths += ["*"] if spec and "{" in spec else re.findall(r"\d+", spec or "")
    return widths


@lru_cache(maxsize=8)
def compile_template(template: str):
    """The compiled template (cached: a chat re-renders the same one every turn); ChatTemplateError
    if it does not parse."""
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be text, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:  # compiling takes ~600 bytes and ~8 us per character, unbounded in time
        raise ChatTemplateError(
            f"chat template is {len(template):,} characters, more than the {MAX_TEMPLATE_CHARS:,} any real one needs"
        )
    env = make_environment()
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}: {one_line(e)})") from None
    # Python's compiler refuses what jinja2 writes for 21 nested loops or 101 nested ifs (SyntaxError,
    # IndentationError), and a number literal of over 4,300 digits (ValueError)
    except (jinja2.exceptions.TemplateError, SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"chat template does not compile ({type(e).__name__}: {one_line(e)})") from None


def make_environment():
    import jinja2
    import jinja2.compiler
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks; here it
        just renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class CodeGenerator(jinja2.compiler.CodeGenerator):
        def buffer(self, frame) -> None:  # what {% set x %}, macros and call blocks collect: bounded as it grows
            frame.buffer = self.temporary_identifier()
            self.writeline(f"{frame.buffer} = environment.bounded_buffer()")

        def visit_Concat(self, node, frame) -> None:  # `a ~ b`: measured before it is joined (checked_concat)
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    def environment_call(method: str, node):
        return nodes.Call(nodes.EnvironmentAttribute(method), [node], [], None, None).set_lineno(node.lineno)

    class Budgeted(NodeTransformer):
        """Every {% for x in ITER %} becomes {% for x in environment.ticking(ITER) %}, and every list, tuple or
        dict the template writes ([a, a], (k, k), {k: v}) environment.built(...) of itself."""

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = environment_call("ticking", node.iter)
            return node

        def visit_List(self, node):
            self.generic_visit(node)
            return environment_call("built", node)

        visit_Dict = visit_List

        def visit_Tuple(self, node):
            self.generic_visit(node)
            return node if node.ctx != "load" else environment_call("built", node)  # not an assignment's names

    class Environment(ImmutableSandboxedEnvironment):
        """The sandbox plus budgets: unsafe attribute access raises at once (jinja2 would render it as
        empty), and every call, range step, loop item, attribute and item lookup counts against the
        render's iteration and time budget (each thread's own), so a template that loops forever or
        builds huge values fails."""

        code_generator_class = CodeGenerator

        def _generate(self, source, name, filename, defer_init=False):  # jinja2's hook between parse and codegen
            return super()._generate(Budgeted().visit(source), name, filename, defer_init)

        def ticking(self, iterable):
            """A {% for %}'s items, each a step of the budget: a loop that calls nothing (over a long
            string) is still bounded in steps and in time, on any thread (SIGALRM reaches the main one only)."""
            for item in iterable:
                self.tick()
                yield item

        budget = BUDGET  # per thread: a cached template's Environment serves every thread's renders

        def start_budget(self) -> None:
            self.budget.steps, self.budget.deadline, self.budget.built = 0, time.monotonic() + MAX_SECONDS, 0

        def built(self, value):
            """A list, tuple or dict the template wrote (Budgeted), measured as check_built does."""
            return check_built(value)

        def tick(self, steps: int = 1) -> None:
            self.budget.steps += steps
            if self.budget.steps > MAX_ITERATIONS or time.monotonic() > self.budget.deadline:
                raise ChatTemplateError(
                    f"chat template ran past its budget ({MAX_ITERATIONS} steps or {MAX_SECONDS:g} s)"
                )

        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe"
            )

        def call(self, context, obj, *args, **kwargs):
            self.tick()
            if getattr(obj, "__func__", None) in (Environment.ticking, Environment.built):  # ours: as they are
                return obj(*args)
            name = getattr(obj, "__name__", "")
            subject = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)  # jinja2 wraps str.format
            args, kwargs = tuple(map(bounded, args)), {k: bounded(v) for k, v in kwargs.items()}
            check_arguments(name, subject, args + tuple(kwargs.values()))
            return check_built(super().call(context, obj, *args, **kwargs))

        bounded_buffer = BoundedBuffer

        def checked_concat(self, parts: tuple) -> str:
            """`a ~ b`: jinja2's str_join, its parts measured as text first."""
            check_text_size(parts)
            return check_built("".join(map(str, parts)))

        def getattr(self, obj, attribute):
            self.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.tick()
            return super().getitem(obj, argument)

        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            self.tick()
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):  # a doubling chain
                if len(left) + len(right) > MAX_CHARS:
                    raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
            if operator == "%" and isinstance(left, str):
                check_arguments("%", left, right if isinstance(right, tuple) else (right,))
            if operator == "*" and isinstance(left, int) != isinstance(right, int):  # str/list * n
                n, seq = (left, right) if isinstance(left, int) else (right, left)
                if hasattr(seq, "__len__") and len(seq) * max(n, 0) > MAX_CHARS:
                    raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS}")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise ChatTemplateError("chat template raised a number to a power above 64")
            if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
                # a product's bits add, a power's multiply: bounded before Python spends minutes in one
                # multiplication that the time limit cannot interrupt (a loop squaring a number)
                bits = left.bit_length() + right.bit_length() if operator == "*" else left.bit_length() * abs(right)
                if bits > MAX_INT_BITS:
                    raise ChatTemplateError(f"chat template built a number of more than {MAX_INT_BITS} bits")
            return check_built(super().call_binop(context, operator, left, right))

    env = Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols], finalize=printable
    )

    def bounded_range(*args):
        steps = range(*args)
        env.tick(len(steps) + 1)  # charged up front, so nested loops exhaust the budget early
        return steps

    def bounded_filter(name, function):
        def bounded_call(*args, **kwargs):
            env.tick()
            args, kwargs = tuple(map(bounded, args)), {k: bounded(v) for k, v in kwargs.items()}
            values = args[1:] if getattr(function, "jinja_pass_arg", None) else args  # after a context argument
            check_arguments(name, values[0] if values else None, values[1:] + tuple(kwargs.values()))
            return check_built(function(*args, **kwargs))

        for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_eval_context markers
            if hasattr(function, attr):
                setattr(bounded_call, attr, getattr(function, attr))
        return bounded_call

    def raise_exception(message):
        if not isinstance(message, str):  # text now: one_line's str() of a list nested 5,000 deep recursed
            check_text_size(message)
            message = one_line(jinja2.exceptions.TemplateError(message))
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        width = (indent if isinstance(indent, int) else len(indent)) if isinstance(indent, (int, str)) else 0
        if abs(width) > MAX_WIDTH:
            raise ChatTemplateError(f"chat template asked tojson for an indent above {MAX_WIDTH}")
        if width > 0 and indented_size(x, width) > MAX_CHARS:  # each item gets a line indented by its depth
            raise ChatTemplateError(f"chat template built a value longer than {MAX_CHARS} as JSON")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore names and values past the size bound (a doubling loop)."""

        def __init__(*args, **kwargs):  # the signature of jinja2's Namespace, so namespace(self=...) works
            self, args = args[0], args[1:]
            for name, value in dict(*args, **kwargs).items():
                check_name(name)
                check_built(value)
            jinja2.utils.Namespace.__init__(self, *args, **kwargs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, check_built(value))

    env.filters["tojson"] = tojson
    env.filters.update({name: bounded_filter(name, f) for name, f in env.filters.items()})

    def strftime_now(fmt):
        if not isinstance(fmt, str) or len(fmt) > MAX_WIDTH or re.search(r"%[-_0^#]*\d", fmt):
            raise ChatTemplateError("chat template gave strftime_now a format with widths or over 1000 characters")
        return datetime.now().strftime(fmt)

    env.globals.pop("lipsum", None)  # jinja2's lorem ipsum: one call builds any size; no chat template uses it
    env.globals.update(
        range=bounded_range,
        raise_exception=raise_exception,
        namespace=Namespace,
        strftime_now=strftime_now,
        dict=lambda *a, **k: dict(*a, **k),
    )
    return env
