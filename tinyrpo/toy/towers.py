"""How the toy image towers learn to see a subject's identity: the last two pretraining stages (pretrain.py).

Real CLIP and DINO tell this dog from another of its breed; DreamBench's CLIP-I and DINO rely on it. In the
toy world an identity is a *layout*: which 3 of the 9 cells of the object carry the pattern colour. A tower
trained only on captions never has to see it (captions never name the pattern), and contrast between
random instances rarely needs it (two instances almost always differ in colour or class first): the first
toy CLIP and DINO scored the subject on another background *below* another layout on the references' own
background (ROC AUC 0.00 / 0.07; `python -m tinyrpo.toy probe`). Seeing layout was also not a small tweak
for a 0.46 M ViT at patch 4 on 32 px pictures: trained from scratch to predict the 9 cells, it stayed at the
per-cell majority (cell accuracy 0.80, exact layouts 12 %) for 600 steps at three learning rates, as did
transformers' ViTModel of the same shape. What made it learn, each piece measured in the pilots:

    positions  the patch position embeddings start as a fixed 2-D sin-cos table (`sincos_positions`), not
               zero: tinyrpo.dino starts them at zero, as the HF checkpoints' layout does, and a ViT that
               starts position-blind has to discover where a patch is before it can say which cell it is
    phase 1    (the first `supervised_steps`) supervision only, through two throwaway linear heads on the
               final-norm tokens: the 9 pattern cells from the class token (BCE) and, per patch, a soft
               19-way label (background / body in cell c / pattern in cell c, `patch_labels`); objects
               20-28 px for the first `big_steps`, then the world's 14-22. With every loss from step 0 the
               tower stayed at the majority; with the contrastive batches from step 0 it broke out ~100
               steps later
    phase 2    plus InfoNCE (SimCLR's, Chen et al. 2020) between two views of each instance (another place,
               size and background), in batches of `groups` × `k` instances that share class and colours
               and differ only in layout: every other instance of the group is a hard negative. In a
               share `p_near` of the groups the layouts are one cell apart (`near_pattern`: one cell of
               the first instance's moved), the hardest impostors there are. For CLIP also the
               contrastive caption loss (Radford et al. 2021) against the frozen text tower

The cell and patch losses stay on in phase 2 (weight 1). The heads are thrown away; what is kept is the
embedding tinyrpo's reward and evaluation compare: DINO's class token after the final LayerNorm, CLIP's
projected image embedding. The CLIP text tower is frozen (it is the SD text encoder the U-Net was trained
on, so the U-Net needs no retraining); "locked" towers are LiT's idea (Zhai et al. 2022), here the text one.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tinyrpo.clip import CLIP_MEAN, CLIP_STD, CLIPModel
from tinyrpo.dino import dino_preprocess
from tinyrpo.toy.world import (BACKGROUNDS, MARGIN, SIZE, Picture, Thing, WorldRules, caption, in_pattern,
                               random_pattern, random_picture, render, shape, visible_cells)

N_LABELS = 19  # per patch: 0 background, 1 + c body in cell c, 10 + c pattern in cell c


@dataclass
class TowerConfig:
    steps: int = 350
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1            # of the steps, linear; then a cosine to `final_lr` × lr
    final_lr: float = 0.05
    groups: int = 16               # phase 2 batch: groups × k instances, each seen twice
    k: int = 4
    supervised_steps: int = 200    # phase 1: cell and patch labels only, 2 × groups × k independent pictures
    big_steps: int = 100           # ... of which the first use objects of `big` px
    big: tuple = (20, 28)
    instance: float = 0.5          # weight of the instance InfoNCE (phase 2)
    temperature: float = 0.1
    caption: float = 0.0           # weight of the caption contrastive loss (CLIP only, phase 2)
    p_bw: float = 0.0              # share of black-and-white views (CLIP: its captions say "in black and white")
    p_near: float = 0.0            # share of groups whose layouts are one cell apart (the hardest impostors)


# ----------------------------------------------------------------------------------------------- pictures

def picture(rng: np.random.Generator, rules: WorldRules, sizes: tuple, bw: bool = False) -> Picture:
    """A pretraining picture (world.random_picture) with objects of `sizes` px; black and white only if `bw`."""
    return random_picture(rng, rules, sizes, styled=bw)


def view(thing: Thing, rng: np.random.Generator, rules: WorldRules, sizes: tuple, tries: int = 50):
    """`thing` at a random place and size on a random background; None if the rules admit none of `tries`."""
    for _ in range(tries):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        x, y = (int(rng.integers(MARGIN, SIZE - MARGIN - size + 1)) for _ in range(2))
        p = Picture(thing, x, y, size, list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
        if rules.admits(p):
            return p
    return None


def group_views(rng: np.random.Generator, rules: WorldRules, cfg: TowerConfig, sizes: tuple) -> tuple[list, list]:
    """Phase 2's batch: `groups` groups of `k` instances of one class, body and pattern colour that differ
    only in layout, each seen twice (views a and b)."""
    a, b = [], []
    while len(a) < cfg.groups * cfg.k:
        first = picture(rng, rules, sizes).thing
        # drawn only where near groups can happen, so a tower without them (DINO) keeps the picture stream
        # it was shipped with
        near = cfg.p_near > 0 and len(first.pattern) > 0 and rng.random() < cfg.p_near
        things, seen = [first], {first.pattern}
        for _ in range(30):
            if len(things) == cfg.k:
                break
            pattern = near_pattern(rng, first) if near else random_pattern(rng, first.cls)
            if pattern not in seen and pattern not in rules.held_out_patterns:
                seen.add(pattern)
                things.append(replace(first, pattern=pattern))
        if len(things) < cfg.k:
            continue  # a class with too few layouts in these colours: draw another group
        va, vb = [view(t, rng, rules, sizes) for t in things], [view(t, rng, rules, sizes) for t in things]
        if None not in va + vb:
            a += va
            b += vb
    return a, b


def near_pattern(rng: np.random.Generator, thing: Thing) -> tuple:
    """`thing`'s layout with one cell moved to another visible cell: as many cells, one apart."""
    cells = list(thing.pattern)
    free = [c for c in visible_cells(thing.cls) if c not in cells]
    if not free:
        return thing.pattern
    cells[rng.integers(len(cells))] = free[rng.integers(len(free))]
    return tuple(sorted(int(c) for c in cells))


