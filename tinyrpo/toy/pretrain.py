"""Pretraining the toy models on the toy world, as Stable Diffusion's parts were trained, in five stages:

    1. VAE    reconstruction (L1 + L2) of fresh pictures, plus a small KL term (Rombach et al. 2022, sec. 3);
              scaling_factor = 1 / the std of the latents it then gives (SD v1's 0.18215 was found the same way)
    2. CLIP   the symmetric contrastive loss of Radford et al. 2021 (Fig. 3) on (picture, caption) pairs; a
              picture's positives are all the captions in the batch that equal its own. Its text tower is the
              SD text encoder; its image tower (64 wide) is only the text tower's partner and is replaced in 4
    3. U-Net  ε-prediction (Ho et al. 2020, eq. 14) on frozen VAE latents, computed once for a fixed set of
              pictures (a fresh posterior sample every step), conditioned on the frozen CLIP text tower's
              states, computed once per distinct caption; 10 % of captions dropped to "" so classifier-free
              guidance works (Ho & Salimans 2022); EMA of the weights is what is kept
    4. CLIP image tower, trained anew (96 wide) against the frozen text tower so that it sees identity
              (the subject's pattern layout) as real CLIP does: tinyrpo/toy/towers.py
    5. DINO   the same recipe without captions: instance contrast with hard negatives that differ only in
              layout, on the class token after the final LayerNorm, the embedding tinyrpo.evaluate compares.
              So DINO scores say "the same object", whatever the background: what DreamBench's DINO is for.

Stages 1 and 2, and 4 and 5, need nothing from each other, so each pair runs side by side, one process a
stage (GROUPS below). Each stage saves its weights under OUT/stages/ when done, so an interrupted run
continues with the next stage. At the end the models are written in the public layouts
(tinyrpo/toy/models.py) under OUT/sd, OUT/clip, OUT/dino, and OUT/pretrain.log and OUT/pretrain.json say what was done, how long it took (wall
and CPU time) and how good each model is, measured exactly with tinyrpo/toy/metrics.py.
"""
import copy
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from tinyrpo.clip import CLIP_MEAN, CLIP_STD
from tinyrpo.dino import dino_preprocess
from tinyrpo.errors import UserError
from tinyrpo.runs.atomic import atomic_torch_save
from tinyrpo.schedulers import NoiseSchedule
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.toy import metrics, models
from tinyrpo.toy.probe import run_probe
from tinyrpo.toy.subjects import HELD_OUT_PATTERNS, PROBE_PATTERNS
from tinyrpo.toy.towers import Tower, TowerConfig, lr_at, train_tower
from tinyrpo.toy.world import SIZE, WorldRules, dataset, held_out_triples, moved, parse, render, sample


