"""The toy world's commands.

    python -m tinyrpo.toy subjects                     # (re)write the subject folders refs/toy and refs/ball
    python -m tinyrpo.toy pretrain --out weights/toy   # pretrain the toy VAE, CLIP, U-Net and DINO (1 h to 1 h 15 on 2 cores: docs/toy-world.md)
    python -m tinyrpo.toy probe                        # do the toy CLIP and DINO see the subject? (AUC table)
    python -m tinyrpo.toy quality                      # how often the toy SD draws the asked background/colour/class
    python -m tinyrpo.toy score runs/toy               # exact identity/fidelity/leak of a run's validations
    python -m tinyrpo.toy show --pictures 64           # a grid of pretraining pictures and their captions
    python -m tinyrpo.toy experiment all               # the paper's claims, measured (tinyrpo/toy/experiments.py)
    python -m tinyrpo.toy experiment beyond            # beyond the paper: labels, on-policy negatives, β
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning. On a machine shared with other jobs a spinning thread
# steals the core its partner needs: one U-Net step took 12.8 s with 2 spinning threads vs 1.2 s (measured
# beside one busy process on 2 cores). Read when OpenMP starts, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tinyrpo.cli import HelpFormatter, add_alias
from tinyrpo.errors import UserError, run_cli

# --help of `toy pretrain`, whose flags are PretrainConfig's fields (tinyrpo/toy/pretrain.py); a field missing
# here has no help, which tests/test_cli_vocabulary.py catches.
PRETRAIN_HELP = {
    "out": "folder the toy models are written to, in the public layouts",
    "seed": "seed of the pictures and of the initial weights",
    "threads": "torch threads of each stage but the CLIP image tower's",
    "clip_image_threads": "torch threads of the CLIP image tower's stage (the shipped tower: 1)",
    "vae_steps": "VAE training steps", "vae_batch": "VAE pictures per step", "vae_lr": "VAE learning rate",
    "vae_kl": "KL weight per latent element: keeps the latents near N(0, σ²) without blurring",
    "clip_steps": "CLIP contrastive training steps", "clip_batch": "CLIP pairs per step",
    "clip_lr": "CLIP learning rate",
    "unet_pictures": "size of the U-Net's cached training set (latents of the frozen VAE and text tower)",
    "unet_steps": "U-Net training steps", "unet_batch": "U-Net pictures per step", "unet_lr": "U-Net learning rate",
    "caption_dropout": "share of empty captions, for classifier-free guidance",
    "min_snr": "U-Net loss weight min(SNR, γ) / SNR (Hang et al. 2023); 0: plain ε-MSE",
    "ema": "EMA decay of the U-Net's weights",
    "clip_image_steps": "CLIP image tower's steps of identity training (stage 4, tinyrpo/toy/towers.py)",
    "clip_image_lr": "learning rate of CLIP's image-tower stage",
    "clip_image_instance": "weight of the instance InfoNCE in CLIP's image-tower stage",
    "clip_image_near": "share of CLIP's hard-negative groups whose layouts are one cell apart",
    "clip_image_caption": "weight of the caption InfoNCE in CLIP's image-tower stage",
    "clip_image_bw": "share of black-and-white views in CLIP's image-tower stage",
    "dino_steps": "DINO training steps (stage 5)", "dino_lr": "DINO learning rate",
    "dino_instance": "weight of DINO's instance loss",
    "clip_image_seed": "seed of the picture stream of CLIP's image-tower stage",
    "dino_seed": "seed of DINO's picture stream",
    "tower_groups": "hard-negative groups per batch of the image towers",
    "tower_k": "instances per group, differing only in layout",
    "tower_temperature": "temperature of the towers' InfoNCE",
    "tower_supervised_steps": "the towers' first phase: steps on cell and patch labels only",
    "tower_big_steps": "the first of those steps with objects of 20-28 px",
    "probe_pictures": "pictures per set of the probe run on the exported towers",
    "check_pictures": "pictures the VAE's latent std is measured on (each stage's check uses a quarter)",
    "check_prompts": "prompts of the U-Net's quick quality check",
    "check_every": "U-Net steps between quick checks (0: only at the end)",
    "guidance": "classifier-free guidance of the checks",
}


def cmd_subjects(args):
    from tinyrpo.toy.subjects import SUBJECTS, write_subject
    for name in SUBJECTS:
        print(write_subject(Path(args.out) / name, name))


def cmd_pretrain(args, argv):
    from tinyrpo.toy.pretrain import PretrainConfig, pretrain
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    cfg.check()
    pretrain(cfg, argv)


def cmd_quality(args):
    import torch

    from tinyrpo.toy.quality import quality_prompts, run_quality, write_quality
    from tinyrpo.formats.weights import load_sd
    torch.set_num_threads(args.threads)
    sd = load_sd(args.weights)
    prompts = quality_prompts(args.per_triple)
    result = run_quality(sd, prompts, guidance=args.guidance, steps=args.sample_steps, seed=args.seed)
    settings = {"weights": args.weights, "guidance": args.guidance, "steps": args.sample_steps, "seed": args.seed,
                "prompts": len(prompts)}
    print(f"{len(prompts)} held-out prompts, guidance {args.guidance}, {args.sample_steps} DDIM steps: background "
          f"{result['background']:.1%}, object colour {result['colour']:.1%}, object class {result['class']:.1%}")
    out = Path(args.out or Path(args.weights).parent / "quality.json")
    write_quality(out, result, settings)
    print(f"wrote {out}")


def cmd_probe(args):
    import torch

    from tinyrpo.toy.probe import main_text, run_probe
    torch.set_num_threads(args.threads)
    for kind in ("clip", "dino"):
        if not (Path(args.weights) / kind).exists():
            raise UserError(f"no toy {kind.upper()} at {Path(args.weights) / kind}; run `python -m tinyrpo.toy "
                            "pretrain` first, or name the folder holding clip/ and dino/ with --weights")
    if args.pictures < 2:
        raise UserError(f"--pictures must be at least 2 (got {args.pictures})")
    # The full probe (200 a set) is the one shipped beside the weights and quoted in docs/toy-world.md; a
    # smaller one goes beside it under its own name, so a quick look never overwrites the shipped record.
    name = "probe.json" if args.pictures == 200 else f"probe-{args.pictures}.json"
    out = Path(args.out) if args.out else Path(args.weights) / name
    print(main_text(run_probe(args.weights, args.pictures, out)))
    print(f"wrote {out}")


def cmd_score(args):
    from tinyrpo.toy.runs import score_run, score_table
    for run in args.runs:
        rows = score_run(run)
        print(f"{run}:\n{score_table(rows)}\n")
        (Path(run) / "exact.json").write_text(json.dumps(rows, indent=2) + "\n")


def cmd_show(args):
    import numpy as np
    from PIL import Image

    from tinyrpo.toy.pretrain import rules
    from tinyrpo.toy.world import dataset
    images, captions, _ = dataset(args.seed, args.pictures, rules())
    cols = int(np.ceil(np.sqrt(args.pictures)))
    grid = np.zeros((cols * 32, cols * 32, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * 32:(i // cols + 1) * 32, (i % cols) * 32:(i % cols + 1) * 32] = im
    Image.fromarray(grid).resize((cols * 96, cols * 96), Image.NEAREST).save(args.out)
    for i, c in enumerate(captions):
        print(f"{i:3d} {c}")
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from tinyrpo.toy.pretrain import PretrainConfig
    p = argparse.ArgumentParser(prog="python -m tinyrpo.toy", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help):  # every subcommand on the one help formatter
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    s = command("subjects", "write the toy subject folders (reference PNGs + subject.json)")
    s.add_argument("--out", default="refs", help="parent folder of the subject folders")

    s = command("pretrain", "pretrain the toy models and write them in the public layouts")
    for f in dataclasses.fields(PretrainConfig):
        s.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=PRETRAIN_HELP.get(f.name))

    s = command("probe", "ROC AUCs: do the toy CLIP-I and DINO tell the subject from another layout? "
                         "(tinyrpo/toy/probe.py)")
    s.add_argument("--weights", default="weights/toy", help="the folder holding clip/ and dino/")
    s.add_argument("--pictures", type=int, default=200, help="pictures per set (subject / impostor, each row)")
    s.add_argument("--threads", type=int, default=2, help="torch threads")
    s.add_argument("--out", default=None, help="where to write the JSON (default: WEIGHTS/probe.json at 200 pictures, else "
                   "WEIGHTS/probe-N.json)")

    s = command("quality", "score the toy SD on the held-out prompts")
    s.add_argument("--weights", default="weights/toy/sd", help="the toy SD folder")
    s.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    s.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0, help="prompt p uses seed + p")
    # Not --images-per-prompt: each prompt draws one image; this is how often each triple's prompt is repeated.
    s.add_argument("--per-triple", type=int, default=8,
                   help="prompts per held-out (class, colour, background), one image each")
    s.add_argument("--threads", type=int, default=2, help="torch threads")
    s.add_argument("--out", default=None, help="where to write the JSON (default: next to the weights)")
    add_alias(s, "--steps", "--sample-steps")

    s = command("experiment", "train RPO variants on both toy subjects and write the paper's tables")
    s.add_argument("name", choices=["overfit", "table2", "lambda", "choices", "all", "default", "beyond"],
                   help="which experiment (default: the default run at --seeds, evaluated against the base model; "
                        "beyond: label temperature, hard labels, on-policy negatives and β against pure L_sim and "
                        "DreamBooth)")
    s.add_argument("--out", default="runs/toy-experiments", help="parent folder of the runs and the tables")
    s.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    s.add_argument("--subjects", default="refs/toy,refs/ball", help="comma-separated toy subject folders")
    s.add_argument("--lambda-val", type=float, default=0.3, help="λ of the early-stopping reward")
    s.add_argument("train_args", nargs="*", help="after --: more train.py arguments for every run")

    s = command("score", "exact metrics of a toy run's validation grids (writes RUN/exact.json)")
    s.add_argument("runs", nargs="+", help="run folders of train.py on a toy subject")

    s = command("show", "a grid of pretraining pictures, captions printed")
    s.add_argument("--pictures", type=int, default=64, help="how many pictures")
    s.add_argument("--seed", type=int, default=0, help="seed of the pictures")
    s.add_argument("--out", default="toy_world.png", help="the PNG to write")
    add_alias(s, "--n", "--pictures")
    return p


def parse_args(argv):
    # What follows `--` is train.py's, split off first: argparse fills the positional `train_args` right after
    # `name`, so `experiment beyond --seeds 0 -- --steps 40` would otherwise be refused.
    argv = list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:len(argv) - len(rest) - (1 if "--" in argv else 0)])
    if rest:
        if args.command != "experiment":
            raise UserError(f"`python -m tinyrpo.toy {args.command}` takes no train.py arguments after --")
        args.train_args = list(args.train_args) + rest
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "subjects":
        cmd_subjects(args)
    elif args.command == "pretrain":
        cmd_pretrain(args, argv[1:])
    elif args.command == "quality":
        if not Path(args.weights).exists():
            raise UserError(f"no toy weights at {args.weights}; run `python -m tinyrpo.toy pretrain` first")
        cmd_quality(args)
    elif args.command == "experiment":
        from tinyrpo.toy.experiments import run_experiment
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers (got {args.seeds!r})") from None
        run_experiment(args.name, args.out, seeds, args.subjects.split(","), args.lambda_val, args.train_args)
    elif args.command == "score":
        cmd_score(args)
    elif args.command == "probe":
        cmd_probe(args)
    else:
        cmd_show(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
