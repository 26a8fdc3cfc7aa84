"""Runs that survive faults: kills, signals, non-finite losses."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from diffscrub.core.checkpoint import checkpoint_root, complete_checkpoints
from random_images import write_random_images as _images

STEPS = 8


def _cmd(model, forget, out, *extra):
    return [sys.executable, "-m", "diffscrub", "erase", "--model", str(model), "--forget", str(forget),
            "--out", str(out), "--steps", str(STEPS), "--batch-size", "2", "--quiet", "--seed", "3",
            "--checkpoint-every", "1", "--inversion-steps", "3", "--num-prototypes", "2",
            "--vectors-per-image", "16", "--contrast-samples", "2", "--contrast-sample-steps", "2", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _unet(out):
    return load_file(str(next((out / "unet").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    model, forget = tiny_pipeline_dirs("sd"), _images(base / "forget")
    out = base / "reference-run"
    subprocess.run(_cmd(model, forget, out), check=True, env=_env(), timeout=300)
    return model, forget, _unet(out)


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL a real run at a random moment of Phase 2, resume until done: same weights."""
    model, forget, expected = uninterrupted
    out = tmp_path / "out"
    root = checkpoint_root(out)
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):
        extra = ["--resume"] if attempt else []
        proc = subprocess.Popen(_cmd(model, forget, out, *extra), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if kills < 2:
            # Wait until training is under way (a checkpoint newer than any before), then kill at random.
            before = len(complete_checkpoints(root))
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline and len(complete_checkpoints(root)) <= before:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert kills >= 1, "the run finished before it could be killed"
    assert (out / "diffscrub.json").is_file() and not root.exists()
    got = _unet(out)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-6), key


def test_sigterm_checkpoint_refusals_and_resume(uninterrupted, tmp_path):
    """SIGTERM in Phase 2 saves a checkpoint and exits 130 with a one-line message; a fresh run refuses
    to discard it, a resume with other inputs is refused, and a proper resume ends with the same weights."""
    model, forget, expected = uninterrupted
    out = tmp_path / "out"
    root = checkpoint_root(out)
    proc = subprocess.Popen(_cmd(model, forget, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not complete_checkpoints(root):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 130, err.decode()[-2000:]
    message = err.decode().strip().splitlines()[-1]
    assert message.startswith("diffscrub: error: stopped by SIGTERM at step") and "--resume" in message
    assert complete_checkpoints(root) and not out.exists()

    fresh = subprocess.run(_cmd(model, forget, out), env=_env(), capture_output=True, timeout=300)
    assert fresh.returncode == 2 and b"pass --resume" in fresh.stderr
    other = _images(tmp_path / "other", n=3)
    wrong = subprocess.run(_cmd(model, other, out, "--resume"), env=_env(), capture_output=True, timeout=300)
    assert wrong.returncode == 2 and b"other inputs or options" in wrong.stderr
    resumed = subprocess.run(_cmd(model, forget, out, "--resume"), env=_env(), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    got = _unet(out)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-6), key


def test_partial_checkpoint_is_never_loaded(tmp_path):
    """A save killed midway leaves a .tmp- folder or one without meta: neither counts as a checkpoint."""
    root = checkpoint_root(tmp_path / "out")
    (root / "step-0000004.tmp-123").mkdir(parents=True)
    (root / "step-0000004.tmp-123" / "meta.json").write_text('{"complete": true}')
    (root / "step-0000002").mkdir()
    (root / "step-0000002" / "state.safetensors").write_bytes(b"")
    assert complete_checkpoints(root) == []


def test_nonfinite_loss_names_term_and_step(tmp_path, monkeypatch):
    from diffscrub.config import EraseConfig
    from diffscrub.core.trainer import erase
    from diffscrub.errors import TrainingError
    from diffscrub.methods.tss import method as tss_mod
    from tiny_pipelines import build_tiny_pipeline

    real = tss_mod.TeacherStudentScrubber.loss

    def poisoned(self, step, batch_size):
        total, terms = real(self, step, batch_size)
        if step == 3:
            terms["forget"] = terms["forget"] * float("nan")
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(tss_mod.TeacherStudentScrubber, "loss", poisoned)
    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=5, batch_size=2, quiet=True,
                      device="cpu", conditioning="null", checkpoint_every=2)
    with pytest.raises(TrainingError, match=r"step 3 \(term: forget\).*last good checkpoint .*step-0000002"):
        erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                    "contrast_samples": 2, "contrast_sample_steps": 2}, pipe=build_tiny_pipeline("sd"),
              log=lambda m: None)
    assert not (tmp_path / "o").exists()
    assert complete_checkpoints(checkpoint_root(tmp_path / "o"))


