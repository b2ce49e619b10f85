"""An Ollama Modelfile for a GGUF file: FROM, TEMPLATE (Go template syntax) and PARAMETER stop.

Interface::

    write_modelfile(gguf_path, out_dir=None, *, chat=None, overwrite=False) -> Path   # DIR/Modelfile
    write_ollama(out_dir, write_gguf, *, chat=None, overwrite=False) -> Path           # DIR/model.gguf + DIR/Modelfile
    ChatSpec.from_gguf(path) / ChatSpec.from_tokenizer(tokenizer)                      # what the template is made of
    go_template(chat) -> str; stop_tokens(chat) -> list[str]

``write_modelfile`` reads the chat template, the special tokens and ``add_bos_token`` from the
GGUF file's own ``tokenizer.*`` keys unless ``chat`` is given; ``write_ollama`` creates ``DIR``
atomically, lets ``write_gguf(path)`` (the GGUF writer, with its options bound) write
``DIR/model.gguf`` and adds the Modelfile: ``ollama create NAME -f DIR/Modelfile``.

**How the TEMPLATE is derived.** A model's chat template is Jinja; Ollama's is Go's
``text/template`` over ``.Messages``. Rather than translate Jinja, the chat template is
*rendered* (by transformers' own renderer) on probe conversations whose contents are unique
markers, and the text around the markers gives each role's prefix and suffix, the generation
prompt, the text written before the first turn (a BOS, a default system prompt when there is no
system message) and where a system message goes: a turn of its own (ChatML, Llama 3, Phi-3),
merged into the first or the last user message (Llama 2, Mistral v0.3, Gemma 3), or not
supported (Gemma 1/2, Mistral v0.1: the template raises; the system message is then written as
a user turn, as Ollama's own Gemma templates do). The parts are checked by rendering them back
(:meth:`ChatFormat.render`) on six conversations with and without a system message and
comparing with the Jinja template's own output; a template they cannot reproduce (one that
treats some turns differently, say) is refused with an error, not approximated.

Conventions of Ollama's own templates that the output follows: the generation prompt comes
after the last message when it is a user (or system) message; a last assistant message is left
open (no end-of-turn), so the model continues it. The BOS the template writes at the start of
the prompt is left out when the GGUF file says ``add_bos_token`` (llama.cpp adds it; writing it
too would double it); Llama 2's BOS before every later ``[INST]`` stays.
Content is written as it is: a template that trims messages (Llama 3's ``| trim``) differs
only for content with leading or trailing whitespace. Messages of other roles (``tool``) and
tool definitions are not written.

**The Go template semantics relied on** (tested by a small evaluator in
``tests/test_ollama.py``, since Ollama cannot be installed here): every literal is a quoted Go
string printed by an action (``{{ "<|im_end|>\\n" }}``, escapes ``\\n \\t \\" \\\\ \\xHH``), so the
trim markers ``{{-``/``-}}`` around actions only remove the newlines that lay the template out;
``range $i, $_ := .Messages`` (dot is the message; ``.Role``, ``.Content``); ``$.System`` and
``$.Messages`` from inside the range; ``if`` / ``else if`` / ``else`` / ``end``; the functions
``eq``, ``ne``, ``not``, ``and``, ``or``, ``len``, ``slice`` and ``index``; Go's truth (an empty
string and the index 0 are false).
Ollama's ``.System`` is the text of the conversation's system messages; the default system
prompt is written when it is empty.

``PARAMETER stop``: the special tokens that delimit turns (those found in the role prefixes
and suffixes and the generation prompt), e.g. ``<|im_start|>`` and ``<|im_end|>`` for ChatML.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.version import __version__

MODELFILE = "Modelfile"
HEADER = "# Written by lowbit"
GGUF_NAME = "model.gguf"
#: probe contents: unique words no template adds or changes (some templates trim content)
MARKS = {"system": "lowbitSYSTEMmark", "user": "lowbitUSERmark", "assistant": "lowbitASSISTANTmark"}
CONTROL, USER_DEFINED = 3, 4


@dataclass(frozen=True)
class ChatSpec:
    """What a Modelfile is derived from: the Jinja chat template and the tokenizer's special tokens."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    #: texts of the vocabulary's special (control) tokens: candidates for ``PARAMETER stop``
    special_tokens: tuple[str, ...] = ()
    #: whether llama.cpp adds BOS itself (``tokenizer.ggml.add_bos_token``)
    add_bos: bool = False

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> ChatSpec:
        """From a GGUF file's ``tokenizer.*`` keys."""
        from lowbit.export.gguf_tokenizer import read_metadata

        keys = {entry.key: entry.value for entry in read_metadata(path)}
        text = lambda value: value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        template = keys.get("tokenizer.chat_template")
        if template is None:
            raise LowbitError(f"{path} has no chat template (tokenizer.chat_template); an Ollama TEMPLATE cannot be derived")
        tokens = keys.get("tokenizer.ggml.tokens") or []
        types = keys.get("tokenizer.ggml.token_type") or []
        token = lambda key: text(tokens[keys[key]]) if isinstance(keys.get(key), int) and keys[key] < len(tokens) else None
        specials = tuple(text(t) for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED))
        return cls(
            text(template),
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
            specials,
            bool(keys.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatSpec:
        """From a loaded transformers tokenizer (its ``chat_template`` and added tokens)."""
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str):
            raise LowbitError("the tokenizer has no chat template; an Ollama TEMPLATE cannot be derived")
        from lowbit.export.gguf_tokenizer import adds_special_tokens

        specials = tuple(token.content for token in tokenizer.added_tokens_decoder.values())
        return cls(template, tokenizer.bos_token, tokenizer.eos_token, specials, adds_special_tokens(tokenizer)[0])


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as parts: every conversation renders as ``begin``, ``default_system``
    (when it has no system message), each message as ``prefix + content + suffix`` of its role,
    then ``generation`` after a last user message. ``system_mode``: ``turn`` (a turn of its
    own), ``first_user`` / ``last_user`` (written inside that user message, between
    ``system_in_user``'s two strings), or ``as_user`` (the template has no system role)."""

    begin: str
    default_system: str
    system: tuple[str, str]
    system_mode: str
    system_in_user: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages`` ending with a user message, generation prompt included
        (what the Go template renders, and what the chat template rendered when derived)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.begin, "" if system else self.default_system]
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system" and self.system_mode == "turn":
                out += [self.system[0], content, self.system[1]]
            elif role == "user" or (role == "system" and self.system_mode == "as_user"):
                merged = self.system_mode == "first_user" and index == 1 or self.system_mode == "last_user" and index == len(messages) - 1
                inside = [self.system_in_user[0], system, self.system_in_user[1]] if system and merged else []
                out += [self.user[0], *inside, content, self.user[1]]
            elif role == "assistant":
                out += [self.assistant[0], content, self.assistant[1]]
        return "".join(out) + self.generation


def render_chat_template(chat: ChatSpec, messages: list[dict], add_generation_prompt: bool) -> str:
    """The Jinja chat template's prompt, rendered as transformers' ``apply_chat_template`` does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=chat.template,
        add_generation_prompt=add_generation_prompt,
        bos_token=chat.bos_token or "",
        eos_token=chat.eos_token or "",
    )
    return rendered[0]


def _message(role: str, number: int = 1) -> dict:
    return {"role": role, "content": f"{MARKS[role]}{number}"}


def _split(text: str, messages: list[dict]) -> list[str]:
    """The text between the messages' contents (len(messages) + 1 pieces)."""
    pieces, position = [], 0
    for message in messages:
        found = text.find(message["content"], position)
        if found < 0:
            raise _cannot(f"the content of a {message['role']} message does not appear in the rendered prompt")
        pieces.append(text[position:found])
        position = found + len(message["content"])
    return pieces + [text[position:]]


def _cannot(why: str) -> LowbitError:
    return LowbitError(
        f"cannot express this chat template as an Ollama TEMPLATE: {why}; lowbit derives ChatML, Llama 3, Llama 2 / "
        "Mistral [INST], Gemma and Phi-3 style templates (write the TEMPLATE by hand for this model)"
    )


def _strip_end(text: str, end: str, what: str) -> str:
    if not text.endswith(end):
        raise _cannot(f"the {what} is not where the other turns put it")
    return text[: len(text) - len(end)] if end else text


def _strip_start(text: str, start: str, what: str) -> str:
    if not text.startswith(start):
        raise _cannot(f"the {what} is not where the other turns put it")
    return text[len(start) :]


def derive_format(chat: ChatSpec) -> ChatFormat:
    """The parts of ``chat``'s template, found by rendering probe conversations (module doc)."""
    render = lambda messages, generation: render_chat_template(chat, messages, generation)
    u1, a1, u2, s1 = _message("user", 1), _message("assistant", 1), _message("user", 2), _message("system", 1)
    try:
        with_prompt, without = render([u1], True), render([u1], False)
        conversation = [u1, a1, u2]
        pieces = _split(render(conversation, True), conversation)
        closed = _split(render([u1, a1], False), [u1, a1])
    except LowbitError:
        raise
    except Exception as error:  # noqa: BLE001  (the template's own raise_exception, or any Jinja error)
        raise _cannot(f"rendering a user/assistant conversation failed ({type(error).__name__}: {error})") from None
    # the generation prompt, and what the template writes at the end without one (Phi-3: EOS)
    if with_prompt.startswith(without):
        tail, generation = "", with_prompt[len(without) :]
    elif chat.eos_token and without.endswith(chat.eos_token) and with_prompt.startswith(without[: -len(chat.eos_token)]):
        tail, generation = chat.eos_token, with_prompt[len(without) - len(chat.eos_token) :]
    else:
        raise _cannot("add_generation_prompt changes more than the end of the prompt")
    user_suffix = _strip_end(pieces[3], generation, "generation prompt")
    assistant_prefix = _strip_start(pieces[1], user_suffix, "assistant turn")
    assistant_suffix = _strip_end(closed[2], tail, "end of the prompt")
    user_prefix = _strip_start(pieces[2], assistant_suffix, "user turn")
    opening = _strip_end(pieces[0], user_prefix, "first user turn")
    # a BOS only when the template writes one (SmolLM2's BOS is <|im_start|>, which starts every turn)
    writes_bos = chat.bos_token and "bos_token" in chat.template and opening.startswith(chat.bos_token)
    begin = chat.bos_token if writes_bos else ""
    parts = {
        "begin": begin,
        "default_system": opening[len(begin) :],
        "user": (user_prefix, user_suffix),
        "assistant": (assistant_prefix, assistant_suffix),
        "generation": generation,
    }
    system = _system_parts(chat, render, begin, user_prefix, s1, u1, a1, u2)
    found = ChatFormat(**parts, **system)
    _check(found, chat)
    return found


def _system_parts(chat, render, begin, user_prefix, s1, u1, a1, u2) -> dict:
    """Where a system message goes: its own turn, inside the first or last user message, or nowhere."""
    try:
        before, between, _ = _split(render([s1, u1], True), [s1, u1])
        longer = render([s1, u1, a1, u2], True)
    except LowbitError:
        raise
    except Exception:  # noqa: BLE001  (the template refuses a system message: Ollama's templates then write it as a user turn)
        return {"system": ("", ""), "system_mode": "as_user", "system_in_user": ("", "")}
    if before.startswith(begin + user_prefix) and user_prefix:  # inside a user message
        first = longer.find(s1["content"]) < longer.find(u1["content"])
        return {
            "system": ("", ""),
            "system_mode": "first_user" if first else "last_user",
            "system_in_user": (before[len(begin + user_prefix) :], between),
        }
    system = (_strip_start(before, begin, "system turn"), _strip_end(between, user_prefix, "system turn"))
    return {"system": system, "system_mode": "turn", "system_in_user": ("", "")}


#: conversations the derived parts must render exactly as the chat template does
PROBES = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user"),
    ("system", "user", "assistant", "user"),
    ("user", "assistant", "user", "assistant", "user"),
    ("system", "user", "assistant", "user", "assistant", "user"),
)


