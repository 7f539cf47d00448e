"""The toy world: a procedural world of 32×32 pictures with exact truth, and a tiny Stable Diffusion, CLIP
and DINO of tinyrpo's own pretrained on it, so the whole method runs on a laptop CPU in minutes and its
claims can be measured exactly.

    world.py     pictures, captions and their truth (seeded)
    metrics.py   reading a picture back; identity (pattern), body, fidelity, leak; the quality rates
    subjects.py  the two subjects and their folders (refs/toy, refs/ball)
    models.py    the toy networks' sizes and the public layouts they are written in
    pretrain.py  VAE, CLIP, U-Net, DINO pretraining (python -m tinyrpo.toy pretrain)
    quality.py   the held-out quality check of the toy SD (python -m tinyrpo.toy quality)
"""
