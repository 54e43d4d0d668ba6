"""What keeps a training step fast: no reads from the device inside it, batches built ahead, the packed layout made
on the host. Speed itself is measured by bench/bench_throughput.py, not here."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ilora_cli.llm.packing import PackedAnswers
from ilora_cli.training.loop import Prefetcher, TrainConfig, Trainer
from test_experts import N_ITEMS, _setup

# Calls that make the host wait for a GPU: a value read back, or a result whose size depends on the data.
SYNCS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero", "masked_select"}
SYNCS |= {"unique", "bincount", "equal"}
PACKAGE = str(Path(__import__("ilora_cli").__file__).parent)
TORCH = str(Path(torch.__file__).parent)


class DeviceReads(TorchFunctionMode):
    """Records every torch call that would read from a GPU, with the first caller outside torch itself."""

    def __init__(self):
        super().__init__()
        self.ours, self.libraries = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        bool_index = name == "__getitem__" and any(
            torch.is_tensor(a) and a.dtype == torch.bool for a in _flat(args[1:])
        )
        if name in SYNCS or bool_index:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
            (self.ours if where.startswith(PACKAGE) else self.libraries).append((name, where))
        return func(*args, **(kwargs or {}))


def _flat(xs):
    for x in xs:
        if isinstance(x, (tuple, list)):
            yield from _flat(x)
        else:
            yield x


@pytest.fixture
def world(tiny_world, monkeypatch):
    monkeypatch.setenv("ILORA_HOME", str(tiny_world))
    return tiny_world


@pytest.mark.parametrize(
    "settings",
    [
        {"head": "title"},  # learned fusion, K = 4, the user gate: the defaults
        {"head": "title", "grad_accum": 2, "distill_weight": 1.0, "user_token": True},
        {"head": "item"},
        {"head": "item", "loss_over": "catalogue", "fusion": "none"},
    ],
)
def test_a_training_step_reads_the_device_once(world, tmp_path, settings, monkeypatch):
    """Inside a step the package's code reads nothing back from the device but the step's loss and terms, once,
    at its end: on a GPU every other read would stall the host until the device caught up. The title tokens'
    log-probabilities take the path they take on a GPU (on the CPU they check their row sums on the host)."""
    from ilora_cli.llm import logprobs

    trainer = Trainer(
        TrainConfig(
            dataset="cyc",
            backbone=str(world / "tiny-backbone"),
            output=tmp_path / "run",
            batch_size=4,
            candidates=6,
            max_steps=4,
            quiet=True,
            **settings,
        )
    )
    trainer.model.train()
    trainer.step()  # the first step builds its batches in the loop; the next ones come from the prefetcher
    if settings["head"] == "title":  # the CPU's path: its row-sum checks are seen as well
        cpu = DeviceReads()
        with cpu:
            trainer.step()
        assert {where.split(":")[0].rsplit("/", 1)[-1] for _, where in cpu.ours} == {"logprobs.py", "trainer.py"}
    monkeypatch.setattr(logprobs, "subtracts_maximum", lambda device: True)
    reads = DeviceReads()
    with reads:
        loss, terms = trainer.step()
    trainer.prefetcher.close()
    assert [(name, where.split(":")[0].endswith("training/trainer.py")) for name, where in reads.ours] == [
        ("tolist", True)
    ], reads.ours
    assert isinstance(loss, float) and all(isinstance(v, float) for v in terms.values()) and "hr@1" in terms


def test_the_prefetcher_hands_out_each_step_once_and_builds_the_next_ahead():
    built = {}  # step -> the thread that built it

    def build(step):
        built[step] = threading.current_thread().name
        return [step]

    pre = Prefetcher(build)
    assert pre.get(0) == [0]  # nothing built ahead yet: built in place
    assert pre.get(1) == [1]  # built on the thread while step 0 ran
    assert pre.get(7, ahead=False) == [7]  # a jump (a resumed run): built in place, the stale step 2 dropped
    pre.close()
    here = threading.current_thread().name
    assert sorted(built) == [0, 1, 2, 7] and built[0] == built[7] == here
    assert built[1].startswith("ilora-batches") and built[2].startswith("ilora-batches")


def test_packed_layout_of_two_rows():
    # row 0: answers [5, 6, e] and [7, e]; row 1: [8, e] and [9, 9, 9, e]   (e = 2, padding 0)
    answers = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0], [8, 2, 0, 0], [9, 9, 9, 2]])
    mask = (torch.tensor([3, 2, 2, 4])[:, None] > torch.arange(4)).long()
    p = PackedAnswers.from_padded(answers, mask, n_rows=2)
    assert p.first.tolist() == [[5, 7], [8, 9]] and p.width == 4 and p.lengths.tolist() == [3, 2, 2, 4]
    assert p.inputs.tolist() == [5, 6, 7, 8, 9, 9, 9] and p.targets.tolist() == [6, 2, 2, 2, 9, 9, 2]
    assert p.owner.tolist() == [0, 0, 1, 2, 3, 3, 3] and p.row.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert p.col.tolist() == [0, 1, 2, 0, 1, 2, 3] and p.offset.tolist() == [0, 1, 0, 0, 0, 1, 2]
    assert p.block.tolist() == [[0, 0, 1, -1], [2, 3, 3, 3]]


def test_a_prompt_whose_placeholders_do_not_match_its_items_is_refused_where_it_is_built():
    _, builder = _setup()
    long_history = list(range(12))  # 12 placeholders in the prompt, 10 items kept for them
    with pytest.raises(RuntimeError, match="placeholder count"):
        builder.batch([long_history], [[0, 1, 2]], pad_id=N_ITEMS, max_history=10)
    builder.batch([long_history[-10:]], [[0, 1, 2]], pad_id=N_ITEMS, max_history=10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_built_in_page_locked_memory_on_a_gpu(world, tmp_path):
    trainer = Trainer(
        TrainConfig(
            dataset="cyc",
            backbone=str(world / "tiny-backbone"),
            output=tmp_path / "run",
            batch_size=4,
            candidates=6,
            max_steps=2,
            quiet=True,
            device="cuda",
        )
    )
    batch, _ = trainer.step_batches(0)[0]
    assert batch.input_ids.is_pinned() and batch.packed.inputs.is_pinned()
    assert trainer.step()[0] > 0
