"""The `rnntl-fast` command (also `python -m rnntl_fast`): info, bench, pretrain, finetune, domain-adapt.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`; they are imported only when their subcommand runs, so that `rnntl-fast
--help` imports neither torch nor any subcommand.

A user's mistake (a bad flag value, a missing or malformed file) ends the command with one
line on stderr naming the flag or file and what is wrong, and exit code 2: argparse's
errors (argument types in rnntl_fast.cli_types), and during the run CommandLineError,
the data and pretrained-file readers' errors, or SystemExit with a message."""
import argparse
import importlib
import sys

# subcommand -> (module, help)
SUBCOMMANDS = {
    "info": ("rnntl_fast.info", "print versions, CPU, threads and which backends can run here"),
    "bench": ("rnntl_fast.bench.cli", "time rnntl_fast against torch.nn on this machine"),
    "pretrain": ("rnntl_fast.transfer.pretrain_cli", "pretrain a word-level LSTM language model"),
    "finetune": ("rnntl_fast.transfer.finetune_cli", "pretrain-then-transfer sentiment fine-tuning (main job)"),
    "domain-adapt": ("rnntl_fast.transfer.domain_adapt_cli",
                     "domain-adversarial training (gradient reversal) from a labelled to an unlabelled domain"),
}
USAGE_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, but an argument error is one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="rnntl-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module of the subcommand that runs
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def _user_message(failure: BaseException):
    """The one-line message of an exception that reports a user's mistake (it names the flag
    or file), else None."""
    if isinstance(failure, SystemExit):
        return failure.code if isinstance(failure.code, str) else None
    from .cli_types import CommandLineError
    from .pretrained import PretrainedFormatError, UnsupportedLayerError
    from .transfer.data import DataError
    if isinstance(failure, (CommandLineError, DataError, PretrainedFormatError, UnsupportedLayerError)):
        return str(failure)
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BaseException as failure:
        # whatever stopped the run, it leaves no empty output folder behind
        for undo in getattr(args, "undo_on_error", ()):
            undo()
        message = _user_message(failure)
        if message is None:
            raise  # a bug, not a user's mistake: the traceback is wanted
    print(f"rnntl-fast {args.command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


if __name__ == "__main__":
    sys.exit(main())
