"""pipeline/lm/decode.py: the same tokens as model.generate when greedy, the same distribution when sampling."""

from __future__ import annotations

import pytest
import torch

from pipeline.lm import decode as D
from pipeline.lm.generation import _eos_ids

PROMPTS = ["Hi.", "Write a long and detailed story about a lighthouse keeper and a storm.", "List three fruits.",
           "What is rain?", "Explain tides in two sentences, please, for a child."]


@pytest.fixture(scope="module")
def tiny(smollm_tokenizer_dir):
    """A random 2-layer Llama with untied, widely spread weights: unlike the shared tiny model (whose tied
    embeddings make greedy decoding repeat one token), its greedy tokens vary by prompt and step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.lm.loading import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(smollm_tokenizer_dir)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.3)).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return model, tok, enc


def test_greedy_matches_model_generate_token_for_token(tiny):
    """Left padding, the preallocated cache and dropped finished rows change nothing greedy decoding picks."""
    from transformers import GenerationConfig

    model, tok, enc = tiny
    eos = _eos_ids(model, tok)
    # A stop token the random model actually emits, so rows finish at different steps and leave the batch.
    with torch.inference_mode():
        ref = model.generate(**enc, generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                       pad_token_id=tok.pad_token_id))
    ref_new = ref[:, enc["input_ids"].shape[1]:]
    rows_with = {t: sum(t in row for row in ref_new.tolist()) for t in ref_new.flatten().tolist()}
    stop = next(t for t in ref_new.flatten().tolist() if 0 < rows_with[t] < len(PROMPTS))
    with torch.inference_mode():
        ref = model.generate(**enc, generation_config=GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[*eos, stop],
                                                                       pad_token_id=tok.pad_token_id))
    ref_new = ref[:, enc["input_ids"].shape[1]:]
    ours = D.decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12, eos_ids=[*eos, stop],
                    pad_id=tok.pad_token_id, do_sample=False)
    assert ours.shape == (len(PROMPTS), 12)
    finished_early = sum(bool((row == stop).any()) for row in ours)
    assert 0 < finished_early < len(PROMPTS)  # the test exercises rows leaving the batch
    for a, b in zip(ours.tolist(), ref_new.tolist(), strict=True):
        assert a[: len(b)] == b and all(t == tok.pad_token_id for t in a[len(b):])


def test_prefill_groups_bound_the_padding():
    lengths = [40, 112, 41, 60, 39, 100, 62, 45, 44, 43, 42, 41, 40, 39, 39, 38, 70, 71, 72, 73]
    groups = D.prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert len(groups) > 1
    for g in groups:
        real, padded = sum(lengths[i] for i in g), max(lengths[i] for i in g) * len(g)
        assert len(g) <= D.PREFILL_MIN_ROWS or padded <= D.PREFILL_MAX_PADDING * real  # the first rows join regardless
    assert D.prefill_groups([50] * 30) == [list(range(30))]  # one length: one group, the batch as it is


def test_grouped_prefill_matches_model_generate(tiny):
    """Prompts of very different lengths are encoded in several groups; greedy tokens stay transformers'."""
    from transformers import GenerationConfig

    model, tok, _ = tiny
    prompts = [" ".join([p] * k) for k in (1, 2, 4) for p in PROMPTS] + PROMPTS
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(D.prefill_groups(enc["attention_mask"].sum(-1).tolist())) > 1
    with torch.inference_mode():
        ref = model.generate(**enc, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                       pad_token_id=tok.pad_token_id))
    ref_new = ref[:, enc["input_ids"].shape[1]:]
    ours = D.decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=8, eos_ids=_eos_ids(model, tok),
                    pad_id=tok.pad_token_id, do_sample=False)
    for a, b in zip(ours.tolist(), ref_new.tolist(), strict=True):
        assert a[: len(b)] == b and all(t == tok.pad_token_id for t in a[len(b):])


def test_nucleus_is_transformers_top_p():
    """The kept tokens and their renormalised probabilities equal TopPLogitsWarper's, also when the
    nucleus needs more than FIRST_TOP_K tokens (a flat distribution)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    vocab = 1000
    logits = torch.cat([torch.randn(6, vocab) * 4, torch.randn(2, vocab) * 0.01])  # peaked rows, then flat ones
    for temperature, top_p in ((0.8, 0.95), (1.0, 0.5), (1.3, 1.0)):
        warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        expected = torch.softmax(warped, dim=-1)
        top, idx = D.nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
        ours = torch.zeros(logits.shape).scatter(-1, idx, top)
        ours = ours / ours.sum(-1, keepdim=True)
        assert torch.allclose(ours, expected, atol=1e-6), (temperature, top_p)
    assert D.nucleus(torch.softmax(logits[6:], -1), 0.95)[0].shape[-1] > D.FIRST_TOP_K


def test_sampling_is_seeded_and_shares_the_prefill(tiny):
    model, tok, enc = tiny
    kw = dict(max_new_tokens=6, eos_ids=_eos_ids(model, tok), pad_id=tok.pad_token_id, do_sample=True,
              temperature=1.0, top_p=0.9, num_return_sequences=3)
    torch.manual_seed(5)
    a = D.decode(model, enc["input_ids"], enc["attention_mask"], **kw)
    torch.manual_seed(5)
    b = D.decode(model, enc["input_ids"], enc["attention_mask"], **kw)
    torch.manual_seed(6)
    c = D.decode(model, enc["input_ids"], enc["attention_mask"], **kw)
    assert a.shape == (3 * len(PROMPTS), 6) and torch.equal(a, b) and not torch.equal(a, c)
    # Each prompt's three samples start from its own prompt: the first token's distribution is the
    # prompt's, so with top_p this small the first tokens of one prompt's samples are in its nucleus.
    with torch.inference_mode():
        first = model(**enc).logits[:, -1]
    for p in range(len(PROMPTS)):
        _, idx = D.nucleus(torch.softmax(first[p : p + 1], -1), 0.9)
        allowed = set(idx[0][D.nucleus(torch.softmax(first[p : p + 1], -1), 0.9)[0][0] > 0].tolist())
        assert {int(a[3 * p + s, 0]) for s in range(3)} <= allowed


def test_cache_capacity_is_enforced():
    layer = D.PreallocatedLayer(capacity=4)
    k = torch.zeros(1, 2, 3, 8)
    layer.update(k, k)
    assert layer.get_seq_length() == 3 and layer.keys.shape == (1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="capacity 4"):
        layer.update(k, k)


def test_shared_prefix_is_found_and_moved_first():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8, 9], [5, 6, 7, 1, 2, 3, 4], [pad, 5, 6, 7, 8, 2, 2]])
    mask = (ids != pad).long()
    assert D.shared_prefix(ids, mask) == 3  # 5 6 7: 8 differs in row 1
    assert D.prefix_first(ids, mask, 3).tolist() == [[5, 6, 7, pad, pad, 8, 9], [5, 6, 7, 1, 2, 3, 4],
                                                     [5, 6, 7, pad, 8, 2, 2]]
    assert D.shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert D.shared_prefix(same, torch.ones_like(same)) == 2  # each row keeps a token of its own


def test_the_shared_prefix_path_runs_in_these_tests(tiny):
    """The chat template's system turn is shared by every prompt above, so the greedy and grouped-prefill
    comparisons with model.generate cover encoding it once."""
    _, _, enc = tiny
    assert D.shared_prefix(enc["input_ids"], enc["attention_mask"]) >= D.PREFIX_MIN_TOKENS
