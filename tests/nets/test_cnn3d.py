import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nets.callbacks import roc_auc
from nets.cnn3d import (FLIP_AXES, NoduleNet3D, load_classifier, normalize_hu, predict_tta,
                        save_classifier)
from nets.data import CubeDataset, PositiveFractionSampler, augment_cube, flip_cube
from nets.train import DataLoaders, Learner, set_seed

bce = torch.nn.functional.binary_cross_entropy_with_logits


pytestmark = pytest.mark.usefixtures("one_thread")


def _cubes(n, size=16, seed=0):
    """HU cubes: lung-like noise; positives hold a 3-4 mm radius soft-tissue ball near the centre."""
    rng = np.random.default_rng(seed)
    cubes = rng.normal(-800, 60, size=(n, size, size, size))
    labels = (np.arange(n) % 4 == 0).astype(np.float32)  # 25 % nodules
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for i in np.flatnonzero(labels):
        c = size / 2 + rng.uniform(-1.5, 1.5, 3)
        r = rng.uniform(2.5, 3.5)
        cubes[i][(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = 20.0
    return cubes.astype(np.int16), labels


def test_cnn_loss_falls_on_toy_cubes():
    set_seed(0)
    cubes, labels = _cubes(64, size=12)
    vcubes, vlabels = _cubes(32, size=12, seed=1)
    train = CubeDataset(cubes, labels, augment=augment_cube)
    sampler = PositiveFractionSampler(labels, 16, 0.5)
    dls = DataLoaders(DataLoader(train, batch_sampler=sampler),
                      DataLoader(CubeDataset(vcubes, vlabels), batch_size=32))
    learn = Learner(NoduleNet3D(widths=(4, 8)), dls, bce, lr=1e-2, metrics=[roc_auc],
                    device="cpu", progress=False)
    learn.fit_one_cycle(4, 1e-2)
    vals = learn.recorder.values
    assert vals[-1]["train_loss"] < 0.7 * vals[0]["train_loss"], vals
    assert vals[-1]["roc_auc"] > 0.9, vals
    probs = predict_tta(learn.model, normalize_hu(vcubes), n=8)
    assert roc_auc(torch.logit(probs.clamp(1e-6, 1 - 1e-6)), torch.tensor(vlabels)) > 0.9


def test_model_shapes_and_embed():
    net = NoduleNet3D().eval()
    x = torch.rand(2, 1, 32, 32, 32)
    assert net(x).shape == (2,)
    assert net.embed(x).shape == (2, 128) and net.embed_dim == 128
    deep = NoduleNet3D(widths=(4, 8), blocks_per_stage=2)
    assert len(deep.blocks) == 4
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        net.embed(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match="widths"):
        NoduleNet3D(widths=())


def test_normalize_hu():
    out = normalize_hu(np.array([-3000, -1000, 400, 1000], np.int16))
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.0, 1.0, 1.0]
    t = normalize_hu(torch.tensor([-300.0]))
    assert isinstance(t, torch.Tensor) and float(t) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_hu"):
        normalize_hu(np.zeros(2), clip_hu=(400, -1000))


def test_flips_are_invertible_and_augmentation_keeps_shape():
    c = torch.rand(1, 8, 8, 8)
    for axes in FLIP_AXES:
        assert torch.equal(flip_cube(flip_cube(c, axes), axes), c)
    assert torch.equal(flip_cube(c, (2,))[0, :, :, 0], c[0, :, :, -1])
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        out = augment_cube(c, generator=g)
        assert out.shape == c.shape and out.dtype == c.dtype
    # no zoom: a flip/rotation only permutes voxels
    out = augment_cube(c, scale_range=None, generator=g)
    assert torch.equal(out.flatten().sort().values, c.flatten().sort().values)
    # all off: identity; same generator seed: same result
    assert torch.equal(augment_cube(c, flip=False, rot90=False, scale_range=None), c)
    a = augment_cube(c, generator=torch.Generator().manual_seed(3))
    b = augment_cube(c, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # zooming out pads with air (fill) at the border
    z = augment_cube(torch.ones(1, 10, 10, 10), flip=False, rot90=False, scale_range=(0.6, 0.6))
    assert float(z[0, 0, 0, 0]) == 0.0 and float(z[0, 5, 5, 5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="square axial plane"):
        augment_cube(torch.rand(4, 4, 6))
    with pytest.raises(TypeError):
        augment_cube(np.zeros((4, 4, 4)))


def test_positive_fraction_sampler():
    labels = np.zeros(100)
    labels[:10] = 1
    s = PositiveFractionSampler(labels, batch_size=8, pos_fraction=0.25,
                                generator=torch.Generator().manual_seed(0))
    batches = list(s)
    assert len(batches) == len(s) == 15  # 90 negatives / 6 per batch
    assert all(len(b) == 8 and sum(labels[i] for i in b) == 2 for b in batches)
    negs = [i for b in batches for i in b if labels[i] == 0]
    assert sorted(negs) == list(range(10, 100))  # every negative once per epoch
    pos = [i for b in batches for i in b if labels[i] == 1]
    assert set(pos) == set(range(10))
    s2 = PositiveFractionSampler(labels, batch_size=10, pos_fraction=0.5, num_batches=3)
    assert [sum(labels[i] for i in b) for b in s2] == [5, 5, 5]
    with pytest.raises(ValueError, match="positives and negatives"):
        PositiveFractionSampler(np.zeros(5), 4)
    with pytest.raises(ValueError, match="pos_fraction"):
        PositiveFractionSampler(labels, 4, pos_fraction=1.0)


def test_predict_tta_shape_and_symmetry():
    set_seed(0)
    net = NoduleNet3D(widths=(4, 8))
    cubes = np.random.default_rng(0).random((5, 12, 12, 12)).astype(np.float32)
    p8 = predict_tta(net, cubes, n=8, batch_size=2)
    assert p8.shape == (5,) and bool(((p8 >= 0) & (p8 <= 1)).all())
    assert net.training  # mode restored
    # a cube symmetric under every flip gives the same answer with or without TTA
    sym = cubes[:1] + cubes[:1, ::-1] 
    sym = sym + sym[:, :, ::-1]
    sym = sym + sym[:, :, :, ::-1]
    assert float(predict_tta(net, sym, n=8)) == pytest.approx(float(predict_tta(net, sym, n=1)), abs=1e-5)
    assert not torch.allclose(p8, predict_tta(net, cubes, n=1))
    with pytest.raises(ValueError, match="flip combinations"):
        predict_tta(net, cubes, n=9)


def test_weights_round_trip_weights_only(tmp_path):
    set_seed(0)
    net = NoduleNet3D(widths=(4, 8), dropout=0.1).eval()
    path = save_classifier(net, tmp_path / "w.pt", info={"seed": 0, "auc": 0.5})
    raw = torch.load(path, weights_only=True)
    assert raw["arch"]["widths"] == [4, 8] and raw["preprocessing"]["size_mm"] == 32.0
    loaded = load_classifier(path, device="cpu")
    x = torch.rand(2, 1, 8, 8, 8)
    assert torch.equal(loaded(x), net(x))
    assert loaded.info["auc"] == 0.5 and loaded.preprocessing["clip_hu"] == [-1000.0, 400.0]
    with pytest.raises(FileNotFoundError, match="pipeline.training"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lungscreen 3D CNN"):
        load_classifier(tmp_path / "other.pt")


def test_cube_dataset_checks():
    ds = CubeDataset(np.full((2, 4, 4, 4), -1000, np.int16), [0, 1])
    x, y = ds[1]
    assert x.shape == (1, 4, 4, 4) and float(x.max()) == 0.0 and float(y) == 1.0
    with pytest.raises(ValueError, match="2 cubes but 3 labels"):
        CubeDataset(np.zeros((2, 4, 4, 4)), [0, 1, 0])
