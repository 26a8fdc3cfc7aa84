"""Data-parallel training over several processes gives the single-process result on the same global batch."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from random_images import write_random_images

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

STEPS = 3


def _images(folder, n=6):
    return write_random_images(folder, n)


def _erase_args(model, forget, out, batch=4):
    return ["-m", "diffscrub", "erase", "--model", str(model), "--forget", str(forget), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", str(batch), "--quiet", "--seed", "5", "--device", "cpu",
            "--checkpoint-every", "1", "--inversion-steps", "2", "--num-prototypes", "2",
            "--vectors-per-image", "16", "--contrast-samples", "2", "--contrast-sample-steps", "2",
            # drawn on the main process in phase 1, then every rank's forget set and epochs must hold them
            "--name-samples", "2"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep the ranks' traffic on the loopback interface
    return env


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]


def _component(out, name):
    return load_file(str(next((pathlib.Path(out) / name).glob("*.safetensors"))))


def _unet(out):
    return _component(out, "unet")


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dirs, tmp_path_factory):
    """The same run in one process and in two (global batch 4 both times)."""
    base = tmp_path_factory.mktemp("distributed")
    model, forget = tiny_pipeline_dirs("sd"), _images(base / "forget")
    single, multi = base / "single", base / "runs" / "multi"
    one = subprocess.run([sys.executable, *_erase_args(model, forget, single)], env=_env(), capture_output=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    two = subprocess.run(_torchrun(2, *_erase_args(model, forget, multi)), env=_env(), capture_output=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    return model, forget, single, multi, two


def test_two_processes_match_one_on_the_same_global_batch(runs):
    model, forget, single, multi, two = runs

    # One output folder, written once, and nothing left beside it (temporary folders, checkpoints).
    assert sorted(p.name for p in multi.parent.iterdir()) == ["multi"]
    err = two.stderr.decode()
    assert err.count("wrote ") == 1 and err.count("your forget folder looks like") == 1, err[-3000:]  # phase 1 once
    expected, got, original = _unet(single), _unet(multi), _unet(model)
    assert expected.keys() == got.keys()
    # Float-level differences only (a batch of 2 instead of 4 through the convolutions, gradients summed over
    # ranks in another order), which AdamW's normalised update turns into at most a fraction of lr (1e-4)
    # on the few weights whose gradient is ~0. Seen: max 2e-5 over 1.5M weights after 3 steps, 2 above 1e-5.
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=5e-5), key
    diff = sum(float((got[k].double() - expected[k].double()).pow(2).sum()) for k in expected) ** 0.5
    update = sum(float((expected[k].double() - original[k].double()).pow(2).sum()) for k in expected) ** 0.5
    assert update > 0.05 and diff / update < 1e-3, (diff, update)  # the runs trained, along the same path

    a = json.loads((single / "diffscrub.json").read_text())
    b = json.loads((multi / "diffscrub.json").read_text())
    assert b["world_size"] == 2 and "world_size" not in a
    assert a["conditioning"]["pool"] == b["conditioning"]["pool"]
    assert a["conditioning"]["name_samples"]["count"] == b["conditioning"]["name_samples"]["count"] == 2
    assert [r["step"] for r in a["losses"]] == [r["step"] for r in b["losses"]]
    for ra, rb in zip(a["losses"], b["losses"]):
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    masks = [load_file(str(d / "diffscrub_artifacts.safetensors"))["forget_masks"] for d in (single, multi)]
    assert torch.equal(masks[0], masks[1])


def test_passes_under_two_processes_match_one(tiny_pipeline_dirs, tmp_path):
    """``--then`` under torchrun: the main process alone writes the final record and removes the pass folder,
    every rank takes the same names from the pass before, and the result is the single-process one."""
    model, forget = tiny_pipeline_dirs("sd"), _images(tmp_path / "forget")
    # pass 2 also learns the names' rows in the text encoder: parameters outside DDP's student, whose gradients
    # the loop averages over the processes itself
    then = ("--then=--trainable cross-attention --num-prototypes 2 --vectors-per-image 16 --contrast-samples 2 "
            "--contrast-sample-steps 2 --name-embeddings --name-embedding-lr 1e-2")
    args = _erase_args(model, forget, tmp_path / "one")[:-2]  # (without --name-samples)
    one = subprocess.run([sys.executable, *args, then], env=_env(), capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    args[args.index(str(tmp_path / "one"))] = str(tmp_path / "runs" / "two")
    two = subprocess.run(_torchrun(2, *args, then), env=_env(), capture_output=True, timeout=300)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]  # no pass folder, no checkpoints
    a = json.loads((tmp_path / "one" / "diffscrub.json").read_text())
    b = json.loads((tmp_path / "runs" / "two" / "diffscrub.json").read_text())
    assert b["world_size"] == 2 and len(a["earlier_passes"]) == len(b["earlier_passes"]) == 1
    assert a["conditioning"]["given_names"] == b["conditioning"]["given_names"]
    assert b["conditioning"]["names_from_pass"] == 1
    expected, got = _unet(tmp_path / "one"), _unet(tmp_path / "runs" / "two")
    for key in expected:  # float-level differences only, as in the one-pass comparison above
        assert torch.allclose(got[key], expected[key], rtol=0, atol=5e-5), key
    assert a["name_embeddings"]["tokens"] == b["name_embeddings"]["tokens"]
    assert b["name_embeddings"]["largest_relative_change"] > 0
    tables = [_component(d, "text_encoder")["embeddings.token_embedding.weight"]
              for d in (model, tmp_path / "one", tmp_path / "runs" / "two")]
    moved = (tables[1] != tables[0]).any(-1)
    assert int(moved.sum()) == len(a["name_embeddings"]["tokens"]["text_encoder"])
    assert torch.allclose(tables[2], tables[1], rtol=0, atol=5e-5)


@pytest.mark.slow  # two more launches (~40 s on 2 busy cores)
def test_sigterm_stops_every_process_and_resume_matches(runs, tmp_path):
    """SIGTERM to the launcher: every rank stops after the same step, the main process alone saves a
    checkpoint; a two-process --resume ends with the uninterrupted two-process weights."""
    from diffscrub.core.checkpoint import checkpoint_root, complete_checkpoints

    model, forget, _, multi, _ = runs
    out = tmp_path / "out"
    root = checkpoint_root(out)
    proc = subprocess.Popen(_torchrun(2, *_erase_args(model, forget, out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not complete_checkpoints(root):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    stopped = [line for line in err.decode().splitlines() if line.startswith("diffscrub: error: stopped by SIGTERM")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], err.decode()[-3000:]  # both ranks, the same step
    assert complete_checkpoints(root) and not out.exists()
    resumed = subprocess.run(_torchrun(2, *_erase_args(model, forget, out), "--resume"), env=_env(),
                             capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert not root.exists()
    expected, got = _unet(multi), _unet(out)
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), key


@pytest.fixture(scope="module")
def fsdp_run(runs, tmp_path_factory):
    """The two-process run again with the student sharded (--fsdp) instead of replicated."""
    model, forget, _, _, _ = runs
    out = tmp_path_factory.mktemp("fsdp") / "sharded"
    probe = str(pathlib.Path(__file__).with_name("fsdp_probe.py"))  # diffscrub, counting the whole parameters
    args = _erase_args(model, forget, out)[2:]  # without "-m diffscrub"
    proc = subprocess.run(_torchrun(2, probe, *args, "--fsdp"), env=_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return out, proc.stderr.decode()


def test_sharded_student_matches_one_process(runs, fsdp_run):
    """--fsdp: weights, gradients and Adam state split over two ranks, checkpoints (every step here) and the output
    gathered whole; the result is the single-process run's, and the folder loads as a plain pipeline."""
    from diffusers import UNet2DConditionModel

    model, _, single, _, _ = runs
    fsdp_run, err = fsdp_run
    # At every checkpoint (each step but the last here), on both ranks, the whole pre-shard parameters are gone: only the
    # shards hold the model (something keeping them alive would cancel what sharding saves).
    counts = [line for line in err.splitlines() if line.startswith("whole parameters alive:")]
    assert len(counts) == 2 * (STEPS - 1) and all(line.startswith("whole parameters alive: 0 of ") for line in counts), err
    expected, got, original = _unet(single), _unet(fsdp_run), _unet(model)
    assert expected.keys() == got.keys()
    for key in expected:  # the same tolerance as DDP: float-level differences of a split batch
        assert torch.allclose(got[key], expected[key], rtol=0, atol=5e-5), key
    update = sum(float((expected[k].double() - original[k].double()).pow(2).sum()) for k in expected) ** 0.5
    diff = sum(float((got[k].double() - expected[k].double()).pow(2).sum()) for k in expected) ** 0.5
    assert update > 0.05 and diff / update < 1e-3, (diff, update)
    a = json.loads((single / "diffscrub.json").read_text())
    b = json.loads((fsdp_run / "diffscrub.json").read_text())
    assert b["world_size"] == 2 and b["config"]["fsdp"] is True
    assert a["trainable_parameters"] == b["trainable_parameters"]  # counted whole, not per shard
    for ra, rb in zip(a["losses"], b["losses"], strict=True):
        assert rb["total"] == pytest.approx(ra["total"], rel=1e-4, abs=1e-6), ra["step"]
    # diffusers writes the class name: it must be the model's own, not fully_shard's subclass
    assert json.loads((fsdp_run / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert isinstance(UNet2DConditionModel.from_pretrained(str(fsdp_run / "unet")), UNet2DConditionModel)


@pytest.mark.slow  # two more launches (~40 s on 2 busy cores)
def test_sharded_run_resumes_after_sigterm(runs, fsdp_run, tmp_path):
    """A sharded run stopped by SIGTERM resumes (whole tensors and the name-keyed Adam state re-sharded) to the
    uninterrupted sharded run's weights."""
    from diffscrub.core.checkpoint import checkpoint_root, complete_checkpoints

    model, forget, _, _, _ = runs
    fsdp_run = fsdp_run[0]
    out = tmp_path / "out"
    args = [*_erase_args(model, forget, out), "--fsdp"]
    proc = subprocess.Popen(_torchrun(2, *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not complete_checkpoints(checkpoint_root(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert complete_checkpoints(checkpoint_root(out)) and not out.exists(), err.decode()[-3000:]
    resumed = subprocess.run(_torchrun(2, *args, "--resume"), env=_env(), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    expected, got = _unet(fsdp_run), _unet(out)
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), key


def test_fsdp_refusals(tmp_path):
    """--fsdp without a launcher: one line, before anything loads (LoRA and --compile: test_config_rejects)."""
    from diffscrub.config import EraseConfig
    from diffscrub.core import distributed
    from diffscrub.errors import ConfigError

    with pytest.raises(ConfigError, match="one: launch with torchrun"):
        distributed.setup(EraseConfig(model="sd", forget=str(tmp_path), out=str(tmp_path / "o"), fsdp=True))
    cli = subprocess.run([sys.executable, "-m", "diffscrub", "erase", "--model", "sd", "--forget", str(tmp_path),
                          "--out", str(tmp_path / "o"), "--fsdp"], env=_env(), capture_output=True, timeout=120)
    lines = cli.stderr.decode().strip().splitlines()
    assert cli.returncode == 2 and len(lines) == 1 and "--fsdp" in lines[0], cli.stderr.decode()
    assert not (tmp_path / "o").exists()


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    """Under a launcher --batch-size is the global batch: one that does not split over the ranks is refused
    before anything loads (checked in-process: the launcher's environment is all it takes)."""
    from diffscrub.config import EraseConfig
    from diffscrub.core.trainer import erase
    from diffscrub.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    forget = _images(tmp_path / "forget", n=2)
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "out"), steps=2, batch_size=3, quiet=True,
                      device="cpu")
    with pytest.raises(ConfigError, match="must split evenly over the 2 processes: pass a multiple of 2"):
        erase(cfg)
    assert not (tmp_path / "out").exists()


def _ctx(rank, world, seed=0):
    from diffscrub.adapters.base import Conditioning
    from diffscrub.core.context import ErasureContext, LatentCache
    from diffscrub.schedules import DDPMSchedule

    cache = lambda n: LatentCache(torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(n)),  # noqa: E731
                                  torch.ones(n, 2, 3, 3))
    return ErasureContext(adapter=None, schedule=DDPMSchedule(torch.linspace(0.99, 0.01, 1000)), student=None, teacher=None,
                          forget=cache(5), retain=cache(7), cond=Conditioning(["", "a", "b"]),
                          generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                          rank=rank, world=world)


def _step(ctx, b):
    index = ctx.forget_sampler.next(b)
    z0 = ctx.forget.sample(index, ctx.generator)
    r_index = ctx.retain_sampler.next(b)
    return [index, z0, ctx.prompt_index(b), ctx.timesteps(b, 10, 500), ctx.randn_like(z0), ctx.randn(b, 4),
            r_index, ctx.retain.sample(r_index, ctx.generator)]


def test_sharded_draws_are_slices_of_the_single_process_draws():
    """Each of W ranks draws the global batch and keeps its rows: concatenated over ranks, every draw (sampler
    indices across epoch boundaries, posterior noise, prompts, timesteps, noises) equals one process's."""
    world, b = 3, 2
    single = _ctx(0, 1)
    ranks = [_ctx(r, world) for r in range(world)]
    for _ in range(4):  # 4 steps of 6 over 5 and 7 items: several sampler epochs
        expected = _step(single, b * world)
        parts = [_step(ctx, b) for ctx in ranks]
        for i, want in enumerate(expected):
            assert torch.equal(torch.cat([p[i] for p in parts]), want), i
    states = {bytes(ctx.generator.get_state().numpy()) for ctx in ranks + [single]}
    assert len(states) == 1  # the same random stream consumed everywhere
