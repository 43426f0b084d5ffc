"""common.io: the one atomic writer."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from common import io


def test_write_replaces_whole_file_and_keeps_ordinary_mode(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    io.write_text_atomic(target, "one")
    io.write_text_atomic(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failure_inside_the_block_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.npz"
    io.write_bytes_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as tmp:
            np.savez(tmp, a=np.zeros(3))
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_temporary_name_keeps_the_final_suffix(tmp_path):
    tmp = io.temporary_name(tmp_path / "model.weights.h5")
    assert tmp.name.endswith("-model.weights.h5") and tmp.name.startswith(io.TEMP_PREFIX)
    assert tmp.parent == tmp_path


def test_writer_that_produces_nothing_is_an_error(tmp_path):
    with pytest.raises(OSError, match="produced no file"):
        with io.atomic_path(tmp_path / "x.bin"):
            pass
    assert not (tmp_path / "x.bin").exists()


def _write_folder(folder, text):
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_text(text)
    (folder / "variables" / "data").write_text(text)


def _folder_content(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_folder_replaces_a_whole_folder_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "alexnet_savedmodel"
    with io.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists() and tmp.name.endswith(target.name)
        _write_folder(tmp, "one")
        (tmp / "only-in-one").write_text("one")
    assert _folder_content(target) == {"only-in-one": "one", "saved_model.pb": "one", "variables/data": "one"}
    with io.atomic_folder(target) as tmp:  # over a non-empty folder: the old one goes whole
        _write_folder(tmp, "two")
    assert _folder_content(target) == {"saved_model.pb": "two", "variables/data": "two"}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_atomic_folder_failure_keeps_the_old_folder_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "alexnet_savedmodel"
    with io.atomic_folder(target) as tmp:
        _write_folder(tmp, "old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_folder(target) as tmp:
            _write_folder(tmp, "half")
            raise KeyboardInterrupt
    assert _folder_content(target) == {"saved_model.pb": "old", "variables/data": "old"}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    with pytest.raises(OSError, match="produced no folder"):
        with io.atomic_folder(tmp_path / "nothing"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_atomic_paths_renames_a_set_only_when_every_member_is_complete(tmp_path):
    graph, weights, folder = tmp_path / "alexnet-symbol.json", tmp_path / "alexnet-0000.params", tmp_path / "saved"
    with io.atomic_paths(graph, weights, folder) as (graph_tmp, weights_tmp, folder_tmp):
        assert {graph_tmp.parent, weights_tmp.parent, folder_tmp.parent} == {tmp_path}
        graph_tmp.write_text("one")
        weights_tmp.write_text("one")
        _write_folder(folder_tmp, "one")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(io.TEMP_PREFIX)) == []
    assert graph.read_text() == weights.read_text() == "one" and _folder_content(folder)["saved_model.pb"] == "one"
    with pytest.raises(OSError, match="No space left"):  # the second writer fails: the first's file never appears
        with io.atomic_paths(graph, weights, folder) as (graph_tmp, weights_tmp, folder_tmp):
            graph_tmp.write_text("two")
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="produced nothing"):  # a writer that wrote nothing
        with io.atomic_paths(graph, weights) as (graph_tmp, _):
            graph_tmp.write_text("two")
    assert graph.read_text() == weights.read_text() == "one" and _folder_content(folder)["saved_model.pb"] == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([graph.name, weights.name, folder.name])
    assert io.remove_stale_temporaries(tmp_path) == []


def test_atomic_paths_puts_every_target_back_when_a_rename_fails(tmp_path, monkeypatch):
    """Every member complete, then the last rename fails (a full folder, a vanished disk): the
    ones already renamed are put back, old versions and all, and nothing else is left."""
    first, second, folder = tmp_path / "a.pt2", tmp_path / "a.onnx", tmp_path / "saved"
    with io.atomic_paths(first, folder) as (first_tmp, folder_tmp):  # second is new: no old version
        first_tmp.write_text("old")
        _write_folder(folder_tmp, "old")
    replace = os.replace

    def fail_on_the_last(src, dst):
        if os.path.basename(src).startswith(io.TEMP_PREFIX) and os.path.basename(dst) == second.name:
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_on_the_last)
    with pytest.raises(OSError, match="No space left"):
        with io.atomic_paths(first, folder, second) as temporaries:
            temporaries[0].write_text("new")
            _write_folder(temporaries[1], "new")
            temporaries[2].write_text("new")
    assert first.read_text() == "old" and _folder_content(folder)["saved_model.pb"] == "old" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, folder.name])


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".tmp-{dead_pid}-0123abcd-checkpoint.npz"
    live = tmp_path / f".tmp-{os.getpid()}-0123abcd-checkpoint.npz"
    keep = tmp_path / "checkpoint.npz"
    for p in (stale, live, keep):
        p.write_bytes(b"x")
    stale_folder = tmp_path / f".tmp-{dead_pid}-4567cdef-alexnet_savedmodel"  # atomic_folder's
    _write_folder(stale_folder, "x")
    assert sorted(io.remove_stale_temporaries(tmp_path)) == sorted([stale, stale_folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, keep.name])


def test_check_writable_names_the_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"output folder .*file.* is not writable"):
        io.check_writable(blocker / "run")
    assert io.check_writable(tmp_path / "run").is_dir()
    assert list((tmp_path / "run").iterdir()) == []

