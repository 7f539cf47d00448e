"""The comparison runner: the table by hand, the cells of each method, interrupted and resumed, and under torchrun
with two gloo processes giving the same table as one process."""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_evaluate import make_subject, models  # noqa: F401  (models is a fixture)
from tinyrpo import evaluate
from tinyrpo.compare import main
from tinyrpo.errors import UserError
from tinyrpo.evaluation import comparison
from tinyrpo.evaluation.comparison import Cell, PUBLISHED, comparison_markdown, mean_std, method_args, plan, shard, summarize
from tinyrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RES = 32


# ------------------------------------------------------------------------------------------ pure functions

def test_plan_and_round_robin_shards():
    cells = plan(["rpo", "dreambooth"], [Path("a/dog"), Path("b/can")], [0, 1])
    assert [c.label() for c in cells[:3]] == ["rpo/dog/seed0", "rpo/dog/seed1", "rpo/can/seed0"]
    assert cells[0].run == Path("rpo/dog/seed0")
    parts = [shard(cells, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 2]
    assert sorted((c.label() for p in parts for c in p)) == sorted(c.label() for c in cells)  # each cell once


def test_shard_deals_cell_i_to_rank_i_mod_world():
    """The dealing itself, written out: cell i to rank i mod world, in order, so with two ranks each gets every
    method's cells in turn (not the first or the second half of the plan)."""
    assert [shard(list("abcdefg"), r, 3) for r in range(3)] == [list("adg"), list("be"), list("cf")]
    assert shard(list("abc"), 0, 1) == list("abc")
    assert [shard(list("ab"), r, 4) for r in range(4)] == [["a"], ["b"], [], []]  # more ranks than cells
    cells = plan(["rpo", "dreambooth", "dpg"], [Path("dog")], [0, 1])
    assert [c.label() for c in shard(cells, 1, 2)] == ["rpo/dog/seed1", "dreambooth/dog/seed1", "dpg/dog/seed1"]


def test_table_by_hand():
    def cell(method, subject, seed, dino, clip_t, exact=None):
        e = {"dino": dino, "clip_i": 0.8, "clip_t": clip_t, "align_i": 0.9, "align_t": 0.6, "harmonic": 0.7}
        return {"method": method, "subject": subject, "seed": seed, "run": f"{method}/{subject}/seed{seed}",
                "eval": e | ({"exact/identity": exact} if exact is not None else {})}
    cells = [cell("rpo", "dog", 0, 0.6, 0.30, 1.0), cell("rpo", "dog", 1, 0.7, 0.32, 0.0),
             cell("rpo", "can", 0, 0.8, 0.34, 0.5), cell("dreambooth", "dog", 0, 0.5, 0.28)]
    metrics, table = summarize(["rpo", "dreambooth"], cells)
    assert metrics == ["dino", "clip_i", "clip_t", "harmonic", "exact/identity"]  # align_* are CLIP-I/T, rescaled
    rpo, db = table
    assert rpo["dino"]["mean"] == pytest.approx(0.7) and rpo["dino"]["n"] == 3
    assert rpo["dino"]["std"] == pytest.approx(0.1)  # sample std of 0.6, 0.7, 0.8
    assert rpo["exact/identity"] == pytest.approx({"mean": 0.5, "std": 0.5, "n": 3})
    assert db["dino"] == {"mean": 0.5, "std": 0.0, "n": 1} and "exact/identity" not in db
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    data = {"methods": ["rpo", "dreambooth"], "subjects": ["dog", "can"], "seeds": [0, 1], "metrics": metrics,
            "cells": cells, "table": table, "published": PUBLISHED, "lambda_val": 0.5}
    md = comparison_markdown(data)
    assert "| **rpo** | 0.700 ± 0.100 (3) | 0.800 ± 0.000 (3) | 0.320 ± 0.020 (3) | 0.700 ± 0.000 (3) | " \
           "0.500 ± 0.500 (3) |" in md
    assert "| DreamBooth, SD (DreamBooth, Table 1) | 0.668 | 0.803 | 0.305 | – | – |" in md
    assert "| RPO, λ_val = 0.5 (Miao et al., Table 1) | – | 0.833 | 0.314 | – | – |" in md
    assert "| DreamBooth + look forward (Wei et al.) | 0.738 | 0.797 | 0.269 | – | – |" in md


def test_each_method_gets_its_own_options():
    args = ["--lr", "1e-4", "--beta", "2", "--no-pref", "--num-class-images=3", "--gamma", "0.99", "--steps", "5"]
    assert method_args(args, "rpo") == ["--lr", "1e-4", "--beta", "2", "--no-pref", "--steps", "5"]
    assert method_args(args, "dreambooth") == ["--lr", "1e-4", "--num-class-images=3", "--steps", "5"]
    assert method_args(args, "dpg") == ["--lr", "1e-4", "--num-class-images=3", "--gamma", "0.99", "--steps", "5"]
    argv = comparison.train_argv(Cell("dpg", Path("refs/dog"), 2), Path("out/dpg/dog/seed2"), args, {"--device": "cpu"})
    assert argv[:10] == ["--subject", "refs/dog", "--out", "out/dpg/dog/seed2", "--method", "dpg", "--seed", "2",
                         "--device", "cpu"]


@pytest.mark.parametrize("case", ["method", "seeds", "per_cell_flag", "foreign_option", "no_subjects",
                                  "missing_subject"])
def test_user_errors(tmp_path, case):
    subject = make_subject(tmp_path / "dog", n=2)
    args = ["--subjects", str(subject), "--methods", "rpo,dreambooth", "--eval-clip", str(tmp_path), "--dino",
            str(tmp_path)]
    expect = {"method": "--methods: dreamboat", "seeds": "--seeds takes integers", "per_cell_flag": "--seed for train.py",
              "foreign_option": "--gamma is not a setting of rpo or dreambooth", "no_subjects": "pass --subjects",
              "missing_subject": "does not exist"}[case]
    if case == "method":
        args[3] = "rpo,dreamboat"
    elif case == "seeds":
        args += ["--seeds", "0,one"]
    elif case == "per_cell_flag":
        args += ["--", "--seed", "3"]
    elif case == "foreign_option":
        args += ["--", "--gamma", "0.9"]
    elif case == "no_subjects":
        args = args[2:]
    elif case == "missing_subject":
        args[1] += "," + str(tmp_path / "cat")
    with pytest.raises(UserError, match=expect):
        main(args)


def test_evaluate_dreambench_names_the_runner(capsys):
    """`evaluate --dreambench` (the older spelling) says which tinyrpo.compare command runs it, and runs nothing."""
    with pytest.raises(UserError) as e:
        evaluate.main(["--dreambench", "refs", "--subjects", "dog", "--sample-steps", "10", "--", "--lr", "1e-4",
                       "--method", "dreambooth", "--seed=3"])
    assert shlex.split(re.search(r"`([^`]+)`", str(e.value))[1]) == [
        "python", "-m", "tinyrpo.compare", "--dreambench", "refs", "--subjects", "dog", "--sample-steps", "10", "--out",
        "runs/dreambench", "--methods", "dreambooth", "--seeds", "3", "--", "--lr", "1e-4"]


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_subject"])
def test_dreambench_user_errors(tmp_path, case):
    root = tmp_path / "refs"
    (root / "my_photos").mkdir(parents=True)  # not a DreamBench subject: ignored
    if case != "empty":
        make_subject(root / "dog", n=2)
    args = ["--dreambench", str(root if case != "missing" else tmp_path / "nowhere"), "--eval-clip", str(tmp_path),
            "--dino", str(tmp_path)]
    expect = {"missing": "python -m tinyrpo.download dreambench", "empty": "python -m tinyrpo.download dreambench",
              "unknown_subject": "cat2 not found"}[case]
    if case == "unknown_subject":
        args += ["--subjects", "dog,cat2"]
    with pytest.raises(UserError, match=expect):
        main(args)


# ------------------------------------------------------------------------------------------ end to end

def comparison_args(models, root, out):
    prompts = root / "prompts.txt"
    prompts.write_text("a [V] {cls} on the beach\n")
    return ["--methods", "rpo,dreambooth", "--subjects", f"{root / 'dog'},{root / 'backpack'}", "--seeds", "0",
            "--out", str(out), "--weights", str(models["sd"]), "--eval-clip", str(models["clip"]),
            "--dino", str(models["dino"]), "--sample-steps", "1", "--images-per-prompt", "1", "--gen-batch-size", "25",
            "--device", "cpu", "--no-progress", "--",
            "--reward-model", str(models["clip"]), "--prompts", str(prompts), "--resolution", str(RES),
            "--sample-steps", "1", "--val-images-per-prompt", "1", "--steps", "2", "--val-every", "2",
            "--save-every", "1", "--lr", "1e-3", "--images-per-prompt", "1", "--num-class-images", "2"]


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    """One process: interrupted in the third cell's training (after last.pt at step 1), then resumed."""
    root = tmp_path_factory.mktemp("compare")
    make_subject(root / "dog", seed=0)
    make_subject(root / "backpack", seed=5)
    out = root / "single"
    args = comparison_args(models, root, out)
    save_last = Trainer.save_last

    def interrupting(self, step):
        save_last(self, step)
        if self.cfg.method == "dreambooth" and step == 1:
            raise KeyboardInterrupt
    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "save_last", interrupting)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    mp.undo()
    done = [p.parent.parent for p in out.rglob("eval/eval.json")]
    assert sorted(str(p.relative_to(out)) for p in done) == ["rpo/backpack/seed0", "rpo/dog/seed0"]
    return root, out, args


