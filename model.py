"""GPT-style decoder (RoPE, RMSNorm, GQA, SwiGLU) with dense or MoE feed-forward layers.

A GPT instance is one pipeline stage: it holds the layers it is given (keyed by their global index, so
parameter names are the same under every layout), the embedding if it is the first stage and the final
norm, LM head and loss if it is the last. All splitting across TP ranks lives in the parallel layers.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from errors import InputError
from moe_config import MoEConfig
from moe_layers import SparseMoE
from options import POSITIVE, UNIT_INTERVAL, check_fields, from_flat, option, to_flat
from parallel import (ColumnParallelLinear, RowParallelLinear, Topology, VocabParallelEmbedding, full_shape,
                      shard_coords, shard_of, vocab_parallel_cross_entropy)


@dataclass
class ModelConfig:
    """The model's shape and its MoE layers' options (`moe`); flags and checks are declared on the fields
    (options.py). Checkpoints hold it as one flat dict (to_dict; from_dict reads it back)."""
    HELP_GROUP: ClassVar[str] = "model"

    vocab_size: int = option(256, "vocabulary size; ignored by byte-level corpora (256); for .bin and prepare_data.py "
                                  "data it defaults to the tokens' need rounded up to a multiple of 64",
                             check=POSITIVE, flag_default=None)  # the flag's None: the data decides
    hidden_size: int = option(128, "model width d_model", check=POSITIVE)
    intermediate_size: int = option(512, "dense SwiGLU FFN width", check=POSITIVE)
    num_layers: int = option(4, "transformer layers", check=POSITIVE)
    num_attention_heads: int = option(4, "query heads", check=POSITIVE)
    num_key_value_heads: int = option(2, "key/value heads (grouped-query attention)", check=POSITIVE)
    max_seq_length: int = option(128, "sequence length of training samples", check=POSITIVE)
    dropout: float = option(0.0, "dropout on embeddings, attention and residual branches", check=UNIT_INTERVAL,
                            changeable=True, reported=True)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope_theta: float = 10000.0  # no flag

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_size(self) -> int:
        return self.moe.expert_intermediate_size or self.intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        """Every N-th layer is MoE: layers N-1, 2N-1, ... counting from 0."""
        return self.moe.num_experts > 0 and (i + 1) % self.moe.layer_interval == 0

    def moe_layer_ids(self) -> list:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def layer_pattern(self) -> str:
        return " ".join("M" if self.is_moe_layer(i) else "D" for i in range(self.num_layers))

    @property
    def has_capacity(self) -> bool:
        """Whether the MoE layers cap what an expert takes: a token-choice capacity factor, or expert choice
        (always C tokens per expert). The drop and capacity statistics exist only then."""
        return self.moe.num_experts > 0 and (self.moe.capacity_factor > 0 or self.moe.routing == "expert-choice")

    def check(self, tp: int = 1, pp: int = 1, ep: Optional[int] = None) -> None:
        """The fields' own checks, the shapes against each other (and the MoE options, MoEConfig.check) and
        against the TP, PP and EP sizes (ep None: TP's); raises InputError naming the flag."""
        check_fields(self)
        if self.hidden_size % self.num_attention_heads:
            raise InputError(f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads "
                              f"{self.num_attention_heads}")
        if self.head_dim % 2:
            raise InputError(f"head size --hidden-size / --num-attention-heads = {self.head_dim} must be even "
                              f"(rotary embeddings)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"--num-attention-heads {self.num_attention_heads} must be divisible by "
                              f"--num-key-value-heads {self.num_key_value_heads}")
        self.moe.check()
        if self.moe.num_experts > 0 and self.moe.layer_interval > self.num_layers:
            raise InputError(f"--moe-layer-interval {self.moe.layer_interval} exceeds --num-layers "
                              f"{self.num_layers}: no layer would be MoE (use --num-experts 0 for a dense model)")
        for flag, value in (("--num-attention-heads", self.num_attention_heads),
                            ("--num-key-value-heads", self.num_key_value_heads),
                            ("--intermediate-size", self.intermediate_size)):
            if value % tp:
                raise InputError(f"{flag} {value} must be divisible by --tensor-parallel-size {tp}")
        ep = tp if ep is None else ep
        if self.moe.num_experts % ep:
            raise InputError(f"--num-experts {self.moe.num_experts} must be divisible by the expert-parallel size {ep} "
                              f"(--expert-parallel-size, which defaults to --tensor-parallel-size {tp})")
        if self.num_layers < pp:
            raise InputError(f"--num-layers {self.num_layers} must be at least --pipeline-parallel-size {pp}")

    def to_dict(self) -> dict:
        """The flat dict checkpoints and config.json hold: every option under its flag's name
        (moe_capacity_factor), the MoE options beside the others."""
        return to_flat(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config a checkpoint's flat dict holds; one written before a flag was renamed has the old name
        (router_aux_loss_coef), one written before a field existed lacks it: it gets the default."""
        return from_flat(cls, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.init_ones = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, h, T, hd]; rotates the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of every attention layer for the positions fed so far, for incremental decoding of
    the whole model in one process (see generate.py).

    Each layer's buffers [b, kv_heads, max_len, hd] are allocated once, at its first write (in the dtype
    of the keys: bf16 under autocast), so a decoding step writes its own position and attends over the
    `pos` positions held: no per-token copy grows with the context. `pos` is also the absolute position
    of the next token, which selects its rotary angles.
    """

    def __init__(self, max_len: int):
        self.max_len, self.pos = max_len, 0
        self.k: dict = {}  # global layer index -> [b, kv_heads, max_len, hd]
        self.v: dict = {}

    def reset(self) -> None:
        """Forget every position (the buffers are kept for the next prefill)."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [b, kv_heads, t, hd] at pos..pos+t; return the keys and values
        of all positions so far, [b, kv_heads, pos + t, hd] (views of the buffers)."""
        b, h, t, hd = k.shape
        if layer not in self.k or self.k[layer].shape[0] != b:
            self.k[layer] = k.new_empty(b, h, self.max_len, hd)
            self.v[layer] = v.new_empty(b, h, self.max_len, hd)
        end = self.pos + t
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class StaticKVCache(nn.Module):
    """Keys and values of every attention layer in buffers of one fixed shape, [b, kv_heads, max_len, hd]
    per layer, allocated (zeroed) at construction, for decoding steps whose shapes never change, so that
    a step can be captured once in a CUDA graph and replayed (generate.StaticDecoder).

    Unlike KVCache, it keeps no position on the host: each forward is given the positions of its tokens
    as a device tensor (`input_pos` [t]), writes their k and v there (index_copy_) and attends over all
    max_len slots under a mask that hides every slot after the query's position. Slots past the current
    position hold stale keys from an earlier window or sample and are never seen; zero-initialised, they
    are always finite, so the mask removes them exactly (a NaN there would survive the -inf).
    """

    def __init__(self, layer_ids: Sequence[int], batch_size: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.max_len = max_len
        for i in layer_ids:
            self.register_buffer(f"k_{i}", torch.zeros(batch_size, kv_heads, max_len, head_dim, dtype=dtype,
                                                       device=device), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(batch_size, kv_heads, max_len, head_dim, dtype=dtype,
                                                       device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """[t, max_len] bool: the query at input_pos[i] sees the slots 0 .. input_pos[i]."""
        return self.slots.unsqueeze(0) <= input_pos.unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, kv_heads, t, hd] at the slots input_pos [t]; return the whole buffers."""
        k_buf, v_buf = getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")
        k_buf.index_copy_(2, input_pos, k)  # a dtype other than the buffers' is an error, not a silent rounding
        v_buf.index_copy_(2, input_pos, v)
        return k_buf, v_buf


class Attention(nn.Module):
    """Causal grouped-query attention; heads and kv heads are split over TP ranks."""

    def __init__(self, cfg: ModelConfig, topo: Topology, out_init_std: float, layer_id: int = 0):
        super().__init__()
        hd = cfg.head_dim
        self.layer_id = layer_id  # its slot in a KVCache
        self.local_heads = cfg.num_attention_heads // topo.tp
        self.local_kv_heads = cfg.num_key_value_heads // topo.tp
        self.head_dim, self.dropout = hd, cfg.dropout
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, [cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd,
                              cfg.num_key_value_heads * hd], topo)
        self.proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, topo, out_init_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: Optional[KVCache | StaticKVCache] = None, input_pos: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cos, sin: the rotary angles of x's positions [t, hd/2]. With a KVCache, x holds the positions
        kv_cache.pos .. pos + t - 1 and attends over every position held. With a StaticKVCache, x holds
        the positions input_pos [t] and mask [t, max_len] is kv_cache.mask(input_pos)."""
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.local_heads * hd, self.local_kv_heads * hd, self.local_kv_heads * hd], -1)
        q = q.view(b, t, self.local_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.local_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.local_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.local_kv_heads != self.local_heads
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=gqa)
        elif isinstance(kv_cache, StaticKVCache):
            k, v = kv_cache.update(self.layer_id, k, v, input_pos)  # [b, kv_heads, max_len, hd]
            # All max_len slots, every step: the shapes never change. Eagerly (prefill, CPU) the backends
            # without per-shape plans, as below; a compiled step has one shape and lets inductor choose.
            with contextlib.nullcontext() if torch.compiler.is_compiling() else sdpa_kernel(_DECODE_BACKENDS):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_id, k, v)  # [b, kv_heads, start + t, hd]
            # Query i sits at position start + i and sees keys 0 .. start + i. SDPA's is_causal aligns the
            # mask to the top-left corner, which is wrong once start > 0, hence the explicit mask; a
            # single new token sees every key and needs none.
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start) if t > 1 else None
            # The key length grows by one every token; cuDNN attention builds a plan per new shape (measured
            # ~10 ms per call on an H100), so decoding keeps to the backends that need no per-shape plan.
            with sdpa_kernel(_DECODE_BACKENDS):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.local_heads * hd))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward, split over TP (column-parallel gate/up, row-parallel down)."""

    def __init__(self, cfg: ModelConfig, topo: Topology, out_init_std: float):
        super().__init__()
        f = cfg.intermediate_size
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, [f, f], topo)
        self.down = RowParallelLinear(f, cfg.hidden_size, topo, out_init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), None


# --recompute: the part of every layer whose activations the backward recomputes instead of keeping (Block).
RECOMPUTE_MODES = ("none", "attention", "moe", "block")


def recomputed(fn: Callable, *args):
    """fn(*args), keeping for the backward only the inputs: the activations inside fn are freed after the
    forward and recomputed by running fn again in the backward (non-reentrant torch.utils.checkpoint; under
    torch.compile the partitioner recomputes them in the backward graph). The RNG state is replayed, so dropout
    and router jitter draw the same noise again; a SparseMoE recomputed in eager mode counts nothing a second
    time (moe_layers.in_recomputation)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class Block(nn.Module):
    """One transformer layer: x + attention(norm(x)), then + ffn(norm(x)), the FFN dense or MoE. `recompute`
    (RECOMPUTE_MODES, set by GPT) picks what a training forward recomputes in the backward: "attention" the
    attention sublayer (norm and attention), "moe" the feed-forward sublayer (norm and SparseMoE) of a MoE
    layer (a dense layer keeps its MLP's activations), "block" the whole layer."""

    def __init__(self, cfg: ModelConfig, layer_id: int, topo: Topology, recompute: str = "none"):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute}")
        self.recompute = recompute
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2 scaling of residual projections
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg, topo, out_std, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size)
        if cfg.is_moe_layer(layer_id):
            self.ffn = SparseMoE(cfg.moe, cfg.hidden_size, cfg.expert_ffn_size, topo, out_init_std=out_std,
                                 vocab_size=cfg.vocab_size, layer_id=layer_id)
        else:
            self.ffn = MLP(cfg, topo, out_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, kv_cache: Optional[KVCache | StaticKVCache] = None,
                input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None):
        # Only a forward whose backward will run recomputes (never evaluation or decoding with its KV cache).
        mode = self.recompute if self.training and torch.is_grad_enabled() else "none"
        if mode == "block":
            return recomputed(self._sublayers, x, cos, sin, kv_cache, input_pos, mask, token_ids, "none")
        return self._sublayers(x, cos, sin, kv_cache, input_pos, mask, token_ids, mode)

    def _sublayers(self, x, cos, sin, kv_cache, input_pos, mask, token_ids, mode: str):
        """The two residual sublayers, "attention" or "moe" (mode) recomputed; the residual dropouts stay outside
        (they keep only their masks)."""
        x = x + self.drop(_recomputed_if(mode == "attention", self._attention, x, cos, sin, kv_cache, input_pos, mask))
        moe = isinstance(self.ffn, SparseMoE)
        y, moe_loss = _recomputed_if(mode == "moe" and moe, self._feed_forward, x, token_ids)
        return x + self.drop(y), moe_loss

    def _attention(self, x, cos, sin, kv_cache, input_pos, mask) -> torch.Tensor:
        return self.attn(self.attn_norm(x), cos, sin, kv_cache, input_pos, mask)

    def _feed_forward(self, x, token_ids) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h = self.ffn_norm(x)
        return self.ffn(h, token_ids) if isinstance(self.ffn, SparseMoE) else self.ffn(h)


