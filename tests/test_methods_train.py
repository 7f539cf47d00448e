"""train.py end to end with every method and the RPO ablations, and resume equal to the uninterrupted run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tests.test_methods import ONE_PROMPT, method_args
from tests.test_train import make_subject, models  # noqa: F401  (models is a fixture)
from tinyrpo.errors import UserError
from tinyrpo.formats.checkpoint import apply_checkpoint, load_checkpoint, save_checkpoint
from tinyrpo.formats.weights import load_sd
from tinyrpo.methods import METHODS

# look forward at its default critic step (lr 0.01, gradient norm clipped to 1): on these random networks the
# look-forward residuals are in the hundreds at large t, and the authors' unclipped step made the loss -inf at
# step 3 (nan at step 4 with the DINO reward), so these runs also check that the default does not diverge
CASES = {
    "dreambooth": ["--method", "dreambooth", "--num-class-images", "2", "--train-text-encoder"],
    "dpg": ["--method", "dpg", "--num-class-images", "2"],
    "dpg-dino": ["--method", "dpg", "--num-class-images", "2", "--dpg-reward", "dino"],
}


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    from tests.fixtures import make_tiny_dino
    d = tmp_path_factory.mktemp("methods")
    prompts = d / "prompts.txt"
    prompts.write_text(ONE_PROMPT)  # one training prompt: validation makes one image
    return make_subject(d / "subject"), prompts, make_tiny_dino(d / "dino")


def args_for(models, setup, out, case, *extra):
    subject, prompts, dino = setup
    flags = list(CASES[case]) + (["--dino", str(dino)] if case == "dpg-dino" else [])
    method = flags[1]
    return method_args(models, subject, out, method, *flags[2:], "--val-every", "2", *extra, prompts=prompts)


def records(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_method_end_to_end_and_exact_resume(models, setup, tmp_path, case):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(args_for(models, setup, full, case, "--steps", "4")) == 0
    # what the run folder holds
    cfg = json.loads((full / "config.json").read_text())
    method = cfg["method"]
    assert cfg["select"] == "last" and cfg["train_text_encoder"] is True
    assert cfg["lr"] == 1e-3  # given: the method's default is only a default
    assert len(list((full / "class_images").glob("*.png"))) == 2
    steps = [r for r in records(full) if not r.get("val")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    terms = {"l_instance", "l_prior"} | ({"q", "lookforward_mse", "critic_loss", "cost"} if method == "dpg" else set())
    assert all(terms <= r.keys() for r in steps), steps[0].keys()
    # the checkpoint is the last step, with the trained text encoder, and loads into a fresh model (sample.py and the
    # evaluation go through apply_checkpoint)
    last = torch.load(full / "last.pt", weights_only=True)
    _, meta = load_checkpoint(full / "best.safetensors")
    assert meta["step"] == 4 and meta["method"] == method and meta["text_encoder"] is True
    sd = load_sd(models[0])
    base_te = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    apply_checkpoint(sd, full / "best.safetensors")
    for module, key in ((sd.unet, "unet"), (sd.text_encoder, "text_encoder")):
        assert all(torch.equal(v, last[key][k]) for k, v in module.state_dict().items()), key
    assert any(not torch.equal(v, base_te[k]) for k, v in sd.text_encoder.state_dict().items())
    if method == "dpg":
        assert set(last["method"]) == {"critic", "critic_optimizer"}

    # interrupted after step 2, resumed to 4: the same weights, text encoder, critic and log, bit for bit
    assert train.main(args_for(models, setup, part, case, "--steps", "2")) == 0
    assert train.main(args_for(models, setup, part, case, "--steps", "4", "--resume")) == 0
    resumed = torch.load(part / "last.pt", weights_only=True)
    for key in ("unet", "text_encoder"):
        assert all(torch.equal(last[key][k], resumed[key][k]) for k in last[key]), key
    if method == "dpg":
        for k, v in last["method"]["critic"].items():
            assert torch.equal(v, resumed["method"]["critic"][k]), k
    assert records(full) == records(part)


def test_rpo_ablations_end_to_end(models, setup, tmp_path):
    subject, prompts, _ = setup
    common = ["--steps", "2", "--val-every", "2"]
    # pure L_sim, the arithmetic mean (Table 6), λ_train 0.5, the checkpoint = the last step
    a = tmp_path / "a"
    assert train.main(method_args(models, subject, a, "rpo", *common, "--no-pref", "--mean", "arithmetic",
                                  "--lambda-train", "0.5", "--select", "last", prompts=prompts)) == 0
    steps = [r for r in records(a) if not r.get("val")]
    assert all(r["loss"] == pytest.approx(r["l_sim"], rel=1e-6) and r["l_pref"] > 0 for r in steps)
    for v in (r for r in records(a) if r.get("val")):  # the mean of an arithmetic reward is its arithmetic mean
        assert v["reward"] == pytest.approx(0.3 * v["align_i"] + 0.7 * v["align_t"], rel=1e-5)
    assert json.loads((a / "rewards.json").read_text())["lambda_train"] == 0.5
    assert load_checkpoint(a / "best.safetensors")[1]["step"] == 2
    # DPO alone, the winner scored against the loser's prompt, independent noise, the checkpoint = the argmax
    b = tmp_path / "b"
    assert train.main(method_args(models, subject, b, "rpo", *common, "--no-sim", "--winner-prompt", "pair",
                                  "--noise", "independent", "--select", "best", prompts=prompts)) == 0
    steps = [r for r in records(b) if not r.get("val")]
    assert all(r["loss"] == pytest.approx(r["l_pref"], rel=1e-6) and r["l_sim"] > 0 for r in steps)
    assert json.loads((b / "rewards.json").read_text())["winner_prompt"] == "pair"
    vals = [r for r in records(b) if r.get("val")]
    assert load_checkpoint(b / "best.safetensors")[1]["step"] == max(vals, key=lambda v: v["reward"])["step"]
    cfg = json.loads((b / "config.json").read_text())
    assert (cfg["sim"], cfg["noise"], cfg["select"]) == (False, "independent", "best")


def test_help_shows_each_methods_defaults():
    text = " ".join(train.build_parser().format_help().split())
    assert "{" + ",".join(METHODS) + "}" in text
    defaults = {n: METHODS[n].defaults for n in METHODS}
    for key, flag in (("lr", "--lr"), ("steps", "--steps"), ("select", "--select")):
        shown = ", ".join(f"{n} " + f"{defaults[n][key]:g}".replace("e-0", "e-") if key == "lr" else f"{n} {defaults[n][key]}" for n in METHODS)
        assert shown in text, (flag, shown)
    assert "on for dpg, off for rpo, dreambooth and dco" in text
    assert [n for n in METHODS if defaults[n]["train_text_encoder"]] == ["dpg"]
    options = {n: METHODS[n].Options() for n in METHODS}
    assert f"dreambooth {options['dreambooth'].num_class_images}, dpg {options['dpg'].num_class_images})" in text
    o = options["dpg"]
    for value in (o.gamma, o.critic_lr, o.critic_clip, o.dpg_weight, o.prior_weight, o.dpg_reward, o.dino):
        assert f"(default: {value})" in text, value


@pytest.mark.parametrize("case", ["foreign_option", "no_dino"])
def test_method_user_errors_write_nothing(models, setup, tmp_path, case):
    subject, prompts, _ = setup
    out = tmp_path / "run"
    if case == "foreign_option":
        args, match = method_args(models, subject, out, "dreambooth", "--beta", "2"), "--beta is not a setting"
    else:
        args = method_args(models, subject, out, "dpg", "--dpg-reward", "dino", "--dino", str(tmp_path / "none"))
        match = "tinyrpo.download dino"
    with pytest.raises(UserError, match=match):
        train.main(args)
    assert not out.exists()


def test_checkpoint_with_text_encoder(models, tmp_path):
    """A checkpoint carries a fine-tuned text encoder; apply_checkpoint loads it (sample.py, evaluate), the export
    writes it, and the base-model check still holds."""
    from tinyrpo.formats.exports import export_checkpoint
    sd = load_sd(models[0])
    g = torch.Generator().manual_seed(0)
    nudge = lambda state: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}  # noqa: E731
    unet, te = nudge(sd.unet.state_dict()), nudge(sd.text_encoder.state_dict())
    meta = {"base": str(models[0]), "base_fingerprint": sd.fingerprint, "token": "sks", "class_noun": "toy"}
    path = save_checkpoint(tmp_path / "best.safetensors", unet, meta, text_encoder=te)
    state, got = load_checkpoint(path)
    assert got["text_encoder"] is True and state.keys() == unet.keys()  # the U-Net's tensors only
    fresh = load_sd(models[0])
    apply_checkpoint(fresh, path)
    assert all(torch.equal(v, te[k]) for k, v in fresh.text_encoder.state_dict().items())
    assert all(torch.equal(v, unet[k]) for k, v in fresh.unet.state_dict().items())
    out = export_checkpoint(path, "single-file", out=tmp_path / "export.safetensors")
    exported = load_sd(out)
    assert all(torch.equal(v, te[k]) for k, v in exported.text_encoder.state_dict().items())
    other = load_sd(models[0])  # another base: refused, nothing changed
    other.fingerprint = "another"
    with pytest.raises(UserError, match="was trained from"):
        apply_checkpoint(other, path)
    # a file whose header promises a text encoder it does not hold
    from safetensors import safe_open
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(path), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith("text_encoder.")}, bad, f.metadata())
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(bad)


@pytest.mark.parametrize("case", ["dreambooth", "dpg"])
def test_lora_with_each_method(models, setup, tmp_path, case):
    """--lora RANK trains adapters for DreamBooth and look forward too: the checkpoint holds the LoRA only
    (the text encoder stays frozen, look forward's default included) and the critic still trains."""
    out = tmp_path / "run"
    args = [a for a in args_for(models, setup, out, case, "--steps", "2", "--lora", "2") if a != "--train-text-encoder"]
    assert train.main(args) == 0
    state, meta = load_checkpoint(out / "best.safetensors")
    assert meta["content"] == "lora" and meta["text_encoder"] is False
    assert state and all(".lora_" in k for k in state)
    steps = [r for r in records(out) if not r.get("val")]
    assert all("l_prior" in r for r in steps) and (case == "dreambooth" or "critic_loss" in steps[-1])
    # the finished LoRA run: a resume with nothing to do, fewer --steps and another --lora-alpha change nothing
    from tests.test_runfolder import snapshot
    before = snapshot(out)
    assert train.main(["--out", str(out), "--resume"]) == 0
    for flags, match in ((["--steps", "1"], "--steps 1 is fewer than the 2 steps"), (["--lora-alpha", "8"], "lora_alpha")):
        with pytest.raises(UserError, match=match):
            train.main(["--out", str(out), "--resume", *flags])
    assert snapshot(out) == before


def test_full_disk_in_the_class_images_then_resume(models, setup, tmp_path, monkeypatch):
    """Look forward's (and DreamBooth's) class images on a full disk: one line with the resume command, no partial
    image; the resume makes the missing ones and trains."""
    import errno
    import os
    from tinyrpo.runs import atomic
    from tinyrpo import method as method_module
    out = tmp_path / "run"
    args = args_for(models, setup, out, "dpg", "--steps", "2")
    real = method_module.atomic_save_image

    def full(image, path, **kw):
        if path.name != "001_00.png":
            return real(image, path, **kw)

        def half(tmp):
            tmp.write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return atomic.atomic_write(path, half)
    with monkeypatch.context() as m:
        m.setattr(method_module, "atomic_save_image", full)
        with pytest.raises(UserError) as e:
            train.main(args)
    assert str(e.value).startswith(f"cannot write {out / 'class_images' / '001_00.png'}: no space left on the device; "
                                   f"free some space, then continue the run (no step is saved yet")
    assert str(e.value).endswith(f"with: python train.py --out {out} --resume")
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["000_00.png"]
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["000_00.png", "001_00.png", "index.json"]
    assert [(r["step"], bool(r.get("val"))) for r in records(out)] == [(0, True), (1, False), (2, False), (2, True)]


# ------------------------------------------------------------------------------------ beyond the paper (issue 21)

def test_labels_of_a_step_follow_the_options(models, setup, tmp_path, monkeypatch):
    """--labels hard: each drawn pair's y is [h(w) > h(l)] of its own rewards; --label-temperature reaches the
    label sampler (its arithmetic is tests/test_rpo.py's); both are written in config.json."""
    from tests.test_methods import make_trainer
    from tinyrpo import rpo
    subject = setup[0]
    tr = make_trainer(models, subject, tmp_path / "hard", "rpo", "--labels", "hard")
    m, g = tr.method, torch.Generator().manual_seed(0)
    for _ in range(20):
        b = m.draw(g)
        h_w = m.h_w[b["i"], m.l_prompt[b["j"]]]
        assert torch.equal(b["y"], (h_w > m.h_l[b["j"]]).float())
    assert json.loads((tr.out / "config.json").read_text())["labels"] == "hard"
    seen = []
    monkeypatch.setattr(rpo, "sample_label", lambda h_w, h_l, generator=None, **kw: seen.append(kw) or h_w)
    tr = make_trainer(models, subject, tmp_path / "soft", "rpo", "--label-temperature", "0.1")
    tr.method.draw(torch.Generator().manual_seed(0))
    assert seen == [{"temperature": 0.1, "hard": False}]
    cfg = json.loads((tr.out / "config.json").read_text())
    assert (cfg["label_temperature"], cfg["labels"], cfg["refresh_negatives"]) == (0.1, "soft", 0)


def _pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("lora", [False, True])
def test_refreshed_negatives_are_the_policys(models, setup, tmp_path, lora):
    """--refresh-negatives K: once the weights moved, the set the next step draws from is the policy's (adapters
    on, with --lora) with prepare's recipe — equal to a direct generation of the policy at the same prompts and
    seeds, unlike the base set — and its rewards and latents are recomputed from those images."""
    from tests.test_methods import make_trainer
    from tinyrpo.method import encode_images
    from tinyrpo.pipeline import generate, to_pil
    tr = make_trainer(models, setup[0], tmp_path / "run", "rpo", "--refresh-negatives", "3", "--images-per-prompt",
                      "2", *(["--lora", "2"] if lora else []))
    m, cfg, g = tr.method, tr.cfg, torch.Generator().manual_seed(0)
    base_h, base_latents = m.h_l.clone(), m.l_latents.clone()
    m.draw(g)  # step 1: nothing to refresh
    assert torch.equal(m.h_l, base_h) and not (tr.out / "refresh").exists()
    with torch.no_grad():  # what training does to the trained weights (LoRA: the adapters, B = 0 until now)
        for p in tr.params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    m.steps_done = 2
    m.draw(g)
    assert not (tr.out / "refresh").exists()  # 2 is no multiple of K
    m.steps_done = 3
    tr.policy.train()  # as in training (after the first validation)
    m.draw(g)
    folder = tr.out / "refresh" / "step_00003"
    assert m.negatives_step == 3 and (folder / "index.json").exists()
    direct = to_pil(generate(tr.sd, tr.prompts, n=2, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed,
                             height=cfg.resolution, width=cfg.resolution, batch_size=cfg.gen_batch_size,
                             unet=tr.policy, progress=False)[0])
    refreshed, base = _pngs(folder), _pngs(tr.out / "negatives")
    assert len(refreshed) == len(direct) == 16
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(refreshed, direct))
    assert any(not np.array_equal(a, b) for a, b in zip(refreshed, base))
    want = tr.reward(direct, [tr.prompts[p] for p in range(8) for _ in range(2)], 0.0).reward.cpu()
    assert torch.allclose(m.h_l, want, atol=1e-6, rtol=0) and not torch.allclose(m.h_l, base_h, atol=1e-4)
    assert torch.tensor(json.loads((folder / "rewards.json").read_text())["negatives"]).allclose(want, atol=1e-6)
    assert torch.allclose(m.l_latents, encode_images(tr.sd.vae, direct, tr.device), atol=1e-6)
    assert not torch.allclose(m.l_latents, base_latents, atol=1e-4)
    assert tr.policy.training  # back to training mode after generating
    m.draw(g)  # the same step count again: no second refresh
    assert sorted(p.name for p in (tr.out / "refresh").iterdir()) == ["step_00003"]


