"""What the command-line scripts share: a --help that shows each real default once, examples kept as lines, the
old spellings of renamed flags, and the checks of input paths that every command makes before it reads them.

Every command spells one idea one way (tests/test_cli_vocabulary.py walks every parser to keep it so):

    --steps              training steps (train.py; compare passes it to train.py after `--`)
    --sample-steps       denoising (DDIM/DDPM) steps of every generated image
    --images-per-prompt  images generated per prompt
    --gen-batch-size     images per U-Net pass when generating (train.py's --batch-size is the training batch)
    --precision          auto, fp32, fp16 or bf16
    --select             which checkpoint a run keeps: best or last
"""
import argparse
import os
import stat
import sys
from pathlib import Path

from tinyrpo.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the description and epilog (example commands stay one per line) and adds
    "(default: X)" to a flag's help only where X is what the program uses: not for on/off switches
    (store_true / store_false: "--no-progress (default: True)" would read as "progress is hidden"), not for
    None or "" (the help says what happens then), not where the help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default" in text or action.nargs == 0
                or action.default in (None, "", argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: it does what the new flag does (or, with `value`, what
    `NEW value` does) after one line on stderr naming the new spelling. Hidden from --help, so a reader sees one
    flag per idea."""

    def __init__(self, option_strings, dest, target: argparse.Action, value=None, note: bool = True, **kw):
        takes_value = value is None
        super().__init__(option_strings, target.dest, nargs=target.nargs if takes_value else 0,
                         const=target.const, type=target.type if takes_value else None,
                         choices=target.choices if takes_value else None, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, metavar=target.metavar)
        self.target, self.value, self.note = target, value, note
        self.new = target.option_strings[0] + ("" if takes_value else f" {value}")

    def __call__(self, parser, namespace, values, option_string=None):
        if self.note:
            print(f"note: {option_string} is now {self.new} (the old spelling goes in the next release)",
                  file=sys.stderr)
        self.target(parser, namespace, values if self.value is None else self.value, self.target.option_strings[0])


def add_alias(parser, old: str, new: str, value=None, note: bool = True) -> argparse.Action:
    """Let `old` keep working as `new` (already added to `parser`, or to one of its groups) for one release.
    With `value`, `old` takes no argument and means `new value` (--no-early-stop = --select last). note=False
    keeps it quiet, for a second parse of the same command line (train.py's --resume check)."""
    target = parser._option_string_actions[new]
    return parser.add_argument(old, action=DeprecatedAlias, target=target, value=value, note=note)


def check_input(path, flag: str) -> None:
    """Refuse a FIFO, socket or device as an input file (--weights, --ckpt, --lora, --prompts, a photo): reading
    one waits forever for a writer, with nothing on the screen. For a folder (an SD or HF model folder), the same
    for every file in it and in its subfolders, one level down: the files the loaders open. A missing path is
    left to the loader, which says what to download or pass instead."""
    path = Path(path)
    entries = [path]
    try:
        if path.is_dir():
            entries = list(path.iterdir())
            entries += [q for p in entries if p.is_dir() for q in p.iterdir()]
    except OSError:  # an unreadable folder: the loader says so
        pass
    for p in entries:
        try:
            mode = p.stat().st_mode
        except OSError:  # missing, or a dangling link: the loader says so
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            what = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            inside = "" if p == path else f" (inside {path})"
            raise UserError(f"{flag} {p}{inside} is {what}, not a regular file (reading it could wait forever); "
                            "pass a file")


def check_out_folder(out, flag: str = "--out") -> None:
    """An output folder must be a folder, or a path where one can be made, that this user can write to: checked
    before the slow work (loading, sampling), not after it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; pass a folder (it is made if needed)")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, so no folder can be made there; pass another folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only file system, even for root
        raise UserError(f"{flag} {out}: cannot write into {existing} (read-only or no permission); choose a folder "
                        "you can write to")


def fmt(v, digits: int = 3) -> str:
    """A number in a command's tables: `digits` decimals, – when there is none."""
    return "–" if v is None else f"{v:.{digits}f}"
