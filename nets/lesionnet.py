"""The lesion net: which soft tissue next to a lung is a lesion the lung mask must keep.

A classical lung mask (air below -320 HU) leaves out whatever fills the lung with soft
tissue: a tumour against the chest wall, a hilar mass, consolidation.  Geometry alone cannot
tell such a lesion from the heart or the mediastinum, which dent the lung the same way, so
this small 2-D U-Net learns it from appearance and context.  It reads axial slices at 2 mm
(in-plane) with four channels, the HU of the slice and of the slices ``CONTEXT_MM`` above and
below (clipped to -1000..400, scaled to 0..1) and the classical lung mask, and gives the
probability that a pixel is lesion.  :func:`stages.lungmask.segment_lungs` adds the lesion
pixels that touch a lung to it.

Trained by ``python -m pipeline.lesion_training`` (the project's one training loop,
``nets.train.Learner``) on the real chest CTs the project can have offline, with their own
tumours and with masses inserted by :mod:`synth.masses`; see ``models/lesion_net.md``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LesionNet", "slice_inputs", "predict_lesions", "load_lesion_net", "DEFAULT_WEIGHTS",
           "CONTEXT_MM", "IN_PLANE_FACTOR"]

#: The weights shipped with lungscreen.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "lesion_net.pt"
#: The slices above and below that the net also sees (mm, on the 1 mm grid).
CONTEXT_MM = 4
#: In-plane downsampling (1 mm -> 2 mm pixels).
IN_PLANE_FACTOR = 2
HU_RANGE = (-1000.0, 400.0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class LesionNet(nn.Module):
    """A 2-D U-Net: ``(N, 4, H, W)`` inputs (H, W multiples of 8) -> ``(N, 1, H, W)`` logits."""

    def __init__(self, in_channels: int = 4, base: int = 16):
        super().__init__()
        c = [base, base * 2, base * 4, base * 8]
        self.config = {"in_channels": in_channels, "base": base}
        self.down = nn.ModuleList([_block(in_channels, c[0]), _block(c[0], c[1]), _block(c[1], c[2])])
        self.bottom = _block(c[2], c[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in (2, 1, 0)])
        self.dec = nn.ModuleList([_block(c[i] * 2, c[i]) for i in (2, 1, 0)])
        self.head = nn.Conv2d(c[0], 1, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    """Average ``f`` x ``f`` pixel blocks of the last two axes (cropped to multiples of ``f``)."""
    h, w = (a.shape[-2] // f) * f, (a.shape[-1] // f) * f
    a = a[..., :h, :w]
    return a.reshape(*a.shape[:-2], h // f, f, w // f, f).mean(axis=(-3, -1))


def slice_inputs(hu: np.ndarray, lung: np.ndarray, zs=None) -> np.ndarray:
    """The net's inputs for slices ``zs`` (default all) of a 1 mm scan: float32 ``(n, 4, H, W)``.

    ``H, W`` are the in-plane size over :data:`IN_PLANE_FACTOR`, padded up to multiples of 8.
    """
    zs = np.arange(hu.shape[0]) if zs is None else np.asarray(zs)
    lo, hi = HU_RANGE
    scaled = (np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo)
    n = hu.shape[0]
    planes = [scaled[np.clip(zs - CONTEXT_MM, 0, n - 1)], scaled[zs], scaled[np.clip(zs + CONTEXT_MM, 0, n - 1)],
              (lung[zs] > 0).astype(np.float32)]
    x = _pool(np.stack(planes, axis=1), IN_PLANE_FACTOR)
    pad_h, pad_w = (-x.shape[-2]) % 8, (-x.shape[-1]) % 8
    if pad_h or pad_w:
        x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
    return np.ascontiguousarray(x, dtype=np.float32)


def load_lesion_net(path=DEFAULT_WEIGHTS, device="cpu") -> LesionNet:
    """A :class:`LesionNet` with the weights at ``path`` (read with ``weights_only=True``), in eval mode."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = LesionNet(**state["config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def predict_lesions(hu: np.ndarray, lung: np.ndarray, model: LesionNet, *, device="cpu",
                    z_step: int = 2, batch: int = 16) -> np.ndarray:
    """Lesion probability (float32, the shape of ``hu``) of every voxel of a 1 mm scan.

    The net runs on every ``z_step``-th slice; each other slice takes its nearest computed
    slice's answer; in-plane the 2 mm answer is repeated to 1 mm.
    """
    zs = np.arange(0, hu.shape[0], z_step)
    out = np.zeros((len(zs),) + hu.shape[1:], np.float32)
    f = IN_PLANE_FACTOR
    h, w = hu.shape[1] // f, hu.shape[2] // f
    with torch.inference_mode():
        for i in range(0, len(zs), batch):
            x = torch.from_numpy(slice_inputs(hu, lung, zs[i:i + batch])).to(device)
            p = torch.sigmoid(model(x))[:, 0, :h, :w].float().cpu().numpy()
            up = np.repeat(np.repeat(p, f, axis=1), f, axis=2)
            out[i:i + len(p), :up.shape[1], :up.shape[2]] = up
    nearest = np.clip(np.rint(np.arange(hu.shape[0]) / z_step).astype(int), 0, len(zs) - 1)
    return out[nearest]
