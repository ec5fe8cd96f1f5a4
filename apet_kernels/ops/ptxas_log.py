"""Reading ``ptxas -v`` logs: registers, spills, stack and static shared memory per compiled kernel.

One parser for the Triton compile check (the log of the ptxas run Triton makes for a cubin) and for
bench/compile_report.py's ``nvcc -Xptxas -v`` over csrc/ (many kernels in one log).
"""

from __future__ import annotations

import re

_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse(log: str) -> list[dict]:
    """One dict per entry function, in log order: kernel, arch, registers, smem, stack, spill_stores, spill_loads."""
    rows, cur = [], None
    for line in log.splitlines():
        if m := _FUNCTION.search(line):
            cur = dict(kernel=m.group(1), arch=m.group(2))
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            cur.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    return rows
