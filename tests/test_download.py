"""The download across mirrors (common.data.mirrors), against misbehaving servers on 127.0.0.1.

Each kind of failure a real mirror can show has its own local stand-in: a closed port
(down), a socket that accepts and never answers (timeout), a body cut short, the wrong
bytes, and a redirect to another local server.  The tests prove that every file is taken
from the next mirror when one fails, that the final error lists every mirror with its
reason, and that nothing is ever left under a final name (or as a temporary) after a
failure.  Nothing here reaches the internet: ``mirrors`` are always given explicitly or
the built-in list is emptied.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import numpy as np
import pytest

from common import cli, data
from common.data import DataError

TIMEOUT = 1.0  # seconds: the stalled mirror's cost per attempt; the live ones answer in ms


def _gz_idx(array: np.ndarray, folder: Path) -> bytes:
    path = folder / "body.gz"
    data.write_idx(path, array)
    return path.read_bytes()


@pytest.fixture
def bodies(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small stand-ins for the four files (gzip bodies by name), with FILES patched to their digests."""
    folder = tmp_path_factory.mktemp("bodies")
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(6) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(3) % 10).astype(np.uint8),
    }
    result, specs = {}, {}
    for role, spec in data.official.FILES.items():
        body = _gz_idx(arrays[role], folder)
        result[spec.name] = body
        specs[role] = dataclasses.replace(
            spec, sha256=hashlib.sha256(gzip.decompress(body)).hexdigest(), count=len(arrays[role])
        )
    for owner in (data.official, data):  # where the modules read it, and the package's view
        monkeypatch.setattr(owner, "FILES", MappingProxyType(specs))
    for var in ("no_proxy", "NO_PROXY"):  # never route 127.0.0.1 through a proxy from the env
        monkeypatch.setenv(var, "*")
    return result


@pytest.fixture
def servers(bodies: dict[str, bytes], tmp_path_factory) -> Iterator[Callable[..., SimpleNamespace]]:
    """``start(behaviour, target=None)`` runs one local mirror and returns its ``url`` and ``requests``.

    ok: serve the file.  wrong: a valid gzip of other bytes.  truncate: announce the
    full Content-Length, send half, close.  301/302: redirect to ``target``'s URL for the
    same file.  timeout: a listening socket that accepts and never answers.  down: a
    port with nothing listening.
    """
    wrong = _gz_idx(np.ones(3, dtype=np.uint8), tmp_path_factory.mktemp("wrong"))
    stoppers: list[Callable[[], None]] = []

    def start(behaviour: str, target: SimpleNamespace | None = None) -> SimpleNamespace:
        state = SimpleNamespace(requests=[], url="")
        if behaviour in ("down", "timeout"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            state.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
            if behaviour == "down":
                sock.close()  # connection refused from now on
            else:
                sock.listen(16)  # the kernel completes the handshake; no one ever reads
                stoppers.append(sock.close)
            return state

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                state.requests.append(name)
                if behaviour in ("301", "302"):
                    self.send_response(int(behaviour))
                    self.send_header("Location", target.url + name)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = bodies.get(name)
                if body is None:
                    self.send_error(404)
                    return
                body = wrong if behaviour == "wrong" else body
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if behaviour == "truncate" else body)

            def log_message(self, *args: object) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        state.url = f"http://127.0.0.1:{httpd.server_port}/"

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

        stoppers.append(stop)
        return state

    yield start
    for stop in reversed(stoppers):
        stop()


def _download(dest: Path, mirrors: list[str], **kwargs) -> Path:
    options = {"retries": 0, "timeout": TIMEOUT, "progress": False, "backoff": 0} | kwargs
    return data.download(dest, mirrors, **options)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_every_kind_of_failing_mirror_falls_back_to_the_next(servers, bodies, tmp_path: Path) -> None:
    good = servers("ok")
    wrong = servers("wrong")
    failing = [servers("down"), servers("timeout"), servers("truncate"), wrong, servers("302", target=wrong)]
    dest = tmp_path / "cache"
    assert _download(dest, [m.url for m in failing] + [good.url]) == dest
    assert _names(dest) == sorted(bodies)  # the files, no temporaries
    for name, body in bodies.items():
        assert (dest / name).read_bytes() == body
    truncating, redirecting = failing[2], failing[4]
    order = list(bodies)  # each file goes through the mirrors in the order given
    assert truncating.requests == redirecting.requests == good.requests == order
    assert wrong.requests == [name for name in order for _ in range(2)]  # directly, then redirected
    data.load(dest, verify=True)