def some_grey(pictures: list, rng: np.random.Generator, rules: WorldRules, p: float) -> list:
    """Each picture in black and white with probability p (where the rules admit it)."""
    out = []
    for q in pictures:
        g = replace(q, bw=True) if rng.random() < p else q
        out.append(g if rules.admits(g) else q)
    return out


# ----------------------------------------------------------------------------------------------- targets

def cell_targets(pictures: list) -> torch.Tensor:
    """float [N, 9]: 1 on each picture's pattern cells."""
    t = torch.zeros(len(pictures), 9)
    for i, p in enumerate(pictures):
        t[i, list(p.thing.pattern)] = 1
    return t


def label_map(p: Picture) -> np.ndarray:
    """int [SIZE, SIZE]: each pixel's label (N_LABELS)."""
    labels = np.zeros((SIZE, SIZE), np.int64)
    mask, cells = shape(p.thing.cls, p.size, p.size)
    box = np.where(mask, 1 + cells, 0)
    box = np.where(mask & in_pattern(cells, p.thing.pattern), 10 + cells, box)
    labels[p.y:p.y + p.size, p.x:p.x + p.size] = box
    return labels


def patch_labels(pictures: list, patch: int, dino_geometry: bool) -> torch.Tensor:
    """float [N, patches, N_LABELS]: the share of each label in each patch, in the tower's input geometry
    (DINO's preprocessing resizes 32 -> 36 and crops the centre 32; CLIP's leaves 32 px as they are)."""
    one_hot = F.one_hot(torch.from_numpy(np.stack([label_map(p) for p in pictures])), N_LABELS)
    one_hot = one_hot.permute(0, 3, 1, 2).float()
    if dino_geometry:
        one_hot = F.interpolate(one_hot, size=(36, 36), mode="bilinear", align_corners=False)[..., 2:34, 2:34]
    share = F.avg_pool2d(one_hot, patch)
    return (share / share.sum(1, keepdim=True)).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- towers

def sincos_positions(side: int, dim: int) -> torch.Tensor:
    """[side², dim] fixed 2-D sin-cos position table (MAE, He et al. 2022): a quarter of the channels each
    sin x, cos x, sin y, cos y at frequencies 1 / 100^(i / (dim/4))."""
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    freq = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    x, y = x.flatten()[:, None] * freq, y.flatten()[:, None] * freq
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)


