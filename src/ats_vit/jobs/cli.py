"""The ``ats-vit`` command line: one sub-command per job module, each built from its options'
declarations (see :mod:`.options`)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import ablate, bench, demo, eval, finetune, train, viz
from .errors import UserError
from .options import Parser, add_arguments, options_from

COMMANDS = {c["name"]: c for c in (demo.COMMAND, train.COMMAND, finetune.COMMAND, eval.COMMAND, ablate.COMMAND,
                                   viz.COMMAND, bench.COMMAND)}


def build_parser() -> Parser:
    parser = Parser(prog="ats-vit", description="Adaptive Token Sampling for timm and transformers Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, command in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=command["help"], description=command.get("description")),
                      command["options"])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; a user's error is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a parse error (printed as one line) or --help
        return int(e.code or 0)
    command = COMMANDS[args.command]
    try:
        command["run"](options_from(command["options"], args, command="ats-vit " + " ".join(argv)))
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT; results are written atomically
        print("ats-vit: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        # Errors raised in a data-loader worker come back with its traceback folded into the message.
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"ats-vit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
