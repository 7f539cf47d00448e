"""Personalize Stable Diffusion v1 to one subject with Reward Preference Optimization (RPO).

    python train.py --subject refs/dog                         # DreamBench subject: class looked up
    python train.py --subject photos/my_mug --class-noun mug   # your own subject
    python train.py --subject refs/dog --resume                # continue an interrupted run
    python sample.py --ckpt runs/dog/best.pt --prompt "a sks dog on the beach"

The run folder (--out, default runs/<subject>) gets config.json, the negative set, log.jsonl, a grid per
validation (val/step_*.png), best.pt (the validation-reward argmax), last.pt and summary.json.
"""
import argparse

from tinyrpo.download import DEFAULT_REWARD_CLIP, DEFAULT_SD
from tinyrpo.errors import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--subject", required=True, help="folder with 3-6 photos of the subject (jpg/png/webp)")
    a("--out", default=None, help="run folder (default: runs/<subject folder name>)")
    a("--weights", default=DEFAULT_SD, help="base SD v1 model: a single .safetensors file or a diffusers folder")
    a("--reward-model", default=DEFAULT_REWARD_CLIP, help="CLIP model (HF layout) scoring the λ-Harmonic reward")
    a("--method", default="rpo", choices=["rpo"], help="training method")
    a("--token", default="sks", help="the rare word that will name your subject in prompts")
    a("--class-noun", default=None, help="the subject's class, e.g. dog (looked up for DreamBench folder names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--live", dest="live", action="store_true", default=None,
                   help="use the live-subject prompt set (default for the classes dog and cat)")
    g.add_argument("--object", dest="live", action="store_false", help="use the object prompt set")
    a("--prompts", default=None, help="file of training prompts, one per line: '[V]' = token, '{cls}' = class")
    a("--resolution", type=int, default=512, help="training and generation resolution in pixels")
    a("--images-per-prompt", type=int, default=4, help="negative-set images per training prompt")
    a("--sample-steps", type=int, default=50, help="DDIM steps for the negative set and validation")
    a("--guidance", type=float, default=7.5, help="classifier-free guidance scale for generation")
    a("--lambda-train", type=float, default=0.0, help="λ of the reward behind the preference labels (0 = text only)")
    a("--lambda-val", type=float, default=0.3, help="λ of the validation reward that picks best.pt")
    a("--beta", type=float, default=1.0, help="β of the preference loss")
    a("--lr", type=float, default=5e-6, help="AdamW learning rate (constant)")
    a("--steps", type=int, default=400, help="training steps")
    a("--batch-size", type=int, default=1, help="(reference, generated) pairs per step")
    a("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    a("--val-every", type=int, default=40, help="validate (and save last.pt) every N steps")
    a("--val-images-per-prompt", type=int, default=4, help="validation images per training prompt")
    a("--patience", type=int, default=None, help="stop after N validations without improvement (default: never)")
    a("--seed", type=int, default=0, help="seed for the negative set, validation noise and the training draws")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="autocast precision (auto: bf16 on a GPU, fp32 on the CPU); master weights stay fp32")
    a("--compile", action="store_true", help="torch.compile the U-Nets (GPU; slow first step)")
    a("--gradient-checkpointing", action="store_true", help="trade compute for memory (small GPUs)")
    a("--gen-batch-size", type=int, default=16, help="images per U-Net pass when generating")
    a("--log-every", type=int, default=10, help="write log.jsonl every N steps")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from tinyrpo.trainer import Trainer, TrainConfig, print_summary  # heavy imports after --help

    trainer = Trainer(TrainConfig(**vars(args)))
    summary = trainer.run()
    print_summary(summary, trainer.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