class Tower:
    """What the training needs of a ViT image tower: its input, its final-norm tokens, its embedding."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.is_clip = isinstance(net, CLIPModel)
        vit = net.vision_model if self.is_clip else net
        cfg = net.config.vision if self.is_clip else net.config
        self.patch, self.width = cfg.patch_size, cfg.hidden_size
        if self.is_clip:
            positions, cls = vit.embeddings.position_embedding.weight, vit.embeddings.class_embedding
            self.params = (list(vit.parameters()) + list(net.visual_projection.parameters()) + [net.logit_scale])
        else:
            positions, cls = net.embeddings.position_embeddings[0], net.embeddings.cls_token
            self.params = list(net.parameters())
        with torch.no_grad():
            positions[1:] = sincos_positions(SIZE // self.patch, self.width)
            torch.nn.init.trunc_normal_(cls, std=0.02)

    def pixels(self, pictures: list) -> torch.Tensor:
        images = [render(p) for p in pictures]
        if not self.is_clip:
            return dino_preprocess([Image.fromarray(a) for a in images], SIZE)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1 + patches, width]: every token after the final LayerNorm."""
        if self.is_clip:
            vit = self.net.vision_model
            return vit.post_layernorm(vit.encoder(vit.pre_layrnorm(vit.embeddings(x))))
        return self.net.layernorm(self.net.encoder(self.net.embeddings(x)))

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """What tinyrpo compares: DINO's final-norm class token, CLIP's projected one (= encode_image)."""
        return self.net.visual_projection(tokens[:, 0]) if self.is_clip else tokens[:, 0]


def contrastive(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The symmetric cross-entropy of logits a @ b.T against a (soft or index) target."""
    logits = a @ b.T
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T if target.dim() == 2
                                                                     else target))


def lr_at(step: int, steps: int, lr: float, warmup: float, final: float) -> float:
    """The learning rate of every pretraining stage: a linear warm-up over the first `warmup` share of the
    steps, then a cosine decay to `final` × lr."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    cos = 0.5 * (1 + np.cos(np.pi * (step - w) / max(1, steps - w)))
    return float(lr * (final + (1 - final) * cos))


def train_tower(tower: Tower, cfg: TowerConfig, rules: WorldRules, seed: int, bar=None, tokenizer=None) -> float:
    """Train `tower` in place (module docstring); returns the last loss. `tokenizer` for the caption loss."""
    rng = np.random.default_rng([seed, 321])
    cells, patches = torch.nn.Linear(tower.width, 9), torch.nn.Linear(tower.width, N_LABELS)
    params = tower.params + list(cells.parameters()) + list(patches.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tower.net.train()
    for step in range(cfg.steps):
        sizes = cfg.big if step < cfg.big_steps else (14, 22)
        if step < cfg.supervised_steps:
            a = [picture(rng, rules, sizes, bw=cfg.p_bw > 0) for _ in range(2 * cfg.groups * cfg.k)]
            b = []
        else:
            a, b = group_views(rng, rules, cfg, sizes)
            a, b = some_grey(a, rng, rules, cfg.p_bw), some_grey(b, rng, rules, cfg.p_bw)
        views = a + b
        h = tower.tokens(tower.pixels(views))
        loss = F.binary_cross_entropy_with_logits(cells(h[:, 0]), cell_targets(views))
        soft = patch_labels(views, tower.patch, dino_geometry=not tower.is_clip)
        loss = loss - (soft * F.log_softmax(patches(h[:, 1:]), -1)).sum(-1).mean()
        if b:
            z = F.normalize(tower.embedding(h), dim=-1)
            n = len(a)
            loss = loss + cfg.instance * contrastive(z[:n] / cfg.temperature, z[n:], torch.arange(n))
            if cfg.caption:
                texts = [caption(p, rng) for p in views]
                ids = tokenizer(texts)
                ids = ids[:, :int((ids != tokenizer.pad_id).sum(1).max()) + 1]
                same = torch.tensor([[s == t for t in texts] for s in texts], dtype=torch.float32)
                logits_scale = tower.net.logit_scale.exp()
                loss = loss + cfg.caption * contrastive(logits_scale * z, tower.net.encode_text(ids),
                                                        same / same.sum(1, keepdim=True))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.final_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if tower.is_clip:
            with torch.no_grad():
                tower.net.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.net.eval()
    return loss.item()

