"""The model-zoo AlexNet's files in and out, held against external oracles.

The oracles are the peers' own models: Gluon's ``model_zoo.vision.alexnet`` (inside MXNet)
and a PyTorch module written as ``torchvision.models.alexnet`` is (torchvision itself does not
import beside this CPU torch; see issue 12). Both get the same random weights (non-zero
biases), copied between them by *parameter order*, not through common.zoo's key tables, and
save their files with their own tools. Each file is converted and loaded into all three
backends, whose logits must match the peer's; files written back must load into the peers
and give their outputs bit for bit.

61M parameters each: the oracles and files are built once per module, each backend builds
the network at most twice (224 and 256x300).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from common import zoo
from common.cli import main
from common.parity import to_backend_layout
from common.reference import relative_error
from common.spec import get_spec
from common.weights import WeightsError, read_npz
from tests.conftest import get_backend

torch = pytest.importorskip("torch")
nn = torch.nn

TOLERANCE = 1e-4  # relative, as the parity suite
SPEC = get_spec("torchvision")
SPEC_256 = SPEC.with_input(3, 256, 300)  # pool5 7x8: the adaptive pool's bins overlap on both axes


class TorchvisionAlexNet(nn.Module):
    """torchvision.models.alexnet, written out (torchvision/models/alexnet.py): the same children,
    so the same state_dict keys, and the same forward."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _mxnet():
    """MXNet itself, for the oracle: imported after its backend (the numpy shim MXNet 1.9 needs)."""
    get_backend("mx")
    import mxnet

    return mxnet


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _gluon_logits(mx, net, x):
    return net(mx.nd.array(x, dtype="float32")).asnumpy()


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Both peers with one set of random weights, their outputs, and their own files."""
    mx = _mxnet()
    vision = mx.gluon.model_zoo.vision
    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\nmodel-zoo oracle seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    generator = torch.Generator().manual_seed(seed)
    model = TorchvisionAlexNet().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # He-normal weights keep the logits O(1); biases non-zero
            if name.endswith("weight"):
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            else:
                param.copy_((torch.rand(param.shape, generator=generator) - 0.5) * 0.2)
    net = vision.alexnet()
    net.initialize()
    net(mx.nd.zeros((1, *SPEC.input_shape)))  # Gluon infers the input channels and fan-ins on a first call
    gluon_params = list(net.collect_params().values())
    torch_params = list(model.parameters())
    assert len(gluon_params) == len(torch_params) == 16
    for gluon_param, torch_param in zip(gluon_params, torch_params):  # by order: no key table involved
        assert tuple(gluon_param.shape) == tuple(torch_param.shape)
        gluon_param.set_data(mx.nd.array(torch_param.detach().numpy(), dtype="float32"))

    rng = np.random.default_rng(seed)
    x224 = rng.standard_normal((2, *SPEC.input_shape)).astype(np.float32)
    x256 = rng.standard_normal((1, *SPEC_256.input_shape)).astype(np.float32)
    out = dict(mx=mx, vision=vision, model=model, net=net, x224=x224, x256=x256,
               torch224=_torch_logits(model, x224), torch256=_torch_logits(model, x256),
               gluon224=_gluon_logits(mx, net, x224),
               arrays=[p.detach().numpy().copy() for p in torch_params])
    folder = tmp_path_factory.mktemp("zoo")
    out["pth"] = folder / "alexnet-torchvision.pth"
    torch.save(model.state_dict(), out["pth"])
    out["params"] = folder / "alexnet-gluon.params"
    net.save_parameters(str(out["params"]))
    out["legacy"] = folder / "alexnet-gluon-legacy.params"  # what Gluon's save_params wrote before 1.3
    net.collect_params().save(str(out["legacy"]), strip_prefix=net.prefix)
    out["folder"] = folder
    yield out
    out.clear()


def test_the_oracles_agree_with_each_other(peers):
    """Gluon's zoo network (no adaptive pool, dropout after the dense layers) computes torchvision's at 224."""
    assert np.abs(peers["torch224"]).max() > 1  # logits that depend on the weights, not a constant
    assert relative_error(peers["torch224"][0], peers["torch224"][1]) > 0.1  # ... and on the input
    assert relative_error(peers["gluon224"], peers["torch224"]) < 1e-5


@pytest.fixture(scope="module")
def converted(peers):
    """Each peer file through `alexnet convert` to canonical .npz, as a user would."""
    paths = {}
    for name in ("pth", "params", "legacy"):
        paths[name] = peers["folder"] / f"{name}.npz"
        assert main(["convert", str(peers[name]), str(paths[name])]) == 0
    return paths


def test_every_peer_file_converts_to_the_same_canonical_weights(peers, converted, capsys):
    weights = {name: read_npz(path) for name, path in converted.items()}
    first = weights["pth"]
    assert list(first) == [f"{layer.name}.{kind}" for layer in SPEC.weighted_layers() for kind in ("weight", "bias")]
    for name in first:  # in model order, exactly the peers' own parameters
        assert first[name].dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(first.values(), peers["arrays"], strict=True))
    for other in ("params", "legacy"):
        assert all(np.array_equal(first[k], weights[other][k]) for k in first), other
    assert [zoo.open_zoo_file(peers[n]).format.name for n in ("pth", "params", "legacy")] == [
        "torchvision", "gluon", "gluon-legacy"]


def test_converted_weights_give_the_peers_logits_in_every_backend(backend, peers, converted):
    """The converted file, loaded by build(weights=path), against the peers' own outputs."""
    model = backend.build(SPEC, weights=converted["params"], device="cpu")
    logits = backend.forward(model, to_backend_layout(peers["x224"], backend.LAYOUT))
    errors = {"torchvision 224": relative_error(logits, peers["torch224"]),
              "gluon 224": relative_error(logits, peers["gluon224"])}
    del model
    model = backend.build(SPEC_256, weights=converted["pth"], device="cpu")
    errors["torchvision 256x300"] = relative_error(
        backend.forward(model, to_backend_layout(peers["x256"], backend.LAYOUT)), peers["torch256"])
    print(f"{backend.NAME}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_files_written_back_load_into_the_peers_bit_for_bit(peers, converted, capsys):
    folder, mx = peers["folder"], peers["mx"]
    assert main(["convert", str(converted["params"]), str(folder / "out.pth"), "--zoo", "torchvision"]) == 0
    assert main(["convert", str(converted["pth"]), str(folder / "out.params"), "--zoo", "gluon"]) == 0
    assert "(torchvision) from" in capsys.readouterr().out

    model = TorchvisionAlexNet().eval()
    state = torch.load(folder / "out.pth", weights_only=True)
    assert list(state) == list(peers["model"].state_dict())  # torchvision's own key order
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), peers["model"].state_dict().values()))
    assert np.array_equal(_torch_logits(model, peers["x224"]), peers["torch224"])
    del model, state

    net = peers["vision"].alexnet()
    net.load_parameters(str(folder / "out.params"))  # Gluon's own loader: every key present, none extra
    loaded = [p.data().asnumpy() for p in net.collect_params().values()]
    assert all(np.array_equal(a, b) for a, b in zip(loaded, peers["arrays"], strict=True))
    assert np.array_equal(_gluon_logits(mx, net, peers["x224"]), peers["gluon224"])


