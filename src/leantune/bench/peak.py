"""How fast this machine can multiply matrices, and how many model FLOPs a run did: achieved vs possible.

Why measure the peak in every suite invocation: CPU throughput moves with thermal state, frequency
governor and other load by tens of percent; a peak from another day would make the fraction meaningless.
So the runner measures it once at the start of a suite invocation, with the suite's thread count, and
stores it in every artefact of that invocation.

Model FLOPs of a training run (the usual "MFU" count; `tokens` are the non-padding tokens trained on),
from what the run recorded about its own model (`params.flop_profile`, see leantune.models.flop_profile):

    flops = 2 * N_run * tokens_forward            forward: only the weights actually run
          + 2 * N_backward * tokens_backward      activation gradients: from the lowest trainable block up
          + 2 * N_trainable * tokens_backward     weight gradients: trainable weights only

For full fine-tuning (N_run = N_backward = N_trainable = N) this is the familiar 6 * N * tokens. freeze-k
has no activation gradient below block k and no weight gradient for frozen weights; LoRA has no weight
gradient for the frozen base. A cached frozen prefix (train.cache_frozen_prefix) does not run its blocks
for the tokens served from the cache (the prefix cache reports them). A method whose runtime reports
`forward_only_steps` (forward, no backward) or `skipped_steps` (nothing computed) in its method report
has those shares of the tokens taken out of the backward (and forward) terms; the bench does not know
any method by name.

N counts only weights that do matrix multiplications: embedding tables (token, position, type) are
lookups, so they are left out of N (the run records whether it trained them); a tied output embedding
(LM head) is a real matmul and stays in. Counting the 30k x d vocabulary table of a small encoder would
inflate its "achieved" FLOP/s several-fold. Attention score FLOPs (~ L^2) are left out, as in the usual
convention; at our sequence lengths they are a few percent. Steps are assumed to hold equal numbers of
tokens when step shares are converted into token shares.

Executed and useful FLOPs are reported apart (`flops_report`): `executed_flops` is the count above, what
the run ran; `useful_flops` is what the same run would compute with nothing skipped and nothing served
from a cache (every step's forward and backward over every token). The fraction of the machine's peak
(`fraction_of_fp32_peak`) is the executed count's, so it measures how well the hardware was used and
cannot pass 1 by counting work that never ran. A summary from before runs recorded their `flop_profile`
cannot tell executed from skipped work: its executed count and fraction are null (unknown), and only the
old upper bound `(4*N_total + 2*N_trainable) * tokens` is given, as `useful_flops_upper_bound` (that
bound counted a skipping method's skipped steps and once showed 3.27x the fp32 peak).
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache

from leantune.bench.artefact import params_with_active_share

FP32, BF16 = "fp32", "bf16"


def matmul_peak(
    threads: int, size: int = 2048, iters: int = 7, warmup: int = 2, budget_s: float = 6.0
) -> dict:
    """Median GFLOP/s of dense `size` x `size` matmuls in fp32 and bf16 (after warm-up).

    `budget_s` caps each dtype's timed loop: a CPU without native bf16 can be 10x slower there, and the
    peak must not dominate a smoke suite. At least 3 timed iterations are always taken.
    """
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flop = 2 * size**3
    out: dict = {"size": size, "threads": threads, "device": device}
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, dtype in ((FP32, torch.float32), (BF16, torch.bfloat16)):
        a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        for _ in range(warmup):
            _sync(torch, device, a @ b)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < iters and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            _sync(torch, device, a @ b)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[f"{name}_gflops"] = flop / med / 1e9
        out[f"{name}_times_s"] = times
    return out


def _sync(torch, device: str, _result) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_flops(tokens: float, n_total: float, n_trainable: float) -> float:
    """The upper bound every step runs everything: (4 * N_total + 2 * N_trainable) * tokens."""
    return (4.0 * n_total + 2.0 * n_trainable) * tokens


def step_shares(summary: dict) -> tuple[float, float]:
    """Shares of the steps that ran a forward pass, and a backward pass, from the methods' own reports."""
    steps = max(summary["train"].get("steps", 0), 1)
    reports = (summary.get("method_reports") or {}).values()
    skipped = sum(r.get("skipped_steps", 0) for r in reports)
    forward_only = sum(r.get("forward_only_steps", 0) for r in reports)
    return max(1.0 - skipped / steps, 0.0), max(1.0 - (skipped + forward_only) / steps, 0.0)


def honest_flops(profile: dict, tokens: float, summary: dict, n_trainable: float) -> dict:
    """The count of the module docstring for a run that recorded its `flop_profile`."""
    forward_share, backward_share = step_shares(summary)
    cache = summary["train"].get("prefix_cache") or {}
    prefix = 0
    if cache.get("active"):  # the embeddings and the lowest `frozen_blocks` blocks
        prefix = profile.get("below_blocks", 0) + sum(profile["block_matmul"][: cache["frozen_blocks"]])
    cached_tokens = cache.get("tokens_from_cache", 0) if cache.get("active") else 0
    forward = 2.0 * (profile["matmul_total"] * tokens * forward_share - prefix * cached_tokens)
    backward = 2.0 * profile["matmul_backward"] * tokens * backward_share
    weight_grad = 2.0 * n_trainable * tokens * backward_share
    return {
        "formula": "2*N_run*tokens_fwd + 2*N_backward*tokens_bwd + 2*N_trainable*tokens_bwd, no lookups",
        "forward_flops": forward,
        "backward_activation_flops": backward,
        "weight_gradient_flops": weight_grad,
        "executed_flops": forward + backward + weight_grad,
        "forward_step_share": forward_share,
        "backward_step_share": backward_share,
        "prefix_tokens_not_run": cached_tokens,
    }


