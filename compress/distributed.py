"""Runs on several workers with torch.distributed: ``compress run --nproc N`` on one machine, or the same command
under ``torchrun --nnodes ... --nproc-per-node ...`` on several.

What each worker does (the :data:`WORLD` of this process says which one it is):
- calibration sequences and evaluation windows are split across workers (contiguous shares);
- layer statistics (Hessians, norms, cross terms) are summed over all workers (all-reduce), so every worker
  holds the statistics of the whole calibration set;
- the per-layer solves of a pass that declares them independent (``Requirements.layer_parallel``: GPTQ,
  SparseGPT, RTN, k-means, ...) are spread over the workers by cost (layers that share an input stay
  together), and every worker receives every compressed layer (all-gather); other passes (AWQ's search) run
  on every worker alike from the same statistics;
- perplexity, KL and top-1 agreement are sums over the windows, all-reduced;
- worker 0 writes the stage, the checkpoint and the reports; the others keep a stage of their own.

The collectives run on gloo over the CPU, or NCCL between GPUs (activations never travel: only statistics,
compressed layers and evaluation sums).
:func:`launch` starts N local workers and watches them: when one dies, the others are stopped and the run
ends with one line naming it (exit 4); nothing is written to the output, and the finished blocks stay for
``--resume``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import EXIT_WORKER_DIED


@dataclass
class World:
    rank: int = 0
    size: int = 1
    backend: str = "gloo"
    traffic: dict[str, int] = field(default_factory=dict)  # bytes sent per collective kind, for the report

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This worker's contiguous share of ``rows`` (split along dim 0, the first workers one longer)."""
        if self.size == 1:
            return rows
        n = rows.shape[0]
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        return rows[lo:hi]

    def all_reduce(self, tensors: list[torch.Tensor], kind: str) -> None:
        """Sum ``tensors`` over the workers, in place (where the backend wants them: the CPU for gloo, this
        worker's GPU for NCCL; copied back where they live elsewhere)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        where = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        for t in tensors:
            moved = t.to(where)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)
            self._count(kind, moved.numel() * moved.element_size())

    def all_gather(self, obj, kind: str) -> list:
        """Every worker's ``obj`` (anything ``torch.save`` writes: modules, formats, tensors), in worker order, its
        tensors on this worker's device (a GPU tensor of worker 1 does not land on worker 0's GPU 1)."""
        if self.size == 1:
            return [obj]
        import io

        import torch.distributed as dist

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out: list = [None] * self.size
        dist.all_gather_object(out, buffer.getvalue())
        self._count(kind, buffer.tell())
        here = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        return [torch.load(io.BytesIO(raw), map_location=here, weights_only=False)  # our own workers' objects
                for raw in out]

    def assign(self, groups: list[list[str]], costs: list[float]) -> list[list[str]]:
        """The groups this worker solves: the costliest first, each to the least loaded worker (the same
        choice on every worker)."""
        if self.size == 1:
            return groups
        load = [0.0] * self.size
        mine = []
        for k in sorted(range(len(groups)), key=lambda k: (-costs[k], k)):
            worker = min(range(self.size), key=lambda w: (load[w], w))
            load[worker] += costs[k]
            if worker == self.rank:
                mine.append(groups[k])
        return mine

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _count(self, kind: str, nbytes: int) -> None:
        self.traffic[kind] = self.traffic.get(kind, 0) + nbytes


WORLD = World()


def join_from_environment(device: str = "cpu") -> World:
    """Join the process group torchrun (or :func:`launch`) described in the environment (NCCL when the run is on
    GPUs, each worker on GPU ``LOCAL_RANK``; gloo otherwise); a lone process is a world of one."""
    global WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and WORLD.size == 1:
        import datetime

        import torch.distributed as dist

        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        WORLD = World(dist.get_rank(), dist.get_world_size(), backend)
    return WORLD


def leave() -> None:
    global WORLD
    if WORLD.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    WORLD = World()


def launch(argv: list[str], nproc: int, echo) -> int:
    """Start ``nproc`` workers running ``compress ARGV`` on this machine and wait for them; returns the exit code
    of the run (the first failing worker's; :data:`EXIT_WORKER_DIED` when one was killed)."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "COMPRESS_LAUNCHED": "1"}
    cmd = [sys.executable, "-m", "compress.cli", *argv]
    workers = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    try:
        while True:
            codes = [w.poll() for w in workers]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            failed.sort(key=lambda rc: (0 <= rc[1] <= 3, rc[0]))  # a killed worker is the cause, not the others
            if failed:
                rank, code = failed[0]
                _stop(workers)
                if code < 0 or code > 3:
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    echo(f"error: worker {rank} of {nproc} died ({how}); the run stopped and nothing was written "
                         "to the output (finished blocks are kept for --resume)")
                    return EXIT_WORKER_DIED
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except BaseException:
        _stop(workers)
        raise


def _stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    deadline = time.time() + 30
    for w in workers:
        try:
            w.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
