"""Routing: the top-k router (softmax and sigmoid scores) against brute force, expert capacity (token
dropping) by hand and against a dense reference, aux-loss-free bias balancing, the routing flags, and
capacity and bias balancing under parallel layouts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint as ckpt
import minimal_pretrain
from moe_layers import TopKRouter, capacity_mask, expert_capacity, route_topk, update_expert_biases
from parallel import Topology

from helpers import (MILD, _assert_checkpoints_equal, _base_argv, _ckpt_argv, _close, _cuda_moe_for_sync_check,
                     _detailed_argv, _expected_kept, _reference, _run_against_one_process, _train_in_process,
                     assert_same_run, dense_expert, make_moe, run_without_host_sync, skewed_router_case)


# --------------------------------------------------------------------------------------------------
# TopKRouter vs brute force
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("E,k", [(8, 2), (5, 3), (4, 1)])
def test_router_matches_bruteforce(normalize, E, k):
    torch.manual_seed(1)
    T, d = 37, 12
    router = TopKRouter(d, E, k, normalize_topk=normalize)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
    x = torch.randn(T, d)
    with torch.no_grad():
        r = router(x)

    assert r.indices.shape == (T, k) and r.weights.shape == (T, k)
    assert r.probs.shape == (T, E) and r.logits.shape == (T, E)
    assert r.weights.dtype == torch.float32 and r.probs.dtype == torch.float32

    X, W = x.double().tolist(), router.weight.detach().double().tolist()
    for t in range(T):
        logits = [sum(a * b for a, b in zip(X[t], W[e])) for e in range(E)]
        mx = max(logits)
        ex = [math.exp(v - mx) for v in logits]
        probs = [v / sum(ex) for v in ex]
        top = sorted(range(E), key=lambda e: -probs[e])[:k]
        denom = sum(probs[e] for e in top) if normalize else 1.0
        expected_w = {e: probs[e] / denom for e in top}

        got_idx = [int(i) for i in r.indices[t]]
        assert set(got_idx) == set(top), f"token {t}: top-{k} {sorted(got_idx)} != {sorted(top)}"
        assert len(set(got_idx)) == k
        for j, e in enumerate(got_idx):
            assert float(r.weights[t, j]) == pytest.approx(expected_w[e], rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(r.logits[t].double().numpy(), logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.probs[t].double().numpy(), probs, rtol=1e-5, atol=1e-7)
    if normalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), rtol=1e-6, atol=1e-6)
    elif k < E:
        assert (r.weights.sum(-1) < 1.0 - 1e-3).any()  # raw probabilities of a strict subset: not renormalised


# --------------------------------------------------------------------------------------------------
# Expert capacity (token dropping)
# --------------------------------------------------------------------------------------------------
# A constructed routing: 2 sequences x 3 positions, flattened [b * T] as t0..t5; 3 experts, top-2.
CAP_INDICES = [[0, 1], [0, 2], [0, 1], [1, 0], [0, 2], [2, 1]]  # counts: e0 5, e1 4, e2 3
CAP_SCORES = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.45, 0.35, 0.2],
              [0.3, 0.5, 0.2], [0.55, 0.05, 0.4], [0.1, 0.3, 0.6]]


def _cap_mask(capacity, policy):
    idx = torch.tensor(CAP_INDICES)
    counts = torch.bincount(idx.reshape(-1), minlength=3).float()
    return capacity_mask(idx, torch.tensor(CAP_SCORES), counts, capacity, policy, seq_len=3).tolist()


def test_expert_capacity_formula():
    assert expert_capacity(6, 2, 3, 0.5) == 2            # ceil(0.5 * 12 / 3)
    assert expert_capacity(100, 1, 10, 1.1) == 11        # 11.000000000000002 must not become 12
    assert expert_capacity(10, 2, 4, 1.25) == 7          # ceil(6.25)
    assert expert_capacity(4, 1, 64, 1.0) == 1           # at least one slot


def test_capacity_position_drops_latest_positions_by_hand():
    # Priority: position 0 of both sequences (t0, t3), then position 1 (t1, t4), then 2 (t2, t5).
    # e0 {t0,t1,t2,t3,t4} keeps t0, t3; e1 {t0,t2,t3,t5} keeps t0, t3; e2 {t1,t4,t5} keeps t1, t4.
    assert _cap_mask(2, "position") == [[True, True], [False, True], [False, False],
                                        [True, True], [False, True], [False, False]]
    # One sequence of 6 (no seq_len): plain token order; e0 keeps t0, t1, e1 t0, t2, e2 t1, t4.
    idx = torch.tensor(CAP_INDICES)
    kept = capacity_mask(idx, torch.tensor(CAP_SCORES), torch.bincount(idx.reshape(-1)).float(), 2, "position")
    assert kept.tolist() == [[True, True], [True, True], [False, True], [False, False], [False, True], [False, False]]


def test_capacity_probs_drops_lowest_scores_by_hand():
    # e0 scores t0 .5 t1 .6 t2 .45 t3 .3 t4 .55 -> keeps t1, t4; e1 t0 .3 t2 .35 t3 .5 t5 .3 -> t3, t2;
    # e2 t1 .3 t4 .4 t5 .6 -> t5, t4.
    assert _cap_mask(2, "probs") == [[False, False], [True, False], [False, True],
                                     [True, False], [True, True], [True, False]]
    # Capacity 3: e1's tie at .3 between t0 and t5 goes to the earlier token.
    assert _cap_mask(3, "probs") == [[True, True], [True, True], [False, True],
                                     [True, False], [True, True], [True, False]]


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_capacity_moe_matches_reference(policy, renorm, score):
    """SparseMoE with capacity on a skewed routing of [2, 20] tokens == the dense reference in which each
    dropped assignment has weight zero (and, with renormalisation, the kept weights sum to 1); the
    statistics record the dropped assignments and fully dropped tokens."""
    base, x = skewed_router_case(4, 2, [1], T=40, **MILD)
    moe = make_moe(d=16, f=24, E=4, k=2, capacity_factor=1.0, drop_policy=policy, renorm_after_drop=renorm,
                   router_score=score)
    moe.load_state_dict(base.state_dict())
    x = x.view(2, 20, 16)
    moe.train()
    moe.record_routing = True
    out, _ = moe(x)
    with torch.no_grad():
        r = moe.router(x.reshape(-1, 16))
        idx, w = r.indices.tolist(), r.weights.double()
        kept = _expected_kept(idx, r.scores.tolist(), expert_capacity(40, 2, 4, 1.0), policy, seq_len=20)
        keep = torch.tensor(kept, dtype=torch.float64)
        w = w * keep
        if renorm:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        w1, w2 = moe.experts.w_gate_up.double(), moe.experts.w_down.double()
        xs = x.reshape(-1, 16).double()
        ref = torch.zeros_like(xs)
        for t in range(40):
            for j in range(2):
                if kept[t][j]:
                    ref[t] += w[t, j] * dense_expert(xs[t:t + 1], w1[idx[t][j]], w2[idx[t][j]])[0]
    dropped = sum(not v for row in kept for v in row)
    fully = sum(not any(row) for row in kept)
    assert dropped > 0, "the construction should overflow an expert"
    torch.testing.assert_close(out.reshape(-1, 16).double(), ref, rtol=1e-5, atol=1e-6)
    assert moe.last_routing.drops.tolist() == [dropped, fully]
    if renorm:
        kept_rows = keep.sum(-1) > 0
        torch.testing.assert_close(w.sum(-1)[kept_rows], torch.ones(int(kept_rows.sum()), dtype=torch.float64))


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_large_capacity_equals_no_drop_exactly(policy):
    """C = E / k gives every expert room for every token: outputs and gradients bit-identical to no-drop."""
    base, x = skewed_router_case(4, 2, [1], T=30, **MILD)
    capped = make_moe(d=16, f=24, E=4, k=2, capacity_factor=2.0, drop_policy=policy)
    capped.load_state_dict(base.state_dict())
    x = x.view(3, 10, 16)
    results = []
    for moe in (base, capped):
        xi = x.clone().requires_grad_(True)
        out, loss = moe(xi)
        (out.pow(2).sum() + loss).backward()
        results.append((out, xi.grad, [p.grad.clone() for p in moe.parameters()]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


class _PoisonTail(torch.autograd.Function):
    """Rows at and after ends[-1] become NaN, forward and backward: what the grouped GEMM leaves in rows
    outside its groups is undefined (uninitialised memory), so the layer must never let them through."""

    @staticmethod
    def forward(ctx, t, ends):
        ctx.end = int(ends[-1])
        out = t.clone()
        out[ctx.end:] = float("nan")
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.end:] = float("nan")
        return g, None


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_dropped_rows_never_reach_output_or_gradients(policy, monkeypatch):
    """With every expert local, dropped assignments are the only rows past the last group: their
    undefined expert outputs and input gradients must be masked, not multiplied by a zero weight."""
    import moe_layers
    for name in ("_grouped_swiglu", "_grouped_swiglu_eager"):
        real = getattr(moe_layers, name)
        monkeypatch.setattr(moe_layers, name, lambda x, w1, w2, ends, real=real: _PoisonTail.apply(
            real(_PoisonTail.apply(x, ends), w1, w2, ends), ends))
    base, x = skewed_router_case(4, 2, [1], T=40, **MILD)
    moe = make_moe(d=16, f=24, E=4, k=2, capacity_factor=1.0, drop_policy=policy, expert_impl="grouped")
    moe.load_state_dict(base.state_dict())
    x = x.view(2, 20, 16).requires_grad_(True)
    out, loss = moe(x)
    (out.pow(2).sum() + loss).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
    # The same layer through the per-expert loop (no rows outside groups are ever computed) agrees.
    ref = make_moe(d=16, f=24, E=4, k=2, capacity_factor=1.0, drop_policy=policy, expert_impl="loop")
    ref.load_state_dict(base.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    out_r, loss_r = ref(xr)
    (out_r.pow(2).sum() + loss_r).backward()
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------
# Sigmoid router scores and aux-loss-free bias balancing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sigmoid_router_matches_bruteforce(normalize, with_bias):
    torch.manual_seed(5)
    T, d, E, k = 23, 12, 6, 2
    router = TopKRouter(d, E, k, normalize_topk=normalize, score="sigmoid", expert_bias=with_bias)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        if with_bias:
            router.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.5, 0.0, -0.4]))
    x = torch.randn(T, d)
    with torch.no_grad():
        r = router(x)
    X, W = x.double().tolist(), router.weight.double().tolist()
    b = router.expert_bias.tolist() if with_bias else [0.0] * E
    for t in range(T):
        s = [1 / (1 + math.exp(-sum(p * q for p, q in zip(X[t], W[e])))) for e in range(E)]
        top = sorted(range(E), key=lambda e: -(s[e] + b[e]))[:k]  # chosen with the bias ...
        denom = sum(s[e] for e in top) if normalize else 1.0     # ... weighted without it
        assert sorted(r.indices[t].tolist()) == sorted(top), t
        for j, e in enumerate(r.indices[t].tolist()):
            assert float(r.weights[t, j]) == pytest.approx(s[e] / denom, rel=1e-5)
        np.testing.assert_allclose(r.scores[t].numpy(), s, rtol=1e-5)
        np.testing.assert_allclose(r.probs[t].numpy(), np.array(s) / sum(s), rtol=1e-5)  # for aux and entropy


def test_bias_steers_softmax_choice_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(-1)[0]
    r = route_topk(logits, 2, "softmax", False, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert sorted(r.indices[0].tolist()) == [0, 3]  # expert 3 chosen only because of its bias
    got = dict(zip(r.indices[0].tolist(), r.weights[0].tolist()))
    assert got[0] == pytest.approx(float(p[0])) and got[3] == pytest.approx(float(p[3]))


def test_bias_update_by_hand():
    moe = make_moe(E=4, k=2, bias_update_rate=0.1)
    assert "router.expert_bias" in moe.state_dict() and "step_load" not in moe.state_dict()
    assert "router.expert_bias" not in dict(moe.named_parameters())
    moe.train()
    xs = [torch.randn(10, 16), torch.randn(7, 16)]
    expected = torch.zeros(4)
    for x in xs:  # two microbatches of one step
        moe(x)
        expected += torch.bincount(moe.router(x).indices.reshape(-1), minlength=4).float()
    moe.eval()
    moe(torch.randn(5, 16))  # evaluation adds nothing
    assert torch.equal(moe.step_load, expected)
    update_expert_biases([moe], Topology())
    mean = expected.mean()
    assert moe.router.expert_bias.tolist() == pytest.approx([0.1 * float(torch.sign(mean - c)) for c in expected])
    assert torch.equal(moe.step_load, torch.zeros(4))
    moe.step_load.copy_(torch.tensor([3.0, 5.0, 4.0, 4.0]))  # mean 4: moves -0.1 and +0.1 ... and 0
    before = moe.router.expert_bias.clone()
    update_expert_biases([moe], Topology())
    assert (moe.router.expert_bias - before).tolist() == pytest.approx([0.1, -0.1, 0.0, 0.0])
    plain = make_moe(E=4, k=2)
    update_expert_biases([plain], Topology())  # bias balancing off: nothing to do, no buffer
    assert plain.router.expert_bias is None


def _cv_under_training(rate: float, score: str, steps: int = 80) -> np.ndarray:
    """A MoE layer whose router favours expert 0 (inputs share a direction u that expert 0's router row
    leans towards), trained with the aux loss and z-loss off; the load CV of each step's routing."""
    torch.manual_seed(0)
    moe = make_moe(d=16, f=16, E=4, k=2, std=0.5, aux_loss_coef=0.0, z_loss_coef=0.0, router_score=score,
                   bias_update_rate=rate)
    u = F.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        moe.router.weight[0] += u
    opt = torch.optim.Adam(moe.parameters(), lr=1e-3)
    cvs = []
    for _ in range(steps):
        x = 2.0 * u + torch.randn(128, 16)
        with torch.no_grad():
            counts = torch.bincount(moe.router(x).indices.reshape(-1), minlength=4).float()
        cvs.append(float(counts.std(correction=0) / counts.mean()))
        out, loss = moe(x)
        (out.pow(2).mean() + loss).backward()
        opt.step()
        opt.zero_grad()
        update_expert_biases([moe], Topology())
    return np.array(cvs)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_balancing_drives_load_cv_down(score):
    """Measured (seed 0): CV 0.46 at the start; over the last 10 of 80 steps 0.18 (softmax) and 0.08
    (sigmoid) with rate 0.01, against 0.47 and 0.48 without the bias."""
    with_bias, without = _cv_under_training(0.01, score), _cv_under_training(0.0, score)
    assert with_bias[0] == without[0] > 0.4, (with_bias[0], without[0])  # the skewed start
    assert with_bias[-10:].mean() < 0.5 * with_bias[0], with_bias
    assert with_bias[-10:].mean() < 0.5 * without[-10:].mean(), (with_bias, without)


