"""Sharded, atomic, layout-independent checkpoints.

A checkpoint is a directory `<checkpoint-dir>/step_XXXXXXXX` (XXXXXXXX = optimizer steps completed):

    manifest.json          every tensor's full shape, dtype, how it is split (over TP, or the experts over EP),
                           and the files holding its shards; the step, the model config, the flags, the layout,
                           and every other file with its size (`files`, checked by checkpoint_damage)
    shard_pp{P}_tp{T}.pt   stage P's parameters and persistent buffers with their AdamW state: TP shard T's
                           (and, with EP tied to TP, EP shard T's experts), written by DP rank 0 of that stage
                           (replicated ones by TP rank 0)
    experts_pp{P}_ep{G}.pt with EP over DP (--expert-parallel-size > TP): stage P's expert weights of EP shard G
                           (experts G*E/EP .. (G+1)*E/EP - 1) and their AdamW state, written by the first rank
                           holding them (expert-data-parallel rank 0)
    optim_rank{R}.pt       with --shard-optimizer: rank R's slices of the AdamW moments (fragments), each
                           written by the rank that owns it, no gathering
    rng_rank{R}.pt         each rank's RNG states (dropout)
    tokenizer.json         (BPE runs) the run's tokenizer; the manifest's `codec` says how tokens decode

Tensor keys are layout-independent: `model/<parameter name>` (layers are keyed by their global index),
`optim/<parameter name>/{exp_avg,exp_avg_sq,step}`. A tensor is stored whole per shard (`files`, one per shard)
or, sharded-optimizer moments, as `fragments`: per shard, the element ranges of its flattened tensor and the
files holding them. Loading builds, one tensor at a time, this rank's shard under the *current* layout from
the saved shards, so any DP x TP x EP x PP layout, with or without a sharded optimizer, loads into any other.

Atomicity: every rank writes into `.tmp-step_XXXXXXXX`, fsyncs its files, and after a barrier rank 0
writes the manifest, fsyncs, renames the directory to `step_XXXXXXXX`, and only then rewrites the
`latest` marker (also by rename). A directory named `step_*` with a manifest is therefore complete:
a kill at any instant leaves the previous checkpoint or the new one, never a half one that resume picks.
Files are plain `torch.save` archives (see MOE_GUIDE.md for why), read back with mmap.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from data_parallel import zero_source
from errors import InputError
from parallel import Topology, full_shape, replica_group, shard_axis, shard_coords, shard_of, split_spec, unshard

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(InputError):
    """A checkpoint that cannot be used as asked (one line, exit code 2); its own type because sample.py prefixes
    its messages with --checkpoint."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------
