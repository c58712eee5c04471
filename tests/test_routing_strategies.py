"""Routing strategies: the hard top-k gate, expert-choice routing and hash routing against brute-force
references, their statistics (used_capacity, mean_topk_prob, gate entropy) by hand, their flags and resume
checks, generation, equivalence under TP/EP, PP and DP, and the sweep's strategy axis with its plots."""
from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt
import minimal_pretrain
from model import GPT, ModelConfig
from moe_config import MoEConfig
from moe_layers import (EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR, SCORE_TIE_RTOL, HashRouter, SparseMoE, capacity_mask,
                        capacity_statistics, expert_choice_capacity, gate_statistics, route_expert_choice, route_topk)
from moe_stats import StatsLayout, moe_metrics
from parallel import Topology

from helpers import (MILD, ROOT, TINY_BENCH, _assert_one_error_line, _base_argv, _ckpt_argv, _clean_env, _close,
                     _cuda_moe_for_sync_check, _detailed_argv, _expected_kept, _greedy_by_recompute, _run_cli,
                     _run_against_one_process, _train_in_process, assert_same_run, dense_expert, make_moe,
                     run_without_host_sync, skewed_router_case, tiny_cfg)

sys.path.insert(0, str(ROOT / "bench"))


def _strategy_moe(routing: str = "token-choice", gate: str = "soft", d: int = 16, f: int = 24, E: int = 4,
                  k: int = 2, vocab: int = 32, seed: int = 0, std: float = 0.5, **kw) -> SparseMoE:
    """A SparseMoE on one process with N(0, std) parameters (hash routing: no router weight to draw)."""
    torch.manual_seed(seed)
    moe = SparseMoE(MoEConfig(num_experts=E, num_experts_per_token=k, routing=routing, gate=gate, **kw), d, f,
                    Topology(), vocab_size=vocab)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, std)
    return moe


def _all_experts(moe: SparseMoE, x2d: torch.Tensor) -> torch.Tensor:
    """[E, T, d] float64: every expert applied densely to every token."""
    w1, w2 = moe.experts.w_gate_up.double(), moe.experts.w_down.double()
    return torch.stack([dense_expert(x2d.double(), w1[e], w2[e]) for e in range(w1.shape[0])])


def test_hard_gate_weights_every_chosen_expert_one():
    """--moe-gate hard: the same k experts as the soft gate, each weighted 1; the router then gets no
    gradient from the LM output, only from its losses (none here: both coefficients 0)."""
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    soft, hard = route_topk(logits, 2), route_topk(logits, 2, gate="hard")
    assert torch.equal(soft.indices, hard.indices) and torch.equal(hard.weights, torch.ones(10, 2))
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for gate in ("soft", "hard"):
        moe = _strategy_moe(gate=gate, aux_loss_coef=0.0, z_loss_coef=0.0)
        out, loss = moe(x)
        with torch.no_grad():
            r = moe.router(x)
            every = _all_experts(moe, x)
        ref = torch.zeros(12, 16, dtype=torch.float64)
        for t in range(12):
            for j in range(2):
                w = 1.0 if gate == "hard" else float(r.weights[t, j])
                ref[t] += w * every[int(r.indices[t, j]), t]
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)  # fp32 sums in another order (threads)
        (out.sum() + loss).backward()
        grads[gate] = moe.router.weight.grad
    assert not grads["hard"].any() and grads["soft"].abs().sum() > 0  # (zero-coefficient losses reach it)


