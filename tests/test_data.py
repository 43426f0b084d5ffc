"""Tests for common.data: IDX I/O, download, locate, load, batch order, resize and preprocessing.

Nothing here touches the internet: the downloader is exercised against a local
http.server on 127.0.0.1, and every locate()/load() call that could fall through
to a download has ``download`` replaced.  The real Fashion-MNIST files are used
when present (``$ALEXNET_DATA_DIR`` or ``<workspace>/shared/data/fashion-mnist``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import numpy as np
import pytest

from common import data, io
from common.data import DataError

N_TRAIN, N_TEST = 12, 5


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX bytes built without write_idx, so the reader is not only tested against the writer."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _small_arrays(n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_dataset(directory: Path, **overrides: np.ndarray) -> dict[str, Path]:
    """Write a small, well-formed data set (with optional per-role replacements) as .gz files."""
    arrays = _small_arrays() | overrides
    paths = {role: directory / spec.name for role, spec in data.FILES.items()}
    for role, path in paths.items():
        data.write_idx(path, arrays[role])
    return paths


# ------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 5, 4)])
def test_idx_round_trip(tmp_path: Path, compress: bool, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "a.idx"
    data.write_idx(path, array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    out = data.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["a.idx"]  # no temp file left behind


def test_write_idx_compresses_by_name_and_read_detects_by_magic(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    data.write_idx(tmp_path / "x.gz", array)
    data.write_idx(tmp_path / "y", array)
    data.write_idx(tmp_path / "raw-but-named.gz", array, compress=False)
    assert (tmp_path / "x.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "y").read_bytes() == _idx_bytes(array)
    for name in ("x.gz", "y", "raw-but-named.gz"):
        np.testing.assert_array_equal(data.read_idx(tmp_path / name), array)


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"labels\.idx: .*int64"):
        data.write_idx(tmp_path / "labels.idx", np.arange(3))
    assert list(tmp_path.iterdir()) == []


_VALID = _idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00\x09\x03" + _VALID[4:], r"bad IDX magic 0x00000903"),
        (b"\x08\x03\x00\x00" + _VALID[4:], r"bad IDX magic 0x08030000"),
        (b"\x00\x00\x08\x00", r"bad IDX magic"),
        (b"\x00\x00", r"too short"),
        (_VALID[:10], r"truncated IDX header: 10 bytes, a 3-D header needs 16"),
        (_VALID[:-3], r"truncated: 37 bytes, dims \(2, 3, 4\) need 40 \(3 missing\)"),
        (_VALID + b"xy", r"2 trailing bytes: 42 bytes, dims \(2, 3, 4\) need exactly 40"),
        (_idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8)), r"dimension of size 0"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_malformed(
    tmp_path: Path, content: bytes, message: str, compress: bool
) -> None:
    path = tmp_path / "bad-file-idx3-ubyte"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        data.read_idx(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: gz[: len(gz) // 2],
        lambda gz: gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:],
    ],
    ids=["truncated-gzip", "flipped-bytes"],
)
def test_read_idx_rejects_corrupt_gzip(tmp_path: Path, damage) -> None:
    path = tmp_path / "corrupt.gz"
    content = _idx_bytes(np.random.default_rng(2).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    path.write_bytes(damage(gzip.compress(content)))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*corrupt gzip"):
        data.read_idx(path)


# ------------------------------------------------------------------------ load


def test_load_small_files(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    ds = data.FashionMNIST.load(tmp_path, verify=False, download_missing=False)
    expected = _small_arrays()
    for role in data.FILES:
        np.testing.assert_array_equal(getattr(ds, role), expected[role])
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (N_TRAIN, 28, 28)
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.train_images = ds.test_images  # type: ignore[misc]
    np.testing.assert_array_equal(data.load(tmp_path, verify=False).test_images, ds.test_images)


def test_load_accepts_decompressed_files(tmp_path: Path) -> None:
    arrays = _small_arrays()
    for role, spec in data.FILES.items():
        data.write_idx(tmp_path / spec.raw_name, arrays[role])
    ds = data.load(tmp_path, verify=False)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])


def test_load_label_out_of_range(tmp_path: Path) -> None:
    labels = _small_arrays()["train_labels"].copy()
    labels[[3, 7]] = [10, 200]
    _write_dataset(tmp_path, train_labels=labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 10 at index 3 "):
        data.load(tmp_path, verify=False)


def test_load_count_mismatch_names_both_files(tmp_path: Path) -> None:
    _write_dataset(tmp_path, test_labels=np.zeros(N_TEST - 1, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        data.load(tmp_path, verify=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz has 5 images" in message
    assert "t10k-labels-idx1-ubyte.gz has 4 labels" in message


def test_load_rejects_wrong_image_size_and_rank(tmp_path: Path) -> None:
    _write_dataset(tmp_path, train_images=np.zeros((N_TRAIN, 27, 28), dtype=np.uint8))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\.gz: images are 27x28, expected 28x28"
    ):
        data.load(tmp_path, verify=False)
    _write_dataset(tmp_path, test_images=np.zeros(N_TEST, dtype=np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: expected a 3-D IDX file"):
        data.load(tmp_path, verify=False)


def test_load_verify_rejects_checksum_mismatch(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    with pytest.raises(DataError) as info:
        data.load(tmp_path, verify=True)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert data.FILES["train_images"].sha256 in message
    assert "delete it" in message


# --------------------------------------------------------------------- download


@pytest.fixture
def small_remote(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Gzip bodies of a small data set, with FILES patched to their decompressed SHA-256s."""
    arrays = _small_arrays()
    bodies, specs = {}, {}
    for role, spec in data.FILES.items():
        raw = _idx_bytes(arrays[role])
        bodies[spec.name] = gzip.compress(raw)
        specs[role] = dataclasses.replace(
            spec, sha256=hashlib.sha256(raw).hexdigest(), count=len(arrays[role])
        )
    # Patched where it is defined (the modules read it there) and in the package's view.
    for owner in (data.official, data):
        monkeypatch.setattr(owner, "FILES", MappingProxyType(specs))
    return bodies