def _recomputed_if(on: bool, fn: Callable, *args):
    return recomputed(fn, *args) if on else fn(*args)


class GPT(nn.Module):
    """One pipeline stage of the model (the whole model when there is one stage). recompute: what every
    layer recomputes in the backward (Block; a run option, the parameters are the same)."""

    def __init__(self, cfg: ModelConfig, topo: Topology, layer_ids: Optional[Sequence[int]] = None,
                 first: bool = True, last: bool = True, recompute: str = "none"):
        super().__init__()
        self.cfg, self.topo, self.first, self.last = cfg, topo, first, last
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        if first:
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, topo)
            self.embed_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, topo, recompute) for i in layer_ids})
        if last:
            self.norm = RMSNorm(cfg.hidden_size)
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, [cfg.vocab_size], topo)
        cos, sin = rope_tables(cfg.max_seq_length, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> dict:
        """{global layer index: SparseMoE} for the MoE layers of this stage."""
        return {int(i): blk.ffn for i, blk in self.layers.items() if isinstance(blk.ffn, SparseMoE)}

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache | StaticKVCache] = None, input_pos: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None):
        """First stage: x is token ids [b, T]; otherwise the hidden states [b, T, d].
        Returns (hidden, moe_loss) or, on the last stage, (mean LM loss, moe_loss), or (logits [b, T, V],
        moe_loss) when no targets are given.

        token_ids [b, T]: the input token ids of this microbatch, which hash routing needs in every MoE
        layer; the first stage takes them from x, a later stage must be given them (the trainer does).

        kv_cache (whole model in one process only): x holds the next T tokens at positions kv_cache.pos ..
        pos + T - 1 (at most max_seq_length in all, the length of the rotary tables); their keys and values
        are added to the cache and pos advances by T. A StaticKVCache instead takes the positions of x's
        tokens as input_pos, a device tensor [T] (nothing is read back to the host, so the caller keeps
        them below its max_len; an index past it is a device-side error)."""
        t = x.shape[1]
        pos = 0
        mask = None
        if kv_cache is not None and not (self.first and self.last):
            raise ValueError("a KV cache needs the whole model in one stage")
        if isinstance(kv_cache, StaticKVCache):
            if input_pos is None:
                raise ValueError("a StaticKVCache needs input_pos, the positions of the tokens fed")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = kv_cache.mask(input_pos)  # once for all layers
        else:
            if kv_cache is not None:
                pos = kv_cache.pos
                if pos + t > self.cfg.max_seq_length:
                    raise ValueError(f"positions {pos}..{pos + t - 1} exceed max_seq_length {self.cfg.max_seq_length}")
            cos, sin = self.rope_cos[pos:pos + t], self.rope_sin[pos:pos + t]
        if self.first:
            token_ids = x
        h = self.embed_drop(self.embed(x)) if self.first else x
        moe_loss = torch.zeros((), device=h.device)
        for blk in self.layers.values():
            h, layer_loss = blk(h, cos, sin, kv_cache, input_pos, mask, token_ids)
            if layer_loss is not None:
                moe_loss = moe_loss + layer_loss
        if isinstance(kv_cache, KVCache):
            kv_cache.pos += t
        if not self.last:
            return h, moe_loss
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits, moe_loss
        loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.topo).mean()
        return loss, moe_loss

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Each parameter's full tensor is drawn from a generator seeded by (seed, parameter name), and
        this rank keeps its shard: initialisation does not depend on the layout."""
        for name, p in self.named_parameters():
            if getattr(p, "init_ones", False):
                p.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(full_shape(p)).normal_(0.0, p.init_std, generator=gen)
            p.copy_(shard_of(full, p, *shard_coords(p, self.topo)))


def compile_model(model: GPT, scope: str, backend: str = "inductor") -> None:
    """torch.compile a stage in place. 'blocks': each Block on its own; the layers of one kind share one
    compiled graph, so compilation is short, but every block is a separate call with its own guards and
    the embedding, final norm and loss run eagerly. 'model': the whole stage forward as one graph (and one
    backward graph), which removes those per-block calls and fuses across block boundaries, at the cost
    of compiling every layer.

    With --recompute, each recomputed part is traced as one checkpoint region and the partitioner recomputes it
    in the backward graph. A MoE layer's statistics are Python side effects (its RoutingRecord), which torch.compile
    refuses inside a region by default, since eager checkpointing replays them in the backward; here they must
    happen once, in the forward (as moe_layers.in_recomputation makes eager code do), so that is what it is told.
    A region that still does not trace whole (the CPU's fp32 expert GEMMs run eagerly; a torch without the option)
    runs as eager checkpointing, at its speed, with the same results. `backend`: torch.compile's (the tests use
    aot_eager, the same graphs and partitioner without inductor's code generation)."""
    if any(blk.recompute != "none" for blk in model.layers.values()) and \
            hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if scope == "model":
        model.compile(backend=backend)
    elif scope == "blocks":
        for blk in model.layers.values():
            blk.compile(backend=backend)
    else:
        raise ValueError(f"compile scope must be blocks or model, got {scope}")


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts of the full model, built on the meta device."""
    with torch.device("meta"):
        model = GPT(cfg, Topology())
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    E, k = cfg.moe.num_experts, cfg.moe.num_experts_per_token
    if E:
        for moe in model.moe_layers().values():
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            inactive += expert_params * (E - k) // E
    return total, total - inactive
