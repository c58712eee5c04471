"""The sharded optimizer (--shard-optimizer, ZeRO-1): each data-parallel rank steps and stores 1/DP of the AdamW state;
every layout with it equals one process (losses, gradient norms, parameters at helpers.REL_TOL), composed with small
buckets, TP, PP, EP over DP, the clip and --grad-reduce-dtype bf16; its checkpoints are the unsharded run's, saved
as per-rank fragments, and resume bit-exact in the same layout and under any other DP size or without it."""
from __future__ import annotations

import pytest
import torch

import checkpoint as ckpt
from data_parallel import DataParallelGrads
from model import GPT
from parallel import Topology

from helpers import (REL_TOL, _assert_checkpoints_equal, _base_argv, _ckpt_dist_argv, _launch, _reference,
                     assert_same_run, tiny_cfg)

SHARD = ["--shard-optimizer"]
# Bit-for-bit comparisons turn the clip off: its global norm sums the slices' squares in another order than the
# whole gradients', so the clip coefficient can differ in its last bit.
NO_CLIP = ["--grad-clip", "0"]
TINY_BUCKETS = ["--ddp-bucket-size-mb", "0.01"]  # 2,621 elements: many buckets, slices that cut parameters


def test_slices_cover_every_parameter_once_and_alias_the_model():
    """Each DP rank's slices are views into the parameters' flat buffers (a step on them is a step on the model),
    cover 1/DP of every bucket, and together cover every element exactly once."""
    cfg = tiny_cfg(num_layers=2)
    covered = {}
    for dp_rank in range(2):
        torch.manual_seed(0)
        model = GPT(cfg, Topology())
        model.init_weights(0)
        topo = Topology(world_size=2, dp=2, dp_rank=dp_rank)
        grads = DataParallelGrads(list(model.parameters()), topo, bucket_size_mb=0.002, shard_optimizer=True)
        names = {p: n for n, p in model.named_parameters()}
        assert len(grads.buckets) > 3 and grads.zero_axes == ("dp",)
        total = sum(p.numel() for p in model.parameters())
        mine = sum(q.numel() for q in grads.optimizer_params)
        assert total / 2 - 2 * len(grads.buckets) <= mine <= total / 2 + 2 * len(grads.buckets)  # padding
        for q in grads.optimizer_params:
            p, first, end = q.zero_of
            assert q.data_ptr() == p.reshape(-1)[first:].data_ptr() and q.numel() == end - first
            with torch.no_grad():
                q.add_(1.0)  # visible through the model's parameter
            assert torch.equal(p.detach().reshape(-1)[first:end], q.detach())
            covered.setdefault(names[p], []).append((first, end))
    for name, p in GPT(cfg, Topology()).named_parameters():
        ranges = sorted(covered[name])
        assert ranges[0][0] == 0 and ranges[-1][1] == p.numel(), (name, ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)


LAYOUTS = [  # (id, world size, model, flags)
    ("dp2", 2, "mixed", SHARD + TINY_BUCKETS),
    ("tp2-dp2", 4, "mixed", SHARD + ["--tensor-parallel-size", "2"]),
    ("pp2-dp2", 4, "mixed", SHARD + ["--pipeline-parallel-size", "2"]),
    ("dp4-ep2", 4, "all8", SHARD + TINY_BUCKETS + ["--expert-parallel-size", "2"]),  # experts sharded over 2 EDP ranks
    ("dp2-recompute", 2, "mixed", SHARD + ["--recompute", "moe"]),
]


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("world_size,moe,flags", [l[1:] for l in LAYOUTS], ids=[l[0] for l in LAYOUTS])
def test_sharded_optimizer_matches_one_process(world_size, moe, flags, tmp_path, tmp_path_factory):
    assert_same_run(_launch(world_size, _base_argv(moe) + flags, tmp_path), _reference(moe, tmp_path_factory))


