"""Rank discovery and process-group start-up for the distributed engines (docs/design.md §1, last table row).

Three ways a process learns its place:

* **torchrun** (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``): the
  default group starts from the environment (``init_method="env://"``).
* **mpirun** (Open MPI: ``OMPI_COMM_WORLD_*``; MPICH / Intel MPI: ``PMI_RANK`` / ``PMI_SIZE``): ranks come from
  MPI; rank 0 opens the rendezvous store on a free port the OS picks (so no port race) and the address + port are
  agreed with one ``MPI.bcast`` (mpi4py). When every rank runs on one host the store listens on loopback
  ``127.0.0.1`` — DeepSpeed's MPI discovery takes ``hostname -I``, which need not be reachable (or even exist) on
  a sandboxed host; across hosts it is ``MASTER_ADDR`` if set, else the first non-loopback IPv4 address of rank 0's
  hostname. The standard variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``) are then exported, so libraries that read them (DeepSpeed) agree.
* **neither**: one process, no process group (every :class:`~qgalore_dist.parallel.collectives.Collectives` runs in
  local mode).

On one host with gloo, ``GLOO_SOCKET_IFNAME=lo`` is set unless the user chose an interface: gloo otherwise binds
the address the hostname resolves to. With NCCL each process selects GPU ``local_rank`` before the group starts.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "LaunchInfo", "discover_launch", "init_distributed", "watch_launcher"]

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process: ``launcher`` is "torchrun", "mpi" or "single"."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job once the default process group is up (or not, for one process)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str  # "gloo", "nccl", or "none" (one process, no group)
    device: torch.device
    master_addr: str | None
    master_port: int | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"{key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None


def discover_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank, world size and local rank from the launcher's environment variables (pure: reads ``environ``).

    torchrun's variables win over MPI's (``torchrun`` started under ``mpirun`` is torchrun's job); a rank outside
    ``[0, world_size)`` raises ``ValueError`` naming the variables.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        info = LaunchInfo("torchrun", _int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0),
                          _int(env, "LOCAL_WORLD_SIZE", world))
        names = "RANK/WORLD_SIZE"
    elif "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        info = LaunchInfo("mpi", _int(env, "OMPI_COMM_WORLD_RANK"), world,
                          _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world))
        names = "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE"
    elif "PMI_RANK" in env:
        world = _int(env, "PMI_SIZE")
        info = LaunchInfo("mpi", _int(env, "PMI_RANK"), world, _int(env, "MPI_LOCALRANKID", 0),
                          _int(env, "MPI_LOCALNRANKS", world))
        names = "PMI_RANK/PMI_SIZE"
    else:
        return LaunchInfo("single", 0, 1, 0, 1)
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or \
            not 0 <= info.local_rank < max(1, info.local_world_size):
        raise ValueError(f"{names}: rank {info.rank} / local rank {info.local_rank} do not fit world size "
                         f"{info.world_size} / local world size {info.local_world_size}")
    return info


def _routable_address() -> str:
    """First non-loopback IPv4 address of this host's name (for a job spanning hosts)."""
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RuntimeError(f"cannot resolve this host's name {host!r} ({exc}): set MASTER_ADDR to an address "
                           "every rank can reach") from None
    for info in infos:
        addr = info[4][0]
        if not addr.startswith("127."):
            return addr
    raise RuntimeError(f"host name {host!r} resolves only to loopback addresses, which other hosts cannot reach: "
                       "set MASTER_ADDR")


def _select_device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _prefer_loopback(backend: str, single_host: bool, env: MutableMapping[str, str]) -> None:
    if backend == "gloo" and single_host and "GLOO_SOCKET_IFNAME" not in env and \
            os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"


