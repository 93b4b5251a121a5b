"""Where a command computes: `--device auto | cpu | cuda | cuda:N`, the same option on every command.

CPU is one device among others: every path takes a device, and CUDA adds bf16 autocast for supervised training (the
weights, and so AdamW's master copy, stay fp32; that task also turns TF32 on) and pinned, asynchronous host-to-device
copies of the batches. Everything else (RL, the value head, decoding, serving) stays in exact fp32.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch

DEVICE_HELP = "auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device `spec` names on this machine. auto: CUDA when there is a GPU for every rank on this machine, else
    CPU. A bare `cuda` under torchrun is this rank's GPU (LOCAL_RANK), so one command line serves every rank; an
    explicit index is taken as given outside torchrun.
    Raises ValueError, saying what to pass instead, for a device this machine does not have."""
    text = str(spec or "auto").strip().lower()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks on this machine
    if text == "auto":  # a GPU per rank, or the CPU
        text = "cuda" if torch.cuda.is_available() and ranks_here <= torch.cuda.device_count() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a torch device: use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {text!r}: genrec computes on CPU or CUDA; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text}: torch sees no CUDA device on this machine; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and ranks_here > 1:
        raise ValueError(f"--device {text}: {ranks_here} ranks on this machine would share one GPU; pass --device "
                         "cuda (each rank takes the GPU of its LOCAL_RANK)")
    if ranks_here > count:
        raise ValueError(f"--device {text}: {ranks_here} ranks on this machine but {count} GPU(s); start at most "
                         f"{count} (--nproc_per_node), or pass --device cpu")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= count:
        raise ValueError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions and the weights in fp32); nothing on CPU, where fp32 is as
    fast and the results stay what they were."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`: on CUDA through pinned memory, copied without blocking the host (which goes on to
    prepare the next batch while the copy and the step run)."""
    t = torch.as_tensor(batch)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
