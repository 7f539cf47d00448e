"""train.py end to end with every method and the RPO ablations, and resume equal to the uninterrupted run."""
import json

import pytest
import torch

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