@pytest.mark.multiprocess
def test_sharded_optimizer_with_bf16_reduction_is_the_unsharded_run(tmp_path):
    """With two ranks a reduce-scatter adds the same two numbers as an all-reduce and AdamW is elementwise: the
    bf16 gradient reduction sharded gives the unsharded run's parameters bit for bit (clip off, NO_CLIP)."""
    runs = []
    for name, flags in (("plain", []), ("sharded", SHARD + TINY_BUCKETS)):
        (tmp_path / name).mkdir()
        runs.append(_launch(2, _base_argv("mixed") + ["--grad-reduce-dtype", "bf16"] + NO_CLIP + flags,
                            tmp_path / name))
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[1]["grad_norms"] == pytest.approx(runs[0]["grad_norms"], rel=1e-6)  # summed in another order
    for key, t in runs[0]["state"].items():
        assert torch.equal(runs[1]["state"][key], t), key


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dp2_checkpoints(tmp_path_factory):
    """4 steps of DP2 with and without the sharded optimizer (clip off, NO_CLIP), each saving at step 2 and at the
    end."""
    root = tmp_path_factory.mktemp("ckpt_zero")
    runs = {}
    for name, flags in (("plain", []), ("sharded", SHARD + TINY_BUCKETS)):
        (root / name).mkdir()
        runs[name] = _launch(2, _ckpt_dist_argv(root / name / "ckpts", "--max-steps", "4", "--save-interval", "2",
                                                *NO_CLIP, *flags), root / name)
    return root, runs


@pytest.mark.multiprocess
def test_sharded_checkpoint_is_the_unsharded_one_in_fragments(dp2_checkpoints):
    root, runs = dp2_checkpoints
    assert runs["plain"]["losses"] == runs["sharded"]["losses"]
    for step in ("step_00000002", "step_00000004"):
        _assert_checkpoints_equal(root / "plain" / "ckpts" / step, root / "sharded" / "ckpts" / step)
    path = root / "sharded" / "ckpts" / "step_00000002"
    assert {"optim_rank0.pt", "optim_rank1.pt"} <= {p.name for p in path.iterdir()}
    entry = ckpt.read_manifest(path)["tensors"]["optim/layers.0.attn.qkv.weight/exp_avg"]
    pieces = entry["fragments"][0]  # one replicated shard, cut between the two ranks' files
    assert "files" not in entry and {f for f, _, _ in pieces} == {"optim_rank0.pt", "optim_rank1.pt"}
    assert pieces[0][1] == 0 and pieces[-1][2] == 32 * 3 * 32  # hidden 32 -> q, k, v of 4 heads and 4 kv heads


@pytest.mark.multiprocess
@pytest.mark.parametrize("source", ["sharded", "plain"])
def test_checkpoint_resumes_sharded_bit_exact(dp2_checkpoints, source, tmp_path):
    """Resumed with the sharded optimizer, its own checkpoint and the unsharded run's (its moments cut into this
    layout's slices) go on exactly as the sharded run did."""
    root, runs = dp2_checkpoints
    half = root / source / "ckpts" / "step_00000002"
    resumed = _launch(2, _ckpt_dist_argv(tmp_path / "ckpts", "--max-steps", "4", *SHARD, *TINY_BUCKETS, *NO_CLIP,
                                         "--resume", str(half)), tmp_path)
    assert resumed["losses"] == runs["sharded"]["losses"][2:]
    _assert_checkpoints_equal(root / "sharded" / "ckpts" / "step_00000004", tmp_path / "ckpts" / "step_00000004")


@pytest.mark.multiprocess
def test_sharded_checkpoint_resumes_under_other_layouts(dp2_checkpoints, tmp_path):
    """The sharded DP2 checkpoint goes on in one process without it, and under DP4 with it (other bucket slices),
    as the unsharded checkpoint goes on in one process (dropout off: its streams depend on the layout)."""
    root, _ = dp2_checkpoints
    losses = {}
    for name, source, world_size, flags in (("plain-one", "plain", 1, []), ("sharded-one", "sharded", 1, []),
                                            ("sharded-dp4", "sharded", 4, SHARD)):
        run = tmp_path / name
        run.mkdir()
        half = root / source / "ckpts" / "step_00000002"
        losses[name] = _launch(world_size, _ckpt_dist_argv(run / "c", "--max-steps", "4", "--resume", str(half),
                                                           "--dropout", "0", *NO_CLIP, *flags), run)["losses"]
    assert len(losses["plain-one"]) == 2
    assert losses["sharded-one"] == losses["plain-one"]  # the same checkpoint, the same layout: exactly
    for a, b in zip(losses["sharded-dp4"], losses["plain-one"]):
        assert abs(a - b) <= REL_TOL * abs(b), losses
