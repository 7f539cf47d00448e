"""--log-with: TensorBoard events read back with TensorBoard's own reader; the no-op tracker; user errors."""
import io
import sys

import numpy as np
import pytest
from PIL import Image

from tinyrpo.errors import UserError
from tinyrpo.runs.tracking import Tracker, make_tracker, numbers

STEPS = [{"step": s, "loss": 1.0 / s, "l_sim": 0.5 / s, "l_pref": 0.69 + s, "grad_norm": 2.0 * s,
          "delta": [0.1, 0.2], "label": [1, 0], "t": [10, 20]} for s in (1, 2, 3, 4)]
VALS = [{"step": s, "val": True, "reward": 0.6 + s / 100, "align_i": 0.9, "align_t": 0.5 - s / 100,
         "exact": {"identity": s / 10, "fidelity": 1 - s / 10}} for s in (0, 2, 4)]


def read_events(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_numbers_of_a_record():
    assert numbers(VALS[1]) == {"reward": 0.62, "align_i": 0.9, "align_t": 0.48, "exact/identity": 0.2,
                                "exact/fidelity": 0.8}
    assert numbers({"step": 3, "loss": 1, "ok": True, "nan": float("nan"), "t": [1]}) == {"loss": 1.0}


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the [tensorboard] extra (also in [test])")
    rng = np.random.default_rng(0)
    grid = Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    with make_tracker("tensorboard", tmp_path) as tracker:
        tracker.log_records([VALS[0], STEPS[0], STEPS[1], VALS[1], STEPS[2], STEPS[3], VALS[2]])
        tracker.log_images(2, {"val/grid": grid})
    acc = read_events(tmp_path / "tensorboard")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/l_sim", "train/l_pref", "train/grad_norm", "val/reward",
                                    "val/align_i", "val/align_t", "val/exact/identity", "val/exact/fidelity"}
    for key in ("loss", "l_sim", "l_pref", "grad_norm"):
        assert scalars(acc, f"train/{key}") == [(r["step"], pytest.approx(r[key])) for r in STEPS]
    assert scalars(acc, "val/reward") == [(v["step"], pytest.approx(v["reward"])) for v in VALS]
    assert scalars(acc, "val/exact/fidelity") == [(v["step"], pytest.approx(v["exact"]["fidelity"])) for v in VALS]
    assert tags["images"] == ["val/grid"]
    (event,) = acc.Images("val/grid")
    assert event.step == 2 and (event.width, event.height) == grid.size
    decoded = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(grid))            # the grid itself, lossless


def test_tensorboard_resume_hides_redone_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the [tensorboard] extra (also in [test])")
    with make_tracker("tensorboard", tmp_path) as tracker:    # a run that died after logging step 4 ...
        tracker.log_records(STEPS)
    with make_tracker("tensorboard", tmp_path, resume_step=2) as tracker:  # ... resumed from last.pt at 2
        tracker.log_records([r | {"loss": 10.0 * r["step"]} for r in STEPS[2:]])
    acc = read_events(tmp_path / "tensorboard")
    assert scalars(acc, "train/loss") == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]


def test_no_tracker_and_mistakes(tmp_path, monkeypatch):
    tracker = make_tracker("none", tmp_path)
    assert type(tracker) is Tracker and make_tracker(None, tmp_path).__class__ is Tracker
    tracker.log_records(STEPS + VALS)
    tracker.log_images(0, {"val/grid": Image.new("RGB", (4, 4))})
    tracker.close()
    assert list(tmp_path.iterdir()) == []                                  # nothing written
    with pytest.raises(UserError, match="--log-with wandb is not available; choose one of none, tensorboard"):
        make_tracker("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if tensorboard were not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        make_tracker("tensorboard", tmp_path)
