"""The `rnntl-fast` command (also `python -m rnntl_fast`): info, bench, pretrain, finetune.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`run(args) -> int`; they are imported only when their subcommand runs so that `rnntl-fast
info` stays fast."""
import argparse
import importlib
import sys

# subcommand -> (module, help)
SUBCOMMANDS = {
    "info": ("rnntl_fast.info_cli", "print versions and which backends were built"),
    "bench": ("rnntl_fast.bench", "time rnntl_fast against torch.nn on this machine"),
    "pretrain": ("rnntl_fast.transfer.pretrain_cli", "pretrain a word-level LSTM language model"),
    "finetune": ("rnntl_fast.transfer.finetune_cli", "pretrain-then-transfer sentiment fine-tuning (main job)"),
}


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnntl-fast", description=__doc__.splitlines()[0])
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as error:
        from .transfer.data import DataError  # imported here: `info` stays free of torch imports
        if not isinstance(error, DataError):
            raise
        print(f"rnntl-fast {args.command}: {error}", file=sys.stderr)  # a bad input file: one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
