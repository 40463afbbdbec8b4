"""TransformersBackend with a tiny randomly initialised model built here (no download); optional real Gemma."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_archetypes import (
    AnswerCache, Archetypes, Asker, Choice, Distribution, Question, TransformersBackend, local_model_available, survey,
)
from llm_archetypes.examples import isolation_question

from conftest import DEVICE  # one source: the device fixture's value

WORDS = ("a person aged young old in the city cases are low high very this week will they stay home "
         "answer with exactly one of yes no maybe question : , . ( ) to under over 10 50 100 200 per 100,000 "
         "people").split()


def tiny_backend(seed: int = 0, batch_size: int = 16, arch: str = "llama") -> TransformersBackend:
    """A 2-layer Llama (rotary positions) or GPT-2 (absolute positions) with random weights, word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                           pad_token_id=0, bos_token_id=2, eos_token_id=3))
    return TransformersBackend(model, tokenizer, model_id=f"tiny-{arch}-{seed}", batch_size=batch_size,
                               max_new_tokens=3, device=DEVICE)


PROMPTS = [
    "a young person in the city . cases are low . will they stay home ? answer :",
    "old person . answer :",
    "a person aged 50 to under 100 in the city this week . cases are very high , over 200 per 100,000 people . "
    "question : will they stay home this week ? answer with exactly one of yes no maybe . answer :",
    "answer :",
    "will they stay home ? answer :",
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_option_probabilities_sum_to_one_and_batching_is_exact(arch: str) -> None:
    backend = tiny_backend(arch=arch)
    opts = ["yes", "no", "maybe"]
    batched = backend.score(PROMPTS, opts)
    assert batched.shape == (len(PROMPTS), 3)
    torch.testing.assert_close(batched.sum(-1), torch.ones(len(PROMPTS), dtype=torch.float64))
    assert bool((batched > 0).all())
    single = torch.cat([backend.score([p], opts) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    # a prompt's answer depends on the prompt (the random model is not constant)
    assert float((batched - batched[0]).abs().max()) > 1e-4
    small_batches = tiny_backend(batch_size=2, arch=arch).score(PROMPTS, opts)
    torch.testing.assert_close(batched, small_batches, atol=1e-5, rtol=1e-4)
    # reference: full-sequence logits of the unpadded prompt, last position, softmax over the options
    ids = backend.option_token_ids(opts)
    enc = backend.tokenizer(PROMPTS[2], return_tensors="pt").to(backend.device)
    with torch.no_grad():
        ref = torch.softmax(backend.lm(**enc).logits[0, -1, ids].double(), -1).cpu()
    torch.testing.assert_close(batched[2], ref, atol=1e-5, rtol=1e-4)


def test_complete_and_asker_pipeline(tmp_path: Path) -> None:
    backend = tiny_backend()
    texts = backend.complete(PROMPTS[:3])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert backend.tokens > 0
    q = Question("stay", "a {age} person . cases are {cases} . will they stay home ?", Choice(("yes", "no", "maybe")))
    # random weights rarely say an option: the explicit fallback is used and counted
    asker = Asker(backend, max_attempts=2, fallback="maybe", cache=AnswerCache(tmp_path / "t.sqlite"))
    arch = Archetypes.from_attributes({"age": torch.tensor([0, 1, 1, 0])}, ["age"], codebooks={"age": ["young", "old"]})
    df = survey(arch, q, asker, {"cases": "low"})
    assert len(df) == 2 and set(df["status"]) <= {"ok", "retried", "fallback"}
    assert asker.stats.fallbacks == int((df["status"] == "fallback").sum())


def test_distribution_question_through_asker_record_replay(tmp_path: Path) -> None:
    path = tmp_path / "tiny.sqlite"
    q = Question("stay", "a {age} person . cases are {cases} . will they stay home ?", Distribution(("yes", "no")),
                 instruct=False)
    arch = Archetypes.from_attributes({"age": torch.tensor([0, 1, 1])}, ["age"], codebooks={"age": ["young", "old"]})
    rec = survey(arch, q, Asker(tiny_backend(), cache=AnswerCache(path)), {"cases": "high"})

    class Broken(TransformersBackend):
        def score(self, prompts, options):  # type: ignore[override]
            raise AssertionError("replay must not run the model")

    b = tiny_backend()
    broken = Broken(b.lm, b.tokenizer, model_id=b.model, batch_size=b.batch_size, max_new_tokens=b.max_new_tokens)
    rep = survey(arch, q, Asker(broken, cache=AnswerCache(path), mode="replay"), {"cases": "high"})
    assert (rec[["p_yes", "p_no", "score"]].values == rep[["p_yes", "p_no", "score"]].values).all()
    assert abs(rec["p_yes"] + rec["p_no"] - 1).max() < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not local_model_available(), reason="optional extra lpm[local-llm] not installed")
def test_real_gemma_gives_well_formed_distributions() -> None:
    backend = TransformersBackend.gemma(device=DEVICE)
    ages = ["18-29", "65+"]
    arch = Archetypes.from_attributes(
        {"age_band": torch.tensor([0, 1]), "sex": torch.tensor([0, 1]), "borough": torch.tensor([0, 0]),
         "employment": torch.tensor([0, 0])}, ["age_band", "sex", "borough", "employment"],
        codebooks={"age_band": ages, "sex": ["male", "female"], "borough": ["Queens"], "employment": ["employed"]})
    df = survey(arch, isolation_question(), Asker(backend, mode="off"), {"cases": 150.0})
    assert len(df) == 2
    assert ((df["p_yes"] + df["p_no"] - 1).abs() < 1e-6).all()
    assert ((df["p_yes"] > 0) & (df["p_yes"] < 1)).all()