def test_a_zoo_file_is_recognised_by_its_keys_not_its_name(peers, tmp_path, capsys):
    disguised = tmp_path / "weights.params"  # a torchvision file with Gluon's ending
    os.link(peers["pth"], disguised)
    assert main(["convert", str(disguised), str(tmp_path / "w.npz")]) == 0
    assert "from " + str(disguised) + " (torchvision)" in capsys.readouterr().out


# ---------------------------------------------------------------------- refusals (small files)


def _shapes(fmt, spec=SPEC):
    """Shape-only stand-ins (broadcast views: no memory) for a zoo file's arrays."""
    from common.weights import expected_shapes

    shapes = expected_shapes(spec)
    return {key: np.broadcast_to(np.float32(0), shapes[name]) for name, key in fmt.keys().items()}


def test_first_problem_names_one_key():
    good = _shapes(zoo.TORCHVISION)
    assert zoo.first_problem(SPEC, zoo.TORCHVISION, good) is None
    missing = {k: v for k, v in good.items() if k != "features.3.bias"}
    assert zoo.first_problem(SPEC, zoo.TORCHVISION, missing) == "missing features.3.bias (192,)"
    extra = dict(good, **{"classifier.8.weight": np.zeros(3, np.float32)})
    assert zoo.first_problem(SPEC, zoo.TORCHVISION, extra) == "unexpected classifier.8.weight"
    ten = _shapes(zoo.TORCHVISION, get_spec("torchvision", num_classes=10))
    assert zoo.first_problem(SPEC, zoo.TORCHVISION, ten) == (
        "classifier.6.weight has shape (10, 4096), expected (1000, 4096) (and 1 more problem(s))")
    half = dict(good, **{"features.0.weight": np.broadcast_to(np.float16(0), (64, 3, 11, 11))})
    assert zoo.first_problem(SPEC, zoo.TORCHVISION, half) == "features.0.weight is float16, expected float32"
    assert zoo.first_problem(get_spec("torchvision", num_classes=10), zoo.GLUON, _shapes(zoo.GLUON)) == (
        "output.weight has shape (1000, 4096), expected (10, 4096) (and 1 more problem(s))")


