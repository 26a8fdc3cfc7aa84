"""Benchmarks print figures; these tests check what they compute, never how fast it is."""

from __future__ import annotations


from diffscrub.bench.compare import _row, format_table


def _rate(x):
    return {"k": 0, "n": 10, "rate": x, "ci": [0, 1]}


METRICS = {"sets": {
    "null": {"concept_rate": {"reader": "oracle", "reference": _rate(0.12), "erased": _rate(0.02)}},
    "concept": {"concept_rate": {"reader": "oracle", "reference": _rate(0.9), "erased": _rate(0.4)},
                "concept_rate_by_prompt": [
                    {"prompt": "7 on grass", "reference": {"k": 5, "n": 5}, "erased": {"k": 0, "n": 5}},
                    {"prompt": "7 and 3 on flat", "reference": {"k": 4, "n": 5}, "erased": {"k": 4, "n": 5}}]},
    "other": {"prompt_adherence": {"reference": _rate(0.8), "erased": _rate(0.78)},
              "background_adherence": {"reference": _rate(1.0), "erased": _rate(0.625)},
              "frechet_distance": {"reference": {"value": 1.5, "ci": [1.25, 2.0]}, "erased": {"value": 1.7}}},
}}


def test_rows_and_table():
    ref = _row("original", METRICS, reference=True)
    era = _row("tss", METRICS, wall_s=12.0, peak_mb=900.0)
    assert (ref["null_rate"], ref["concept_rate"], ref["adherence"], ref["fd"]) == (0.12, 0.9, 0.8, 1.5)
    assert (era["null_rate"], era["concept_rate"], era["adherence"], era["fd"]) == (0.02, 0.4, 0.78, 1.7)
    assert (ref["background"], era["background"]) == (1.0, 0.625)
    table = format_table([ref, era], "7")
    assert "asked bg" in table and "100.0%" in table and "62.5%" in table
    assert "12.0%" in table and " 2.0%" in table and "40.0%" in table and "1.70" in table and "900" in table
    # the naming column prompt by prompt: the erased model still draws it under the two-digit prompt
    lines = table.splitlines()
    start = lines.index("prompts naming 7, samples that show it:")
    assert lines[start + 1].split()[1:] == ["7", "on", "grass", "7", "and", "3", "on", "flat"]
    assert lines[start + 2].split() == ["original", "5/5", "4/5"] and lines[start + 3].split() == ["tss", "0/5", "4/5"]
    assert "samples that show it" not in format_table([_row("tss", {"sets": {}})], "7")  # nothing to break down
    # the Frechet distance's interval, for the rows whose evaluation gave one
    assert "FD (other), 95% bootstrap interval: original 1.2-2.0" in table and "tss 1." not in table.split("interval")[1]
    assert "bootstrap interval" not in format_table([era], "7")


def test_seed_step_is_faithful(tiny_pipeline_dirs, monkeypatch):
    """The reference step does what the design note's step does: a VAE encode and three teacher passes
    per step (plus one each for the retain anchor); ours does one batched teacher call."""
    from diffscrub.bench import speed
    from diffscrub.core import context

    calls = {"teacher": 0, "encode": 0}
    real_teacher = context.ErasureContext.teacher_predict

    def count_teacher(self, *a, **k):
        calls["teacher"] += 1
        return real_teacher(self, *a, **k)

    monkeypatch.setattr(context.ErasureContext, "teacher_predict", count_teacher)
    results = {}

    def log(line):
        results["line"] = line

    monkeypatch.setattr(speed, "_time_steps", lambda fn, params, opt, steps, b, dev, peaks=None: [
        (calls.update(teacher=0), fn(b), calls["teacher"])[2] for _ in range(steps)])
    r = speed.bench_speed(str(tiny_pipeline_dirs("sd")), steps=3, rounds=1, warmup=1, retain=True, device="cpu",
                          log=log)
    # _time_steps was replaced to return teacher-call counts instead of times: medians are call counts.
    assert r["ours_s_per_step"] == 1 and r["seed_s_per_step"] == 4
    assert "speed-up" in results["line"]


def test_bench_passes_erase_options_to_every_method(monkeypatch, tmp_path, capsys):
    """`bench --lr/--batch-size/--erase-args` reach run_bench as erase options, in order."""
    from diffscrub import cli
    from diffscrub.bench import compare

    seen = {}

    def fake_run_bench(concept, out, **kwargs):
        seen.update(kwargs, concept=concept)
        (tmp_path / "bench.txt").write_text("table\n")

    monkeypatch.setattr(compare, "run_bench", fake_run_bench)
    code = cli.main(["bench", "--concept", "7", "--methods", "tss,esd", "--lr", "1e-4",
                     "--erase-args", "--fingerprint knn --knn-area 0.15", "--sample-seed", "2", "--out", str(tmp_path),
                     "--quiet"])
    assert code == 0 and seen["sample_seed"] == 2
    assert seen["extra_args"] == ["--lr=0.0001", "--fingerprint", "knn", "--knn-area", "0.15"]
    assert seen["methods"] == ["tss", "esd"] and seen["concept"] == "7"


