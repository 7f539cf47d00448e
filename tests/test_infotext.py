"""tinyrpo.formats.infotext against AUTOMATIC1111's own rules (stable-diffusion-webui modules/infotext_utils.py): its
quote() decides which values are written as JSON strings, its parse_generation_parameters (tests/util.py's
parse_a1111: the same regex and unquote) must read every value back as it was."""
import json

import pytest

from tests.util import parse_a1111
from tinyrpo.formats.infotext import infotext, quote


def a1111_quote(text):
    """modules/infotext_utils.py, verbatim but for the name."""
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


VALUES = ["DDIM", "v1-5-pruned-emaonly", "a, b", "cat-lora: 0123456789ab", "C:\\models\\dog.safetensors",
          "two\nlines", 'say "hi", then go', "snow: ☃, ü", '"already quoted"', "no quote needed \"here\""]


@pytest.mark.parametrize("value", VALUES)
def test_quote_is_a1111s(value):
    assert quote(value) == a1111_quote(value)


def test_values_with_colons_commas_newlines_read_back():
    params = {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 3, "Size": "32x32", "Model hash": None,
              **{f"Field {i}": v for i, v in enumerate(VALUES[2:-2])}}
    text = infotext("a photo of sks dog, on: the beach", "blurry, low quality", params)
    assert text.split("\n")[-1] == (
        'Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 32x32, Field 0: "a, b", '
        'Field 1: "cat-lora: 0123456789ab", Field 2: "C:\\\\models\\\\dog.safetensors", Field 3: "two\\nlines", '
        'Field 4: "say \\"hi\\", then go", Field 5: "snow: ☃, ü"')  # written out by hand, as A1111 would
    parsed = parse_a1111(text)
    assert parsed["Prompt"] == "a photo of sks dog, on: the beach" and parsed["Negative prompt"] == "blurry, low quality"
    assert {k: v for k, v in parsed.items() if k.startswith("Field")} == \
        {f"Field {i}": v for i, v in enumerate(VALUES[2:-2])}
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Size"]) == ("20", "7.5", "32x32")
    assert "Model hash" not in parsed


def test_no_negative_prompt_line_without_one():
    text = infotext("a dog", "", {"Steps": 1, "Sampler": "DDIM", "Seed": 0})
    assert text == "a dog\nSteps: 1, Sampler: DDIM, Seed: 0"
