"""`fewshot train`: short real runs of both trainers, their artefacts and --resume."""

import json
import subprocess
import sys

import pytest

from fewshot.cli import main as cli_main
from fewshot.models.inner_loop.averaging import average_checkpoints
from fewshot.models.inner_loop.training import MetaTrainConfig


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot.cli", "train", *args], capture_output=True, text=True, timeout=600)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_supervised_run_writes_checkpoints_metrics_curves_and_resumes(tmp_path):
    run = tmp_path / "sup"
    common = [
        "--dataset",
        "omniglot",
        "--width",
        "32",
        "--pools",
        "2",
        "--loss",
        "sce",
        "--metric",
        "nca",
        "--combine",
        "directsum",
        "--temperature",
        "64",
        "--batch-classes",
        "16",
        "--batch-shots",
        "4",
        "--val-tasks",
        "20",
        "--threads",
        "2",
        "--out",
        str(run),
    ]
    first = _train(*common, "--epochs", "1", "--max-steps", "12")
    assert first.returncode == 0, first.stderr
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).exists(), name
    rows = _rows(run)
    assert rows[-1]["kind"] == "val" and rows[-1]["step"] == 12 and 20 < rows[-1]["accuracy"] <= 100
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) >= 2 and all(0 < r["cls"] < 20 and 0 <= r["metric"] < 20 for r in train_rows)
    second = _train(*common, "--epochs", "2", "--max-steps", "24", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout + second.stderr
    assert _rows(run)[-1]["step"] == 24
    # packaging tunes every registered head on validation tasks; the packaged model evaluates with each
    zoo = tmp_path / "zoo"
    packaged = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "package", "--run", str(run), "--name", "tiny", "--out", str(zoo), "--tune-tasks", "10"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert packaged.returncode == 0, packaged.stderr
    card = json.loads((zoo / "tiny" / "card.json").read_text())
    assert set(card["heads"]) == {"centroid", "laplacianshot", "logreg"}
    assert set(card["head_tuning"]["accuracy"]) >= {"logreg_1shot", "logreg_5shot", "laplacianshot_1shot"}
    assert card["heads"]["logreg"]["weight_decay"]["1"] in card["heads"]["logreg"]["weight_decay_grid"]
    row = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "eval", "--model", str(zoo / "tiny"), "--head", "logreg", "--tasks", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert row.returncode == 0, row.stderr
    assert json.loads(row.stdout)["head"] == "logreg" and 20 < json.loads(row.stdout)["accuracy"] <= 100


def test_meta_run_writes_checkpoints_and_resumes_with_a_new_outer_lr_and_schedule(tmp_path):
    import torch

    run = tmp_path / "meta"
    common = [
        "--method",
        "cxgrad",
        "--dataset",
        "omniglot",
        "--width",
        "16",
        "--val-every",
        "4",
        "--val-tasks",
        "5",
        "--meta-batch",
        "2",
        "--inner-steps",
        "2",
        "--bn-train",
        "support",
        "--threads",
        "2",
        "--out",
        str(run),
    ]
    proc = _train(*common, "--iterations", "4")
    assert proc.returncode == 0, proc.stderr
    assert (run / "best.pt").exists() and _rows(run)[-1]["kind"] == "val"
    proc = _train(*common, "--iterations", "8", "--outer-lr", "0.0001", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr and "at iteration 4/8 (outer lr 0.0001)" in proc.stdout + proc.stderr
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["iteration"] == 8 and {g["lr"] for g in last["opt"]["param_groups"]} == {0.0001}
    # Stage 2 of the shipped Omniglot pair: rotated classes and the cosine decay on the absolute iteration.
    proc = _train(*common, "--iterations", "10", "--rotations", "--outer-lr-schedule", "cosine", "--resume")
    assert proc.returncode == 0, proc.stderr
    last = torch.load(run / "last.pt", weights_only=False)
    cfg = MetaTrainConfig(**last["config"])
    assert cfg.rotations and cfg.outer_lr_schedule == "cosine" and cfg.iterations == 10
    assert {g["lr"] for g in last["opt"]["param_groups"]} == {cfg.outer_lr_at(9)}
    assert _rows(run)[-2]["kind"] == "train" and _rows(run)[-2]["outer_lr"] == cfg.outer_lr_at(9)


def test_fine_tuning_a_shipped_model_from_its_backbone_keeps_its_stem_and_resumes_its_weights(tmp_path):
    """--init-backbone builds the shipped inner-loop model's network (frozen statistics, transform, fixed stem);
    --init-from then starts from its meta-parameters and rule. The stem and the frozen statistics stay exactly
    as shipped (not meta-trained), the validation before the first step is written, and the run resumes."""
    import torch
    from safetensors.torch import load_file

    from fewshot.models.zoo import ZOO_DIR

    run = tmp_path / "from-backbone"
    common = [
        "--method",
        "cxgrad",
        "--dataset",
        "omniglot",
        "--val-every",
        "2",
        "--val-tasks",
        "3",
        "--meta-batch",
        "1",
        "--inner-steps",
        "1",
        "--bn-train",
        "support",
        "--threads",
        "2",
        "--outer-lr",
        "1e-3",
        "--rule-lr",
        "1e-2",
        "--init-backbone",
        "omniglot-conv4-directsum",
        "--head-init",
        "centroid",
        "--adapt-from",
        "3",
        "--init-from",
        "omniglot-conv4-cxgrad",
        "--out",
        str(run),
    ]
    proc = _train(*common, "--iterations", "2")
    assert proc.returncode == 0, proc.stderr
    shipped = load_file(str(ZOO_DIR / "omniglot-conv4-cxgrad" / "weights.safetensors"))
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["config"]["head_init"] == "centroid" and last["net_config"]["adapt_from"] == 3
    for name in ("conv0__weight", "conv2__weight", "bn1__bias", "bn3__mean", "bn3__var", "center"):
        key = "param." + name.replace("__", ".")
        if key in shipped:
            assert torch.equal(last["meta"][name], shipped[key]), name
    assert not torch.equal(last["meta"]["conv3__weight"], shipped["param.conv3.weight"])  # the adapted block trains
    rows = _rows(run)
    assert [r["step"] for r in rows if r["kind"] == "val"] == [0, 2]  # where it starts, then after 2 iterations
    resumed = _train(*common, "--iterations", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout + resumed.stderr and _rows(run)[-1]["step"] == 4


def test_a_ways_range_draws_each_episode_its_ways_and_validates_at_both_ends(tmp_path):
    """--min-ways/--max-ways (issue 16): training episodes of 2..6 classes, validation at --ways and
    --max-ways, the kept checkpoint chosen on their mean; the draw is seeded per episode."""
    from fewshot.models.data import load_dataset
    from fewshot.models.inner_loop.training import WaysSampler

    val = load_dataset("omniglot", "val")
    sampler = WaysSampler(val, 2, 6, 1, 2, seed=3)
    ways = [len(sampler.episode(i).classes) for i in range(60)]
    assert set(ways) == {2, 3, 4, 5, 6} and ways == [len(sampler.episode(i).classes) for i in range(60)]
    fixed = WaysSampler(val, 5, 5, 1, 2, seed=3).episode(7)  # a fixed ways draws what EpisodeSampler drew before
    from fewshot.models.episodes import EpisodeSampler

    assert (fixed.support == EpisodeSampler(val, 5, 1, 2, seed=3).episode(7).support).all()
    run = tmp_path / "ways"
    proc = _train(
        "--method",
        "cxgrad",
        "--dataset",
        "omniglot",
        "--width",
        "16",
        "--val-every",
        "2",
        "--val-tasks",
        "3",
        "--meta-batch",
        "2",
        "--inner-steps",
        "1",
        "--bn-train",
        "support",
        "--threads",
        "2",
        "--iterations",
        "2",
        "--head-init",
        "shared",
        "--ways",
        "3",
        "--min-ways",
        "2",
        "--max-ways",
        "6",
        "--out",
        str(run),
    )
    assert proc.returncode == 0, proc.stderr
    row = _rows(run)[-1]
    assert row["kind"] == "val" and set(row["by_ways"]) == {"3", "6"} and row["accuracy"] == row["by_ways"]["3"][0]
    assert abs(row["score"] - (row["by_ways"]["3"][0] + row["by_ways"]["6"][0]) / 2) < 1e-9
    assert "6-way" in proc.stdout + proc.stderr


def test_cosine_outer_lr_runs_from_outer_lr_to_a_hundredth():
    cfg = MetaTrainConfig(outer_lr=1e-3, iterations=1000, outer_lr_schedule="cosine")
    lrs = [cfg.outer_lr_at(i) for i in range(0, 1001, 50)]
    assert lrs[0] == 1e-3 and abs(lrs[-1] - 1e-5) < 1e-12 and abs(cfg.outer_lr_at(500) - (1e-3 + 1e-5) / 2) < 1e-12
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert {MetaTrainConfig(outer_lr=1e-3, iterations=10).outer_lr_at(i) for i in range(10)} == {1e-3}


def test_train_rejects_bad_options_in_one_line(tmp_path, capsys):
    proc = _train("--dataset", "mnist", "--out", str(tmp_path))  # one real process: exit status 2, one stderr line
    assert proc.returncode == 2 and "unknown --dataset 'mnist'" in proc.stderr and proc.stderr.count("\n") == 1

    def refused(*args: str) -> str:  # the same entry point in this process (no torch import per case)
        assert cli_main(["train", *args, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "--loss do not apply to meta-training" in refused("--method", "maml", "--loss", "sce")
    assert "--rotations applies to Omniglot only" in refused("--method", "maml", "--dataset", "tinyimagenet", "--rotations")
    assert "need a head that adapts any number of classes" in refused("--method", "maml", "--max-ways", "20")
    assert "2 <= min-ways <= --ways (5) <= max-ways" in refused(
        "--method", "maml", "--head-init", "shared", "--min-ways", "6", "--max-ways", "20"
    )
    assert "unknown --outer-lr-schedule 'linear'" in refused("--method", "maml", "--outer-lr-schedule", "linear")
    assert "feature dim > classes" in refused("--combine", "directsum", "--dataset", "omniglot", "--pools", "4", "--max-steps", "1")


def test_average_of_snapshots_is_validated_and_kept_only_if_better(tmp_path):
    import torch

    run = tmp_path / "avg"
    proc = _train(
        "--method",
        "maml",
        "--dataset",
        "omniglot",
        "--width",
        "16",
        "--val-every",
        "2",
        "--val-tasks",
        "5",
        "--meta-batch",
        "2",
        "--inner-steps",
        "1",
        "--iterations",
        "6",
        "--threads",
        "2",
        "--out",
        str(run),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["2.pt", "4.pt", "6.pt"]
    snaps = [torch.load(run / "snapshots" / f"{i}.pt", weights_only=False) for i in (4, 6)]
    assert all("opt" not in s for s in snaps)  # snapshots hold weights only
    mean = average_checkpoints([run / "snapshots" / f"{i}.pt" for i in (4, 6)])
    assert mean["averaged_iterations"] == [4, 6] and "opt" not in mean
    for part in ("meta", "rule"):
        for k, v in mean[part].items():
            torch.testing.assert_close(v, (snaps[0][part][k] + snaps[1][part][k]) / 2)
    trained_best = torch.load(run / "best.pt", weights_only=False)["best"]
    proc = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "average", "--run", str(run), "--from-iteration", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    row = _rows(run)[-1]
    assert row["kind"] == "val_average" and row["iterations"] == [4, 6] and row["best_single"] == trained_best
    assert "average of 2 snapshots (4..6)" in proc.stdout
    best = torch.load(run / "best.pt", weights_only=False)
    single = torch.load(run / "best-single.pt", weights_only=False)
    assert single["best"] == trained_best and "averaged_iterations" not in single
    if row["kept"]:  # the averaged weights are the mean of the two snapshots and carry their validation score
        assert best["averaged_iterations"] == [4, 6] and best["best"] == row["accuracy"] > trained_best
        for k, v in best["meta"].items():
            torch.testing.assert_close(v, (snaps[0]["meta"][k] + snaps[1]["meta"][k]) / 2)
    else:
        assert row["accuracy"] <= trained_best and best["best"] == trained_best and "averaged_iterations" not in best
    proc = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "average", "--run", str(run), "--from-iteration", "100"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "fewer than 2 snapshots at or after iteration 100" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_meta_training_under_torchrun_equals_one_process_on_the_same_tasks(tmp_path):
    """Two CPU processes under ``torchrun`` (Gloo): each adapts half of every meta-batch, gradients are
    all-reduced, rank 0 alone writes the run. After a few iterations (and a resume) the weights equal
    the single-process run's on the same tasks to float rounding, and the metrics have one writer."""
    import os
    from pathlib import Path

    import torch

    common = [
        "--method",
        "cxgrad",
        "--dataset",
        "omniglot",
        "--width",
        "16",
        "--val-every",
        "3",
        "--val-tasks",
        "5",
        "--meta-batch",
        "4",
        "--inner-steps",
        "2",
        "--bn-train",
        "support",
        "--threads",
        "1",
        "--seed",
        "3",
    ]
    alone, together = tmp_path / "alone", tmp_path / "together"
    for iterations, resume in (("3", []), ("5", ["--resume"])):  # the same stages as below: the same log windows
        assert _train(*common, "--iterations", iterations, "--out", str(alone), *resume).returncode == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for iterations, resume in (("3", []), ("5", ["--resume"])):
        proc = subprocess.run(
            [
                str(torchrun),
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "fewshot.cli",
                "train",
                *common,
                "--iterations",
                iterations,
                "--out",
                str(together),
                *resume,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(run / "last.pt", weights_only=False) for run in (alone, together))
    assert a["iteration"] == b["iteration"] == 5
    for part in ("meta", "rule"):
        for name, value in a[part].items():
            torch.testing.assert_close(b[part][name], value, rtol=1e-4, atol=1e-6, msg=f"{part}.{name}")
    rows = _rows(together)
    assert [r["step"] for r in rows if r["kind"] == "val"] == [3, 5]  # one writer: no duplicated rows
    # each task adapted once over both ranks (Adam alone would hide a doubled gradient; the summed loss does not)
    losses = [[r["loss"] for r in _rows(run) if r["kind"] == "train"] for run in (alone, together)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_supervised_training_under_torchrun_splits_each_batch_and_has_one_writer(tmp_path):
    """Two Gloo processes: each embeds half of every P x K batch, the features are gathered so the
    direct-sum loss is the whole batch's, gradients all-reduced; rank 0 alone writes; resumable. BatchNorm
    normalises each rank's half (SyncBatchNorm is GPU-only), so the run is close to, not equal to, one
    process's on the same batches: the logged losses agree to a few percent."""
    import os
    from pathlib import Path

    common = [
        "--dataset",
        "omniglot",
        "--width",
        "32",
        "--pools",
        "2",
        "--loss",
        "sce",
        "--metric",
        "nca",
        "--combine",
        "directsum",
        "--temperature",
        "64",
        "--batch-classes",
        "16",
        "--batch-shots",
        "4",
        "--val-tasks",
        "10",
        "--threads",
        "1",
        "--no-amp",
    ]
    alone, together = tmp_path / "alone", tmp_path / "together"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "fewshot.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage in (["--epochs", "1", "--max-steps", "10"], ["--epochs", "2", "--max-steps", "20", "--resume"]):
        assert _train(*common, *stage, "--out", str(alone)).returncode == 0
        proc = subprocess.run([*torchrun, *common, *stage, "--out", str(together)], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(together) if r["kind"] == "val"] == [10, 20]  # one writer
    losses = [[r["loss"] for r in _rows(run) if r["kind"] == "train"] for run in (alone, together)]
    assert len(losses[0]) == len(losses[1]) >= 2
    assert losses[1] == pytest.approx(losses[0], rel=0.05), losses
