"""Decoding speed of sample.py's two paths on one device, and whether they give the same tokens (issue 19,
target 3).

    python bench/bench_sample.py                      # trains the default model 200 steps, then measures
    python bench/bench_sample.py --checkpoint runs/a/checkpoints [--json bench_sample.json]
    python bench/bench_sample.py --train-steps 20 -- --hidden-size 64 ...   # minimal_pretrain flags after --

The model: the newest checkpoint of --checkpoint, or the default model of minimal_pretrain.py (4 layers,
d_model 128, 8 experts top-2) trained --train-steps steps on the default corpus in a subprocess (a trained
model has peaked next-token distributions, as real sampling does; random weights give near-uniform ones).
It is loaded as sample.py loads it, and decoded as sample.py decodes (bf16 autocast on CUDA):
  plain: generate.generate, the growing KV cache, one eager forward per token;
  fast:  generate.StaticDecoder as sample.py builds it (static cache; on CUDA the step compiled with
         mode="reduce-overhead", i.e. captured in a CUDA graph);
  static eager (identity only): the same StaticDecoder, not compiled.
Per batch size (--batch-sizes, default 1 and 16), from sample.py's default prompt (a newline):
  - greedy, --new-tokens (200: two window rebuilds at max_seq_length 128) and a run that fits the first
    window (max_seq_length - 2 tokens: prefill of the prompt, then decode steps only);
  - sampled (temperature 0.8, top-k 200, sample.py's defaults, seed 1337) for --sampled-batch-sizes (1);
  tokens/s = batch x new tokens / wall time of one generate call between two synchronisations, after a
  warm-up (the first fast run compiles and captures); fast: the median of --repeats calls.
Identity: the greedy (and sampled) tokens of fast against plain, and of static eager against plain. Where
they differ, the first differing token is reported with the gap between the two largest logits of the
plain path at that step: a gap within bf16 rounding (~1% of the logit) means the compiled kernels rounded
a near-tie the other way, not a logic error (static eager, which shares the logic, then agrees).
Writes every figure to --json; exit code 1 if a greedy comparison in fp32 (CPU) differs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import sample  # noqa: E402
from generate import StaticDecoder, generate  # noqa: E402
from model import KVCache, count_parameters  # noqa: E402
from errors import OneLineParser  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    """(result, seconds) of fn() between two synchronisations; the result is copied to the host after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out.cpu(), time.perf_counter() - start


def train_default_model(steps: int, flags: list, device: str) -> Path:
    """minimal_pretrain.py's default model trained `steps` steps in a subprocess; its checkpoint directory."""
    out = Path(tempfile.mkdtemp(prefix="bench_sample_"))
    cmd = [sys.executable, str(ROOT / "minimal_pretrain.py"), *flags, "--max-steps", str(steps), "--eval-iters", "0",
           "--no-progress", "--device", device, "--output-dir", str(out / "run")]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return out / "run" / "checkpoints"


