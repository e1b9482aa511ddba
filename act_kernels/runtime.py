"""What a long run needs around the model, shared by ``act search`` and ``act eval``.

* :class:`Dist`: the process group when launched by ``torchrun`` (rank, world size, a SUM
  all-reduce, a barrier), a no-op on one process.
* :class:`Checkpoint`: append-only JSONL records, flushed one by one, so an interrupted run
  started again with the same settings continues where it stopped.
* :func:`progress`: the progress bar of a long step (on rank 0 only).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch


class Dist:
    """Rank / world size and a SUM all-reduce (no-op on one process)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend=backend)
                self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        backend = dist.get_backend()
        work = t.cuda() if backend == "nccl" else t.cpu()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(t.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


class Checkpoint:
    """JSONL records, appended and flushed one by one (written by rank 0 only).

    The first line is ``header``; a file written with another header's ``config`` is refused
    (``ValueError``), so a run never continues from another run's records."""

    def __init__(self, path: Path, header: dict, writer: bool):
        self.path = Path(path)
        self.writer = writer
        self.records: list[dict] = []
        if self.path.exists():
            lines = [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]
            if lines and lines[0].get("kind") == "header":
                if lines[0]["config"] != header["config"]:
                    raise ValueError(
                        f"{self.path} was written by a run with other settings; use another "
                        "--out, or delete the checkpoint to start over")
                self.records = lines[1:]
        if not self.records and writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n")

    def find(self, kind: str, **keys) -> Optional[dict]:
        for rec in self.records:
            if rec.get("kind") == kind and all(rec.get(k) == v for k, v in keys.items()):
                return rec
        return None

    def all(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())


def progress(total: int, desc: str, enabled: bool, unit: str = "run"):
    """A tqdm bar on stderr counting ``total`` ``unit`` s (disabled on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