def complete_checkpoints(ckpt_dir: Path) -> list:
    """[(step, path)] of the complete checkpoints in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for d in ckpt_dir.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why the complete checkpoint at `path` cannot be loaded whole, or None. Cheap: one stat per file, no
    tensor read. The manifest lists every file with the size it was written with; a checkpoint written
    before it did is checked by the end of each file it names (a torch.save file is a zip archive, and a
    truncated one lacks the zip's end record)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError as e:
        return str(e).removeprefix(f"{path}: ")
    sizes = manifest.get("files")
    if sizes is None:  # written before manifests listed their files
        names = {f for e in manifest.get("tensors", {}).values() for f in e["files"]}
        names |= set(manifest.get("rng_files", []))
        for name in sorted(names):
            if not (path / name).is_file():
                return f"{name} is missing"
            if not zipfile.is_zipfile(path / name):
                return f"{name} is cut short (no zip end record)"
        return None
    for name, size in sorted(sizes.items()):
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return None


def _damaged(said: str, path: Path, why: str, flag: str) -> CheckpointError:
    """The error for a damaged checkpoint, naming the newest whole one before it (what to pass instead).
    A damaged checkpoint is never skipped silently: its steps would be lost without anyone deciding so."""
    m = _STEP_DIR.match(path.name)
    older = None if m is None else next((p for step, p in reversed(complete_checkpoints(path.parent))
                                         if step < int(m.group(1)) and checkpoint_damage(p) is None), None)
    hint = (f"the newest whole checkpoint before it is {older}: pass {flag} {older} (or move {path.name} out of "
            f"{path.parent})" if older is not None else f"no checkpoint before it in {path.parent} is whole")
    return CheckpointError(f"{said} is damaged ({why}); {hint}")


def newest_checkpoint(ckpt_dir: Path, said: str, flag: str) -> Optional[Path]:
    """The newest complete checkpoint of ckpt_dir (None if it has none). A damaged newest one raises
    CheckpointError starting with `said`, naming the newest whole one before it to pass with `flag`."""
    found = complete_checkpoints(ckpt_dir)
    if not found:
        return None
    newest = found[-1][1]
    why = checkpoint_damage(newest)
    if why is not None:
        raise _damaged(f"{said}: the newest checkpoint {newest}", newest, why, flag)
    return newest


def resolve_checkpoint(path: str, flag: str = "--resume") -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint of a checkpoint-dir; one that is
    damaged raises CheckpointError (starting with `path`) naming the newest whole one to pass with `flag`."""
    p = Path(path)
    if is_checkpoint(p):
        why = checkpoint_damage(p)
        if why is not None:
            raise _damaged(f"{path}: this checkpoint", p, why, flag)
        return p
    if p.is_dir():
        found = newest_checkpoint(p, path, flag)
        if found is not None:
            return found
        raise CheckpointError(f"{path}: no complete checkpoint in this directory (expected step_*/{MANIFEST})")
    raise CheckpointError(f"{path}: no such checkpoint (give a step_* checkpoint directory or a checkpoint-dir)")


