"""DreamBench evaluation (Ruiz et al. 2023, DreamBooth sec. 4.1): DINO, CLIP-I, CLIP-T and RPO's λ-Harmonic.

    python -m tinyrpo.evaluate --ckpt runs/dog/best.safetensors --subject refs/dog   # fine-tuned by train.py
    python -m tinyrpo.evaluate --subject refs/dog                             # the base model
    python -m tinyrpo.evaluate --real --subject refs/dog                      # the reference photos themselves
    python -m tinyrpo.compare --dreambench refs --methods rpo --seeds 0 -- --steps 400   # every subject, trained

What each metric is, how a prompt's images are drawn and scored, and what is written into --out (eval.json,
eval.md, grids/): tinyrpo/evaluation/scores.py (`python -m pydoc tinyrpo.evaluation.scores`).

Training and evaluating every DreamBench subject is the comparison runner's job, `python -m tinyrpo.compare
--dreambench ROOT` (it builds on this module). `--dreambench ROOT` given here, the older spelling, prints that
command with the same options (--method and --seed after `--` become --methods and --seeds) and stops.
"""
import argparse
import os
import shlex
import sys
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning (see tinyrpo/toy/__main__.py). It takes effect when this
# module is the program (python -m tinyrpo.evaluate), as OpenMP reads it when torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tinyrpo.cli import HelpFormatter, add_alias
from tinyrpo.errors import UserError, run_cli
from tinyrpo.evaluation.scores import EvalSettings, eval_markdown, evaluate_subject
from tinyrpo.pipeline import PRECISIONS
from tinyrpo.runs.paths import DEFAULT_DINO, DEFAULT_EVAL_CLIP, DEFAULT_SD