@dataclass
class PretrainConfig:
    out: str = "weights/toy"
    seed: int = 0
    threads: int = 2
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-5           # per latent element; keeps the latents near N(0, σ²) without blurring
    clip_steps: int = 400
    clip_batch: int = 256
    clip_lr: float = 2e-3
    unet_pictures: int = 40000     # the cached training set of the U-Net
    unet_steps: int = 3000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    min_snr: float = 0.0           # loss weight min(SNR, γ) / SNR (Hang et al. 2023); 0 = plain ε-MSE (γ = 5
                                   # left noisy pictures in the pilots: it starves the last, low-noise steps)
    ema: float = 0.999
    # stages 4 and 5 (tinyrpo/toy/towers.py; measured in the pilots: each piece was needed)
    clip_image_steps: int = 400
    clip_image_lr: float = 2e-3
    clip_image_instance: float = 1.0  # weight of the instance InfoNCE; 0.5 with caption 1.0 lost the ball's
    clip_image_caption: float = 0.5   # "elsewhere" AUC (0.83)
    clip_image_near: float = 1.0      # share of groups one cell apart; worst probe AUC (white box, elsewhere)
                                      # 0.893 at 0, 0.939 at 0.5, 0.974 at 1, caption top-1 29 -> 31 %
    clip_image_bw: float = 0.1        # share of black-and-white views, as in the captioned data
    dino_steps: int = 350
    dino_lr: float = 2e-3
    dino_instance: float = 0.5
    clip_image_seed: int = 1          # of its picture stream (the tower shipped)
    dino_seed: int = 1
    clip_image_threads: int = 1       # the shipped tower was trained at one thread: torch's sums depend on the
                                      # thread count (and the processor), so the files do; one thread also
                                      # leaves the other core to DINO beside it
    tower_groups: int = 16            # hard-negative groups per batch ...
    tower_k: int = 4                  # ... of this many instances that differ only in layout
    tower_temperature: float = 0.1
    tower_supervised_steps: int = 200  # phase 1: cell and patch labels only
    tower_big_steps: int = 100        # ... the first of them with objects of 20-28 px
    probe_pictures: int = 200     # per set of `python -m tinyrpo.toy probe`, run on the exported towers
    check_pictures: int = 1024     # the VAE's latent std is measured on these; each stage's check on a quarter
    check_prompts: int = 48        # quick quality check of the U-Net at the end of its stage ...
    check_every: int = 600         # ... and every this many steps (0: only at the end)
    guidance: float = 5.0          # of the checks (5 read best in the pilots; 7.5 oversaturates backgrounds)

    def check(self) -> None:
        """Refuse values no stage can use, before an hour of pretraining starts (one sentence each)."""
        shares = ("caption_dropout", "clip_image_near", "clip_image_bw", "ema")
        counts = ("threads", "clip_image_threads", "tower_groups", "probe_pictures", "check_pictures",
                  "check_prompts", "check_every")
        for name, value in asdict(self).items():
            flag = "--" + name.replace("_", "-")
            if name in shares and not 0 <= value <= 1:
                raise UserError(f"{flag} is a share between 0 and 1 (got {value})")
            if name in ("tower_supervised_steps", "tower_big_steps"):
                if value < 0:
                    raise UserError(f"{flag} must be 0 or more (got {value})")
            elif (name.endswith(("_steps", "_batch", "_pictures", "_lr")) or name in counts) and not value > 0:
                raise UserError(f"{flag} must be positive (got {value})")
            if name.endswith(("_instance", "_caption", "_kl")) or name in ("min_snr", "guidance"):
                if value < 0:
                    raise UserError(f"{flag} must be 0 or more (got {value})")
        if self.tower_k < 2:
            raise UserError(f"--tower-k must be at least 2: a group needs another layout as its hard negative "
                            f"(got {self.tower_k})")
        if not self.tower_temperature > 0:
            raise UserError(f"--tower-temperature must be positive (got {self.tower_temperature})")
        if self.tower_supervised_steps > min(self.clip_image_steps, self.dino_steps):
            raise UserError("--tower-supervised-steps must not exceed --clip-image-steps or --dino-steps")


SCHEDULE = (0.05, 0.1)  # stages 1-3: warm-up over 5 % of the steps, cosine to a tenth (towers.lr_at)
STAGES = ("vae", "clip", "unet", "clip_image", "dino")
STAGE_NET = {"vae": "vae", "clip": "clip", "unet": "unet", "clip_image": "clip", "dino": "dino"}  # what each trains
NEEDS = {"vae": (), "clip": (), "unet": ("vae", "clip"), "clip_image": ("clip",), "dino": ()}  # earlier stages used
# The stages of a group need nothing from each other, only from earlier groups, so they run side by side, one
# process each at its own thread count (so each file is the one a run alone makes, byte for byte): the VAE
# (which keeps only ~1.3 of its 2 threads busy) beside the text tower, the CLIP image tower beside DINO.
GROUPS = (("vae", "clip"), ("unet",), ("clip_image", "dino"))
BAR_POSITION = 0  # the line of this process's progress bars: a group's stages draw theirs one under the other


def rules() -> WorldRules:
    """The pretraining world: no subject pattern, no quality-test (class, colour, background) triple."""
    return WorldRules(held_out_patterns=HELD_OUT_PATTERNS, held_out_triples=held_out_triples())