def read_manifest(path: Path) -> dict:
    try:
        with open(path / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')}, this code reads {FORMAT_VERSION}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(topo: Topology) -> None:
    if topo.world_size > 1:
        dist.barrier()


@dataclass
class _Owned:
    """One tensor (or sharded-optimizer fragment) this rank writes."""
    tensor: torch.Tensor
    shape: list            # the full (unsplit) tensor's shape
    spec: Optional[tuple]  # split_spec of the full tensor (None: replicated)
    axis: Optional[str]    # "tp" or "ep" for a split tensor
    shard: int             # which shard of the split it is (0 for a replicated tensor)
    file: str
    fragment: Optional[tuple] = None  # (first, end) elements of the shard's flattened tensor, for a fragment


def _writer(p: torch.Tensor, topo: Topology) -> tuple[bool, str, int]:
    """(does this rank write p's whole tensor, the file, p's shard index): one copy of each shard is written, by
    the first data-parallel replica holding it (a replicated tensor by TP rank 0 of DP rank 0). With EP tied to TP
    the experts' shards are the TP ranks' and go into their shard files; with EP over DP into files of their own."""
    rank, _ = shard_coords(p, topo)
    group, _, replica = replica_group(p, topo)
    if group == "edp":
        return replica == 0, f"experts_pp{topo.pp_rank}_ep{topo.ep_rank}.pt", rank
    writes = replica == 0 and (shard_axis(p) is not None or topo.tp_rank == 0)
    return writes, f"shard_pp{topo.pp_rank}_tp{topo.tp_rank}.pt", rank


def _owned_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, topo: Topology) -> dict:
    """{key: _Owned} of everything this rank writes, parameters first. The state of a sharded optimizer's slice
    (parallel optimizer param with `zero_of`) is written by its own rank as a fragment of the parameter's moment."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        writes, file, shard = _writer(t, topo)
        if writes:
            out[f"model/{name}"] = _Owned(t.detach(), full_shape(t), split_spec(t), shard_axis(t), shard, file)
    names = {p: n for n, p in model.named_parameters()}
    for q in (q for g in optimizer.param_groups for q in g["params"]):
        p, first, end = zero_source(q)
        writes, file, shard = _writer(p, topo)
        sliced = hasattr(q, "zero_of")
        if sliced:  # every rank owns its slices; of a replicated parameter TP rank 0's copy is written
            writes, file = shard_axis(p) is not None or topo.tp_rank == 0, f"optim_rank{topo.rank}.pt"
        if not writes:
            continue
        for slot, value in optimizer.state.get(q, {}).items():
            if not torch.is_tensor(value):
                continue
            key = f"optim/{names[p]}/{slot}"
            if value.shape != q.shape:  # the step count, a scalar: one copy, from the slice at the start
                if not sliced or first == 0:
                    out[key] = _Owned(value.detach(), list(value.shape), None, None, 0, file)
            elif sliced:  # moments follow the parameter's split
                out[f"{key}@{first}"] = _Owned(value.detach(), full_shape(p), split_spec(p), shard_axis(p), shard, file,
                                               (first, end))
            else:
                out[key] = _Owned(value.detach(), full_shape(p), split_spec(p), shard_axis(p), shard, file)
    return out


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _manifest_entry(pieces: list) -> dict:
    """The manifest's entry of one tensor from what the ranks wrote of it: its full shape, dtype and split, and per
    shard either the file holding it (`files`) or the fragments covering its flattened elements in order
    (`fragments`: [file, first, end] each)."""
    first = pieces[0]
    spec = first["spec"]
    entry = {"shape": first["shape"], "dtype": first["dtype"], "pp": first["pp"],
             "tp_split": [spec[0], list(spec[1])] if spec is not None else None}
    if first["axis"] is not None:
        entry["axis"] = first["axis"]
    shards = sorted({e["shard"] for e in pieces})
    if first["fragment"] is None:
        by_shard = {e["shard"]: e["file"] for e in pieces}
        entry["files"] = [by_shard[s] for s in shards]
    else:
        entry["fragments"] = [sorted(([e["file"], *e["fragment"]] for e in pieces if e["shard"] == s),
                                     key=lambda f: f[1]) for s in shards]
    return entry


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    topo: Topology, meta: dict, keep_last: int = 0, protected: frozenset = frozenset(),
                    extra_files: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Writes step_XXXXXXXX atomically and returns its path. meta
    (JSON-serialisable: the model config, the flags, the codec) goes into the manifest; extra_files
    ({name: bytes}, rank 0's: the tokenizer.json) are written by rank 0 inside the same atomic save.
    keep_last > 0 deletes all but the newest keep_last complete checkpoints up to this step, after the new
    one is complete, except those named in `protected` (being uploaded)."""
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{final.name}"
    if topo.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-step_*"):  # left by saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
        for stale in ckpt_dir.glob(".del-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(topo)

    owned = _owned_tensors(model, optimizer, topo)
    by_file: dict = {}
    for key, o in owned.items():
        by_file.setdefault(o.file, {})[key] = o.tensor.to("cpu", copy=True)
    for file, tensors in by_file.items():
        torch.save(tensors, tmp / file)
        _fsync_path(tmp / file)
    entries = {}  # key -> what this rank wrote of it (one piece, or its fragments)
    for key, o in owned.items():
        entries.setdefault(key.rsplit("@", 1)[0], []).append(
            {"shape": o.shape, "dtype": str(o.tensor.dtype).removeprefix("torch."), "spec": o.spec, "axis": o.axis,
             "shard": o.shard, "file": o.file, "fragment": o.fragment, "pp": topo.pp_rank})
    rng_file = f"rng_rank{topo.rank}.pt"
    torch.save(_rng_state(topo.device), tmp / rng_file)
    _fsync_path(tmp / rng_file)
    written = {name: (tmp / name).stat().st_size for name in [*by_file, rng_file]}
    if topo.rank == 0:
        for name, content in (extra_files or {}).items():  # complete or absent with the rest of the checkpoint
            (tmp / name).write_bytes(content)
            _fsync_path(tmp / name)
            written[name] = len(content)

    gathered = [(entries, written)]
    if topo.world_size > 1:
        gathered = [None] * topo.world_size
        dist.all_gather_object(gathered, (entries, written))
    if topo.rank == 0:
        tensors, file_sizes = {}, {}
        for part, sizes in gathered:
            file_sizes.update(sizes)
            for key, pieces in part.items():
                for e in pieces:
                    tensors.setdefault(key, []).append(e)
        tensors = {key: _manifest_entry(pieces) for key, pieces in tensors.items()}
        manifest = {"format": FORMAT_VERSION, "step": step, **meta,
                    "layout": {"world_size": topo.world_size, "dp": topo.dp, "tp": topo.tp, "pp": topo.pp,
                               "ep": topo.ep},
                    "rng_files": [f"rng_rank{r}.pt" for r in range(topo.world_size)], "tensors": tensors,
                    "files": dict(sorted(file_sizes.items()))}  # every file with its size: checkpoint_damage
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if final.exists():  # the same step saved before: renamed away first, so no half copy keeps the name
            os.replace(final, ckpt_dir / f".del-{final.name}")
        os.replace(tmp, final)
        _fsync_path(ckpt_dir)
        marker_tmp = ckpt_dir / f".{LATEST}.tmp"
        marker_tmp.write_text(final.name + "\n")
        _fsync_path(marker_tmp)
        os.replace(marker_tmp, ckpt_dir / LATEST)
        _fsync_path(ckpt_dir)
        shutil.rmtree(ckpt_dir / f".del-{final.name}", ignore_errors=True)
        if keep_last > 0:
            # Only checkpoints up to this one count. Newer ones (left by a run resumed from an older checkpoint,
            # e.g. past a damaged newest one) are left alone, so the one just written is never deleted.
            for _, old in [c for c in complete_checkpoints(ckpt_dir) if c[0] <= step][:-keep_last]:
                if old.name not in protected:  # renamed first: a kill mid-delete leaves no half checkpoint
                    doomed = ckpt_dir / f".del-{old.name}"
                    os.replace(old, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
    _barrier(topo)
    return final


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
class _ShardReader:
    """Opens each shard file once (memory-mapped) and builds full or resharded tensors from it."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.tensors = path, manifest["tensors"]
        self.files = {}

    def _file(self, name: str) -> dict:
        if name not in self.files:
            try:
                self.files[name] = torch.load(self.path / name, map_location="cpu", mmap=True, weights_only=True)
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{self.path}: cannot read {name} ({e})") from None
        return self.files[name]

    @staticmethod
    def _spec(entry: dict) -> Optional[tuple]:
        return None if entry["tp_split"] is None else (entry["tp_split"][0], list(entry["tp_split"][1]))

    def _num_shards(self, entry: dict) -> int:
        return len(entry["fragments"] if "fragments" in entry else entry["files"])

    def _shard(self, key: str, i: int) -> torch.Tensor:
        """Saved shard i of `key`: one file's tensor, or its fragments put back together."""
        entry = self.tensors[key]
        if "fragments" not in entry:
            return self._file(entry["files"][i])[key]
        shape = list(entry["shape"])
        spec = self._spec(entry)
        if spec is not None:
            shape[spec[0]] //= self._num_shards(entry)
        pieces, covered = [], 0
        for file, first, end in entry["fragments"][i]:
            if first != covered:
                raise CheckpointError(f"{self.path}: {key}: shard {i}'s fragments leave elements {covered}..{first} out")
            pieces.append(self._file(file)[f"{key}@{first}"].reshape(-1))
            covered = end
        if covered != math.prod(shape):
            raise CheckpointError(f"{self.path}: {key}: shard {i}'s fragments end at {covered} of {math.prod(shape)}")
        return torch.cat(pieces).view(shape)

    def full(self, key: str) -> torch.Tensor:
        entry = self.tensors[key]
        return unshard([self._shard(key, i) for i in range(self._num_shards(entry))], self._spec(entry))

    def local(self, key: str, shape, spec, rank: int, size: int) -> torch.Tensor:
        """Shard `rank` of `size` (split by `spec`) of the saved tensor `key`, for the current layout; checks its
        shape."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {key} in the checkpoint")
        entry = self.tensors[key]
        if spec is not None and self._num_shards(entry) == size and self._spec(entry) == (spec[0], list(spec[1])):
            t = self._shard(key, rank)  # the same split: this rank's own shard
        else:
            t = shard_of(self.full(key), spec, rank, size)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: {key} has shape {list(t.shape)} here, {list(shape)} expected")
        return t


@torch.no_grad()
def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    topo: Topology, manifest: Optional[dict] = None) -> dict:
    """Loads this rank's parameters, buffers and (if optimizer is given) AdamW state from the checkpoint
    at `path`, whatever layout it was saved under; a sharded optimizer's slice (an optimizer parameter with
    `zero_of`) takes its range of the parameter's moments. RNG states are restored when the layout is the same.
    Returns the manifest (read here unless given)."""
    manifest = manifest or read_manifest(path)
    reader = _ShardReader(path, manifest)
    for name, t in model.state_dict(keep_vars=True).items():
        t.copy_(reader.local(f"model/{name}", t.shape, split_spec(t), *shard_coords(t, topo)))
    if optimizer is not None:
        names = {p: n for n, p in model.named_parameters()}
        opt_params = [q for g in optimizer.param_groups for q in g["params"]]
        state = optimizer.state_dict()
        for index, q in enumerate(opt_params):
            p, first, end = zero_source(q)
            prefix = f"optim/{names[p]}/"
            slots = {}
            for key, entry in reader.tensors.items():
                if not key.startswith(prefix):
                    continue
                if entry["shape"] == full_shape(p):  # a moment: the parameter's shape and split, then q's range
                    moment = reader.local(key, p.shape, split_spec(p), *shard_coords(p, topo))
                    slots[key[len(prefix):]] = moment.reshape(-1)[first:end].view_as(q).clone()
                else:  # the step count, a scalar
                    slots[key[len(prefix):]] = reader.local(key, entry["shape"], None, 0, 1).clone()
            if slots:
                state["state"][index] = slots
        optimizer.load_state_dict(state)
    layout = manifest["layout"]
    saved = (layout["world_size"], layout["dp"], layout["tp"], layout["pp"], layout.get("ep", layout["tp"]))
    if saved == (topo.world_size, topo.dp, topo.tp, topo.pp, topo.ep):
        rng = torch.load(path / manifest["rng_files"][topo.rank], map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and topo.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], topo.device)
    return manifest


def load_consolidated(path: Path, with_optimizer: bool = False) -> tuple[dict, dict]:
    """(manifest, {name: full tensor}) for one process, e.g. sampling: the model's parameters and
    buffers keyed as in `GPT(cfg, Topology()).state_dict()`; with_optimizer adds the `optim/...` keys.
    Unsharded tensors are memory-mapped views of the files (copied where they are loaded into a model)."""
    manifest = read_manifest(path)
    reader = _ShardReader(path, manifest)
    state = {}
    for key in manifest["tensors"]:
        if key.startswith("model/"):
            state[key[len("model/"):]] = reader.full(key)
        elif with_optimizer:
            state[key] = reader.full(key)
    return manifest, state


# --------------------------------------------------------------------------------------------------
# Resuming under other flags
# --------------------------------------------------------------------------------------------------
def describe_resume(path: Path, manifest: dict, meta: dict, topo: Topology, changeable: Collection[str] = (),
                    reported: Sequence[str] = ()) -> str:
    """Checks that the checkpoint's model is the one these flags build (raises CheckpointError naming
    the differing fields otherwise) and returns one line saying what resumes and what changed. The manifest's
    model and flags are read_run_manifest's: a field or flag a checkpoint was written before holds its
    default, the value it was trained with (so resuming it with another value is refused or reported).
    changeable: the model fields that may differ (config.CHANGEABLE_MODEL_FIELDS); the bias update rate may,
    but not between zero and non-zero (the expert-bias buffer exists only when it is on). reported: the
    flags named in the line when they differ from the checkpoint's run (config.REPORTED_FLAGS)."""
    saved, now = manifest["model"], meta["model"]
    differing = [f"{k} (checkpoint {saved.get(k)}, now {now.get(k)})" for k in sorted(set(saved) | set(now))
                 if k not in changeable and k in saved and k in now and saved[k] != now[k]]
    rate = "moe_bias_update_rate"
    if bool(saved.get(rate, 0.0)) != bool(now.get(rate, 0.0)):
        differing.append(f"{rate} (checkpoint {saved.get(rate, 0.0)}, now {now.get(rate)}: bias balancing "
                         f"cannot be switched on or off on resume)")
    if differing:
        raise CheckpointError(f"--resume {path}: the checkpoint's model differs from these flags in "
                              + ", ".join(differing))
    old_args, new_args = manifest.get("args", {}), meta["args"]
    changes = [f"--{k.replace('_', '-')} {old_args[k]} -> {new_args[k]}" for k in reported
               if k in old_args and old_args[k] != new_args.get(k)]
    lay = manifest["layout"]
    lay_ep = lay.get("ep", lay["tp"])  # written before EP could differ from TP
    if (lay["dp"], lay["tp"], lay["pp"], lay_ep) != (topo.dp, topo.tp, topo.pp, topo.ep):
        changes.append(f"layout DP{lay['dp']}xTP{lay['tp']}xPP{lay['pp']} EP{lay_ep} -> "
                       f"DP{topo.dp}xTP{topo.tp}xPP{topo.pp} EP{topo.ep} (dropout RNG restarts from the seed)")
    return f"resuming from {path} at step {manifest['step']}" + ("; changed: " + ", ".join(changes) if changes else "")


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub upload (optional extra, imported only when --hf-repo is given)
# --------------------------------------------------------------------------------------------------
def check_hub(repo: str) -> None:
    """Before training: the package and a token must be there (one-line error otherwise)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"--hf-repo {repo}: expected OWNER/NAME")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("--hf-repo needs the huggingface_hub package: pip install huggingface_hub") from None
    if not huggingface_hub.get_token():
        raise CheckpointError("--hf-repo: no Hugging Face token (set HF_TOKEN or run `huggingface-cli login`)")


class HubUploader:
    """Uploads each saved checkpoint to a Hub model repo in the background, so training does not wait on the
    network. A failed upload is reported and training goes on: the local copy is the truth. Checkpoints still
    queued or uploading are not deleted by --keep-last until their upload ends.

    The jobs run on huggingface_hub's own executor, HfApi.run_as_future (one thread, jobs in the order given:
    what upload_folder(..., run_as_future=True) uses). A job is create_repo, upload_folder and the report,
    because create_repo has no run_as_future of its own and a failure of either is one report."""

    def __init__(self, repo: str, say=print):
        from huggingface_hub import HfApi
        self.repo, self.say, self.api = repo, say, HfApi()
        self.busy: set = set()  # names of checkpoints queued or uploading; the worker thread removes them
        self.busy_lock = threading.Lock()
        self.pending: list = []  # futures of the jobs not yet waited for

    def upload(self, path: Path) -> None:
        with self.busy_lock:
            self.busy.add(path.name)
        self.pending = [f for f in self.pending if not f.done()] + [self.api.run_as_future(self._upload, path)]

    def _upload(self, path: Path) -> None:
        try:
            self.api.create_repo(self.repo, exist_ok=True, private=True)
            self.api.upload_folder(repo_id=self.repo, folder_path=str(path), path_in_repo=path.name,
                                   commit_message=f"checkpoint {path.name}")
            self.say(f"uploaded {path.name} to the Hugging Face Hub repo {self.repo}")
        except Exception as e:  # the network, the token's rights, the Hub: report and carry on
            self.say(f"warning: upload of {path.name} to {self.repo} failed ({type(e).__name__}: {e}); "
                     f"the local checkpoint is kept")
        finally:
            with self.busy_lock:
                self.busy.discard(path.name)

    def protected(self) -> frozenset:
        """The checkpoints --keep-last must not delete now: those queued or uploading."""
        with self.busy_lock:
            return frozenset(self.busy)

    def close(self) -> None:
        """Waits for queued uploads to finish."""
        try:
            for future in self.pending:
                future.result()
        finally:  # interrupted (a second Ctrl-C): the jobs not started yet are dropped
            for future in self.pending:
                future.cancel()
            self.pending = []
