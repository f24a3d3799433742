import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nets.callbacks import GradientClip, roc_auc
from nets.data import CandidateSetDataset, pad_collate
from nets.rnn import PatientRNN, RNNCallback, rank_candidates, rnn_cbs
from nets.train import Callback, DataLoaders, Learner, set_seed

bce = torch.nn.functional.binary_cross_entropy_with_logits


pytestmark = pytest.mark.usefixtures("one_thread")


def _patients(n, dim=4, seed=0):
    """Variable-length candidate sets; a positive patient has one nodule-like candidate
    (high score, shifted embedding) among random ones."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for i in range(n):
        t = int(rng.integers(1, 12))
        emb = rng.normal(size=(t, dim - 1))
        score = rng.uniform(0, 0.6, t)
        y = i % 2
        if y:
            j = rng.integers(t)
            score[j] = rng.uniform(0.85, 1.0)
            emb[j, 0] += 3.0
        feats.append(rank_candidates(emb, score))
        labels.append(y)
    return CandidateSetDataset(feats, labels)


def _learner(cbs=(), seed=0, n=96):
    set_seed(seed)
    dls = DataLoaders(DataLoader(_patients(n), batch_size=8, shuffle=True, collate_fn=pad_collate),
                      DataLoader(_patients(64, seed=1), batch_size=32, collate_fn=pad_collate))
    return Learner(PatientRNN(4, hidden=16), dls, bce, lr=3e-2, cbs=[*rnn_cbs(), *cbs],
                   metrics=[roc_auc], device="cpu", progress=False)


def test_rnn_trains_with_the_same_learner():
    learn = _learner()
    learn.fit_one_cycle(5, 3e-2)
    vals = learn.recorder.values
    assert vals[-1]["train_loss"] < 0.6 * vals[0]["train_loss"], vals
    assert vals[-1]["roc_auc"] > 0.85, vals
    preds = learn.predict(learn.dls.valid)
    assert preds.shape == (64,)


def test_padding_does_not_change_the_logit():
    set_seed(0)
    net = PatientRNN(3, hidden=8).eval()
    seq = torch.randn(4, 3)
    short, _ = net(seq[None], torch.tensor([4]))
    padded = torch.cat([seq, torch.full((5, 3), 7.0)])[None]
    long, out = net(padded, torch.tensor([4]))
    assert torch.allclose(short, long, atol=1e-6)
    assert torch.all(out[0, 4:] == 0)
    batch, _ = net(torch.stack([padded[0], torch.randn(9, 3)]), torch.tensor([4, 9]))
    assert torch.allclose(batch[0], short[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        net(seq, torch.tensor([4]))


def test_rank_candidates_and_collate():
    rows = rank_candidates(np.arange(8.0).reshape(4, 2), [0.2, 0.9, 0.1, 0.5], max_candidates=3)
    assert rows[:, -1].tolist() == pytest.approx([0.9, 0.5, 0.2])
    assert rows[0, :2].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        rank_candidates(np.zeros((3, 2)), [1.0, 2.0])
    f, n, y = pad_collate([(torch.ones(2, 3), torch.tensor(1.0)), (torch.ones(5, 3), torch.tensor(0.0))])
    assert f.shape == (2, 5, 3) and n.tolist() == [2, 5] and float(f[0, 2:].abs().sum()) == 0
    with pytest.raises(ValueError, match="one D"):
        CandidateSetDataset([np.zeros((2, 3)), np.zeros((2, 4))], [0, 1])


def test_rnn_cbs_bundle_and_activation_penalty():
    cbs = rnn_cbs(alpha=0.5, max_grad_norm=2.0)
    assert any(isinstance(c, GradientClip) and c.max_norm == 2.0 for c in cbs)

    class Grab(Callback):
        order = 20

        def after_loss(self):
            if self.learn.training:
                self.pairs.append((float(self.learn.loss.detach()), float(self.learn.loss_grad.detach())))
    grab = Grab()
    grab.pairs = []
    learn = _learner([grab], n=24)
    learn.add_cb(RNNCallback(alpha=0.5))
    learn.fit(1)
    assert all(g > l for l, g in grab.pairs)  # the penalty is added to what is back-propagated
    assert learn.rnn.out is not None