def test_bench_later_passes_reach_every_erase(monkeypatch, tmp_path):
    """`bench --then` goes to each method's erase command as `--then=FLAGS`, after the shared options."""
    import subprocess

    import pytest

    from diffscrub import cli
    from diffscrub.bench import compare
    from diffscrub.errors import ConfigError

    seen = {}

    def fake_run_bench(concept, out, **kwargs):
        seen.update(kwargs)
        (tmp_path / "bench.txt").write_text("table\n")

    monkeypatch.setattr(compare, "run_bench", fake_run_bench)
    assert cli.main(["bench", "--concept", "7", "--then", "--trainable text-kv --lr 2e-4", "--out", str(tmp_path),
                     "--quiet"]) == 0
    assert seen["then"] == ["--trainable text-kv --lr 2e-4"]
    monkeypatch.undo()

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 2, "", "diffscrub: error: stop here")

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    with pytest.raises(ConfigError, match="stop here"):
        compare.run_bench("7", str(tmp_path / "b"), methods=["tss"], extra_args=["--lr=0.0001"],
                          then=["--trainable text-kv --lr 2e-4"], set_size=4, log=lambda m: None)
    (cmd,) = commands
    assert cmd[-2:] == ["--lr=0.0001", "--then=--trainable text-kv --lr 2e-4"]


def test_bench_refuses_bad_inputs_before_any_erase(monkeypatch, tmp_path, capsys):
    """A --retrained folder that is no pipeline, or a negative --sample-seed, is a one-line error before anything
    is erased or written."""
    import subprocess

    from diffscrub import cli

    def no_run(*args, **kwargs):
        raise AssertionError("an erase was started")

    monkeypatch.setattr(subprocess, "run", no_run)
    out = tmp_path / "bench"
    code = cli.main(["bench", "--concept", "7", "--retrained", str(tmp_path / "missing"), "--out", str(out),
                     "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "missing" in err[0] and "model_index.json" in err[0]
    assert not out.exists()
    code = cli.main(["bench", "--concept", "7", "--sample-seed", "-1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "sample_seed=-1" in err[0] and not out.exists()


def test_bench_reads_every_model_at_its_sample_seed(monkeypatch, tmp_path):
    """--sample-seed reaches the evaluation of the erased, original and retrained model alike, and bench.json."""
    import json
    import pathlib
    import subprocess

    from diffscrub import evaluation
    from diffscrub.bench import compare

    def fake_erase(cmd, **kwargs):
        folder = pathlib.Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True)
        (folder / "diffscrub.json").write_text(json.dumps({"memory": {"cpu_peak_rss_mb": 1.0}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    seeds = []

    def fake_evaluate(config, **kwargs):
        seeds.append(config.seed)
        return {"sets": {}}

    monkeypatch.setattr(compare.subprocess, "run", fake_erase)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    compare.run_bench("7", str(tmp_path / "b"), methods=["tss"], set_size=4, sample_seed=3, log=lambda m: None)
    assert seeds == [3, 3]  # the erased model, then the retrained one; the original is the erased run's reference
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["sample_seed"] == 3


def test_bench_overwrite_keeps_the_old_run_until_the_new_one_is_complete(monkeypatch, tmp_path):
    """With --overwrite, a bench that fails leaves the previous folder as it was; one that succeeds replaces it,
    and its records name the final folder, not the temporary one they were written in."""
    import json
    import pathlib
    import subprocess

    import pytest

    from diffscrub import evaluation
    from diffscrub.bench import compare
    from diffscrub.errors import ConfigError

    out = tmp_path / "b"
    out.mkdir()
    (out / "bench.txt").write_text("the previous table\n")

    def failing_erase(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "diffscrub: error: out of patience")

    monkeypatch.setattr(compare.subprocess, "run", failing_erase)
    with pytest.raises(ConfigError, match="out of patience"):
        compare.run_bench("7", str(out), methods=["tss"], set_size=4, overwrite=True, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left beside it
    assert [p.name for p in out.iterdir()] == ["bench.txt"]
    assert (out / "bench.txt").read_text() == "the previous table\n"

    def fake_erase(cmd, **kwargs):
        folder = pathlib.Path(cmd[cmd.index("--out") + 1])
        folder.mkdir(parents=True)
        forget = cmd[cmd.index("--forget") + 1]
        assert pathlib.Path(forget).is_dir()  # the sets exist where the erase is told to read them
        record = {"memory": {"cpu_peak_rss_mb": 1.0}, "config": {"forget": forget, "out": str(folder)}}
        (folder / "diffscrub.json").write_text(json.dumps(record))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(compare.subprocess, "run", fake_erase)
    monkeypatch.setattr(evaluation, "evaluate", lambda config, **kwargs: {"sets": {}})
    compare.run_bench("7", str(out), methods=["tss"], set_size=4, overwrite=True, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert "the previous table" not in (out / "bench.txt").read_text()
    record = json.loads((out / "erased-tss" / "diffscrub.json").read_text())
    assert record["config"] == {"forget": str(out / "sets" / "forget"), "out": str(out / "erased-tss")}
    assert pathlib.Path(record["config"]["forget"]).is_dir()
