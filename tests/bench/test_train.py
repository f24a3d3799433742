"""bench.train's 1- vs 2-process comparison runs the DDP path and records what it set."""
import pytest
import torch

from bench.train import bench_ddp, main


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_bench_ddp_shares_the_cores_between_one_and_two_processes(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the machine's cores, as torch sees them
    res = bench_ddp("cpu", widths=(4,), sizes=(4, 2), repeats=1)
    runs = res["runs"]
    assert [(r["processes"], r["threads_per_process"], r["backend"]) for r in runs] == \
        [(1, 2, None), (2, 1, "gloo"), (1, 1, None)]
    assert all(r["global_batch"] == 4 and r["steps"] == 2 and r["train_samples_per_s"] > 0
               and len(r["loadavg_before"]) == 3 for r in runs)
    assert res["best_samples_per_s"] == {f"{r['processes']}x{r['threads_per_process']}":
                                         r["train_samples_per_s"] for r in runs}


def test_bench_train_refuses_an_unknown_part(capsys):
    assert main(["--only", "ddpp"]) == 2
    assert "--only takes cnn3d and ddp, got 'ddpp'" in capsys.readouterr().err
