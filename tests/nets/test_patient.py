"""Patient baselines (leaky noisy-OR, size rule), their file format, and one Learner for all."""
import math

import numpy as np
import pytest
import torch

from nets.cnn3d import NoduleNet3D
from nets.patient import NoisyOR, SizeRule, load_patient_model, patient_loss, save_patient_model
from nets.rnn import PatientRNN, rnn_cbs
from nets.train import DataLoaders, Learner, set_seed


def _prob(net, findings, lengths):
    with torch.no_grad():
        return torch.sigmoid(net(torch.tensor(findings, dtype=torch.float32), torch.tensor(lengths)))


def test_noisy_or_is_the_leaky_formula_over_the_top_five():
    net = NoisyOR()
    with torch.no_grad():
        net.finding.weight[:] = torch.tensor([[1.0, 0.0]])  # p_i = the finding's probability
        net.finding.bias.zero_()
        net.leak_logit.fill_(math.log(0.1 / 0.9))           # p_leak = 0.1
    probs = [0.9, 0.5, 0.4, 0.3, 0.2, 0.99]                 # the 6th is past the top 5
    rows = [[[p, 5.0] for p in probs]]
    want = 1 - 0.9 * np.prod([1 - p for p in probs[:5]])
    assert float(_prob(net, rows, [6])[0]) == pytest.approx(want, rel=1e-4)
    # padding rows beyond the length count for nothing; no finding at all leaves the leak
    assert float(_prob(net, rows, [2])[0]) == pytest.approx(1 - 0.9 * 0.1 * 0.5, rel=1e-4)
    assert float(_prob(net, [[[0.0, 0.0]]], [0])[0]) == pytest.approx(0.1, rel=1e-3)


def test_size_rule_reads_the_largest_finding_above_threshold():
    rule = SizeRule(0.5)
    rows = torch.tensor([[[0.9, 6.0], [0.6, 9.0], [0.1, 30.0]], [[0.2, 20.0], [0.0, 0.0], [0.0, 0.0]]])
    assert rule.largest(rows, torch.tensor([3, 1])).tolist() == [9.0, 0.0]
    assert rule.largest(rows, torch.tensor([1, 1])).tolist() == [6.0, 0.0]  # padding ignored
    with torch.no_grad():
        rule.a.fill_(-1.0), rule.b.fill_(0.5)
    assert torch.allclose(rule(rows, torch.tensor([3, 1])), torch.tensor([-1.0 + 0.45, -1.0]))


@pytest.mark.parametrize("make", [NoisyOR, lambda: SizeRule(0.3),
                                  lambda: PatientRNN(5, hidden=4, dropout=0.0)])
def test_save_and_load_with_weights_only(tmp_path, make):
    set_seed(0)
    net = make().eval()
    x = torch.rand(3, 4, 5 if isinstance(net, PatientRNN) else 2) * torch.tensor([1.0] * (4 if isinstance(net, PatientRNN) else 1) + [20.0])
    lengths = torch.tensor([4, 2, 1])
    path = save_patient_model(net, tmp_path / "m.pt", info={"train_prevalence": 0.2})
    back = load_patient_model(path)
    out = lambda m: m(x, lengths)[0] if isinstance(m, PatientRNN) else m(x, lengths)  # noqa: E731
    assert torch.allclose(out(net), out(back))
    assert back.info["train_prevalence"] == 0.2 and not back.training
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a lungscreen patient model"):
        load_patient_model(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_patient_model(tmp_path / "missing.pt")


def _losses_fall(model, batches, cbs=(), lr=1e-2, epochs=4, loss=patient_loss):
    learn = Learner(model, DataLoaders(batches), loss, lr=lr, cbs=list(cbs), device="cpu",
                    n_inp=len(batches[0]) - 1, progress=False)
    learn.fit(epochs)
    vals = [v["train_loss"] for v in learn.recorder.values]
    assert vals[-1] < vals[0], vals
    return vals


def test_cnn_rnn_and_noisy_or_train_with_the_same_learner_fit(one_thread):
    set_seed(0)
    g = torch.Generator().manual_seed(0)
    # CNN: bright cubes are nodules
    y = (torch.rand(32, generator=g) > 0.5).float()
    cubes = torch.rand(32, 1, 8, 8, 8, generator=g) * 0.2 + y[:, None, None, None, None] * 0.5
    cnn_batches = [(cubes[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    _losses_fall(NoduleNet3D(widths=(4, 8)), cnn_batches,
                 loss=lambda p, t: torch.nn.functional.binary_cross_entropy_with_logits(p, t))
    # RNN: a patient is positive when its best candidate's first feature is high
    feats = torch.rand(32, 6, 5, generator=g)
    feats[:, 0, 0] += y * 2
    lengths = torch.full((32,), 6)
    rnn_batches = [(feats[i:i + 8], lengths[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    _losses_fall(PatientRNN(5, hidden=8, dropout=0.0), rnn_batches, cbs=rnn_cbs())
    # noisy-OR: positives have a probable 15 mm finding
    rows = torch.stack([torch.rand(32, 5, generator=g) * 0.3, torch.full((32, 5), 4.0)], -1)
    rows[:, 0, 0] += y * 0.65
    rows[:, 0, 1] += y * 11
    nor_batches = [(rows[i:i + 8], lengths[i:i + 8].clamp(max=5), y[i:i + 8]) for i in range(0, 32, 8)]
    _losses_fall(NoisyOR(), nor_batches, lr=5e-2)