def test_expert_choice_matches_dense_reference_with_gradients():
    """Training forward: expert e takes the C tokens with its highest softmax scores (Python sort), token
    t gets sum over the experts that took it of s[t, e] * expert_e(x_t): outputs and the gradients of x,
    the router and the experts equal a dense autograd reference."""
    T, d, E, k = 24, 16, 4, 2
    moe = _strategy_moe("expert-choice", E=E, k=k, capacity_factor=0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2), requires_grad=True)
    C = expert_choice_capacity(T, k, E, 0.5)
    assert C == 6  # ceil(0.5 * 24 * 2 / 4)
    out, loss = moe(x)
    (out * torch.linspace(-1, 1, d)).sum().backward()
    got = [x.grad.clone(), moe.router.weight.grad.clone(), moe.experts.w_gate_up.grad.clone()]

    ref_moe = copy.deepcopy(moe)
    ref_moe.zero_grad()
    xr = x.detach().clone().requires_grad_(True)
    scores = F.linear(xr, ref_moe.router.weight).softmax(-1)  # [T, E]
    chosen = torch.zeros(T, E)
    for e in range(E):
        by_score = sorted(range(T), key=lambda t: -float(scores[t, e].detach()))
        chosen[by_score[:C], e] = 1.0
    every = torch.stack([dense_expert(xr, ref_moe.experts.w_gate_up[e], ref_moe.experts.w_down[e]) for e in range(E)])
    ref = torch.einsum("te,etd->td", chosen * scores, every)
    (ref * torch.linspace(-1, 1, d)).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # fp32 sums in another order (threads)
    for a, b in zip(got, [xr.grad, ref_moe.router.weight.grad, ref_moe.experts.w_gate_up.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (chosen.sum(0) == C).all() and (chosen.sum(1) == 0).any() and (chosen.sum(1) > 1).any()


def test_score_ties_go_to_the_earlier_tokens():
    """Tokens with the same hidden state (a sequence that opens with a run of one token) have equal scores up to
    fp32 rounding, whose last bits differ between layouts and CPU kernels (issue 32). Of the tokens tied at an
    expert's cut the earliest fill its places, whatever those bits, under expert choice and the probs drop
    policy; scores further apart than SCORE_TIE_RTOL still go by score. Expert choice's weights: the chosen
    scores (soft, with their gradient) or 1."""
    r = SCORE_TIE_RTOL
    s0 = [0.9, 0.1, 0.4, 0.2, 0.8, 0.4, 0.15, 0.4, 0.05, 0.4]  # expert 0: 0 and 4 above; 2, 5, 7, 9 tied at the cut
    s1 = [0.9, 0.5, 0.8, 0.5 * (1 + 4 * r), 0.7, 0.6, 0.1, 0.2, 0.3, 0.05]  # expert 1: token 3 beats 1 by 4 r
    base = torch.tensor([s0, s1]).t().contiguous()  # [T, E]
    want = torch.zeros(10, 2, dtype=torch.bool)
    want[[0, 4, 2, 5, 7], 0] = True
    want[[0, 2, 4, 5, 3], 1] = True
    every = torch.tensor([[0, 1]] * 10)  # every token routed to both experts
    gen = torch.Generator().manual_seed(11)
    for trial in range(20):  # the tied scores 0 to 2 ulps apart, in random directions
        scores = base.clone()
        for t in (2, 5, 7, 9):
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
                up = bool(torch.randint(0, 2, (1,), generator=gen))
                scores[t, 0] = torch.nextafter(scores[t, 0], torch.tensor(1.0 if up else 0.0))
        assert torch.equal(capacity_mask(every, scores, torch.tensor([10.0, 10.0]), 5, "probs"), want), trial
        scores.requires_grad_(True)
        choice = route_expert_choice(scores, 5)
        assert choice.tokens[0, :2].tolist() == [0, 4] and sorted(choice.tokens[0, 2:].tolist()) == [2, 5, 7], trial
        assert choice.tokens[1].tolist() == [0, 2, 4, 5, 3]  # highest score first
        assert torch.equal(choice.weights, scores.detach().t().gather(1, choice.tokens))
        choice.weights.sum().backward()
        assert torch.equal(scores.grad, want.float())
    hard = route_expert_choice(base, 5, gate="hard")
    assert torch.equal(hard.weights, torch.ones(2, 5))
    assert [sorted(row) for row in hard.tokens.tolist()] == [[0, 2, 4, 5, 7], [0, 2, 3, 4, 5]]


def test_expert_choice_capacity_default_and_eval_fallback():
    """C = ceil(cf * T * k / E), cf = 1.0 when --moe-capacity-factor is 0, at most T. In eval mode the same
    scores route by token-choice top-k with the raw (unrenormalised) scores as weights, no capacity;
    expert_choice_eval puts expert choice back."""
    assert EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR == 1.0
    assert expert_choice_capacity(40, 2, 4, 0.0) == 20 and expert_choice_capacity(40, 2, 4, 1.25) == 25
    assert expert_choice_capacity(3, 2, 2, 2.0) == 3  # never more than the tokens there are
    moe = _strategy_moe("expert-choice").eval()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, _ = moe(x)
        scores = F.linear(x, moe.router.weight).softmax(-1)
        w, idx = scores.topk(2, dim=-1)
        every = _all_experts(moe, x)
        ref = torch.stack([sum(float(w[t, j]) * every[int(idx[t, j]), t] for j in range(2)) for t in range(10)])
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)  # fp32 sums in another order (threads)
        moe.expert_choice_eval = True
        ec, _ = moe(x)
        moe.train()
        train_out, _ = moe(x)
    assert torch.equal(ec, train_out) and not torch.allclose(ec, out)


def test_expert_choice_sees_later_positions_eval_does_not():
    """Expert choice ranks a token against the whole microbatch, so changing a later token changes an
    earlier token's output in training; the eval-mode top-k is per token."""
    moe = _strategy_moe("expert-choice")
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(4))
    changed = [x.clone() for _ in range(8)]
    for i, c in enumerate(changed):  # perturb the last positions: 8 different futures
        c[0, 8:] += torch.randn(8, 16, generator=torch.Generator().manual_seed(10 + i)) * 3
    with torch.no_grad():
        for mode, should_differ in ((moe.train, True), (moe.eval, False)):
            mode()
            base = moe(x)[0][0, :8]
            # (beyond rounding: the grouped GEMM may round differently with other group sizes)
            change = max(float((moe(c)[0][0, :8] - base).abs().max()) for c in changed)
            assert (change > 1e-2) == should_differ and (should_differ or change < 1e-5), (mode, change)


