"""`protein` command line: synth, validate, train, evaluate, predict, models, datasets, cache, archs, link.

Every verb prints its result as JSON on stdout (the last line, for train) and reports
failures as one line on stderr with a specific exit code: 1 data failed validation,
2 bad input or usage, 3 object store, 4 registry, 5 promotion conflict, 7 a training rank died
(`train --nproc`; rerun with the same --run-id to resume), 8 a stored record (model.json,
champion.json, a run index entry, a manifest) is over its size cap, not JSON, or not its schema,
9 busy: a `datasets gc` holds the store's datasets (a second gc, or a push that waited its bound) or a
push is in progress (gc deleted nothing); nothing was changed, run it again later; `datasets remove` also
exits 9 for a dataset still in use (a channel's head, a registered version's data, a live run's). 10 a training
run was taken over: another attempt of the same run id wrote its checkpoint since this one read it
(this attempt stopped; the other goes on). 11 training ran out of memory: start a new run with a
smaller --batch-size or with --accumulate K. 12 training diverged (an epoch's loss is NaN or inf;
nothing of that epoch is kept or registered): lower --lr. 130 interrupted (Ctrl-C): the one line
is `protein VERB: interrupted`, without a traceback from the verb or its worker processes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

# The verbs' modules are re-exported so `from protein.cli import <name>` keeps working.
from protein.cli.data_commands import cmd_cache, cmd_datasets, cmd_synth, cmd_validate, pipeline_event
from protein.cli.model_commands import cmd_evaluate, cmd_models, cmd_predict, models_gc
from protein.cli.output import cmd_link, emit, progress_bar
from protein.cli.parser import DATA_HELP, build_parser
from protein.cli.train_commands import cmd_archs, cmd_train, cmd_train_job, parse_fold, train_config_from_args

__all__ = [
    "DATA_HELP", "build_parser", "cmd_archs", "cmd_cache", "cmd_datasets", "cmd_evaluate", "cmd_link", "cmd_models",
    "cmd_predict", "cmd_synth", "cmd_train", "cmd_train_job", "cmd_validate", "emit", "main", "models_gc",
    "parse_fold", "pipeline_event", "progress_bar", "train_config_from_args",
]


def os_error_line(exc: OSError) -> str:
    """``path: reason`` for an OSError (both paths for a rename), or its text when it names none."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    paths = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{paths}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    from protein.errors import ProteinError
    from protein.process_gc import freeze_at_exit

    freeze_at_exit()  # a command is a process of its own: no collector walk when it exits
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "great_expectations", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ProteinError as exc:
        print(f"protein {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # config checks: bad option values are usage errors
        print(f"protein {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A local path the verb could not read or write (a folder where a file goes, no permission, a
        # full disk) that no check before it caught: still one line naming the path, not a traceback.
        print(f"protein {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protein {args.command}: interrupted", file=sys.stderr)
        return 130
