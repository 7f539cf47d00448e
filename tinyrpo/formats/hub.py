"""The public weights (and the DreamBench images) tinyrpo needs, pinned, and fetched over plain HTTPS;
`python -m tinyrpo.download` is the command (tinyrpo/download.py).

Files come from the Hugging Face hub as `{base}/{repo}/resolve/{revision}/{file}` (the same URLs a browser
downloads), so no hub library is needed. Every file is pinned to a commit and checked against its sha256
(tinyrpo/formats/fetch.py: resume with Range + If-Range, verification, redirects). $HF_TOKEN is sent to the hub
when set (gated or private mirrors, higher rate limits); $HF_ENDPOINT (or --base-url) points at a mirror.
weights/README.md lists the same files for doing it by hand.
"""
import os
import shlex
import shutil
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tinyrpo.errors import UserError
from tinyrpo.formats.fetch import NotFound, fetch, hf_token, host_of, make_folder, download_write_error
from tinyrpo.runs.paths import DEFAULT_DIR, DEFAULT_REFS  # where the other commands look by default

# HF_ENDPOINT is the variable huggingface_hub reads for a mirror; honouring it costs nothing.
HF_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
GITHUB_URL = "https://github.com"
DREAMBENCH_ZIP = "google/dreambooth/archive/refs/heads/main.zip"  # unpacks to dreambooth-main/dataset/...

# ---------------------------------------------------------------------------------------------------
# What to fetch: every file pinned to a commit, with the sha256 the hub publishes for it.
#
# A commit never changes, so a run today and one next year get the same bytes, and the sha256 checks that
# they arrived whole. Sources of the values below (public code pinning the same files, cross-checked
# where possible; see the README's "Download verification"):
#   SD v1.5       commit f03de327 of stable-diffusion-v1-5/stable-diffusion-v1-5 (runwayml/stable-diffusion-v1-5
#                 before the move: same history). LFS sha256 of the fp32 and fp16 weights, and the sha256 of
#                 the small files, each in two or more public projects that verify these files.
#   CLIP L/14     commit 32bd6428 of openai/clip-vit-large-patch14; model.safetensors' sha256 in several
#                 projects. config.json: no published sha256 found; checked against the hub's ETag.
#   CLIP B/32     main has only pytorch_model.bin; the published safetensors conversion is the pull request
#                 refs/pr/15 (public code uses it), pinned here to its commit b33cedfd with the sha256 several
#                 projects verify. config.json: checked against the hub's ETag.
#   DINO S/16     commit abe3b354 of facebook/dino-vits16 (main when pinned); it holds pytorch_model.bin only,
#                 and no safetensors conversion could be confirmed. No sha256 for its files was found: they
#                 are checked against what the hub publishes (X-Linked-Etag / ETag) when fetched.

SD15_REVISION = "f03de327dd89b501a01da37fc5240cf4fdba85a1"
SD15_SHA256 = {
    "model_index.json": "e2f6f22e274374010aec30c79eb2d6e53fff4a36ac0225523a92cb2d41a83347",
    "scheduler/scheduler_config.json": "699cce92eb7c122e2eb7dfdea78e6187fda76a5ed4a8e42319b85610e620e091",
    "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer/tokenizer_config.json": "00439066fcba73de57644cf41e4e3b9f2dbb09d7f3fc2005898ba52399045882",
    "tokenizer/special_tokens_map.json": "c4864a9376a8401918425bed71fc14fc0e81f9b59ec45c1cf96cccb2df508eac",
    "text_encoder/config.json": "845df614cb9327ae7bbea027316246fae917827407da6df13572e41b5f93b4cc",
    "vae/config.json": "786a7d21647ddea6a04b9675c03d3cb45e90a2f3c6da5fbda2c54ade040036de",
    "unet/config.json": "78f474de6bab3d893868f37be97b636ae65c0df3073ed3256ca458ff599b5f96",
    "text_encoder/model.safetensors": "d008943c017f0092921106440254dbbe00b6a285f7883ec8ba160c3faad88334",
    "vae/diffusion_pytorch_model.safetensors": "a2b5134f4dbc140d9c11f11cba3233099e00af40f262f136c691fb7d38d2194c",
    "unet/diffusion_pytorch_model.safetensors": "19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1",
    "text_encoder/model.fp16.safetensors": "77795e2023adcf39bc29a884661950380bd093cf0750a966d473d1718dc9ef4e",
    "vae/diffusion_pytorch_model.fp16.safetensors": "4fbcf0ebe55a0984f5a5e00d8c4521d52359af7229bb4d81890039d2aa16dd7c",
    "unet/diffusion_pytorch_model.fp16.safetensors": "c83908253f9a64d08c25fc90874c9c8aef9a329ce1ca5fb909d73b0c83d1ea21",
}


