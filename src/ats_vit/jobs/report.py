"""What the jobs report: plain-text tables, the machine a number was measured on, and JSON
written atomically."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch


def machine(device: str) -> dict:
    """The machine a measurement ran on: processor, torch threads, device (and GPU), torch."""
    info = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def save_atomic(write: Callable[[str], None], path: Path) -> None:
    """``write`` (given a file name) through a temporary file beside ``path``, then renamed into
    place, so a kill leaves the old file or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def write_json(path: Path, data: object) -> None:
    """``data`` as indented JSON, written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    save_atomic(lambda name: Path(name).write_text(text), path)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """Render ``rows`` (dicts) as an aligned table with ``columns`` as headers; floats get 3 decimals."""
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    body = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in body])