def probe_conversations() -> list[list[dict]]:
    """The check conversations, with plain-text contents (different from the derivation's markers)."""
    texts = iter(f"probe message {n}: some text." for n in range(100))
    return [[{"role": role, "content": next(texts)} for role in roles] for roles in PROBES]


def _check(found: ChatFormat, chat: ChatSpec) -> None:
    for messages in probe_conversations():
        if found.system_mode == "as_user" and messages[0]["role"] == "system":
            continue  # the chat template refuses these; nothing to compare with
        expected = render_chat_template(chat, messages, True)
        if found.render(messages) != expected:
            roles = ", ".join(m["role"] for m in messages)
            raise _cannot(f"its parts do not reproduce the prompt of a ({roles}) conversation")


# -- the Go template ------------------------------------------------------------------------


def go_string(text: str) -> str:
    """``text`` as a Go double-quoted string literal."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return '"' + "".join(escapes.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text) + '"'


def _say(text: str) -> str:
    return "{{ " + go_string(text) + " }}" if text else ""


def go_template(chat: ChatSpec) -> str:
    """Ollama's TEMPLATE for ``chat`` (see the module doc for the semantics it relies on)."""
    form = derive_format(chat)
    begin = "" if chat.add_bos and form.begin == chat.bos_token else form.begin
    lines = []
    if begin:
        lines.append("{{- " + go_string(begin) + " }}")
    if form.default_system:
        lines.append("{{- if not .System }}" + _say(form.default_system) + "{{ end }}")
    lines.append("{{- range $i, $_ := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    user_roles = '(eq .Role "user")'
    if form.system_mode == "turn":
        lines.append('{{- if eq .Role "system" }}' + _say(form.system[0]) + "{{ .Content }}" + _say(form.system[1]))
        user_branch = '{{- else if eq .Role "user" }}'
    elif form.system_mode == "as_user":
        user_branch = '{{- if or ' + user_roles + ' (eq .Role "system") }}'
    else:
        user_branch = '{{- if eq .Role "user" }}'
    merged = ""
    if form.system_mode in ("first_user", "last_user"):
        where = "(eq $i 1)" if form.system_mode == "first_user" else "$last"
        merged = "{{ if and $.System " + where + " }}" + _say(form.system_in_user[0]) + "{{ $.System }}" + _say(form.system_in_user[1]) + "{{ end }}"
    lines.append(
        user_branch + _user_prefix(form, chat, begin) + merged + "{{ .Content }}" + _say(form.user[1]) + "{{ if $last }}" + _say(form.generation) + "{{ end }}"
    )
    lines.append(
        '{{- else if eq .Role "assistant" }}' + _say(form.assistant[0]) + "{{ .Content }}{{ if not $last }}" + _say(form.assistant[1]) + "{{ end }}"
    )
    lines.append("{{- end }}")
    lines.append("{{- end }}")
    template = "\n".join(lines).replace("{{ if $last }}{{ end }}", "").replace("{{ if not $last }}{{ end }}", "")
    assert '"""' not in template  # the Modelfile quotes it with triple quotes
    return template


def _user_prefix(form: ChatFormat, chat: ChatSpec, begin: str) -> str:
    """The user prefix; one that starts with BOS (Llama 2 writes ``<s>[INST]`` for every turn)
    leaves it out of the prompt's first turn when llama.cpp adds BOS itself."""
    prefix, bos = form.user[0], chat.bos_token
    if not (chat.add_bos and bos and prefix.startswith(bos) and not begin and not form.default_system):
        return _say(prefix)
    if form.system_mode in ("first_user", "last_user"):  # the system message renders no turn of its own
        later = '(and $i (or (ne $i 1) (ne (index $.Messages 0).Role "system")))'
    else:
        later = "$i"
    return "{{ if " + later + " }}" + _say(bos) + "{{ end }}" + _say(prefix[len(bos) :])


def stop_tokens(chat: ChatSpec) -> list[str]:
    """Special tokens that delimit turns: where the model should stop generating."""
    form = derive_format(chat)
    text = "\0".join([*form.user, form.generation, *form.assistant, *form.system])
    found = {token: text.find(token) for token in chat.special_tokens if token and token in text}
    return sorted(found, key=lambda token: (found[token], -len(token)))  # in the order a conversation meets them


def modelfile_text(gguf_reference: str, chat: ChatSpec) -> str:
    """The Modelfile: FROM, TEMPLATE, one PARAMETER stop per end-of-turn token."""
    lines = [f"{HEADER} {__version__}: ollama create NAME -f Modelfile", f"FROM {gguf_reference}", f'TEMPLATE """{go_template(chat)}"""']
    for token in stop_tokens(chat):
        if '"' in token or "\n" in token:
            continue  # Ollama's parser has no escape for these in a quoted parameter
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, chat: ChatSpec | None = None, overwrite: bool = False
) -> Path:
    """Write ``out_dir/Modelfile`` (default: beside the GGUF file) for ``gguf_path``; returns its path.

    FROM names the GGUF file relative to the Modelfile when it lies in ``out_dir``, else by its
    absolute path. ``chat`` defaults to :meth:`ChatSpec.from_gguf` of the file."""
    from lowbit.export.atomic import write_text_atomically

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise LowbitError(f"no such GGUF file: {gguf_path}")
    out_dir = Path(out_dir).resolve() if out_dir is not None else gguf_path.parent
    target = out_dir / MODELFILE
    if target.exists() and not overwrite:
        raise LowbitError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    text = modelfile_text(f"./{gguf_path.name}" if gguf_path.parent == out_dir else str(gguf_path), chat or ChatSpec.from_gguf(gguf_path))
    return write_text_atomically(target, text)


def write_ollama(
    out_dir: str | os.PathLike, write_gguf: Callable[[Path], object], *, chat: ChatSpec | None = None, overwrite: bool = False
) -> Path:
    """Write ``out_dir`` holding ``model.gguf`` (by ``write_gguf(path)``) and its Modelfile, atomically.

    ``overwrite`` replaces only a directory this function wrote (a Modelfile starting with
    lowbit's header), kept aside until the new one is complete."""
    import shutil

    from lowbit.export.atomic import atomic_directory

    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    old = None
    if out_dir.exists() and overwrite:
        if not is_ollama_output(out_dir):
            raise LowbitError(f"{out_dir} was not written by lowbit's Ollama export; --overwrite only replaces lowbit's own outputs")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    try:
        with atomic_directory(out_dir, False) as temporary:
            write_gguf(Path(temporary) / GGUF_NAME)
            write_modelfile(Path(temporary) / GGUF_NAME, temporary, chat=chat)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def is_ollama_output(path: Path) -> bool:
    """Whether ``path`` is a directory :func:`write_ollama` wrote (its Modelfile has lowbit's header)."""
    try:
        with open(path / MODELFILE, encoding="utf-8") as file:
            return file.readline().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