@dataclass(frozen=True)
class Remote:
    """One file of a hub repository at a fixed revision; sha256 None: checked against what the hub publishes."""
    repo: str
    revision: str
    path: str
    sha256: str | None = None


def _sd15_files(fp16):
    v = ".fp16" if fp16 else ""  # diffusers names a half-precision copy with the "fp16" variant: NAME.fp16.safetensors
    return ["model_index.json", "scheduler/scheduler_config.json",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
            "text_encoder/config.json", f"text_encoder/model{v}.safetensors",
            "vae/config.json", f"vae/diffusion_pytorch_model{v}.safetensors",
            "unet/config.json", f"unet/diffusion_pytorch_model{v}.safetensors"]


# name -> (Hugging Face repo, folder under --dir, what it is, approximate download size)
MODELS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15",
             "Stable Diffusion v1.5", "about 4.3 GB, 2.1 GB with --fp16"),
    "clip-l14": ("openai/clip-vit-large-patch14", "clip-vit-large-patch14",
                 "CLIP ViT-L/14 (the reward model)", "about 1.7 GB"),
    "clip-b32": ("openai/clip-vit-base-patch32", "clip-vit-base-patch32",
                 "CLIP ViT-B/32 (evaluation)", "about 605 MB"),
    "dino": ("facebook/dino-vits16", "dino-vits16", "DINO ViT-S/16 (evaluation)", "about 87 MB"),
}
# name -> (revision, {file: sha256 or None}) for the models other than SD
PINS = {
    "clip-l14": ("32bd64288804d66eefd0ccbe215aa642df71cc41", {
        "config.json": None,
        "model.safetensors": "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb"}),
    "clip-b32": ("b33cedfd0df4e43b8238760678fcc89e1a0d38b3", {  # refs/pr/15, the safetensors conversion
        "config.json": None,
        "model.safetensors": "99d28a652e6ec46629ab7047a0ac82c69b1fe11e0ce672c43af65d3a9a3fc05d"}),
    "dino": ("abe3b354cb6a9b6f146096b14a4a9d7eecbcb4bd", {"config.json": None, "pytorch_model.bin": None}),
}
DREAMBENCH_SIZE = "about 112 MB of images, in a zip of the google/dreambooth repository"
CHOICES = [*MODELS, "dreambench", "all"]


def model_files(what, fp16=False) -> list[Remote]:
    """The files of one model, each pinned to its revision."""
    repo = MODELS[what][0] if what in MODELS else None
    if what == "sd15":
        return [Remote(repo, SD15_REVISION, f, SD15_SHA256[f]) for f in _sd15_files(fp16)]
    if what in PINS:
        revision, files = PINS[what]
        return [Remote(repo, revision, f, sha) for f, sha in files.items()]
    raise ValueError(f"unknown model {what!r}")


def hf_url(base_url, repo, file, revision="main"):
    # A revision such as refs/pr/1 is one path segment on the hub, so its slashes are escaped.
    return f"{base_url.rstrip('/')}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{file}"


def missing_weights_message(kind, path, flag=None):
    """One sentence for a command that found nothing at `path`: what is missing and which command gets it.

    kind is a download name (sd15, clip-l14, clip-b32, dino, dreambench); flag names the option of the
    calling command that points elsewhere (sd15 defaults to --weights).
    """
    path = Path(path)
    if kind == "dreambench":
        cmd = "python -m tinyrpo.download dreambench"
        if path != Path(DEFAULT_REFS):
            cmd += f" --refs {shlex.quote(str(path))}"
        msg = (f"no DreamBench reference images at {path}: run `{cmd}` ({DREAMBENCH_SIZE}) "
               f"or copy the dataset/ folder of github.com/google/dreambooth there")
        return msg + (f", or pass {flag} DIR" if flag else "")
    if kind not in MODELS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join([*MODELS, 'dreambench'])}")
    repo, folder, desc, size = MODELS[kind]
    cmd = f"python -m tinyrpo.download {kind}"
    if path.name == folder and path.parent != Path(DEFAULT_DIR):
        cmd += f" --dir {shlex.quote(str(path.parent))}"
    elif path.name != folder:  # a custom path: say where the command will put the files
        size += f"; it writes {Path(DEFAULT_DIR) / folder}"
    msg = f"no {desc} weights at {path}: run `{cmd}` ({size})"
    if kind == "sd15":
        flag = flag or "--weights"
        return msg + f" or pass {flag} PATH to a single .safetensors file or a diffusers folder"
    files = f"config.json and model.safetensors from huggingface.co/{repo}"
    return msg + (f" or pass {flag} PATH to a folder with {files}" if flag else f" or put {files} there by hand")