@pytest.fixture
def server(
    small_remote: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> Iterator[SimpleNamespace]:
    """A local HTTP server for the small files; ``behaviour`` selects how it misbehaves.

    ok: serve the file.  wrong: serve a different, valid gzip.  truncate: announce
    the full Content-Length but close after half the body.  stall: send half the
    body, then hang until ``release`` is set.  drop / 503: fail the first request
    for each file (closed without a response / HTTP 503), then serve.
    """
    state = SimpleNamespace(
        behaviour="ok", requests=[], url="", half_sent=threading.Event(), release=threading.Event()
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            state.requests.append(name)
            body = small_remote.get(name)
            if body is None:
                self.send_error(404)
                return
            first = state.requests.count(name) == 1
            if state.behaviour == "drop" and first:
                return  # the server closes the socket without sending a status line
            if state.behaviour == "503" and first:
                self.send_error(503)
                return
            if state.behaviour == "wrong":
                body = gzip.compress(_idx_bytes(np.ones(3, dtype=np.uint8)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.behaviour in ("truncate", "stall"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                state.half_sent.set()
                if state.behaviour == "stall":
                    state.release.wait(timeout=30)
            else:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    for var in ("no_proxy", "NO_PROXY"):  # never route 127.0.0.1 through a proxy from the env
        monkeypatch.setenv(var, "*")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}/"
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _download(server: SimpleNamespace, dest: Path, **kwargs: object) -> Path:
    options = {"retries": 2, "timeout": 10, "progress": False, "backoff": 0} | kwargs
    return data.download(dest, server.url, **options)


def test_download_success_and_no_refetch(
    server: SimpleNamespace, small_remote: dict[str, bytes], tmp_path: Path
) -> None:
    dest = tmp_path / "cache" / "fm"
    assert _download(server, dest, progress=True) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(small_remote)
    for name, body in small_remote.items():
        assert (dest / name).read_bytes() == body
    assert len(server.requests) == 4
    ds = data.load(dest, verify=True)
    assert ds.train_images.shape == (N_TRAIN, 28, 28)
    _download(server, dest)
    assert len(server.requests) == 4  # everything present and valid: nothing fetched


def test_download_replaces_invalid_existing_file(server: SimpleNamespace, tmp_path: Path) -> None:
    _download(server, tmp_path)
    name = data.FILES["train_labels"].name
    (tmp_path / name).write_bytes(b"garbage")
    _download(server, tmp_path)
    assert server.requests[4:] == [name]
    data.load(tmp_path, verify=True)


def test_download_refuses_wrong_bytes(server: SimpleNamespace, tmp_path: Path) -> None:
    server.behaviour = "wrong"
    dest = tmp_path / "dl"
    spec = data.FILES["train_images"]
    wrong = hashlib.sha256(_idx_bytes(np.ones(3, dtype=np.uint8))).hexdigest()
    with pytest.raises(DataError) as info:
        _download(server, dest)
    message = str(info.value)
    assert spec.name in message and spec.sha256 in message and wrong in message
    assert server.requests == [spec.name]  # a checksum mismatch is not retried
    assert list(dest.iterdir()) == []


def test_download_connection_cut_mid_file(server: SimpleNamespace, tmp_path: Path) -> None:
    server.behaviour = "truncate"
    name = data.FILES["train_images"].name
    with pytest.raises(DataError, match=re.escape(name) + r".*3 attempt\(s\) failed.*closed after"):
        _download(server, tmp_path, retries=2)
    assert server.requests == [name] * 3
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError):
        data.locate(tmp_path, download_missing=False)


def test_download_killed_mid_file_leaves_nothing_under_final_name(
    server: SimpleNamespace, tmp_path: Path
) -> None:
    server.behaviour = "stall"
    repo = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    code = "import sys; from common import data; data.download(*sys.argv[1:], progress=False)"
    env = os.environ | {"PYTHONPATH": pythonpath}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), server.url], env=env, cwd=repo
    )
    try:
        assert server.half_sent.wait(timeout=20), "the download never started"
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    # the temporary file was created before the request was sent, so one is left
    assert leftovers and all(name.startswith(io.TEMP_PREFIX) for name in leftovers), leftovers
    with pytest.raises(DataError):
        data.locate(tmp_path, download_missing=False)
    server.behaviour = "ok"
    _download(server, tmp_path)  # a later run is not confused by the stale temp file, and removes it
    data.load(tmp_path, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.name for s in data.FILES.values())


