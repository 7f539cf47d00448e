"""Fetch the public weights (and the DreamBench images) tinyrpo needs, over plain HTTPS.

    python -m tinyrpo.download                 # SD v1.5, CLIP ViT-L/14 and ViT-B/32, DINO ViT-S/16 into weights/
    python -m tinyrpo.download sd15 --fp16     # only Stable Diffusion, the half-size fp16 files
    python -m tinyrpo.download dreambench      # the 30 DreamBooth subjects into refs/
    python -m tinyrpo.download all --dir /data/weights

Files come from the Hugging Face hub as `{base}/{repo}/resolve/{revision}/{file}` (the same URLs a browser
downloads), so no hub library is needed. Every file is written to `NAME.part` and renamed when complete:
an interrupted run resumes where it stopped (HTTP Range), and a file already on disk is not fetched again.
weights/README.md lists the same files for doing it by hand.
"""
import argparse
import errno
import http.client
import os
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from tinyrpo.errors import UserError, run_cli

# Where the other commands look by default (relative to the working directory, like --dir).
DEFAULT_DIR = "weights"
DEFAULT_SD = "weights/sd15"
DEFAULT_REWARD_CLIP = "weights/clip-vit-large-patch14"  # the reward model (image-text and image-image scores)
DEFAULT_EVAL_CLIP = "weights/clip-vit-base-patch32"  # evaluation: CLIP-T and CLIP-I
DEFAULT_DINO = "weights/dino-vits16"  # evaluation: DINO score
DEFAULT_REFS = "refs"  # DreamBench: refs/<subject>/*.jpg + refs/prompts_and_classes.txt

# HF_ENDPOINT is the variable huggingface_hub reads for a mirror; honouring it costs nothing.
HF_URL = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
GITHUB_URL = "https://github.com"
DREAMBENCH_ZIP = "google/dreambooth/archive/refs/heads/main.zip"  # unpacks to dreambooth-main/dataset/...

USER_AGENT = "tinyrpo-download/0.1 (+urllib)"
CHUNK = 1 << 20
RETRY_WAIT = 1.0  # seconds before the first retry; doubles after each failure


def _safe_or_bin(pr):
    """A weight file whose repo has only pytorch_model.bin on main.

    Hugging Face's conversion bot left the same tensors as model.safetensors in the pull-request ref
    `refs/pr/{pr}` (the ref transformers itself falls back to), so try main, then that ref, then the pickle.
    Entries are (revision, file) alternatives, tried in order until one is not a 404.
    """
    return (("main", "model.safetensors"), (f"refs/pr/{pr}", "model.safetensors"), ("main", "pytorch_model.bin"))


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
DREAMBENCH_SIZE = "about 112 MB of images, in a zip of the google/dreambooth repository"
CHOICES = [*MODELS, "dreambench", "all"]


def model_files(what, fp16=False):
    """The files of one model: each a str (a file on main) or a tuple of (revision, file) alternatives."""
    if what == "sd15":
        return _sd15_files(fp16)
    if what == "clip-l14":
        return ["config.json", "model.safetensors"]
    if what == "clip-b32":
        return ["config.json", _safe_or_bin(32)]
    if what == "dino":
        return ["config.json", _safe_or_bin(1)]
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
# One file over HTTP(S): resume, retry, atomic rename.


class NotFound(UserError):
    """HTTP 404: the file is not at that address (download() then tries the next alternative)."""


class _Retry(Exception):
    """A transient network failure: try again, resuming from the .part file."""


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _host(url):
    return urllib.parse.urlsplit(url).netloc or url


