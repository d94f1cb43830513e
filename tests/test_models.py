"""Locally built models load in transformers and vLLM exactly as hub models do."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from rlhf_cluster.lib import tiny_models as models
from rlhf_cluster.lib.algorithms import sequence_token_logprobs
from rlhf_cluster.lib.data import encode_prompt


def test_tiny_is_a_llama2_shaped_model(builtin_assets):
    cfg = json.loads((builtin_assets.base / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_act"] == "silu"  # SwiGLU
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]                      # GQA
    assert "rope_parameters" in cfg or "rope_theta" in cfg                               # RoPE
    model = AutoModelForCausalLM.from_pretrained(builtin_assets.base)
    assert models.count_parameters(model) < 1_000_000
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_small_size_is_about_24m_parameters(tokenizer):
    with torch.device("meta"):
        small = LlamaForCausalLM(models.llama_config("small", tokenizer))
    assert 22e6 < models.count_parameters(small) < 26e6


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--size must be one of"):
        models.build_tiny(tmp_path, size="huge")


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--family must be one of"):
        models.build_tiny(tmp_path, family="gpt5")


@pytest.mark.parametrize("family", sorted(set(models.FAMILIES) - {"llama"}))
def test_every_family_is_its_own_hf_architecture(family, tokenizer):
    """The configs are the families' own (what tests/test_architectures.py trains through every stage)."""
    cfg = models.model_config("tiny", tokenizer, family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        reward = AutoModelForSequenceClassification.from_config(models.model_config("tiny", tokenizer, family,
                                                                                    num_labels=1))
    assert cfg.model_type == family and type(model).__name__.lower().startswith(family.split("_")[0])
    assert reward.config.num_labels == 1 and reward.score.out_features == 1
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == cfg.tie_word_embeddings
    assert models.count_parameters(model) < 1_000_000


def test_transformers_round_trip(builtin_assets):
    tok = AutoTokenizer.from_pretrained(builtin_assets.base)
    text = "List 3 fruits. apple, pear, plum."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE is lossless
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "<s><|user|>hi</s><|assistant|>"
    model = AutoModelForCausalLM.from_pretrained(builtin_assets.base)
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "List 3 fruits."}])])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5) or out[0, -1].item() == tok.eos_token_id
    rm = AutoModelForSequenceClassification.from_pretrained(builtin_assets.reward_base)
    scores = rm(input_ids=ids).logits
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()


@pytest.mark.vllm
def test_vllm_generates_and_agrees_with_transformers(builtin_assets, vllm_engine, tokenizer):
    """vLLM's log-probs of the tokens it sampled equal the HF model's (fp32)."""
    from rlhf_cluster.lib.config import RolloutConfig
    from rlhf_cluster.lib.generation import generate, sampling_params

    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p}])
               for p in ("List 3 fruits.", "Count from 2 to 6.")]
    cfg = RolloutConfig(max_new_tokens=8, samples_per_prompt=2)
    samples = generate(vllm_engine, prompts, sampling_params(cfg, seed=1))
    assert len(samples) == 4 and [s.prompt_index for s in samples] == [0, 0, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(builtin_assets.base).eval()
    for s in samples:
        assert 1 <= len(s.response_ids) <= 8 and len(s.logprobs) == len(s.response_ids)
        # vLLM's incremental detokenizer holds back an unfinished UTF-8 byte sequence at the end
        assert tokenizer.decode(s.response_ids, skip_special_tokens=True).startswith(s.text)
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            hf = sequence_token_logprobs(model, ids, torch.ones_like(ids))[0, len(s.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(s.logprobs), hf, atol=2e-3, rtol=0)


def test_merged_lora_weights_equal_peft_merge(builtin_assets):
    """The weights the trainer syncs to vLLM and exports for a LoRA policy are peft's merge."""
    from rlhf_cluster.lib.config import LoraConfig
    from rlhf_cluster.lib.deepspeed_setup import merged_lora_state_dict, with_lora

    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])
    model = with_lora(AutoModelForCausalLM.from_pretrained(builtin_assets.base), lora, "CAUSAL_LM")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: make the adapters do something
    state = {k: v.clone() for k, v in model.named_parameters()}
    merged = merged_lora_state_dict(state, lora.alpha, lora.rank)
    expected = {k: v for k, v in model.merge_and_unload().named_parameters()}
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    base = dict(AutoModelForCausalLM.from_pretrained(builtin_assets.base).named_parameters())
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])
