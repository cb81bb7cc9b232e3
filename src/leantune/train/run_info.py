"""What a run sets up and records about itself: seed and threads, library versions, the machine, and
parameter counts. Shared by `leantune train` (recipes) and the HF baseline (bench), so both set up and
report the same way; `leantune.recipes.common` re-exports these names.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

VERSIONED = ("leantune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


#: how the last `setup_torch` chose torch's intra-op threads: {"threads": n, "source": why}
THREADS: dict = {}


def setup_torch(seed: int, threads: int | None) -> None:
    import torch
    from accelerate.utils import set_seed

    chosen, source = choose_threads(threads)
    if chosen:
        torch.set_num_threads(chosen)
    THREADS.update(threads=torch.get_num_threads(), source=source)
    set_seed(seed)


def choose_threads(requested: int | None) -> tuple[int | None, str]:
    """torch's intra-op threads for this run, and why: `train.num_threads` when set; else nothing where
    the user set OMP_NUM_THREADS (torch honours it); else the physical cores this process may use.

    Why not leave torch's default: torch and libgomp count the CPUs they see, not a container's CPU quota
    (cgroup cpu.max / cfs_quota), so a job limited to 2 CPUs on a 64-core host runs 32+ spinning threads
    on 2 CPUs' time. libgomp stops spinning only when the threads outnumber the CPUs it sees; when they
    do not but the CPUs are not all ours, every small op waits for a core (on the shared machine 2
    spinning threads on 2 cores were 4x slower than 1 thread: docs/speed.md)."""
    if requested:
        return requested, "train.num_threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cpus = _usable_cpus()
    cores = physical_cores(cpus)
    quota = cpu_quota()
    if quota is not None and quota < cores:
        return max(1, int(quota)), f"CPU quota of {quota:g} CPUs (cgroup) below {cores} physical cores"
    return cores, f"physical cores of the {len(cpus)} CPUs this process may use"


#: CPUs kept busy by other work at start from which the cores count as shared
SHARED_BUSY = 0.75
#: how long the start samples /proc/stat (the CLI pays it once, before torch is imported)
BUSY_WINDOW_S = 0.1


def busy_cpus_now(window: float = BUSY_WINDOW_S, stat: str = "/proc/stat") -> float | None:
    """How many of the CPUs this process may use were busy over the next `window` seconds (all
    processes; this one sleeps meanwhile), from two reads of their `cpuN` lines in /proc/stat (only
    ours: a container pinned to 2 of a host's 64 CPUs must not read the host's load); None where the
    file cannot be read (not Linux)."""
    import time

    ours = {f"cpu{c}" for c in _usable_cpus()}

    def read() -> dict[str, tuple[int, int]]:
        out = {}
        with open(stat, encoding="ascii") as fh:
            for line in fh:
                name, *values = line.split()
                if name in ours:
                    fields = [int(x) for x in values]
                    # user..steal (guest time is inside user); idle + iowait count as not busy
                    out[name] = (sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0))
        return out

    try:
        before = read()
        time.sleep(window)
        after = read()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for name, (total, idle) in after.items():
        elapsed = total - before[name][0] if name in before else 0
        if elapsed > 0:
            busy += (elapsed - (idle - before[name][1])) / elapsed
    return busy if after else None


def choose_omp_wait(environ: dict | None = None, busy: float | None = None) -> tuple[str | None, str]:
    """OpenMP's wait policy for this process, and why: the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT when
    set; PASSIVE when other work keeps at least SHARED_BUSY CPUs busy at start (`busy_cpus_now`, or the
    1-min load average where /proc/stat cannot be read); else libgomp's default (spin, then sleep).

    Why: between two parallel regions libgomp's threads spin. Where other processes hold the cores, a
    spinning thread burns the time slice its partner needs, and every small op waits for a core: on the
    shared 2-core machine the default LoRA step ran 4x slower with 2 spinning threads than with passive
    waiting or one thread (docs/speed.md, ab-threads-lora.json). On a quiet machine spinning saves the
    wake-up per region, so the default is left alone there. Why a sample now and not the 1-min load
    average (the first rule): the average decays over minutes, so a run started right after another
    (a benchmark suite, a user's second run) saw load >= 1 on an idle machine and waited passively, and
    its steps ran 1.4-1.8x slower than HF Trainer's at equal settings (time-to-quality-lr,
    docs/time-to-quality.md)."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None, "set by the user"
    what = "CPUs busy with other work at start"
    if busy is None:
        busy = busy_cpus_now()
    if busy is None:  # no /proc/stat: the 1-min load average stands in
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        what = "1-min load at start"
    if busy >= SHARED_BUSY:
        return "PASSIVE", f"{busy:.1f} {what}: the cores are shared"
    return None, f"{busy:.1f} {what}: libgomp's default"


def set_omp_wait() -> None:
    """Apply `choose_omp_wait` to this process's environment; the CLI calls it before torch is imported,
    because libgomp reads its settings once, when it loads (child processes inherit the choice)."""
    import sys

    if "torch" in sys.modules:
        THREADS.update(
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), omp_wait_source="torch already loaded"
        )
        return
    value, why = choose_omp_wait()
    if value:
        os.environ["OMP_WAIT_POLICY"] = value
    THREADS.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), omp_wait_source=why)


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: str = "/sys/devices/system/cpu") -> int:
    """Distinct (package, core) pairs among `cpus` (hyper-threads of one core count once); the number of
    CPUs where the topology cannot be read."""
    from pathlib import Path

    seen = set()
    for cpu in cpus:
        topo = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            seen.add(
                ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
            )
        except OSError:
            return len(cpus)
    return max(1, len(seen))


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs per period this process's cgroup may use (v2 cpu.max or v1 cfs quota); None: unlimited."""
    from pathlib import Path

    try:
        quota, period = (Path(root) / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((Path(root) / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((Path(root) / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_threads_source": THREADS.get("source"),
        "omp_wait_policy": THREADS.get("omp_wait_policy"),
        "omp_wait_source": THREADS.get("omp_wait_source"),
        "device": "cpu",
    }
    if hasattr(os, "getloadavg"):
        # Timings are only comparable on a quiet machine: record how busy it was when the run ended.
        info["load_avg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def count_params(model) -> dict[str, float]:
    """In logical weights: a packed 4-bit parameter counts the weights it holds, not its bytes."""
    from leantune.models.quantized import logical_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}
