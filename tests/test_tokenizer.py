"""tinyrpo's CLIP tokenizer against transformers' CLIPTokenizer, the one diffusers' SD pipelines use.

transformers 5.23's CLIPTokenizer is a `tokenizers`-backed ("fast") tokenizer only: NFC, whitespace
runs -> " ", lowercase, CLIP's split regex, byte-level BPE. It never calls ftfy or html.unescape (OpenAI's
simple_tokenizer.py does both), so "&amp;" or mojibake tokenize differently from OpenAI's original; the
reference here is transformers, and every string below, exotic ones included, must give identical ids.
"""
import gzip

import pytest
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from tinyrpo.dreambench import (LIVE_PROMPTS, OBJECT_PROMPTS, REFERENCE_PROMPT, SUBJECT_CLASSES,
                                fill)
from tinyrpo.tokenizer import (CONTEXT_LENGTH, END_ID, START_ID, VENDORED_BPE, CLIPTokenizer,
                               bytes_to_unicode)

HARD_STRINGS = [
    "",
    "   ",
    "A PHOTO of SKS Dog",
    "MiXeD CaSe, With Punctuation!!! And... ellipses?!",
    "don't it's we're they've I'm you'll he'd DON'T IT'S",
    "the dog's ball, the dogs' balls, 'quoted' \"double\"",
    "café naïve résumé coöperate",
    "cafe\u0301 (e + combining acute, NFC makes it é)",
    "İstanbul STRASSE straße ǅ ΣΊΣΥΦΟΣ",
    "東京の猫 一只狗在雪地里 한국어 문장",
    "emoji 🐶🐱 and a family 👩\u200d👩\u200d👧 and flags 🇫🇷",
    "   leading and trailing whitespace   ",
    "repeated     spaces\tand\ttabs\nand\nnewlines\r\n",
    "\u00a0no-break\u00a0space and ideographic\u3000space",
    "numbers 123 4567.89 1,000,000 3rd 2nd v1.5 0x1F",
    "dashes-and_underscores/slashes\\back (brackets) [square] {curly}",
    "a <|endoftext|> in the middle and <|startoftext|> too",
    "<|STARTOFTEXT|> uppercase specials are not special",
    "html &amp; entities &lt;b&gt; stay as typed",
    "fullwidth Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ and ligature ﬁne",
    "arabic النص العربي and hindi नमस्ते दुनिया",
    "control\x00char\x07s and zero\u200bwidth",
    "~!@#$%^&*()_+`-=|;:<>,.?/ all the punctuation",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a " + "very " * 100 + "long prompt",  # > 77 tokens: truncated, last id stays <|endoftext|>
    "😀" * 60,  # each emoji is several byte-level tokens
]


def dreambench_prompts() -> list[str]:
    """All 50 DreamBench prompts, with the subject token and several class nouns, plus the reference prompt."""
    object_classes = sorted({c for c in SUBJECT_CLASSES.values() if c not in ("dog", "cat")})
    out = []
    for i, c in enumerate(object_classes[:4]):
        out += fill(OBJECT_PROMPTS, "sks" if i % 2 == 0 else "zwx", c)
    for c in ("dog", "cat"):
        out += fill(LIVE_PROMPTS, "sks", c)
    out += fill([REFERENCE_PROMPT], "sks", "dog")
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    ours = CLIPTokenizer.from_bpe_gz()
    folder = tmp_path_factory.mktemp("tokenizer")
    ours.save_vocab(folder)
    return ours, HFCLIPTokenizer.from_pretrained(folder), folder


def hf_ids(hf, texts):
    return hf(texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt").input_ids


def test_vocabulary():
    vocab = CLIPTokenizer.from_bpe_gz().vocab
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    chars = list(bytes_to_unicode().values())
    assert [vocab[c] for c in chars] == list(range(256)) and vocab[chars[0] + "</w>"] == 256
    assert vocab["<|startoftext|>"] == START_ID == 49406 and vocab["<|endoftext|>"] == END_ID == 49407
    # the last merge OpenAI keeps is line 48894 of the file (after the "#version" header)
    lines = gzip.open(VENDORED_BPE, "rt", encoding="utf-8").read().split("\n")
    assert vocab["".join(lines[48894].split())] == 49405


def test_known_ids():
    # the DreamBooth reference prompt, as every SD v1 pipeline tokenizes it ("sks" is one rare token)
    ids = CLIPTokenizer.from_bpe_gz()("a photo of sks dog")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 48136, 1929, 49407, 49407]
    assert (ids[0, 6:] == 49407).all()


def test_dreambench_prompts_match_transformers(tokenizers):
    ours, hf, _ = tokenizers
    prompts = dreambench_prompts()
    assert len(prompts) == 4 * 25 + 2 * 25 + 1
    assert torch.equal(ours(prompts), hf_ids(hf, prompts))


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_match_transformers(tokenizers, text):
    ours, hf, _ = tokenizers
    got, want = ours(text), hf_ids(hf, [text])
    assert torch.equal(got, want), f"{text!r}:\n{got[0].tolist()}\n{want[0].tolist()}"
    assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids


def test_truncation_and_padding(tokenizers):
    ours, _, _ = tokenizers
    long_text, empty = HARD_STRINGS[-2], HARD_STRINGS[0]
    assert len(ours.encode(long_text)) > 75
    ids = ours([long_text, empty])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == START_ID and ids[0, -1] == END_ID and ids[0, 1:76].tolist() == ours.encode(long_text)[:75]
    assert ids[1, 0] == START_ID and (ids[1, 1:] == END_ID).all()


def test_from_files_equals_from_bpe_gz(tokenizers):
    ours, _, folder = tokenizers
    again = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
    assert again.vocab == ours.vocab and again.merges == ours.merges
    texts = dreambench_prompts() + HARD_STRINGS
    assert torch.equal(again(texts), ours(texts))
