"""LoRA training (--lora RANK): adapters only, RPO's reference is the base with adapters off, exact resume."""
import json

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import train
from tests.test_train import RES, base_args, make_subject, models  # noqa: F401  (models: fixture)
from tests.test_trainer_step import make_trainer
from tinyrpo.formats.weights import load_sd
from tinyrpo.trainer import optimizer_step


def test_lora_rpo_end_to_end(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    out = tmp_path / "run"
    assert train.main(base_args(models, subject, out, "--steps", "3", "--val-every", "3", "--lora", "4",
                                "--select", "last")) == 0
    with safe_open(out / "best.safetensors", "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["tinyrpo.content"] == "lora" and json.loads(meta["lora"])["rank"] == 4
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lora"] == 4 and cfg["lr"] == 1e-3  # base_args sets --lr; without it LoRA trains at 1e-4
    import sample
    common = ["--prompt", "a sks toy on the beach", "--sample-steps", "2", "--images-per-prompt", "1", "--height", str(RES),
              "--width", str(RES), "--device", "cpu", "--seed", "3"]
    sample.main([*common, "--weights", str(models[0]), "--out", str(tmp_path / "base")])
    sample.main([*common, "--ckpt", str(out / "best.safetensors"), "--out", str(tmp_path / "tuned")])
    a, b = (sorted((tmp_path / d).rglob("*-00.png"))[0] for d in ("base", "tuned"))
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_lora_reference_is_the_base_model(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    tr = make_trainer(models, subject, tmp_path / "run", "--lora", "4")
    assert not isinstance(tr.ref_fwd, torch.nn.Module)  # no second copy of the U-Net: a function of the policy
    assert all(p.requires_grad for p in tr.params) and len(tr.params) < len(list(tr.policy.parameters())) / 2
    tr.opt = torch.optim.AdamW(tr.params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = tr.method.loss(tr.method.draw(g))
        optimizer_step(out.loss, tr.params, tr.opt, 1.0)
    base = load_sd(models[0]).unet.eval()
    x, t = torch.randn(2, 4, RES // 2, RES // 2, generator=g), torch.tensor([10, 500])
    c = tr.text_states(tr.prompts[:2])
    with torch.no_grad():
        ref, want, pol = tr.ref_fwd(x, t, c), base(x, t, c), tr.policy_fwd(x, t, c)
    assert torch.equal(ref, want)
    assert (pol - want).abs().max() > 1e-4  # the adapters did move the policy


def test_lora_resume_matches_uninterrupted(models, tmp_path):
    subject = make_subject(tmp_path / "subject")
    args = ["--val-every", "2", "--lora", "4", "--save-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(base_args(models, subject, full, "--steps", "4", *args)) == 0
    assert train.main(base_args(models, subject, part, "--steps", "2", *args)) == 0
    assert train.main(["--out", str(part), "--resume", "--steps", "4"]) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["unet"].keys() == b["unet"].keys() and all(".lora_" in k for k in a["unet"])
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])


def test_resume_of_a_lora_run_reads_its_own_rank(models, tmp_path):
    """--resume with --lora-alpha on a LoRA run is checked against the run's own --lora: the same α resumes, another
    is refused as a change of the run (not "needs --lora RANK")."""
    from tests.test_train import run_cli
    subject = make_subject(tmp_path / "subject")
    out = tmp_path / "run"
    assert train.main(base_args(models, subject, out, "--steps", "1", "--val-every", "1", "--lora", "4",
                                "--lora-alpha", "4")) == 0
    r = run_cli(["--out", str(out), "--resume", "--lora-alpha", "8"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs --lora" not in r.stderr and "lora_alpha: 4.0 -> 8.0" in r.stderr, r.stderr
    r = run_cli(["--out", str(out), "--resume", "--lora-alpha", "4", "--steps", "2"])
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
