"""What the command-line scripts share: a --help that shows each real default once, examples kept as lines."""
import argparse


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
