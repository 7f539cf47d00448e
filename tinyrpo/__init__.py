"""tinyrpo: Reward Preference Optimization for Stable Diffusion v1, from scratch in plain PyTorch."""
from tinyrpo.errors import UserError

__all__ = ["UserError", "load_sd", "load_clip", "load_dino"]


def __getattr__(name):
    # The loaders pull in every network; import them lazily so `import tinyrpo` stays cheap.
    if name in ("load_sd", "load_clip", "load_dino"):
        from tinyrpo.formats import weights
        return getattr(weights, name)
    raise AttributeError(name)
