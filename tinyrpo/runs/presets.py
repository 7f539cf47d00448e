"""A subject folder's own settings: subject.json names the models a subject belongs with and a preset for them.

    {"weights": {"sd": base model, "clip": reward model, "dino": look forward's DINO},
     "resolution": pixels,
     "train_defaults": {any train.py setting: value}, ...}

The toy world's subjects (refs/toy, refs/ball) carry their tiny models and a CPU-sized preset this way; flags
given on the command line win. The file is read the way flags are: an unknown key (a typo) or a value of the
wrong type is one line naming the key (and, for a typo, the nearest valid one), not a silent default.
"""
import difflib
import json
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path

from tinyrpo.data import read_subject_file
from tinyrpo.errors import UserError
from tinyrpo.methods import METHODS

# What a subject.json may hold (tinyrpo.data reads the prompts, the class and the exact_metrics scorer; the toy
# world's "world" and "toy" are its truth, tinyrpo/toy/metrics.py); anything else is a typo the user must hear
# about.
SUBJECT_KEYS = ("world", "class_noun", "live", "train_prompts", "eval_prompts", "resolution", "weights",
                "train_defaults", "exact_metrics", "toy")
SUBJECT_WEIGHTS = ("sd", "clip", "dino")
NOT_PRESETS = ("subject", "out", "resume", "options")  # what a subject's train_defaults cannot set


def subject_defaults(cfg, given: set[str]):
    """A subject folder's subject.json may name the models it belongs with and the settings that suit them
    (the toy world's subjects do: its tiny models, 32 px, a CPU-sized preset); flags given win.

        "weights": {"sd": base model, "clip": reward model, "dino": look forward's DINO}
        "resolution": pixels
        "train_defaults": {any train.py setting: value}

    An unknown key (a typo) or a value of the wrong type is refused, naming the key.
    """
    meta = read_subject_file(cfg.subject) if Path(cfg.subject).is_dir() else {}
    where = Path(cfg.subject) / "subject.json"
    named = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    presets = meta.get("train_defaults") or {}
    settings = setting_types(type(cfg))
    _check_keys(where, "", meta, SUBJECT_KEYS)
    _check_keys(where, "weights.", named, SUBJECT_WEIGHTS)
    for key, kind in (("weights", dict), ("train_defaults", dict), ("resolution", int)):
        if key in meta and not _is(meta[key], kind):
            raise UserError(f"{where}: {key} must be {_kind_name(kind)} (got {json.dumps(meta[key])}); fix it")
    for key, path in named.items():
        if not isinstance(path, str):
            raise UserError(f"{where}: weights.{key} must be a path (a string) (got {json.dumps(path)}); fix it")
    _check_keys(where, "train_defaults.", presets, settings)
    for key, value in presets.items():
        if not _is(value, settings[key]):
            raise UserError(f"{where}: train_defaults.{key} must be {_kind_name(settings[key])} "
                            f"(got {json.dumps(value)}); fix it")
    defaults = {"weights": named.get("sd"), "reward_model": named.get("clip"), "dino": named.get("dino"),
                "resolution": meta.get("resolution")} | dict(presets)
    defaults = {k: v for k, v in defaults.items() if v is not None and k not in given}
    shared = {f.name for f in fields(cfg)} - set(NOT_PRESETS)
    method = METHODS[defaults.get("method", cfg.method) if "method" not in given else cfg.method]
    own = {f.name for f in fields(method.Options)}
    values = asdict(cfg) | {k: v for k, v in defaults.items() if k in shared}
    values["options"] = {k: v for k, v in defaults.items() if k in own} | cfg.options
    cfg = type(cfg)(**values)
    cfg.validate()
    return cfg


def setting_types(config_class) -> dict:
    """Every setting a subject's train_defaults may hold -> its type: the shared ones and every method's own
    (a preset may carry RPO's β and still be used with --method dreambooth, which ignores it)."""
    out = {f.name: f.type for f in fields(config_class) if f.name not in NOT_PRESETS}
    for name in METHODS:
        out |= {f.name: f.type for f in fields(METHODS[name].Options)}
    return out


def _check_keys(where, prefix: str, d: dict, valid) -> None:
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{near[0]}?" if near else f"valid keys: {', '.join(sorted(valid))}"
            raise UserError(f"{where}: unknown key {prefix}{key}; {hint} (fix it or remove it)")


def _is(value, kind) -> bool:
    """isinstance for the settings' annotations (int, float | None, str, ...); an int is a float, a bool is no
    number."""
    kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        return type(None) in kinds
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, k) or (k is float and isinstance(value, int)) for k in kinds if k is not type(None))


def _kind_name(kind) -> str:
    kinds = [k for k in (typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,))
             if k is not type(None)]
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "an object {...}"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
