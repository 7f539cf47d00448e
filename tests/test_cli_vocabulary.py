"""One vocabulary of flags: every command's parser is walked, and one idea must have one spelling everywhere.

The spellings are tinyrpo/cli.py's table. A flag renamed to fit it stays one release as a hidden alias
(cli.DeprecatedAlias) that prints what to use instead; it must not show in --help as a flag of its own.
"""
import argparse
import re

import pytest

import sample
import train
from bench import gpu as bench_gpu
from bench import sample as bench_sample
from bench import train_step as bench_train_step
from bench import unet_forward as bench_unet_forward
from tinyrpo import cli, compare, download, evaluate, export, report
from tinyrpo.toy import __main__ as toy

COMMANDS = {
    "train.py": train.build_parser,
    "sample.py": sample.build_parser,
    "python -m tinyrpo.evaluate": evaluate.build_parser,
    "python -m tinyrpo.compare": compare.build_parser,
    "python -m tinyrpo.toy": toy.build_parser,
    "python -m tinyrpo.export": export.build_parser,
    "python -m tinyrpo.download": download.build_parser,
    "python -m tinyrpo.report": report.build_parser,
    "bench/unet_forward.py": bench_unet_forward.build_parser,
    "bench/sample.py": bench_sample.build_parser,
    "bench/train_step.py": bench_train_step.build_parser,
    "bench/gpu.py": bench_gpu.build_parser,
}

# idea -> (how its help or choices give it away, the one spelling). First match wins, so "validation images per
# prompt" is told apart from "images per prompt" before the latter is tried.
CONCEPTS = [
    ("denoising steps", lambda a: re.search(r"\b(DDIM|denoising|sampling|inference) steps\b", a.help), "--sample-steps"),
    ("training steps", lambda a: re.match(r"training steps\b", a.help), "--steps"),
    ("validation images per prompt", lambda a: re.search(r"\bvalidation images per\b", a.help),
     "--val-images-per-prompt"),
    ("images per prompt", lambda a: re.search(r"\bimages (generated )?per (training )?prompt\b", a.help),
     "--images-per-prompt"),
    ("images per U-Net pass", lambda a: re.search(r"\bimages per U-Net pass\b", a.help), "--gen-batch-size"),
    ("precision", lambda a: {"fp16", "fp32"} <= set(a.choices or ()), "--precision"),
    ("checkpoint choice", lambda a: set(a.choices or ()) == {"best", "last"}, "--select"),
]


def parsers():
    """(command name, parser) for every command and every subcommand."""
    for name, build in COMMANDS.items():
        p = build()
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", q) for sub, q in action.choices.items())


ALL = list(parsers())


def options(p):
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def concept_of(action) -> tuple[str, str] | None:
    for concept, match, spelling in CONCEPTS:
        if match(action):
            return concept, spelling
    return None


@pytest.mark.parametrize("name, parser", ALL, ids=[n for n, _ in ALL])
def test_one_spelling_per_idea_and_help_everywhere(name, parser):
    assert parser.formatter_class is cli.HelpFormatter, f"{name}: not on cli.HelpFormatter"
    for a in options(parser):
        flag = a.option_strings[0] if a.option_strings else a.dest
        if isinstance(a, cli.DeprecatedAlias):
            continue  # tested below
        if name.startswith("bench/") and a.help is argparse.SUPPRESS:
            continue  # a benchmark's flag for its own child process (--memory-child, --child)
        assert a.help and a.help is not argparse.SUPPRESS, f"{name} {flag}: no help text"
        found = concept_of(a)
        if found:
            concept, spelling = found
            assert a.option_strings == [spelling], f"{name}: {concept} is {a.option_strings}, should be {spelling}"
    # The old spellings that name two ideas live on only as aliases.
    for a in options(parser):
        if not isinstance(a, cli.DeprecatedAlias):
            assert not set(a.option_strings) & {"--n", "--dtype", "--select-best", "--no-early-stop"}, (name, a)
            if "--steps" in a.option_strings:
                assert re.match(r"training steps\b", a.help), f"{name}: --steps is training steps only"
            if "--batch-size" in a.option_strings:
                assert name == "train.py", f"{name}: images per U-Net pass are --gen-batch-size"


@pytest.mark.parametrize("name, parser", ALL, ids=[n for n, _ in ALL])
def test_aliases_are_hidden_and_point_to_the_new_flag(name, parser):
    text = parser.format_help()
    flags = text.replace(parser.epilog or "", "").replace(parser.description or "", "")  # not the examples
    for a in options(parser):
        if isinstance(a, cli.DeprecatedAlias):
            assert a.help is argparse.SUPPRESS and a.default is argparse.SUPPRESS
            assert not re.search(rf"{re.escape(a.option_strings[0])}\b(?!-)", flags), f"{name} shows {a.option_strings}"
            assert a.target in parser._actions and not isinstance(a.target, cli.DeprecatedAlias)
            found = concept_of(a.target)
            assert found is None or a.target.option_strings == [found[1]]
    for wrong in ("(default: True)", "(default: False)", "(default: None)", "(default: )"):
        assert wrong not in " ".join(text.split()), f"{name}: {wrong}"


def test_an_old_spelling_still_works_and_says_what_to_use(capsys):
    args = sample.build_parser().parse_args(["--prompt", "a dog", "--n", "2", "--steps", "3", "--dtype", "fp32",
                                             "--batch-size", "1"])
    assert (args.images_per_prompt, args.sample_steps, args.precision, args.gen_batch_size) == (2, 3, "fp32", 1)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {old} is now {new} (the old spelling goes in the next release)" for old, new in
                   (("--n", "--images-per-prompt"), ("--steps", "--sample-steps"), ("--dtype", "--precision"),
                    ("--batch-size", "--gen-batch-size"))]


def test_a_bench_old_spelling_still_works(capsys):
    args = bench_sample.build_parser().parse_args(["--steps", "5", "--dtype", "fp16"])
    assert (args.sample_steps, args.precision) == (5, "fp16")
    assert bench_unet_forward.build_parser().parse_args(["--dtype", "bf16"]).precision == "bf16"
    assert "note: --steps is now --sample-steps" in capsys.readouterr().err


def test_a_switch_alias_means_the_new_flag_with_its_value(capsys):
    args, given = train.parse_args(["--no-early-stop"])
    assert args.select == "last" and "select" in given
    assert capsys.readouterr().err.splitlines() == [
        "note: --no-early-stop is now --select last (the old spelling goes in the next release)"]  # once
    assert train.parse_args(["--select-best"])[0].select == "best"
    assert compare.parse_args(["--steps", "25"]).sample_steps == 25  # compare … --steps 25 -- --steps 400
