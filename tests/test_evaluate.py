"""DreamBench evaluation: the metrics on hand-made cases, against transformers, and the command end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinyrpo import dreambench
from tinyrpo.evaluate import (PAPER_ROWS, aggregate, aggregate_markdown, harmonic_scores, pair_cosine,
                              scoring_prompt, text_cosine, train_args_for)
from tinyrpo.rpo import align_i, align_t, harmonic_reward

R2 = 1 / math.sqrt(2)


# ------------------------------------------------------------------------------------------ pure functions

def test_pair_cosine_all_pairs():
    gen = torch.tensor([[1.0, 0.0], [0.0, 3.0]])           # norms don't matter
    refs = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    # gen 0: cos 1, 1/√2, 0;  gen 1: cos 0, 1/√2, -1
    expect = [(1 + R2 + 0) / 3, (0 + R2 - 1) / 3]
    assert pair_cosine(gen, refs).tolist() == pytest.approx(expect)
    # the mean over images is the mean over all 6 (generated, reference) pairs
    assert pair_cosine(gen, refs).mean().item() == pytest.approx((1 + 2 * R2 + 0 + 0 - 1) / 6)


def test_pair_cosine_excludes_self_pairs():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # cosines: (0,1) = 0, (0,2) = (1,2) = 1/√2; self-pairs (cos 1) must not count
    assert pair_cosine(e, e, exclude_self=True).tolist() == pytest.approx([R2 / 2, R2 / 2, R2])
    assert pair_cosine(e, e, exclude_self=True).mean().item() == pytest.approx(2 * (0 + 2 * R2) / 6)
    assert pair_cosine(e, e).tolist() == pytest.approx([(1 + R2) / 3, (1 + R2) / 3, (1 + 2 * R2) / 3])
    with pytest.raises(ValueError):
        pair_cosine(e[:1], e[:1], exclude_self=True)  # one image has no other to compare with
    with pytest.raises(ValueError):
        pair_cosine(e[:2], e, exclude_self=True)


def test_text_cosine_is_rowwise():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[0.0, 5.0], [2.0, 2.0]])
    assert text_cosine(img, txt).tolist() == pytest.approx([0.0, 1.0])


def test_scoring_prompt_removes_only_the_token():
    assert scoring_prompt("a sks dog on the beach", "sks") == "a dog on the beach"
    assert scoring_prompt("a red sks backpack", "sks") == "a red backpack"
    assert scoring_prompt("a sks stuffed animal in the snow", "sks") == "a stuffed animal in the snow"
    assert scoring_prompt("a sksy dog", "sks") == "a sksy dog"  # a word that merely contains it stays
    for templates, cls in ((dreambench.LIVE_PROMPTS, "cat"), (dreambench.OBJECT_PROMPTS, "teapot")):
        for t, p in zip(templates, dreambench.fill(templates, "xyz", cls)):
            assert scoring_prompt(p, "xyz") == " ".join(t.format("", cls).split())


def test_harmonic_is_the_training_reward():
    g = torch.Generator().manual_seed(0)
    gen, refs, txt = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (5, 3, 5))
    h = harmonic_scores(pair_cosine(gen, refs), text_cosine(gen, txt), 0.5)
    assert torch.allclose(h["align_i"], align_i(gen, refs), atol=1e-6)
    assert torch.allclose(h["align_t"], align_t(gen, txt), atol=1e-6)
    assert torch.allclose(h["harmonic"], harmonic_reward(align_i(gen, refs), align_t(gen, txt), 0.5), atol=1e-6)


def test_aggregate_means_over_subjects():
    def result(name, d, i, t, note=()):
        o = {"dino": d, "clip_i": i, "clip_t": t, "align_i": 0.9, "align_t": 0.6, "harmonic": 0.7}
        return {"subject": name, "overall": o, "reference": {**o, "dino": 0.8, "clip_t": None}, "notes": list(note)}
    agg = aggregate([result("dog", 0.6, 0.8, 0.30), result("can", 0.7, 0.9, 0.32, ["n"])], 0.5)
    assert agg["mean"]["dino"] == pytest.approx(0.65) and agg["mean"]["clip_t"] == pytest.approx(0.31)
    assert agg["real_images"]["dino"] == pytest.approx(0.8) and agg["real_images"]["clip_t"] is None
    assert agg["notes"] == ["n"]
    table = aggregate_markdown(agg)
    for line in ("| Real images (paper) | 0.774 | 0.885 | – |", "| DreamBooth (SD) (paper) | 0.668 | 0.803 | 0.305 |",
                 "| RPO (λ_val=0.5, paper) | – | 0.833 | 0.314 |", "| **this run (2 subjects)** | **0.650** | **0.850** | **0.310** |"):
        assert line in table, table
    assert [name for name, _ in PAPER_ROWS] == ["Real images (paper)", "DreamBooth (SD) (paper)", "RPO (λ_val=0.5, paper)"]


def test_train_args_for(tmp_path):
    subject, run = tmp_path / "refs" / "dog", tmp_path / "runs" / "dog"
    args = train_args_for(subject, run, ["--steps", "4", "--token=zwx"], {"--token": "abc", "--weights": "w",
                                                                          "--device": None})
    assert args == ["--subject", str(subject), "--out", str(run), "--class-noun", "dog", "--weights", "w",
                    "--steps", "4", "--token=zwx"]  # --token after `--` wins over the forwarded one
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")  # an interrupted run: train.py continues it
    assert train_args_for(subject, run, [], {})[-1] == "--resume"
