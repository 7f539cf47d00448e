"""What a training method is, to the shared loop in tinyrpo/trainer.py.

A method is a class with these methods, and nothing else is asked of it:

    load()           (optional) networks it needs beyond the shared ones (the DINO reward of tinyrpo/dpg.py),
                     loaded with the shared models, before anything is written to the run folder
    prepare()        the data it needs, made once and cached in the run folder (RPO: the negative set and
                     its rewards; DreamBooth: the class images), reused on --resume
    draw(gen)        what one step samples (image indices, timesteps, noise, labels), drawn on the CPU from
                     the run's one generator, so a resumed run continues the exact same sequence
    loss(batch)      the loss of one step, from the U-Net predictions, as pure functions of its own module
    after_step(batch, out), state_dict(), load_state_dict(state)
                     (optional) a method with a state of its own (look forward's critic; RPO's count of steps
                     for --refresh-negatives) updates it after the optimizer step and saves it in last.pt, for an
                     exact --resume

What a method sees of the run is a RunContext (below), made by the trainer and handed to the method as
`self.ctx`: the shared settings, the device, the run folder, the subject and its training prompts, the base
model, the trained and the frozen U-Net as callables, the text conditioning, the reward (eq. 5) and two
contexts (autocast, the timing of a phase). Nothing else of the trainer is reachable, so a method cannot
depend on the loop's internals; its own options are `self.opt`.
A method's `defaults` (lr, steps, select, train_text_encoder) fill the shared settings not given; `lora_lr` among
them is the lr that --lora without --lr gets (DCO's authors' 5e-5; other methods tinyrpo.config.LORA_LR).
The loop, validation, checkpoints, logging, LoRA, precision and resume are the trainer's and the same for
every method. Each method lives in its own module next to its equations (tinyrpo/rpo.py,
tinyrpo/dreambooth.py, tinyrpo/dpg.py, tinyrpo/dco.py) and is listed in tinyrpo/methods.py.
"""
import contextlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from PIL import Image

from tinyrpo.data import Subject, load_rgb, to_tensor
from tinyrpo.errors import UserError
from tinyrpo.pipeline import generate, to_pil
from tinyrpo.runs.atomic import atomic_save_image, atomic_write_json


class StepOutput(NamedTuple):
    loss: torch.Tensor            # the scalar the optimizer minimizes
    terms: dict                   # name -> tensor (scalar or one value per sample), written to log.jsonl


@dataclass
class MethodOptions:
    """Base of each method's options: a dataclass whose fields are that method's flags (dashes for _)."""

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    def validate(self, need) -> None:
        """Check the values; `need(ok, message)` raises the one-line user error."""


@dataclass(frozen=True)
class RunContext:
    """What a method sees of the run (the trainer fills it once the models are loaded)."""
    cfg: object                   # the shared settings (tinyrpo.config.TrainConfig); a method's own are its opt
    device: torch.device
    out: Path                     # the run folder: a method caches what it makes once here (tinyrpo/runs/)
    subject: Subject              # the photos, token, class noun (tinyrpo/data.py)
    prompts: list                 # the training prompts, the token filled in
    sd: object                    # the base model (tinyrpo.formats.weights.StableDiffusion): VAE, tokenizer,
                                  # scheduler; its U-Net is the policy being trained
    policy_fwd: Callable          # (x_t, t, states) -> ε of the trained U-Net (with --lora: the adapters on)
    ref_fwd: Callable | None      # the same of the frozen base U-Net, for a method with uses_reference
    text_states: Callable         # prompts -> [N, 77, D] conditioning (cached while the text encoder is frozen)
    reward: Callable              # (images, prompts, λ) -> Scores: the λ-Harmonic reward of eq. 5, in fp32
    autocast: Callable            # () -> the run's autocast context (--precision)
    phase: Callable               # name -> a context adding its block's time to summary.json's "seconds"


