"""Autoregressive sampling from a GPT (whole model, one process) with a KV cache: `generate` (the plain
path: a growing cache, one eager forward per token) and `StaticDecoder` (the fast path: a static cache and
a decode step of fixed shapes, captured in a CUDA graph on CUDA).

The prompt is fed once (prefill); every later step feeds only the newest token, which attends over the
cached keys and values, so a step costs one token's forward plus attention over the context held.

Context longer than max_seq_length: the rotary tables and the training length stop at T =
max_seq_length, so the model never sees more than T tokens. A prompt longer than T is cropped to its last
T tokens (as nanoGPT crops). When the cache is full, the context is cropped to its last T // 2 tokens and
the cache is rebuilt from them with one prefill; decoding then goes on incrementally. So a token past the
first window is conditioned on between T // 2 and T - 1 preceding tokens, and the rebuilds add about one
token's forward per generated token on average (a T // 2 prefill every T // 2 tokens). Cropping to the
last T tokens at every step would condition on more but recompute the whole window for each token.
Both paths follow this policy and draw their random numbers alike (see sample_next), so for the same
logits they pick the same tokens. Their logits agree to rounding, not bit for bit (the static cache's
attention sums over all max_seq_length slots; a compiled step fuses and rounds differently).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from model import GPT, KVCache, StaticKVCache
from parallel import compute_dtype


def draw_noise(shape: tuple, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The random numbers of one sampling step: Exp(1) noise [b, V] in fp32. StaticDecoder draws the same
    numbers into its own buffer (same shape, dtype, device and generator), so both paths consume a
    generator identically."""
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