@pytest.mark.parametrize("behaviour", ["drop", "503"])
def test_download_recovers_from_transient_failure(
    server: SimpleNamespace, small_remote: dict[str, bytes], tmp_path: Path, behaviour: str
) -> None:
    server.behaviour = behaviour
    _download(server, tmp_path, retries=1)
    assert sorted(server.requests) == sorted(list(small_remote) * 2)
    data.load(tmp_path, verify=True)


def test_download_http_404_is_not_retried(server: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: .*missing/.* HTTP 404"):
        data.download(
            tmp_path, server.url + "missing/", retries=3, timeout=10, progress=False, backoff=0
        )
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- locate


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Isolated env var / cache / Debian locations, and a fake download that records its target."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data.dataset, "DEBIAN_DIR", tmp_path / "debian")
    downloads: list[Path] = []

    def fake_download(dest_dir: Path, *args: object, **kwargs: object) -> Path:
        downloads.append(Path(dest_dir))
        _write_dataset(Path(dest_dir))
        return Path(dest_dir)

    monkeypatch.setattr(data.mirrors, "download", fake_download)
    return SimpleNamespace(
        env=tmp_path / "env",
        cache=tmp_path / "xdg" / "alexnet" / "fashion-mnist",
        debian=tmp_path / "debian",
        explicit=tmp_path / "explicit",
        downloads=downloads,
    )


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "alexnet" / "fashion-mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "alexnet" / "fashion-mnist"


def test_locate_order(places: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    for directory in (places.explicit, places.env, places.cache, places.debian):
        _write_dataset(directory)
    monkeypatch.setenv(data.ENV_VAR, str(places.env))
    assert data.locate(places.explicit) == places.explicit
    assert data.locate() == places.env
    monkeypatch.delenv(data.ENV_VAR)
    assert data.locate() == places.cache
    for spec in data.FILES.values():
        (places.cache / spec.name).unlink()
    assert data.locate() == places.debian
    assert places.downloads == []


def test_locate_env_without_data_warns_and_falls_through(
    places: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_dataset(places.debian)
    monkeypatch.setenv(data.ENV_VAR, str(places.env))
    with pytest.warns(UserWarning, match=re.escape(str(places.env))):
        assert data.locate() == places.debian


def test_locate_explicit_dir_missing_files_is_an_error(
    places: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_dataset(places.env)
    monkeypatch.setenv(data.ENV_VAR, str(places.env))
    _write_dataset(places.explicit)
    (places.explicit / data.FILES["test_labels"].name).unlink()
    with pytest.raises(
        DataError, match=re.escape(str(places.explicit)) + ".*t10k-labels-idx1-ubyte.gz"
    ):
        data.locate(places.explicit)
    assert places.downloads == []


def test_locate_accepts_decompressed_names(places: SimpleNamespace) -> None:
    arrays = _small_arrays()
    for role, spec in data.FILES.items():
        data.write_idx(places.debian / spec.raw_name, arrays[role])
    assert data.locate() == places.debian


def test_locate_downloads_into_cache_or_says_where_it_looked(places: SimpleNamespace) -> None:
    with pytest.raises(DataError) as info:
        data.locate(download_missing=False)
    assert str(places.cache) in str(info.value) and str(places.debian) in str(info.value)
    assert places.downloads == []
    assert data.locate() == places.cache
    assert places.downloads == [places.cache]
    assert data.load(verify=False).train_labels.shape == (N_TRAIN,)


# ------------------------------------------------------------------ batch order


def test_epoch_order_is_pinned() -> None:
    # The order is part of the cross-framework contract; a numpy change to it must be noticed.
    order = data.epoch_order(10, 0, 0)
    assert order.dtype == np.int64
    assert order.tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]


def test_batch_indices_deterministic_and_a_permutation() -> None:
    n, bs = 103, 10
    first = list(data.batch_indices(n, bs, seed=7, epoch=2))
    again = list(data.batch_indices(n, bs, seed=7, epoch=2))
    other_epoch = list(data.batch_indices(n, bs, seed=7, epoch=3))
    other_seed = list(data.batch_indices(n, bs, seed=8, epoch=2))
    assert len(first) == data.num_batches(n, bs, drop_last=False) == 11
    assert [len(b) for b in first] == [10] * 10 + [3]
    assert all(b.dtype == np.int64 for b in first)
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(n))
    np.testing.assert_array_equal(np.concatenate(first), data.epoch_order(n, 7, 2))


def test_batch_indices_drop_last_and_no_shuffle() -> None:
    dropped = list(data.batch_indices(103, 10, 0, 0, drop_last=True))
    assert len(dropped) == data.num_batches(103, 10, drop_last=True) == 10
    assert all(len(b) == 10 for b in dropped)
    plain = list(data.batch_indices(25, 10, 0, 0, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(25))


@pytest.mark.parametrize("k", [0, 1, 5, 10, 11])
def test_batch_indices_start_batch_resumes_exactly(k: int) -> None:
    full = list(data.batch_indices(103, 10, seed=3, epoch=1))
    resumed = list(data.batch_indices(103, 10, seed=3, epoch=1, start_batch=k))
    assert len(resumed) == len(full) - k
    for a, b in zip(full[k:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_indices_checks_arguments_eagerly() -> None:
    with pytest.raises(ValueError, match="start_batch"):
        data.batch_indices(10, 3, 0, 0, start_batch=5)
    with pytest.raises(ValueError, match="batch_size"):
        data.num_batches(10, 0, drop_last=False)


# ------------------------------------------------------------ resize, preprocess


@pytest.mark.parametrize("dst", [224, 112, 65, 28, 20])
def test_resize_matrix_matches_torch_bilinear(dst: int) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(dst).random((3, 1, 28, 28), dtype=np.float32)
    r = data.resize_matrix(28, dst)
    got = r.astype(np.float64) @ x.astype(np.float64) @ r.T.astype(np.float64)
    # torch in float64 is the exact reference (observed difference ~6e-8).  In float32
    # torch's own source coordinates are rounded, which alone moves it ~1e-6 from
    # exact for scales like 28/65 or 28/20, hence the looser bound there.
    for dtype, atol in ((torch.float64, 1e-6), (torch.float32, 2e-6)):
        expected = (
            torch.nn.functional.interpolate(
                torch.from_numpy(x).to(dtype), size=(dst, dst), mode="bilinear", align_corners=False
            )
            .double()
            .numpy()
        )
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=str(dtype))


def test_resize_matrix_properties() -> None:
    for src, dst in [(28, 224), (28, 65), (28, 20), (5, 5)]:
        r = data.resize_matrix(src, dst)
        assert r.dtype == np.float32 and r.shape == (dst, src)
        np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-6)
        assert (r >= 0).all() and ((r > 0).sum(axis=1) <= 2).all()
    np.testing.assert_array_equal(data.resize_matrix(7, 7), np.eye(7, dtype=np.float32))


def test_preprocess_matches_torch_pipeline() -> None:
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(5).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    out = data.preprocess(images, (224, 65))
    assert out.dtype == np.float32 and out.shape == (4, 1, 224, 65) and out.flags.c_contiguous
    t = torch.from_numpy(images).float().div(255).unsqueeze(1)
    t = torch.nn.functional.interpolate(t, size=(224, 65), mode="bilinear", align_corners=False)
    expected = ((t - data.NORMALIZE_MEAN) / data.NORMALIZE_STD).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_preprocess_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.preprocess(np.zeros((1, 28, 28), dtype=np.float32), (32, 32))


# ----------------------------------------------------------------- real files


def _real_data_dir() -> Path:
    env = os.environ.get(data.ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"


@pytest.fixture(scope="module")
def real() -> data.FashionMNIST:
    directory = _real_data_dir()
    try:
        data.locate(directory, download_missing=False)
    except DataError as e:
        pytest.skip(f"real Fashion-MNIST not available ({e}); set {data.ENV_VAR} to its directory")
    return data.load(directory, verify=True, download_missing=False)


def test_real_shapes_and_class_balance(real: data.FashionMNIST) -> None:
    assert real.train_images.shape == (60000, 28, 28) and real.train_images.dtype == np.uint8
    assert real.test_images.shape == (10000, 28, 28) and real.test_images.dtype == np.uint8
    assert real.train_labels.shape == (60000,) and real.train_labels.dtype == np.int64
    assert real.test_labels.shape == (10000,) and real.test_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(real.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(real.test_labels), [1000] * 10)
    assert len(data.CLASS_NAMES) == 10
    assert data.FILES["train_images"].count == 60000 and data.FILES["test_labels"].count == 10000


def test_real_normalisation_constants(real: data.FashionMNIST) -> None:
    # Exact moments from the pixel histogram, without a 376 MB float64 copy.
    counts = np.bincount(real.train_images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert data.NORMALIZE_MEAN == pytest.approx(mean, abs=1e-3)
    assert data.NORMALIZE_STD == pytest.approx(std, abs=1e-3)


def test_shared_gz_files_have_official_md5() -> None:
    # Only the shared copies are the upstream .gz bytes; Debian's differ in the gzip header.
    directory = Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"
    gz = [
        (directory / s.name, s.gz_md5)
        for s in data.FILES.values()
        if (directory / s.name).is_file()
    ]
    if not gz:
        pytest.skip(f"no .gz files in {directory}")
    for path, md5 in gz:
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5, path