@pytest.mark.parametrize("status", ["301", "302"])
def test_redirect_is_followed_and_still_checked(servers, bodies, tmp_path: Path, status: str) -> None:
    good = servers("ok")
    _download(tmp_path, [servers(status, target=good).url])
    assert good.requests == list(bodies)
    assert _names(tmp_path) == sorted(bodies)
    wrong = servers("wrong")
    with pytest.raises(DataError, match=r"sent the wrong bytes: decompressed SHA-256"):
        _download(tmp_path / "second", [servers(status, target=wrong).url])
    assert _names(tmp_path / "second") == []


def test_all_mirrors_failing_is_one_error_listing_each_and_leaves_nothing(servers, bodies, tmp_path: Path) -> None:
    wrong = servers("wrong")
    mirrors = {
        "down": servers("down"),
        "timeout": servers("timeout"),
        "truncate": servers("truncate"),
        "wrong": wrong,
        "redirect": servers("301", target=wrong),
    }
    dest = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        _download(dest, [m.url for m in mirrors.values()], retries=1)
    lines = str(info.value).splitlines()
    first = next(iter(bodies))
    assert lines[0].startswith(f"{first}: could not be downloaded from any of 5 mirror(s)")
    tried = lines[1:6]
    assert [line.split(" -> ")[0] for line in tried] == [f"  {first}: {m.url}" for m in mirrors.values()]
    reasons = dict(zip(mirrors, (line.split(" -> ", 1)[1] for line in tried)))
    assert reasons["down"] == "2 attempt(s) failed, last error: Connection refused"
    assert reasons["timeout"] == "2 attempt(s) failed, last error: timed out"
    assert reasons["truncate"].startswith("2 attempt(s) failed, last error: connection closed after")
    wrong_sha = hashlib.sha256(gzip.decompress(_gz_idx(np.ones(3, np.uint8), tmp_path))).hexdigest()
    for name in ("wrong", "redirect"):
        assert reasons[name] == (
            f"sent the wrong bytes: decompressed SHA-256 {wrong_sha}, "
            f"expected {data.FILES['train_images'].sha256}; refused"
        )
    assert data.MIRROR_ENV_VAR in lines[6] and len(lines) == 7
    assert _names(dest) == []  # nothing under a final name, no temporary either


def test_a_later_file_failing_keeps_the_earlier_ones_and_names_the_file(servers, bodies, tmp_path: Path) -> None:
    good = servers("ok")
    last = list(bodies)[-1]
    del bodies[last]  # the one mirror has every file but the last: HTTP 404 for it
    with pytest.raises(DataError) as info:
        _download(tmp_path, [good.url])
    assert str(info.value).splitlines()[1] == f"  {last}: {good.url} -> HTTP 404 Not Found"
    assert _names(tmp_path) == sorted(bodies)  # the verified files stay; the missing one is absent
    assert good.requests == list(bodies) + [last]  # a 404 is not retried


def test_user_mirrors_come_first_and_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.MIRROR_ENV_VAR, "https://a.example/fm, http://b.example/x/")
    assert data.mirror_list() == ("https://a.example/fm/", "http://b.example/x/", *data.MIRRORS)
    monkeypatch.setenv(data.MIRROR_ENV_VAR, data.MIRRORS[1])  # no duplicate when one is repeated
    assert data.mirror_list() == (data.MIRRORS[1], data.MIRRORS[0], *data.MIRRORS[2:])
    assert data.mirror_list("http://given.example") == ("http://given.example/",)  # given: only those
    monkeypatch.setenv(data.MIRROR_ENV_VAR, "ftp://a.example/")
    with pytest.raises(DataError, match=rf"^{data.MIRROR_ENV_VAR}: 'ftp://a.example/' is not an http"):
        data.mirror_list()
    with pytest.raises(DataError, match="no download mirror given"):
        data.mirror_list([])


def test_default_mirrors_use_a_scheme_each_host_serves() -> None:
    # S3 *website* endpoints answer plain HTTP only; an https:// URL there can never work.
    s3 = [url for url in data.MIRRORS if ".s3-website" in url]
    assert s3 == ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
    assert data.MIRRORS[0] == data.MIRROR_URL == s3[0]
    others = [url for url in data.MIRRORS if url not in s3]
    assert others and all(url.startswith("https://") and url.endswith("/") for url in others)


def test_cli_shows_every_mirror_without_a_traceback(
    servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    down, wrong = servers("down"), servers("wrong")
    monkeypatch.setattr(data.mirrors, "MIRRORS", ())  # the built-in list would reach the internet
    monkeypatch.setattr(data.dataset, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(data.MIRROR_ENV_VAR, f"{down.url} {wrong.url}")
    code = cli.main(["compare", "--backends", "pt", "--no-progress", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert err.startswith("alexnet compare: error: ") and "Traceback" not in err
    assert f"{down.url} -> " in err and f"{wrong.url} -> sent the wrong bytes" in err
    assert _names(tmp_path / "xdg" / "alexnet" / "fashion-mnist") == []
