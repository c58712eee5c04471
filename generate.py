"""Autoregressive sampling from a GPT (whole model, one process) with a KV cache.

The prompt is fed once (prefill); every later step feeds only the newest token, which attends over the
cached keys and values, so a step costs one token's forward plus attention over the context held.

Context longer than max_seq_length: the rotary tables and the training length stop at T =
max_seq_length, so the model never sees more than T tokens. A prompt longer than T is cropped to its last
T tokens (as nanoGPT crops). When the cache is full, the context is cropped to its last T // 2 tokens and
the cache is rebuilt from them with one prefill; decoding then goes on incrementally. So a token past the
first window is conditioned on between T // 2 and T - 1 preceding tokens, and the rebuilds add about one
token's forward per generated token on average (a T // 2 prefill every T // 2 tokens). Cropping to the
last T tokens at every step would condition on more but recompute the whole window for each token.
"""
from __future__ import annotations

from typing import Optional

import torch

from model import GPT, KVCache


def draw_noise(shape: tuple, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The random numbers of one sampling step: Exp(1) noise [b, V] in fp32. Another decoding path that
    draws the same shape, dtype and device from the same generator gets the same numbers."""
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)


def sample_with_noise(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                      noise: torch.Tensor) -> torch.Tensor:
    """logits [b, V], noise [b, V] (Exp(1), from draw_noise) -> next token ids [b, 1], sampled from
    softmax(logits / temperature) restricted to the top_k most likely tokens when top_k is set (> 0).

    The exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent is token i with probability
    p_i (the Gumbel-max trick, since -log E_i is Gumbel). Unlike torch.multinomial it is plain tensor
    arithmetic on noise drawn beforehand, so a compiled, graph-captured step can sample without a
    generator inside it and without reading anything back to the host."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Exp(1) noise can be exactly 0 (probability ~2^-24): 0 / 0 would be NaN, which argmax would pick.
    return (logits.softmax(dim=-1) / noise.clamp_min(torch.finfo(torch.float32).tiny)).argmax(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [b, V] -> next token ids [b, 1]. temperature 0: greedy (argmax, no random numbers drawn);
    otherwise sample_with_noise with fresh noise from the generator."""
    if temperature == 0:
        return logits.float().argmax(dim=-1, keepdim=True)
    return sample_with_noise(logits, temperature, top_k, draw_noise(logits.shape, logits.device, generator))


@torch.no_grad()
def generate(model: GPT, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ids [b, n] (n >= 1) on the model's device -> [b, n + max_new_tokens]: the prompt followed by the
    sampled tokens. The model runs in eval mode (no dropout, no routing statistics) and is put back in
    its previous mode afterwards."""
    T = model.cfg.max_seq_length
    b, n = ids.shape
    out = torch.empty(b, n + max_new_tokens, dtype=ids.dtype, device=ids.device)  # filled in place
    out[:, :n] = ids
    keep = max(1, T // 2)
    cache = KVCache(T)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(ids[:, max(0, n - T):], kv_cache=cache)  # prefill, the prompt's last T tokens
        for i in range(n, n + max_new_tokens):
            out[:, i:i + 1] = sample_next(logits[:, -1], temperature, top_k, generator)
            if i == n + max_new_tokens - 1:
                break  # the last token needs no forward
            if cache.pos == T:  # full: rebuild from the last T // 2 tokens (see the module docstring)
                cache.reset()
                logits, _ = model(out[:, i + 1 - keep:i + 1], kv_cache=cache)
            else:
                logits, _ = model(out[:, i:i + 1], kv_cache=cache)
    finally:
        model.train(was_training)
    return out
