"""Prompt sets: the shipped sets load and differ by task; rendering matches SmolLM2's ChatML;
malformed sets are rejected with one located line."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import PromptsError
from testbed.inputs.prompts import load_prompts, render_prompt

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments/prompts").glob("*.yaml"))


def test_shipped_prompt_sets():
    sets = [load_prompts(p) for p in SHIPPED]
    assert {s.task for s in sets} >= {"chat", "code", "summarise", "qa"}
    for s in sets:
        assert len(s.prompts) >= 8, s.path
        assert s.template == "chatml" and s.system
        assert all(len(p.split()) >= 8 for p in s.prompts), s.path   # a few sentences, not words
        assert len(s.digest) == 64
    texts = [p for s in sets for p in s.prompts]
    assert len(texts) == len(set(texts))


def test_chatml_rendering_is_exact():
    assert render_prompt("Hi there.", "chatml") == (
        "<|im_start|>user\nHi there.<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("Hi.", "chatml", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt("raw text", "none") == "raw text"
    with pytest.raises(ValueError):
        render_prompt("x", "llama3")


def test_render_wraps_around_and_uses_the_system_line(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text("schema: testbed.prompts/1\ntask: t\ntemplate: chatml\nsystem: Sys.\n"
                 "prompts: [first one, second one]\n")
    s = load_prompts(p)
    assert s.render(2) == s.render(0) == ("<|im_start|>system\nSys.<|im_end|>\n"
                                          "<|im_start|>user\nfirst one<|im_end|>\n"
                                          "<|im_start|>assistant\n")
    assert s.rendered[1].endswith("user\nsecond one<|im_end|>\n<|im_start|>assistant\n")


BAD = {
    "wrong schema": ("schema: testbed.prompts/9\ntask: t\nprompts: [a]\n",
                     ':1: schema: expected "testbed.prompts/1"'),
    "no prompts": ("schema: testbed.prompts/1\ntask: t\nprompts: []\n",
                   ":3: prompts: at least one prompt is needed"),
    "prompt not text": ("schema: testbed.prompts/1\ntask: t\nprompts:\n  - fine\n  - 42\n",
                        ":5: prompts[1]: expected a non-empty text"),
    "duplicate": ("schema: testbed.prompts/1\ntask: t\nprompts:\n  - same\n  - other\n  - same\n",
                  ":6: prompts[2]: duplicate of prompts[0]"),
    "marker": ("schema: testbed.prompts/1\ntask: t\nprompts:\n  - '<|im_start|>user hi'\n",
               ":4: prompts[0]: contains a ChatML marker"),
    "system without chatml": ("schema: testbed.prompts/1\ntask: t\ntemplate: none\n"
                              "system: hi\nprompts: [a]\n",
                              ":4: system: a system line needs template chatml"),
    "bad template": ("schema: testbed.prompts/1\ntask: t\ntemplate: alpaca\nprompts: [a]\n",
                     ":3: template: expected one of chatml, none"),
    "unknown key": ("schema: testbed.prompts/1\ntask: t\nprompt: [a]\nprompts: [b]\n",
                    ":3: prompt: unknown field"),
    "bad task": ("schema: testbed.prompts/1\ntask: Chat Task\nprompts: [a]\n",
                 ':2: task: "Chat Task" is not a valid task name'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_prompt_sets(tmp_path: Path, case: str):
    text, expect = BAD[case]
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(PromptsError) as info:
        load_prompts(p)
    msg = str(info.value)
    assert msg.startswith(str(p)) and expect in msg and "\n" not in msg, msg
