"""Memory model of one training step: weights, trainable parameters, gradients, optimizer state and
activations, per transformer block and in total.

Parameters, gradients and optimizer state are counted exactly from the model's tensors and the
optimizer's rules. Activations are not derived from a per-architecture formula (every architecture,
attention implementation and method combination would need its own): they are *traced*. One forward
pass at batch 1 and the real sequence length runs under `torch.autograd.graph.saved_tensors_hooks`,
which sees every tensor autograd keeps for the backward pass; their storages (deduplicated, weights
excluded) are what a step holds at the start of backward, and they scale linearly with the batch.
That captures what formulas miss: a frozen lower stack saves nothing, dropout masks, the quadratic
attention scores, LoRA's own inputs. On top of the saved tensors a step needs short-lived buffers
(the gradient of the largest activation while backward runs through it, and the forward's temporary
of the same size); `TRANSIENT_FACTOR` largest saved tensors stand for them. The optimizer update is a
second peak, after the activations are freed: AdamW's per-tensor temporaries (`OPTIMIZER_TRANSIENT_FACTOR`
times the largest trainable tensor), which matters for full fine-tuning (the word embeddings). Both were
checked against measured peaks in benchmarks/results/memory-model/.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

# Short-lived buffers at the peak, in units of the largest saved activation (see the module docstring).
TRANSIENT_FACTOR = 2.0
# torch's AdamW on CPU updates one tensor at a time and builds its denominator as sqrt(v) / c: two
# temporaries the size of the tensor being updated, so the update peaks at twice the largest one.
OPTIMIZER_TRANSIENT_FACTOR = {"adamw": 2.0, "sgd": 0.0}
OPTIMIZER_SLOTS = {"adamw": 2, "sgd": 0}  # state tensors per trainable tensor, each of its size
ADAM_STEP_BYTES = 4  # torch AdamW keeps a float32 `step` tensor per parameter


@dataclass
class LayerMemory:
    name: str
    params: int = 0
    trainable: int = 0
    weight_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class MemoryEstimate:
    batch_size: int
    seq_len: int
    optimizer: str
    recompute: bool
    layers: list[LayerMemory] = field(default_factory=list)
    transient_bytes: int = 0
    optimizer_transient_bytes: int = 0
    eval_bytes: int = 0  # the evaluation pass's forward peak on top of the weights (0: no evaluation)
    eval_batch: int = 0
    eval_seq_len: int = 0

    def _sum(self, key: str) -> int:
        return sum(getattr(layer, key) for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        return self._sum("weight_bytes")

    @property
    def grad_bytes(self) -> int:
        return self._sum("grad_bytes")

    @property
    def optimizer_bytes(self) -> int:
        return self._sum("optimizer_bytes")

    @property
    def activation_bytes(self) -> int:
        return self._sum("activation_bytes")

    @property
    def trainable_bytes(self) -> int:
        return self.grad_bytes  # a gradient is the size of its parameter

    @property
    def step_bytes(self) -> int:
        """What a training step adds on top of the loaded model (what an RSS delta measures).

        The optimizer state persists; on top of it two moments peak. At the start of backward all saved
        activations (and their transient buffers) are alive and no gradient yet; as backward runs it
        frees activations while it creates gradients, and then the update adds its temporaries with
        every gradient alive. Between the two the sum moves roughly linearly, so the larger end is
        the peak.
        """
        backward = self.activation_bytes + self.transient_bytes
        update = self.grad_bytes + self.optimizer_transient_bytes
        return self.optimizer_bytes + max(backward, update)

    @property
    def eval_peak_bytes(self) -> int:
        """What the evaluation pass adds on top of the weights: the optimizer state stays alive, the
        gradients are gone (`zero_grad(set_to_none=True)`), nothing is saved for backward, but a causal
        LM's logits (rows x sequence x vocabulary) and the loss's log-softmax of them are whole."""
        return self.optimizer_bytes + self.eval_bytes if self.eval_bytes else 0

    @property
    def peak_phase(self) -> str:
        """`train` or `eval`: which phase sets the peak."""
        return "eval" if self.eval_peak_bytes > self.step_bytes else "train"

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + max(self.step_bytes, self.eval_peak_bytes)

    def totals(self) -> dict[str, int]:
        return {
            "weights": self.weight_bytes,
            "trainable_params": self.trainable_bytes,
            "gradients": self.grad_bytes,
            "optimizer_state": self.optimizer_bytes,
            "activations": self.activation_bytes,
            "transient": self.transient_bytes,
            "optimizer_transient": self.optimizer_transient_bytes,
            "step": self.step_bytes,
            "eval_forward": self.eval_bytes,
            "eval": self.eval_peak_bytes,
            "total": self.total_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "optimizer": self.optimizer,
            "recompute": self.recompute,
            "eval_batch": self.eval_batch,
            "eval_seq_len": self.eval_seq_len,
            "peak_phase": self.peak_phase,
            "totals": self.totals(),
            "layers": [asdict(layer) for layer in self.layers],
        }


def layer_of(name: str, blocks_prefix: str | None) -> str:
    """The row a parameter or module belongs to: `<blocks>.<i>` for block i, else its top-level part."""
    if blocks_prefix and (name == blocks_prefix or name.startswith(blocks_prefix + ".")):
        rest = name[len(blocks_prefix) + 1 :].split(".", 1)[0]
        return f"{blocks_prefix}.{rest}" if rest else blocks_prefix
    return "other"


def blocks_prefix(model) -> str | None:
    from leantune.models.structure import find_blocks

    try:
        return find_blocks(model)[0]
    except ValueError:
        return None


def probe_batch(model, task: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """A full-length batch of ordinary token ids (no padding): the worst case a step sees."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch_size, seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "classification":
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long)
    elif task == "regression":  # one float score per row (MSE)
        batch["labels"] = torch.zeros(batch_size)
    elif task == "multi_label":  # multi-hot float rows (BCE with logits)
        batch["labels"] = torch.zeros(batch_size, model.config.num_labels)
    else:
        batch["labels"] = ids.clone()
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def gradient_checkpointing(model, enabled: bool) -> Iterator[None]:
    """Recompute each block's activations in backward (non-reentrant: works with a frozen base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled:
        yield
        return
    was = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    if not was:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if not was:
            base.gradient_checkpointing_disable()


@dataclass
class ActivationTrace:
    per_layer: dict[str, int]  # saved bytes at batch 1, by row
    largest: int  # the largest single saved storage at batch 1

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())


def trace_activations(model, task: str, seq_len: int, batch_size: int = 1) -> ActivationTrace:
    """Bytes autograd saves for backward in one training-mode forward pass, by block.

    The RNG is forked so tracing never changes the training run's random stream.
    """
    import torch

    prefix = blocks_prefix(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[str] = ["other"]
    seen: dict[int, tuple[str, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and storage.nbytes() > 0:
            seen[ptr] = (current[-1], storage.nbytes())
        # Not `t` itself: a node that saves its own output would then hold it with its grad_fn, a
        # cycle through C++ that Python's gc cannot see, and every trace leaked its whole graph
        # (~90 MB per plan on MiniLM). The trace never runs backward, so nothing unpacks this.
        return t.detach()

    handles = []
    if prefix:
        for name, module in model.named_modules():
            row = layer_of(name, prefix)
            if row != "other" and name.count(".") == row.count("."):  # the block itself

                def enter(_m, _a, row=row):
                    current.append(row)

                def leave(_m, _a, _o):
                    current.pop()

                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
    batch = probe_batch(model, task, batch_size, seq_len)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
            del out
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer: dict[str, int] = {}
    for row, nbytes in seen.values():
        per_layer[row] = per_layer.get(row, 0) + nbytes
    return ActivationTrace(per_layer, max((b for _, b in seen.values()), default=0))


def activation_estimate(
    model, task: str, seq_len: int, batch_size: int, recompute: bool
) -> tuple[dict[str, int], int]:
    """Saved activation bytes per row at `batch_size`, and the transient bytes on top of them.

    With recomputation only the blocks' inputs stay saved; during backward one block at a time
    re-creates its activations, so the largest block's full activations are added.
    """
    plain = trace_activations(model, task, seq_len)
    if not recompute:
        rows, largest = plain.per_layer, plain.largest
    else:
        with gradient_checkpointing(model, True):
            ckpt = trace_activations(model, task, seq_len)
        blocks = [v for k, v in plain.per_layer.items() if k != "other"]
        rows = dict(ckpt.per_layer)
        rows["recomputed block"] = max(blocks, default=0)
        largest = plain.largest
    scaled = {k: v * batch_size for k, v in rows.items()}
    return scaled, int(TRANSIENT_FACTOR * largest * batch_size)


def parameter_rows(model, optimizer: str, prefix: str | None) -> dict[str, LayerMemory]:
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_SLOTS)}")
    rows: dict[str, LayerMemory] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        row = rows.setdefault(layer_of(name, prefix), LayerMemory(layer_of(name, prefix)))
        nbytes = p.numel() * p.element_size()
        row.params += p.numel()
        row.weight_bytes += nbytes
        if p.requires_grad:
            row.trainable += p.numel()
            row.grad_bytes += nbytes
            slots = OPTIMIZER_SLOTS[optimizer]
            row.optimizer_bytes += slots * nbytes + (ADAM_STEP_BYTES if optimizer == "adamw" else 0)
    return rows


def eval_forward_bytes(model, task: str, seq_len: int, batch_size: int) -> int:
    """Peak bytes one evaluation forward pass allocates (no grad, eval mode, with its loss), weights
    excluded: traced with `LiveBytes` at 1 and 2 rows and extrapolated linearly to `batch_size` (the
    rows scale; what does not, e.g. the attention mask, separates there). Counted per storage
    (`LiveBytes(views=True)`): the logits are a view of the head's output.

    Why traced, not counted: the peak sits inside the model's own loss, where a causal LM holds its
    logits (rows x sequence x vocabulary float32) and their log-softmax at once; a classifier's head
    is small and the largest hidden state sets it. Both fall out of the trace without a formula."""
    import torch

    from leantune.memory.live import LiveBytes

    if batch_size < 1:
        return 0
    peaks = []
    was_training = model.training
    model.eval()
    try:
        for rows in (1, 2):
            batch = probe_batch(model, task, rows, seq_len)
            with torch.random.fork_rng(devices=[]), torch.no_grad(), LiveBytes(views=True) as live:
                out = model(**batch)
                del out
            peaks.append(live.peak)
    finally:
        model.train(was_training)
    return int(peaks[0] + (peaks[1] - peaks[0]) * (batch_size - 1))


def estimate_memory(
    model,
    task: str,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    recompute: bool = False,
    eval_batch: int = 0,
    eval_seq_len: int | None = None,
) -> MemoryEstimate:
    """The memory model for `model` as it will be trained (methods applied, `requires_grad` set);
    with `eval_batch` rows (of `eval_seq_len` tokens, default `seq_len`) also the evaluation pass."""
    prefix = blocks_prefix(model)
    rows = parameter_rows(model, optimizer, prefix)
    activations, transient = activation_estimate(model, task, seq_len, batch_size, recompute)
    for name, nbytes in activations.items():
        rows.setdefault(name, LayerMemory(name)).activation_bytes += nbytes

    def order(row: LayerMemory) -> tuple:
        tail = row.name.rsplit(".", 1)[-1]
        return (row.name == "other", row.name == "recomputed block", int(tail) if tail.isdigit() else 0)

    largest = max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), default=0)
    eval_seq = eval_seq_len or seq_len
    return MemoryEstimate(
        batch_size,
        seq_len,
        optimizer,
        recompute,
        sorted(rows.values(), key=order),
        transient,
        int(OPTIMIZER_TRANSIENT_FACTOR[optimizer] * largest),
        eval_forward_bytes(model, task, eval_seq, eval_batch) if eval_batch else 0,
        eval_batch,
        eval_seq if eval_batch else 0,
    )
