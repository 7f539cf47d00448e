"""DreamBench (Ruiz et al. 2023, google/dreambooth `dataset/`): subjects, classes and prompts.

The evaluation prompts are the official list, verbatim (`prompts_and_classes.txt`): `{0}` is the subject
token (e.g. "sks"), `{1}` the class noun. The RPO training prompts are the eight per set from the
RPO authors' code (Miao et al. 2024), written with the same placeholders.
"""

# subject folder name -> class noun (the official table)
SUBJECT_CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl", "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat",
    "clock": "clock", "colorful_sneaker": "sneaker", "dog": "dog", "dog2": "dog", "dog3": "dog",
    "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog", "duck_toy": "toy",
    "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon",
    "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}

# DreamBench treats cats and dogs as live subjects (they get the accessorization prompts).
LIVE_CLASSES = ("dog", "cat")

_RECONTEXTUALIZATION = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
_PROPERTY = [
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

# 20 recontextualization + 5 property prompts
OBJECT_PROMPTS = _RECONTEXTUALIZATION + [
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
] + _PROPERTY

# 10 recontextualization + 10 accessorization + 5 property prompts
LIVE_PROMPTS = _RECONTEXTUALIZATION + [
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
] + _PROPERTY

# RPO's training prompts: 8 per set, verbatim from the authors' code ("[V]" there is {0} here).
OBJECT_TRAIN_PROMPTS = [
    "a {0} {1} in Vincent Van Gogh rendition",
    "a {0} {1} on the Moon",
    "a green {0} {1}",
    "a {0} {1} with a China Great Wall in the background",
    "a {0} {1} on top of wooden roof",
    "a {0} {1} with the Statue of Liberty in the background",
    "a {0} {1} with a volcano in the background",
    "a {0} {1} on a subway platform",
]
LIVE_TRAIN_PROMPTS = [
    "a {0} {1} wearing a green outfit",
    "a {0} {1} in Vincent Van Gogh rendition",
    "a {0} {1} with a China Great Wall in the background",
    "a {0} {1} is swimming in a pool",
    "a {0} {1} on a subway platform",
    "a {0} {1} with the Statue of Liberty in the background",
    "a {0} {1} on the Moon",
    "a green {0} {1}",
]

REFERENCE_PROMPT = "a photo of {0} {1}"


def is_live(class_noun: str) -> bool:
    return class_noun in LIVE_CLASSES


def fill(templates, token: str, class_noun: str) -> list[str]:
    """Turn prompt templates into prompts for one subject."""
    return [t.format(token, class_noun) for t in templates]


def remove_token(prompt: str, token: str) -> str:
    """Drop the subject identifier from a prompt: CLIP has never seen "sks", so it must not be scored.

    "a sks dog on the beach" -> "a dog on the beach" (the class noun stays).
    """
    return " ".join(w for w in prompt.split() if w != token)