def test_resume_with_capacity_and_bias_is_bit_exact(tmp_path, monkeypatch):
    """The expert biases are persistent buffers: saved in the checkpoint and restored on resume, so a
    resumed run with capacity and bias balancing continues exactly as the straight one."""
    flags = ["--moe-capacity-factor", "1.0", "--moe-drop-policy", "probs", "--moe-router-score", "sigmoid",
             "--moe-bias-update-rate", "0.01", "--max-steps", "6"]
    straight = _train_in_process(_ckpt_argv(tmp_path / "a", *flags, "--save-interval", "3"), monkeypatch)
    half = tmp_path / "a" / "checkpoints" / "step_00000003"
    resumed = _train_in_process(_ckpt_argv(tmp_path / "b", *flags, "--resume", str(half)), monkeypatch)
    assert resumed.losses == straight.losses[3:]
    assert [r["moe/bias_abs_mean"] for r in resumed.records] == [r["moe/bias_abs_mean"] for r in straight.records[3:]]
    _assert_checkpoints_equal(tmp_path / "a" / "checkpoints" / "step_00000006",
                              tmp_path / "b" / "checkpoints" / "step_00000006")
    _, saved = ckpt.load_consolidated(half, with_optimizer=False)
    biases = [k for k in saved if k.endswith("router.expert_bias")]
    assert len(biases) == 2 and all(saved[k].abs().max() > 0 for k in biases), biases
    assert not any("step_load" in k for k in saved)


