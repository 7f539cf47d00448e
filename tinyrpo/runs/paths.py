"""Where the commands look for weights and data when no flag says otherwise: what `python -m tinyrpo.download`
writes, relative to the working directory (like its --dir). Constants only, so that train.py and sample.py can
name their defaults without importing the downloader."""
DEFAULT_DIR = "weights"
DEFAULT_SD = "weights/sd15"
DEFAULT_REWARD_CLIP = "weights/clip-vit-large-patch14"  # the reward model (image-text and image-image scores)
DEFAULT_EVAL_CLIP = "weights/clip-vit-base-patch32"  # evaluation: CLIP-T and CLIP-I
DEFAULT_DINO = "weights/dino-vits16"  # evaluation: DINO score
DEFAULT_REFS = "refs"  # DreamBench: refs/<subject>/*.jpg + refs/prompts_and_classes.txt