@torch.no_grad()
def plain_greedy_gaps(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """generate(model, ids, new, temperature=0) step by step, also keeping the gap between the two largest
    logits behind every token: (tokens [b, n + new], gaps [b, new])."""
    T = model.cfg.max_seq_length
    b, n = ids.shape
    out, gaps = ids.new_empty(b, n + new), torch.empty(b, new)
    out[:, :n] = ids
    keep, cache = max(1, T // 2), KVCache(T)
    logits, _ = model(ids[:, max(0, n - T):], kv_cache=cache)
    for i in range(n, n + new):
        last = logits[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        gaps[:, i - n] = (top2[:, 0] - top2[:, 1]).cpu()
        out[:, i] = last.argmax(dim=-1)
        if i == n + new - 1:
            break
        if cache.pos == T:
            cache.reset()
            logits, _ = model(out[:, i + 1 - keep:i + 1], kv_cache=cache)
        else:
            logits, _ = model(out[:, i:i + 1], kv_cache=cache)
    return out, gaps


def count_rebuilds(n: int, new: int, T: int) -> int:
    """How many times generate's policy refills the window while making `new` tokens after n."""
    pos, rebuilds = min(n, T), 0
    for _ in range(new - 1):  # the last token is not fed
        if pos == T:
            pos, rebuilds = max(1, T // 2), rebuilds + 1
        else:
            pos += 1
    return rebuilds


def compare(got: torch.Tensor, ref: torch.Tensor, n: int) -> dict:
    """Same tokens? If not: rows that differ, the first differing generated token (row, index)."""
    diff = got != ref
    if not diff.any():
        return {"identical": True}
    rows = diff.any(dim=1).nonzero().flatten().tolist()
    firsts = [(int(diff[r].nonzero()[0]) - n, r) for r in rows]
    first, row = min(firsts)
    return {"identical": False, "rows_differing": len(rows), "first_diff_token": first, "first_diff_row": row,
            "tokens_equal_fraction": float((~diff[:, n:]).float().mean())}


@torch.no_grad()
def measure(model, mode: str, temperature: float, top_k, b: int, prompt_ids: list, new_tokens: int, short: int,
            repeats: int, device: torch.device) -> dict:
    """One configuration (mode, batch size): both paths timed after a warm-up, tokens compared."""
    t_run = time.perf_counter()
    T = model.cfg.max_seq_length
    bf16 = device.type == "cuda"
    ids = torch.tensor([prompt_ids] * b, dtype=torch.long, device=device)
    n = ids.shape[1]
    gen = lambda: torch.Generator(device=device).manual_seed(1337)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        fast, how = sample.fast_decoder(model, b, n + max(new_tokens, short, sample.WARMUP_TOKENS), temperature, top_k)
        eager = StaticDecoder(model, b, n + new_tokens, temperature, top_k)
        skips_before, breaks_before = counters["inductor"]["cudagraph_skips"], sum(counters["graph_break"].values())
        start = time.perf_counter()
        if fast.compiled:
            fast.warm_up()  # compiles and captures the decode step and the rebuild
        fast.generate(ids, sample.WARMUP_TOKENS, gen()).tolist()
        warmup_s = time.perf_counter() - start
        generate(model, ids, sample.WARMUP_TOKENS, temperature, top_k, gen()).tolist()
        res = {"mode": mode, "batch": b, "temperature": temperature, "top_k": top_k, "fast_path": how,
               "dtype": "bf16 autocast" if bf16 else "fp32", "fast_warmup_s": warmup_s}
        for name, new in (("long", new_tokens), ("short", short)):
            plain_out, plain_s = timed(lambda: generate(model, ids, new, temperature, top_k, gen()), device)
            fast_runs = [timed(lambda: fast.generate(ids, new, gen()), device) for _ in range(repeats)]
            fast_out, fast_s = fast_runs[0][0], statistics.median(s for _, s in fast_runs)
            res[name] = {"new_tokens": new, "rebuilds": count_rebuilds(n, new, T),
                         "plain_tokens_per_s": b * new / plain_s, "fast_tokens_per_s": b * new / fast_s,
                         "plain_ms_per_step": 1000 * plain_s / new, "fast_ms_per_step": 1000 * fast_s / new,
                         "speedup": plain_s / fast_s,
                         "fast_runs_same": all(torch.equal(o, fast_out) for o, _ in fast_runs),
                         "fast_vs_plain": compare(fast_out, plain_out, n)}
            if name == "long":
                static_out = eager.generate(ids, new, gen()).cpu()
                res[name]["static_eager_vs_plain"] = compare(static_out, plain_out, n)
                res[name]["fast_vs_static_eager"] = compare(fast_out, static_out, n)
                c = res[name]["fast_vs_plain"]
                if mode == "greedy" and not c["identical"]:
                    ref, gaps = plain_greedy_gaps(model, ids, new)
                    c["diagnostic_equals_plain"] = torch.equal(ref.cpu(), plain_out)
                    c["plain_top2_gap_at_first_diff"] = float(gaps[c["first_diff_row"], c["first_diff_token"]])
                    c["plain_top2_gap_median"] = float(gaps.median())
        res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
        res["graph_breaks"] = sum(counters["graph_break"].values()) - breaks_before
    res["seconds"] = time.perf_counter() - t_run
    return res


def main() -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint (directory) to decode instead of training one")
    p.add_argument("--train-steps", type=int, default=200, help="steps of the default model when no --checkpoint")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sampled-batch-sizes", type=int, nargs="*", default=[1],
                   help="batch sizes also timed and compared with sampling (each compiles one more step)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per sample of the long runs")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the fast path (median)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", default="bench_sample.json", help="where to write the results")
    p.add_argument("flags", nargs="*", help="minimal_pretrain flags after --, for the trained model")
    a = p.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")

    ckpt = Path(a.checkpoint) if a.checkpoint else train_default_model(a.train_steps, a.flags, device.type)
    path = checkpoint.resolve_checkpoint(str(ckpt), flag="--checkpoint")
    meta, state = checkpoint.load_consolidated(path)
    codec = sample.checkpoint_codec(path, meta)
    model = sample.load_model(meta, state, device)
    total, active = count_parameters(model.cfg)
    T = model.cfg.max_seq_length
    bf16 = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if bf16 else "cpu"
    print(f"model: {path} (step {meta['step']}), {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
          f"layers {model.cfg.layer_pattern()}, max_seq_length {T}; device {gpu}, torch {torch.__version__}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}; setup {time.perf_counter() - t_start:.0f} s", flush=True)

    prompt_ids = codec.encode(a.prompt)
    short = max(1, T - len(prompt_ids) - 1)  # a run inside the first window: no rebuild
    runs = [("greedy", 0.0, None, b) for b in a.batch_sizes] + [("sampled", 0.8, 200, b) for b in a.sampled_batch_sizes]
    rows, errors = [], []
    for mode, temperature, top_k, b in runs:
        try:  # one configuration failing (compilation, say) still leaves the others' figures
            res = measure(model, mode, temperature, top_k, b, prompt_ids, a.new_tokens, short, a.repeats, device)
        except Exception as e:
            traceback.print_exc()
            errors.append({"mode": mode, "batch": b, "error": f"{type(e).__name__}: {e}"})
            print(f"{mode} batch {b}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
            continue
        rows.append(res)
        lg = res["long"]
        print(f"{mode} batch {b}: plain {lg['plain_tokens_per_s']:,.0f} tok/s, fast {lg['fast_tokens_per_s']:,.0f} "
              f"tok/s, identical {lg['fast_vs_plain']['identical']} ({res['seconds']:.0f} s, warm-up "
              f"{res['fast_warmup_s']:.1f} s)", flush=True)
    # fp32 (CPU): the paths must agree exactly; in bf16 a difference is reported, with its logit gap.
    failed = bool(errors) or any(r["mode"] == "greedy" and r["dtype"] == "fp32" and not r[name]["fast_vs_plain"]["identical"]
                                 for r in rows for name in ("long", "short"))

    print()
    print(f"decoding, {gpu}, torch {torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"model {total / 1e6:.1f}M ({model.cfg.layer_pattern()}), prompt {len(prompt_ids)} token(s); "
          f"tokens/s = batch x new tokens / wall time, prefill and window rebuilds included")
    print("| mode | batch | new tokens (rebuilds) | plain tok/s | fast tok/s | fast ms/step | speed-up "
          "| fast = plain | static eager = plain | fast = static eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda c: "yes" if c["identical"] else f"no (from token {c['first_diff_token']}, {c['rows_differing']} rows)"
    for r in rows:
        for name in ("long", "short"):
            x = r[name]
            print(f"| {r['mode']} | {r['batch']} | {x['new_tokens']} ({x['rebuilds']}) | {x['plain_tokens_per_s']:,.0f} | "
                  f"{x['fast_tokens_per_s']:,.0f} | {x['fast_ms_per_step']:.3f} | {x['speedup']:.1f}x | "
                  f"{fmt(x['fast_vs_plain'])} | {fmt(x['static_eager_vs_plain']) if 'static_eager_vs_plain' in x else ''} | "
                  f"{fmt(x['fast_vs_static_eager']) if 'fast_vs_static_eager' in x else ''} |")
    for r in rows:
        c = r["long"]["fast_vs_plain"]
        if "plain_top2_gap_at_first_diff" in c:
            print(f"greedy batch {r['batch']}: first difference at token {c['first_diff_token']} (row "
                  f"{c['first_diff_row']}), where the plain path's two best logits differ by "
                  f"{c['plain_top2_gap_at_first_diff']:.4f} (median gap {c['plain_top2_gap_median']:.3f})")
        if r["cudagraph_skips"] or r["graph_breaks"]:
            print(f"{r['mode']} batch {r['batch']}: {r['cudagraph_skips']} CUDA-graph skips, {r['graph_breaks']} "
                  f"graph breaks (TORCH_LOGS=cudagraphs,graph_breaks says why)")
    total_s = time.perf_counter() - t_start
    print(f"fast path: {rows[0]['fast_path'] if rows else 'n/a'}; total {total_s:.0f} s"
          + (f"; {len(errors)} configuration(s) failed (tracebacks above)" if errors else ""))
    result = {"device": gpu, "torch": torch.__version__, "dtype": "bf16 autocast" if bf16 else "fp32",
              "checkpoint": str(path), "step": meta["step"], "parameters": total, "active_parameters": active,
              "max_seq_length": T, "prompt": a.prompt, "date": time.strftime("%Y-%m-%d"), "total_s": total_s,
              "rows": rows, "errors": errors}
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
