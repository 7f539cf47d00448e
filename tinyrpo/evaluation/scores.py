"""DreamBench evaluation (Ruiz et al. 2023, DreamBooth sec. 4.1) of one subject: DINO, CLIP-I, CLIP-T and RPO's
λ-Harmonic. `python -m tinyrpo.evaluate` (tinyrpo/evaluate.py) is the command.

For each of the 25 official prompts of the subject's set (live for dogs and cats, object otherwise) the model
draws --images-per-prompt images (DDIM, seed + p for prompt p, as sample.py), and each image is scored:

    DINO    cosine of DINO ViT-S/16 class-token embeddings, averaged over all (reference, generated) pairs
    CLIP-I  the same with CLIP image embeddings (ViT-B/32 by default, as DreamBooth)
    CLIP-T  cosine of the CLIP embeddings of the image and of its prompt with the subject token removed
            ("a sks dog on the beach" is scored as "a dog on the beach": CLIP has never seen "sks")
    h_λ     RPO's λ-Harmonic reward (eq. 5) at --lambda-val, with the evaluation CLIP:
            ALIGN-I = (cos + 1) / 2 averaged over references, ALIGN-T = (cos + 1) / 2

A prompt's score is the mean over its images, the overall score the mean over all images (= over prompts).
The reference photos are scored against each other too (each pair once per direction, never an image with
itself): the "real images" row. Its CLIP-T is the photos against "a photo of a {class}" (not in the paper).
Reference photos are loaded as train.py loads them (EXIF-rotated, RGB, center-cropped to --resolution).

Writes into --out (default <ckpt folder>/eval, or runs/base-<subject>/eval, runs/real-<subject>/eval):
eval.json (per prompt and overall, with the settings and the model paths; written last, so it marks a
finished evaluation), eval.md (the table printed at the end) and grids/pNN-<prompt>.png.

Training and evaluating every DreamBench subject is the comparison runner's job (tinyrpo/evaluation/comparison.py),
which builds on this module.
"""
import gc
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyrpo import dreambench
from tinyrpo.cli import check_input, check_out_folder, fmt
from tinyrpo.data import load_subject, read_subject_file, resolve_class
from tinyrpo.dino import DINO, dino_preprocess
from tinyrpo.errors import UserError
from tinyrpo.formats.checkpoint import apply_checkpoint, load_checkpoint
from tinyrpo.formats.hub import missing_weights_message
from tinyrpo.formats.identify import checkpoint_mixup, wrong_kind
from tinyrpo.formats.weights import load_clip, load_dino, load_sd
from tinyrpo.pipeline import (PRECISIONS, check_seed, generate, image_grid, resolve_device, resolve_precision, slug,
                              to_pil)
from tinyrpo.reward import CLIPScorer
from tinyrpo.rpo import harmonic_reward
from tinyrpo.runs.atomic import atomic_save_image, atomic_write_json, atomic_write_text, write_error
from tinyrpo.runs.paths import DEFAULT_DINO, DEFAULT_EVAL_CLIP, DEFAULT_SD

METRICS = ("dino", "clip_i", "clip_t", "align_i", "align_t", "harmonic")
REFERENCE_TEXT = "a photo of a {}"  # CLIP-T of the real images (CLIP's own zero-shot template)

REWARD_MODEL_NOTE = ("note: evaluated with the training reward model; CLIP-I/CLIP-T are then not independent "
                     "of what was optimized")


# ------------------------------------------------------------------------------------------------- metrics

@dataclass
class Embeddings:
    dino: torch.Tensor  # [N, 384] DINO class tokens (float32, unnormalized)
    clip: torch.Tensor  # [N, P] CLIP image embeddings (float32, L2-normalized)


def pair_cosine(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """For each row of `a`, its mean cosine similarity with every row of `b`: [N].

    a: [N, D] generated-image embeddings, b: [R, D] reference embeddings (any norm). The mean over rows of
    the result is the mean over all N·R pairs: DreamBooth's DINO and CLIP-I. With `exclude_self`, a and b
    are the same R images and image i is compared with the R − 1 others (the "real images" row).
    """
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (N, R)
    if not exclude_self:
        return sim.mean(dim=1)
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"exclude_self needs the same >= 2 images on both sides, got {tuple(sim.shape)}")
    return sim.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), 0.0).sum(dim=1) / (n - 1)


