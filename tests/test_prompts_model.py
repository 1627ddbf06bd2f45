"""Prompt sets with ``template: model``: rendered with the chat template stored in the target's
GGUF (``tokenizer.chat_template``), on the real SmolLM2-135M-Instruct file and on vocabulary-only
copies of it (``gguf_vocab``) without a template, with a BOS-adding tokenizer, with a failing
template."""

from __future__ import annotations

from pathlib import Path

import pytest

import gguf_vocab as g
from gguf_vocab import meta, source  # noqa: F401 (fixtures)
from testbed.engine.native import Model
from testbed.errors import PromptsError
from testbed.inputs.prompts import (ChatTemplate, load_prompts, model_chat_template,
                                    render_prompt, target_chat_template)

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"



def _prompt_file(tmp_path: Path, *, system: str | None = "Be brief.") -> Path:
    p = tmp_path / "p.yaml"
    p.write_text("schema: testbed.prompts/1\ntask: t\ntemplate: model\n"
                 + (f"system: {system}\n" if system else "")
                 + "prompts: [first one, second one]\n")
    return p


def test_the_gguf_template_is_read(source):
    with Model.open(source, vocab_only=True) as m:
        chat = ChatTemplate.of(m)
        assert m.chat_template() == m.meta("tokenizer.chat_template")
    assert chat.source.startswith("{% for message in messages %}")
    assert (chat.bos_token, chat.eos_token, chat.add_bos, chat.add_eos) == (
        "<|im_start|>", "<|im_end|>", False, False)
    assert chat.model == str(source)
    assert model_chat_template(source) == chat


def test_smollm2_template_equals_chatml_with_a_system_turn(source):
    chat = model_chat_template(source)
    assert render_prompt("Hi.", "model", "Be brief.", chat) == render_prompt(
        "Hi.", "chatml", "Be brief.")


def test_without_a_system_turn_smollm2_adds_its_own(source):
    """The one difference: SmolLM2's template writes a default system turn when the messages
    have none; the testbed's chatml writes none."""
    chat = model_chat_template(source)
    assert render_prompt("Hi.", "model", chat=chat) == render_prompt(
        "Hi.", "chatml", system=SMOL_SYSTEM)
    assert render_prompt("Hi.", "model", chat=chat) != render_prompt("Hi.", "chatml")


def test_a_prompt_set_with_template_model(tmp_path, source):
    ps = load_prompts(_prompt_file(tmp_path))
    assert ps.template == "model" and ps.system == "Be brief."
    chat = target_chat_template([ps], source)
    assert ps.render(1, chat) == render_prompt("second one", "chatml", "Be brief.")
    assert ps.render(2, chat) == ps.render(0, chat)
    assert ps.render_all(chat)[0].startswith("<|im_start|>system\nBe brief.")
    with pytest.raises(PromptsError) as err:          # rendering needs the model's template
        ps.render(0)
    assert str(err.value).startswith(f"{ps.path}:3: template: template model renders with")


