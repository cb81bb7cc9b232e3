"""The tests' name for `leantune.memory.live.LiveBytes` (the memory model uses it too)."""

from leantune.memory.live import LiveBytes

__all__ = ["LiveBytes"]