@pytest.mark.parametrize("stop", [2, 3])
def test_refresh_resume_matches_uninterrupted(models, setup, tmp_path, stop):
    """Stopped at a refresh's step (2: the set of step 2 is not made yet) or after it (3: made, kept in the run
    folder, read back), then resumed: the same refreshed sets, weights and log as the uninterrupted run."""
    subject, prompts, _ = setup
    full, part = tmp_path / "full", tmp_path / "part"

    def run(out, steps, *more):
        return train.main(method_args(models, subject, out, "rpo", "--refresh-negatives", "2", "--images-per-prompt",
                                      "2", "--val-every", "2", "--lr", "1e-2", "--steps", str(steps), *more,
                                      prompts=prompts))
    assert run(full, 5) == 0
    assert sorted(p.name for p in (full / "refresh").iterdir()) == ["step_00002", "step_00004"]
    assert any(not np.array_equal(a, b) for a, b in zip(_pngs(full / "refresh" / "step_00004"), _pngs(full / "negatives")))
    assert run(part, stop) == 0
    assert (part / "refresh").exists() == (stop == 3)
    assert run(part, 5, "--resume") == 0
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(part / "last.pt", weights_only=True)
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    assert a["method"] == b["method"] == {"steps_done": 5, "negatives_step": 4}
    # the part run's last step is validated (as any run's is): the one record the uninterrupted run lacks at 3
    assert records(full) == [r for r in records(part) if not (r.get("val") and r["step"] == 3)]
    for step in ("step_00002", "step_00004"):
        assert all(np.array_equal(x, y) for x, y in zip(_pngs(full / "refresh" / step), _pngs(part / "refresh" / step)))
    assert json.loads((full / "summary.json").read_text())["seconds"]["refresh"] > 0
    with pytest.raises(UserError, match="refresh_negatives"):  # the schedule is the run's: a resume may not change it
        run(part, 6, "--resume", "--refresh-negatives", "3")


