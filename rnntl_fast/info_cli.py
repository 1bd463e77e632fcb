"""`rnntl-fast info`."""
import json

from .info import backend_report, format_report


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    report = backend_report()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0