# --------------------------------------------------------------------------------------------------
# Router input jitter (--moe-input-jitter-eps)
# --------------------------------------------------------------------------------------------------
def test_input_jitter_scales_the_router_input_in_training_only():
    """With the identity as router weight the logits are the router's input: in training each element is x
    times its own noise in [1 - eps, 1 + eps]; in eval mode exactly x."""
    d, eps = 6, 0.1
    router = TopKRouter(d, d, 2, input_jitter_eps=eps)
    with torch.no_grad():
        router.weight.copy_(torch.eye(d))
    x = torch.rand(200, d) + 1.0  # away from 0: the ratio is the noise
    noise = router.logits(x) / x
    assert noise.min() >= 1 - eps - 1e-6 and noise.max() <= 1 + eps + 1e-6, (noise.min(), noise.max())
    assert noise.std() > eps / 3 and noise.unique().numel() > 1000  # uniform: std eps / sqrt(3); one draw each
    router.eval()
    assert torch.equal(router.logits(x), x)


def test_input_jitter_off_is_the_plain_layer_and_on_changes_the_routing_only():
    """eps 0 draws nothing and computes what the layer without the option computes; eps > 0 changes a
    training forward (its routing) but not the experts' input, and leaves eval forwards alone."""
    x = torch.randn(2, 20, 16)
    plain, off, on = make_moe(), make_moe(input_jitter_eps=0.0), make_moe(input_jitter_eps=0.3)  # the same weights
    state = torch.get_rng_state()
    out_plain, loss_plain = plain(x)
    out_off, loss_off = off(x)
    assert torch.equal(torch.get_rng_state(), state)  # no draw: dropout and every later draw are unchanged
    assert torch.equal(out_off, out_plain) and torch.equal(loss_off, loss_plain)
    inputs = []
    on.experts.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    out_on, loss_on = on(x)
    assert not torch.equal(out_on, out_plain) and not torch.equal(loss_on, loss_plain)
    rows = inputs[0]  # every row the experts got is a token's own hidden state, unjittered
    assert (rows[:, None, :] == x.reshape(-1, 16)[None]).all(-1).any(-1).all()
    on.eval(), plain.eval()
    assert torch.equal(on(x)[0], plain(x)[0])


