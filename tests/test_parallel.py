"""Distributed equivalence on real gloo processes (CPU): every layout (DP, TP/EP, PP with both schedules and
their combinations) reproduces the single process on the same global batch: every step's loss and gradient
norm and the final (gathered) parameters within helpers.REL_TOL (1e-5 relative in fp32; the comment there
says how it was chosen). Also the router gradient under EP, and layouts refused before any process group
starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minimal_pretrain

from helpers import ROOT, _base_argv, _launch, _reference, assert_same_run, run_ranks


MODULE = Path(__file__).stem  # the worker subprocesses import this file by name


def test_expert_parallel_size_is_a_multiple_of_tp(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flags in ([], ["--expert-parallel-size", "2"]):  # unset or equal to TP: accepted
        args = minimal_pretrain.parse_args(["--tensor-parallel-size", "2"] + flags)
        assert args.tensor_parallel_size == 2
    assert minimal_pretrain.main(["--tensor-parallel-size", "2", "--expert-parallel-size", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--expert-parallel-size 1 must be a multiple of --tensor-parallel-size 2" in err, err


@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clipped", "not-clipped"])
def test_clip_inside_a_fused_optimizer_matches_the_plain_clip(max_norm):
    """clip_grads_ with a fused AdamW hands the clip to the optimizer's grad_scale: the same parameters (to
    rounding: a division instead of a product) and the same clipped gradients as scaling them first; with no
    clip needed the scale is 1 and the step is bit-identical."""
    from data_parallel import clip_grads_, grad_norm
    from parallel import Topology
    torch.manual_seed(0)
    runs = []
    for hand_over in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(32))]
        for p in params:
            p.grad = 3.0 * torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)  # fused AdamW runs on the CPU too
        norm = grad_norm(params, Topology())
        clip_grads_(params, norm, max_norm, opt if hand_over else None)
        assert hasattr(opt, "grad_scale") == hand_over
        opt.step()
        runs.append(params)
    for plain, fused in zip(*runs):
        if max_norm > float(norm):
            assert torch.equal(plain, fused) and torch.equal(plain.grad, fused.grad)
        else:
            torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
            torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-6, atol=0)
    assert float(grad_norm(runs[1], Topology())) == pytest.approx(min(max_norm, float(norm)), rel=1e-5)


LAYOUTS = [  # (id, world size, extra flags, model)
    ("dp2-moe", 2, [], "mixed"),
    ("dp2-dense", 2, [], "dense"),
    ("tp2-ep2-moe", 2, ["--tensor-parallel-size", "2"], "mixed"),
    ("tp2-dense", 2, ["--tensor-parallel-size", "2"], "dense"),
    ("pp2-gpipe-moe", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "gpipe"], "mixed"),
    ("pp2-1f1b-moe", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "1f1b"], "mixed"),
    ("pp2-1f1b-dense", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "1f1b"], "dense"),
    ("tp2-pp2-moe", 4, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], "mixed"),
    ("tp4-ep4-moe8", 4, ["--tensor-parallel-size", "4"], "all8"),
    ("dp2-tp2-pp2-1f1b-moe", 8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], "mixed"),
    ("dp2-tp2-pp2-gpipe-moe", 8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                  "--pipeline-schedule", "gpipe"], "mixed"),
]


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("world_size,flags,moe", [l[1:] for l in LAYOUTS], ids=[l[0] for l in LAYOUTS])
def test_layout_matches_single_process(world_size, flags, moe, tmp_path, tmp_path_factory):
    ref = _reference(moe, tmp_path_factory)
    assert_same_run(_launch(world_size, _base_argv(moe) + flags, tmp_path), ref)


@pytest.mark.multiprocess
def test_dp_gradient_reduce_in_bf16_is_the_one_process_run_to_bf16_rounding(tmp_path, tmp_path_factory):
    """--grad-reduce-dtype bf16: DP2's gradient sum is rounded to bf16 once per step, so the run follows one
    process to about bf16's 2^-9 (not fp32's 1e-5: the rounding does happen, or the flag would be ignored)."""
    ref = _reference("mixed", tmp_path_factory)
    got = _launch(2, _base_argv("mixed") + ["--grad-reduce-dtype", "bf16"], tmp_path)
    assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6)  # the first forward precedes any reduce
    for key in ("losses", "grad_norms"):
        assert got[key] == pytest.approx(ref[key], rel=4e-3), key
    errs = {name: ((got["state"][name] - b).norm() / b.norm()).item() for name, b in ref["state"].items()}
    assert max(errs.values()) <= 1e-2, max(errs.items(), key=lambda kv: kv[1])
    assert max(errs.values()) > 1e-5, "the parameters are those of the fp32 reduce: bf16 was not used"


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
def test_pp_uneven_split_matches_single_process(tmp_path, tmp_path_factory):
    """3 stages over 4 layers: the balanced split gives the remainder to the first stage (2+1+1)."""
    ref = _reference("mixed", tmp_path_factory)
    assert_same_run(_launch(3, _base_argv("mixed") + ["--pipeline-parallel-size", "3"], tmp_path), ref)


# --------------------------------------------------------------------------------------------------
# Router gradient under EP: each TP rank sees only its local experts' share of the combine
# weights; the all-reduce on the routing-weight gradient must make the router gradient whole.
# --------------------------------------------------------------------------------------------------
def _router_grad_worker(out_path: str, disable_fix: str) -> None:
    import torch.distributed as dist
    import moe_layers
    from moe_config import MoEConfig
    from parallel import Topology, init_topology, shard_of
    if disable_fix == "1":  # negative control: what the gradient looks like without the fix
        moe_layers.all_reduce_grad_tp = lambda w, topo: w
    topo = init_topology(2, 1, "cpu")
    torch.manual_seed(0)
    d, f, E, k = 16, 24, 4, 2
    moe = MoEConfig(num_experts=E, num_experts_per_token=k, aux_loss_coef=0.1, z_loss_coef=0.01)
    ref = moe_layers.SparseMoE(moe, d, f, Topology())
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    tp = moe_layers.SparseMoE(moe, d, f, topo)
    with torch.no_grad():
        for (_, p_ref), (_, p) in zip(ref.named_parameters(), tp.named_parameters()):
            p.copy_(shard_of(p_ref, p, topo.tp_rank, topo.tp))
    x = torch.randn(2, 10, d)
    results = {}
    for name, m in (("ref", ref), ("tp", tp)):
        xi = x.clone().requires_grad_(True)
        out, loss = m(xi)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + loss).backward()
        results[name] = (out.detach(), loss.detach(), m.router.weight.grad.clone(), xi.grad.clone())
    torch.save(results, f"{out_path}.{topo.rank}")
    dist.barrier()
    dist.destroy_process_group()


def _launch_router_case(tmp: Path, disable_fix: bool) -> list:
    run_ranks(2, MODULE, "_router_grad_worker", [str(tmp / "r"), "1" if disable_fix else "0"], timeout=120)
    return [torch.load(tmp / f"r.{r}") for r in range(2)]


@pytest.mark.multiprocess
def test_ep_router_gradient_is_whole_and_aux_counted_once(tmp_path):
    for res in _launch_router_case(tmp_path, disable_fix=False):
        out_ref, loss_ref, g_ref, x_ref = res["ref"]
        out, loss, g, xg = res["tp"]
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)  # aux/z once, not TP times
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)  # router gradient whole on every rank
        torch.testing.assert_close(xg, x_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_ep_router_gradient_check_detects_missing_all_reduce(tmp_path):
    """Negative control for the test above: without the routing-weight gradient all-reduce the router
    gradient on each rank is only its local experts' part, and the comparison catches it."""
    results = _launch_router_case(tmp_path, disable_fix=True)
    for res in results:
        g_ref, g = res["ref"][2], res["tp"][2]
        assert (g - g_ref).abs().max() > 1e-3 * g_ref.abs().max()