class Method:
    """The interface; see the module docstring. Subclasses set the class attributes and override."""

    name = ""
    Options = MethodOptions
    # Defaults of shared settings that differ by method (the paper or code the method comes from):
    # lr, steps, select ("best": the validation-reward argmax, "last": the final step), train_text_encoder, and
    # lora_lr (the lr with --lora; without it, tinyrpo.config.LORA_LR).
    defaults: dict = {}
    uses_reference = False  # True when the loss needs the frozen base U-Net's predictions (RPO, DCO)
    diverged_hint = "lower --lr or use --precision fp32"  # what to try when the loss is no longer finite

    def __init__(self, ctx: RunContext, options):
        self.ctx = ctx
        self.opt = options

    def load(self) -> None:
        """Load what the method needs beyond the SD model and the reward CLIP; raise UserError if it is missing.
        Runs before the run folder is written, so a missing file changes nothing."""

    def prepare(self) -> None:
        pass

    def draw(self, gen: torch.Generator) -> dict:
        raise NotImplementedError

    def loss(self, batch: dict) -> StepOutput:
        raise NotImplementedError

    def after_step(self, batch: dict, out: StepOutput) -> None:
        """Called after the optimizer step (the look-forward method trains its critic here)."""

    def state_dict(self) -> dict:
        """Extra state to save in last.pt (e.g. a critic and its optimizer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- helpers

@torch.no_grad()
def encode_images(vae, images: list[Image.Image], device, batch_size: int = 8) -> torch.Tensor:
    """PIL images -> scaled latents, float32. The posterior mean, not a sample: deterministic, so a resumed
    run sees the same latents and every method trains on the same x_0 for a given image."""
    out = []
    dtype = next(vae.parameters()).dtype
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device, dtype)
        out.append(vae.encode_latents(x).float())
    return torch.cat(out)


def generated_images(ctx: RunContext, folder: str, prompts: list[str], n: int, seed: int, desc: str,
                     policy_step: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """n images of the base model per prompt, cached as PNGs in run/<folder>/; -> (images, prompt index).

    Prompt p uses seed + p (tinyrpo.pipeline's seeding rule), so its images do not depend on which other
    prompts are generated with it: the prompts are generated in groups that fill --gen-batch-size, each
    group saved as soon as it is done, and an interrupted generation resumes at the first missing group.
    The settings are in index.json; a cache made with other settings is regenerated.
    With `policy_step` the images are the trained policy's after that many steps (RPO's --refresh-negatives),
    not the base model's, timed as the phase "refresh".
    """
    cfg = ctx.cfg
    root = ctx.out / folder
    settings = {"prompts": prompts, "images_per_prompt": n, "seed": seed, "resolution": cfg.resolution,
                "sample_steps": cfg.sample_steps, "guidance": cfg.guidance, "base": str(cfg.weights)}
    if policy_step is not None:
        settings["policy_step"] = policy_step
    index_path = root / "index.json"
    done = {}
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("settings") == settings:
            done = {int(p): files for p, files in index["files"].items()}
    root.mkdir(parents=True, exist_ok=True)
    names = [[f"{p:03d}_{k:02d}.png" for k in range(n)] for p in range(len(prompts))]
    todo = [p for p in range(len(prompts)) if done.get(p) != names[p]
            or not all((root / f).exists() for f in names[p])]
    group = max(1, cfg.gen_batch_size // n)
    unet = None if policy_step is None else ctx.policy_fwd  # None: the base model's (sd.unet before step 1)
    for g in range(0, len(todo), group):
        ps = todo[g:g + group]
        with ctx.phase(folder if policy_step is None else "refresh"), ctx.autocast(), sampling(ctx):
            # generate() seeds its k-th prompt with seed + k: pass seed + ps[0] and consecutive prompts only
            runs = _consecutive(ps)
            for run in runs:
                images, _ = generate(ctx.sd, [prompts[p] for p in run], n=n, steps=cfg.sample_steps,
                                     guidance=cfg.guidance, seed=seed + run[0], height=cfg.resolution,
                                     width=cfg.resolution, batch_size=cfg.gen_batch_size, progress=True,
                                     unet=unet, desc=f"{desc} {min(g + len(ps), len(todo))}/{len(todo)}")
                for k, im in enumerate(to_pil(images)):
                    p = run[k // n]
                    atomic_save_image(im, root / names[p][k % n])
        for p in ps:
            done[p] = names[p]
        atomic_write_json(index_path, {"settings": settings, "files": {str(p): f for p, f in sorted(done.items())}})
    images = [load_rgb(root / f) for p in range(len(prompts)) for f in names[p]]
    return images, [p for p in range(len(prompts)) for _ in range(n)]


def read_generated(ctx: RunContext, folder: str) -> list[Image.Image]:
    """The images generated_images wrote in run/<folder>/, read back in its order, never made anew (the
    weights that made them may be gone); UserError if index.json or an image is missing."""
    root = ctx.out / folder
    try:
        files = json.loads((root / "index.json").read_text())["files"]
        names = [f for p in sorted(files, key=int) for f in files[p]]
        return [load_rgb(root / f) for f in names]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{root} is incomplete ({e.__class__.__name__}: {e})") from None


@contextlib.contextmanager
def sampling(ctx: RunContext):
    """The U-Net and the text encoder in eval mode while generating (as validation does), then as they were."""
    modules = (ctx.sd.unet, ctx.sd.text_encoder)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _consecutive(ps: list[int]) -> list[list[int]]:
    runs = []
    for p in ps:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs
