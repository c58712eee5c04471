"""The model: the layer pattern (which layers are MoE), the blocks it builds and the parameter counts."""
from __future__ import annotations


import pytest

from model import GPT, MLP, ModelConfig, count_parameters
from moe_config import MoEConfig
from moe_layers import SparseMoE
from parallel import Topology

from helpers import tiny_cfg


def test_layer_pattern():
    assert ModelConfig(num_layers=6, moe=MoEConfig(layer_interval=2)).layer_pattern() == "D M D M D M"
    assert ModelConfig(num_layers=6, moe=MoEConfig(layer_interval=1)).layer_pattern() == "M M M M M M"
    assert ModelConfig(num_layers=6, moe=MoEConfig(layer_interval=3)).layer_pattern() == "D D M D D M"
    assert ModelConfig(num_layers=6, moe=MoEConfig(num_experts=0)).layer_pattern() == "D D D D D D"
    assert ModelConfig(num_layers=6, moe=MoEConfig(layer_interval=2)).moe_layer_ids() == [1, 3, 5]


@pytest.mark.parametrize("interval,moe_ids", [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (3, [2, 5]), (6, [5])])
def test_gpt_builds_moe_at_pattern(interval, moe_ids):
    cfg = tiny_cfg(moe_layer_interval=interval)
    model = GPT(cfg, Topology())
    assert sorted(model.moe_layers()) == moe_ids
    for i, blk in model.layers.items():
        assert isinstance(blk.ffn, SparseMoE if int(i) in moe_ids else MLP)


def test_gpt_dense_model_has_no_moe():
    model = GPT(tiny_cfg(num_experts=0), Topology())
    assert model.moe_layers() == {}
    assert all(isinstance(b.ffn, MLP) for b in model.layers.values())


@pytest.mark.parametrize("kw", [dict(moe_layer_interval=2), dict(moe_layer_interval=1, num_experts=8,
                                                                  num_experts_per_token=3,
                                                                  expert_intermediate_size=24)])
def test_count_parameters(kw):
    cfg = tiny_cfg(**kw)
    model = GPT(cfg, Topology())
    numel = sum(p.numel() for p in model.parameters())
    total, active = count_parameters(cfg)
    assert total == numel
    E, k, d, f = cfg.moe.num_experts, cfg.moe.num_experts_per_token, cfg.hidden_size, cfg.expert_ffn_size
    per_expert = d * 2 * f + f * d  # w_gate_up + w_down
    n_moe = len(cfg.moe_layer_ids())
    expert_params = n_moe * E * per_expert
    assert active == total - expert_params * (E - k) // E
    assert active < total
    # A dense model's parameters are all active.
    dense_cfg = tiny_cfg(num_experts=0)
    dense_total, dense_active = count_parameters(dense_cfg)
    assert dense_total == dense_active == sum(p.numel() for p in GPT(dense_cfg, Topology()).parameters())