class StaticDecoder(nn.Module):
    """The fast path of `generate`: the same tokens for the same logits and generator, with every tensor
    a decoding step touches allocated once, so that the step (sample a token from the last logits, feed it,
    keep its logits) has fixed shapes and addresses and can be captured in a CUDA graph.

    State (buffers, never reallocated): a StaticKVCache; `pos` [1], the cache slot of the token fed next;
    `n` [1], the column of `tokens` the next sampled token goes to; `logits` [b, V] fp32, the last fed
    token's logits; `noise` [b, V], the random numbers of the next sampling step; `tokens` [b,
    max_tokens], prompt and samples; `window` [b, T // 2], the tokens a rebuild feeds. The step reads them
    all on the device and advances pos and n there, so a step needs nothing from the host and reads
    nothing back: the host loop only counts.

    compile_steps() wraps the decode step and the window rebuild (a prefill of the last T // 2 tokens:
    one shape every time) in torch.compile (on CUDA: mode="reduce-overhead", which captures each in a CUDA
    graph and replays it; gpt-fast does the same for its decode step); warm_up() then compiles and
    captures them before a timed run. The prompt's prefill (any length) and the last sample of a run run
    eagerly. One decoder serves many runs of up to max_tokens tokens with batch_size rows, the same
    temperature and top_k (another temperature or top_k is another compilation).
    """

    def __init__(self, model: GPT, batch_size: int, max_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not (model.first and model.last):
            raise ValueError("a StaticDecoder needs the whole model in one stage")
        cfg = model.cfg
        device = model.rope_cos.device
        # The cache holds k and v as the attention layers make them: in the autocast dtype under autocast
        # (build the decoder under the autocast it will run under, or pass dtype).
        dtype = dtype or compute_dtype(model.rope_cos)
        self.model, self.dtype = model, dtype
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.temperature, self.top_k = float(temperature), top_k or None
        self.cache = StaticKVCache(list(model.layers.keys()), batch_size, cfg.num_key_value_heads // model.topo.tp,
                                   cfg.max_seq_length, cfg.head_dim, dtype, device)
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("pos", torch.zeros(1, **long), persistent=False)
        self.register_buffer("n", torch.zeros(1, **long), persistent=False)
        self.register_buffer("tokens", torch.zeros(batch_size, max_tokens, **long), persistent=False)
        self.register_buffer("logits", torch.zeros(batch_size, cfg.vocab_size, dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("noise", torch.ones(batch_size, cfg.vocab_size, dtype=torch.float32, device=device),
                             persistent=False)
        self.keep = max(1, cfg.max_seq_length // 2)  # tokens a full window is cropped to (see the module docstring)
        self.register_buffer("window", torch.zeros(batch_size, self.keep, **long), persistent=False)
        self.register_buffer("window_pos", torch.arange(self.keep, device=device), persistent=False)
        # Fixed addresses: torch.compile's CUDA graphs then read and update these in place instead of
        # copying them into graph-owned inputs at every replay (module buffers are static already; this
        # makes it explicit, and covers the cache's buffers too).
        for buf in self.buffers():
            torch._dynamo.mark_static_address(buf)
        self._step, self._rebuild = self.decode_step, self.rebuild_step
        self.compiled = False

    def compile_steps(self, **compile_kwargs) -> None:
        """torch.compile the decode step and the rebuild, e.g. mode="reduce-overhead", dynamic=False (CUDA
        graphs)."""
        self._step = torch.compile(self.decode_step, **compile_kwargs)
        self._rebuild = torch.compile(self.rebuild_step, **compile_kwargs)
        self.compiled = True

    def _call(self, fn) -> None:
        if self.compiled:  # a new iteration: a previous replay's outputs may be overwritten (there are none)
            torch.compiler.cudagraph_mark_step_begin()
        fn()

    @torch.no_grad()
    def warm_up(self, calls: int = 3) -> None:
        """Run the rebuild and the decode step `calls` times on whatever the buffers hold: torch.compile traces
        a function at its first call, records its CUDA graph at the second and replays it from the third, so
        this moves compilation and capture out of the next run. The state it leaves is discarded by the
        prefill that starts every run."""
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(calls):
                self._call(self._rebuild)  # pos = keep
                if self.keep < self.model.cfg.max_seq_length:
                    self.n.zero_()
                    self._call(self._step)
        finally:
            self.model.train(was_training)

    def _pick(self) -> torch.Tensor:
        """The next tokens [b, 1] from the logits and noise buffers, as sample_next picks them."""
        if self.temperature == 0:
            return self.logits.argmax(dim=-1, keepdim=True)
        return sample_with_noise(self.logits, self.temperature, self.top_k, self.noise)

    def decode_step(self) -> None:
        """Sample the next tokens, append them to `tokens` and feed them: one token per row, at slot pos."""
        tok = self._pick()
        self.tokens.index_copy_(1, self.n, tok)
        logits, _ = self.model(tok, kv_cache=self.cache, input_pos=self.pos)
        self.logits.copy_(logits[:, -1])
        self.pos.add_(1)
        self.n.add_(1)

    def sample_last(self) -> None:
        """Sample the next tokens and append them, without feeding them (eager)."""
        self.tokens.index_copy_(1, self.n, self._pick())
        self.n.add_(1)

    def rebuild_step(self) -> None:
        """Empty the cache and feed `window` at slots 0 .. keep-1: the rebuild of a full window."""
        logits, _ = self.model(self.window, kv_cache=self.cache, input_pos=self.window_pos)
        self.logits.copy_(logits[:, -1])
        self.pos.fill_(self.keep)

    def prefill(self, ids: torch.Tensor) -> None:
        """Empty the cache and feed ids [b, t] (t <= max_seq_length) at slots 0 .. t-1 (eager)."""
        t = ids.shape[1]
        logits, _ = self.model(ids, kv_cache=self.cache, input_pos=torch.arange(t, device=ids.device))
        self.logits.copy_(logits[:, -1])
        self.pos.fill_(t)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """As generate(model, ids, max_new_tokens, temperature, top_k, generator), same tokens for the same
        logits: [b, n + max_new_tokens]. Nothing is read back from the device until the result is used."""
        b, n = ids.shape
        if b != self.batch_size or n + max_new_tokens > self.max_tokens:
            raise ValueError(f"this decoder holds {self.batch_size} rows of at most {self.max_tokens} tokens, "
                             f"got {b} rows of {n} + {max_new_tokens}")
        T, keep = self.model.cfg.max_seq_length, self.keep
        was_training = self.model.training
        self.model.eval()
        try:
            self.tokens[:, :n].copy_(ids)
            self.n.fill_(n)
            self.prefill(ids[:, max(0, n - T):])
            pos = min(n, T)  # the host's count of the cache slots in use, the same as the device's `pos`
            for i in range(n, n + max_new_tokens):
                if self.temperature != 0:  # eager, with the caller's generator: as sample_next draws it
                    self.noise.exponential_(generator=generator)
                if i == n + max_new_tokens - 1 or pos == T:
                    self.sample_last()
                    if pos == T and i < n + max_new_tokens - 1:  # full: rebuild, as generate does
                        self.window.copy_(self.tokens[:, i + 1 - keep:i + 1])
                        self._call(self._rebuild)
                        pos = keep
                    continue
                self._call(self._step)
                pos += 1
        finally:
            self.model.train(was_training)
        return self.tokens[:, :n + max_new_tokens].clone()
