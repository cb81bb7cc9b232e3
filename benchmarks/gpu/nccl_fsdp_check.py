"""FSDP2 over NCCL on a CUDA machine: full fine-tuning, LoRA, and resume from a DCP checkpoint.

Run by nccl_fsdp_check.sh (which installs leantune with --no-deps first). Needs only torch,
transformers, peft, accelerate and leantune's core imports; no hub access: the model is a tiny randomly
initialised Llama (SmolLM2's architecture) with a word-level tokenizer built here (not the embedded
MiniLM vocabulary, whose package the GPU machine may lack), trained as a causal LM (classification
would need scikit-learn for its metrics). Prints one `PASS|FAIL|SKIP <check>: ...` line per check, with the
loss figures, and exits 1 when any check failed.

CHECK_BACKEND=gloo CHECK_DEVICE=cpu runs the same logic on a CPU machine (train.distributed_backend=gloo),
which is how it was dry-run; the GPU run uses nccl.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS_POS = ["great", "wonderful", "superb", "delightful", "brilliant", "moving", "charming", "excellent"]
WORDS_NEG = ["awful", "dull", "terrible", "boring", "clumsy", "tedious", "bland", "painful"]
FILLER = ["the", "film", "was", "quite", "and", "story", "acting", "really", "plot", "it"]
STEPS, RESUME_FROM = 8, 4
RESULTS: list[tuple[str, str, str]] = []


def say(status: str, check: str, detail: str) -> None:
    RESULTS.append((status, check, detail))
    print(f"{status} {check}: {detail}", flush=True)


def build_model(root: Path) -> Path:
    """A 2-block Llama (width 64, grouped-query attention) with a word-level tokenizer over the toy
    vocabulary; no dropout, so the resume check can compare losses step by step."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {
        w: i for i, w in enumerate(specials + sorted(set(WORDS_POS + WORDS_NEG + FILLER + ["pos", "neg"])))
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    out = root / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_data(root: Path) -> Path:
    rng = random.Random(0)
    path = root / "sentiment.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(256):
            words = rng.sample(FILLER, 5)
            words.insert(rng.randrange(6), rng.choice(WORDS_POS if i % 2 else WORDS_NEG))
            writer.writerow([" ".join(words), "pos" if i % 2 else "neg"])
    return path


def overrides(model: Path, data: Path, run: Path, method: str, backend: str) -> list[str]:
    return [
        "task=causal_lm",  # prompt -> "pos"/"neg": the response is the sentiment word's class
        f"model.name={model}",
        "model.max_length=16",
        f"data.source={data}",
        f"methods=[{method}]",
        "train.batch_size=8",
        "train.lr=3e-3",
        f"train.max_steps={STEPS}",
        "train.save_every=4",
        "train.keep_checkpoints=5",
        "train.log_every=1",
        "train.distributed=fsdp",
        f"train.distributed_backend={backend}",
        "train.distributed_timeout_s=120",
        "output.tensorboard=false",
        f"output.dir={run}",
    ]


def launch(processes: int, args: list[str], log: Path, timeout: float = 150) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd += ["-m", "leantune", "train", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    start = time.monotonic()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("split") is None}


def tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return " | ".join((errors or lines)[-3:])[-600:]


def train_check(
    name: str, method: str, model: Path, data: Path, root: Path, backend: str, device: str
) -> Path:
    run = root / name
    rc, took = launch(1, overrides(model, data, run, method, backend), root / f"{name}.log")
    if rc != 0:
        say("FAIL", name, f"exit {rc} after {took:.0f} s: {tail(root / f'{name}.log')}")
        return run
    summary = json.loads((run / "summary.json").read_text())
    got = losses(run)
    first, last = got.get(1), got.get(STEPS)
    cuda = summary["memory"].get("cuda_max_allocated_bytes")
    step = run / "checkpoints" / f"step-{STEPS:08d}"
    shards = sorted(p.name for p in (step / "dcp").glob("*.safetensors")) if step.is_dir() else []
    export = run / "model" / ("adapter_model.safetensors" if method != "full" else "model.safetensors")
    problems = []
    if summary.get("distributed") != "fsdp" or summary.get("world_size") != 1:
        problems.append(f"distributed={summary.get('distributed')} world_size={summary.get('world_size')}")
    if summary["config"]["train"]["distributed_backend"] != backend:
        problems.append("backend not recorded as " + backend)
    if device == "cuda" and not cuda:
        problems.append("no CUDA memory was allocated: the model did not train on the GPU")
    if sorted(got) != list(range(1, STEPS + 1)) or not all(v == v for v in got.values()):
        problems.append(f"loss log incomplete or NaN: {got}")
    elif not last < first:
        problems.append("the loss did not fall")
    if not shards:
        problems.append(f"no DCP safetensors shards in {step}")
    if not export.is_file():
        problems.append(f"no exported {export.name}")
    cuda_text = f", CUDA peak {cuda / 2**20:.1f} MiB" if cuda else ""
    detail = (
        f"loss step 1 {first:.4f} -> step {STEPS} {last:.4f}; {len(shards)} DCP shard(s), export "
        f"{export.name}{cuda_text}; {took:.0f} s"
    )
    say("FAIL" if problems else "PASS", name, detail + ("; " + "; ".join(problems) if problems else ""))
    return run


