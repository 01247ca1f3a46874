"""CPU pinning: replica processes of a node split its cores through per-core flock files, a dead
process's cores come free, every thread ends up on the claimed cores, and a replica that
cannot get its cores says so and runs unpinned."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve import cpu_pinning
from pdserve.config import parse_config
from pdserve.cpu_pinning import claim_cpus, pin_process, set_process_affinity
from pdserve.errors import ConfigError
from pdserve.metrics import ReplicaMetrics

REPO = Path(__file__).resolve().parents[2]


def _thread_affinities() -> dict[int, set[int]]:
    return {
        int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")
    }


@pytest.fixture(autouse=True)
def restore_affinity() -> Iterator[None]:
    allowed = os.sched_getaffinity(0)
    yield
    set_process_affinity(allowed)


@pytest.fixture
def lock_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cpus")


def test_claims_in_one_process_conflict_like_processes(lock_dir: str) -> None:
    # flock belongs to the open file description, so two claims here exclude each other.
    first = claim_cpus(1, [0, 1, 2], lock_dir)
    second = claim_cpus(1, [0, 1, 2], lock_dir)
    assert (first.cpu_ids, second.cpu_ids) == ((0,), (1,))
    partial = claim_cpus(3, [0, 1, 2], lock_dir)
    assert partial.cpu_ids == (2,)  # fewer than asked: exactly the free ones
    partial.release()
    first.release()
    first.release()  # idempotent
    assert claim_cpus(2, [0, 1, 2], lock_dir).cpu_ids == (0, 2)


def test_cores_of_a_killed_process_come_free(lock_dir: str) -> None:
    child_code = (
        "import sys\n"
        "from pdserve.cpu_pinning import claim_cpus\n"
        f"claim = claim_cpus(2, [0, 1, 2], {lock_dir!r})\n"
        "print(*claim.cpu_ids, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], cwd=REPO,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["0", "1"]
        seen = claim_cpus(3, [0, 1, 2], lock_dir)
        assert seen.cpu_ids == (2,)
        seen.release()
    finally:
        child.kill()  # no release: the kernel drops the locks with the process
        child.wait()
    assert claim_cpus(3, [0, 1, 2], lock_dir).cpu_ids == (0, 1, 2)


def test_every_thread_runs_on_the_claimed_cores(lock_dir: str) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 allowed cores to see the affinity change")
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    try:
        claim = pin_process(1, "decode-0", lock_dir)
        assert claim.cpu_ids == (allowed[0],)
        assert before.native_id is not None
        affinities = _thread_affinities()
        assert affinities[before.native_id] == {allowed[0]}
        assert all(cpus == {allowed[0]} for cpus in affinities.values()), affinities
        after: list[set[int]] = []
        started = threading.Thread(target=lambda: after.append(os.sched_getaffinity(0)))
        started.start()
        started.join()
        assert after == [{allowed[0]}]
    finally:
        stop.set()
        before.join()


def test_too_few_free_cores_warn_and_run_unpinned(
    lock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    others = claim_cpus(len(allowed) - 1, allowed, lock_dir)  # another replica's cores
    with caplog.at_level(logging.WARNING, logger="pdserve.cpu_pinning"):
        claim = pin_process(2, "prefill-3", lock_dir)
    assert claim.cpu_ids == ()
    assert os.sched_getaffinity(0) == set(allowed)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "prefill-3: pin_cpus wants 2 cores but only 1 of" in record.getMessage()
    assert "running unpinned" in record.getMessage()
    # The core it tried stays free for others.
    assert claim_cpus(1, allowed, lock_dir).cpu_ids == (allowed[-1],)
    others.release()


def test_more_cores_than_allowed_warn(lock_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    num_allowed = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="pdserve.cpu_pinning"):
        assert pin_process(num_allowed + 1, "decode-1", lock_dir).cpu_ids == ()
    assert f"wants {num_allowed + 1} cores but only {num_allowed} of" in caplog.text


def test_unusable_lock_dir_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with caplog.at_level(logging.WARNING, logger="pdserve.cpu_pinning"):
        assert pin_process(1, "decode-2", str(not_a_dir)).cpu_ids == ()
    assert "decode-2: cannot use CPU lock dir" in caplog.text


def test_a_failed_claim_keeps_no_core(lock_dir: str, tmp_path: Path) -> None:
    os.mkdir(lock_dir)
    os.symlink(tmp_path / "missing" / "x", os.path.join(lock_dir, "cpu1.lock"))
    with pytest.raises(FileNotFoundError):
        claim_cpus(2, [0, 1], lock_dir)
    assert claim_cpus(1, [0], lock_dir).cpu_ids == (0,)


def test_a_failed_pin_releases_its_cores(
    lock_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(cpu_ids: object) -> None:
        raise OSError(22, "Invalid argument")

    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_pinning, "set_process_affinity", refuse)
    with caplog.at_level(logging.WARNING, logger="pdserve.cpu_pinning"):
        assert pin_process(1, "decode-5", lock_dir).cpu_ids == ()
    assert f"decode-5: cannot pin to cores [{allowed[0]}]" in caplog.text
    assert claim_cpus(1, allowed, lock_dir).cpu_ids == (allowed[0],)


def test_without_linux_affinity_warns(
    lock_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger="pdserve.cpu_pinning"):
        assert pin_process(1, "decode-4", lock_dir).cpu_ids == ()
    assert "decode-4: pin_cpus needs Linux" in caplog.text


def test_pin_cpus_config() -> None:
    config = parse_config({"decode": {"resources": {"pin_cpus": True}}}, origin="test.yaml")
    assert config.decode.resources.pin_cpus is True
    assert config.prefill.resources.pin_cpus is False


@pytest.mark.parametrize("bad", ["yes", 1])
def test_pin_cpus_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"decode\.resources\.pin_cpus"):
        parse_config({"decode": {"resources": {"pin_cpus": bad}}}, origin="test.yaml")


def test_pinned_cpus_gauge() -> None:
    metrics = ReplicaMetrics("decode-0", "decode")
    labels = {"replica": "decode-0", "role": "decode"}
    assert metrics.registry.get_sample_value("pdserve_replica_pinned_cpus", labels) == 0
    metrics.set_pinned_cpus(2)
    assert metrics.registry.get_sample_value("pdserve_replica_pinned_cpus", labels) == 2
