"""bench/gpu.py --dry-run: the GPU report's code at tiny sizes on the CPU, so that it cannot break unnoticed.

The figures themselves come from a run on a lent GPU (bench/README.md). Here every section runs through the
same code (the Triton kernels under TRITON_INTERPRET=1, diffusers on the tiny weights, the real Trainer and
loaders), and the report must hold every section and item with numbers that make sense; a section cut off
by its time limit must still leave a report.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tinyrpo.formats.checkpoint import BEST, LAST

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["machine", "kernels", "train", "sample", "fullrun", "variants"]


def gpu_py(out: Path, *flags):
    return subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--device", "cpu", "--out", str(out),
                           "--scratch", str(out.parent / "scratch"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "report"
    r = gpu_py(out)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), r, out


def items(report, section):
    return report["sections"][section]["items"]


def finite_positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_every_section_and_item_ran(dry):
    report, md, r, out = dry
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        for item, rec in section["items"].items():
            # On a CPU, SDPA's efficient and cuDNN kernels do not exist: reported as such, not as failures.
            allowed = {"ok", "unsupported"} if ("efficient" in item or "cudnn" in item) else {"ok"}
            assert rec["status"] in allowed, (name, item, rec)
    assert report["dry_run"] and report["finished"] and report["elapsed_s"] < report["deadline_s"]
    assert not (out.parent / "scratch").exists() or not any((out.parent / "scratch").iterdir())  # cleaned up
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_kernels_match_the_reference(dry):
    k = items(dry[0], "kernels")
    cases = {n: v for n, v in k.items() if n.startswith(("rpo_loss", "weighted_mse"))}
    assert len(cases) == 8  # 2 sizes × fp32/bf16 × 2 ops
    for name, v in cases.items():
        assert v["pass"] is True and 0 <= v["rel_err"] < 1e-5, name
        assert v["grad_err"] < (1.0 if "bf16" in name else 1e-5), name
    compiled = k["torch.compile(fullgraph=True)"]
    assert compiled["pass"] and compiled["backend"] == "aot_eager" and compiled["rel_err"] < 1e-5
    timing = next(v for n, v in k.items() if n.startswith("time rpo_loss"))
    assert finite_positive(timing["fused_us"], timing["reference_us"])


def test_train_step_figures(dry):
    t = items(dry[0], "train")
    assert list(t) == ["eager", "eager + gradient checkpointing", "eager + LoRA r16", "compiled",
                       "compiled + gradient checkpointing", "compiled + LoRA r16"]
    for name, v in t.items():
        assert finite_positive(v["ms"], v["tflops"], v["mfu_matmul_pct"], v["first_step_s"]), name
        assert v["min_ms"] <= v["ms"] <= v["max_ms"]
    # Same weights and the same draws: checkpointing and compiling change no value, and a LoRA policy starts
    # as the base (B = 0) with the reference being that same base, so its first loss is the full step's too.
    losses = [v["loss1"] for v in t.values()]
    assert max(losses) - min(losses) < 1e-5
    full, lora = t["eager"]["trainable_m"], t["eager + LoRA r16"]["trainable_m"]
    assert 0 < lora < full / 10
    info = dry[0]["sections"]["train"]["info"]
    assert info["step_tflop"] == pytest.approx(8 * info["F_tflop"])  # one pair: 3·2F + 2F


def test_sample_figures(dry):
    s = items(dry[0], "sample")
    for name in ("tinyrpo eager", "diffusers eager", "tinyrpo compiled", "diffusers compiled"):
        assert finite_positive(s[name]["s_per_image"], s[name]["ms_per_step"]), name
    pairs = s["images agree"]["pairs"]
    assert len(pairs) == 3
    for name, p in pairs.items():  # fp32 on the CPU: the same image
        assert p["agree"] and p["max_255"] < 0.5, name


def test_full_run_figures(dry):
    runs = items(dry[0], "fullrun")
    run = runs["default RPO run"]
    assert run["steps_run"] == 4
    assert {"load", "negatives", "rewards", "train", "validation", "total"} <= run["phases_s"].keys()
    assert {BEST, LAST, "summary.json", "log.jsonl", "config.json"} <= run["top_level_files_mib"].keys()
    lora = runs["default RPO run, LoRA r16"]  # train.py --lora 16: adapters and their AdamW state only
    assert lora["steps_run"] == 4 and lora["top_level_files_mib"][LAST] < run["top_level_files_mib"][LAST] / 5
    # Everything in the run folder was written by the run, and write() saw at least those bytes.
    assert 0 < run["run_folder_gib"] <= run["wchar_gib"]
    assert run["phases_s"]["total"] <= run["total_s"]
    assert finite_positive(items(dry[0], "fullrun")["write random weights (fp16 files)"]["weights_gib"])


def test_variants_figures(dry):
    v = items(dry[0], "variants")
    assert v["train: SDPA default"]["vs_baseline"] == 1.0 and v["forward: eager"]["vs_baseline"] == 1.0
    for name in ("train: SDPA math", "train: channels_last", "forward: SDPA math", "forward: channels_last",
                 "forward: compile default", "forward: compile reduce-overhead",
                 "forward: compile max-autotune-no-cudagraphs"):
        assert finite_positive(v[name]["ms"], v[name]["vs_baseline"]), name


def test_markdown_report(dry):
    report, md, r, out = dry
    for title in ("## Targets", "## Machine", "## 1. Triton kernels", "## 2. RPO train step", "## 3. Text-to-image",
                  "## 4. Full default RPO run", "## 5. Variants"):
        assert title in md
    assert "DRY RUN" in md and "| train step MFU, bf16 |" in md
    assert [t["target"] for t in report["targets"]] == [
        "train step MFU, bf16", "peak memory, batch-1 step, reference resident", "512 px 50-step sample",
        "full default run"]
    assert all(t["met"] is None for t in report["targets"])  # tiny sizes: no verdicts
    assert "## Targets" in r.stdout  # the console ends with the short version


def test_a_section_cut_off_still_leaves_its_report(tmp_path):
    out = tmp_path / "report"
    # The sample section imports diffusers and transformers first: seconds, so a 1.5 s limit cuts it off.
    r = gpu_py(out, "--sections", "sample,variants", "--budget", "machine=1", "--budget", "sample=0.5",
               "--budget", "variants=0")
    assert r.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["sections"]["machine"]["status"] == "ok"
    assert report["sections"]["sample"]["status"].startswith("cut off at its time limit")
    # each item finished, was killed at the limit, or (when the imports were fast) was skipped for lack of time
    items = report["sections"]["sample"].get("items", {}).values()
    assert all(i["status"] in ("ok", "killed") or i["status"] == "skipped" and "left in this section" in i["why"]
               for i in items)
    assert report["sections"]["variants"]["status"] == "skipped: its budget is under 1 s"
    assert "cut off at its time limit" in (out / "report.md").read_text()


def test_bad_arguments():
    r = subprocess.run([sys.executable, "bench/gpu.py", "--sections", "kernels,warp"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown section(s) warp" in r.stderr