# ---------------------------------------------------------------------------------------------------
# The models and the DreamBench images.


def _fetch_model(what, dest, base_url, fp16, retries, progress):
    repo, folder, desc, _ = MODELS[what]
    out = Path(dest) / folder
    hint = f"download the files by hand into {out} as weights/README.md describes"
    files = model_files(what, fp16)
    token, fetched = hf_token(), 0
    for r in files:
        try:
            fetched += fetch(hf_url(base_url, r.repo, r.path, r.revision), out / r.path, sha256=r.sha256,
                             retries=retries, progress=progress, hint=hint, desc=f"{what}/{r.path}",
                             token=token, token_host=host_of(base_url))
        except NotFound:
            raise UserError(f"{r.repo} has no {r.path} at revision {r.revision} on {base_url} (HTTP 404): check "
                            f"--base-url / HF_ENDPOINT (a mirror must serve that commit), or {hint}") from None
    if progress:
        n = len(files)
        print(f"{what}: {desc} in {out} ({n} files, each checked against its sha256: {fetched} fetched, "
              f"{n - fetched} already there)")
    return out


def _safe_member(name, prefix):
    """The path below `prefix` of a zip member, or None for members outside it or with '..' parts."""
    if not name.startswith(prefix) or name.endswith("/"):
        return None
    rel = Path(name[len(prefix):])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    return rel


def download_dreambench(dest=DEFAULT_REFS, *, github_url=GITHUB_URL, retries=3, progress=True):
    """Put DreamBench (google/dreambooth's `dataset/`) in `dest`: dest/<subject>/NN.jpg and
    dest/prompts_and_classes.txt. Skipped when that file exists: it is written last, so it marks a whole copy.
    """
    dest = Path(dest)
    done = dest / "prompts_and_classes.txt"
    if done.is_file():
        if progress:
            print(f"dreambench: already in {dest} (delete {done} to fetch again)")
        return dest
    hint = f"copy the dataset/ folder of github.com/google/dreambooth into {dest} by hand"
    url = f"{github_url.rstrip('/')}/{DREAMBENCH_ZIP}"
    archive = dest / "dreambooth-main.zip"
    fetch(url, archive, retries=retries, progress=progress, hint=hint)
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            top = names[0].split("/")[0] if names else ""
            prefix = f"{top}/dataset/"
            members = [(n, _safe_member(n, prefix)) for n in names]
            members = [(n, rel) for n, rel in members if rel is not None]
            if not any(rel == Path(done.name) for _, rel in members):
                archive.unlink()
                raise UserError(f"the zip from {url} has no dataset/prompts_and_classes.txt, so it is not the "
                                f"google/dreambooth repository: check --github-url, or {hint}")
            # prompts_and_classes.txt last: its presence means every image is in place.
            members.sort(key=lambda m: m[1] == Path(done.name))
            for name, rel in members:
                target = dest / rel
                make_folder(target.parent)
                tmp = target.with_name(target.name + ".part")
                try:
                    with z.open(name) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, target)
                except OSError as e:
                    raise download_write_error(e, tmp) from None
    except zipfile.BadZipFile:
        archive.unlink()
        raise UserError(f"the file from {url} is not a valid zip (a broken transfer or an error page); "
                        f"run the command again, or {hint}") from None
    archive.unlink()
    n = sum(1 for _, rel in members if rel.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if progress:
        print(f"dreambench: {n} images of {len({rel.parts[0] for _, rel in members if len(rel.parts) > 1})} "
              f"subjects in {dest}")
    return dest


def download(what=None, dest=DEFAULT_DIR, base_url=HF_URL, fp16=False, *, refs=DEFAULT_REFS,
             github_url=GITHUB_URL, retries=3, progress=True):
    """Fetch the named downloads (see CHOICES); None or [] means the four models (not DreamBench).

    Returns {name: folder}. Models go to dest/<folder>, DreamBench to `refs`.
    """
    what = list(what or MODELS)
    unknown = [w for w in what if w not in CHOICES]
    if unknown:
        raise UserError(f"unknown download {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    if "all" in what:
        what = [*MODELS, "dreambench"]
    what = list(dict.fromkeys(what))  # drop repeats, keep the order
    out = {}
    for w in what:
        if w == "dreambench":
            out[w] = download_dreambench(refs, github_url=github_url, retries=retries, progress=progress)
        else:
            out[w] = _fetch_model(w, dest, base_url, fp16, retries, progress)
    return out