def test_a_resume_without_its_refreshed_set_is_refused(models, setup, tmp_path):
    """The set in use when last.pt was saved is read back, never remade with the later weights: missing, the
    resume stops with one line."""
    import shutil
    subject, prompts, _ = setup
    out = tmp_path / "run"
    args = method_args(models, subject, out, "rpo", "--refresh-negatives", "1", "--steps", "2", prompts=prompts)
    assert train.main(args) == 0
    shutil.rmtree(out / "refresh" / "step_00001")
    with pytest.raises(UserError, match=r"cannot resume from .*last.pt .*refresh/step_00001 is incomplete"):
        train.main(["--out", str(out), "--resume", "--steps", "3"])


@pytest.mark.parametrize("flags, message", [
    (["--label-temperature", "0"], "error: --label-temperature must be positive (got 0.0)"),
    (["--label-temperature", "nan"], "error: --label-temperature must be a finite number (got nan)"),
    (["--labels", "hard", "--label-temperature", "0.1"], "error: --label-temperature sets soft labels' sharpness"),
    (["--refresh-negatives", "-2"], "error: --refresh-negatives must be a number of steps, or 0 for never (got -2)"),
    (["--refresh-negatives", "5", "--no-pref"], "error: --refresh-negatives with --no-pref would remake negatives"),
])
def test_bad_values_beyond_the_paper_are_one_line(models, setup, tmp_path, flags, message):
    from tests.test_train import run_cli
    out = tmp_path / "run"
    r = run_cli(method_args(models, setup[0], out, "rpo", "--steps", "1", *flags))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message), r.stderr
    assert not out.exists()
