"""Training steps that never wait for the device between logging steps (module.sync_every_step).

On a GPU, every read of a device value on the host (`.item()`, `bool(t)`, `.tolist()`, a
`nonzero` whose size the host must learn, a tensor made from a Python number on the device...)
stalls the host until the device's queue has drained. On CPU nothing stalls, so the test counts
those calls instead, during Trainer.fit on the tiny model.
"""

import functools
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers.masking_utils
from torch.utils._python_dispatch import TorchDispatchMode

from spinlab import losses
from spinlab.data import SelfPlayDataModule
from spinlab.models import tiny_model
from spinlab.module import PolicyModule
from spinlab.objectives import SPIN

LOG_EVERY = 4
STEPS = 8
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")
# Ops whose result's size or value the host needs: on a GPU each one waits for the device.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "equal"}
# torch.optim keeps an optimizer's step count in a CPU tensor (capturable=False, not fused) and
# reads it with .item(): that never touches the device, on a GPU either.
HOST_STATE = str(Path(torch.optim.__file__).parent)
# transformers prepares the attention mask by reading the position ids on the host (its check for
# packed sequences, once a forward): not spinlab's, so left out of the count and named in docs/faults.md.
TRANSFORMERS_MASKS = str(Path(transformers.masking_utils.__file__))
# Frames that only pass a call on (dynamo's disable wrappers, the counting wrappers here): the
# call is charged to the first frame outside them.
PASSING_ON = (
    str(Path(torch.__file__).parent / "_dynamo"),
    str(Path(torch.__file__).parent / "_compile.py"),
    __file__,
)


def caller(frame):
    while frame.f_back is not None and frame.f_code.co_filename.startswith(PASSING_ON):
        frame = frame.f_back
    return frame


class Counter:
    def __init__(self):
        self.step: int | None = None  # the batch being counted, None outside the window
        self.calls: dict[int, list[str]] = {}

    def hit(self, what: str, frame) -> None:
        frame = caller(frame)
        if self.step is None or frame.f_code.co_filename.startswith((HOST_STATE, TRANSFORMERS_MASKS)):
            return
        self.calls[self.step].append(f"{what} at {frame.f_code.co_filename}:{frame.f_lineno}")


class CountingMode(TorchDispatchMode):
    """Sees the ops that Python-level patches miss: `if mask[...]`, boolean indexing, `torch.equal`."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        )
        if (
            name in SYNCING_OPS
            or boolean_index
            or (name == "repeat_interleave" and "output_size" not in (kwargs or {}))
        ):
            self.counter.hit(f"aten.{name}", sys._getframe(1))
        return func(*args, **(kwargs or {}))


def patch_host_reads(monkeypatch, counter: Counter) -> None:
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            counter.hit(f"Tensor.{_name}", sys._getframe(1))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for name in ("tensor", "as_tensor"):  # a Python number copied to the device, with a wait
        original = getattr(torch, name)

        def maker(*args, _original=original, _name=name, **kwargs):
            if kwargs.get("device") is not None:
                counter.hit(f"torch.{_name}(device=...)", sys._getframe(1))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, maker)
    monkeypatch.setattr(torch, "nonzero", functools.partial(torch.Tensor.nonzero))


class Window(L.Callback):
    """Opens the count at each batch's start (callbacks run before the module's hook); the module's
    on_train_batch_end, wrapped below, closes it, so that backward and the optimizer step count.
    On a GPU, CUDA's own record of synchronising calls is switched on for the same span."""

    def __init__(self, counter: Counter, cuda: bool):
        self.counter, self.cuda = counter, cuda

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.calls[batch_idx] = []
        self.counter.step = batch_idx
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def close(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.counter.step = None


def cuda_sync_warnings(counter: Counter):
    """A warnings.showwarning that charges each of CUDA's "synchronizing operation" warnings to
    the Python frame that made the call."""

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            frame = sys._getframe(1)
            while frame.f_back is not None and frame.f_code.co_filename == warnings.__file__:
                frame = frame.f_back
            counter.hit("CUDA synchronizing call", frame)

    return show


def pairs(n: int) -> list[dict]:
    return [
        {
            "prompt": f"{i} + {i}?",
            "real": f"{i} + {i} = {2 * i}. The answer is {2 * i}.",
            "synthetic": f"It is {i}",
        }
        for i in range(n)
    ]


def fit_and_count(
    tmp_path, monkeypatch, sync_every_step: bool, packing: bool = False, accelerator: str = "cpu"
) -> dict[int, list[str]]:
    torch.manual_seed(0)
    loaded = tiny_model(seed=0)
    module = PolicyModule(
        policy=loaded.model,
        objective=SPIN(losses.logistic),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        opponent="model",  # scores every batch: its forward is counted too
        sync_every_step=sync_every_step,
    )
    dm = SelfPlayDataModule(
        source=None,
        tokenizer=loaded.tokenizer,
        batch_size=2,
        max_length=64,
        max_prompt_length=32,
        packing=packing,
    )
    dm.set_pairs(pairs(2 * STEPS))
    # The one check of the chunked output layer against the model's own logits reads the host once,
    # on a scorer's first batch: in a run that is the round's opponent scoring, before any step.
    with torch.no_grad():
        for scorer in module.scorers():
            scorer(next(iter(dm.scoring_dataloader())))
            assert scorer.chunked_matches is True
    counter = Counter()
    cuda = accelerator == "gpu"
    window = Window(counter, cuda)
    module_batch_end = module.on_train_batch_end

    def closing(*args, **kwargs):
        module_batch_end(*args, **kwargs)
        window.close()

    module.on_train_batch_end = closing
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=1,
        log_every_n_steps=LOG_EVERY,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[window],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    patch_host_reads(monkeypatch, counter)
    try:
        with CountingMode(counter), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = cuda_sync_warnings(counter)
            trainer.fit(module, train_dataloaders=dm.scoring_dataloader())
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert sorted(counter.calls) == list(range(STEPS))
    return counter.calls


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_no_host_reads_between_logging_steps(tmp_path, monkeypatch, packing):
    calls = fit_and_count(tmp_path, monkeypatch, sync_every_step=False, packing=packing)
    logging = {b for b in calls if (b + 1) % LOG_EVERY == 0}
    assert logging == {3, 7}
    assert {b: c for b, c in calls.items() if b not in logging} == {b: [] for b in calls if b not in logging}
    # The counter sees the reads that do happen: once per logging window.
    assert all(calls[b] for b in logging), calls


def test_every_step_reads_the_host_with_sync_every_step(tmp_path, monkeypatch):
    calls = fit_and_count(tmp_path, monkeypatch, sync_every_step=True)
    assert all(calls[b] for b in calls), calls
    assert any(".tolist" in c for c in calls[0]) and any("__bool__" in c for c in calls[0]), calls[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_synchronisation_between_logging_steps_on_a_gpu(tmp_path, monkeypatch):
    calls = fit_and_count(tmp_path, monkeypatch, sync_every_step=False, accelerator="gpu")
    quiet = {b: c for b, c in calls.items() if (b + 1) % LOG_EVERY}
    assert quiet == {b: [] for b in quiet}
