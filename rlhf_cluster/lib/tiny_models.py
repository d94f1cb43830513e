"""Models built locally, for machines with no model hub: Llama (the built-in task's), and the other families
people fine-tune today at the same scale (FAMILIES: Qwen2 with tied embeddings, Qwen3, Mistral, Gemma 2, Gemma 3).

    python -m rlhf_cluster.lib.tiny_models build-tiny OUT [--size tiny|small] [--seed 0] [--family llama]

writes two ordinary Hugging Face directories sharing one tokenizer:
    OUT/base         a causal LM, e.g. LlamaForCausalLM (the "pretrained" policy to post-train)
    OUT/reward_base  the family's ForSequenceClassification with one output (a reward model to train)
Both load with `from_pretrained` and in vLLM exactly like hub models; nothing downstream
knows they are small. The tokenizer is a byte-level BPE trained with `tokenizers` on the
built-in task's text, with a chat template in the HF format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf_cluster.lib import task
from rlhf_cluster.lib.files import replaced_dir

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is <|role|>content</s>; generation starts after <|assistant|> and stops at </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Llama 2 shape (RMSNorm, SwiGLU, RoPE, grouped-query attention), scaled down.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
}
VOCAB_SIZE = 512
MAX_POSITIONS = 256
# HF model_type -> what the family sets beyond SIZES; each keeps what sets it apart from Llama in the code paths it
# takes (tests/test_architectures.py runs each through SFT, RM, DPO and PPO with vLLM weight sync).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},  # q/k/v projection biases; tied embeddings, as the small Qwen2 models
    "qwen3": {"head_dim": 32},  # RMSNorm on queries and keys
    "mistral": {"sliding_window": None},
    "gemma2": {"head_dim": 32, "tie_word_embeddings": True},  # soft-capped logits, scaled embeddings, GeGLU
    "gemma3_text": {"head_dim": 32, "tie_word_embeddings": True},  # + q/k norms, local/global attention layers
}


def train_tokenizer(lines: list[str], vocab_size: int = VOCAB_SIZE,
                    split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `lines`; `split_digits`: every digit its own token (Llama's choice for numbers)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=MAX_POSITIONS,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def llama_config(size: str, tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **SIZES[size],
        **extra,
    )


def _check(size: str, family: str) -> None:
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {sorted(FAMILIES)}, got {family!r}")


def model_config(size: str, tokenizer: PreTrainedTokenizerFast, family: str = "llama", **extra):
    """The config of a `family` model (FAMILIES) of `size` (SIZES) over `tokenizer`."""
    _check(size, family)
    if family == "llama":
        return llama_config(size, tokenizer, **extra)
    return AutoConfig.for_model(family, vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **SIZES[size], **FAMILIES[family], **extra)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Written beside `out`, then renamed: a crash never leaves half a model."""
    with replaced_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def build_tiny(out: Path, size: str = "tiny", seed: int = 0, corpus: list[str] | None = None,
               split_digits: bool = False, family: str = "llama") -> dict[str, Path]:
    """Random-weight models of `family` and a tokenizer trained on `corpus` (default: the built-in helpful task's
    text)."""
    _check(size, family)  # before the tokenizer is trained
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(task.corpus(seed) if corpus is None else corpus, split_digits=split_digits)
    if family == "llama":  # exactly as the built-in assets have been built (their caches stay valid)
        base = LlamaForCausalLM(llama_config(size, tokenizer))
        reward = LlamaForSequenceClassification(llama_config(size, tokenizer, num_labels=1))
    else:
        base = AutoModelForCausalLM.from_config(model_config(size, tokenizer, family))
        reward = AutoModelForSequenceClassification.from_config(model_config(size, tokenizer, family, num_labels=1))
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    paths = {"base": out / "base", "reward_base": out / "reward_base"}
    out.mkdir(parents=True, exist_ok=True)
    _save(base, tokenizer, paths["base"])
    _save(reward, tokenizer, paths["reward_base"])
    return paths


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlhf_cluster.lib.tiny_models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-tiny", help="build a tokenizer and Llama models locally")
    b.add_argument("out", type=Path)
    b.add_argument("--size", choices=sorted(SIZES), default="tiny")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = ap.parse_args(argv)
    paths = build_tiny(args.out, args.size, args.seed, family=args.family)
    for name, path in paths.items():
        cfg = json.loads((path / "config.json").read_text())
        print(f"{name}: {path} ({cfg['architectures'][0]}, hidden {cfg['hidden_size']}, "
              f"{cfg['num_hidden_layers']} layers)")


if __name__ == "__main__":
    main()
