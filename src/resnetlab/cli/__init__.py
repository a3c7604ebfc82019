"""The `resnetlab` command line. Library code logs; this module prints."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import ResNetLabError
from ..train.signals import stop_at_a_checkpoint
from .deploy import add_deploy_parser
from .models import add_model_parsers
from .reproduce import add_reproduce_parser
from .run import add_train_parser
from .runs import add_runs_parser
from .serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resnetlab", description="Deep residual networks (He et al. 2016): build, train, "
        "evaluate and predict. `resnetlab COMMAND --help` describes each command.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # --debug is accepted after the command too; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")

    add_model_parsers(sub, common)
    add_train_parser(sub, common)
    add_reproduce_parser(sub, common)
    add_deploy_parser(sub, common)
    add_serve_parser(sub, common)
    add_runs_parser(sub, common)
    return p


# What Ctrl-C leaves, said as the command ends; a command that leaves otherwise sets its own
# (set_defaults(interrupted=...)).
INTERRUPTED = ("interrupted; a training run keeps a checkpoint: rerun the same command with "
               "--out RUN_DIR --resume auto to continue")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 reports progress; the other ranks speak up only on trouble.
    main_rank = os.environ.get("RANK", "0") == "0"
    # Our own INFO lines are the CLI's progress; other libraries' (the ONNX exporter's graph
    # passes) are noise to a user, so they show from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("resnetlab").setLevel(logging.INFO if main_rank else logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    # Not for `--nproc` or under torchrun, whose processes torchrun stops and restarts.
    trains = getattr(args, "trains", False) and getattr(args, "nproc", 1) == 1 \
        and "WORLD_SIZE" not in os.environ
    try:
        with stop_at_a_checkpoint() if trains else contextlib.nullcontext():
            code = func(args)
        sys.stdout.flush()  # a closed pipe is met here, not at exit beyond this handler
        return code
    except BrokenPipeError:
        # `resnetlab eval RUN | head -2`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again, and end as a
        # pipe's writer does (128 + SIGPIPE), without a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ResNetLabError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path we were given that cannot be read or written
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(getattr(args, "interrupted", INTERRUPTED), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
