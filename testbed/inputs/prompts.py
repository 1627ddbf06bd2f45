"""Prompt sets: small files of task prompts, loaded, validated and rendered for the models.

A prompt set is a YAML file (schema ``testbed.prompts/1``) naming a task, a chat template and a
list of prompts; the shipped ones live in ``experiments/prompts/`` (chat, code, summarise, qa).
Experiments give each device a workload that points at a prompt set; the profiler measures
acceptance per prompt set. Format::

    schema: testbed.prompts/1
    task: chat                  # a name: lower-case letters, digits, "-" or "_"
    template: chatml            # chatml (SmolLM2-Instruct and other ChatML models) | model | none
    system: You are ...         # optional; only with template chatml or model
    prompts:
      - Explain ...

Templates: ``chatml`` is written here (the default); ``none`` is the text as it is; ``model`` is
the target model's own chat template, the Jinja template stored in its GGUF
(``tokenizer.chat_template``), rendered as Hugging Face tokenizers do (``ChatTemplate``: messages
[system?, user], ``add_generation_prompt`` true, the vocabulary's ``bos_token`` / ``eos_token``),
in a sandbox. A prompt set with ``template: model`` renders only with the target's template:
``target_chat_template(prompt_sets, model)`` opens the target model's vocabulary on this machine
(once per file) and checks that it has a template (else a ``PromptsError`` naming the file's
``template`` field and the model); ``PromptSet.render(i, chat)`` and ``render_prompt(...,
chat=)`` take the result. Its rendering is deterministic (no current date: ``strftime_now`` is
left undefined, so templates use their fixed default), so a profile and a run agree on a
prompt's text (``prompt_key``).

Main types: ``PromptSet`` (``render`` / ``rendered`` give the model inputs), ``ChatTemplate`` and
``render_prompt``; entry point ``load_prompts(path)``. Failures raise ``PromptsError`` naming
file, line and field.

Limits: one template per file; prompts are plain text (no multi-turn conversations); ``model``
needs the target's model file on the machine that renders (the driver; the simulator too).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from testbed.errors import PromptsError
from testbed.yamlio import load_yaml

SCHEMA = "testbed.prompts/1"
TEMPLATES = ("chatml", "none", "model")
TASK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class ChatTemplate:
    """A model's own chat template: ``source`` (the Jinja text of the GGUF's
    ``tokenizer.chat_template``; None when the model has none), the vocabulary's BOS / EOS texts
    and whether its tokenizer adds them itself (``add_bos`` / ``add_eos``), and ``model`` (the
    file, for messages). ``of(model)`` reads one from an open ``native.Model``."""

    model: str
    source: str | None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    add_eos: bool = False

    @classmethod
    def of(cls, model) -> "ChatTemplate":
        def text(token: int) -> str:
            if token < 0:
                return ""
            return model.piece(token, special=True).decode("utf-8", "replace")
        return cls(model=str(model.path), source=model.chat_template(), bos_token=text(model.bos),
                   eos_token=text(model.eos), add_bos=model.add_bos, add_eos=model.add_eos)

    def missing(self) -> str:
        return (f"the model {self.model} has no chat template (no tokenizer.chat_template in "
                "its GGUF): use template chatml or none")

    def render(self, text: str, system: str | None = None) -> str:
        """The model input for one user prompt (an optional system turn, the user turn, the
        open assistant turn). A BOS (EOS) the template writes at the start (end) is dropped
        when the tokenizer adds it itself, so the tokens hold one, as in llama.cpp's server.
        PromptsError (field ``template``) when there is no template or it fails."""
        if self.source is None:
            raise PromptsError(self.missing(), field="template")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]
        try:
            out = _compiled(self.source).render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token)
        except Exception as exc:  # noqa: BLE001 - any template error, named with the model
            raise PromptsError(f"the chat template of {self.model} failed: "
                               f"{type(exc).__name__}: {exc}", field="template") from None
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token):]
        if self.add_eos and self.eos_token and out.endswith(self.eos_token):
            out = out[:-len(self.eos_token)]
        return out


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False):
    # as Hugging Face's: no HTML escaping (jinja2's own tojson escapes <, >, & and ')
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The template compiled in a sandbox, with the environment Hugging Face's
    apply_chat_template gives templates (trim_blocks, lstrip_blocks, loop controls,
    ``raise_exception``, a ``tojson`` without HTML escaping)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


@functools.lru_cache(maxsize=8)
def _file_chat_template(path: str, mtime_ns: int, size: int) -> ChatTemplate:
    from testbed.engine.native import Model
    with Model.open(path, vocab_only=True) as model:
        return ChatTemplate.of(model)


def model_chat_template(path: str | os.PathLike) -> ChatTemplate:
    """The chat template of the GGUF at ``path`` (its vocabulary only is opened; cached while
    the file is unchanged)."""
    st = os.stat(path)
    return _file_chat_template(str(path), st.st_mtime_ns, st.st_size)


def target_chat_template(prompt_sets: Iterable["PromptSet | None"], model) -> ChatTemplate | None:
    """The chat template the prompt sets need: None when none of them has ``template: model``
    (nothing is opened), else the target model's, ``model`` being its path, a registry name
    or an inventory ``ModelRef`` (a path is used as given, a name resolves in this machine's
    store: ``models.resolve``).
    PromptsError, naming the first such prompt file's ``template`` field and the model, when
    the model has no chat template."""
    needing = [ps for ps in prompt_sets if ps is not None and ps.template == "model"]
    if not needing:
        return None
    if isinstance(model, (str, os.PathLike)):
        path = model if Path(model).is_file() else None
    else:
        path = getattr(model, "path", None)
    if path is None:                    # a registry name (or a file that is not there)
        from testbed.inputs import models
        path = models.resolve(model)
    chat = model_chat_template(path)
    for ps in needing:
        ps.check_chat(chat)
    return chat


def render_prompt(text: str, template: str = "chatml", system: str | None = None,
                  chat: ChatTemplate | None = None) -> str:
    """The model input for one user prompt.

    ``chatml`` is the template of SmolLM2-Instruct: an optional system turn, the user turn, and
    an open assistant turn for the model to complete. ``none`` returns the text unchanged.
    ``model`` renders with ``chat``, the target model's own template (``ChatTemplate``).
    """
    if template == "none":
        return text
    if template == "model":
        if chat is None:
            raise ValueError("template 'model' renders with the target model's chat template: "
                             "give chat=ChatTemplate.of(model) (or target_chat_template)")
        return chat.render(text, system)
    if template != "chatml":
        raise ValueError(f"unknown template {template!r}")
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt set. ``digest`` is the sha256 of the file's bytes."""

    path: Path
    task: str
    template: str
    prompts: tuple[str, ...]
    system: str | None = None
    digest: str = ""
    template_line: int | None = dataclasses.field(default=None, compare=False)

    def check_chat(self, chat: ChatTemplate | None) -> None:
        """PromptsError (this file's ``template`` field) unless this set can render with
        ``chat``: always for chatml/none; for ``model`` a chat template must be given and the
        model must have one."""
        if self.template != "model":
            return
        if chat is None:
            raise PromptsError("template model renders with the target model's chat template, "
                               "and none was given here", source=str(self.path),
                               line=self.template_line, field="template")
        if chat.source is None:
            raise PromptsError(chat.missing(), source=str(self.path), line=self.template_line,
                               field="template")

    def render(self, index: int, chat: ChatTemplate | None = None) -> str:
        """The model input for prompt ``index`` (wraps around, so any round index works).
        ``chat``: the target's chat template (``target_chat_template``), needed by
        ``template: model`` and ignored by the others."""
        self.check_chat(chat)
        text = self.prompts[index % len(self.prompts)]
        try:
            return render_prompt(text, self.template, self.system, chat)
        except PromptsError as exc:
            raise PromptsError(exc.message, source=str(self.path), line=self.template_line,
                               field="template") from None

    @property
    def rendered(self) -> tuple[str, ...]:
        """Every prompt rendered (chatml/none; ``render_all(chat)`` for template model)."""
        return self.render_all()

    def render_all(self, chat: ChatTemplate | None = None) -> tuple[str, ...]:
        return tuple(self.render(i, chat) for i in range(len(self.prompts)))


