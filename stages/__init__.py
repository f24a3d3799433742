"""lungscreen stages: plain functions on numpy arrays and :class:`~stages.volume.Volume` records.

One module per stage; each is importable alone::

    from stages.ingest import read_scan
    from stages.hounsfield import to_hounsfield
    from stages.resample import resample
"""
from stages.volume import Volume, xyz_to_zyx, zyx_to_xyz

__all__ = ["Volume", "xyz_to_zyx", "zyx_to_xyz"]
