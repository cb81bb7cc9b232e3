"""Issue 17 on a GPU: peak CUDA memory of one MeZO, LOMO, AdaLomo and AdamW step against an inference
forward pass at the same batch, on a SmolLM2-135M-shaped Llama (random weights: the real weights cannot
reach the GPU machine; memory and time do not depend on the values).

    python benchmarks/gpu/mezo_memory_check.py OUT.json            # H200: 8 x 256 tokens, bf16 and fp32
    python benchmarks/gpu/mezo_memory_check.py OUT.json --tiny     # CPU dry run: tiny Llama, LiveBytes
    python benchmarks/gpu/mezo_memory_check.py OUT.json --minilm --batch 16 --seq 48 --dtypes float32
                                                                   # CPU: the embedded MiniLM classifier

Each row: a fresh model, `torch.cuda.reset_peak_memory_stats()`, one warm-up step, then the measured
step (AdamW: its state exists from the warm-up step on, as in training). The steps are leantune's own
code paths: `MezoRuntime.step` / `on_step_end` (methods/mezo.py), `LomoRuntime` / `AdaLomoRuntime`
(methods/lomo.py, hooks inside backward, with and without the two-pass clipping); AdamW is torch's, as
the trainer's. The inference reference is the same forward MeZO runs (`model(**batch).loss` under
no_grad, eval mode); the plain logits-only forward is printed beside it. Issue 17 asks MeZO's peak within
10% of the inference forward: `mezo_vs_inference` in the JSON, and the exit status (1 when it fails).

On CPU (--tiny, or no GPU) the peak is the tensor bytes allocated during the step (tests/live_bytes.py),
weights excluded; on CUDA it is max_memory_allocated, weights included (both columns are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests.live_bytes for the CPU dry run
sys.path.insert(0, str(ROOT / "src"))

from leantune.methods.lomo import AdaLomoConfig, AdaLomoRuntime, LomoConfig, LomoRuntime  # noqa: E402
from leantune.methods.mezo import MezoConfig, MezoRuntime  # noqa: E402

#: SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the fields LlamaConfig reads
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
TINY = {
    **SMOLLM2_135M,
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MINILM = {"vocab_size": 30522}  # --minilm: the embedded MiniLM-L6 classifier (CPU memory table)
LR = 1e-6  # values do not matter for memory; small so nothing overflows


def build(shape: dict, dtype: torch.dtype, device: torch.device):
    if shape is MINILM:  # the real embedded MiniLM with a classification head (leantune's loader)
        from leantune.models.loader import load_model

        torch.manual_seed(0)
        model = load_model("embedded:minilm", "classification", "float32", ["neg", "pos"]).to(device, dtype)
        model.config.use_cache = False
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    model.config.use_cache = False
    return model


def make_batch(vocab: int, batch: int, seq: int, device: torch.device, classify: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g).to(device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if classify else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _Accelerator:
    """What the LOMO step uses of accelerate's Accelerator: backward."""

    def backward(self, loss, **kwargs) -> None:
        loss.backward(**kwargs)


