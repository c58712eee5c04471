"""Sample text from a trained checkpoint (any training layout) in one process, with a KV cache.

    python sample.py --checkpoint runs/a/checkpoints --prompt "def fibonacci(" --max-new-tokens 200

The text is encoded and decoded with the tokenizer the checkpoint carries, that of its run's --data (bytes
for the byte-level corpora, decoded as UTF-8 with replacement; a prepare_data.py directory's bytes with
separator or tokenizer.json), so --data may have moved since. --temperature 0 is greedy decoding.
Contexts longer than the model's max_seq_length are cropped as generate.py describes.

The samples go to stdout (each followed by a dashed line), everything else (checkpoint, device, decoding
path, speed) to stderr: `python sample.py ... > out.txt` keeps only the text.

--fast-decode (auto: on with CUDA, off on the CPU): on, the decoding step has fixed shapes over a static
KV cache (generate.StaticDecoder) and, on CUDA, is compiled and captured in a CUDA graph
(torch.compile mode="reduce-overhead"), so a token costs one graph replay instead of hundreds of kernel
launches; on the CPU the same step runs eagerly (no speed-up: for checking). off: generate.py's growing
cache, one eager forward per token. Both give the same tokens for the same logits and seed.
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
from generate import StaticDecoder, generate
from model import GPT, ModelConfig
from moe_layers import grouped_mm_available
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
    p.add_argument("--fast-decode", choices=["auto", "on", "off"], default="auto",
                   help="static KV cache and a decode step captured in a CUDA graph (torch.compile, on CUDA; "
                        "eager on the CPU); off: the plain growing cache; auto: on with CUDA, off on the CPU")
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
    cfg = ModelConfig.from_dict({**meta["model"], "moe_expert_impl": "auto"})
    model = GPT(cfg, Topology(device=device))
    model.load_state_dict(state)
    return model.to(device).eval()


# New tokens of the warm-up run (after StaticDecoder.warm_up on the compiled path): the prompt's prefill and
# a few steps, so that kernel compilation (Triton) and CUDA start-up are done before the timed run.
WARMUP_TOKENS = 5


def say(msg: str) -> None:
    """Metadata and speed: stderr, so that stdout holds only the samples."""
    print(msg, file=sys.stderr, flush=True)


def cudagraph_skips() -> int:
    """How many compiled graphs torch.compile ran without a CUDA graph in this process (the reason is
    logged under TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def decode_capturable(model: GPT, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch.compile can trace a decode step as one graph: every MoE layer's experts run as a
    grouped GEMM (sync-free) in bf16, the one dtype its compiled form takes (moe_layers). Elsewhere (fp32,
    or a GPU below sm90) the experts run outside the graph: the loop reads group sizes back to the host."""
    probe = torch.empty(0, dtype=dtype, device=device)
    cfg = model.cfg
    return all(moe.experts.impl != "loop" and dtype == torch.bfloat16
               and grouped_mm_available(probe, cfg.hidden_size, cfg.expert_ffn_size)
               for moe in model.moe_layers().values())


def fast_decoder(model: GPT, batch_size: int, max_tokens: int, temperature: float,
                 top_k: int) -> tuple[StaticDecoder, str]:
    """A StaticDecoder built under the current autocast; on CUDA its steps compiled with CUDA graphs.
    Returns it and a description of the path for the header."""
    decoder = StaticDecoder(model, batch_size, max_tokens, temperature, top_k)
    device = model.rope_cos.device
    if device.type != "cuda":
        return decoder, "static KV cache, eager (no CUDA graphs on the CPU)"
    one_graph = decode_capturable(model, decoder.dtype, device)
    # fullgraph: a graph break would leave a slower, partly eager step without saying so; where the expert
    # loop breaks it anyway, the pieces around it are still captured.
    decoder.compile_steps(mode="reduce-overhead", fullgraph=one_graph, dynamic=False)
    return decoder, ("static KV cache, decode step and window rebuild compiled and captured in CUDA graphs"
                     if one_graph else "static KV cache, decode step and window rebuild compiled with graph "
                                       "breaks (the MoE expert loop syncs)")


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
        except (TypeError, ValueError, RuntimeError) as e:  # a config field or a tensor this code does not know
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
    fast = args.fast_decode == "on" or (args.fast_decode == "auto" and device.type == "cuda")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if fast:
            decoder, how = fast_decoder(model, prompt.shape[0], prompt.shape[1] + max(args.max_new_tokens, WARMUP_TOKENS),
                                        args.temperature, args.top_k)
            run = lambda new, g: decoder.generate(prompt, new, g)
        else:
            how = "plain KV cache, eager"
            run = lambda new, g: generate(model, prompt, new, args.temperature, args.top_k, g)
        say(f"checkpoint {path} (step {meta['step']}), device {device}"
            f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}, decoding: {how}")
        # A warm-up with its own generator: compilation (torch.compile, Triton), CUDA graph capture and CUDA
        # start-up are one-time costs that would otherwise dominate the tokens/s of a short sample; the samples
        # themselves are unchanged.
        start = time.perf_counter()
        if fast and decoder.compiled:
            decoder.warm_up()  # the compiled steps, the rebuild included, traced, recorded and replayed
        run(WARMUP_TOKENS, torch.Generator(device=device).manual_seed(0)).tolist()
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        rows = run(args.max_new_tokens, gen).tolist()  # waits for the device
        seconds = time.perf_counter() - start
    if fast and decoder.compiled and cudagraph_skips():
        say("warning: torch.compile did not capture the decode step in a CUDA graph (TORCH_LOGS=cudagraphs says why)")

    for row in rows:
        print(codec.decode(row))
        print("---------------")
    sys.stdout.flush()
    n = args.num_samples * args.max_new_tokens
    say(f"{n} tokens in {seconds:.3f} s: {n / seconds:,.1f} tokens/s, {1000 * seconds / args.max_new_tokens:.3f} ms "
        f"per step of {args.num_samples} token{'s' if args.num_samples > 1 else ''} ({args.num_samples} x "
        f"{args.max_new_tokens}, prompt {prompt.shape[1]} tokens, prefill included, after a {WARMUP_TOKENS}-token "
        f"warm-up of {warmup_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