def _open(url, start=0, timeout=60.0):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    # urllib follows the hub's redirect to its CDN and keeps the Range header on the way.
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_from_content_range(value):
    """'bytes 100-199/200' or 'bytes */200' -> 200 (None when absent or unknown)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def remote_size(url, timeout=30.0):
    """The size of the file at `url`, or None when the server does not say (or cannot be reached).

    A one-byte Range GET rather than HEAD: urllib turns HEAD into GET on a redirect, and CDN links
    signed for GET may refuse HEAD. A server that ignores Range answers 200 with the full length.
    """
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if r.status == 206:
                return _total_from_content_range(r.headers.get("Content-Range"))
            n = r.headers.get("Content-Length")
            return int(n) if n and n.isdigit() else None
    except (OSError, *_NETWORK_ERRORS):
        return None


def _or(hint):
    return f", or {hint}" if hint else ""


def _reason(e):
    """'Connection refused' rather than '<urlopen error [Errno 111] Connection refused>'."""
    r = getattr(e, "reason", None) or e
    return getattr(r, "strerror", None) or str(r)


def _mkdir(folder):
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {folder}: {_reason(e)}; use a folder you can write to") from None


def _write_error(e, part):
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {part}: free some space and run the same command again "
                         f"(it resumes from {part.name})")
    return UserError(f"could not write {part}: {_reason(e)}; check the folder's permissions and free space")


def _transfer(url, part, progress, timeout, hint, desc):
    """Append the rest of `url` to `part`. Raises _Retry on a network failure, UserError otherwise."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part already holds every byte (or more than the file has)
            if _total_from_content_range(e.headers.get("Content-Range")) == start:
                return
            part.unlink()
            return _transfer(url, part, progress, timeout, hint, desc)
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        if e.code == 404:
            raise NotFound(f"{url} was not found (HTTP 404): check the address{_or(hint)}") from None
        if e.code in (401, 403):
            raise UserError(f"access to {url} was refused (HTTP {e.code}): the file may be gated "
                            f"(accept its license on the site) or moved{_or(hint)}") from None
        raise UserError(f"downloading {url} failed: HTTP {e.code} {e.reason}{_or(hint)}") from None
    except _NETWORK_ERRORS as e:
        raise _Retry(_reason(e)) from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            if _content_range_start(resp.headers.get("Content-Range")) != start:
                part.unlink()  # not the range asked for: start over rather than splice wrong bytes
                raise _Retry("the server answered with a different byte range; restarting")
            mode, total = "ab", (start + length if length is not None else None)
        else:  # 200: the server ignored Range (or it was a fresh start) and sends the whole file
            start, mode, total = 0, "wb", length
        if total is not None:
            free = shutil.disk_usage(part.parent).free
            if total - start > free:
                raise UserError(f"not enough disk space for {part.name[:-5]}: it needs "
                                f"{_gb(total - start)} and {part.parent} has {_gb(free)} free")
        got = 0
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=desc, disable=not progress, leave=True, file=sys.stderr)
        try:
            f = open(part, mode)
        except OSError as e:
            bar.close()
            raise _write_error(e, part) from None
        with f, bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except _NETWORK_ERRORS as e:
                    raise _Retry(f"connection lost after {start + got} bytes ({_reason(e)})") from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise _write_error(e, part) from None
                got += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" rather than raising when the server hangs up early: check the count.
    if total is not None and start + got != total:
        raise _Retry(f"connection closed after {start + got} of {total} bytes")


def _content_range_start(value):
    """'bytes 100-199/200' -> 100."""
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def fetch(url, path, *, retries=3, progress=True, timeout=60.0, hint="", desc=None):
    """Download `url` to `path`; returns True if bytes were fetched, False if the file was already there.

    Writes `path.part` and renames it when complete, so `path` is never half a file. A `.part` left by an
    interrupted run is resumed with `Range: bytes=N-` (a server that answers 200 instead restarts it).
    An existing `path` is kept when its size matches the server's (or the server cannot be asked).
    Network failures are retried `retries` times. Every failure ends in one UserError; `hint` is the
    way around it offered last ("download it by hand into ...").
    """
    path = Path(path)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"cannot download {url}: not an http(s) address (a --base-url needs https://)")
    if path.is_file():
        size = remote_size(url, timeout)
        if size is None or size == path.stat().st_size:
            return False
    _mkdir(path.parent)
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, progress, timeout, hint, desc or path.name)
            break
        except _Retry as e:
            if attempt == retries and part.exists() and part.stat().st_size:
                raise UserError(f"the download of {path.name} from {_host(url)} broke off: {e}; run the same "
                                f"command again to resume from {part.name}{_or(hint)}") from None
            if attempt == retries:
                raise UserError(f"could not reach {_host(url)} for {path.name}: {e}; "
                                f"check your connection{_or(hint)}") from None
            time.sleep(RETRY_WAIT * 2 ** attempt)
    try:
        os.replace(part, path)
    except OSError as e:
        raise _write_error(e, path) from None
    return True


