"""CLIP's byte-pair-encoding tokenizer, the one Stable Diffusion v1's text encoder was trained with.

The pipeline is OpenAI's `clip/simple_tokenizer.py` as transformers 5.x runs it on the `tokenizers`
library (`transformers/models/clip/tokenization_clip.py`), and this file reproduces that one id for id:

    text -> NFC, runs of whitespace -> " ", lowercase          (normalizer)
         -> split into letter runs, single digits, punctuation  (CLIP's regex; whitespace is dropped)
         -> bytes -> printable unicode chars                    (GPT-2's byte-level mapping)
         -> BPE merges, the last symbol of a word carrying "</w>"
         -> <|startoftext|> ids <|endoftext|>, padded with <|endoftext|> to 77

Unlike OpenAI's original, transformers (and so this file) does not run `ftfy.fix_text` and
`html.unescape` first: "&amp;" stays four characters and mojibake is not repaired. Plain prompts
tokenize the same either way.

The vocabulary (49408 entries) comes either from a diffusers folder's `tokenizer/vocab.json` +
`merges.txt` or from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, which ships in `tinyrpo/assets/`.
"""
import gzip
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from tinyrpo.errors import UserError

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
START_ID = 49406
END_ID = 49407
PAD_ID = END_ID  # SD v1 pads with <|endoftext|> (HF's pad_token); the text encoder never masks padding
CONTEXT_LENGTH = 77
VENDORED_BPE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's pattern (simple_tokenizer.py), as transformers writes it: special tokens, English contractions,
# letter runs, single digits, runs of anything else but whitespace. Text between matches (whitespace) is dropped.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the other 68 (control chars, space, ...) map to 256+n, so
    BPE never sees whitespace or control characters. The dict's order is the order of the vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def read_bpe_gz(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-entry vocab and its merges from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    Built exactly as simple_tokenizer.py (and HF's vocab.json) do: the 256 byte chars, the same with
    "</w>", one token per merge for the first 48894 merges, then <|startoftext|> and <|endoftext|>.
    """
    path = Path(path) if path is not None else VENDORED_BPE
    if not path.is_file():
        raise UserError(f"BPE vocabulary {path} not found; pass the path to bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is the "#version" header. OpenAI keeps 49152 - 256 - 2 = 48894 merges: 256 + 256 + 48894 + 2 = 49408.
    merges = [tuple(line.split()) for line in lines[1 : 1 + 48894]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        self.vocab, self.merges, self.context_length = vocab, merges, context_length
        self.start_id, self.end_id = vocab[START_TOKEN], vocab[END_TOKEN]
        self.pad_id = self.end_id
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=END_TOKEN))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            # ByteLevel also applies GPT-2's split (use_regex=True) as transformers does; it only matters for
            # a piece like "<|STARTOFTEXT|>", which is lowercased after the special-token match below.
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # The special tokens typed into a prompt are matched verbatim before normalization, as in transformers.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (START_TOKEN, END_TOKEN)])
        self.tokenizer = tok

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> "CLIPTokenizer":
        """From HF/diffusers `vocab.json` + `merges.txt` (e.g. `<sd folder>/tokenizer/`)."""
        for p in (vocab_json, merges_txt):
            if not Path(p).is_file():
                raise UserError(f"tokenizer file {p} not found; a diffusers folder has tokenizer/vocab.json and "
                                "tokenizer/merges.txt (or omit them to use the vocabulary shipped with tinyrpo)")
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_bpe_gz(cls, path: str | Path | None = None, **kwargs) -> "CLIPTokenizer":
        """From OpenAI's `bpe_simple_vocab_16e6.txt.gz`; by default the copy in `tinyrpo/assets/`."""
        return cls(*read_bpe_gz(path), **kwargs)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without <|startoftext|> / <|endoftext|> and without truncation."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, context_length) int64 ids: <|startoftext|> ids <|endoftext|> <|endoftext|>...

        Too-long prompts are cut so that the last id is still <|endoftext|> (transformers' truncation=True).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.start_id] + enc.ids[: self.context_length - 2] + [self.end_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def save_vocab(self, folder: str | Path) -> None:
        """Write `vocab.json`, `merges.txt` and a `tokenizer_config.json`: a diffusers `tokenizer/` folder.

        transformers' CLIPTokenizer.from_pretrained reads it back; model_max_length is what diffusers'
        pipelines pad to.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                  "bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN,
                  "do_lower_case": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
