"""Experiment trackers: the trainer's scalars and validation grids, sent where the user watches runs.

`--log-with tensorboard` writes TensorBoard event files into RUN/tensorboard (open with
`tensorboard --logdir runs`); `--log-with none` (the default) sends nothing. The run folder's log.jsonl
and report.html are written either way: a tracker is a view, never the record.

The trainer holds one `Tracker` and calls

    tracker = make_tracker(cfg.log_with, run_dir, resume_step=start)   # start: 0, or the step resumed from
    tracker.log_records(records)              # the dicts it writes to log.jsonl (steps and validations)
    tracker.log_images(step, {"val/grid": grid})
    tracker.close()

`log_records` names a per-step record's numbers train/<key> (train/loss, train/l_sim, ..., whatever the
method logs), a validation record's val/<key> and the entries of its `exact` dict val/exact/<key>; lists
(Δ, labels, t of each pair) are not sent. TensorBoard is an optional extra (`pip install tensorboard`,
or `pip install -e ".[tensorboard]"`), imported only when asked for.
"""
import math
from pathlib import Path

from tinyrpo.errors import UserError

LOG_WITH = ("none", "tensorboard")


def numbers(record: dict, skip=("step", "val")) -> dict[str, float]:
    """The numeric scalars of a log record, nested dicts flattened to "a/b"; bools and lists left out."""
    out = {}
    for k, v in record.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            out |= {f"{k}/{kk}": vv for kk, vv in numbers(v, skip=()).items()}
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class Tracker:
    """Sends nothing: what `--log-with none` gets, and the interface every tracker implements."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def log_images(self, step: int, images: dict) -> None:
        """`images`: {tag: PIL image}."""

    def close(self) -> None:
        pass

    def log_records(self, records: list[dict]) -> None:
        for r in records:
            prefix = "val" if r.get("val") else "train"
            self.log_scalars(r["step"], {f"{prefix}/{k}": v for k, v in numbers(r).items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log-with tensorboard needs the tensorboard package: pip install tensorboard") from None
        # purge_step: on --resume, TensorBoard hides the events after the step we resume from (they are redone)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=30)

    def log_scalars(self, step, scalars):
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)

    def log_images(self, step, images):
        import numpy as np
        for tag, im in images.items():
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()  # a validation is rare and worth seeing at once

    def close(self):
        self.writer.close()


def make_tracker(log_with: str | None, run_dir, resume_step: int | None = None) -> Tracker:
    """The tracker `--log-with` names; TensorBoard's events go to run_dir/tensorboard."""
    if log_with in (None, "none"):
        return Tracker()
    if log_with == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard", resume_step)
    raise UserError(f"--log-with {log_with} is not available; choose one of {', '.join(LOG_WITH)}")
