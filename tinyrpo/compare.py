"""Compare training methods: every (method, subject, seed) trained by train.py and scored by tinyrpo.evaluate.

    python -m tinyrpo.compare --methods rpo,dreambooth,dpg,dco --subjects refs/dog,refs/backpack --seeds 0,1,2
    python -m tinyrpo.compare --dreambench refs --methods rpo,dreambooth --seeds 0 -- --val-every 100
    torchrun --nproc-per-node 8 -m tinyrpo.compare --dreambench refs --methods rpo,dreambooth,dpg --seeds 0,1,2

Before `--`: this command's options and the evaluation's (the same as `python -m tinyrpo.evaluate`'s:
--images-per-prompt, --sample-steps and --seed are the evaluation's images, DDIM steps and noise). After `--`:
train.py's arguments, given to every cell (each method keeps its own defaults for what is not given;
--subject, --out, --method and --seed are set per cell).

How the cells are run, resumed, dealt to torchrun's ranks and tabulated: tinyrpo/evaluation/comparison.py.
"""
import argparse
import sys
from pathlib import Path

from tinyrpo import dreambench
from tinyrpo.errors import UserError, run_cli
from tinyrpo.evaluation.comparison import check_method_options, comparison_markdown, compare, distributed, plan


def find_subjects(root, wanted: str | None) -> list[Path]:
    """DreamBench's subject folders in `root` (those named in its table), or the `wanted` ones of them."""
    from tinyrpo.formats.hub import missing_weights_message
    root = Path(root)
    if not root.is_dir():
        raise UserError(missing_weights_message("dreambench", root, "--dreambench"))
    found = sorted(d for d in root.iterdir() if d.is_dir() and d.name in dreambench.SUBJECT_CLASSES)
    if not found:
        raise UserError(f"no DreamBench subject folders (dog, cat2, backpack, ...) in {root}; "
                        + missing_weights_message("dreambench", root, "--dreambench"))
    if wanted:
        names = split(wanted)
        by_name = {d.name: d for d in found}
        unknown = [w for w in names if w not in by_name]
        if unknown:
            raise UserError(f"--subjects: {', '.join(unknown)} not found in {root}; available: {', '.join(by_name)}")
        found = [by_name[w] for w in dict.fromkeys(names)]
    return found


def split(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def resolve_subjects(args) -> list[Path]:
    if args.dreambench:
        return find_subjects(args.dreambench, args.subjects)
    if not args.subjects:
        raise UserError("pass --subjects DIR[,DIR...] (folders of subject photos) or --dreambench ROOT")
    subjects = [Path(s) for s in dict.fromkeys(split(args.subjects))]
    for s in subjects:
        if not s.is_dir():
            raise UserError(f"subject folder {s} does not exist; --subjects takes folders of photos, comma-separated")
    names = [s.name for s in subjects]
    if len(set(names)) < len(names):
        raise UserError("two --subjects folders have the same name; each names its run folders, so rename one")
    return subjects


def build_parser() -> argparse.ArgumentParser:
    from tinyrpo.cli import HelpFormatter
    from tinyrpo.evaluate import add_eval_arguments
    from tinyrpo.methods import METHODS
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m tinyrpo.compare", description=doc[0],
                                epilog="examples:\n" + doc[1] + "\n\n" + doc[2], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--methods", default="rpo,dreambooth,dpg",
      help=f"methods to compare, comma-separated, of {', '.join(METHODS)} (default: %(default)s)")
    a("--subjects", default=None, help="subject photo folders, comma-separated; with --dreambench, names of ROOT's "
                                       "subjects (default there: all)")
    a("--dreambench", default=None, metavar="ROOT", help="every DreamBench subject folder in ROOT")
    a("--seeds", default="0,1,2", help="training seeds, comma-separated (default: %(default)s)")
    a("--out", default="runs/compare", help="the comparison folder (default: %(default)s)")
    add_eval_arguments(p, seed_help="evaluation noise: prompt p uses seed + p, the same in every cell (default: 0)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    from tinyrpo.evaluate import settings_from
    from tinyrpo.evaluation.scores import check_eval_weights, eval_models
    from tinyrpo.methods import METHODS

    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    for flag in ("--subject", "--out", "--method", "--seed"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            raise UserError(f"{flag} for train.py is set per cell by tinyrpo.compare; remove it after `--` "
                            f"(--methods, --seeds and --out go before `--`)")
    methods = list(dict.fromkeys(split(args.methods)))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UserError(f"--methods: {', '.join(unknown) or '(none)'} not available; choose from {', '.join(METHODS)}")
    try:
        seeds = list(dict.fromkeys(int(s) for s in split(args.seeds)))
    except ValueError:
        raise UserError(f"--seeds takes integers, comma-separated (got {args.seeds!r})") from None
    if not seeds:
        raise UserError("--seeds is empty; give at least one, e.g. --seeds 0")
    check_method_options(train_args, methods)
    subjects = resolve_subjects(args)
    settings = settings_from(args)
    settings.validate()
    for subject in subjects:  # before hours of training, not after
        check_eval_weights(*eval_models(subject, args.eval_clip, args.dino))
    out = Path(args.out)
    cells = plan(methods, subjects, seeds)

    rank, world, local_rank = distributed()
    try:
        data = compare(cells, out, train_args, args, settings, rank, world, local_rank)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    if data is not None:
        print("\n" + comparison_markdown(data))
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
