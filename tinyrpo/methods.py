"""The training methods of train.py --method, each in its own module next to its equations.

    rpo         Reward Preference Optimization (Miao et al. 2024)          tinyrpo/rpo.py
    dreambooth  DreamBooth with prior preservation (Ruiz et al. 2023)      tinyrpo/dreambooth.py
    dpg         look forward, deterministic policy gradient (Wei et al. 2024)  tinyrpo/dpg.py

`METHODS` maps a name to its class and imports the module on first use, so that `train.py --help` can list
the names without importing torch.
"""
import importlib
from collections.abc import Mapping

_WHERE = {"rpo": "tinyrpo.rpo:RPO", "dreambooth": "tinyrpo.dreambooth:DreamBooth", "dpg": "tinyrpo.dpg:LookForward"}


class _Registry(Mapping):
    def __getitem__(self, name):
        module, cls = _WHERE[name].split(":")
        return getattr(importlib.import_module(module), cls)

    def __iter__(self):
        return iter(_WHERE)

    def __len__(self):
        return len(_WHERE)


METHODS = _Registry()
NAMES = tuple(_WHERE)
