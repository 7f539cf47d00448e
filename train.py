"""Personalize Stable Diffusion v1 to one subject with Reward Preference Optimization (RPO), or a baseline.

examples:
  python train.py                                             # the toy world: tiny models, minutes on a CPU
  python train.py --subject refs/dog                          # DreamBench subject: class looked up
  python train.py --subject photos/my_mug --class-noun mug    # your own subject
  python train.py --subject refs/dog --method dreambooth      # a baseline: DreamBooth, prior preservation
  python train.py --subject refs/dog --method dpg             # look forward (Wei et al.): DPG with a critic
  python train.py --subject refs/dog --method dco --lora 32   # DCO (Lee et al.): consistent with the base model
  python train.py --subject refs/dog --no-pref                # an RPO ablation: pure L_sim
  python train.py --out runs/dog --resume                     # continue an interrupted run
  python sample.py --ckpt runs/dog/best.safetensors --prompt "a sks dog on the beach"

The run folder (--out, default runs/<subject>) gets config.json, the method's cached images, log.jsonl, a
grid per validation (val/step_*.png), best.safetensors (the chosen checkpoint), last.pt, summary.json and
report.html (curves and grids; open it in a browser, rebuilt after every validation).
--resume takes every setting from the run's config.json; of the flags given with it, only --steps,
--patience, --log-every, --save-every, --gen-batch-size, --compile, --device, --threads and --log-with
may differ from the run's.
"""
import argparse
import shlex
import sys
from pathlib import Path

from tinyrpo.cli import HelpFormatter, add_alias
from tinyrpo.errors import run_cli
from tinyrpo.runs.paths import DEFAULT_REWARD_CLIP, DEFAULT_SD