def _vgg_like_state():
    """A torchvision state_dict of another architecture (VGG's first layers): small tensors."""
    return {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64),
            "features.2.weight": torch.zeros(64, 64, 3, 3), "features.2.bias": torch.zeros(64),
            "classifier.0.weight": torch.zeros(10, 64), "classifier.0.bias": torch.zeros(10)}


def test_another_architecture_is_one_line_and_nothing_is_written(tmp_path, capsys):
    torch.save(_vgg_like_state(), tmp_path / "vgg.pth")
    assert main(["convert", str(tmp_path / "vgg.pth"), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "not torchvision's AlexNet state_dict for spec 'torchvision'" in err
    assert "features.0.weight has shape (64, 3, 3, 3), expected (64, 3, 11, 11)" in err
    assert not (tmp_path / "out.npz").exists()


def test_zoo_files_hold_the_torchvision_variant_only(tmp_path, capsys):
    torch.save(_vgg_like_state(), tmp_path / "vgg.pth")
    assert main(["convert", str(tmp_path / "vgg.pth"), str(tmp_path / "out.npz"), "--variant", "book"]) == 2
    assert "holds the torchvision variant; spec 'book' is another network" in capsys.readouterr().err
    from common.weights import init_weights, save_weights

    save_weights(tmp_path / "book.npz", init_weights(get_spec("book").with_input(1, 65, 65), 0))
    assert main(["convert", str(tmp_path / "book.npz"), str(tmp_path / "out.pth"), "--zoo", "torchvision",
                 "--variant", "book", "--input", "1,65,65"]) == 2
    assert "spec 'book' is another network" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_writing_checks_the_ending():
    with pytest.raises(WeightsError, match=r"Gluon model zoo AlexNet parameters files end in \.params"):
        zoo.write_zoo("out.pth", {}, "gluon", SPEC)
    with pytest.raises(WeightsError, match="unknown zoo format 'caffe'"):
        zoo.write_zoo("out.caffemodel", {}, "caffe", SPEC)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_pth_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "trap": _RunsCode()}, path)
    with pytest.raises(WeightsError, match="not a loadable PyTorch state_dict"):
        zoo.read_arrays(path)