# --------------------------------------------------------------------------------------------------
# Refused layouts: one clear line, exit code 2, before any process group is started.
# --------------------------------------------------------------------------------------------------
REFUSED = [
    ("world-not-divisible", 4, ["--tensor-parallel-size", "3"], "--tensor-parallel-size 3"),
    ("heads", 4, ["--tensor-parallel-size", "4", "--num-attention-heads", "2", "--num-key-value-heads", "2",
                  "--hidden-size", "32"], "--num-attention-heads 2"),
    ("kv-heads", 2, ["--tensor-parallel-size", "2", "--num-key-value-heads", "1"], "--num-key-value-heads 1"),
    ("experts", 4, ["--tensor-parallel-size", "4", "--num-key-value-heads", "4", "--num-experts", "6"],
     "--num-experts 6"),
    ("layers-fewer-than-stages", 8, ["--pipeline-parallel-size", "8", "--num-layers", "4"], "--num-layers 4"),
    ("microbatches", 2, ["--global-batch-size", "8", "--num-microbatches", "3"], "--num-microbatches 3"),
    ("batch-not-divisible-by-dp", 4, ["--global-batch-size", "6"], "--global-batch-size 6"),
]


@pytest.mark.parametrize("world_size,flags,expect", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_layout(world_size, flags, expect, monkeypatch, capsys):
    import minimal_pretrain
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert minimal_pretrain.main(flags + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    import torch.distributed as dist
    assert not dist.is_initialized()


@pytest.mark.multiprocess
def test_refused_layout_from_the_command_line(tmp_path):
    env = dict(os.environ, WORLD_SIZE="4")
    r = subprocess.run([sys.executable, str(ROOT / "minimal_pretrain.py"), "--tensor-parallel-size", "3"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--tensor-parallel-size" in r.stderr
