"""The λ-Harmonic reward model (Miao et al. 2024, eq. 5) on top of a CLIP model.

The paper scored images with ALIGN; tinyrpo uses CLIP ViT-L/14 by default (ALIGN has no public PyTorch
checkpoint in the HF CLIP layout, and CLIP is what the field evaluates with). The formulas are in
`tinyrpo/rpo.py`; this module only turns images and prompts into the embeddings they need.
"""
from dataclasses import dataclass

import torch
from PIL import Image

from tinyrpo.clip import CLIPModel, clip_preprocess
from tinyrpo.dreambench import remove_token
from tinyrpo.rpo import REWARD_MEANS, align_i, align_t
from tinyrpo.tokenizer import CLIPTokenizer


@dataclass
class Scores:
    align_i: torch.Tensor  # [N] ALIGN-I, in [0, 1]
    align_t: torch.Tensor  # [N] ALIGN-T, in [0, 1]
    reward: torch.Tensor   # [N] h_λ

    def mean(self) -> dict:
        return {"reward": self.reward.mean().item(), "align_i": self.align_i.mean().item(),
                "align_t": self.align_t.mean().item()}


class CLIPScorer:
    """Batched, inference-only CLIP embeddings of PIL images and prompts."""

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizer | None = None, batch_size: int = 32):
        self.clip = clip.eval().requires_grad_(False)
        # Every OpenAI CLIP shares one BPE vocabulary, and HF CLIP folders need not ship it: use ours.
        self.tokenizer = tokenizer or CLIPTokenizer.from_bpe_gz()
        self.batch_size = batch_size
        p = next(clip.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.image_size = clip.config.vision.image_size

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """list of PIL images -> L2-normalized embeddings [N, D] (float32)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = clip_preprocess(images[i:i + self.batch_size], self.image_size)
            out.append(self.clip.encode_image(x.to(self.device, self.dtype)).float())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """list of prompts -> L2-normalized embeddings [N, D] (float32); identical prompts embedded once."""
        unique = list(dict.fromkeys(prompts))
        embs = []
        for i in range(0, len(unique), self.batch_size):
            ids = self.tokenizer(unique[i:i + self.batch_size]).to(self.device)
            embs.append(self.clip.encode_text(ids).float())
        table = dict(zip(unique, torch.cat(embs)))
        return torch.stack([table[p] for p in prompts])


def score(scorer: CLIPScorer, images: list[Image.Image], prompts: list[str], ref_embs: torch.Tensor,
          token: str, lam: float, image_embs: torch.Tensor | None = None, mean: str = "harmonic") -> Scores:
    """λ-Harmonic reward of each image (eq. 5) against the reference embeddings and its own prompt (or the
    λ-Arithmetic one with mean="arithmetic", the paper's Table 6).

    The subject token is removed from the prompt first: CLIP has never seen "sks", so keeping it would
    only add noise to ALIGN-T.
    """
    if image_embs is None:
        image_embs = scorer.embed_images(images)
    text_embs = scorer.embed_texts([remove_token(p, token) for p in prompts])
    a_i = align_i(image_embs, ref_embs.to(image_embs.device))
    a_t = align_t(image_embs, text_embs)
    return Scores(a_i, a_t, REWARD_MEANS[mean](a_i, a_t, lam))