def prompt_key(rendered: str) -> str:
    """A rendered prompt's key in profiles (its teacher-forced answers): 16 hex digits of the
    SHA-256 of its UTF-8 text, so that a profile and an experiment agree on a prompt whatever
    file or index it came from."""
    return hashlib.sha256(rendered.encode()).hexdigest()[:16]


def load_prompts(path: str | Path) -> PromptSet:
    """Load and validate a prompt set; raises PromptsError (file:line: field: what)."""
    root = load_yaml(path, PromptsError)
    schema = root.str("schema")
    if schema != SCHEMA:
        raise root.error("schema", f'expected "{SCHEMA}", got "{schema}"')
    task = root.str("task", check=lambda v: None if TASK_RE.match(v) else (
        f'"{v}" is not a valid task name (lower-case letters, digits, "-" or "_", '
        "starting with a letter, at most 32 characters)"))
    template = root.str("template", "chatml", choices=TEMPLATES)
    system = root.str("system", None)
    if system is not None and template == "none":
        raise root.error("system", "a system line needs template chatml or model")
    raw = root.raw("prompts")
    if not isinstance(raw, list):
        raise root.error("prompts", "expected a list of prompts")
    if not raw:
        raise root.error("prompts", "at least one prompt is needed")
    prompts: list[str] = []
    for i, item in enumerate(raw):
        field = f"prompts[{i}]"
        line = root.lines.get(field)
        if not isinstance(item, str) or not item.strip():
            raise PromptsError("expected a non-empty text", source=root.source, line=line,
                               field=field)
        text = item.strip()
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptsError(f"too long ({len(text)} characters, at most {MAX_PROMPT_CHARS})",
                               source=root.source, line=line, field=field)
        if "<|im_start|>" in text or "<|im_end|>" in text:
            raise PromptsError("contains a ChatML marker; write the plain prompt, the template "
                               "adds the markers", source=root.source, line=line, field=field)
        if text in prompts:
            raise PromptsError(f"duplicate of prompts[{prompts.index(text)}]",
                               source=root.source, line=line, field=field)
        prompts.append(text)
    root.done()
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return PromptSet(path=Path(path), task=task, template=template, prompts=tuple(prompts),
                     system=system.strip() if system else None, digest=digest,
                     template_line=root.lines.get("template"))
