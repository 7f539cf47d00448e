"""Fetch the public weights (and the DreamBench images) tinyrpo needs, over plain HTTPS.

    python -m tinyrpo.download                 # SD v1.5, CLIP ViT-L/14 and ViT-B/32, DINO ViT-S/16 into weights/
    python -m tinyrpo.download sd15 --fp16     # only Stable Diffusion, the half-size fp16 files
    python -m tinyrpo.download dreambench      # the 30 DreamBooth subjects into refs/
    python -m tinyrpo.download all --dir /data/weights

Files come from the Hugging Face hub as `{base}/{repo}/resolve/{revision}/{file}` (the same URLs a browser
downloads), so no hub library is needed. Every file is pinned to a commit and checked against its sha256
(tinyrpo/formats/fetch.py: resume with Range + If-Range, verification, redirects). $HF_TOKEN is sent to the hub
when set (gated or private mirrors, higher rate limits); $HF_ENDPOINT (or --base-url) points at a mirror.
weights/README.md lists the same files for doing it by hand.
"""
import argparse
import sys

from tinyrpo.cli import HelpFormatter
from tinyrpo.errors import run_cli
from tinyrpo.formats.hub import CHOICES, DREAMBENCH_SIZE, DREAMBENCH_ZIP, GITHUB_URL, HF_URL, MODELS, download
from tinyrpo.runs.paths import DEFAULT_DIR, DEFAULT_REFS  # where the other commands look by default


def build_parser() -> argparse.ArgumentParser:
    sizes = "\n".join(f"  {k:<10} {desc}: {size}, from huggingface.co/{repo}"
                      for k, (repo, _, desc, size) in MODELS.items())
    p = argparse.ArgumentParser(
        prog="python -m tinyrpo.download",
        description="Download the public weights tinyrpo uses (and, on request, the DreamBench images).\n"
                    "Interrupted downloads resume; files already present are skipped.",
        epilog=f"downloads:\n{sizes}\n  {'dreambench':<10} DreamBench subjects and prompts: {DREAMBENCH_SIZE}\n"
               f"  {'all':<10} all of the above\n\n"
               "Every file is pinned to a commit and checked against its sha256; a file that does not match is\n"
               "deleted. Environment: HF_TOKEN (a Hugging Face access token, sent to the hub only: gated or\n"
               "private mirrors, higher rate limits), HF_ENDPOINT (a mirror of the hub, as --base-url).\n\n"
               "SD v1.5 is under the CreativeML OpenRAIL-M license; weights/README.md lists the licenses\n"
               "and how to fetch the files by hand.",
        formatter_class=HelpFormatter)
    # No choices= here: argparse rejects the empty default of nargs="*" against them; checked below.
    p.add_argument("what", nargs="*", metavar="WHAT",
                   help=f"what to fetch: {', '.join(CHOICES)} (default: the four models, not dreambench)")
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help="folder for the weights; each model goes in a subfolder (default: %(default)s)")
    p.add_argument("--refs", default=DEFAULT_REFS,
                   help="folder for the DreamBench images and prompts (default: %(default)s)")
    p.add_argument("--fp16", action="store_true",
                   help="SD v1.5: fetch the half-precision .fp16.safetensors files (half the download)")
    p.add_argument("--base-url", default=HF_URL,
                   help="Hugging Face hub or a mirror of it; files are BASE/REPO/resolve/REV/FILE "
                        "(default: %(default)s, or $HF_ENDPOINT)")
    p.add_argument("--github-url", default=GITHUB_URL,
                   help=f"GitHub or a mirror, for dreambench: BASE/{DREAMBENCH_ZIP} (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3,
                   help="how many times to retry a file after a network failure (default: %(default)s)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for w in args.what:
        if w not in CHOICES:
            p.error(f"unknown WHAT {w!r}: choose from {', '.join(CHOICES)}")
    try:
        download(args.what, args.dir, args.base_url, args.fp16, refs=args.refs, github_url=args.github_url,
                 retries=max(0, args.retries))
    except KeyboardInterrupt:  # run_cli's message is about training checkpoints; this one is about .part files
        print("interrupted: run the same command again to resume the unfinished file", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