def add_eval_arguments(p: argparse.ArgumentParser, seed_help: str | None = None) -> None:
    """The evaluation's options, shared with tinyrpo.compare."""
    a = p.add_argument
    a("--weights", default=None, help=f"base SD v1 weights (default: the checkpoint's base, else {DEFAULT_SD})")
    a("--eval-clip", default=None, help="CLIP model (HF layout) for CLIP-I, CLIP-T and h_λ (default: the one the "
                                        f"subject's subject.json names, else {DEFAULT_EVAL_CLIP})")
    a("--dino", default=None, help="DINO ViT-S/16, HF or original layout (default: the one the subject's "
                                   f"subject.json names, else {DEFAULT_DINO})")
    a("--token", default=None, help="the subject's identifier (default: the checkpoint's, else sks)")
    a("--images-per-prompt", type=int, default=4, help="images generated per prompt (default: %(default)s)")
    a("--seed", type=int, default=0, help=seed_help or "prompt p uses seed + p (default: %(default)s)")
    a("--sample-steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    a("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    a("--resolution", type=int, default=None, help="image size in pixels (default: the checkpoint's, else 512)")
    a("--lambda-val", type=float, default=0.5, help="λ of the λ-Harmonic score (default: %(default)s)")
    a("--gen-batch-size", type=int, default=None, help="images per U-Net pass (default: at most 8)")
    a("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    a("--precision", default="auto", choices=PRECISIONS,
      help="SD's dtype; auto is fp16 on CUDA, else fp32 (CLIP and DINO always run in fp32)")
    a("--threads", type=int, default=None,
      help="CPU threads for torch (default: the subject.json's train_defaults threads, 1 for the toy world, "
           "else torch's, one per core)")
    a("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    for old, new in (("--steps", "--sample-steps"), ("--dtype", "--precision"), ("--batch-size", "--gen-batch-size")):
        add_alias(p, old, new)  # the spellings before one vocabulary (cli.py)


def settings_from(args) -> EvalSettings:
    """EvalSettings from parsed add_eval_arguments options; args.device_given keeps whether --device was given."""
    args.device_given, args.device = args.device, args.device or "auto"
    return EvalSettings(images_per_prompt=args.images_per_prompt, seed=args.seed, sample_steps=args.sample_steps,
                        guidance=args.guidance, resolution=args.resolution, lambda_val=args.lambda_val,
                        gen_batch_size=args.gen_batch_size, device=args.device, precision=args.precision,
                        threads=args.threads,
                        progress=args.progress)


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    p = argparse.ArgumentParser(
        prog="python -m tinyrpo.evaluate", description=__doc__.split("\n\n")[0],
        epilog=f"examples:\n{examples}\n\n"
               "The metrics and outputs are described in `python -m pydoc tinyrpo.evaluation.scores`.",
        formatter_class=HelpFormatter)
    a = p.add_argument
    a("--ckpt", default=None, help="the best.safetensors (a fine-tuned U-Net or a LoRA) written by train.py "
                                 "(omit it to evaluate the base model)")
    a("--subject", default=None, help="folder of the subject's reference photos, e.g. refs/dog")
    a("--real", action="store_true", help="score the reference photos against each other (no model)")
    a("--dreambench", default=None, metavar="ROOT",
      help="every DreamBench subject in ROOT, trained and evaluated, is python -m tinyrpo.compare --dreambench "
           "ROOT: given here, prints that command with these options (train.py's after --)")
    a("--subjects", default=None, help="with --dreambench: only these subjects, comma-separated (e.g. dog,cat2)")
    a("--out", default=None, help="output folder (default: <ckpt folder>/eval, runs/base-<subject>/eval or "
                                  "runs/real-<subject>/eval)")
    a("--class-noun", default=None, help="the subject's class (default: the checkpoint's, or DreamBench's table)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--live", dest="live", action="store_true", default=None,
                   help="use the 25 live-subject prompts (default for dogs and cats)")
    g.add_argument("--object", dest="live", action="store_false", help="use the 25 object prompts")
    add_eval_arguments(p)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def dreambench_command(own: list[str], train_args: list[str]) -> list[str]:
    """`evaluate --dreambench ROOT [options] -- [train.py args]` as tinyrpo.compare's arguments: the --method
    and --seed given to train.py become the comparison's one method and one seed (rpo and 0 by default),
    and the outputs go to runs/dreambench unless --out says otherwise."""
    picked, rest, i = {"--method": "rpo", "--seed": "0"}, [], 0
    while i < len(train_args):
        a = train_args[i]
        name = a.split("=")[0]
        if name in picked:
            picked[name] = a.split("=", 1)[1] if "=" in a else (train_args[i + 1] if i + 1 < len(train_args) else "")
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    out = [] if any(a == "--out" or a.startswith("--out=") for a in own) else ["--out", "runs/dreambench"]
    return [*own, *out, "--methods", picked["--method"], "--seeds", picked["--seed"], "--", *rest]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` belongs to train.py (--dreambench's, through tinyrpo.compare).
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = parse_args(own)
    settings = settings_from(args)
    if args.dreambench:
        for flag, value in (("--subject", args.subject), ("--ckpt", args.ckpt), ("--class-noun", args.class_noun),
                            ("--real", args.real or None), ("--live/--object", args.live)):
            if value is not None:
                raise UserError(f"{flag} evaluates one subject; --dreambench takes each subject of ROOT "
                                f"(choose them with --subjects)")
        # Training every subject is tinyrpo.compare's job, and compare builds on this module: calling it from
        # here made the two import each other. The older spelling names the exact command instead.
        raise UserError(f"training and evaluating every subject is tinyrpo.compare's job; run "
                        f"`python -m tinyrpo.compare {shlex.join(dreambench_command(own, train_args))}`")
    if train_args:
        raise UserError(f"arguments after `--` ({shlex.join(train_args)}) are for train.py and only "
                        f"used by python -m tinyrpo.compare --dreambench")
    if args.subjects:
        raise UserError("--subjects selects DreamBench subjects; use it with python -m tinyrpo.compare --dreambench ROOT")
    if args.subject is None:
        raise UserError("pass --subject DIR (the reference photos, e.g. refs/dog); for every DreamBench subject, "
                        "python -m tinyrpo.compare --dreambench ROOT")
    if args.real and args.ckpt:
        raise UserError("--real scores the reference photos, not a model; drop --ckpt")
    result = evaluate_subject(args.subject, out=args.out, ckpt=args.ckpt, weights=args.weights,
                              eval_clip=args.eval_clip, dino=args.dino, token=args.token,
                              class_noun=args.class_noun, live=args.live, real=args.real, settings=settings)
    print(eval_markdown(result))
    where = Path(result["out"])
    print(f"wrote {where / 'eval.json'}, {where / 'eval.md'}" + ("" if args.real else f" and {where / 'grids'}/"))
    return 0


if __name__ == "__main__":
    run_cli(main)
