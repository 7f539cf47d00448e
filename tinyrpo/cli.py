"""What the command-line scripts share: a --help that shows each real default once, examples kept as lines, and
the checks of input paths that every command makes before it reads them."""
import argparse
import os
import stat
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