def test_runner_resumes_and_writes_the_table(single, capsys):
    root, out, args = single
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[ 1/4] rpo/dog/seed0: done before, skipped" in printed
    assert f"resuming {out / 'dreambooth' / 'dog' / 'seed0'} at step 1" in printed
    assert "[ 4/4] dreambooth/backpack/seed0: DINO" in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["methods"] == ["rpo", "dreambooth"] and data["subjects"] == ["dog", "backpack"] and data["seeds"] == [0]
    assert data["metrics"][:4] == ["dino", "clip_i", "clip_t", "harmonic"] and data["published"] == PUBLISHED
    for c in data["cells"]:  # each cell's numbers are its eval.json's, and its run is the train.py run folder
        e = json.loads((out / c["run"] / "eval" / "eval.json").read_text())["overall"]
        assert c["eval"]["dino"] == e["dino"] and c["eval"]["clip_t"] == e["clip_t"]
        cfg = json.loads((out / c["run"] / "config.json").read_text())
        assert (cfg["method"], cfg["seed"], cfg["steps"]) == (c["method"], c["seed"], 2)
        assert ("num_class_images" in cfg) == (c["method"] == "dreambooth")  # each method its own options
    for row in data["table"]:
        vals = [c["eval"]["clip_i"] for c in data["cells"] if c["method"] == row["method"]]
        assert row["clip_i"] == pytest.approx(mean_std(vals))
    assert (out / "compare.md").read_text() in printed
    assert "rpo" in (out / "report.html").read_text()
    # a finished comparison: every cell skipped, nothing rewritten but the table
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")}
    assert main(args) == 0
    assert "done before, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")} == stamps


def test_torchrun_two_processes_give_the_same_table(single):
    root, out, args = single
    if not (out / "compare.json").exists():
        main(args)
    two = root / "two"
    args = [a if a != str(out) else str(two) for a in args]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "tinyrpo.compare", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 0] [ 1/2] rpo/dog/seed0" in r.stdout and "[rank 1] [ 1/2] rpo/backpack/seed0" in r.stdout
    a, b = (json.loads((d / "compare.json").read_text()) for d in (out, two))
    assert b["ranks"] == 2 and a["ranks"] == 1
    assert a["table"] == b["table"] and a["cells"] == b["cells"]