def useful_flops(profile: dict, tokens: float, n_trainable: float) -> float:
    """The same run with nothing skipped or cached: every token's forward, activation and weight gradients."""
    return 2.0 * (profile["matmul_total"] + profile["matmul_backward"] + n_trainable) * tokens


@lru_cache(maxsize=8)
def embedding_params(model_name: str, task: str) -> int | None:
    """Parameters of the model's lookup tables (nn.Embedding), minus a tied output embedding.

    The model is built on the meta device from its config (no weights read, no memory), so this costs
    one transformers import. None when the model cannot be resolved here (e.g. a hub id offline).
    """
    try:
        import torch
        import transformers

        from leantune.models.loader import _AUTO_CLASS, resolve_model_path

        path = resolve_model_path(model_name)
        config = transformers.AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = getattr(transformers, _AUTO_CLASS[task]).from_config(config)
    except Exception:  # the FLOP count then falls back to counting every parameter
        return None
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        emb -= in_emb.weight.numel()  # tied: the same matrix is the LM head, a real matmul
    return int(emb)


def embeddings_trained(params: dict) -> bool:
    """Whether the run trained its embedding tables, as it recorded at train time (older runs: assume not)."""
    return bool((params.get("flop_profile") or {}).get("embedding_trainable", False))


def flops_report(summary: dict, peak: dict | None) -> dict:
    """Achieved model FLOP/s of a finished run and its fraction of the measured fp32 (and bf16) peak."""
    cfg = summary["config"]
    train = summary["train"]
    params = summary["params"]
    tokens = train["tokens_per_s"] * train["train_time_s"]
    profile = params.get("flop_profile")
    emb = profile["embedding"] if profile else embedding_params(cfg["model"]["name"], cfg["task"])
    n_total = profile["matmul_total"] if profile else params["total"] - (emb or 0)
    trained_emb = (emb or 0) if embeddings_trained(params) else 0
    # a method that trains a changing subset (LISA) computes weight gradients only for its active share
    active = params_with_active_share(summary).get("trainable_active", params["trainable"])
    n_trainable = max(active - trained_emb, 0)
    seconds = max(train["train_time_s"], 1e-9)
    if profile:
        counted = honest_flops(profile, tokens, summary, n_trainable)
        counted["useful_flops"] = useful_flops(profile, tokens, n_trainable)
    else:  # a summary from before runs recorded their profile: executed work unknown (module docstring)
        counted = {
            "formula": "(4*N_total + 2*N_trainable) * tokens, N without embedding tables: an upper bound",
            "executed_flops": None,
            "useful_flops": None,
            "useful_flops_upper_bound": training_flops(tokens, n_total, n_trainable),
            "fraction_unknown": "no flop_profile in the run's summary: skipped or cached work cannot be "
            "told from executed work, so the fraction of peak is not computed",
        }
    executed = counted["executed_flops"]
    achieved = None if executed is None else executed / seconds
    out = {
        **counted,
        "tokens": tokens,
        "n_total_matmul": n_total,
        "n_trainable_matmul": n_trainable,
        "embedding_params": emb,
        "achieved_gflops": None if achieved is None else achieved / 1e9,  # executed FLOPs per second
        "useful_gflops": None if counted["useful_flops"] is None else counted["useful_flops"] / seconds / 1e9,
    }
    if peak:
        for name in (FP32, BF16):
            fraction = None if achieved is None else achieved / (peak[f"{name}_gflops"] * 1e9)
            if fraction is not None and fraction > 1:  # the peak was timed under a heavier load
                out["fraction_unknown"] = (
                    f"the run's {achieved / 1e9:.1f} GFLOP/s exceed the {name} matmul peak timed when "
                    "its invocation started: the machine's load fell between the two, so the fraction "
                    "is not computed"
                )
                fraction = None
            out[f"fraction_of_{name}_peak"] = fraction
    return out


def artefact_summary(artefact: dict) -> dict:
    """The parts of a run's summary that `flops_report` reads, from a benchmark artefact (which keeps
    them), so a committed artefact's FLOP figures can be recomputed with the current count."""
    return {
        "config": artefact["config"],
        "params": artefact["params"],
        "method_reports": artefact.get("method_reports") or {},
        "train": {
            "tokens_per_s": artefact["tokens_per_s"],
            "train_time_s": artefact["train_time_s"],
            "steps": artefact["steps"],
            "prefix_cache": artefact.get("prefix_cache"),
        },
    }


def recompute_flops(artefact: dict) -> dict:
    """`flops_report` of a committed artefact, against the peak measured in its own invocation."""
    return flops_report(artefact_summary(artefact), artefact.get("matmul_peak"))


def main(argv: list[str] | None = None) -> int:
    """`python -m leantune.bench.peak RESULTS_DIR`: rewrite every artefact's `flops` with the current
    count (the figures are derived from fields the artefact keeps; nothing else changes)."""
    import json
    import sys
    from pathlib import Path

    from leantune.atomic import write_text_atomic

    root = Path((argv if argv is not None else sys.argv[1:])[0])
    for path in sorted(root.glob("*/*.json")):
        text = path.read_text(encoding="utf-8")
        artefact = json.loads(text)
        if "flops" not in artefact or "tokens_per_s" not in artefact:
            continue
        artefact["flops"] = recompute_flops(artefact)
        second = text.splitlines()[1]  # keep the file's own indentation: the diff is the flops alone
        indent = len(second) - len(second.lstrip())
        write_text_atomic(path, json.dumps(artefact, indent=indent, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