def text_cosine(image_embs: torch.Tensor, text_embs: torch.Tensor) -> torch.Tensor:
    """CLIP-T: cosine of image i with text i, [N] (row i of text_embs is image i's prompt)."""
    return (F.normalize(image_embs.float(), dim=-1) * F.normalize(text_embs.float(), dim=-1)).sum(dim=-1)


def scoring_prompt(prompt: str, token: str) -> str:
    """The text CLIP-T scores: the prompt without the subject token, class noun kept."""
    return dreambench.remove_token(prompt, token)


def harmonic_scores(clip_i: torch.Tensor, clip_t: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """ALIGN-I, ALIGN-T and h_λ (eq. 5) from the cosines, as training scores them (tinyrpo.rpo).

    ALIGN-I = mean over references of (cos + 1) / 2 = (CLIP-I + 1) / 2, which is rpo.align_i
    (the mean of an affine map is the map of the mean); ALIGN-T = (CLIP-T + 1) / 2 = rpo.align_t.
    """
    a_i, a_t = (clip_i + 1) / 2, (clip_t + 1) / 2
    return {"align_i": a_i, "align_t": a_t, "harmonic": harmonic_reward(a_i, a_t, lam)}


def image_scores(gen: Embeddings, refs: Embeddings, text_embs: torch.Tensor, lam: float,
                 exclude_self: bool = False) -> dict[str, torch.Tensor]:
    """Every metric for each image: {name: [N]} (see METRICS)."""
    scores = {"dino": pair_cosine(gen.dino, refs.dino, exclude_self),
              "clip_i": pair_cosine(gen.clip, refs.clip, exclude_self),
              "clip_t": text_cosine(gen.clip, text_embs)}
    return scores | harmonic_scores(scores["clip_i"], scores["clip_t"], lam)


def mean_scores(scores: dict[str, torch.Tensor], index=slice(None)) -> dict[str, float | None]:
    # An exact toy metric is NaN where a prompt does not ask what it checks: left out of the mean, and a mean
    # over nothing is None (JSON has no NaN).
    return {k: none_if_nan(torch.nanmean(v[index].double()).item()) for k, v in scores.items()}


def none_if_nan(x: float) -> float | None:
    return None if x != x else x


# ------------------------------------------------------------------------------------------------- models

class Embedder:
    """The two evaluation networks, inference only, in float32 (the metrics are small differences)."""

    def __init__(self, clip, dino: DINO, batch_size: int = 32):
        self.clip = CLIPScorer(clip, batch_size=batch_size)
        self.dino = dino.eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.inference_mode()
    def dino_embed(self, images) -> torch.Tensor:
        p = next(self.dino.parameters())
        x = dino_preprocess(images, self.dino.config.image_size).to(p.device, p.dtype)
        return self.dino(x).float()

    def images(self, images, desc: str = "scoring", progress: bool = True) -> Embeddings:
        dino, clip = [], []
        for i in tqdm(range(0, len(images), self.batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress):
            chunk = images[i:i + self.batch_size]
            dino.append(self.dino_embed(chunk))
            clip.append(self.clip.embed_images(chunk))
        return Embeddings(torch.cat(dino), torch.cat(clip))

    def texts(self, prompts: list[str]) -> torch.Tensor:
        return self.clip.embed_texts(prompts)


def check_eval_weights(eval_clip, dino) -> None:
    """Missing evaluation weights: say which download gets them (the loader can't tell B/32 from L/14)."""
    for kind, path, flag in (("clip-b32", eval_clip, "--eval-clip"), ("dino", dino, "--dino")):
        if not Path(path).exists():
            raise UserError(missing_weights_message(kind, path, flag))


def eval_models(subject_dir, eval_clip=None, dino=None) -> tuple[str, str]:
    """The evaluation CLIP and DINO of a subject: given, else those its subject.json names, else the defaults."""
    file = read_subject_file(subject_dir)
    named = file.get("weights", {}) if isinstance(file.get("weights"), dict) else {}
    return eval_clip or named.get("clip") or DEFAULT_EVAL_CLIP, dino or named.get("dino") or DEFAULT_DINO


def load_embedder(eval_clip, dino, device: torch.device) -> Embedder:
    check_eval_weights(eval_clip, dino)
    return Embedder(load_clip(eval_clip, device=device, dtype=torch.float32),
                    load_dino(dino, device=device, dtype=torch.float32))


def same_path(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


# ------------------------------------------------------------------------------------------------- one subject

@dataclass
class EvalSettings:
    images_per_prompt: int = 4
    seed: int = 0
    sample_steps: int = 50          # DDIM steps
    guidance: float = 7.5
    scheduler: str = "ddim"
    resolution: int | None = None   # None: the checkpoint's training resolution, else 512
    lambda_val: float = 0.5
    gen_batch_size: int | None = None  # images per U-Net pass (pipeline default: 8)
    device: str = "auto"
    precision: str = "auto"         # the SD model's; the evaluation networks always run in float32
    threads: int | None = None      # CPU threads for torch; None: subject.json's train_defaults, else torch's
    progress: bool = True

    def validate(self):
        checks = [(all(math.isfinite(v) for v in (self.guidance, self.lambda_val)),
                   f"--guidance and --lambda-val must be finite numbers (got {self.guidance}, {self.lambda_val})"),
                  (self.images_per_prompt >= 1,
                   f"--images-per-prompt must be at least 1 (got {self.images_per_prompt})"),
                  (self.sample_steps >= 1, f"--sample-steps must be at least 1 (got {self.sample_steps})"),
                  (self.guidance >= 0, f"--guidance must be >= 0 (got {self.guidance})"),
                  (0.0 <= self.lambda_val <= 1.0, f"--lambda-val must be in [0, 1] (got {self.lambda_val})"),
                  (self.resolution is None or self.resolution >= 8,
                   f"--resolution must be at least 8 (got {self.resolution})"),
                  (self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})"),
                  (self.gen_batch_size is None or self.gen_batch_size >= 1,
                   f"--gen-batch-size must be at least 1 (got {self.gen_batch_size})"),
                  (self.precision in PRECISIONS,
                   f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision})")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        check_seed(self.seed, max(len(dreambench.LIVE_PROMPTS), len(dreambench.OBJECT_PROMPTS)))


def reference_block(embedder: Embedder, refs: Embeddings, class_noun: str, lam: float) -> dict | None:
    """The real-images row: the reference photos against each other (no self-pairs)."""
    n = refs.clip.shape[0]
    if n < 2:
        return None
    text = REFERENCE_TEXT.format(class_noun)
    scores = image_scores(refs, refs, embedder.texts([text] * n), lam, exclude_self=True)
    return {"images": n, "clip_t_text": text, **mean_scores(scores)}


def evaluate_subject(subject_dir, out=None, ckpt=None, weights=None, eval_clip=None, dino=None, token=None,
                     class_noun=None, live=None, real=False, settings: EvalSettings | None = None,
                     embedder: Embedder | None = None) -> dict:
    """Generate, score and write eval.json / eval.md / grids for one subject. Returns eval.json's content.

    ckpt None evaluates the base model (`weights`); `real` scores only the reference photos.
    `embedder` lets tinyrpo.compare load the evaluation networks once. A subject folder's subject.json may name
    the prompts, the resolution and the models to use (the toy subjects name the toy weights), and a scorer of
    exact metrics reported beside the others (the toy world's identity, fidelity, leak, body; tinyrpo.data).
    """
    s = settings or EvalSettings()
    s.validate()
    t0 = time.perf_counter()
    device = resolve_device(s.device)
    dtype = resolve_precision(s.precision, device)
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise UserError(f"subject folder {subject_dir} does not exist; pass --subject DIR, the folder of the "
                        f"reference photos (e.g. refs/dog after `python -m tinyrpo.download dreambench`)")
    for flag, path in (("--ckpt", ckpt), ("--weights", weights), ("--eval-clip", eval_clip), ("--dino", dino)):
        if path is not None:
            check_input(path, flag)
    if out is not None:
        check_out_folder(out)
    meta = {}
    if ckpt is not None:
        if mixup := checkpoint_mixup(ckpt):
            raise UserError(mixup)
        _, meta = load_checkpoint(ckpt)  # fails early on a bad file; memory-mapped, so cheap
    file = read_subject_file(subject_dir)
    named = file.get("weights", {}) if isinstance(file.get("weights"), dict) else {}
    eval_clip, dino = eval_models(subject_dir, eval_clip, dino)
    weights = None if real else (weights or meta.get("base") or named.get("sd") or DEFAULT_SD)
    for flag, path in (("--weights", weights), ("--eval-clip", eval_clip), ("--dino", dino)):  # subject.json's too
        if path is not None:
            check_input(path, flag)
    threads = s.threads or (file.get("train_defaults") or {}).get("threads")
    if isinstance(threads, int) and threads >= 1:  # the toy world's: 1, for its tiny models
        torch.set_num_threads(threads)
    if weights is not None and not Path(weights).exists():
        raise UserError(missing_weights_message("sd15", weights, "--weights"))
    if weights is not None and (mixup := wrong_kind(weights, "sd")):  # before the photos are scored
        raise UserError(mixup)
    embedder = embedder or load_embedder(eval_clip, dino, device)  # before any work: missing weights fail fast
    token = token or meta.get("token") or "sks"
    class_noun = resolve_class(subject_dir, class_noun or meta.get("class_noun"))
    live = meta.get("live") if live is None else live
    resolution = s.resolution or meta.get("config", {}).get("resolution") or file.get("resolution") or 512
    subject = load_subject(subject_dir, token, class_noun, live, resolution)
    if real and len(subject.images) < 2:
        raise UserError(f"--real compares the reference photos with each other: {subject_dir} needs at least 2")
    kind = "real" if real else ("ckpt" if ckpt else "base")
    if out is None:
        out = Path(ckpt).parent / "eval" if ckpt else Path("runs") / f"{kind}-{subject.name}" / "eval"
    out = Path(out)
    check_out_folder(out)
    try:
        (out if real else out / "grids").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if (err := write_error(out, e)) is not e:
            raise err from None
        raise UserError(f"cannot write to --out {out}: {e.strerror}; choose a folder you can write to") from None

    reward_model = meta.get("reward_model")
    notes = [REWARD_MODEL_NOTE] if same_path(eval_clip, reward_model) else []
    refs = embedder.images(subject.images, desc="scoring references", progress=s.progress)
    reference = reference_block(embedder, refs, subject.class_noun, s.lambda_val)

    templates = subject.eval_prompts or (dreambench.LIVE_PROMPTS if subject.live else dreambench.OBJECT_PROMPTS)
    prompts = dreambench.fill(templates, subject.token, subject.class_noun)
    per_prompt, overall, grids = [], None, []
    if real:
        overall = {k: reference[k] for k in METRICS}
    else:
        n = s.images_per_prompt
        images = generate_images(weights, ckpt, prompts, s, device, dtype, resolution)
        gen = embedder.images(images, desc="scoring images", progress=s.progress)
        texts = [scoring_prompt(p, subject.token) for p in prompts]
        scores = image_scores(gen, refs, embedder.texts([t for t in texts for _ in range(n)]), s.lambda_val)
        if subject.exact_metrics is not None:  # a subject that can be scored exactly (the toy world's)
            scores |= subject.exact_metrics(subject.meta, images, [p for p in prompts for _ in range(n)], subject.token)
        overall = mean_scores(scores)
        for p, (prompt, text) in enumerate(zip(prompts, texts)):
            rows = slice(p * n, (p + 1) * n)
            grid = Path("grids") / f"p{p:02d}-{slug(prompt)}.png"
            grids.append((grid, image_grid(images[rows], cols=min(n, 4))))
            per_prompt.append({"prompt": prompt, "scored_text": text, "seed": s.seed + p, "grid": str(grid),
                               **mean_scores(scores, rows),
                               "per_image": {k: list(map(none_if_nan, v[rows].tolist())) for k, v in scores.items()}})

    result = {
        "subject": subject.name, "subject_dir": str(subject_dir), "kind": kind, "token": subject.token,
        "class_noun": subject.class_noun, "live": subject.live, "reference_images": len(subject.images),
        "models": {"ckpt": None if ckpt is None else str(ckpt), "weights": None if weights is None else str(weights),
                   "eval_clip": str(eval_clip), "dino": str(dino), "training_reward_model": reward_model},
        "settings": {**{k: v for k, v in vars(s).items() if k != "progress"}, "resolution": resolution,
                     "device": str(device), "dtype": None if real else str(dtype).removeprefix("torch."),
                     "prompt_set": "subject.json" if subject.eval_prompts else "live" if subject.live else "object"},
        "out": str(out), "notes": notes, "overall": overall, "reference": reference, "prompts": per_prompt,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_outputs(out, grids, result)
    return result


def write_outputs(out: Path, grids: list, result: dict) -> None:
    """The grids, eval.md and eval.json, all or none: each is written into a hidden folder inside `out` first
    and moved in only once all are (a rename needs no space), so a full disk, a read-only folder or Ctrl-C
    leaves an earlier evaluation in `out` as it was. eval.json comes last: its presence marks a finished one."""
    try:
        stage = Path(tempfile.mkdtemp(prefix=".eval-", dir=out))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        for rel, image in grids:
            atomic_save_image(image, stage / rel)
        atomic_write_text(stage / "eval.md", eval_markdown(result))
        atomic_write_json(stage / "eval.json", result)
        (out / "eval.json").unlink(missing_ok=True)  # from here until the last rename, `out` is unfinished
        for rel in [rel for rel, _ in grids] + [Path("eval.md"), Path("eval.json")]:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def generate_images(weights, ckpt, prompts, s: EvalSettings, device, dtype, resolution):
    """The DreamBench images: --images-per-prompt per prompt, prompt-major, as PIL images."""
    sd = load_sd(weights, device, dtype)
    factor = sd.vae.downsample_factor
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if ckpt is not None:
        apply_checkpoint(sd, ckpt)
    n = len(prompts) * s.images_per_prompt
    if s.progress:
        print(f"generating {n} images ({len(prompts)} prompts x {s.images_per_prompt}, {s.sample_steps} steps)",
              file=sys.stderr)
    images, _ = generate(sd, prompts, n=s.images_per_prompt, steps=s.sample_steps, guidance=s.guidance,
                         scheduler=s.scheduler, seed=s.seed, height=resolution, width=resolution,
                         batch_size=s.gen_batch_size, progress=s.progress, desc=f"generating {n} images")
    del sd
    free_memory(device)
    return to_pil(images)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- tables

def eval_markdown(result: dict) -> str:
    r, models = result, result["models"]
    lines = [f"# DreamBench evaluation: {r['subject']} ({r['class_noun']}, {r['kind']})", ""]
    model = models["ckpt"] or models["weights"] or "reference photos"
    lines += [f"model: {model}; eval CLIP {models['eval_clip']}, DINO {models['dino']}",
              f"λ_val = {r['settings']['lambda_val']}; CLIP-T scores the prompt without '{r['token']}'", ""]
    lines += [*r["notes"], ""] if r["notes"] else []
    o = r["overall"]
    keys, names = ["dino", "clip_i", "clip_t", "harmonic"], ["DINO", "CLIP-I", "CLIP-T", "h_λ"]
    if "identity" in o:  # a toy subject: the exact metrics too
        exact = [k for k in ("identity", "fidelity", "leak", "body") if k in o]
        keys, names = keys + exact, names + exact
        lines += [", ".join(exact) + ": exact metrics of the toy world (tinyrpo/toy/metrics.py; identity is the "
                  "chance-corrected pattern score, body the body colour)", ""]
    lines += ["| # | prompt | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    for p, row in enumerate(r["prompts"]):
        lines.append(f"| {p} | {row['prompt']} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    name = "reference photos (no self-pairs)" if r["kind"] == "real" else "overall"
    lines.append(f"| | **{name}** | " + " | ".join(f"**{fmt(o.get(k))}**" for k in keys) + " |")
    if r["reference"] and r["kind"] != "real":
        ref = r["reference"]
        lines.append(f"| | real images ({ref['images']}, no self-pairs; CLIP-T vs \"{ref['clip_t_text']}\") | "
                     + " | ".join(fmt(ref.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
