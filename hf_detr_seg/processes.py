"""This process's share of a job that `accelerate launch` spread over several processes (and devices).

`accelerate launch [--num_processes N] -m hf_detr_seg.cli predict|evaluate ...` starts N copies of the command.
Each takes every N-th unit of work (a group of images, a batch of a split), in the same units a single process
would cut, so every unit gets the same forward passes as in a one-process run; the per-image records are then
gathered on every process and put back in the one-process order, and the main process writes the merged files.
Without a launcher (or with one process) this is a no-op: one process, index 0, nothing to gather.

accelerate is the engine: `PartialState` sets up the process group (gloo on CPUs, NCCL on GPUs) and gives
each process its own device (`cuda:<local rank>` when there are GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Processes:
    """Where this process stands: `index` of `count`, and the device `accelerate` gave it (None: the default)."""

    index: int = 0
    count: int = 1
    device: torch.device | None = None

    @classmethod
    def from_environment(cls) -> "Processes":
        """The processes `accelerate launch` (or torchrun) started, from its environment; one process otherwise."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's units: every `count`-th from its `index` (round robin balances sorted inputs)."""
        return list(units[self.index :: self.count])

    def gather(self, records: list[Any]) -> list[Any]:
        """Every process's records, concatenated (in process order), on every process."""
        if self.count == 1:
            return list(records)
        gathered: list[list[Any] | None] = [None] * self.count
        torch.distributed.all_gather_object(gathered, records)
        return [record for part in gathered for record in part]

    def wait(self) -> None:
        """Until every process gets here."""
        if self.count > 1:
            torch.distributed.barrier()