def init_distributed(backend: str | None = None,
                     timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> DistEnv:
    """Start the default process group as the launcher asks (see the module docstring) and return where this
    process stands. ``backend`` defaults to "nccl" when CUDA is available, else "gloo". One process without a
    launcher starts no group. If a default group already exists it is described, not restarted."""
    info = discover_launch()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        return DistEnv(info.launcher, dist.get_rank(), dist.get_world_size(), info.local_rank,
                       info.local_world_size, backend, _select_device(backend, info.local_rank),
                       os.environ.get("MASTER_ADDR"), _int(os.environ, "MASTER_PORT", 0) or None)
    if info.launcher == "single":
        return DistEnv("single", 0, 1, 0, 1, "none", _select_device(backend, 0), None, None)
    device = _select_device(backend, info.local_rank)
    if info.launcher == "torchrun":
        addr = os.environ.get("MASTER_ADDR", LOOPBACK)
        _prefer_loopback(backend, info.local_world_size == info.world_size, os.environ)
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
        return DistEnv("torchrun", info.rank, info.world_size, info.local_rank, info.local_world_size, backend,
                       device, addr, _int(os.environ, "MASTER_PORT", 0) or None)
    return _init_from_mpi(info, backend, device, timeout)


def _init_from_mpi(info: LaunchInfo, backend: str, device: torch.device, timeout: datetime.timedelta) -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("launched by mpirun but mpi4py is not installed: pip install mpi4py (or start with "
                           "torchrun)") from exc
    comm = MPI.COMM_WORLD
    if comm.Get_rank() != info.rank or comm.Get_size() != info.world_size:
        raise RuntimeError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the environment rank "
                           f"{info.rank} of {info.world_size}")
    single_host = len(set(comm.allgather(socket.gethostname()))) == 1
    store = None
    agreed: tuple[str, str, int]
    if info.rank == 0:
        try:
            addr = LOOPBACK if single_host else os.environ.get("MASTER_ADDR") or _routable_address()
            # port 0: the OS picks a free port while the store holds it — no window for another process to take it
            store = dist.TCPStore(addr, _int(os.environ, "MASTER_PORT", 0), info.world_size, is_master=True,
                                  timeout=timeout, wait_for_workers=False)
            agreed = ("ok", addr, int(store.port))
        except Exception as exc:  # every rank must leave the bcast: send the failure instead of hanging them
            agreed = ("error", f"{type(exc).__name__}: {exc}", 0)
    else:
        agreed = ("", "", 0)
    status, addr, port = comm.bcast(agreed, root=0)
    if status != "ok":
        raise RuntimeError(f"rank 0 could not open the rendezvous store: {addr}")
    if store is None:
        store = dist.TCPStore(addr, port, info.world_size, is_master=False, timeout=timeout)
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
    _prefer_loopback(backend, single_host, os.environ)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
    return DistEnv("mpi", info.rank, info.world_size, info.local_rank, info.local_world_size, backend, device, addr,
                   port)


def watch_launcher(poll_s: float = 1.0, what: str = "worker") -> threading.Thread | None:
    """Stop this process when the launcher that started it dies (torchrun's agent, DeepSpeed's launcher, MPI's
    daemon): a daemon thread polls ``getppid()`` and, once the process has been re-parented, prints one line and
    exits with status 1. Without it a ``kill -9`` of the launcher leaves the ranks training on — their collectives
    still succeed among themselves, so no timeout ever fires — and writing checkpoints no one will collect (and
    that a new run in the same directory would race). Checkpoints are published by rename, so exiting at any
    moment leaves the previous complete one. Polling rather than ``prctl(PR_SET_PDEATHSIG)``: the latter fires when
    the parent *thread* that forked us exits, which a launcher's helper thread may do while the launcher lives.
    Only for processes a launcher started (:func:`discover_launch` is not "single"): a single process's parent is
    a shell that may legitimately go away (``nohup``). Returns the thread (None when not watching)."""
    if discover_launch().launcher == "single":
        return None
    parent = os.getppid()
    if parent == 1:  # already orphaned (or started by init): nothing to watch
        return None

    def run() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                sys.stderr.write(f"error: the launcher of this {what} (pid {parent}) is gone; stopping (pid "
                                 f"{os.getpid()}); the last complete checkpoint is kept\n")
                sys.stderr.flush()
                os._exit(1)

    t = threading.Thread(target=run, name="qgalore-launcher-watch", daemon=True)
    t.start()
    return t