def test_hash_router_is_a_fixed_token_id_map():
    """k distinct experts per token id, from a fixed seed per layer (the same map on every build, another
    for another layer), a persistent buffer, no parameter; the layer's output for a token is the mean
    (soft) or sum (hard) of its k experts, and depends on the token id only."""
    a, b, other = HashRouter(50, 8, 3, layer_id=1), HashRouter(50, 8, 3, layer_id=1), HashRouter(50, 8, 3, layer_id=2)
    assert a.table.shape == (50, 3) and torch.equal(a.table, b.table) and not torch.equal(a.table, other.table)
    assert all(len(set(row)) == 3 for row in a.table.tolist()) and set(a.table.flatten().tolist()) == set(range(8))
    assert list(a.parameters()) == [] and "table" in a.state_dict()
    ids = torch.tensor([[3, 7, 3, 0, 31, 7]])
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(5))
    for gate, scale in (("soft", 0.5), ("hard", 1.0)):
        moe = _strategy_moe("hash", gate=gate)
        assert all(not n.startswith("router.") for n, _ in moe.named_parameters())
        out, loss = moe(x, ids)
        every = _all_experts(moe, x[0])
        table = moe.router.table
        ref = torch.stack([scale * sum(every[int(e), t] for e in table[int(ids[0, t])]) for t in range(6)])
        torch.testing.assert_close(out[0].double(), ref, rtol=1e-4, atol=1e-5)  # fp32 sums in another order (threads)
        assert not loss.requires_grad  # no router: its aux loss has no gradient, its z-loss is 0
    with pytest.raises(ValueError, match="token ids"):
        moe(x)


def test_hash_routing_gets_token_ids_on_a_later_pipeline_stage():
    """GPT threads the input ids to every MoE layer: the first stage takes them from its input, a later
    stage must be given them. Two stages fed by hand equal the whole model."""
    cfg = tiny_cfg(num_layers=4, moe_layer_interval=1, moe_routing="hash")
    whole = GPT(cfg, Topology())
    whole.init_weights(0)
    first = GPT(cfg, Topology(), [0, 1], first=True, last=False)
    last = GPT(cfg, Topology(), [2, 3], first=False, last=True)
    state = whole.state_dict()
    first.load_state_dict({k: v for k, v in state.items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in state.items() if k in last.state_dict()})
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    targets = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want, _ = whole(ids, targets)
        h, _ = first(ids)
        got, _ = last(h, targets, token_ids=ids)
        assert got == want
        with pytest.raises(ValueError, match="token ids"):
            last(h, targets)


