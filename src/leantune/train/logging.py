"""Run logs: `metrics.jsonl` (one JSON object per logged step or evaluation) and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leantune.atomic import write_text_atomic


class RunLogger:
    """Writes only on the main process; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb_dir = run_dir / "tensorboard"
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._tb_dir))

    def truncate_after(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint so the logs read as one uninterrupted run."""
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the kill: it was after the checkpoint anyway
                    continue
                if isinstance(record, dict) and record.get("step", step + 1) <= step:
                    keep.append(line)
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