def test_target_chat_template_opens_nothing_without_template_model(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("schema: testbed.prompts/1\ntask: t\nprompts: [a]\n")
    ps = load_prompts(p)
    assert target_chat_template([ps, None], tmp_path / "absent.gguf") is None
    assert ps.render(0) == render_prompt("a", "chatml")


def test_a_model_without_a_chat_template_is_a_clear_error(tmp_path, meta):
    bare = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    model = g.write_vocab_only(tmp_path / "no-template.gguf", bare)
    ps = load_prompts(_prompt_file(tmp_path))
    with pytest.raises(PromptsError) as err:
        target_chat_template([ps], model)
    assert str(err.value) == (
        f"{ps.path}:3: template: the model {model} has no chat template (no "
        "tokenizer.chat_template in its GGUF): use template chatml or none")
    with pytest.raises(PromptsError, match="no chat template"):
        render_prompt("x", "model", chat=model_chat_template(model))


def test_a_bos_the_tokenizer_adds_is_not_doubled(tmp_path, meta):
    """A template that writes the BOS itself, for a tokenizer that adds one: the rendering
    drops the template's, so the tokens hold one BOS (as llama.cpp's server does). The copy's
    BOS is <|endoftext|> (id 0), so that it differs from the ChatML markers."""
    m = {**meta, "tokenizer.ggml.add_bos_token": (g.BOOL, True),
         "tokenizer.ggml.bos_token_id": (g.UINT32, 0),
         "tokenizer.chat_template": (g.STRING, b"{{ bos_token }}"
                                     + meta["tokenizer.chat_template"][1])}
    path = g.write_vocab_only(tmp_path / "bos.gguf", m)
    chat = model_chat_template(path)
    assert chat.add_bos and chat.bos_token == "<|endoftext|>"
    text = render_prompt("Hi.", "model", "Be brief.", chat)
    assert text == render_prompt("Hi.", "chatml", "Be brief.")
    with Model.open(path, vocab_only=True) as model:
        tokens = model.tokenize(text)
    assert tokens[0] == 0 and tokens.count(0) == 1 and tokens[1] == 1   # BOS, <|im_start|>


def test_a_failing_or_unsafe_template_is_a_prompts_error(tmp_path, meta):
    cases = {"raises": (b"{{ raise_exception('roles must alternate') }}",
                        "TemplateError: roles must alternate"),
             "unsafe": (b"{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError")}
    for name, (tmpl, why) in cases.items():
        m = {**meta, "tokenizer.chat_template": (g.STRING, tmpl)}
        path = g.write_vocab_only(tmp_path / f"{name}.gguf", m)
        with pytest.raises(PromptsError) as err:
            render_prompt("x", "model", chat=model_chat_template(path))
        assert err.value.field == "template"
        assert f"the chat template of {path} failed: {why}" in str(err.value)


def test_system_line_with_template_none_is_still_refused(tmp_path):
    p = tmp_path / "n.yaml"
    p.write_text("schema: testbed.prompts/1\ntask: t\ntemplate: none\nsystem: s\nprompts: [a]\n")
    with pytest.raises(PromptsError, match="system: a system line needs template chatml or model"):
        load_prompts(p)


def test_cli_spec_with_template_model(source, capsys):
    """``testbed spec --template model``: the prompt rendered with the target's template (with
    SmolLM2's default system turn), the same as chatml with that system line."""
    import json

    from testbed import cli
    from testbed.engine.spec import target_only

    with Model.open(source) as m:
        prompt = m.tokenize(render_prompt("Hi.", "chatml", system=SMOL_SYSTEM))
        want = target_only(m, prompt, max_tokens=4, threads=1, n_ctx=256).tokens
    code = cli.main(["spec", "--target", str(source), "--draft", str(source), "--prompt", "Hi.",
                     "--template", "model", "--max-tokens", "4", "--threads", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompt_tokens"] == len(prompt) and out["tokens"] == want


def test_the_simulator_renders_template_model_with_the_target_from_the_inventory(tmp_path):
    """An experiment whose workload uses ``template: model``: the simulator's prompt texts (as
    the loop renders them) are the target's template renderings; the target is the
    inventory's server model, resolved in this machine's model store."""
    from conftest import require

    from testbed.inputs import models
    from testbed.inputs.experiment import load_experiment
    from testbed.sim.run import prompt_tasks

    root = Path(__file__).resolve().parents[1]
    try:
        models.resolve("smollm2-135m-q4_1")
    except Exception as exc:  # noqa: BLE001 - the registry's model is not prepared here
        require(False, f"needs the prepared models ({exc})")
    _prompt_file(tmp_path)
    exp_file = tmp_path / "e.yaml"
    exp_file.write_text(
        "schema: testbed.experiment/1\nname: m\n"
        f"inventory: {root / 'inventory/local.yaml'}\nprofile: auto\nseed: 1\n"
        "policies: [server-only]\nper_policy: {duration_s: 5}\n"
        "workloads:\n  default: {prompts: p.yaml, max_tokens: 8, temperature: 0}\n")
    exp = load_experiment(exp_file)
    assert prompt_tasks(exp) == {render_prompt(t, "chatml", "Be brief."): "t"
                                 for t in ("first one", "second one")}
