import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nets.callbacks import (Checkpoint, EarlyStopping, GradientClip, MetricsLogger, MixedPrecision,
                            ParamScheduler, accuracy, combine_scheds, roc_auc, sched_cos, sched_lin)
from nets.train import (EVENTS, Callback, CancelFitException, DataLoaders, Learner, event,
                        pick_device, set_seed)

bce = torch.nn.functional.binary_cross_entropy_with_logits


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    return TensorDataset(x, y)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(16, 1), torch.nn.Flatten(0))


def _learner(cbs=(), lr=0.05, seed=0, **kw):
    set_seed(seed)
    dls = DataLoaders(DataLoader(_toy(), batch_size=16, shuffle=True),
                      DataLoader(_toy(48, seed=1), batch_size=16))
    return Learner(_model(), dls, bce, lr=lr, cbs=list(cbs), device="cpu", progress=False, **kw)


class Events(Callback):
    def __init__(self):
        self.seen = []

    def __call__(self, name):
        self.seen.append(name)


def test_loss_falls_and_metrics_recorded():
    learn = _learner(metrics=[roc_auc, accuracy])
    learn.fit(6)
    vals = learn.recorder.values
    assert len(vals) == 6 and [v["epoch"] for v in vals] == list(range(6))
    assert vals[-1]["train_loss"] < 0.6 * vals[0]["train_loss"]
    assert vals[-1]["roc_auc"] > 0.9 and vals[-1]["accuracy"] > 0.8
    assert len(learn.recorder.losses) == 6 * 6


def test_event_order_and_namespace():
    rec = Events()
    learn = _learner([rec])
    learn.fit(1)
    seen = rec.seen
    assert seen[0] == "before_fit" and seen[-1] == "after_fit"
    first = seen.index("before_batch")
    assert seen[first:first + 9] == ["before_batch", "after_pred", "after_loss", "before_backward",
                                     "after_backward", "before_step", "after_step", "after_batch",
                                     "before_batch"]
    assert seen.index("after_train") < seen.index("before_validate") < seen.index("after_epoch")
    assert set(seen) <= set(EVENTS) and event.after_fit == "after_fit"


def test_unknown_event_raises():
    learn = _learner()
    with pytest.raises(ValueError, match="unknown event 'before_fitt'"):
        learn("before_fitt")


def test_callback_attribute_and_replacement():
    learn = _learner([EarlyStopping(patience=2)])
    assert isinstance(learn.early_stopping, EarlyStopping)
    new = EarlyStopping(patience=5)
    learn.add_cb(new)
    assert learn.early_stopping is new and sum(isinstance(c, EarlyStopping) for c in learn.cbs) == 1
    with pytest.raises(TypeError, match="Callback instances"):
        learn.add_cb(object())


def test_early_stopping_cancels_fit():
    rec = Events()
    # lr so small that nothing improves: the first epoch sets "best", two more end the fit
    learn = _learner([EarlyStopping("valid_loss", patience=2, min_delta=1.0), rec], lr=1e-9)
    learn.fit(20)
    assert len(learn.recorder.values) == 3
    assert "after_cancel_fit" in rec.seen and rec.seen[-1] == "after_fit"
    assert learn.early_stopping.best_epoch == 0
    with pytest.raises(ValueError, match="monitors 'nope'"):
        _learner([EarlyStopping("nope")]).fit(1)


def test_nan_loss_cancels_before_step():
    learn = _learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.loss_func = lambda p, y: bce(p, y) * float("nan")
    learn.fit(3)
    assert learn.recorder.values == []
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_lr_find_suggests_sensible_lr_and_restores_state():
    learn = _learner(lr=1e-3)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng_before = torch.get_rng_state()
    res = learn.lr_find(num_it=60)
    assert 1e-4 <= res.suggested <= 1.0, res
    assert res.min_div10 < 1.0 and len(res.lrs) == len(res.losses) <= 60
    assert res.lrs == sorted(res.lrs)
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(torch.get_rng_state(), rng_before)
    # training at the suggestion works
    learn.fit(3, lr=res.suggested)
    assert learn.recorder.values[-1]["train_loss"] < 0.69


def test_fit_one_cycle_schedule():
    learn = _learner(lr=0.01)
    learn.fit_one_cycle(4, 0.01, div=25, div_final=1e4, pct_start=0.25)
    lrs = np.array(learn.recorder.lrs)
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert lrs.max() == pytest.approx(0.01, rel=0.02)
    assert np.argmax(lrs) == pytest.approx(0.25 * len(lrs), abs=1.5)
    assert lrs[-1] < 0.01 / 50
    assert learn.opt.param_groups[0]["betas"][0] > 0.85  # momentum schedule was applied
    assert not any(isinstance(c, ParamScheduler) for c in learn.cbs)  # removed after fit


def test_schedule_functions():
    assert sched_cos(0, 10)(0) == 0 and sched_cos(0, 10)(1) == pytest.approx(10)
    f = combine_scheds([0.3, 0.7], [sched_lin(0, 1), sched_lin(1, 0)])
    assert f(0.3) == pytest.approx(1.0) and f(0.65) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="summing to 1"):
        combine_scheds([0.5, 0.6], [sched_lin(0, 1), sched_lin(1, 0)])


