"""Make a tiny random-weight Llama in HuggingFace format, so tests and the demo never touch a model hub.

The weights are random but deterministic for a seed, and scaled so greedy decoding has clear winners (large logit
gaps), which keeps greedy outputs identical across TP widths whose all-reduce orders differ. The tokenizer is a
byte-level BPE trained here on an embedded corpus.

    python -m sglang_ft.tools.make_tiny_model OUT_DIR [--num-layers L] [--hidden-size H] ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = (
    "the a an of to in and is was for on that with as by at from it be this are or which not have has had but "
    "model server token request worker rank tensor parallel group heads cache prefix radix failure heartbeat "
    "epoch recover restart reload weights bytes memory batch decode prefill latency throughput stream queue "
    "gpu cpu node link store backup block page layer attention linear embedding vocabulary norm rotary "
    "red green blue yellow river mountain city ocean forest quiet bright swift slow happy calm storm light "
    "one two three four five six seven eight nine ten hundred thousand first second third last next "
    "write read send receive answer question tell story about every people time year way day thing world"
).split()


def build_corpus(seed: int, num_sentences: int = 4000) -> list[str]:
    """Deterministic pseudo-English sentences: enough text for the BPE trainer to learn a few hundred merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ".", "?", "!", ","]) + f" {rng.randint(0, 999)}")
    return lines


def train_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE of exactly `vocab_size` tokens (filler tokens pad it if the corpus runs out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise SystemExit(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS) + 1} for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(seed), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
MOE_OF = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}  # what --moe turns an architecture into


def _model_classes(architecture: str):
    import transformers

    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "mixtral": "Mixtral",
              "qwen2_moe": "Qwen2Moe"}[architecture]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def _moe_fields(args: argparse.Namespace) -> dict:
    """Config fields of the mixture of experts: Mixtral's experts are `intermediate_size` wide; Qwen2-MoE's are
    `moe_intermediate_size` wide, beside a gated shared expert."""
    if args.architecture == "mixtral":
        return {"num_local_experts": args.num_experts, "num_experts_per_tok": args.num_experts_per_tok}
    if args.architecture == "qwen2_moe":
        return {"num_experts": args.num_experts, "num_experts_per_tok": args.num_experts_per_tok,
                "moe_intermediate_size": args.intermediate_size, "norm_topk_prob": False,
                "shared_expert_intermediate_size": args.shared_expert_intermediate_size,
                "decoder_sparse_step": 1, "mlp_only_layers": []}
    return {}


def make_model(args: argparse.Namespace):
    """A Llama-family causal LM (Llama, Mistral, Qwen2, Mixtral or Qwen2-MoE layout) with seeded, deliberately peaked
    random weights."""
    import torch

    config_cls, model_cls = _model_classes(args.architecture)
    config = config_cls(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="float32",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **_moe_fields(args),
    )
    if args.architecture in ("mistral", "mixtral"):
        config.sliding_window = None  # full attention, like SGLang's Llama path
    torch.manual_seed(args.seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                if name.endswith(".bias"):  # Qwen2's q/k/v biases
                    param.normal_(0.0, 0.1)
                continue  # RMSNorm weights stay at one
            fan_in = param.shape[-1]  # [out, in], or [experts, out, in] for fused expert weights
            std = 1.0 if "embed_tokens" in name else (4.0 if "lm_head" in name else 1.0) / fan_in**0.5
            param.normal_(0.0, std)
    model.generation_config.do_sample = False
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sglang_ft.tools.make_tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write config.json, model.safetensors, tokenizer")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--intermediate-size", type=int, default=160)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--num-key-value-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="llama",
                        help="config and weight layout: llama (default), mistral, qwen2 (q/k/v biases), or the mixtures "
                             "of experts mixtral and qwen2_moe (with a shared expert)")
    parser.add_argument("--moe", action="store_true",
                        help="make the architecture's mixture-of-experts form: llama or mistral -> mixtral, qwen2 -> "
                             "qwen2_moe; --intermediate-size is then one expert's width")
    parser.add_argument("--num-experts", type=int, default=None, help="routed experts per layer (MoE; default 4)")
    parser.add_argument("--num-experts-per-tok", type=int, default=None, help="experts per token (MoE; default 2)")
    parser.add_argument("--shared-expert-intermediate-size", type=int, default=None,
                        help="qwen2_moe's shared expert width, a multiple of --intermediate-size (default twice it)")
    args = parser.parse_args(argv)
    if args.moe:
        args.architecture = MOE_OF.get(args.architecture, args.architecture)
    moe = args.architecture in ("mixtral", "qwen2_moe")
    for flag in ("num_experts", "num_experts_per_tok", "shared_expert_intermediate_size"):
        if getattr(args, flag) is not None and not moe:
            parser.error(f"--{flag.replace('_', '-')} needs --moe (or a mixture-of-experts --architecture)")
    if args.shared_expert_intermediate_size is not None and args.architecture != "qwen2_moe":
        parser.error("--shared-expert-intermediate-size is for qwen2_moe (Mixtral has no shared expert)")
    if moe:
        if args.num_experts is not None and args.num_experts <= 0:
            parser.error("--num-experts must be positive")
        args.num_experts = 4 if args.num_experts is None else args.num_experts
        args.num_experts_per_tok = 2 if args.num_experts_per_tok is None else args.num_experts_per_tok
        if args.architecture == "qwen2_moe" and args.shared_expert_intermediate_size is None:
            args.shared_expert_intermediate_size = 2 * args.intermediate_size
        if not 1 <= args.num_experts_per_tok <= args.num_experts:
            parser.error(f"--num-experts-per-tok must be in 1..--num-experts ({args.num_experts}), got "
                         f"{args.num_experts_per_tok}")
    for flag in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "shared_expert_intermediate_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.architecture == "qwen2_moe" and args.shared_expert_intermediate_size % args.intermediate_size:
        parser.error("--shared-expert-intermediate-size must be a multiple of --intermediate-size (the elastic model "
                     "gives every rank the same share of both)")
    if args.hidden_size % args.num_attention_heads:
        parser.error("--hidden-size must be divisible by --num-attention-heads")
    if args.num_attention_heads % args.num_key_value_heads:
        parser.error("--num-attention-heads must be divisible by --num-key-value-heads")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(args.vocab_size, args.seed)
    model = make_model(args)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.out_dir)
    (args.out_dir / "sglang_ft_tiny.json").write_text(json.dumps(vars(args), default=str, indent=1))
    print(f"wrote tiny {args.architecture} ({sum(p.numel() for p in model.parameters())} parameters) to {args.out_dir}")
    return args.out_dir


def ensure_model(path: Path, *flags: str) -> Path:
    """The tiny model at `path`, made with `flags` first if the folder holds none (benchmarks and the demo reuse it)."""
    if not (path / "config.json").exists():
        main([str(path), *flags])
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
