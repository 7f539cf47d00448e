"""The training methods of train.py --method, each in its own module next to its equations."""
from tinyrpo.rpo import RPO

METHODS = {m.name: m for m in (RPO,)}