def test_disk_full_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    """A full disk while saving a checkpoint: one-line error, the previous checkpoint intact, no partial one."""
    from diffscrub.config import EraseConfig
    from diffscrub.core import checkpoint as ck
    from diffscrub.core.trainer import erase
    from diffscrub.errors import InputError
    from tiny_pipelines import build_tiny_pipeline

    real_write = ck._write

    def write(root, tmp, step, **kw):
        if step == 4:
            tmp.mkdir(parents=True, exist_ok=True)
            raise OSError(28, "No space left on device")
        return real_write(root, tmp, step, **kw)

    monkeypatch.setattr(ck, "_write", write)
    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=6, batch_size=2, quiet=True,
                      device="cpu", conditioning="null", checkpoint_every=2)
    with pytest.raises(InputError, match=r"disk space while saving checkpoint 4 .*'step-0000002' is intact.*--resume"):
        erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                    "contrast_samples": 2, "contrast_sample_steps": 2}, pipe=build_tiny_pipeline("sd"),
              log=lambda m: None)
    root = checkpoint_root(tmp_path / "o")
    assert [p.name for p in complete_checkpoints(root)] == ["step-0000002"]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_checkpoint_and_artifacts_when_every_prototype_is_kept(tmp_path):
    """--no-contrastive keeps every prototype, so two saved tensors share memory; both the checkpoint
    and the artifacts file must still be written (safetensors refuses shared storage)."""
    from diffscrub.config import EraseConfig
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=3, batch_size=2, quiet=True,
                      device="cpu", conditioning="null", checkpoint_every=1)
    result = erase(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                         "contrastive": False}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    artifacts = load_file(str(tmp_path / "o" / "diffscrub_artifacts.safetensors"))
    assert torch.equal(artifacts["prototypes"], artifacts["all_prototypes"])
    assert result.record["prepare"]["prototypes_kept"] == 2


def test_atomic_dir_records_name_the_final_folder(tmp_path, monkeypatch):
    """Paths recorded while a run writes into its temporary folder are rewritten, in JSON records and HTML
    reports, to the folder it is renamed to, in the form they were given (relative or resolved); other files
    are left byte for byte, and a failed run leaves the previous folder as it was."""
    import html
    import json

    from diffscrub.core.output import atomic_dir

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "r&d \"one\""
    out.mkdir(parents=True)
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(os.path.relpath(out), overwrite=True) as tmp:
            (tmp / "half.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and len(list(out.parent.iterdir())) == 1

    rel = pathlib.Path(os.path.relpath(out))
    with atomic_dir(rel, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        record = {"out": str(tmp / "sub"), "resolved": str(tmp.resolve() / "x"), "note": f"read {tmp}/a, {tmp}/b",
                  "list": [str(tmp)], "other": "/elsewhere/data"}
        (tmp / "sub" / "record.json").write_text(json.dumps(record))
        (tmp / "report.html").write_text(f"<code>{html.escape(str(tmp / 'sub'), quote=True)}</code>")
        (tmp / "broken.json").write_text(f"{{not json {tmp}")
        (tmp / "weights.bin").write_bytes(str(tmp).encode())
    assert not (out / "old.txt").exists()
    record = json.loads((out / "sub" / "record.json").read_text())
    assert record == {"out": str(rel / "sub"), "resolved": str(out.resolve() / "x"), "note": f"read {rel}/a, {rel}/b",
                      "list": [str(rel)], "other": "/elsewhere/data"}
    assert (out / "report.html").read_text() == f"<code>{html.escape(str(rel / 'sub'), quote=True)}</code>"
    assert ".tmp-" in (out / "broken.json").read_text() and ".tmp-" in (out / "weights.bin").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
