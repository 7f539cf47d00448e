"""tinyrpo.download / tinyrpo.formats.hub / tinyrpo.formats.fetch against local HTTP servers that act like the hub and its CDN (never the
internet): pinned revisions, sha256 checks, resume without splicing, redirects, tokens, rate limits."""
import hashlib
import io
import os
import random
import re
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import tinyrpo.formats.hub as dl
import tinyrpo.formats.fetch as fe
from tinyrpo.errors import UserError
from tinyrpo.runs import paths

ROOT = Path(__file__).resolve().parents[1]
BIG = "unet/diffusion_pytorch_model.safetensors"


def _bytes(n, seed):
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """A hub: server.files {URL path: bytes}. Files in server.lfs answer 302 to the CDN server with the hub's
    headers (X-Linked-Etag = sha256, X-Repo-Commit); the others are served here with ETag = git blob sha1.
    Honours Range (unless server.honor_range is False) and If-Range (unless server.honor_if_range is False);
    server.cut_after {path: n} sends n bytes then hangs up (once); server.redirects {path: (code, location)};
    server.fail {path: [status, ...]} answers those statuses first (429 with Retry-After: 0)."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = urllib_path(self.path)
        srv.log.append(SimpleNamespace(path=path, range=self.headers.get("Range"),
                                       if_range=self.headers.get("If-Range"),
                                       auth=self.headers.get("Authorization")))
        if srv.fail.get(path):
            code = srv.fail[path].pop(0)
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in srv.redirects:
            code, location = srv.redirects[path]
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        if path in srv.lfs and srv.cdn is not None:  # the hub's answer for an LFS file: go to the CDN
            key = f"/cdn/{sha256(data)}"
            srv.cdn.files[key] = data
            self.send_response(302)
            self.send_header("Location", srv.cdn.url + key)
            self.send_header("X-Linked-Etag", f'"{sha256(data)}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = srv.etags.get(path) or (f'"cdn-{sha256(data)[:16]}"' if srv.is_cdn else f'"{git_sha1(data)}"')
        rng = self.headers.get("Range")
        if rng and srv.honor_if_range and self.headers.get("If-Range") not in (None, etag):
            rng = None  # If-Range: the file changed, so send all of it
        start, end, status = 0, len(data), 200
        if rng and srv.honor_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            if rng == "bytes=0-0":
                end = 1
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("ETag", etag)
        if not srv.is_cdn:
            self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        body = data[start:end]
        cut = srv.cut_after.pop(path, None)
        if cut is not None:  # an interrupted transfer: the promised length never arrives
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def urllib_path(raw):
    return raw.split("?")[0]


def _start_server(is_cdn=False):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.cut_after, srv.redirects, srv.fail, srv.etags = {}, [], {}, {}, {}, {}
    srv.lfs, srv.cdn, srv.is_cdn = set(), None, is_cdn
    srv.honor_range = srv.honor_if_range = True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return srv, t


@pytest.fixture
def servers():
    """(hub, cdn): two servers on two ports, as the hub and the CDN it redirects LFS files to."""
    (hub, t1), (cdn, t2) = _start_server(), _start_server(is_cdn=True)
    hub.cdn = cdn
    yield hub, cdn
    for srv, t in ((hub, t1), (cdn, t2)):
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


@pytest.fixture
def server(servers):
    return servers[0]


@pytest.fixture(autouse=True)
def no_waits(monkeypatch):
    monkeypatch.setattr(fe, "RETRY_WAIT", 0.0)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def url_of(r: dl.Remote) -> str:
    return dl.hf_url("", r.repo, r.path, r.revision)


def serve_model(srv, monkeypatch, what, fp16=False, big=300_000):
    """Serve `what`'s files at their pinned revisions, random bytes; the pins are re-pointed at those bytes
    (a pin of None stays None: the hub's published hash is checked). Returns {relative path: bytes}."""
    files, remotes = {}, {}
    for i, r in enumerate(dl.model_files(what, fp16)):
        data = _bytes(big if r.path.endswith((".safetensors", ".bin")) else 50 + i, seed=hash((what, i)) % 1000)
        files[r.path] = data
        srv.files[url_of(r)] = data
        if r.path.endswith((".safetensors", ".bin")):
            srv.lfs.add(url_of(r))
        remotes[r.path] = replace(r, sha256=sha256(data) if r.sha256 else None)
    original = dl.model_files
    monkeypatch.setattr(dl, "model_files", lambda w, f=False: [remotes[r.path] if w == what else r
                                                               for r in original(w, f)])
    return files


def closed_port():
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# The pins


def test_every_file_is_pinned_to_a_commit():
    for what in dl.MODELS:
        for fp16 in (False, True):
            files = dl.model_files(what, fp16)
            assert files and all(re.fullmatch(r"[0-9a-f]{40}", r.revision) for r in files), what
            assert all(r.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", r.sha256) for r in files)
    # SD and both CLIPs' weights carry a known sha256; B/32's are the safetensors conversion (refs/pr/15),
    # not the 605 MB pickle of main
    assert all(r.sha256 for r in dl.model_files("sd15")) and all(r.sha256 for r in dl.model_files("sd15", True))
    for what in ("clip-l14", "clip-b32"):
        weights = [r for r in dl.model_files(what) if r.path.endswith((".safetensors", ".bin"))]
        assert [r.path for r in weights] == ["model.safetensors"] and weights[0].sha256
    assert dl.PINS["clip-b32"][0] == "b33cedfd0df4e43b8238760678fcc89e1a0d38b3"


@pytest.mark.parametrize("fp16", [False, True])
def test_sd15_full_tree_at_the_pinned_commit(servers, tmp_path, monkeypatch, fp16):
    hub, cdn = servers
    want = serve_model(hub, monkeypatch, "sd15", fp16)
    out = dl.download(["sd15"], tmp_path / "w", base_url=hub.url, fp16=fp16, progress=False)
    assert out == {"sd15": tmp_path / "w" / "sd15"}
    assert tree(tmp_path / "w" / "sd15") == want  # no .part or .part.json left
    assert len(want) == 12 and ("unet/diffusion_pytorch_model.fp16.safetensors" in want) == fp16
    assert all(f"/resolve/{dl.SD15_REVISION}/" in e.path for e in hub.log)  # never main
    assert len(cdn.log) == 3  # the three weight files came from the CDN


def test_interrupted_transfer_resumes_with_range_and_if_range(servers, tmp_path, monkeypatch):
    hub, cdn = servers
    want = serve_model(hub, monkeypatch, "sd15")
    key = f"/cdn/{sha256(want[BIG])}"
    cdn.cut_after[key] = 100_000
    with pytest.raises(UserError, match="resume"):
        dl.download(["sd15"], tmp_path, base_url=hub.url, retries=0, progress=False)
    part = tmp_path / "sd15" / (BIG + ".part")
    assert part.stat().st_size == 100_000 and not (tmp_path / "sd15" / BIG).exists()

    cdn.log.clear()
    dl.download(["sd15"], tmp_path, base_url=hub.url, retries=0, progress=False)
    resumed = [e for e in cdn.log if e.path == key]
    assert resumed[0].range == "bytes=100000-" and resumed[0].if_range == f'"cdn-{sha256(want[BIG])[:16]}"'
    assert tree(tmp_path / "sd15") == want  # identical bytes, no .part left


def test_changed_file_is_never_spliced(server, tmp_path):
    """A mutable ref: the file changes between two attempts. If-Range makes the server send the new file whole;
    a server that ignores If-Range but sends the new ETag is caught too."""
    for honors in (True, False):
        old, new = _bytes(200_000, seed=1), _bytes(200_000, seed=2)
        server.files["/f.bin"], server.cut_after["/f.bin"] = old, 80_000
        server.honor_if_range = honors
        path = tmp_path / f"f{honors}.bin"
        with pytest.raises(UserError, match="resume"):
            fe.fetch(server.url + "/f.bin", path, retries=0, progress=False)
        server.files["/f.bin"] = new  # a new commit on main
        server.log.clear()
        assert fe.fetch(server.url + "/f.bin", path, retries=0, progress=False)
        assert path.read_bytes() == new  # not old[:80000] + new[80000:]
        assert server.log[0].range == "bytes=80000-" and server.log[0].if_range == f'"{git_sha1(old)}"'


def test_part_from_another_revision_starts_over(server, tmp_path):
    data = _bytes(50_000, seed=5)
    server.files["/rev2/f.bin"] = data
    part = tmp_path / "f.bin.part"
    part.write_bytes(b"x" * 1000)  # left by a run that fetched another URL (another pinned revision)
    (tmp_path / "f.bin.part.json").write_text('{"url": "http://elsewhere/rev1/f.bin", "validator": "\\"v1\\""}')
    assert fe.fetch(server.url + "/rev2/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data and server.log[0].range is None


def test_retry_resumes_within_one_call(server, tmp_path):
    data = _bytes(250_000, seed=7)
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = 70_000
    assert fe.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=2, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert [(e.range, e.if_range) for e in server.log] == [(None, None), ("bytes=70000-", f'"{git_sha1(data)}"')]


def test_server_ignoring_range_restarts(server, tmp_path):
    data = _bytes(200_000, seed=3)
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = 50_000
    server.honor_range = False
    with pytest.raises(UserError):
        fe.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 50_000
    assert fe.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert server.log[-1].range == "bytes=50000-"  # asked for the rest, got a 200 with everything
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin.part.json").exists()


def test_complete_part_is_verified_and_renamed(server, tmp_path):
    data = _bytes(1000, seed=4)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)  # interrupted between the last byte and the rename
    (tmp_path / "f.bin.part.json").write_text(f'{{"url": "{server.url}/f.bin", "validator": "\\"{git_sha1(data)}\\""}}')
    assert fe.fetch(server.url + "/f.bin", tmp_path / "f.bin", sha256=sha256(data), retries=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data and server.log[0].range == "bytes=1000-"


# ---------------------------------------------------------------------------------------------------------
# Verification


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-sha256", "hub-published-hash"])
def test_mismatch_deletes_the_file_and_says_so(servers, tmp_path, pinned):
    hub, cdn = servers
    data = _bytes(30_000, seed=8)
    hub.files["/m/resolve/abc/w.safetensors"], hub.lfs = data, {"/m/resolve/abc/w.safetensors"}
    hub.files["/m/resolve/abc/config.json"] = b'{"a": 1}'
    if pinned:  # the right bytes, but not the ones the pin names
        cases = [("w.safetensors", sha256(b"other")), ("config.json", sha256(b"other"))]
    else:  # the CDN / the hub serve other bytes than the hub's published hash
        cdn.files[f"/cdn/{sha256(data)}"] = data
        hub.etags["/m/resolve/abc/config.json"] = f'"{git_sha1(b"other")}"'
        cases = [("config.json", None)]
    for name, pin in cases:
        path = tmp_path / name
        with pytest.raises(UserError, match=r"is not the file it should be: .*deleted it"):
            fe.fetch(f"{hub.url}/m/resolve/abc/{name}", path, sha256=pin, retries=0, progress=False)
        assert not path.exists() and not path.with_name(name + ".part").exists()


def test_cdn_bytes_checked_against_x_linked_etag(servers, tmp_path, monkeypatch):
    """The hub publishes the sha256 on its redirect, not on the CDN's answer; a CDN serving other bytes fails."""
    hub, cdn = servers
    data = _bytes(30_000, seed=9)
    url = "/m/resolve/abc/w.bin"
    hub.files[url], hub.lfs = data, {url}
    real = Handler.do_GET

    def corrupt_cdn(self):
        if self.server.is_cdn:
            self.server.files = {k: v[:-1] + b"!" for k, v in self.server.files.items()}
        return real(self)
    monkeypatch.setattr(Handler, "do_GET", corrupt_cdn)
    with pytest.raises(UserError, match=f"published by the server {sha256(data)}"):
        fe.fetch(hub.url + url, tmp_path / "w.bin", retries=0, progress=False)


def test_present_files_are_checked_not_downloaded_again(servers, tmp_path, monkeypatch):
    hub, cdn = servers
    want = serve_model(hub, monkeypatch, "sd15")
    dl.download(["sd15"], tmp_path, base_url=hub.url, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").rglob("*")}
    hub.log.clear()
    dl.download(["sd15"], tmp_path, base_url=hub.url, progress=False)
    assert hub.log == []  # every SD file is pinned: checked by its sha256, no request at all
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").rglob("*")}

    # A file with other bytes (same size) is fetched again.
    (tmp_path / "sd15" / BIG).write_bytes(bytes(len(want[BIG])))
    dl.download(["sd15"], tmp_path, base_url=hub.url, progress=False)
    assert tree(tmp_path / "sd15") == want

    # DINO's files have no pin: the hub's published hash decides; offline, files already there are trusted.
    want = serve_model(hub, monkeypatch, "dino")
    dl.download(["dino"], tmp_path, base_url=hub.url, progress=False)
    hub.log.clear()
    dl.download(["dino"], tmp_path, base_url=hub.url, progress=False)
    assert hub.log and all(e.range == "bytes=0-0" for e in hub.log)  # probes only
    (tmp_path / "dino-vits16" / "config.json").write_bytes(b"x" * len(want["config.json"]))
    dl.download(["dino"], tmp_path, base_url=hub.url, progress=False)
    assert tree(tmp_path / "dino-vits16") == want
    dl.download(["sd15", "dino"], tmp_path, base_url=f"http://127.0.0.1:{closed_port()}", retries=0, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Redirects, tokens, mirrors, refusals


@pytest.mark.parametrize("code", [307, 302])
def test_relative_redirect(server, tmp_path, code):
    """The hub answers a renamed repository (runwayml/... -> stable-diffusion-v1-5/...) with a relative redirect."""
    data = _bytes(20_000, seed=11)
    server.files["/new/resolve/abc/f.json"] = data
    server.redirects["/old/resolve/abc/f.json"] = (code, "/new/resolve/abc/f.json")
    assert fe.fetch(server.url + "/old/resolve/abc/f.json", tmp_path / "f.json", sha256=sha256(data),
                    retries=0, progress=False, token="tok", token_host=fe.host_of(server.url))
    assert (tmp_path / "f.json").read_bytes() == data
    assert [e.auth for e in server.log] == ["Bearer tok", "Bearer tok"]  # same host: the token follows


def test_token_goes_to_the_hub_not_to_the_cdn(servers, tmp_path, monkeypatch):
    hub, cdn = servers
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    want = serve_model(hub, monkeypatch, "clip-b32")
    cdn.cut_after[f"/cdn/{sha256(want['model.safetensors'])}"] = 10_000  # and a resume through the redirect
    dl.download(["clip-b32"], tmp_path, base_url=hub.url, retries=1, progress=False)
    assert tree(tmp_path / "clip-vit-base-patch32") == want
    assert hub.log and all(e.auth == "Bearer hf_secret" for e in hub.log)
    assert len(cdn.log) == 2 and all(e.auth is None for e in cdn.log)  # another host: no token
    assert cdn.log[1].range == "bytes=10000-"  # Range survived the redirect


def test_hf_endpoint_is_the_default_base_url(servers, tmp_path, monkeypatch):
    hub, _ = servers
    want = serve_model(hub, monkeypatch, "dino")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url}
    # The subprocess reads the real pins: serve DINO's (unpinned) files at the real URLs.
    r = subprocess.run([sys.executable, "-m", "tinyrpo.download", "dino", "--dir", str(tmp_path), "--retries", "0"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "dino-vits16") == want


@pytest.mark.parametrize("code, token, says", [
    (401, None, "set HF_TOKEN"), (401, "bad", "HF_TOKEN was not accepted"), (403, None, "gated"),
    (403, "tok", "accept the model's license"), (429, None, "HTTP 429"), (429, "tok", "HTTP 429")])
def test_refusals_say_token_and_mirror(server, tmp_path, monkeypatch, code, token, says):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    serve_model(server, monkeypatch, "dino")
    config = url_of(dl.model_files("dino")[0])
    server.fail[config] = [code] * 5
    with pytest.raises(UserError) as e:
        dl.download(["dino"], tmp_path, base_url=server.url, retries=2, progress=False)
    msg = str(e.value)
    assert says in msg and "HF_ENDPOINT" in msg and ("HF_TOKEN" in msg), msg
    if code == 429:
        assert len([x for x in server.log if x.path == config]) == 3  # retried (Retry-After: 0), then explained


def test_rate_limit_then_success(server, tmp_path, monkeypatch):
    want = serve_model(server, monkeypatch, "dino")
    server.fail[url_of(dl.model_files("dino")[1])] = [429, 503]
    dl.download(["dino"], tmp_path, base_url=server.url, retries=2, progress=False)
    assert tree(tmp_path / "dino-vits16") == want


def test_404_names_the_file_and_revision(server, tmp_path, monkeypatch):
    serve_model(server, monkeypatch, "sd15")
    del server.files[url_of(dl.model_files("sd15")[10])]  # unet/config.json
    with pytest.raises(UserError, match=rf"no unet/config\.json at revision {dl.SD15_REVISION}.*404"):
        dl.download(["sd15"], tmp_path, base_url=server.url, retries=0, progress=False)


def test_disk_full_and_unwritable(server, tmp_path, monkeypatch):
    server.files["/f.bin"] = b"x" * 5000
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot create folder"):
        fe.fetch(server.url + "/f.bin", tmp_path / "file" / "sub" / "f.bin", retries=0, progress=False)
    monkeypatch.setattr(fe.shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(UserError, match="disk space"):
        fe.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)


def test_bad_base_url(tmp_path):
    with pytest.raises(UserError, match="https://"):
        dl.download(["clip-b32"], tmp_path, base_url="huggingface.co", progress=False)


# ---------------------------------------------------------------------------------------------------------
# DreamBench


def _dreambench_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("dreambooth-main/README.md", "repo readme")
        z.writestr("dreambooth-main/dataset/prompts_and_classes.txt", "Classes\n\nsubject_name,class\ndog,dog\n")
        z.writestr("dreambooth-main/dataset/references_and_licenses.txt", "refs")
        z.writestr("dreambooth-main/dataset/dog/00.jpg", b"\xff\xd8dog0")
        z.writestr("dreambooth-main/dataset/dog/01.jpg", b"\xff\xd8dog1")
        z.writestr("dreambooth-main/dataset/cat/00.jpg", b"\xff\xd8cat0")
        z.writestr("dreambooth-main/dataset/../../evil.txt", "outside")
    return buf.getvalue()


def test_dreambench_extracts_into_refs(server, tmp_path):
    server.files["/" + dl.DREAMBENCH_ZIP] = _dreambench_zip()
    refs = tmp_path / "refs"
    out = dl.download(["dreambench"], tmp_path / "w", refs=refs, github_url=server.url, progress=False)
    assert out == {"dreambench": refs}
    assert (refs / "dog" / "00.jpg").read_bytes() == b"\xff\xd8dog0"
    assert set(tree(refs)) == {"prompts_and_classes.txt", "references_and_licenses.txt",
                               "dog/00.jpg", "dog/01.jpg", "cat/00.jpg"}  # zip removed, nothing else
    assert not (tmp_path / "evil.txt").exists()
    server.log.clear()
    dl.download_dreambench(refs, github_url=server.url, progress=False)  # already there: no request
    assert server.log == []


def test_dreambench_wrong_zip(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("other-main/README.md", "not dreambooth")
    server.files["/" + dl.DREAMBENCH_ZIP] = buf.getvalue()
    with pytest.raises(UserError, match="github-url"):
        dl.download_dreambench(tmp_path / "refs", github_url=server.url, progress=False)
    assert not (tmp_path / "refs" / "dreambooth-main.zip").exists()  # a rerun fetches it again


def test_dreambench_not_a_zip(server, tmp_path):
    server.files["/" + dl.DREAMBENCH_ZIP] = b"<html>rate limited</html>"
    with pytest.raises(UserError, match="not a valid zip"):
        dl.download_dreambench(tmp_path / "refs", github_url=server.url, progress=False)
    assert not (tmp_path / "refs" / "dreambooth-main.zip").exists()


# ---------------------------------------------------------------------------------------------------------
# Messages and the command


def test_missing_weights_message():
    m = dl.missing_weights_message("sd15", paths.DEFAULT_SD)
    assert "`python -m tinyrpo.download sd15`" in m and "--weights PATH" in m and "4.3 GB" in m
    m = dl.missing_weights_message("clip-l14", "/data/w/clip-vit-large-patch14", flag="--reward-clip")
    assert "download clip-l14 --dir /data/w`" in m and "--reward-clip PATH" in m
    assert "download dino`" in dl.missing_weights_message("dino", paths.DEFAULT_DINO)
    assert "download dreambench`" in dl.missing_weights_message("dreambench", paths.DEFAULT_REFS)
    assert paths.DEFAULT_EVAL_CLIP.endswith(dl.MODELS["clip-b32"][1])


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinyrpo.download", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_help(tmp_path):
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for flag in ("--dir", "--base-url", "--fp16", "--github-url", "--refs", "--retries", "dreambench", "HF_TOKEN",
                 "HF_ENDPOINT", "sha256"):
        assert flag in r.stdout


def test_cli_unreachable_is_one_line(tmp_path):
    r = _cli("sd15", "--base-url", f"http://127.0.0.1:{closed_port()}", "--retries", "0", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not reach 127.0.0.1") and "README" in lines[0]