@pytest.mark.parametrize("routing,gate", [("hash", "soft"), ("expert-choice", "soft"), ("token-choice", "hard")])
def test_kv_cache_and_generation_with_new_routers(routing, gate, one_thread):
    """Generation routes every token on its own (hash: its id; expert choice: the eval-mode top-k), so the
    cached logits equal a full recompute and greedy generation equals the recompute policy."""
    from generate import generate
    from model import KVCache
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_seq_length=16,
                      moe=MoEConfig(num_experts=4, num_experts_per_token=2, routing=routing, gate=gate))
    model = GPT(cfg, Topology())
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    model.eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache(16)
        got = torch.cat([model(ids[:, :5], kv_cache=cache)[0]] + [model(ids[:, i:i + 1], kv_cache=cache)[0]
                                                                for i in range(5, 16)], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :3]
    assert torch.equal(generate(model, prompt, 20, temperature=0.0), _greedy_by_recompute(model, prompt, 20))


# ---- statistics: used_capacity, mean_topk_prob, gate entropy ----
def test_capacity_statistics_by_hand():
    # 5 tokens served by [2, 0, 1, 3, 0] experts at k = 2: unfilled slots 0 + 2 + 1 + 0 + 2 = 5, 2 tokens with none;
    # experts keep [3, 1, 2, 0] of capacity 3: busiest 3 / 3, mean 1.5 / 3.
    drops, fill = capacity_statistics(torch.tensor([2, 0, 1, 3, 0]), torch.tensor([3, 1, 2, 0]), 3, 2)
    assert drops.tolist() == [5.0, 2.0] and fill.tolist() == [1.0, 0.5]


def test_gate_statistics_by_hand():
    # Token 0: gates [0.6, 0.2] -> normalised [0.75, 0.25]; token 1: one gate [0.5, 0] -> entropy 0;
    # token 2: nothing kept -> 0; token 3: hard gates [1, 1] -> ln 2.
    w = torch.tensor([[0.6, 0.2], [0.5, 0.0], [0.0, 0.0], [1.0, 1.0]])
    probs = torch.tensor([[0.6, 0.2], [0.5, 0.0], [0.0, 0.0], [0.3, 0.1]])
    g = gate_statistics(w, probs, 5)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert g.tolist() == pytest.approx([h0 + math.log(2), 1.7, 5.0, 4.0], rel=1e-6)


def _record_of(moe: SparseMoE, x: torch.Tensor, ids=None):
    moe.train()
    moe.record_routing = True
    moe(x, ids)
    return moe.last_routing


def test_token_choice_record_gates_and_fill_by_hand():
    """The gate sums and the fill of a token-choice forward, recomputed from the router's own output: no
    capacity -> every top-k kept, gates = the renormalised weights; capacity 1.0 on a skewed router ->
    the kept assignments only, fill = kept / capacity of the busiest and the mean expert."""
    base, x = skewed_router_case(4, 2, [1], T=40, **MILD)
    with torch.no_grad():
        r = base.router(x)
        p_kept = r.probs.gather(-1, r.indices)
    rec = _record_of(base, x)
    want_h = float(torch.special.entr(r.weights).sum())  # renormalised weights sum to 1 already
    assert rec.gates.tolist() == pytest.approx([want_h, float(p_kept.sum()), 80.0, 40.0], rel=1e-5)
    assert rec.fill is None and rec.drops is None
    capped = make_moe(d=16, f=24, E=4, k=2, capacity_factor=1.0)
    capped.load_state_dict(base.state_dict())
    rec = _record_of(capped, x)
    counts = torch.bincount(r.indices.reshape(-1), minlength=4).float()
    kept = torch.tensor(_expected_kept(r.indices.tolist(), r.scores.tolist(), 20, "position", seq_len=40))
    w = torch.where(kept, r.weights, 0.0)
    g = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    assert rec.gates.tolist() == pytest.approx([float(torch.special.entr(g).sum()),
                                                float(torch.where(kept, p_kept, 0.0).sum()), float(kept.sum()), 40.0],
                                               rel=1e-5)
    assert rec.fill.tolist() == pytest.approx([float(counts.clamp(max=20).max()) / 20,
                                               float(counts.clamp(max=20).mean()) / 20])
    assert rec.fill[0] == 1.0 and rec.drops[0] > 0