class Crash(Callback):
    """Simulate a killed run after ``epoch`` (runs after the checkpoint is written)."""
    order = 99

    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self):
        if self.learn.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_continues_identically(tmp_path):
    straight = _learner([EarlyStopping(patience=10, min_delta=10.0)], seed=3)
    straight.fit_one_cycle(4, 0.05)

    ck = tmp_path / "ck.pt"
    first = _learner([Checkpoint(ck), Crash(1), EarlyStopping(patience=10, min_delta=10.0)], seed=3)
    with pytest.raises(KeyboardInterrupt):
        first.fit_one_cycle(4, 0.05)
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 1 and len(state["cbs"]["recorder"]["values"]) == 2

    resumed = _learner([Checkpoint(ck, resume=True), EarlyStopping(patience=10, min_delta=10.0)], seed=99)
    resumed.fit_one_cycle(4, 0.05)
    assert [v["epoch"] for v in resumed.recorder.values] == [0, 1, 2, 3]
    assert resumed.recorder.losses == straight.recorder.losses
    for a, b in zip(resumed.recorder.values, straight.recorder.values):
        assert a["valid_loss"] == b["valid_loss"] and a["train_loss"] == b["train_loss"]
    sa, sb = resumed.model.state_dict(), straight.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # early stopping's memory (best of epoch 0, 3 epochs without improvement) survived the restart
    assert resumed.early_stopping.state_dict() == straight.early_stopping.state_dict()
    assert straight.early_stopping.state_dict()["wait"] == 3


def test_checkpoint_rejects_foreign_file(tmp_path):
    bad = tmp_path / "ck.pt"
    torch.save({"format": "other"}, bad)
    learn = _learner([Checkpoint(bad, resume=True)])
    with pytest.raises(ValueError, match="not a lungscreen checkpoint"):
        learn.fit(1)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_metrics_logger(tmp_path, suffix):
    path = tmp_path / f"log{suffix}"
    learn = _learner([MetricsLogger(path)], metrics=[roc_auc])
    learn.fit(2)
    text = path.read_text()
    if suffix == ".csv":
        lines = text.strip().splitlines()
        assert lines[0].split(",")[:4] == ["epoch", "train_loss", "valid_loss", "roc_auc"]
        assert len(lines) == 3
    elif suffix == ".json":
        assert [r["epoch"] for r in json.loads(text)] == [0, 1]
    else:
        assert len(text.strip().splitlines()) == 2
    with pytest.raises(ValueError, match="must end in"):
        MetricsLogger(tmp_path / "log.txt")


def test_mixed_precision_is_a_no_op_on_cpu_and_clip_limits_norm():
    a = _learner([MixedPrecision()], seed=5)
    a.fit(2)
    b = _learner(seed=5)
    b.fit(2)
    assert a.recorder.losses == b.recorder.losses and a.mixed_precision.scaler is None

    class Norm(Callback):
        order = 6  # after GradientClip

        def before_step(self):
            sq = sum(float(p.grad.pow(2).sum()) for p in self.learn.model.parameters())
            self.norms.append(math.sqrt(sq))
    norm = Norm()
    norm.norms = []
    _learner([GradientClip(1e-3), norm], seed=5).fit(1)
    assert max(norm.norms) <= 1e-3 * 1.001


def test_metrics_match_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    s[:20] = 0.0  # ties
    assert roc_auc(torch.tensor(s), torch.tensor(y)) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(roc_auc(torch.tensor(s), torch.zeros(200)))
    assert accuracy(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]]),
                    torch.tensor([0, 2, 0])) == pytest.approx(2 / 3)


def test_set_seed_and_device_checks():
    set_seed(7)
    a = (np.random.rand(), torch.rand(2))
    set_seed(7)
    b = (np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="seed must be an int"):
        set_seed(1.5)
    assert pick_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Learner("model", DataLoaders([]), bce)
    with pytest.raises(ValueError, match="lr must be"):
        Learner(_model(), DataLoaders([]), bce, lr=-1, device="cpu")
    with pytest.raises(ValueError, match="n_epoch"):
        _learner().fit(0)


def test_cancel_fit_from_callback_still_runs_after_fit():
    class Stop(Callback):
        order = 100  # after the recorder

        def after_batch(self):
            if self.learn.iter == 2:
                raise CancelFitException

    rec = Events()
    learn = _learner([Stop(), rec])
    learn.fit(3)
    assert rec.seen.count("after_batch") == 3 and rec.seen[-2:] == ["after_cancel_fit", "after_fit"]
    assert len(learn.recorder.losses) == 3


def test_progress_bar_on_request_and_off_by_default(capsys):
    _learner().fit(1)  # progress=False
    assert "epoch 1/1" not in capsys.readouterr().err
    set_seed(0)
    dl = DataLoader(_toy(), batch_size=16)
    learn = Learner(_model(), DataLoaders(dl, dl), bce, device="cpu", progress=True)
    learn.fit(1)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "0/6" in err and "epoch=0  train_loss=" in err


def test_progress_bar_follows_the_terminal_by_default(capsys):
    """progress=None (auto): no bar off a terminal (here: pytest's captured stderr), as
    tqdm's disable=None decides; progress=True draws it anyway."""
    set_seed(0)
    for progress, drawn in ((None, False), (True, True)):
        dls = DataLoaders(DataLoader(_toy(), batch_size=16))
        Learner(_model(), dls, bce, lr=0.05, device="cpu", progress=progress).fit(1)
        assert ("epoch 1/1" in capsys.readouterr().err) is drawn, progress
