"""bf16 expert weight copies (mixed_precision.ExpertWeightCopies): cast once per optimizer step, gradients added
into the fp32 masters. fp32 += bf16 sums in fp32, so the result must equal the cast path exactly, in one
process and under DP, TP/EP and PP."""
from __future__ import annotations


import pytest
import torch

from moe_config import MoEConfig
from moe_layers import SparseMoE
from parallel import Topology

from helpers import _assert_checkpoints_equal, _base_argv, _ckpt_argv, _launch, _train_in_process


def _bf16_moe_microbatches(copies: bool):
    from mixed_precision import ExpertWeightCopies
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(num_experts=4, num_experts_per_token=2), 16, 8, Topology())
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    ready = []  # (master, its gradient when reported complete)
    kept = ExpertWeightCopies([moe.experts], torch.bfloat16, lambda m: ready.append((m, m.grad.clone())))\
        if copies else None
    gen = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(2):  # two microbatches: the second accumulates
        x = torch.randn(2, 6, 16, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, loss = moe(x)
        (out.float().square().mean() + loss).backward()
        outs.append(out.detach())
    return moe, outs, ready, kept


def test_expert_weight_copies_equal_the_cast_path_bit_for_bit():
    ref, ref_outs, _, _ = _bf16_moe_microbatches(copies=False)
    moe, outs, ready, kept = _bf16_moe_microbatches(copies=True)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    assert all(c.grad is None for c in kept.copies)  # freed after each add
    # each master was reported complete once per microbatch (what the DP all-reduce counts), and only
    # after this microbatch's gradient was added: the last report already holds the final gradient
    masters = (moe.experts.w_gate_up, moe.experts.w_down)
    assert sorted(id(m) for m, _ in ready) == sorted(map(id, masters * 2))
    for master in masters:
        first, last = [g for m, g in ready if m is master]
        assert torch.equal(last, master.grad) and not torch.equal(first, master.grad)


def test_expert_weight_copies_are_what_the_layer_reads_until_refreshed():
    moe, _, _, kept = _bf16_moe_microbatches(copies=True)
    x = torch.randn(12, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = moe(x)[0]
        for c in kept.copies:
            c.zero_()
        assert torch.count_nonzero(moe(x)[0]) == 0  # zero expert weights: zero output
        kept.refresh()
        assert torch.equal(moe(x)[0], before)
    assert torch.equal(kept.copies[0], moe.experts.w_gate_up.detach().to(torch.bfloat16))


def test_bf16_training_with_and_without_weight_copies_is_identical(tmp_path, monkeypatch):
    """Whole runs under CPU bf16 autocast, 2 microbatches per step: the copies change no bit of the
    losses, parameters or AdamW state, and a resume (which must refresh the copies from the loaded
    masters) stays bit-exact."""
    common = ("--precision", "bf16", "--max-steps", "4", "--dropout", "0.0")
    on = _train_in_process(_ckpt_argv(tmp_path / "on", *common, "--save-interval", "2"), monkeypatch)
    off = _train_in_process(_ckpt_argv(tmp_path / "off", *common, "--moe-bf16-weights", "off"), monkeypatch)
    assert on.losses == off.losses
    _assert_checkpoints_equal(tmp_path / "on" / "checkpoints" / "step_00000004",
                              tmp_path / "off" / "checkpoints" / "step_00000004")
    half = tmp_path / "on" / "checkpoints" / "step_00000002"
    resumed = _train_in_process(_ckpt_argv(tmp_path / "re", *common, "--resume", str(half)), monkeypatch)
    assert resumed.losses == on.losses[2:]
    _assert_checkpoints_equal(tmp_path / "on" / "checkpoints" / "step_00000004",
                              tmp_path / "re" / "checkpoints" / "step_00000004")


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags", [[], ["--tensor-parallel-size", "2"], ["--pipeline-parallel-size", "2"]],
                         ids=["dp2", "tp2-ep2", "pp2-1f1b"])
def test_bf16_weight_copies_match_the_cast_path_in_parallel(flags, tmp_path):
    """Under DP the copies report each master's gradient to the bucketed all-reduce by hand (no autograd
    hook fires on the masters; one parameter per bucket here), under TP/EP each rank keeps copies of its
    own experts, under PP of its own stage's: every layout must equal the cast path bit for bit."""
    argv = _base_argv("mixed") + ["--precision", "bf16", "--ddp-bucket-size-mb", "1e-5"] + flags
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = _launch(2, argv, tmp_path / "on")
    off = _launch(2, argv + ["--moe-bf16-weights", "off"], tmp_path / "off")
    assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"]
    for name, b in off["state"].items():
        assert torch.equal(on["state"][name], b), name
