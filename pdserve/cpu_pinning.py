"""Pins a replica process to cores of its node that no other replica holds (torch-free).

Replica processes on one node coordinate without a central service: each core has a lock file
in a node-local directory, and a process owns the core while it holds an exclusive `flock` on
an open descriptor of that file. The kernel drops the lock when the process dies, however it
dies, so a restarted replica can claim the cores again. Only cores in the process's current
affinity are candidates. A process that cannot get all the cores it asks for runs unpinned and
logs a WARNING (the replica exports the pinned count as `pdserve_replica_pinned_cpus`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def default_lock_dir() -> str:
    """Node-local and shared by every process of the node: /dev/shm, else the temp dir."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(root, "pdserve-cpus")


@dataclass
class CpuClaim:
    """Cores a process holds; empty when it runs unpinned. Keep it referenced for the life
    of the process: the locks are held by its descriptors (a forked child inherits them and
    keeps the cores claimed until it exits too)."""

    cpu_ids: tuple[int, ...] = ()
    _fds: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Frees the cores for other processes; the affinity stays as it is. Idempotent."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.cpu_ids = ()


def claim_cpus(num_cpus: int, candidates: Iterable[int], lock_dir: str) -> CpuClaim:
    """Locks up to `num_cpus` of the `candidates` (lowest ids first) in `lock_dir`. Fewer
    means fewer were free, and then the claim holds exactly the free ones. Raises OSError
    when `lock_dir` is unusable."""
    _make_shared_dir(lock_dir)
    claim = CpuClaim()
    for cpu in sorted(candidates):
        if len(claim.cpu_ids) == num_cpus:
            break
        try:
            fd = _open_lock_file(os.path.join(lock_dir, f"cpu{cpu}.lock"))
        except OSError:
            claim.release()  # else the cores claimed so far stay held by leaked descriptors
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        claim._fds.append(fd)
        claim.cpu_ids += (cpu,)
    return claim


def set_process_affinity(cpu_ids: Iterable[int]) -> None:
    """Restricts every thread of this process to `cpu_ids`. `sched_setaffinity(0)` changes only
    the calling thread, so each task of /proc/self/task is set; threads created afterwards
    inherit from their creator. Repeats until a pass finds no thread it had not set, in case
    one was started while setting the others."""
    cpus = set(cpu_ids)
    os.sched_setaffinity(0, cpus)
    done: set[int] = set()
    while True:
        tids = {int(tid) for tid in os.listdir("/proc/self/task")} - done
        if not tids:
            return
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # the thread exited meanwhile
                os.sched_setaffinity(tid, cpus)
        done |= tids


def pin_process(num_cpus: int, owner: str, lock_dir: str | None = None) -> CpuClaim:
    """Claims `num_cpus` free cores of this node for the calling process and pins all its
    threads to them. Call it before starting the threads that should run there (torch's).
    When the cores cannot be claimed or pinned, logs a WARNING naming `owner` and returns an
    empty claim: the process runs unpinned."""
    if sys.platform != "linux" or not hasattr(os, "sched_setaffinity"):
        logger.warning("%s: pin_cpus needs Linux sched_setaffinity; running unpinned", owner)
        return CpuClaim()
    lock_dir = lock_dir or default_lock_dir()
    candidates = sorted(os.sched_getaffinity(0))
    try:
        claim = claim_cpus(num_cpus, candidates, lock_dir)
    except OSError as error:
        logger.warning("%s: cannot use CPU lock dir %s (%s); running unpinned",
                       owner, lock_dir, error)
        return CpuClaim()
    if len(claim.cpu_ids) < num_cpus:
        free = list(claim.cpu_ids)
        claim.release()
        logger.warning(
            "%s: pin_cpus wants %d cores but only %d of its %d allowed cores %s are free "
            "(free: %s; the others are held by replicas of this node, lock dir %s); "
            "running unpinned", owner, num_cpus, len(free), len(candidates), candidates,
            free, lock_dir,
        )
        return CpuClaim()
    try:
        set_process_affinity(claim.cpu_ids)
    except OSError as error:  # e.g. a cpuset changed under the process
        logger.warning("%s: cannot pin to cores %s (%s); running unpinned",
                       owner, list(claim.cpu_ids), error)
        claim.release()
        with contextlib.suppress(OSError):  # undo a partly applied affinity
            set_process_affinity(candidates)
        return CpuClaim()
    logger.info("%s: pinned to cores %s", owner, list(claim.cpu_ids))
    return claim


def _make_shared_dir(path: str) -> None:
    """Creates `path` writable by every user of the node (sticky, like /tmp)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    os.chmod(path, 0o1777)


def _open_lock_file(path: str) -> int:
    # Read-only is enough for flock, so files another user created serve everyone. Opening an
    # existing file without O_CREAT avoids EACCES from fs.protected_regular in a sticky dir.
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o444)
