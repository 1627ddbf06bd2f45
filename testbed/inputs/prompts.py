"""Prompt sets: small files of task prompts, loaded, validated and rendered for the models.

A prompt set is a YAML file (schema ``testbed.prompts/1``) naming a task, a chat template and a
list of prompts; the shipped ones live in ``experiments/prompts/`` (chat, code, summarise, qa).
Experiments give each device a workload that points at a prompt set; the profiler measures
acceptance per prompt set. Format::

    schema: testbed.prompts/1
    task: chat                  # a name: lower-case letters, digits, "-" or "_"
    template: chatml            # chatml (SmolLM2-Instruct and other ChatML models) | none
    system: You are ...         # optional; only with template chatml
    prompts:
      - Explain ...

Main types: ``PromptSet`` (``rendered`` gives the model inputs) and ``render_prompt``; entry
point ``load_prompts(path)``. Failures raise ``PromptsError`` naming file, line and field.

Limits: one template per file; prompts are plain text (no multi-turn conversations).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import PromptsError
from testbed.yamlio import load_yaml

SCHEMA = "testbed.prompts/1"
TEMPLATES = ("chatml", "none")
TASK_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_PROMPT_CHARS = 4000


def render_prompt(text: str, template: str = "chatml", system: str | None = None) -> str:
    """The model input for one user prompt.

    ``chatml`` is the template of SmolLM2-Instruct: an optional system turn, the user turn, and
    an open assistant turn for the model to complete. ``none`` returns the text unchanged.
    """
    if template == "none":
        return text
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

    def render(self, index: int) -> str:
        """The model input for prompt ``index`` (wraps around, so any round index works)."""
        return render_prompt(self.prompts[index % len(self.prompts)], self.template, self.system)

    @property
    def rendered(self) -> tuple[str, ...]:
        return tuple(self.render(i) for i in range(len(self.prompts)))


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
        raise root.error("system", "a system line needs template chatml")
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
                     system=system.strip() if system else None, digest=digest)