def _trainer(model, max_grad_norm: float | None):
    """What the runtimes read from the trainer: optimizer groups (SGD without momentum holds no state),
    the step counter, the module and the clipping setting."""
    opt = torch.optim.SGD([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=LR)
    cfg = SimpleNamespace(train=SimpleNamespace(max_grad_norm=max_grad_norm))
    return SimpleNamespace(torch_optimizer=opt, state=SimpleNamespace(step=0), module=model, cfg=cfg)


def forward_loss(model, batch) -> None:
    model.eval()
    with torch.no_grad():
        model(**batch).loss.item()


def forward_logits(model, batch) -> None:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.logits.float().sum().item()


def mezo_steps():
    rt = MezoRuntime(MezoConfig(), seed=0)

    def step(model, batch, trainer) -> None:
        rt.on_step_start(trainer)
        rt.step(model, batch, None, 1.0).item()
        rt.on_step_end(trainer)
        trainer.state.step += 1

    return step, None


def lomo_steps(cls, cfg, max_grad_norm: float | None):
    rt = cls(cfg)
    started: list = []

    def step(model, batch, trainer) -> None:
        if not started:
            rt.on_train_start(trainer)
            started.append(1)
        model.train()
        rt.on_step_start(trainer)
        rt.step(model, batch, _Accelerator(), 1.0).item()
        rt.on_step_end(trainer)
        trainer.state.step += 1

    return step, max_grad_norm


def adamw_steps():
    box: dict = {}

    def step(model, batch, trainer) -> None:
        model.train()
        opt = box.setdefault("opt", torch.optim.AdamW(model.parameters(), lr=LR))
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, None


def cases() -> dict:
    return {
        "inference_forward_loss": lambda: (lambda m, b, t: forward_loss(m, b), None),
        "inference_forward_logits": lambda: (lambda m, b, t: forward_logits(m, b), None),
        "mezo": mezo_steps,
        "lomo": lambda: lomo_steps(LomoRuntime, LomoConfig(), None),
        "lomo_clip2pass": lambda: lomo_steps(LomoRuntime, LomoConfig(), 1.0),
        "adalomo": lambda: lomo_steps(AdaLomoRuntime, AdaLomoConfig(), None),
        "adamw_full": adamw_steps,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, shape: dict, dtype, device, batch_size: int, seq: int) -> dict:
    """One fresh model: a warm-up step, then the measured one (peak and time)."""
    model = build(shape, dtype, device)
    batch = make_batch(shape["vocab_size"], batch_size, seq, device, classify=shape is MINILM)
    fn, max_grad_norm = cases()[name]()
    trainer = _trainer(model, max_grad_norm)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        fn(model, batch, trainer)  # warm-up: kernels chosen, AdamW state and AdaLomo moments allocated
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn(model, batch, trainer)
        _sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated()
        row = {
            "peak_bytes": int(peak),
            "held_before_bytes": int(before),
            "peak_above_held_bytes": int(peak - before),
        }
    else:  # LiveBytes counts what is allocated inside the block: both steps, so optimizer state counts
        from tests.live_bytes import LiveBytes

        with LiveBytes() as live:
            fn(model, batch, trainer)
            t0 = time.perf_counter()
            fn(model, batch, trainer)
            seconds = time.perf_counter() - t0
        row = {"peak_bytes": int(weights + live.peak), "peak_above_held_bytes": int(live.peak)}
    del model, trainer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**row, "weights_bytes": int(weights), "step_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON written here")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (dry run on CPU)")
    ap.add_argument("--minilm", action="store_true", help="the embedded MiniLM-L6 classifier instead")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    shape = MINILM if args.minilm else TINY if args.tiny else SMOLLM2_135M
    batch, seq = (2, 16) if args.tiny else (args.batch, args.seq)
    name = "LlamaForCausalLM, SmolLM2-135M config" + (" (tiny dry run)" if args.tiny else "")
    result: dict = {
        "model": "embedded:minilm, BertForSequenceClassification" if args.minilm else name,
        "random_weights": not args.minilm,
        "batch": batch,
        "seq_len": seq,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "peak_metric": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "LiveBytes + weights",
        "versions": {"torch": torch.__version__, **_versions()},
        "load_1min_at_start": os.getloadavg()[0],  # a shared machine changes times, not bytes
        "runs": {},
    }
    ok = True
    t_all = time.perf_counter()
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        rows = {name: measure(name, shape, dtype, device, batch, seq) for name in cases()}
        ref = rows["inference_forward_loss"]["peak_bytes"]
        for row in rows.values():
            row["vs_inference"] = row["peak_bytes"] / ref
        ratio = rows["mezo"]["vs_inference"]
        ok &= ratio <= 1.10
        result["runs"][dname] = {
            "rows": rows,
            "mezo_vs_inference": ratio,
            "mezo_within_10pct": ratio <= 1.10,
            "adamw_vs_mezo": rows["adamw_full"]["peak_bytes"] / rows["mezo"]["peak_bytes"],
        }
        _print_table(dname, rows)
    result["total_s"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['total_s']:.1f} s; MeZO within 10% of inference: {ok}")
    return 0 if ok else 1


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def _print_table(dname: str, rows: dict) -> None:
    mib = 2**20
    print(f"\n{dname}: peak memory and time per step")
    print(f"{'step':<26}{'peak MiB':>10}{'above held':>12}{'x inference':>13}{'step s':>9}")
    for name, r in rows.items():
        print(
            f"{name:<26}{r['peak_bytes'] / mib:>10.1f}{r['peak_above_held_bytes'] / mib:>12.1f}"
            f"{r['vs_inference']:>13.3f}{r['step_s']:>9.3f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
