"""How fast this machine can multiply matrices, and how many model FLOPs a run did: achieved vs possible.

Why measure the peak in every suite invocation: CPU throughput moves with thermal state, frequency
governor and other load by tens of percent; a peak from another day would make the fraction meaningless.
So the runner measures it once at the start of a suite invocation, with the suite's thread count, and
stores it in every artefact of that invocation.

Model FLOPs of a training run (the usual "MFU" count; `tokens` are the non-padding tokens trained on):

    flops = (2 * N_total + 2 * N_total + 2 * N_trainable) * tokens = (4 * N_total + 2 * N_trainable) * tokens
             forward        backward through  weight gradients
                            activations

- forward: every weight takes part in one multiply-add per token: 2 * N_total.
- backward through activations: the gradient w.r.t. the activations still flows through frozen layers
  down to the lowest trainable one; we approximate that as all layers, 2 * N_total. This is exact for
  full fine-tuning and for LoRA on every block, and an OVER-count for freeze-k (nothing flows below
  block k), which makes frozen runs look more efficient than they are.
- weight gradients: only for trainable weights, 2 * N_trainable.
For full fine-tuning (N_trainable = N_total) this is the familiar 6 * N * tokens.

N counts only weights that do matrix multiplications: embedding tables (token, position, type) are
lookups, so they are left out of N_total, and out of N_trainable where the run trains them; a tied
output embedding (LM head) is a real matmul and stays in. Counting the 30k x d vocabulary table of a small
encoder would inflate its "achieved" FLOP/s several-fold. Attention score FLOPs (~ L^2) are left out, as
in the usual convention; at our sequence lengths they are a few percent.
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
    """(4 * N_total + 2 * N_trainable) * tokens; see the module docstring for why and its limits."""
    return (4.0 * n_total + 2.0 * n_trainable) * tokens


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


def embeddings_trained(methods: list[dict]) -> bool:
    """Whether a run trains the embedding tables: not under (split) LoRA (peft freezes the base) or `freeze`.

    Only the methods that freeze them are named; any other trains them (as full fine-tuning and LISA do).
    """
    for m in methods:
        name = m.get("name")
        if name in ("lora", "lora_sp", "split_lora") or (name == "freeze" and m.get("embeddings", True)):
            return False
        if name == "lisa" and not m.get("train_embeddings", True):
            return False
    return True


def flops_report(summary: dict, peak: dict | None) -> dict:
    """Achieved model FLOP/s of a finished run and its fraction of the measured fp32 (and bf16) peak."""
    cfg = summary["config"]
    train = summary["train"]
    params = summary["params"]
    tokens = train["tokens_per_s"] * train["train_time_s"]
    emb = embedding_params(cfg["model"]["name"], cfg["task"])
    n_total = params["total"] - (emb or 0)
    trained_emb = (emb or 0) if embeddings_trained(cfg["methods"]) else 0
    # a method that trains a changing subset (LISA) computes weight gradients only for its active share
    active = params_with_active_share(summary).get("trainable_active", params["trainable"])
    n_trainable = max(active - trained_emb, 0)
    flops = training_flops(tokens, n_total, n_trainable)
    achieved = flops / max(train["train_time_s"], 1e-9)
    out = {
        "formula": "(4*N_total + 2*N_trainable) * tokens, N without embedding tables",
        "tokens": tokens,
        "n_total_matmul": n_total,
        "n_trainable_matmul": n_trainable,
        "embedding_params": emb,
        "model_flops": flops,
        "achieved_gflops": achieved / 1e9,
    }
    if peak:
        out["fraction_of_fp32_peak"] = achieved / (peak[f"{FP32}_gflops"] * 1e9)
        out["fraction_of_bf16_peak"] = achieved / (peak[f"{BF16}_gflops"] * 1e9)
    return out