# ---------------------------------------------------------------------------------------------------
# The models and the DreamBench images.


def _fetch_model(what, dest, base_url, fp16, retries, progress):
    repo, folder, desc, _ = MODELS[what]
    out = Path(dest) / folder
    hint = f"download the files by hand into {out} as weights/README.md describes"
    fetched = 0
    for entry in model_files(what, fp16):
        alternatives = (("main", entry),) if isinstance(entry, str) else entry
        # A file fetched before (maybe from a fallback) counts: don't fetch a second copy of the weights.
        have = [(rev, f) for rev, f in alternatives if (out / f).is_file()]
        for i, (rev, f) in enumerate(have or alternatives):
            try:
                new = fetch(hf_url(base_url, repo, f, rev), out / f, retries=retries, progress=progress,
                            hint=hint, desc=f"{what}/{f}")
                fetched += new
                if new and f.endswith(".bin") and progress:
                    print(f"{what}: no model.safetensors published, using {f} (loaded with weights_only=True)")
                break
            except NotFound:
                if i == len(have or alternatives) - 1:
                    names = ", ".join(f"{f} ({rev})" for rev, f in alternatives)
                    raise UserError(f"{repo} has none of {names} at {base_url} (HTTP 404): "
                                    f"check --base-url, or {hint}") from None
    if progress:
        n = len(model_files(what, fp16))
        print(f"{what}: {desc} in {out} ({n} files: {fetched} fetched, {n - fetched} already there)")
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
                _mkdir(target.parent)
                tmp = target.with_name(target.name + ".part")
                try:
                    with z.open(name) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, target)
                except OSError as e:
                    raise _write_error(e, tmp) from None
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


def main(argv=None):
    sizes = "\n".join(f"  {k:<10} {desc}: {size}, from huggingface.co/{repo}"
                      for k, (repo, _, desc, size) in MODELS.items())
    p = argparse.ArgumentParser(
        prog="python -m tinyrpo.download",
        description="Download the public weights tinyrpo uses (and, on request, the DreamBench images).\n"
                    "Interrupted downloads resume; files already present are skipped.",
        epilog=f"downloads:\n{sizes}\n  {'dreambench':<10} DreamBench subjects and prompts: {DREAMBENCH_SIZE}\n"
               f"  {'all':<10} all of the above\n\n"
               "SD v1.5 is under the CreativeML OpenRAIL-M license; weights/README.md lists the licenses\n"
               "and how to fetch the files by hand.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # No choices= here: argparse rejects the empty default of nargs="*" against them; checked below.
    p.add_argument("what", nargs="*", metavar="WHAT",
                   help=f"what to fetch: {', '.join(CHOICES)} (default: the four models, not dreambench)")
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help="folder for the weights; each model goes in a subfolder (default: %(default)s)")
    p.add_argument("--refs", default=DEFAULT_REFS,
                   help="folder for the DreamBench images and prompts (default: %(default)s)")
    p.add_argument("--fp16", action="store_true",
                   help="SD v1.5: fetch the half-precision .fp16.safetensors files (half the download)")
    p.add_argument("--base-url", default=HF_URL,
                   help="Hugging Face hub or a mirror of it; files are BASE/REPO/resolve/REV/FILE "
                        "(default: %(default)s, or $HF_ENDPOINT)")
    p.add_argument("--github-url", default=GITHUB_URL,
                   help=f"GitHub or a mirror, for dreambench: BASE/{DREAMBENCH_ZIP} (default: %(default)s)")
    p.add_argument("--retries", type=int, default=3,
                   help="how many times to retry a file after a network failure (default: %(default)s)")
    args = p.parse_args(argv)
    for w in args.what:
        if w not in CHOICES:
            p.error(f"unknown WHAT {w!r}: choose from {', '.join(CHOICES)}")
    try:
        download(args.what, args.dir, args.base_url, args.fp16, refs=args.refs, github_url=args.github_url,
                 retries=max(0, args.retries))
    except KeyboardInterrupt:  # run_cli's message is about training checkpoints; this one is about .part files
        print("interrupted: run the same command again to resume the unfinished file", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
