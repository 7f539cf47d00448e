"""What the scripts print: seeds checked before use, --help without wrong defaults, commands with quoted paths."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import sample
from tests.fixtures import make_tiny_sd
from tinyrpo import compare, evaluate
from tinyrpo.errors import run_cli
from tinyrpo.formats import hub
from tinyrpo.pipeline import MAX_SEED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def run(capsys, main, args):
    """-> (exit code, stderr) of a script's main under run_cli, as `python script.py args` runs it."""
    try:
        run_cli(main, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def sample_args(sd, out, seed, prompts=("a dog",)):
    return [x for p in prompts for x in ("--prompt", p)] + [
        "--weights", sd, "--seed", seed, "--sample-steps", 1, "--images-per-prompt", 1, "--height", 16, "--width", 16, "--out", out,
        "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("seed, prompts", [(99999999999999999999, 1), (2**64, 1), (-1, 1), (MAX_SEED, 2)])
def test_seed_out_of_range_is_one_line(sd, tmp_path, capsys, seed, prompts):
    code, err = run(capsys, sample.main, sample_args(sd, tmp_path / "out", seed, ["a dog", "a cat"][:prompts]))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: --seed must be between 0 and") and str(seed) in err
    if prompts == 2:
        assert f"and {MAX_SEED - 1} (got" in err and "prompt p uses --seed + p" in err
    assert not (tmp_path / "out").exists()


def test_largest_seeds_work(sd, tmp_path, capsys):
    """The bound is exact: the last seed of the last prompt is 2**64 - 1, which torch accepts."""
    code, err = run(capsys, sample.main, sample_args(sd, tmp_path, MAX_SEED - 1, ["a dog", "a cat"]))
    assert code == 0, err
    assert len(list(tmp_path.rglob("*.png"))) == 4  # two images and two grids


def test_evaluate_checks_the_seed_of_its_last_prompt(capsys):
    code, err = run(capsys, evaluate.main, ["--subject", "refs/dog", "--seed", MAX_SEED - 10])
    assert code == 2 and f"between 0 and {MAX_SEED - 24}" in err and "25 prompts" in err, err


@pytest.mark.parametrize("script", ["sample.py"])
def test_help_has_no_wrong_defaults_and_examples_on_lines(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps help text anywhere
    for wrong in ("(default: True)", "(default: False)", "(default: None)", "(default: )"):
        assert wrong not in text, wrong
    assert "--no-progress hide the progress bar" in text  # a switch: no default to show
    assert "--sample-steps SAMPLE_STEPS denoising steps (default: 50)" in text
    # every option's help says its default at most once
    options = re.split(r"\s(?=--[a-z])", r.stdout.split("options:")[1].split("examples:")[0])
    assert all(o.count("default") <= 1 for o in options), [o for o in options if o.count("default") > 1]
    examples = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("python sample.py")]
    assert len(examples) == 7 and all(shlex.split(e.split("#")[0])[:2] == ["python", "sample.py"] for e in examples)


def command_in(message: str) -> list[str]:
    """The command between backticks in a message, as a shell would split it."""
    return shlex.split(re.search(r"`([^`]+)`", message)[1])


def test_printed_commands_quote_paths():
    m = hub.missing_weights_message("clip-l14", "/data/my weights/clip-vit-large-patch14", flag="--reward-model")
    assert command_in(m) == ["python", "-m", "tinyrpo.download", "clip-l14", "--dir", "/data/my weights"]
    m = hub.missing_weights_message("dreambench", "/data/my refs")
    assert command_in(m) == ["python", "-m", "tinyrpo.download", "dreambench", "--refs", "/data/my refs"]


def test_evaluate_hint_quotes_paths(tmp_path, capsys, sd):
    subject = tmp_path / "my refs" / "dog"
    subject.mkdir(parents=True)
    missing = tmp_path / "my weights" / "dino-vits16"
    code, err = run(capsys, evaluate.main, ["--subject", subject, "--dino", missing, "--eval-clip", tmp_path,
                                           "--weights", sd])
    assert code == 2, err
    assert command_in(err) == ["python", "-m", "tinyrpo.download", "dino", "--dir", str(tmp_path / "my weights")]
    code, err = run(capsys, compare.main, ["--dreambench", tmp_path / "my refs" / "none"])
    assert command_in(err)[-2:] == ["--refs", str(tmp_path / "my refs" / "none")]


def test_single_file_advice_quotes_its_path(tmp_path, capsys, sd):
    folder = tmp_path / "my models"
    make_tiny_sd(folder, layout="single")
    code, err = run(capsys, sample.main, sample_args(sd, tmp_path / "out", 0)[:-3] + ["--weights", folder])
    assert code == 2 and "pass --weights" in err, err
    path = shlex.split(err.split("pass --weights ")[1])[0]
    assert Path(path) == folder / "tiny-sd-v1.safetensors"