# --------------------------------------------------------------------------------------------------
# Routing flags
# --------------------------------------------------------------------------------------------------
ROUTING_BAD_FLAGS = [(["--moe-capacity-factor", "nan"], "--moe-capacity-factor"),
                     (["--moe-capacity-factor", "inf"], "--moe-capacity-factor"),
                     (["--moe-capacity-factor", "-1"], "--moe-capacity-factor"),
                     (["--moe-bias-update-rate", "nan"], "--moe-bias-update-rate"),
                     (["--moe-bias-update-rate", "-0.1"], "--moe-bias-update-rate"),
                     (["--moe-input-jitter-eps", "1"], "--moe-input-jitter-eps"),
                     (["--moe-input-jitter-eps", "-0.1"], "--moe-input-jitter-eps"),
                     (["--moe-input-jitter-eps", "nan"], "--moe-input-jitter-eps"),
                     (["--moe-routing", "hash", "--moe-input-jitter-eps", "0.1"], "--moe-input-jitter-eps")]


@pytest.mark.parametrize("flags,name", ROUTING_BAD_FLAGS, ids=[" ".join(f) for f, _ in ROUTING_BAD_FLAGS])
def test_routing_bad_flags_exit_2(flags, name, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert minimal_pretrain.main(flags + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and name in err[0], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:  # argparse's own choices
        minimal_pretrain.parse_args(["--moe-drop-policy", "random"])
    assert e.value.code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_no_host_sync_with_capacity_and_bias(policy):
    """Capacity selection, renormalisation, the drop statistics and the bias update stay on the device."""
    moe, x, stats = _cuda_moe_for_sync_check(capacity_factor=1.0, drop_policy=policy, renorm_after_drop=True,
                                             router_score="sigmoid", bias_update_rate=1e-3)

    def step():
        out, loss = moe(x)
        stats.end_microbatch()
        (out.float().sum() + loss).backward()
        update_expert_biases([moe], moe.topo)
        return out
    out = run_without_host_sync(step)
    assert torch.isfinite(out.float()).all() and moe.router.expert_bias.abs().sum() > 0
    assert stats.drops[-1][0, 0] > 0  # capacity 1.0 on a random router drops something


# --------------------------------------------------------------------------------------------------
# Capacity and bias balancing under parallel layouts. Every EP rank routes all tokens of its
# microbatch with the replicated router, so the per-expert capacity and the dropped set are those
# of one process; the bias update uses the step's counts summed over DP, and each stage updates
# its own layers. So every layout must reproduce the single process: losses, gradient norms, final
# parameters AND expert biases (full_state_dict includes persistent buffers), and the logged drop
# and bias metrics.
# --------------------------------------------------------------------------------------------------
ROUTING_CASES = {
    "position-softmax": ["--moe-capacity-factor", "1.0", "--moe-drop-policy", "position",
                         "--moe-bias-update-rate", "0.01"],
    "probs-sigmoid-renorm": ["--moe-capacity-factor", "1.0", "--moe-drop-policy", "probs", "--moe-renorm-after-drop",
                             "--moe-router-score", "sigmoid", "--moe-bias-update-rate", "0.01"],
}
ROUTING_LAYOUTS = [  # (case, id, world size, flags)
    ("position-softmax", "tp2-ep2", 2, ["--tensor-parallel-size", "2"]),
    ("position-softmax", "dp2", 2, []),
    ("position-softmax", "pp2", 2, ["--pipeline-parallel-size", "2"]),
    ("probs-sigmoid-renorm", "tp2-ep2", 2, ["--tensor-parallel-size", "2"]),
    ("probs-sigmoid-renorm", "dp2", 2, []),
]
_ROUTING_REFERENCE = {}


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("case,world_size,flags", [(c, w, f) for c, _, w, f in ROUTING_LAYOUTS],
                         ids=[f"{c}-{i}" for c, i, _, _ in ROUTING_LAYOUTS])
def test_capacity_and_bias_same_under_layouts(case, world_size, flags, tmp_path, tmp_path_factory):
    ref, got = _run_against_one_process(_ROUTING_REFERENCE, case, _detailed_argv(ROUTING_CASES[case]), world_size,
                                        flags, tmp_path, tmp_path_factory)
    assert_same_run(got, ref)  # includes the expert biases
    biases = sorted(k for k in ref["state"] if k.endswith("router.expert_bias"))
    assert biases == ["layers.1.ffn.router.expert_bias", "layers.3.ffn.router.expert_bias"], biases
    for name in biases:  # 3 steps of +-0.01 each (or 0 for an expert exactly at the mean)
        b = ref["state"][name]
        assert b.abs().max() > 0 and torch.allclose(b * 100, (b * 100).round(), atol=1e-4), b
    assert any(r["moe/drop_rate"] > 0 for r in ref["records"]), [r["moe/drop_rate"] for r in ref["records"]]
    keys = [f"moe/{m}" for m in ("drop_rate", "token_drop_rate", "bias_abs_mean")]
    keys += [f"moe/layer_{l}/{m}" for l in (1, 3) for m in ("drop_rate", "token_drop_rate", "bias_abs_mean")]
    for r, g in zip(ref["records"], got["records"]):
        for key in keys:
            assert _close(g[key], r[key]), f"step {r['step']} {key}: got {g[key]}, single {r[key]}"
        assert 0 <= r["moe/token_drop_rate"] <= r["moe/drop_rate"] * 2


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
def test_input_jitter_same_under_tp2(tmp_path, tmp_path_factory):
    """TP ranks share the dropout seed, so they draw the same jitter, and the same as one process (DP1, PP1):
    TP2/EP2 trains as one process does. The jitter acts: one process differs from the run without it."""
    argv = _base_argv("mixed") + ["--moe-input-jitter-eps", "0.1"]
    ref, got = _run_against_one_process(_ROUTING_REFERENCE, "input-jitter", argv, 2, ["--tensor-parallel-size", "2"],
                                        tmp_path, tmp_path_factory)
    assert_same_run(got, ref)
    plain = _reference("mixed", tmp_path_factory)
    assert all(a != b for a, b in zip(ref["grad_norms"], plain["grad_norms"])), (ref["grad_norms"], plain["grad_norms"])