def test_expert_choice_record_by_hand():
    """Expert choice's record: the counts are the demand (top-k of the same scores, summing to T*k), every
    expert keeps exactly C, the drops count the slots of tokens served by fewer than k experts."""
    T, E, k = 16, 4, 2
    moe = _strategy_moe("expert-choice", E=E, k=k)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(9))
    rec = _record_of(moe, x)
    with torch.no_grad():
        s = F.linear(x, moe.router.weight).softmax(-1)
    C = expert_choice_capacity(T, k, E, 0.0)
    top = s.t().topk(C, dim=-1).indices  # [E, C]
    served = torch.bincount(top.reshape(-1), minlength=T)
    assert rec.counts.tolist() == torch.bincount(s.topk(k).indices.reshape(-1), minlength=E).float().tolist()
    assert rec.kept.tolist() == [float(C)] * E and rec.fill.tolist() == [1.0, 1.0]
    assert rec.drops.tolist() == [float((k - served).clamp_min(0).sum()), float((served == 0).sum())]
    dense = torch.zeros(T, E)
    for e in range(E):
        dense[top[e], e] = s[top[e], e]
    g = dense / dense.sum(-1, keepdim=True).clamp_min(1e-20)
    assert rec.gates.tolist() == pytest.approx([float(torch.special.entr(g).sum()), float(dense.sum()),
                                                float(E * C), float(T)], rel=1e-5)


