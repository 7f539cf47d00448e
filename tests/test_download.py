"""tinyrpo.download against a local HTTP server that mimics the hub's URL layout (never the internet)."""
import io
import os
import random
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import tinyrpo.download as dl
from tinyrpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BIG = "unet/diffusion_pytorch_model.safetensors"


def _bytes(n, seed):
    return random.Random(seed).randbytes(n)


class Handler(BaseHTTPRequestHandler):
    """Serves server.files {raw URL path: bytes}; honours Range unless server.honor_range is False;
    on the first request of a path in server.cut_after it sends only that many bytes and hangs up."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and srv.honor_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        end = len(data)
        if rng == "bytes=0-0" and srv.honor_range:
            end = 1
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        body = data[start:end]
        cut = srv.cut_after.pop(self.path, None)
        if cut is not None:  # an interrupted transfer: the promised length never arrives
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.log, srv.cut_after, srv.honor_range = {}, [], {}, True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


def serve_sd15(srv, fp16=False, big=300_000):
    """The SD v1.5 diffusers files, small; returns {relative path: bytes}."""
    files = {}
    for i, f in enumerate(dl.model_files("sd15", fp16)):
        files[f] = _bytes(big if f.endswith(".safetensors") else 50 + i, seed=i)
        srv.files[f"/{SD_REPO}/resolve/main/{f}"] = files[f]
    return files


def closed_port():
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("fp16", [False, True])
def test_sd15_full_tree(server, tmp_path, fp16):
    want = serve_sd15(server, fp16)
    out = dl.download(["sd15"], tmp_path / "w", base_url=server.url, fp16=fp16, progress=False)
    assert out == {"sd15": tmp_path / "w" / "sd15"}
    assert tree(tmp_path / "w" / "sd15") == want
    assert len(want) == 12
    assert ("unet/diffusion_pytorch_model.fp16.safetensors" in want) == fp16


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    want = serve_sd15(server)
    server.cut_after[f"/{SD_REPO}/resolve/main/{BIG}"] = 100_000
    with pytest.raises(UserError, match="resume"):
        dl.download(["sd15"], tmp_path, base_url=server.url, retries=0, progress=False)
    part = tmp_path / "sd15" / (BIG + ".part")
    assert part.stat().st_size == 100_000 and not (tmp_path / "sd15" / BIG).exists()

    server.log.clear()
    dl.download(["sd15"], tmp_path, base_url=server.url, retries=0, progress=False)
    assert (f"/{SD_REPO}/resolve/main/{BIG}", "bytes=100000-") in server.log
    assert tree(tmp_path / "sd15") == want  # identical bytes, no .part left


def test_retry_resumes_within_one_call(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "RETRY_WAIT", 0.0)
    data = _bytes(250_000, seed=7)
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = 70_000
    assert dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=2, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.log == [("/f.bin", None), ("/f.bin", "bytes=70000-")]


def test_server_ignoring_range_restarts(server, tmp_path):
    data = _bytes(200_000, seed=3)
    server.files["/f.bin"] = data
    server.cut_after["/f.bin"] = 50_000
    server.honor_range = False
    with pytest.raises(UserError):
        dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 50_000
    assert dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert server.log[-1] == ("/f.bin", "bytes=50000-")  # asked for the rest, got a 200 with everything
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()


def test_complete_part_is_renamed(server, tmp_path):
    data = _bytes(1000, seed=4)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)  # interrupted between the last byte and the rename
    dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_404_names_the_file(server, tmp_path):
    serve_sd15(server)
    del server.files[f"/{SD_REPO}/resolve/main/unet/config.json"]
    with pytest.raises(UserError, match=r"unet/config\.json.*404"):
        dl.download(["sd15"], tmp_path, base_url=server.url, retries=0, progress=False)


def test_present_files_are_not_downloaded_again(server, tmp_path):
    want = serve_sd15(server)
    dl.download(["sd15"], tmp_path, base_url=server.url, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").rglob("*")}
    server.log.clear()
    dl.download(["sd15"], tmp_path, base_url=server.url, progress=False)
    assert server.log and all(rng == "bytes=0-0" for _, rng in server.log)  # size probes only
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "sd15").rglob("*")}

    # A file whose size differs from the server's is fetched again.
    (tmp_path / "sd15" / BIG).write_bytes(b"truncated")
    dl.download(["sd15"], tmp_path, base_url=server.url, progress=False)
    assert tree(tmp_path / "sd15") == want

    # Offline, files already there are trusted.
    dl.download(["sd15"], tmp_path, base_url=f"http://127.0.0.1:{closed_port()}", retries=0, progress=False)


@pytest.mark.parametrize("served", ["main/model.safetensors", "refs%2Fpr%2F1/model.safetensors",
                                    "main/pytorch_model.bin"])
def test_dino_falls_back(server, tmp_path, served):
    repo = "/facebook/dino-vits16/resolve/"
    server.files[repo + "main/config.json"] = b"{}"
    server.files[repo + served] = b"weights"
    dl.download(["dino"], tmp_path, base_url=server.url, retries=0, progress=False)
    assert tree(tmp_path / "dino-vits16") == {"config.json": b"{}", served.split("/")[-1]: b"weights"}
    server.log.clear()  # a second run keeps the fallback file and fetches nothing
    dl.download(["dino"], tmp_path, base_url=server.url, retries=0, progress=False)
    assert all(rng == "bytes=0-0" for _, rng in server.log)
    assert len(list((tmp_path / "dino-vits16").iterdir())) == 2


def test_nothing_found_is_one_user_error(server, tmp_path):
    with pytest.raises(UserError, match="dino-vits16"):
        dl.download(["dino"], tmp_path, base_url=server.url, retries=0, progress=False)


def test_disk_full_and_unwritable(server, tmp_path, monkeypatch):
    server.files["/f.bin"] = b"x" * 5000
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot create folder"):
        dl.fetch(server.url + "/f.bin", tmp_path / "file" / "sub" / "f.bin", retries=0, progress=False)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(UserError, match="disk space"):
        dl.fetch(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)


def test_bad_base_url(tmp_path):
    with pytest.raises(UserError, match="https://"):
        dl.download(["clip-b32"], tmp_path, base_url="huggingface.co", progress=False)


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


def test_missing_weights_message():
    m = dl.missing_weights_message("sd15", dl.DEFAULT_SD)
    assert "`python -m tinyrpo.download sd15`" in m and "--weights PATH" in m and "4.3 GB" in m
    m = dl.missing_weights_message("clip-l14", "/data/w/clip-vit-large-patch14", flag="--reward-clip")
    assert "download clip-l14 --dir /data/w`" in m and "--reward-clip PATH" in m
    assert "download dino`" in dl.missing_weights_message("dino", dl.DEFAULT_DINO)
    assert "download dreambench`" in dl.missing_weights_message("dreambench", dl.DEFAULT_REFS)
    assert dl.DEFAULT_EVAL_CLIP.endswith(dl.MODELS["clip-b32"][1])


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinyrpo.download", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_help(tmp_path):
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for flag in ("--dir", "--base-url", "--fp16", "--github-url", "--refs", "--retries", "dreambench"):
        assert flag in r.stdout


def test_cli_unreachable_is_one_line(tmp_path):
    r = _cli("sd15", "--base-url", f"http://127.0.0.1:{closed_port()}", "--retries", "0", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not reach 127.0.0.1") and "README" in lines[0]
