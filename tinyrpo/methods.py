"""The training methods of train.py --method, each in its own module next to its equations.

    rpo         Reward Preference Optimization (Miao et al. 2024)              tinyrpo/rpo.py
    dreambooth  DreamBooth with prior preservation (Ruiz et al. 2023)          tinyrpo/dreambooth.py
    dpg         look forward, deterministic policy gradient (Wei et al. 2024)  tinyrpo/dpg.py
    dco         Direct Consistency Optimization (Lee et al. 2024)              tinyrpo/dco.py

What a method is to the training loop: tinyrpo/method.py.
"""
from tinyrpo.dco import DCO
from tinyrpo.dpg import LookForward
from tinyrpo.dreambooth import DreamBooth
from tinyrpo.rpo import RPO

METHODS = {"rpo": RPO, "dreambooth": DreamBooth, "dpg": LookForward, "dco": DCO}
