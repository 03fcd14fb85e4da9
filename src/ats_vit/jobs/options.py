"""Command-line options, each declared once.

An :class:`Option` is one flag: how its text parses, what it allows and its help. A job declares
its options as dataclass fields made by calling an option with the job's default (``BATCH_SIZE(256)``),
so one declaration gives the parser's argument, the job's field and the check, which runs on every
value before any work starts. The options several commands take are declared here, once.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from .errors import UserError

OPTION = "ats_vit.option"
Check = Callable[[Any], Optional[str]]  # None when the value is allowed, else "must be ..."


@dataclass(frozen=True)
class Option:
    """One command-line option (``flag`` starts with ``--``) or positional argument."""
    flag: str
    parse: Callable[[str], Any] = str
    help: str = ""
    check: Optional[Check] = None
    switch: bool = False  # a flag without a value (store_true)
    nargs: Optional[str] = None
    metavar: Optional[str] = None

    def __call__(self, default: Any = None, **changes: Any) -> Any:
        """A dataclass field for this option, with ``default`` (and e.g. another ``help``)."""
        option = replace(self, **changes) if changes else self
        if isinstance(default, list):
            return field(default_factory=lambda: list(default), metadata={OPTION: option})
        return field(default=default, metadata={OPTION: option})

    def refusal(self, value: Any) -> Optional[str]:
        """The one-line error for ``value``, or None when it is allowed (None always is)."""
        if value is None or value is False or self.check is None:
            return None
        allowed = self.check(value)
        return None if allowed is None else f"{self.flag} {allowed}, got {_show(value)}"


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# Parsers: a bad text is refused by the parser with one line naming the option.
def parse_blocks(text: str) -> List[int]:
    """'3-11', '3,5,7' or '3'; a range must not run backwards."""
    blocks: List[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"the range {part!r} is empty; write it low-high, e.g. 3-11")
            blocks.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like '3-11' or '3,5,7', got {text!r}") from None
    return blocks


def parse_num_tokens(text: str):
    """An int, a fraction, or a comma list of them (one per ATS block)."""
    def one(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an int or a fraction, got {v!r}") from None
    values = [one(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def comma_list(item: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    def parse(text: str) -> List[Any]:
        try:
            return [item(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


# Checks: each returns what is allowed when the value is not.
def at_least(low: float) -> Check:
    return lambda v: None if all(x >= low for x in (v if isinstance(v, list) else [v])) else f"must be >= {low:g}"


def one_of(names: Callable[[], List[str]]) -> Check:
    return lambda v: None if all(x in names() for x in (v if isinstance(v, list) else [v])) \
        else f"must be one of {names()}"


def fractions(v: List[float]) -> Optional[str]:
    return None if all(0 < x < 1 for x in v) else "must be GMACs reductions in (0, 1), e.g. 0.4,0.5"


def seed_range(v: int) -> Optional[str]:
    return None if 0 <= v < 2 ** 31 else f"must be in 0..{2 ** 31 - 1}"


def usable_device(text: str) -> Optional[str]:
    """'cpu', or 'cuda'/'cuda:N' for a GPU this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return "must be cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return "must be cpu, cuda or cuda:N"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "must be cpu: no CUDA GPU is available here"
    if device.index is not None and device.index >= count:
        return f"must be one of cuda:0..cuda:{count - 1} (this machine's GPUs)"
    return None


def writable_folder(text: str) -> Optional[str]:
    """A folder that exists and is writable, or can be made."""
    path = Path(text)
    if path.exists():
        return None if path.is_dir() and os.access(path, os.W_OK) else "must be a writable folder"
    parent = next(p for p in path.absolute().parents if p.exists())
    return None if parent.is_dir() and os.access(parent, os.W_OK) else f"must be a folder that can be made ({parent} is not writable)"


def _samplers() -> List[str]:
    from ..core.sampling import list_samplers
    return list_samplers()


def _reducers() -> List[str]:
    from ..reducers import TRAINED  # the rivals that need no training are ablate's, not a command's
    return ["ats", *TRAINED]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Options several commands share.
MODEL = Option("--model", help="timm model name, or a local .safetensors with its metadata JSON beside it "
                               "(default: the bundled Fashion-MNIST ViT)")
CHECKPOINT = Option("--checkpoint", help="local weights for --model, loaded by timm")
DATA = Option("--data", help="'fashion-mnist' or an image folder of class sub-folders")
BLOCKS = Option("--blocks", parse_blocks, "ATS blocks, e.g. 3-11 or 3,6,9 (default 3..last)")
NUM_TOKENS = Option("--num-tokens", parse_num_tokens, "K: int, fraction, or one per block")
SAMPLER = Option("--sampler", help="inverse_transform (default), topk or random", check=one_of(_samplers))
REDUCER = Option("--reducer", help="ats (default) or dynamicvit (the trained rival: its predictors come with "
                                   "the model, and finetune trains them)", check=one_of(_reducers))
BATCH_SIZE = Option("--batch-size", int, check=at_least(1))
WORKERS = Option("--workers", int, "data-loading processes", check=at_least(0))
LIMIT = Option("--limit", int, "use the first N images only", check=at_least(1))
SEED = Option("--seed", int, check=seed_range)
DEVICE = Option("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)", check=usable_device)
OUT = Option("--out", help="output folder", check=writable_folder)
RESUME = Option("--resume", help="continue the run saved in --out after its last epoch", switch=True)
DEFAULT_DEVICE = _default_device()


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``ats-vit: error: ...``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"ats-vit: error: {message}\n")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One parser argument per option field of the dataclass ``cls``."""
    for f in fields(cls):
        option: Optional[Option] = f.metadata.get(OPTION)
        if option is None:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        if option.switch:
            parser.add_argument(option.flag, dest=f.name, action="store_true", help=option.help)
        elif option.flag.startswith("--"):
            parser.add_argument(option.flag, dest=f.name, type=option.parse, default=default, help=option.help,
                                metavar=option.metavar)
        else:
            parser.add_argument(f.name, type=option.parse, nargs=option.nargs, default=default, help=option.help)


def options_from(cls: type, args: argparse.Namespace, **extra: Any):
    """The job's options from parsed ``args`` (checked when the job starts, :func:`check_options`)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if OPTION in f.metadata}, **extra)


def check_options(options: Any) -> None:
    """Every option value of a job checked before any work starts: a UserError names the first
    refused option, what it allows and the value given."""
    for f in fields(options):
        if OPTION in f.metadata:
            refusal = f.metadata[OPTION].refusal(getattr(options, f.name))
            if refusal:
                raise UserError(refusal)
