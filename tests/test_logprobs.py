"""Log-probs and entropies a chunk of tokens at a time (rlhf_cluster/lib/logprobs.py) against the full-logits path
they replace (`model(...).logits`, then losses.logprobs_from_logits and algorithms.entropy_from_logits): the same
values and the same gradients (of the hidden states, the output weight and every parameter of a model), to 1e-5 in
fp32, for every supported family (tied and untied embeddings, Gemma 2's soft-capped logits), padded and packed rows,
LoRA with and without an adapted output layer, and under a real 2-rank DeepSpeed ZeRO-3 engine."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_cluster.lib.algorithms import entropy_from_logits
from rlhf_cluster.lib.logprobs import chunked_logprobs, default_chunk, model_logprobs
from rlhf_cluster.lib.losses import logprobs_from_logits
from rlhf_cluster.lib.packing import packed_batch, place
from rlhf_cluster.lib.tiny_models import FAMILIES, SIZES

VOCAB = 300
LENGTHS = (9, 5, 12, 3)  # 4 sequences: padded, one per row; packed, two per row
ROWS = {"padded": [[0], [1], [2], [3]], "packed": [[0, 1], [2, 3]]}


def _full(hidden, weight, labels, bias=None, softcap=None):
    """The old way: the whole [N, V] logits, then log-softmax and entropy over them (in fp32, as the old functions
    cast; fp64 inputs stay fp64, to check the math exactly)."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if z.dtype == torch.float64:
        logp = torch.log_softmax(z, dim=-1)
        return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    return logprobs_from_logits(z, labels), entropy_from_logits(z)


def _grads(fn, tensors, weights):
    """Values of fn() and the gradients of Σ w_i · out_i (a loss using both outputs) wrt `tensors`."""
    for t in tensors:
        t.grad = None
    outs = fn()
    sum((w * o).sum() for w, o in zip(weights, outs)).backward()
    return [o.detach() for o in outs], [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_values_and_gradients_equal_the_full_logits(softcap, dtype, tol):
    """37 tokens in chunks of 8 (the last one short) and of 37; gradients of hidden, weight and bias."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 100
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=g, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(v, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    w = [torch.randn(n, generator=g, dtype=dtype) / n for _ in range(2)]
    want, want_grads = _grads(lambda: _full(hidden, weight, labels, bias, softcap),
                              [hidden, weight, bias], w)
    for chunk in (8, n):
        got, got_grads = _grads(lambda c=chunk: chunked_logprobs(hidden, weight, labels, bias, softcap, True, c),
                                [hidden, weight, bias], w)
        for a, b in zip(got + got_grads, want + want_grads):
            torch.testing.assert_close(a, b, atol=tol, rtol=0)
    # log-probs alone (no entropy asked for, or its gradient unused) and entropy alone
    lp, _ = _grads(lambda: (chunked_logprobs(hidden, weight, labels, bias, softcap, False, 8)[0],), [hidden], w[:1])
    torch.testing.assert_close(lp[0], want[0], atol=tol, rtol=0)
    _, only_entropy = _grads(lambda: (chunked_logprobs(hidden, weight, labels, bias, softcap, True, 8)[1],),
                             [hidden, weight], w[1:])
    _, want_entropy = _grads(lambda: (_full(hidden, weight, labels, bias, softcap)[1],),
                             [hidden, weight], w[1:])
    for a, b in zip(only_entropy, want_entropy):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)


def test_default_chunk_keeps_one_fp32_block_near_256_mib():
    assert default_chunk(151_936) == 441  # Qwen's vocabulary
    assert default_chunk(512) == 131_072  # the built-in models' whole micro-batch: one chunk


def _model(family: str, lora: dict | None = None):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                               **SIZES["tiny"], **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(cfg)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters count
                torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(layout: str):
    g = torch.Generator().manual_seed(1)
    return packed_batch([torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS], ROWS[layout], 0)


def _both_paths(model, b, chunk_size=7):
    """(old, new): each the log-probs, entropies and every parameter's gradient of one loss on both outputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    mask = place(b, [[1.0] * (n - 1) for n in LENGTHS], b.input_ids.shape[1] - 1)  # each sequence's own tokens

    def old():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        return logprobs_from_logits(logits[:, :-1], b.input_ids[:, 1:]), entropy_from_logits(logits[:, :-1])

    def new():
        return model_logprobs(model, b.input_ids, b.attention_mask, b.position_ids, True, chunk_size)

    w = [0.3 * mask, 0.1 * mask]
    return _grads(old, params, w), _grads(new, params, w)


def _assert_same(old, new):
    for a, b in zip(old[0], new[0]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for a, b in zip(old[1], new[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", list(ROWS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gives_the_full_logits_numbers(family, layout):
    """Chunks of 7 tokens (not a divisor of any row's width); tied embeddings (qwen2, gemma2, gemma3_text) get one
    gradient from both their uses; Gemma 2 soft-caps its logits; packed rows restart their positions. The
    no-gradient path (what the reference and the old log-probs take) gives the same values."""
    model = _model(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == FAMILIES[family].get("tie_word_embeddings", False)
    b = _batch(layout)
    old, new = _both_paths(model, b)
    _assert_same(old, new)
    with torch.no_grad():
        lp, entropy = model_logprobs(model, b.input_ids, b.attention_mask, b.position_ids, True)
    torch.testing.assert_close(lp, old[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, old[0][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [{"target_modules": ["q_proj", "v_proj"]},
                                  {"target_modules": ["q_proj", "lm_head"]},
                                  {"target_modules": ["lm_head"], "lora_dropout": 0.2}],
                         ids=["layers", "layers-and-head", "head-with-dropout"])
def test_lora_wrapped_models_with_and_without_an_adapted_head(family, lora):
    """PEFT's LoRA on the layers only, and on the output layer (W x + s B A x; tied in qwen2): the adapters' and
    the rest's gradients equal the full-logits path's. With dropout, in eval mode (train mode draws other masks)."""
    model = _model(family, lora)
    model.train(lora.get("lora_dropout", 0.0) == 0.0)
    old, new = _both_paths(model, _batch("packed"), chunk_size=5)
    _assert_same(old, new)


def test_bf16_matches_the_full_logits_to_bf16_precision():
    model = _model("llama").to(torch.bfloat16)
    old, new = _both_paths(model, _batch("padded"))
    for a, b in zip(old[0], new[0]):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)


@pytest.mark.ray
def test_zero3_two_ranks_give_the_full_logits_values_gradients_and_steps(ray_cluster):
    """Two ranks of a real DeepSpeed ZeRO-3 engine (gloo, CPU): the output layer is a partitioned parameter, gathered
    by its module's hooks for the chunks and again for their backward. Three optimiser steps on the chunked path and
    on the full-logits path from the same weights: the same log-probs, entropies, full gradients and losses. Untied
    (llama), and tied with LoRA on the output layer (qwen2)."""
    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.lib.config import GroupResources
    from tests.workers import LogprobPaths

    group = ActorGroup(LogprobPaths, GroupResources(num_ranks=2, num_cpus_per_rank=0.25), name="logprob-paths",
                       env={"RLHF_TORCH_THREADS": "1"})
    try:
        for case in ({"family": "llama"}, {"family": "qwen2", "lora": ["q_proj", "lm_head"]}):
            for diffs in ray.get([a.compare.remote(**case) for a in group.actors]):
                assert max(diffs.values()) < 1e-5, (case, diffs)
    finally:
        group.shutdown()
