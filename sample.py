"""Sample text from a trained checkpoint (any training layout) in one process, with a KV cache.

    python sample.py --checkpoint runs/a/checkpoints --prompt "def fibonacci(" --max-new-tokens 200

The text is encoded and decoded with the tokenizer the checkpoint carries, that of its run's --data (bytes
for the byte-level corpora, decoded as UTF-8 with replacement; a prepare_data.py directory's bytes with
separator or tokenizer.json), so --data may have moved since. --temperature 0 is greedy decoding.
Contexts longer than the model's max_seq_length are cropped as generate.py describes.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import checkpoint
from data import BYTE_VOCAB, ByteCodec, DataError, codec_from_description, text_codec
from errors import InputError, OneLineParser
from generate import generate
from model import GPT, ModelConfig
from parallel import Topology


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Generate text from a checkpoint of minimal_pretrain.py.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, or a checkpoint-dir (its newest complete checkpoint is used)")
    p.add_argument("--prompt", default="\n", help="text the samples continue (default: %(default)r, a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy: the most likely token)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens only (0 = all)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    p.add_argument("--num-samples", type=int, default=1, help="samples, generated together as one batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA if available (bf16 autocast), else CPU (fp32)")
    return p


def validate(args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0 = no restriction), got {args.top_k}")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise InputError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.prompt == "":
        raise InputError("--prompt must not be empty (the default is a newline)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")


def checkpoint_codec(path: Path, meta: dict):
    """The codec that decodes the checkpoint's tokens. A checkpoint carries it (its manifest's `codec`, and
    the tokenizer.json copied next to it). One written before checkpoints did falls back to its run's
    --data, only if that is still there and gives the model's vocabulary: a moved BPE directory would
    otherwise decode as bytes, i.e. garbage. Raises InputError (one line, exit 2) when it cannot decode."""
    cannot = f"--checkpoint {path}: cannot decode its tokens"
    model_vocab = meta["model"]["vocab_size"]
    if "codec" in meta:
        try:
            codec = codec_from_description(meta["codec"], path, cannot)
        except DataError as e:
            raise InputError(str(e)) from None
    else:
        data = meta["args"].get("data")
        old = "it was written before checkpoints carried their tokenizer"
        if data is not None and not Path(data).exists():
            raise InputError(f"{cannot}: {old}, and its run's --data {data} is gone (put it back there)")
        try:
            codec = text_codec(data)
        except DataError as e:
            raise InputError(f"{cannot}: {old}, and its run's {e}") from None
        # What this tokenizer gives the model (plain bytes: 256; else --vocab-size or the tokenizer's rounded
        # up to 64, as load_corpus does); a directory re-prepared since then gives another.
        plain_bytes = isinstance(codec, ByteCodec) and codec.separator_id is None
        expected = BYTE_VOCAB if plain_bytes else meta["args"].get("vocab_size") or -(-codec.vocab_size // 64) * 64
        if expected != model_vocab:
            raise InputError(f"{cannot}: {old}, and its run's --data {data} now gives a vocabulary of {expected}, "
                              f"not the model's {model_vocab}")
    # The model's vocabulary may be larger than the tokenizer's (padded to a multiple of 64), not smaller.
    if codec.vocab_size > model_vocab:
        raise InputError(f"{cannot}: the model's vocabulary ({model_vocab}) is smaller than its tokenizer's "
                          f"{codec.vocab_size} tokens")
    return codec


def load_model(meta: dict, state: dict, device: torch.device) -> GPT:
    """The whole model on one device from a consolidated (unsharded) state."""
    # The expert kernel is a choice of the machine, not part of the model: let this one pick.
    cfg = ModelConfig(**{**meta["model"], "moe_expert_impl": "auto"})
    model = GPT(cfg, Topology(device=device))
    model.load_state_dict(state)
    return model.to(device).eval()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        path = checkpoint.resolve_checkpoint(args.checkpoint, flag="--checkpoint")
        meta, state = checkpoint.load_consolidated(path)
        codec = checkpoint_codec(path, meta)
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        try:
            model = load_model(meta, state, device)
        except (TypeError, RuntimeError) as e:  # a config field or a tensor this code does not know
            raise InputError(f"--checkpoint {path}: cannot build its model here "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except checkpoint.CheckpointError as e:  # its messages start with the path (a subclass: caught first)
        print(f"error: --checkpoint {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    prompt = torch.tensor([codec.encode(args.prompt)] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"checkpoint {path} (step {meta['step']}), device {device}"
          f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}")

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # A 2-token warm-up with its own generator: kernel compilation (Triton) and CUDA start-up are one-time
        # costs that would otherwise dominate the tokens/s of a short sample; the samples themselves are unchanged.
        generate(model, prompt, 2, args.temperature, args.top_k, torch.Generator(device=device).manual_seed(0)).tolist()
        start = time.perf_counter()
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, gen)
        rows = out.tolist()  # waits for the device
        seconds = time.perf_counter() - start

    for row in rows:
        print(codec.decode(row))
        print("---------------")
    n = args.num_samples * args.max_new_tokens
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:,.1f} tokens/s "
          f"({args.num_samples} x {args.max_new_tokens}, prompt {prompt.shape[1]} tokens, prefill included, after a "
          f"2-token warm-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
