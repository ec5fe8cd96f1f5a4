"""What the benchmarks share: the environment they record, markdown tables, dtypes, and one definition
of a method's trainable state."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform

# One-line warnings that libraries log while peft imports them, which would otherwise land between a
# benchmark's progress and its table: bitsandbytes >= 0.50 tries to fetch a CPU kernel from the hub at
# import (no hub here), torchao 0.18 registers Enums with torch 2.14's pytree. A benchmark process keeps
# them out of its output and records them in its environment (``withheld_warnings``); only the bench
# scripts install this filter, so a user's own code still sees them.
_IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",
}
withheld_warnings: list[str] = []


class _WithholdImportNoise(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefix):
            withheld_warnings.append(f"{record.name}: {record.getMessage()}")
            return False
        return True


for _name, _prefix in _IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_WithholdImportNoise(_prefix))

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def environment(device: str) -> dict:
    """Date, versions, machine and device of a run (written beside its results)."""
    import torch
    env = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
               cpu_threads=torch.get_num_threads(), device=str(device))
    from apet_kernels.__main__ import installed_version  # (metadata: imports nothing, prints nothing)
    env.update({name: installed_version(name) for name in ("triton", "transformers", "peft", "bitsandbytes", "torchao")})
    if str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    env["withheld_warnings"] = withheld_warnings  # the list itself: imports after this call add to it
    return env


def markdown_table(rows: list[dict], keys: list[str], header: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) over ``keys``; floats to 4 significant digits."""
    lines = ["| " + " | ".join(header or keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.get(k, "") for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trainable_state_bytes(params, optimizer=None, buffers=()) -> int:
    """What training a method adds to memory besides the frozen model: its trainable parameters and
    their gradients, the optimizer's state (measured when ``optimizer`` has stepped, else AdamW's two
    fp32 moments per parameter), and the buffers the method adds (indices, bases, masks, orderings)."""
    import torch
    params = list(params)
    total = sum(2 * p.numel() * p.element_size() for p in params)
    if optimizer is not None and optimizer.state:
        total += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    else:
        total += sum(8 * p.numel() for p in params)
    return total + sum(b.numel() * b.element_size() for b in buffers)


def interleaved_step_times(trainees: dict, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Each trainee's ``step()`` (seconds) once per round, all of them in every round: this machine drifts between
    runs, and ratios taken within one round do not."""
    for _ in range(warmup):
        for t in trainees.values():
            t.step()
    times = {m: [] for m in trainees}
    for _ in range(rounds):
        for m, t in trainees.items():
            times[m].append(t.step())
    return times


def ratio_quartiles(times: list[float], floor: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios times / floor."""
    import statistics
    ratios = [a / b for a, b in zip(times, floor)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]