# What `python train.py` trains with no --subject: the toy world's subject, whose subject.json names the toy
# models (weights/toy) and a CPU-sized preset (see tinyrpo/toy and README's quick start).
TOY_SUBJECT = "refs/toy"
from tinyrpo.methods import METHODS
from tinyrpo.pipeline import PRECISIONS


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The parser; with `suppress`, one whose result holds only the flags actually given (for --resume)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def group(title):
        g = p.add_argument_group(title)

        def a(*flags, **kw):
            if suppress:
                kw["default"] = argparse.SUPPRESS
            return g.add_argument(*flags, **kw)
        return a

    a = group("subject and models")
    a("--subject", help="folder with 3-6 photos of the subject (jpg/png/webp) (default: refs/toy, the toy world)")
    a("--out", default=None, help="run folder (default: runs/<subject folder name>)")
    a("--weights", default=DEFAULT_SD,
      help=f"base SD v1 model: a diffusers folder or a single .safetensors file (default: {DEFAULT_SD})")
    a("--reward-model", default=DEFAULT_REWARD_CLIP,
      help=f"CLIP model (HF folder) scoring the λ-Harmonic reward (default: {DEFAULT_REWARD_CLIP})")
    a("--token", default="sks", help="the rare word that will name your subject in prompts (default: sks)")
    a("--class-noun", default=None, help="the subject's class, e.g. dog (looked up for DreamBench folder names)")
    a("--live", dest="live", action="store_true", default=None,
      help="use the live-subject prompt set (the default for the classes dog and cat)")
    a("--object", dest="live", action="store_false", help="use the object prompt set (the default otherwise)")
    a("--prompts", default=None, help="file of training prompts, one per line: '[V]' = token, '{cls}' = class")

    a = group("training (defaults that depend on --method are the method's)")
    a("--method", default="rpo", choices=list(METHODS),
      help="rpo (Miao et al.), dreambooth (prior preservation, Ruiz et al.), dpg (look forward, Wei et al.) or dco "
           "(Direct Consistency Optimization, Lee et al.) (default: rpo)")
    a("--lr", type=float, default=None,
      help="AdamW learning rate, constant (default: rpo 5e-6, dreambooth 5e-6, dpg 1e-6, dco 5e-6)")
    a("--steps", type=int, default=None, help="training steps (default: rpo 400, dreambooth 800, dpg 1000, dco 2000)")
    a("--batch-size", type=int, default=1,
      help="pairs (rpo), instance images, each with a class image (dreambooth, dpg), or subject photos (dco), per "
           "step (default: 1)")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    a("--resolution", type=int, default=512, help="training and generation resolution in pixels (default: 512)")
    a("--train-text-encoder", action="store_true", default=None,
      help="fine-tune the text encoder too (default: on for dpg, off for rpo, dreambooth and dco)")
    a("--no-train-text-encoder", dest="train_text_encoder", action="store_false",
      help="keep the text encoder frozen")
    a("--lora", type=int, default=None, metavar="RANK",
      help="train LoRA adapters of this rank on the U-Net instead of every weight (default lr then 1e-4; dco "
           "5e-5, its authors' for rank 32)")
    a("--lora-alpha", type=float, default=None, help="LoRA α; the update is scaled by α/rank (default: rank)")
    a("--lora-targets", default=None,
      help="comma-separated U-Net layers to adapt (default: to_q,to_k,to_v,to_out.0 of every attention)")
    a("--seed", type=int, default=0, help="seed of the generated images and of the training draws (default: 0)")

    a = group("validation and checkpoint selection")
    a("--val-every", type=int, default=40, help="validate every N steps (default: 40)")
    a("--val-images-per-prompt", type=int, default=4, help="validation images per training prompt (default: 4)")
    a("--lambda-val", type=float, default=0.3, help="λ of the validation reward (default: 0.3, the paper's)")
    a("--mean", default="harmonic", choices=["harmonic", "arithmetic"],
      help="how the reward combines ALIGN-I and ALIGN-T (default: harmonic, eq. 5; arithmetic: Table 6)")
    a("--select", default=None, choices=["best", "last"],
      help="the checkpoint kept is the validation-reward argmax (best) or the final step (last) "
           "(default: rpo best, dreambooth last, dpg last, dco last)")
    a("--patience", type=int, default=None, help="stop after N validations without improvement (default: never)")
    a("--sample-steps", type=int, default=50, help="DDIM steps of every generated image (default: 50)")
    a("--guidance", type=float, default=7.5, help="classifier-free guidance of generated images (default: 7.5)")

    a = group("RPO (--method rpo)")
    a("--beta", type=float, default=None, help="β of the preference loss (default: 1.0)")
    a("--lambda-train", type=float, default=None, help="λ of the reward behind the labels (default: 0, text only)")
    # --images-per-prompt is what every command calls images generated per prompt; here they are the RPO
    # negative set's. --val-images-per-prompt above is another count: the validation grid's.
    a("--images-per-prompt", type=int, default=None,
      help="negative-set images generated per training prompt (default: 4)")
    a("--no-pref", dest="pref", action="store_false", default=None, help="ablation: pure L_sim, no L_pref")
    a("--no-sim", dest="sim", action="store_false", default=None, help="ablation: L_pref alone (DPO only)")
    a("--winner-prompt", default=None, choices=["reference", "pair"],
      help="score h(w) against the paired training prompt (the authors' code) or the reference prompt "
           "(default: pair)")
    a("--noise", default=None, choices=["shared", "independent"],
      help="one ε and t per pair (Diffusion-DPO) or drawn per image (the paper's eq. 4) (default: shared)")
    # Beyond the paper (issue 21); the defaults are the paper's. docs/methods.md has what they cost and do.
    a("--label-temperature", type=float, default=None, metavar="TAU",
      help="τ of the Bradley-Terry labels, p = σ((h(w) - h(l)) / τ); below 1 sharpens them (default: 1.0, eq. 6)")
    a("--labels", default=None, choices=["soft", "hard"],
      help="soft: y drawn with probability p (eq. 6); hard: y = [h(w) > h(l)], a coin flip at a tie "
           "(default: soft)")
    a("--refresh-negatives", type=int, default=None, metavar="K",
      help="remake the negative set with the policy being trained every K optimizer steps, rewards and labels "
           "recomputed (the paper's 'online' future work); 0: never (default: 0)")

    a = group("DreamBooth (--method dreambooth, dpg)")
    a("--num-class-images", type=int, default=None,
      help="images of 'a photo of a <class>' the base model makes for the prior term (default: dreambooth 200, "
           "dpg 8)")
    a("--prior-weight", type=float, default=None, help="λ of the prior-preservation term (default: 1.0)")

    a = group("look forward (--method dpg)")
    a("--dpg-reward", default=None, choices=["lookforward", "dino"],
      help="what the critic Q_φ regresses: the look-forward MSE ‖x̂_0 − x_0‖², or the DINO cost of the decoded "
           "x̂_0 (default: lookforward)")
    a("--gamma", type=float, default=None, help="discount γ: the critic's score at timestep t weighs γ^t "
                                                "(default: 0.9986)")
    a("--dpg-weight", type=float, default=None, help="λ, the weight of γ^t·Q_φ in the U-Net's loss (default: 1.0)")
    a("--critic-lr", type=float, default=None, help="SGD learning rate of the critic (default: 0.01)")
    a("--critic-clip", type=float, default=None,
      help="gradient-norm clip of the critic's SGD step; 0: unclipped, the authors' step (default: 1.0)")
    a("--dino", default=None, help="DINO ViT-S/16 for --dpg-reward dino (default: weights/dino-vits16)")

    a = group("DCO (--method dco)")
    a("--dco-beta", type=float, default=None,
      help="β of the DCO loss, on the per-element mean squared error (default: 1000.0, the authors')")

    a = group("machine and run")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    a("--threads", type=int, default=None,
      help="CPU threads for torch (default: torch's; the toy world's preset uses 1, fastest for tiny models)")
    a("--precision", default="auto", choices=PRECISIONS,
      help="autocast precision, master weights stay fp32 (default: auto = bf16 on a GPU, fp32 on the CPU)")
    a("--compile", action="store_true", default=False, help="torch.compile the U-Nets (GPU; slow first step)")
    a("--gradient-checkpointing", action="store_true", default=False, help="trade compute for memory")
    a("--gen-batch-size", type=int, default=16, help="images per U-Net pass when generating (default: 16)")
    a("--log-every", type=int, default=10, help="write log.jsonl every N steps (default: 10)")
    a("--log-with", default="none", choices=["none", "tensorboard"],
      help="also send the log and the validation grids to TensorBoard (RUN/tensorboard) (default: none)")
    a("--save-every", type=int, default=200, help="write last.pt every N steps, and at the end (default: 200)")
    a("--resume", action="store_true", default=False, help="continue the run in --out from its last.pt")

    # Old spellings, for one release (the second, suppressed parse stays quiet so the note prints once).
    add_alias(p, "--no-early-stop", "--select", value="last", note=not suppress)
    add_alias(p, "--select-best", "--select", value="best", note=not suppress)
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = set(vars(build_parser(suppress=True).parse_args(argv)))
    return args, given


