import numpy as np
import pytest


@pytest.fixture(scope="session")
def lung1():
    """``(image_path, label_path)`` of the real lung1 chest CT, or skip with the reason."""
    from synth.data import DataUnavailable, lung1_paths

    try:
        return lung1_paths()
    except DataUnavailable as exc:
        pytest.skip(f"lung1 CT not available: {exc}")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """Tiny torch models run faster on one thread, above all on a busy CI machine; restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pycerr():
    """``{"pat_1": folder, ...}``: pycerr's four real chest CTs with tumour RTSTRUCTs, or skip."""
    from synth.data import DataUnavailable, pycerr_patients

    try:
        return pycerr_patients()
    except DataUnavailable as exc:
        pytest.skip(f"pycerr chest CTs not available: {exc}")


@pytest.fixture
def tmpfs():
    """``mount(folder, options)``: a tmpfs mounted at ``folder`` (made if missing) with mount
    ``options`` (e.g. ``"size=1200k"``, ``"ro,size=1m"``), unmounted after the test; the test is
    skipped with the reason where it cannot mount (no root or no mount rights)."""
    import subprocess

    mounted = []

    def mount(folder, options):
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
