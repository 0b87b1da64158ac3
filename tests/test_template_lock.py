"""The chat template lock: recorded once, checked by every stage that tokenizes conversations, and the
rendering TRL's DPO preprocessing tokenizes equals the template's, token for token."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.errors import SourceError
from pipeline.lm.loading import load_tokenizer
from pipeline.lm.template import check_template, check_template_dir, recorded, template_sha256

PROMPT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
CHOSEN = [{"role": "assistant", "content": "Blue."}]


def test_trl_dpo_tokenization_equals_the_rendered_template(smollm_tokenizer_dir):
    """What TRL 1.16's DPOTrainer.tokenize_fn does (trl.data_utils._tokenize on prompt with the generation
    prompt, and on prompt + completion; the completion starts at their common prefix) gives exactly the
    tokens of the chat template's rendering: no double BOS/EOS, and the prompt is a prefix."""
    from trl.data_utils import _tokenize, common_prefix_length

    tok = load_tokenizer(smollm_tokenizer_dir)
    prompt_ids = _tokenize(tok, PROMPT, add_generation_prompt=True, tools=None)["input_ids"]
    full_ids = _tokenize(tok, PROMPT + CHOSEN, tools=None)["input_ids"]
    assert common_prefix_length(prompt_ids, full_ids) == len(prompt_ids)  # the prompt is a prefix

    rendered = tok.apply_chat_template(PROMPT + CHOSEN, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == full_ids  # token for token
    rendered_prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(rendered_prompt)
    assert tok(rendered_prompt, add_special_tokens=False)["input_ids"] == prompt_ids
    for special in {tok.bos_token_id, tok.eos_token_id} - {None}:
        assert full_ids[:2] != [special, special] and full_ids[-2:] != [special, special]  # no doubled BOS/EOS
    # tokenizing the rendering with the tokenizer's default special tokens adds nothing either
    assert tok(rendered)["input_ids"] == full_ids


def test_base_model_records_the_template_and_stages_check_it(tmp_path, tiny_model_dir):
    from pipeline.core.params import BaseModelParams
    from pipeline.stages import base_model

    out = tmp_path / "base"
    out.mkdir()
    p = BaseModelParams(name="tiny", source="local", license="MIT", local=str(tiny_model_dir))
    source = base_model.run(p, out)
    assert source["chat_template_sha256"] == template_sha256(load_tokenizer(out)) == recorded(out)["chat_template_sha256"]
    assert "Name" not in source["chat_template_probe"] and "<|im_start|>" in source["chat_template_probe"]
    assert check_template_dir(out, out, "train") == source["chat_template_sha256"]


def test_a_changed_template_stops_the_stage_naming_both_hashes_and_renderings(tmp_path, tiny_model_dir):
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, trained)
    tok = load_tokenizer(trained)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(SourceError) as e:
        check_template(tok, tiny_model_dir, "evaluate (trained model)")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("evaluate (trained model): chat template sha256 ")
    assert template_sha256(tok)[:16] in msg and recorded(tiny_model_dir)["chat_template_sha256"][:16] in msg
    assert "probe renderings differ at char" in msg and "'im_start|> system" in msg


def test_a_base_model_without_a_recorded_template_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "SOURCE.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(SourceError, match=r"no chat_template_sha256 recorded \(rerun `dvc repro base_model`\)"):
        check_template_dir(folder, folder, "build")
