"""What every `rnntl-fast` command shares for its arguments and its errors.

Argument types (for argparse's `type=`): each turns the text into a value or raises
argparse.ArgumentTypeError, which argparse reports as "argument --flag: <message>" with
exit code 2, before anything runs:

    positive_int, non_negative_int, int_range(lo, hi)    integers in a range
    positive_float, non_negative_float, float_range(...)  finite floats in a range
    probability                                           a float in [0, 1)
    seed                                                  an integer in [0, 2**32)
    device                                                cpu or cuda[:N], available here
    existing_file                                         a readable file (not a directory)
    output_directory                                      a writable directory, or a path one can be made at
    output_file                                           a file that can be (over)written

A run reports a user's mistake found later (a bad row in a data file, a damaged
pretrained file) by raising CommandLineError, or `file_errors(flag, path)` turns the
readers' errors into one; `rnntl_fast.cli.main` prints it as one line and exits with 2.
"""
import argparse
import contextlib
import csv
import math
import os
import tempfile
from typing import Callable, Optional, Tuple, Type


class CommandLineError(Exception):
    """A user's mistake in the arguments or the files they name; the message says which
    flag or file and what is wrong, in one line."""


# -- numbers ---------------------------------------------------------------------------------
def _bounds_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def int_range(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An integer type accepting low <= value (<= high)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds_text(low, high)}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds_text(low, high)}, got {value}")
        return value
    parse.__name__ = f"integer {_bounds_text(low, high)}"
    return parse


def float_range(low: float, high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A finite float type in [low, high] (an end is excluded when *_open is set)."""
    bounds = _bounds_text(low, high, low_open, high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        inside = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (high is None or (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value
    parse.__name__ = f"number {bounds}"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, 2**32 - 1)
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)
probability = float_range(0.0, 1.0, high_open=True)


# -- devices ---------------------------------------------------------------------------------
def device(text: str) -> str:
    """cpu, cuda or cuda:N; CUDA only where torch sees a GPU (index in range)."""
    import torch
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu or cuda[:N])") from None
    if chosen.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"only cpu and cuda are supported, got {text!r}")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} was asked for but CUDA is not available here "
                                             f"(torch {torch.__version__})")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(chosen)


# -- paths -----------------------------------------------------------------------------------
def existing_file(text: str) -> str:
    """A path to a readable regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable (permission denied)")
    return text


def _cannot_write_in(folder: str) -> Optional[str]:
    """Why no file can be created in `folder` (None: one can). Tried rather than asked of
    os.access, which says yes to root even on read-only or virtual file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or str(error)


def output_directory(text: str) -> str:
    """An existing directory one can write in, or a path where one can be created (its
    closest existing parent is such a directory)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    folder = os.path.abspath(text)
    while not os.path.exists(folder):   # os.makedirs creates the missing levels
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a directory")
    reason = _cannot_write_in(folder)
    if reason:
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder} ({reason})")
    return text


def output_file(text: str) -> str:
    """A file to (over)write: not a directory, and opening it for writing works (checked
    before a long run, not after it; a file this creates for the check is removed)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, not a file")
    existed = os.path.exists(text)
    try:
        with open(text, "a"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text}: cannot write it ({error.strerror or error})") from None
    if not existed:
        os.remove(text)
    return text


# -- errors found while running --------------------------------------------------------------
def _first_undecodable_line(path: str, encoding: str = "utf-8") -> Optional[int]:
    """The number of the first line of `path` that is not valid `encoding` (None: all are)."""
    import bz2
    opener = bz2.open if path.endswith(".bz2") else open
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode(encoding)
                except UnicodeDecodeError:
                    return number
    except OSError:
        return None
    return None


@contextlib.contextmanager
def file_errors(flag: str, path: str, unreadable: Tuple[Type[BaseException], ...] = ()):
    """Turns what reading the file given to `flag` raises for a bad file into a
    CommandLineError naming the flag and the file, e.g. "--train-csv data.csv: line 3:
    unknown label 'meh'": the readers' format errors, OS errors, text that is not UTF-8,
    a malformed CSV, and `unreadable`: what this reader raises for a file it cannot parse
    (e.g. torch.load's RuntimeError for a truncated checkpoint)."""
    from .pretrained import PretrainedFormatError, UnsupportedLayerError
    from .transfer.data import DataError
    try:
        yield
    except UnicodeDecodeError as error:
        line = _first_undecodable_line(path, error.encoding)
        where = f"line {line}: " if line else ""
        raise CommandLineError(f"{flag} {path}: {where}not {error.encoding} text ({error.reason}); "
                               f"save it as {error.encoding}") from error
    except (DataError, PretrainedFormatError, UnsupportedLayerError) + unreadable as error:
        message = str(error) or type(error).__name__
        raise CommandLineError(f"{flag} {message if message.startswith(path) else f'{path}: {message}'}") from error
    except csv.Error as error:
        raise CommandLineError(f"{flag} {path}: not a readable CSV file ({error})") from error
    except OSError as error:
        raise CommandLineError(f"{flag} {error.filename or path}: {error.strerror or error}") from error