def main(argv=None):
    args, given = parse_args(argv)
    from tinyrpo.config import TrainConfig  # heavy imports after --help
    from tinyrpo.trainer import Trainer

    if args.subject is None and not (args.resume and args.out):
        args.subject = TOY_SUBJECT
        print(f"no --subject: training on the toy world's subject ({TOY_SUBJECT}) with its tiny models, a few "
              f"minutes on a CPU; for Stable Diffusion v1.5: python -m tinyrpo.download, then "
              f"python train.py --subject refs/dog")
    trainer = Trainer(TrainConfig.from_args(args), given)
    summary = trainer.run()
    if summary is not None:  # None: a finished run resumed with nothing to do (it said so)
        print_summary(summary, trainer.out)
    return 0


def print_summary(summary: dict, out: Path):
    secs = summary["seconds"]
    print(f"\nbest validation reward {summary['best_reward']:.4f} at step {summary['best_step']} "
          f"(ALIGN-I {summary['best_align_i']:.4f}, ALIGN-T {summary['best_align_t']:.4f})")
    if summary["select"] == "last":
        print(f"kept the last step ({summary['chosen_step']}), as --select last asks")
    if "chosen_exact" in summary:
        e = summary["chosen_exact"]
        print("exact metrics of the kept checkpoint (validation images): "
              + ", ".join(f"{k} {e[k]:.3f}" for k in ("identity", "fidelity", "leak") if k in e))
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    ckpt = shlex.quote(str(Path(summary["best_ckpt"])))
    print(f"wrote {ckpt}; try: python sample.py --ckpt {ckpt} --prompt {shlex.quote(summary['example_prompt'])}")

if __name__ == "__main__":
    run_cli(main)