def test_new_metrics_from_packed_sums_by_hand():
    """moe/used_capacity (busiest expert's fill) and moe/used_capacity_mean: means over layers, microbatches
    and DP ranks; moe/gate_entropy_mean (per token) and moe/mean_topk_prob (per kept assignment): means of
    the per-layer ratios; per layer in detailed mode; the capacity keys are absent without capacity."""
    layout = StatsLayout(moe_layer_ids=[1, 3], num_experts=4, num_microbatches=2, dp=2, drops=True, gates=True)
    flat = np.zeros(layout.numel())
    v = layout.split(flat)
    v["counts"][:] = [[40, 30, 20, 10], [25, 25, 25, 25]]
    v["fill"][:] = [[4.0, 3.0], [2.0, 1.0]]  # sums over 2 microbatches x 2 DP ranks
    v["gates"][:] = [[30.0, 60.0, 90.0, 50.0], [10.0, 25.0, 100.0, 50.0]]
    m = moe_metrics(layout, flat, detailed=True)
    assert m["moe/used_capacity"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["moe/used_capacity_mean"] == pytest.approx((0.75 + 0.25) / 2)
    assert m["moe/layer_1/used_capacity"] == pytest.approx(1.0) and m["moe/layer_3/used_capacity"] == pytest.approx(0.5)
    assert m["moe/gate_entropy_mean"] == pytest.approx((30 / 50 + 10 / 50) / 2)
    assert m["moe/mean_topk_prob"] == pytest.approx((60 / 90 + 25 / 100) / 2)
    assert m["moe/layer_3/gate_entropy"] == pytest.approx(0.2) and m["moe/layer_1/mean_topk_prob"] == pytest.approx(2 / 3)
    plain = StatsLayout(moe_layer_ids=[1, 3], num_experts=4, num_microbatches=2, dp=2, gates=True)
    m = moe_metrics(plain, np.zeros(plain.numel()))
    assert "moe/gate_entropy_mean" in m and not any("used_capacity" in key for key in m)


def test_trainer_logs_the_new_metrics_for_every_router(tmp_path, monkeypatch):
    """End to end: every router trains and logs gate entropy and mean top-k probability; capacity keys
    appear exactly when a capacity applies (expert choice always: every expert full)."""
    for name, flags in {"soft": [], "hard-cap": ["--moe-gate", "hard", "--moe-capacity-factor", "1.0"],
                        "ec": ["--moe-routing", "expert-choice"], "hash": ["--moe-routing", "hash"]}.items():
        argv = _base_argv("mixed") + flags + ["--output-dir", str(tmp_path / name), "--eval-iters", "1"]
        argv[argv.index("--max-steps") + 1] = "2"
        argv[argv.index("--moe-metrics") + 1] = "detailed"
        res = _train_in_process(argv, monkeypatch)
        rec = res.records[-1]
        assert 0 < rec["moe/mean_topk_prob"] <= 1 and 0 <= rec["moe/gate_entropy_mean"] <= math.log(4) + 1e-6, rec
        assert ("moe/used_capacity" in rec) == (name in ("hard-cap", "ec")), name
        if name == "ec":
            assert rec["moe/used_capacity"] == 1.0 and rec["moe/used_capacity_mean"] == 1.0
            evals = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
            assert "val_loss_expert_choice" in evals[-1]
        if name == "hash":
            assert rec["z_loss"] == 0.0 and rec["moe/mean_topk_prob"] == pytest.approx(0.5)
            assert rec["moe/gate_entropy_mean"] == pytest.approx(math.log(2), rel=1e-6)
        if name == "hard-cap":  # hard gates are equal: ln 2 for a token with both kept, 0 for one with one
            assert rec["moe/gate_entropy_mean"] <= math.log(2) + 1e-6


# ---- flags and checkpoints ----
STRATEGY_BAD_FLAGS = [
    (["--moe-routing", "expert-choice", "--moe-bias-update-rate", "0.01"], "--moe-bias-update-rate"),
    (["--moe-routing", "hash", "--moe-bias-update-rate", "0.01"], "--moe-bias-update-rate"),
    (["--moe-routing", "hash", "--moe-router-score", "sigmoid"], "--moe-router-score"),
    (["--moe-routing", "expert-choice", "--no-router-normalize-topk"], "--no-router-normalize-topk"),
    (["--moe-routing", "expert-choice", "--moe-drop-policy", "probs"], "--moe-drop-policy"),
    (["--moe-routing", "expert-choice", "--moe-renorm-after-drop"], "--moe-renorm-after-drop"),
    (["--moe-gate", "hard", "--moe-capacity-factor", "1", "--moe-renorm-after-drop"], "--moe-renorm-after-drop"),
    (["--moe-gate", "hard", "--no-router-normalize-topk"], "--no-router-normalize-topk"),
    (["--moe-routing", "expert-choice", "--moe-gate", "hard"], "--moe-gate"),
    (["--moe-routing", "random"], "--moe-routing"),
    (["--moe-gate", "sparse"], "--moe-gate"),
]


@pytest.mark.parametrize("flags,name", STRATEGY_BAD_FLAGS, ids=[" ".join(f) for f, _ in STRATEGY_BAD_FLAGS])
def test_routing_strategy_bad_flags_exit_2(flags, name, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        code = minimal_pretrain.main(flags + ["--output-dir", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's own choices
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and name in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_routing_and_gate_are_model_flags_on_resume(tmp_path, monkeypatch, capsys):
    """A checkpoint fixes --moe-routing and --moe-gate: resume takes them when left out (the hash map from
    the checkpoint) and refuses a contradiction; a checkpoint written before the fields existed resumes
    with the defaults and refuses others; sample.py builds the hash model from the checkpoint alone."""
    _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "2", "--moe-routing", "hash", "--moe-gate", "hard"),
                      monkeypatch)
    ckpt_dir = tmp_path / "a" / "checkpoints"
    _, state = ckpt.load_consolidated(ckpt_dir / "step_00000002")
    assert state["layers.0.ffn.router.table"].shape == (256, 2) and "layers.0.ffn.router.weight" not in state
    res = _train_in_process(_ckpt_argv(tmp_path / "b", "--max-steps", "3", "--resume", str(ckpt_dir)), monkeypatch)
    assert res.records and json.loads((tmp_path / "b" / "config.json").read_text())["model"]["moe_routing"] == "hash"
    for flags, field in ((["--moe-routing", "token-choice"], "moe_routing"), (["--moe-gate", "soft"], "moe_gate")):
        r = _run_cli(_ckpt_argv(tmp_path / "c", "--max-steps", "3", "--moe-routing", "hash", "--moe-gate", "hard",
                                "--resume", str(ckpt_dir), *flags))
        _assert_one_error_line(r, 2, field)
    import sample
    assert sample.main(["--checkpoint", str(ckpt_dir), "--device", "cpu", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # An older checkpoint: a token-choice run's manifest without the two fields.
    _train_in_process(_ckpt_argv(tmp_path / "old", "--max-steps", "1"), monkeypatch)
    step = tmp_path / "old" / "checkpoints" / "step_00000001"
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    for key in ("moe_routing", "moe_gate"):
        del manifest["model"][key]
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    res = _train_in_process(_ckpt_argv(tmp_path / "d", "--max-steps", "2", "--resume", str(step)), monkeypatch)
    model = json.loads((tmp_path / "d" / "config.json").read_text())["model"]
    assert (model["moe_routing"], model["moe_gate"]) == ("token-choice", "soft")
    r = _run_cli(_ckpt_argv(tmp_path / "e", "--max-steps", "2", "--moe-gate", "hard", "--resume", str(step)))
    _assert_one_error_line(r, 2, "moe_gate")
    assert sample.main(["--checkpoint", str(step), "--device", "cpu", "--max-new-tokens", "4"]) == 0


# ---- no host sync (CUDA) ----
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs can only be detected on CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature")
@pytest.mark.parametrize("kw", [dict(gate="hard", capacity_factor=1.0), dict(routing="expert-choice"),
                                dict(routing="hash", vocab_size=64), dict(routing="hash", vocab_size=64, capacity_factor=1.0)],
                         ids=["hard-capacity", "expert-choice", "hash", "hash-capacity"])
def test_no_host_sync_with_routing_strategies(kw):
    """Every router's training forward, its statistics and backward stay on the device."""
    moe, x, stats = _cuda_moe_for_sync_check(**kw)
    ids = torch.randint(0, 64, x.shape[:2], device="cuda")

    def step():
        out, loss = moe(x, ids)
        stats.end_microbatch()
        (out.float().sum() + loss).backward()
        return out
    out = run_without_host_sync(step)
    assert torch.isfinite(out.float()).all() and stats.gates[-1].shape == (1, 4)


# ---- parallel equivalence: every router under TP/EP, PP (hash needs the ids on the later stage) and DP ----
STRATEGY_CASES = {
    "hard-capacity": ["--moe-gate", "hard", "--moe-capacity-factor", "1.0"],
    "expert-choice": ["--moe-routing", "expert-choice", "--moe-capacity-factor", "1.25", "--eval-iters", "1"],
    "hash-capacity": ["--moe-routing", "hash", "--moe-capacity-factor", "1.0", "--moe-drop-policy", "probs"],
}
STRATEGY_LAYOUTS = [  # (case, id, world size, flags)
    ("hard-capacity", "tp2-ep2", 2, ["--tensor-parallel-size", "2"]),
    ("expert-choice", "tp2-ep2", 2, ["--tensor-parallel-size", "2"]),
    ("expert-choice", "pp2", 2, ["--pipeline-parallel-size", "2"]),
    ("hash-capacity", "tp2-ep2", 2, ["--tensor-parallel-size", "2"]),
    ("hash-capacity", "pp2", 2, ["--pipeline-parallel-size", "2"]),
    ("hash-capacity", "dp2", 2, []),
]
_STRATEGY_REFERENCE = {}
STRATEGY_METRICS = ("drop_rate", "token_drop_rate", "used_capacity", "used_capacity_mean", "gate_entropy_mean",
                    "mean_topk_prob", "cv_mean")


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("case,world_size,flags", [(c, w, f) for c, _, w, f in STRATEGY_LAYOUTS],
                         ids=[f"{c}-{i}" for c, i, _, _ in STRATEGY_LAYOUTS])
def test_routing_strategies_same_under_layouts(case, world_size, flags, tmp_path, tmp_path_factory):
    ref, got = _run_against_one_process(_STRATEGY_REFERENCE, case, _detailed_argv(STRATEGY_CASES[case]), world_size,
                                        flags, tmp_path, tmp_path_factory)
    assert_same_run(got, ref)  # includes the hash tables (persistent buffers)
    if case.startswith("hash"):
        assert {k for k in ref["state"] if "router" in k} == {"layers.1.ffn.router.table", "layers.3.ffn.router.table"}
    for r, g in zip(ref["records"], got["records"]):
        for key in STRATEGY_METRICS:
            assert _close(g[f"moe/{key}"], r[f"moe/{key}"]), f"step {r['step']} {key}: got {g[f'moe/{key}']}, single {r[f'moe/{key}']}"
    assert ref["records"][-1]["moe/drop_rate"] > 0


@pytest.mark.multiprocess
# ---- sweep strategy axis and the plots ----
def test_sweep_strategy_axis_summary_and_plots(tmp_path):
    """--strategies puts each strategy's flags into its runs; the summary has a strategy column and the
    new metric columns; plot_frontier colours by strategy; plot_routing draws drop rate against capacity
    factor per k (from a sweep summary or bench_routing's capacity lines) and the gate balance."""
    out = tmp_path / "sweep"
    argv = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--out", str(out), "--capacity-factors", "0,1.0",
            "--strategies", "hard-topk,expert-choice,hash", "--seeds", "17", "--max-steps", "2", "--parallel", "2",
            "--", "--device", "cpu", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2",
            "--max-seq-length", "16", "--global-batch-size", "4", "--eval-iters", "1", "--log-interval", "1"]
    p = subprocess.run(argv, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    runs = [r for r in rows if r["row"] == "run"]
    assert [(r["strategy"], r["capacity_factor"]) for r in runs] == [
        (s, cf) for cf in ("0.0", "1.0") for s in ("hard-topk", "expert-choice", "hash")]
    for r in runs:
        cfg = json.loads((out / f"{r['config']}_s17" / "config.json").read_text())
        want = {"hard-topk": ("token-choice", "hard"), "expert-choice": ("expert-choice", "soft"),
                "hash": ("hash", "soft")}[r["strategy"]]
        assert (cfg["moe_routing"], cfg["moe_gate"]) == want
        assert r["gate_entropy"] != "" and r["mean_topk_prob"] != ""
        assert (r["val_loss_expert_choice"] != "") == (r["strategy"] == "expert-choice")
        assert (float(r["drop_rate"]) > 0) == (r["strategy"] == "expert-choice" or r["capacity_factor"] == "1.0")
    p = subprocess.run(argv[:2] + ["--out", str(tmp_path / "bad"), "--strategies", "soft-topk,best"], cwd=tmp_path,
                       env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--strategies" in p.stderr, p.stderr
    pytest.importorskip("matplotlib")
    import plot_frontier
    import plot_routing
    points = plot_frontier.read_configs(str(out / "summary.csv"))
    assert {q["strategy"] for q in points} == {"hard-topk", "expert-choice", "hash"}
    assert plot_frontier.main([str(out / "summary.csv")]) == 0 and (out / "frontier.png").stat().st_size > 10_000
    assert plot_routing.main(["drops", str(out / "summary.csv"), "--out", str(tmp_path / "d1.png")]) == 0
    assert plot_routing.main(["gate-balance", str(out / "summary.csv"), "--out", str(tmp_path / "g.png")]) == 0
    cap = tmp_path / "cap.jsonl"
    for k in ("1", "2"):
        args = [a if a != "2" or i != TINY_BENCH.index("--top-k") + 1 else k for i, a in enumerate(TINY_BENCH)]
        import bench_routing
        assert bench_routing.main(["capacity", *args, "--capacity-factors", "0.5,1.0,1.5", "--out", str(cap)]) == 0
    series = plot_routing.drop_series(str(cap))
    assert {key[0] for key in series} == {1, 2} and all(len(v) == 3 for v in series.values())
    assert plot_routing.main(["drops", str(cap), "--out", str(tmp_path / "d2.png")]) == 0
    for png in ("d1.png", "g.png", "d2.png"):
        assert (tmp_path / png).stat().st_size > 10_000


