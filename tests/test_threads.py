"""The torch threads a run uses (train/run_info.py): the user's setting wins (train.num_threads, then
OMP_NUM_THREADS), else the physical cores this process may use, capped by a cgroup CPU quota; the run's
first line says what was chosen and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leantune.train import run_info
from leantune.train.run_info import choose_threads, cpu_quota, physical_cores


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> str:
    """A fake /sys/devices/system/cpu: CPU -> (package, core)."""
    for cpu, (package, core) in cores.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return str(root)


def test_hyper_threads_of_one_core_count_once(tmp_path):
    sysfs = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    assert physical_cores([0, 1, 2, 3, 4], sysfs) == 3
    assert physical_cores([0, 2], sysfs) == 1  # an affinity mask holding both threads of one core
    assert physical_cores([0, 9], sysfs) == 2  # topology unreadable: the CPUs themselves


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(str(tmp_path / "v2")) == 1.5
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(tmp_path / "v2")) is None
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path / "v1")) == 2.0
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(str(tmp_path / "v1")) is None


def test_the_user_setting_wins(monkeypatch):
    monkeypatch.setattr(run_info, "physical_cores", lambda cpus: 8)
    monkeypatch.setattr(run_info, "cpu_quota", lambda: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(5) == (5, "train.num_threads")  # the config beats the environment
    assert choose_threads(None) == (None, "OMP_NUM_THREADS")  # torch already took it: left alone
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads, source = choose_threads(None)
    assert threads == 8 and "physical cores" in source


def test_a_quota_below_the_cores_caps_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_info, "physical_cores", lambda cpus: 64)
    monkeypatch.setattr(run_info, "cpu_quota", lambda: 2.0)
    threads, source = choose_threads(None)
    assert threads == 2 and "quota" in source
    monkeypatch.setattr(run_info, "cpu_quota", lambda: 0.5)
    assert choose_threads(None)[0] == 1
    monkeypatch.setattr(run_info, "cpu_quota", lambda: 128.0)  # a quota above the cores: the cores
    assert choose_threads(None)[0] == 64


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_run_log_names_the_choice(base_overrides, capsys, monkeypatch, restore_threads):
    from leantune.config import load_config
    from leantune.recipes.train import run_train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_info, "physical_cores", lambda cpus: 1)
    monkeypatch.setattr(run_info, "cpu_quota", lambda: None)
    unset = [*base_overrides, "train.max_steps=1", "train.num_threads=null"]  # the fixture sets 1
    summary = run_train(load_config(None, unset))
    banner = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("leantune: training"))
    assert "1 torch threads (physical cores of the" in banner
    assert summary["machine"]["torch_threads"] == 1
    assert summary["machine"]["torch_threads_source"].startswith("physical cores")
    run_train(
        load_config(
            None, [*base_overrides, "train.max_steps=1", "train.num_threads=2", "output.overwrite=true"]
        )
    )
    banner = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("leantune: training"))
    assert "2 torch threads (train.num_threads)" in banner


def test_openmp_waits_passively_only_on_a_shared_machine_and_never_over_the_user():
    from leantune.train.run_info import choose_omp_wait

    shared = ("PASSIVE", "1.9 CPUs busy with other work at start: the cores are shared")
    assert choose_omp_wait({}, busy=1.9) == shared
    assert choose_omp_wait({}, busy=0.2)[0] is None  # a quiet machine keeps libgomp's spinning
    assert choose_omp_wait({"OMP_WAIT_POLICY": "ACTIVE"}, busy=1.9) == (None, "set by the user")
    assert choose_omp_wait({"GOMP_SPINCOUNT": "10000"}, busy=1.9) == (None, "set by the user")


def test_busy_cpus_are_read_from_two_samples_of_proc_stat(tmp_path, monkeypatch):
    """busy = sum over this process's CPUs of (elapsed - idle - iowait) / elapsed between the two reads;
    CPUs outside its affinity are not counted; no file: None."""
    from leantune.train import run_info

    stat = tmp_path / "stat"
    first = "cpu 0 0 0 0\ncpu0 100 0 100 700 100 0 0 0\ncpu1 0 0 0 100\ncpu7 0 0 0 0\n"
    # cpu0: 300 jiffies, 100 idle -> 2/3 busy; cpu1: 100 jiffies, all busy; cpu7 (not ours) all busy
    second = "cpu 0 0 0 0\ncpu0 250 0 150 800 100 0 0 0\ncpu1 100 0 0 100\ncpu7 500 0 0 0\n"
    reads = iter([first, second])
    monkeypatch.setattr("time.sleep", lambda s: stat.write_text(next(reads)))
    monkeypatch.setattr(run_info, "_usable_cpus", lambda: [0, 1])
    stat.write_text(next(reads))
    assert run_info.busy_cpus_now(0.0, str(stat)) == pytest.approx(2 / 3 + 1)
    assert run_info.busy_cpus_now(0.0, str(tmp_path / "missing")) is None


def test_the_cli_chooses_the_wait_policy_only_where_its_own_process_runs_torch(monkeypatch):
    """`bench` runs each job in a child that chooses for itself: a parent's choice would reach the
    children through the inherited environment and read as the user's; `methods` runs no torch work."""
    from leantune import cli

    calls: list[str] = []
    monkeypatch.setattr(run_info, "set_omp_wait", lambda: calls.append("chosen"))
    assert cli.main(["methods"]) == 0
    assert cli.main(["bench", "no-such-suite"]) == 2
    assert calls == []
    assert cli.main(["train", "--print-config"]) == 0
    assert calls == ["chosen"]