def tower_rules() -> WorldRules:
    """The image towers' world (stages 4, 5): also without the probe's four layouts (tinyrpo/toy/probe.py).
    (Stages 1-3 keep the world they were trained in; the probe measures the towers only.)"""
    r = rules()
    return replace(r, held_out_patterns=r.held_out_patterns + PROBE_PATTERNS)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> CLIP's input. Equals tinyrpo.clip.clip_preprocess at image_size 32, where the
    resize and crop do nothing and only the normalization is left."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class Log:
    """Lines to OUT/pretrain.log (and the terminal), each with the time since the start."""

    def __init__(self, path: Path, t0: float | None = None):
        # perf_counter is the system's monotonic clock, so a stage's process can share the run's start
        self.path, self.t0 = path, time.perf_counter() if t0 is None else t0

    def __call__(self, msg: str):
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        tqdm.write(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


class Clock:
    """Wall and CPU time (all threads of this process) of a stage."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# ----------------------------------------------------------------------------------------------- stages

def train_vae(cfg: PretrainConfig, vae, log) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    world = rules()
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="VAE", unit="step", position=BAR_POSITION)
    for step in bar:
        images, _, _ = dataset(cfg.seed * 100 + 1, cfg.vae_batch, world, start=step * cfg.vae_batch)
        x = to_unit(images)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = vae.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + cfg.vae_kl * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, *SCHEDULE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    # The U-Net sees latents * scaling_factor, which should have unit variance (Rombach et al., sec. 4.3.2).
    images, _, _ = dataset(cfg.seed * 100 + 2, cfg.check_pictures, world)
    with torch.no_grad():
        latents = torch.cat([vae.encode_latents(to_unit(images[i:i + 256]), torch.Generator().manual_seed(i))
                             for i in range(0, len(images), 256)])
    vae.cfg.scaling_factor = round(vae.cfg.scaling_factor / latents.std().item(), 5)
    check = vae_check(vae, cfg.seed * 100 + 3, world, cfg.check_pictures // 4)
    log(f"VAE: final loss {loss.item():.4f}, scaling_factor {vae.cfg.scaling_factor}; reconstructions read "
        f"back: {check}")
    return {"scaling_factor": vae.cfg.scaling_factor, "check": check}


@torch.no_grad()
def vae_check(vae, seed: int, world: WorldRules, n: int = 256) -> dict:
    """Encode-decode n pictures and read them back: how often background, colour, class survive."""
    images, captions, pics = dataset(seed, n, world)
    rec = vae.decode_latents(vae.encode_latents(to_unit(images)))
    arr = metrics.to_array((rec + 1) / 2)
    readings = [metrics.read_picture(a) for a in arr]
    cells = [metrics.agreement(metrics.read_cells(a, p.thing, found=r.found), p.thing.pattern)
             for a, p, r in zip(arr, pics, readings)]
    return {"background": float(np.mean([r.background == p.background for r, p in zip(readings, pics)])),
            "colour": float(np.mean([r.colour == p.thing.colour for r, p in zip(readings, pics) if not p.bw])),
            "class": float(np.mean([r.cls == p.thing.cls for r, p in zip(readings, pics)])),
            "cells": float(np.mean(cells)),  # the share of cells read in their colour
            "mae": float((rec - to_unit(images)).abs().mean() * 127.5)}


def train_clip(cfg: PretrainConfig, clip, log) -> dict:
    tokenizer = CLIPTokenizer.from_bpe_gz()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    world = rules()
    clip.train()
    bar = tqdm(range(cfg.clip_steps), desc="CLIP", unit="step", position=BAR_POSITION)
    for step in bar:
        images, captions, _ = dataset(cfg.seed * 100 + 4, cfg.clip_batch, world, start=step * cfg.clip_batch)
        ids = tokenizer(captions)
        # Every caption ends well before position 77, and the causal text tower's pooled (end-of-text) state
        # never sees the positions after it: cutting them gives the same loss for a third of the work.
        ids = ids[:, :int((ids != tokenizer.pad_id).sum(1).max()) + 1]
        logits = clip(ids, clip_pixels(images))  # [images, texts]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)  # identical captions are all positives
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.clip_steps, cfg.clip_lr, *SCHEDULE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if step % 20 == 0 or step == cfg.clip_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{clip.logit_scale.exp().item():.1f}")
    clip.eval()
    # Round to the precision the files store, so the U-Net trains on the text states users will get.
    with torch.no_grad():
        for p in clip.parameters():
            p.copy_(p.half().float())
    check = clip_check(clip, tokenizer, cfg.seed * 100 + 5, world, cfg.check_pictures // 2)
    log(f"CLIP: final loss {loss.item():.3f}; {check}")
    return {"check": check}


@torch.no_grad()
def clip_check(clip, tokenizer, seed: int, world: WorldRules, n: int = 512) -> dict:
    """Top-1 caption retrieval among the distinct captions of n pictures, right when the caption found asks
    what the picture's own asks (class, colour, background, style; fillers and "a photo of" can't be seen)."""
    images, captions, _ = dataset(seed, n, world)
    distinct = sorted(set(captions))
    sims = clip.encode_image(clip_pixels(images)) @ clip.encode_text(tokenizer(distinct)).T
    pick = [distinct[i] for i in sims.argmax(1).tolist()]
    return {"caption_top1": float(np.mean([parse(a) == parse(b) for a, b in zip(pick, captions)])),
            "captions": len(distinct)}


@torch.no_grad()
def cache_unet_data(cfg: PretrainConfig, vae, text_encoder, log) -> dict:
    """The U-Net's training set, encoded once: posterior mean and std of each picture's latents, and the
    text states of each distinct caption (the last row: the empty caption of guidance)."""
    tokenizer = CLIPTokenizer.from_bpe_gz()
    world = rules()
    means, stds, captions = [], [], []
    for start in tqdm(range(0, cfg.unet_pictures, 512), desc="encoding pictures", unit="batch", leave=False):
        images, caps, _ = dataset(cfg.seed * 100 + 6, min(512, cfg.unet_pictures - start), world, start=start)
        mean, logvar = vae.encode(to_unit(images))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
        captions += caps
    distinct = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(distinct)}
    states = torch.cat([text_encoder(tokenizer(distinct[i:i + 256])) for i in range(0, len(distinct), 256)])
    log(f"U-Net data: {cfg.unet_pictures} pictures, {len(distinct) - 1} distinct captions")
    return {"mean": torch.cat(means), "std": torch.cat(stds), "states": states,
            "caption": torch.tensor([index[c] for c in captions]), "empty": len(distinct) - 1}


def min_snr_weight(sched: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 - ᾱ_t) (Hang et al. 2023, eq. 9 for ε-prediction): the
    nearly clean, easy timesteps stop dominating the gradient; 3x faster convergence in their measurements."""
    if gamma <= 0:
        return torch.ones(len(t))
    a = sched.alpha_bar(t)
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def train_unet(cfg: PretrainConfig, unet, data: dict, scale: float, log, check=None) -> torch.nn.Module:
    """ε-prediction on the cached latents; returns the EMA copy of the weights. `check(ema)` is called every
    cfg.check_every steps (a learning curve in the log)."""
    sched = NoiseSchedule(models.SCHEDULER)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(data["mean"])
    order = torch.randperm(n, generator=g)
    unet.train()
    bar = tqdm(range(cfg.unet_steps), desc="U-Net", unit="step", position=BAR_POSITION)
    pos = 0
    for step in bar:
        if pos + cfg.unet_batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + cfg.unet_batch]
        pos += cfg.unet_batch
        B = len(idx)
        x0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)) * scale
        cap = data["caption"][idx].clone()
        cap[torch.rand(B, generator=g) < cfg.caption_dropout] = data["empty"]  # for classifier-free guidance
        t = torch.randint(0, sched.cfg.num_train_timesteps, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        err = (unet(sched.add_noise(x0, noise, t), t, data["states"][cap]) - noise).pow(2).mean((1, 2, 3))  # eq. (14)
        loss = (min_snr_weight(sched, t, cfg.min_snr) * err).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, *SCHEDULE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # a short EMA at first, as the weights move fast
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 20 == 0 or step == cfg.unet_steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            log(f"U-Net step {step}: loss {loss.item():.4f}")
        if check is not None and cfg.check_every and (step + 1) % cfg.check_every == 0 and step + 1 < cfg.unet_steps:
            check(ema.eval(), step + 1)
    return ema.eval()


def tower_config(cfg: PretrainConfig, kind: str) -> TowerConfig:
    shared = dict(groups=cfg.tower_groups, k=cfg.tower_k, temperature=cfg.tower_temperature,
                  supervised_steps=cfg.tower_supervised_steps, big_steps=cfg.tower_big_steps)
    if kind == "clip":
        return TowerConfig(steps=cfg.clip_image_steps, lr=cfg.clip_image_lr, instance=cfg.clip_image_instance,
                           caption=cfg.clip_image_caption, p_bw=cfg.clip_image_bw, p_near=cfg.clip_image_near, **shared)
    return TowerConfig(steps=cfg.dino_steps, lr=cfg.dino_lr, instance=cfg.dino_instance, **shared)


def train_clip_image(cfg: PretrainConfig, clip, log) -> tuple:
    """Stage 4: a new, wider image tower for `clip` (its text tower frozen); returns (the CLIP, result)."""
    clip = models.with_new_image_tower(clip)
    clip.text_model.requires_grad_(False)
    clip.text_projection.requires_grad_(False)
    tower = Tower(clip)
    with tqdm(total=cfg.clip_image_steps, desc="CLIP image tower", unit="step", position=BAR_POSITION) as bar:
        loss = train_tower(tower, tower_config(cfg, "clip"), tower_rules(), cfg.clip_image_seed, bar,
                           CLIPTokenizer.from_bpe_gz())
    with torch.no_grad():  # the precision the file stores
        for p in clip.parameters():
            p.copy_(p.half().float())
    check = clip_check(clip, CLIPTokenizer.from_bpe_gz(), cfg.seed * 100 + 5, rules(), cfg.check_pictures // 2)
    log(f"CLIP image tower: final loss {loss:.3f}; {check}")
    return clip, {"check": check}


def train_dino(cfg: PretrainConfig, dino, log) -> dict:
    """Stage 5."""
    tower = Tower(dino)
    with tqdm(total=cfg.dino_steps, desc="DINO", unit="step", position=BAR_POSITION) as bar:
        loss = train_tower(tower, tower_config(cfg, "dino"), tower_rules(), cfg.dino_seed, bar)
    check = dino_check(dino, cfg.seed * 100 + 8, rules(), cfg.check_pictures // 4)
    log(f"DINO: final loss {loss:.3f}; {check}")
    return {"check": check}


def dino_views(pictures) -> torch.Tensor:
    """DINO's evaluation preprocessing (tinyrpo.dino.dino_preprocess) of rendered pictures."""
    return dino_preprocess([Image.fromarray(render(p)) for p in pictures], SIZE)


def instance_pairs(seed: int, n: int, world: WorldRules, start: int = 0) -> tuple[list, list]:
    """n object instances, each seen twice: at two places and sizes, on two backgrounds."""
    a, b = [], []
    for i in range(start, start + n):
        p, _ = sample(seed, i, world)
        rng = np.random.default_rng([seed, i, 1])
        a.append(moved(p, rng))
        b.append(moved(p, rng))
    return a, b


@torch.no_grad()
def dino_check(dino, seed: int, world: WorldRules, n: int = 256) -> dict:
    """Top-1 retrieval of an instance's other view among n instances, and the mean cosine of same-instance
    pairs vs. different-instance pairs of the same class and colour (the hard negatives)."""
    a, b = instance_pairs(seed, n, world)
    za, zb = (F.normalize(dino(dino_views(v)), dim=-1) for v in (a, b))
    sims = za @ zb.T
    same_kind = torch.tensor([[p.thing.cls == q.thing.cls and p.thing.colour == q.thing.colour
                               and p.thing != q.thing for q in b] for p in a])
    return {"top1": float((sims.argmax(1) == torch.arange(n)).float().mean()),
            "cos_same": float(sims.diag().mean()), "cos_same_kind": float(sims[same_kind].mean())}


# ----------------------------------------------------------------------------------------------- the run

def stage_path(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.pt"


def stage_threads(cfg: PretrainConfig, name: str) -> int:
    return cfg.clip_image_threads if name == "clip_image" else cfg.threads


def load_stages(nets: dict, out: Path, names) -> None:
    """Put the weights of the finished stages `names` (OUT/stages/) into `nets`."""
    for name in names:
        state = torch.load(stage_path(out, name), map_location="cpu", weights_only=True)
        if name == "clip_image":
            nets["clip"] = models.with_new_image_tower(nets["clip"])
        nets[STAGE_NET[name]].load_state_dict(state["weights"])
        if name == "vae":
            nets["vae"].cfg.scaling_factor = state["scaling_factor"]


def run_stage(cfg: PretrainConfig, name: str, t0: float | None = None, bar_position: int = 0) -> dict:
    """Train one stage, starting from the weights of the stages it needs, and save its weights under
    OUT/stages/; -> its record (result, wall and CPU time, threads, load). Runs in a process of its own when
    its group has more than one stage to do."""
    global BAR_POSITION
    BAR_POSITION = bar_position
    out = Path(cfg.out)
    torch.set_num_threads(stage_threads(cfg, name))
    log = Log(out / "pretrain.log", t0)
    nets = models.new_models(cfg.seed)  # the same initial weights in every process
    load_stages(nets, out, NEEDS[name])
    torch.manual_seed(cfg.seed)
    with Clock() as clock:
        if name == "vae":
            result = train_vae(cfg, nets["vae"], log)
        elif name == "clip":
            result = train_clip(cfg, nets["clip"], log)
        elif name == "unet":
            data = cache_unet_data(cfg, nets["vae"].requires_grad_(False),
                                   models.text_encoder_of(nets["clip"]).requires_grad_(False), log)
            check = lambda ema, step: unet_check(cfg, nets | {"unet": ema}, log, step)  # noqa: E731
            nets["unet"] = train_unet(cfg, nets["unet"], data, nets["vae"].cfg.scaling_factor, log, check)
            del data
            result = {"check": unet_check(cfg, nets, log, cfg.unet_steps)}
        elif name == "clip_image":
            nets["clip"], result = train_clip_image(cfg, nets["clip"], log)
        else:
            result = train_dino(cfg, nets["dino"], log)
    result |= {"wall_s": round(clock.wall, 1), "cpu_s": round(clock.cpu, 1), "threads": torch.get_num_threads(),
               "load_average": _loadavg()}
    log(f"{name}: {clock.wall / 60:.1f} min wall, {clock.cpu / 60:.1f} min CPU")
    atomic_torch_save({"weights": nets[STAGE_NET[name]].state_dict(),
                       "scaling_factor": nets["vae"].cfg.scaling_factor}, stage_path(out, name))
    return result


def run_group(cfg: PretrainConfig, names: list[str], t0: float) -> dict:
    """-> {stage: record} of `names`, run side by side in processes of their own (here when only one)."""
    if len(names) == 1:
        return {names[0]: run_stage(cfg, names[0], t0)}
    with ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(run_stage, cfg, name, t0, i) for i, name in enumerate(names)}
        return {name: f.result() for name, f in futures.items()}


def pretrain(cfg: PretrainConfig, argv: list[str] | None = None) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    log = Log(out / "pretrain.log")
    log(f"command: python -m tinyrpo.toy pretrain {' '.join(argv or [])}".rstrip())
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {_cpu_name()}, load average "
        f"{' '.join(f'{x:.2f}' for x in _loadavg())}")
    for name, net in models.new_models(cfg.seed).items():
        log(f"{name}: {models.n_params(net) / 1e6:.2f} M parameters")
    report_path = out / "pretrain.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.setdefault("stages", {})
    report.setdefault("groups", {})

    for group in GROUPS:
        todo = [name for name in group if not stage_path(out, name).exists()]
        for name in group:
            if name not in todo:
                log(f"{name}: done before ({stage_path(out, name)})")
        if not todo:
            continue
        if len(todo) > 1:
            log(f"{' and '.join(todo)} side by side, one process each")
        with Clock() as clock:
            report["stages"] |= run_group(cfg, todo, log.t0)
        report["groups"][" + ".join(group)] = {"wall_s": round(clock.wall, 1), "stages": todo,
                                              "load_average": _loadavg()}
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    nets = models.new_models(cfg.seed)
    load_stages(nets, out, STAGES)
    export(out, nets)
    probe = run_probe(str(out), cfg.probe_pictures)
    report["probe_worst_auc"] = probe["worst"]
    log(f"probe ({out}/probe.json, {cfg.probe_pictures} pictures a set): worst AUC {probe['worst']:.3f}")
    report["total"] = total_time(report)
    report["config"] = asdict(cfg)
    report["machine"] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__}
    report["files_mb"] = {str(p.relative_to(out)): round(p.stat().st_size / 2 ** 20, 2)
                          for p in sorted(out.rglob("*.safetensors"))}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    total = report["total"]
    log(f"done: {total['wall_s'] / 60:.1f} min wall, {total['cpu_s'] / 60:.1f} min CPU in the stages; "
        f"weights {sum(report['files_mb'].values()):.1f} MB in {out}/sd, {out}/clip, {out}/dino")
    return report


def total_time(report: dict) -> dict:
    """Wall time: each group's, as measured when its stages ran together (a group whose stages ran in other
    invocations counts as its stages one after another); CPU time: every stage's."""
    stages, groups = report["stages"], report.get("groups", {})
    wall = 0.0
    for group in GROUPS:
        key = " + ".join(group)
        ran = groups.get(key)
        if ran is not None and set(ran["stages"]) == set(group):
            wall += ran["wall_s"]
        else:
            wall += sum(stages.get(name, {}).get("wall_s", 0) for name in group)
    return {"wall_s": round(wall, 1), "cpu_s": round(sum(s.get("cpu_s", 0) for s in stages.values()), 1)}


def export(out: Path, nets: dict) -> None:
    """The public layouts: OUT/sd (diffusers), OUT/clip (HF CLIP), OUT/dino (HF ViT)."""
    models.save_sd(out / "sd", nets["unet"], nets["vae"], models.text_encoder_of(nets["clip"]))
    models.save_clip(out / "clip", nets["clip"])
    models.save_dino(out / "dino", nets["dino"])


@torch.no_grad()
def unet_check(cfg: PretrainConfig, nets: dict, log, step: int) -> dict:
    """A quick quality reading: the first cfg.check_prompts quality prompts, through the real pipeline."""
    from tinyrpo.toy.quality import quality_prompts, run_quality
    from tinyrpo.formats.weights import StableDiffusion
    from tinyrpo.schedulers import DDIMScheduler
    sd = StableDiffusion(nets["unet"], nets["vae"], models.text_encoder_of(nets["clip"]),
                         CLIPTokenizer.from_bpe_gz(), DDIMScheduler(models.SCHEDULER), models.SCHEDULER, "", "")
    result = run_quality(sd, quality_prompts()[:cfg.check_prompts], guidance=cfg.guidance, progress=False)
    log(f"U-Net step {step}: quick check ({cfg.check_prompts} held-out prompts, guidance {cfg.guidance}): "
        f"{ {k: round(v, 3) for k, v in result.items() if k != 'per_image'} }")
    return {k: v for k, v in result.items() if k != "per_image"}


def _cpu_name() -> str:
    """The processor: torch's sums, so the files, depend on its kernels as on the thread count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit("run: python -m tinyrpo.toy pretrain")