def resume_check(name: str, run: Path, root: Path) -> None:
    if not (run / "summary.json").is_file():
        say("FAIL", name, "no finished run to resume from (its training check failed)")
        return
    copy = root / name
    shutil.copytree(run, copy)
    import yaml

    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["output"]["dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (copy / "checkpoints" / "latest").write_text(f"step-{RESUME_FROM:08d}")
    for gone in ("summary.json", "model"):
        path = copy / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    rc, took = launch(1, [str(copy / "config.yaml"), "--resume"], root / f"{name}.log")
    if rc != 0:
        say("FAIL", name, f"exit {rc} after {took:.0f} s: {tail(root / f'{name}.log')}")
        return
    want, got = losses(run), losses(copy)
    steps = range(RESUME_FROM + 1, STEPS + 1)
    rel = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    resumed = json.loads((copy / "summary.json").read_text())["train"]["resumed"]
    pairs = ", ".join(f"{s}: {got[s]:.5f} vs {want[s]:.5f}" for s in steps)
    ok = resumed and rel < 1e-3  # GPU kernels need not be bitwise deterministic across launches
    say(
        "PASS" if ok else "FAIL",
        name,
        f"steps after {RESUME_FROM}, resumed vs uninterrupted: {pairs}; "
        f"max relative difference {rel:.1e} (bound 1e-3); {took:.0f} s",
    )


def main() -> int:
    import torch

    backend = os.environ.get("CHECK_BACKEND", "nccl")
    device = os.environ.get("CHECK_DEVICE", "cuda")
    gpus = torch.cuda.device_count()
    print(
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}, {gpus} GPU(s); "
        f"backend {backend}",
        flush=True,
    )
    if device == "cuda" and not torch.cuda.is_available():
        say("FAIL", "cuda", "no CUDA device; for a CPU dry run set CHECK_BACKEND=gloo CHECK_DEVICE=cpu")
        return 1
    root = Path(os.environ.get("CHECK_WORK", "/tmp/leantune-nccl-check"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, data = build_model(root), write_data(root)
    full = train_check("fsdp-full", "full", model, data, root, backend, device)
    resume_check("fsdp-full-resume", full, root)
    lora = train_check("fsdp-lora", "{name: lora, r: 4, dropout: 0.0}", model, data, root, backend, device)
    resume_check("fsdp-lora-resume", lora, root)
    if backend == "nccl" and gpus < 2:
        say(
            "SKIP",
            "nccl-2-ranks",
            f"{gpus} GPU here: NCCL refuses two ranks on one device, so sharding across 2 ranks over NCCL "
            "was not run (the 2-rank logic is tested over gloo on CPU: tests/test_fsdp.py)",
        )
    elif backend == "nccl":
        run = root / "fsdp-full-2ranks"
        rc, took = launch(2, overrides(model, data, run, "full", backend), root / "2ranks.log")
        if rc == 0:
            s = json.loads((run / "summary.json").read_text())
            same = len(set(s["weights_sha256_per_rank"])) == 1
            got = losses(run)
            say(
                "PASS" if same else "FAIL",
                "nccl-2-ranks",
                f"loss {got[1]:.4f} -> {got[STEPS]:.4f}; ranks' weights identical: {same}; {took:.0f} s",
            )
        else:
            say("FAIL", "nccl-2-ranks", f"exit {rc}: {tail(root / '2ranks.log')}")
    failed = [c for status, c, _ in RESULTS if status == "FAIL"]
    print(f"{'FAIL' if failed else 'PASS'} all: {len(RESULTS)} checks, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
