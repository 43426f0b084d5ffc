"""Every backend module offers the same public names, so switching framework is one import."""
from common.backend import BACKENDS, CONTRACT, Capabilities, capabilities


def test_backend_exports_exactly_the_contract(every_backend):
    backend = every_backend
    assert [name for name in backend.__all__ if name in CONTRACT] == list(CONTRACT)
    missing = [name for name in CONTRACT if not hasattr(backend, name)]
    assert not missing, f"{backend.__name__} lacks {missing}"
    assert BACKENDS[backend.NAME] == backend.__name__
    assert backend.LAYOUT in ("NCHW", "NHWC")
    assert backend.FRAMEWORK == capabilities(backend.NAME).framework
    data = ("CAPABILITIES", "NAME", "FRAMEWORK", "LAYOUT")
    assert all(callable(getattr(backend, name)) for name in CONTRACT if name not in data)
    # alexnet export's hook exists exactly where the record lists artifacts
    assert callable(getattr(backend, "export_artifacts", None)) == bool(backend.CAPABILITIES.exports)


def test_capabilities_read_without_the_framework_equal_the_imported_record(every_backend):
    """common reads each face's record by parsing it (no framework import): it must be the very
    record the imported module holds, and NAME/FRAMEWORK/LAYOUT must come from it."""
    backend = every_backend
    record = backend.CAPABILITIES
    assert isinstance(record, Capabilities) and capabilities(backend.NAME) == record
    assert (backend.NAME, backend.FRAMEWORK, backend.LAYOUT) == (record.name, record.framework, record.layout)
    assert "fp32" in record.precisions and "cpu" in record.devices


def test_optimizer_state_semantics_are_the_same_everywhere(backend):
    """One rule (common.weights.momentum_buffers) in every backend: no state means zero buffers,
    a state is taken whole or not at all, and a trainer without momentum refuses one."""
    import numpy as np
    import pytest

    from common.spec import book_alexnet
    from common.weights import WeightsError, loss_scale_entries

    spec = book_alexnet().with_input(1, 65, 65)
    model = backend.build(spec, seed=0, device="cpu")
    trainer = backend.make_trainer(model, lr=0.01, momentum=0.9)
    state = {name: np.full(value.shape, 0.25, np.float32) for name, value in trainer.optimizer_state().items()}
    trainer.load_optimizer_state(state)
    assert all(np.array_equal(value, state[name]) for name, value in trainer.optimizer_state().items())
    with pytest.raises(WeightsError, match="missing momentum/fc8.bias"):
        trainer.load_optimizer_state({k: v for k, v in state.items() if k != "momentum/fc8.bias"})
    assert all(np.array_equal(value, state[name]) for name, value in trainer.optimizer_state().items())  # untouched
    trainer.load_optimizer_state({})
    assert all(not value.any() for value in trainer.optimizer_state().values())
    with pytest.raises(WeightsError, match="no momentum"):
        backend.make_trainer(model, lr=0.01).load_optimizer_state(state)
    with pytest.raises(WeightsError, match="does not scale its loss"):  # an fp16 state into an fp32 trainer
        trainer.load_optimizer_state({**state, **loss_scale_entries(2.0 ** 15, 0)})


def test_a_precision_gap_is_refused_with_its_reason_in_one_line():
    """Capabilities.precision_gaps: a precision the framework has but the backend could not train in is
    refused naming why; a gap must be a known precision outside the record's precisions."""
    import pytest

    record = dict(name="xx", framework="X", extra="x", package="x", layout="NCHW", math_modes=("fp32",), devices=("cpu",),
                  speed_ups=(), native_suffixes=(".x",))
    gappy = Capabilities(**record, precisions=("fp32",), precision_gaps=(("fp16", "needs a GPU"),))
    with pytest.raises(ValueError, match=r"^the X backend \(xx\) trains in precision fp32, not 'fp16': needs a GPU$"):
        gappy.check_precision("fp16")
    with pytest.raises(ValueError, match=r"trains in precision fp32, not 'bf16'$"):
        gappy.check_precision("bf16")
    for gaps in ((("fp32", "why"),), (("int8", "why"),)):
        with pytest.raises(ValueError, match="precision_gaps"):
            Capabilities(**record, precisions=("fp32",), precision_gaps=gaps)


def test_make_trainer_checks_hyper_parameters_by_the_one_rule_in_every_backend(backend):
    """The shared base (common.backend.TrainerBase) checks them before any framework state is made."""
    import pytest

    from common.spec import book_alexnet

    model = backend.build(book_alexnet().with_input(1, 65, 65), seed=0, device="cpu")
    for bad, message in ((dict(lr=float("nan")), r"^lr must be a positive number, got nan$"),
                         (dict(lr=0.0), r"^lr must be a positive number, got 0.0$"),
                         (dict(lr=0.01, momentum=1.5), r"^momentum must be in \[0, 1\), got 1.5$"),
                         (dict(lr=0.01, weight_decay=-1.0), r"^weight_decay must be a finite number >= 0, got -1.0$")):
        with pytest.raises(ValueError, match=message):
            backend.make_trainer(model, **bad)
    trainer = backend.make_trainer(model, lr=0.02, momentum=0.5)
    assert trainer.lr == pytest.approx(0.02) and trainer.agree(True) and not trainer.agree(False)
    speed_ups = {s.name for s in backend.CAPABILITIES.speed_ups}
    assert set(trainer.options) == speed_ups | {"precision"} and trainer.options["precision"] == "fp32"
