"""report.html: one page per training run and per comparison of runs, built from their folders alone.

    python -m tinyrpo.report runs/dog           # (re)build runs/dog/report.html, finished or still running
    python -m tinyrpo.report runs/compare       # a comparison folder: the one holding compare.json

What each page shows and how it is built: tinyrpo/evaluation/pages.py.
"""
import argparse
import sys
from pathlib import Path

from tinyrpo.cli import HelpFormatter
from tinyrpo.errors import UserError, run_cli
from tinyrpo.evaluation.pages import NOT_A_RUN, write_comparison_report, write_report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tinyrpo.report", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="FOLDER",
                    help="a run folder (train.py --out) or a comparison folder (holding compare.json)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    for f in args.folders:
        if not Path(f).exists():
            raise UserError(f"{f} does not exist; {NOT_A_RUN}")
        if (Path(f) / "compare.json").exists():
            path = write_comparison_report(f)
        else:
            path = write_report(f)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
