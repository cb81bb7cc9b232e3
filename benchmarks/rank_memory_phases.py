"""RSS per phase of one training process (or each of N under torchrun): load, shard (FSDP), forward,
backward and update of two steps, two evaluation passes. How the per-rank plan's mechanisms were found
(docs/distributed.md: evaluation, tied gradients, memory-mapped weights); not a suite, a probe.

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 PYTHONPATH=src \\
        python benchmarks/rank_memory_phases.py lora 4 32 32                      # one process
    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 PYTHONPATH=src \\
        torchrun --nproc-per-node 2 benchmarks/rank_memory_phases.py full 2 16 32  # FSDP2, gloo

Arguments: method (lora|full), train rows, eval rows, tokens; MODEL (default embedded:smollm2) in the
environment. Each line: RSS now and the peak since the previous line, both above the RSS before the
tokenizer loaded, the peak less the shared libraries' pages paged in since (`library_rss`), and the
process's anonymous and file-backed RSS (the file part is the memory-mapped weights and libraries).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import peft  # noqa: F401 - imported before the baseline, as the trainer does
import torch
import torch.distributed.fsdp  # noqa: F401

from leantune.memory.budget import current_rss, library_rss, peak_rss_since_reset, reset_peak_rss

MiB = 2**20


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    method, rows, eval_rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    name = os.environ.get("MODEL", "embedded:smollm2")
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    base, lib0 = current_rss(), library_rss() or 0
    reset_peak_rss()

    def mark(what: str) -> None:
        peak, s, lib = peak_rss_since_reset(), status(), (library_rss() or 0) - lib0
        print(
            f"rank {rank} {what:10} rss {(current_rss() - base) / MiB:7.1f} peak {(peak - base) / MiB:7.1f} "
            f"peak-libraries {(peak - base - lib) / MiB:7.1f} anon {s['RssAnon'] / MiB:7.1f} "
            f"file {s['RssFile'] / MiB:7.1f}",
            flush=True,
        )
        reset_peak_rss()

    from leantune.config import load_config
    from leantune.methods import MethodContext, apply_methods
    from leantune.models.loader import load_model, load_tokenizer
    from leantune.train.distributed import shard_model

    tok = load_tokenizer(name)
    mark("tokenizer")
    model = load_model(name, "causal_lm", "float32", None, tok.pad_token_id)
    spec = "full" if method == "full" else "{name: lora, r: 8}"
    cfg = load_config(None, ["task=causal_lm", f"model.name={name}", f"methods=[{spec}]"])
    model = apply_methods(model, cfg.methods, MethodContext(task="causal_lm", seed=0))
    mark("load")
    if world > 1:
        model = shard_model(model)
        mark("shard")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(rank)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(1000, vocab, (rows, seq), generator=gen)
    model.train()
    for step in range(2):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        mark(f"forward{step}")
        out.loss.backward()
        mark(f"backward{step}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        mark(f"update{step}")
    model.eval()
    ids = torch.randint(1000, vocab, (eval_rows, seq), generator=gen)
    for i in range(2):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            del out
        mark(f"eval{i}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