def test_containers_are_told_apart_by_their_first_bytes(tmp_path):
    mx = _mxnet()
    torch.save({"a": torch.zeros(1)}, tmp_path / "zip.bin")
    torch.save({"a": torch.zeros(1)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    mx.nd.save(str(tmp_path / "mx.bin"), {"a": mx.nd.zeros(1)})
    np.savez(tmp_path / "w.npz", a=np.zeros(1))
    (tmp_path / "text.pth").write_text("not weights")
    found = {name: zoo.container_of(tmp_path / name)
             for name in ("zip.bin", "legacy.bin", "mx.bin", "w.npz", "text.pth", "absent")}
    assert found == {"zip.bin": zoo.TORCH, "legacy.bin": zoo.TORCH, "mx.bin": zoo.MXNET,
                     "w.npz": None, "text.pth": None, "absent": None}
    assert zoo.open_zoo_file(tmp_path / "zip.bin") is None  # a PyTorch file, but no zoo's keys
    with pytest.raises(WeightsError, match="not a model-zoo AlexNet file"):
        zoo.read_zoo(tmp_path / "w.npz", SPEC)


@pytest.mark.skipif("not __import__('importlib').util.find_spec('torchvision')",
                    reason="torchvision is not installed (optional: its wheel needs a CUDA torch, issue 12)")
def test_real_torchvision_loads_what_we_write(peers, converted, tmp_path, capsys):
    try:
        from torchvision.models import alexnet
    except Exception as error:  # RuntimeError: operator torchvision::nms does not exist (CUDA wheel, CPU torch)
        pytest.skip(f"torchvision does not import here: {error}")
    assert main(["convert", str(converted["pth"]), str(tmp_path / "tv.pth"), "--zoo", "torchvision"]) == 0
    model = alexnet().eval()
    model.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)
    assert np.array_equal(_torch_logits(model, peers["x224"]), peers["torch224"])


def test_fetch_weights_npz_converts_the_cached_file(peers, converted, tmp_path, monkeypatch, capsys):
    """A cached file whose hash matches its name is used as is (the URL is never asked) and --npz
    gives the canonical weights `alexnet convert` gives."""
    from dataclasses import replace

    name = f"alexnet-owt-{zoo.file_digest(peers['pth'], 'sha256')[:8]}.pth"
    (tmp_path / "cache").mkdir()
    os.link(peers["pth"], tmp_path / "cache" / name)
    monkeypatch.setitem(zoo.PUBLISHED, "torchvision", replace(zoo.PUBLISHED["torchvision"], file_name=name))
    assert main(["fetch-weights", "torchvision", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                 "--url", "http://127.0.0.1:9/unreachable", "--npz", str(tmp_path / "w.npz")]) == 0
    got, want = read_npz(tmp_path / "w.npz"), read_npz(converted["pth"])
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_predict_gives_the_same_top5_in_every_backend_and_the_peers(peers, converted, tmp_path, monkeypatch,
                                                                    capsys):
    """One photo-sized image; pt takes --pretrained torchvision (here: the peer's file, already in the
    cache), tf the .npz, mx the Gluon file: the same five classes, probabilities within 1e-4 of each
    other and of torchvision's model on torchvision's preprocessing (common.images reproduces it;
    checked by hand in test_images.py)."""
    from dataclasses import replace

    from PIL import Image

    from common import images

    cached = f"alexnet-owt-{zoo.file_digest(peers['pth'], 'sha256')[:8]}.pth"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    zoo.default_weights_dir().mkdir(parents=True)
    os.link(peers["pth"], zoo.default_weights_dir() / cached)
    monkeypatch.setitem(zoo.PUBLISHED, "torchvision", replace(zoo.PUBLISHED["torchvision"], file_name=cached,
                                                              url="http://127.0.0.1:9/unreachable"))

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 400, 3), np.uint8), "RGB").save(path)
    x = images.imagenet_input(path)[None]
    want = images.top_k(_torch_logits(peers["model"], x), 5)[0]
    weights = {"pt": ["--pretrained", "torchvision"], "tf": ["--weights", str(converted["pth"])],
               "mx": ["--weights", str(peers["params"])]}
    for name, source in weights.items():
        assert main(["predict", "--backend", name, *source, "--no-progress", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1] == f"{path}:"
        got = [(int(line.rsplit("(", 1)[1].rstrip(")")), float(line.split("%")[0].split(".", 1)[1]) / 100)
               for line in lines[2:7]]
        assert [i for i, _ in got] == [i for i, _ in want], (name, got, want)
        assert max(abs(p - q) for (_, p), (_, q) in zip(got, want)) < 1e-4  # printed to 4 decimals of a percent
        names = images.imagenet_class_names()
        assert all(f"  {names[i]} ({i})" in line for (i, _), line in zip(want, lines[2:7]))


def test_one_mxnet_reader_serves_the_zoo_and_load_native_with_their_messages(tmp_path):
    """common.zoo and alexnet_mx.load_native read .params files through alexnet_mx.read_params."""
    mx = _mxnet()
    backend = get_backend("mx")
    model = backend.build(get_spec("book").with_input(1, 65, 65), device="cpu")
    unnamed = tmp_path / "unnamed.params"
    mx.nd.save(str(unnamed), [mx.nd.zeros((1,))])
    with pytest.raises(WeightsError, match="unnamed.params: holds unnamed arrays, not named parameters$"):
        zoo.read_arrays(unnamed)
    with pytest.raises(WeightsError, match="unnamed.params: holds unnamed arrays, not a Gluon .params file from "
                                           "save_parameters$"):
        backend.load_native(model, unnamed)
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes((0x112).to_bytes(8, "little") + b"not an array list")  # mx.nd.save's header, then junk
    for read in (zoo.read_arrays, lambda path: backend.load_native(model, path)):
        with pytest.raises(WeightsError, match=r"garbage.params: not a readable MXNet .params file \("):
            read(garbage)


# ---------------------------------------------------------------------- MXNet's export: no zoo file
def test_the_params_of_an_mxnet_export_convert_to_canonical_weights(tmp_path, capsys):
    """`alexnet export --backend mx` writes alexnet-0000.params with HybridBlock.export's keys (``arg:`` +
    the Gluon parameter's name): neither a zoo's nor save_parameters'. convert maps them back, bit for bit."""
    from common.weights import init_weights, save_weights

    mx = _mxnet()
    spec = get_spec("book").with_input(1, 65, 65)
    weights = init_weights(spec, 3)
    save_weights(tmp_path / "w.npz", weights)
    assert main(["export", "--backend", "mx", "--weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "out"),
                 "--input", "1,65,65"]) == 0
    exported = tmp_path / "out" / "alexnet-0000.params"
    assert sorted(mx.nd.load(str(exported))) == sorted(f"arg:{name.replace('.', '_')}" for name in weights)
    capsys.readouterr()
    assert main(["convert", str(exported), str(tmp_path / "back.npz"), "--input", "1,65,65"]) == 0
    assert f"from {exported} (mx)" in capsys.readouterr().out
    back = read_npz(tmp_path / "back.npz")
    assert list(back) == list(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)


def test_the_export_of_another_network_is_one_line_naming_the_file(tmp_path, capsys):
    mx = _mxnet()
    other = tmp_path / "other-0000.params"  # e.g. Gluon's own zoo AlexNet through HybridBlock.export
    mx.nd.save(str(other), {"arg:alexnet0_conv0_weight": mx.nd.zeros((64, 3, 11, 11)),
                            "arg:alexnet0_conv0_bias": mx.nd.zeros((64,))})
    assert main(["convert", str(other), str(tmp_path / "out.npz"), "--input", "1,65,65"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{other} (the parameters of an MXNet export) do not fit spec 'book'" in err
    assert "missing arg:conv1_weight (96, 1, 11, 11)" in err and "unexpected arg:alexnet0_conv0_weight" in err
    assert not (tmp_path / "out.npz").exists()
