"""--name-embeddings: the concept's names learn their rows in every text encoder, and nothing else in them moves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffscrub.config import EraseConfig
from diffscrub.errors import ConfigError
from random_images import write_random_images as _images

TINY_TSS = {"num_prototypes": 2, "vectors_per_image": 16, "contrast_samples": 2, "contrast_sample_steps": 2}


def _encoders(pipe):
    """{encoder name: its input-embedding table, cloned}."""
    return {name: module.get_input_embeddings().weight.detach().clone()
            for name, module in pipe.components.items() if name.startswith("text_encoder") and module is not None}


def test_rows_reach_only_prompts_that_write_the_name():
    """Rows of the name's tokens (less a kept word's and the special tokens) change what prompts with the name
    encode to, leave every other prompt's encoding as it was, and once written into the table give the same
    encoding without the hook."""
    from diffscrub.adapters import adapter_for
    from diffscrub.concept.name_embeddings import NameEmbeddings
    from tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")  # two CLIP encoders
    adapter = adapter_for(pipe)
    pairs = adapter.loaded_text_encoder_pairs()
    rows = NameEmbeddings.for_names(pipe, pairs, ["seven brick"], keep=["brick"])
    assert rows.tokens(pipe, pairs) == {"text_encoder": ["seven"], "text_encoder_2": ["seven"]}
    with torch.no_grad():
        for p in rows.parameters():
            p.add_(0.5)
    hw = (32, 32)
    prompts = ["seven on grass", "3 and seven", "brick on grass", ""]
    before = adapter.encode_prompts(prompts, hw).kwargs
    with rows.active(pipe):
        during = adapter.encode_prompts(prompts, hw).kwargs
    after_hook = adapter.encode_prompts(prompts, hw).kwargs  # the hook is gone
    hidden = "encoder_hidden_states"
    for i in (0, 1):
        assert not torch.allclose(during[hidden][i], before[hidden][i], atol=1e-4)
    for i in (2, 3):
        assert torch.equal(during[hidden][i], before[hidden][i])
    assert torch.equal(after_hook[hidden], before[hidden])
    tables = _encoders(pipe)
    assert rows.change(pipe) > 0
    rows.write_into(pipe)
    written = adapter.encode_prompts(prompts, hw).kwargs
    assert torch.allclose(written[hidden], during[hidden], atol=1e-6)
    assert torch.allclose(written["added_cond_kwargs"]["text_embeds"], during["added_cond_kwargs"]["text_embeds"],
                          atol=1e-6)
    for name, table in _encoders(pipe).items():  # one row moved in each table
        moved = (table != tables[name]).any(-1).nonzero().flatten().tolist()
        assert moved == rows.state()[f"name_ids.{name}"].tolist()

    # the state rebuilds the same rows (a checkpoint, or another process's phase 1)
    again = NameEmbeddings.from_state(rows.state())
    assert torch.equal(again.state()["name_rows.text_encoder"], rows.state()["name_rows.text_encoder"])
    assert NameEmbeddings.from_state({"prototypes": torch.zeros(1)}) is None


def test_rows_refuse_when_there_is_nothing_to_learn():
    from diffscrub.adapters import adapter_for
    from diffscrub.concept.name_embeddings import NameEmbeddings
    from tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    pairs = adapter_for(pipe).loaded_text_encoder_pairs()
    with pytest.raises(ConfigError, match="no text encoder: drop --name-embeddings"):
        NameEmbeddings.for_names(pipe, [], ["7"], [])
    with pytest.raises(ConfigError, match="has none"):
        NameEmbeddings.for_names(pipe, pairs, [], [])
    with pytest.raises(ConfigError, match=r"every token of the names \(7\) is also a word to keep"):
        NameEmbeddings.for_names(pipe, pairs, ["7"], ["7"])


def test_t5_word_start_mark_is_not_learned():
    """A sentencepiece name split as ['▁', '<unk>', 'x'] learns 'x' only: '▁' alone begins many other words and
    '<unk>' stands for every unknown character."""
    from diffscrub.concept.name_embeddings import NameEmbeddings
    from tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("pixart")
    tok = pipe.tokenizer
    pieces = tok.convert_ids_to_tokens(tok("\u00e9x", add_special_tokens=False).input_ids)
    assert pieces[0] == "\u2581" and tok.unk_token in pieces  # what makes this name a test of the rule
    rows = NameEmbeddings.for_names(pipe, [("tokenizer", "text_encoder")], ["\u00e9x"], [])
    assert rows.tokens(pipe, [("tokenizer", "text_encoder")]) == {"text_encoder": ["x"]}


def test_hooks_sit_on_the_embedding_that_t5_calls():
    """T5's ``get_input_embeddings()`` is ``shared``, but its encoder calls ``encoder.embed_tokens``: a hook on the
    first alone never fires (the names' rows would learn nothing on PixArt and in SD3's T5). Also after the table
    is resized for a placeholder, as the inversion does."""
    from diffscrub.concept.tokens import token_embedding_modules
    from tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("pixart")
    encoder = pipe.text_encoder
    assert encoder.encoder.embed_tokens in token_embedding_modules(encoder)
    pipe.tokenizer.add_tokens(["<placeholder>"])
    encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    assert encoder.encoder.embed_tokens in token_embedding_modules(encoder)


def test_with_rows_replaces_prompts_and_passes_gradients():
    from diffscrub.adapters.base import Conditioning

    pool = Conditioning(["", "a", "b"], {"h": torch.zeros(3, 2, 4), "extra": {"p": torch.zeros(3, 4)}, "n": None})
    new_h = torch.ones(1, 2, 4, requires_grad=True)
    new = Conditioning(["b"], {"h": new_h, "extra": {"p": torch.full((1, 4), 2.0)}, "n": None})
    grown = pool.with_rows(torch.tensor([2]), new)
    assert torch.equal(grown.kwargs["h"][2], torch.ones(2, 4)) and not grown.kwargs["h"][:2].any()
    assert torch.equal(grown.kwargs["extra"]["p"][2], torch.full((4,), 2.0)) and grown.kwargs["n"] is None
    grown.take(torch.tensor([2, 0]))["h"].sum().backward()
    assert torch.equal(new_h.grad, torch.ones(1, 2, 4))


def _config(tmp_path, out, **kw):
    return EraseConfig(model="sd", forget=str(tmp_path / "f"), out=str(tmp_path / out), steps=4, batch_size=2,
                       quiet=True, device="cpu", seed=1, names=["seven"], name_contexts=["{}", "{} on grass"],
                       trainable="text-kv", lr=1e-3, **kw)


def test_erase_learns_the_name_rows_and_resumes_them(tmp_path, monkeypatch):
    """End to end on the tiny SD pipeline: the saved text encoder differs from the input in the name's row
    alone, the record names the token, and a run stopped after its step-2 checkpoint resumes to the
    uninterrupted run's text encoder and denoiser (the rows and their Adam moments were in the checkpoint)."""
    from diffusers import StableDiffusionPipeline

    from diffscrub.core.trainer import erase
    from diffscrub.methods.tss import method as tss_mod
    from tiny_pipelines import build_tiny_pipeline

    _images(tmp_path / "f")
    options = {**TINY_TSS, "name_embeddings": True, "name_embedding_lr": 1e-2}
    original = _encoders(build_tiny_pipeline("sd"))["text_encoder"]
    seven = build_tiny_pipeline("sd").tokenizer("seven", add_special_tokens=False).input_ids
    result = erase(_config(tmp_path, "a"), options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    assert result.record["name_embeddings"]["tokens"] == {"text_encoder": ["seven"]}
    assert result.record["name_embeddings"]["largest_relative_change"] > 0
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    table = saved.text_encoder.get_input_embeddings().weight.detach()
    assert (table != original).any(-1).nonzero().flatten().tolist() == seven

    real_loss = tss_mod.TeacherStudentScrubber.loss

    def failing(self, step, batch_size):
        if step == 3:
            raise RuntimeError("stopped for the test")
        return real_loss(self, step, batch_size)

    monkeypatch.setattr(tss_mod.TeacherStudentScrubber, "loss", failing)
    with pytest.raises(RuntimeError, match="stopped for the test"):
        erase(_config(tmp_path, "b", checkpoint_every=2), options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    monkeypatch.setattr(tss_mod.TeacherStudentScrubber, "loss", real_loss)
    erase(_config(tmp_path, "b", checkpoint_every=2, resume=True), options, pipe=build_tiny_pipeline("sd"),
          log=lambda m: None)
    resumed = StableDiffusionPipeline.from_pretrained(tmp_path / "b")
    assert torch.allclose(resumed.text_encoder.get_input_embeddings().weight, table, atol=1e-6)
    for (name, a), (_, b) in zip(saved.unet.named_parameters(), resumed.unet.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "pixart"])
def test_every_family_with_a_text_encoder_learns_the_rows(name, tmp_path):
    """Two steps on each family's tiny pipeline: each of its text encoders that writes the name moved that
    row (and only rows of the name); a class-conditional model (DiT) has no text encoder and is refused."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    _images(tmp_path / "f")
    pipe = build_tiny_pipeline(name)
    before = _encoders(pipe)
    config = EraseConfig(model=name, forget=str(tmp_path / "f"), out=str(tmp_path / "o"), steps=2, batch_size=2,
                         quiet=True, device="cpu", names=["seven"], lr=1e-3)
    result = erase(config, {**TINY_TSS, "name_embeddings": True}, pipe=pipe, log=lambda m: None)
    tokens = result.record["name_embeddings"]["tokens"]
    assert set(tokens) == set(before)  # every encoder of these pipelines writes "seven"
    for enc, table in _encoders(pipe).items():
        moved = (table != before[enc]).any(-1).nonzero().flatten().tolist()
        tokenizer = getattr(pipe, enc.replace("text_encoder", "tokenizer"))
        assert moved == tokenizer("seven", add_special_tokens=False).input_ids and tokens[enc] == ["seven"]


def test_refusals_before_anything_loads(tmp_path):
    from diffscrub.core.trainer import erase, preflight
    from diffscrub.methods.tss import TSSConfig
    from diffscrub.methods.tss.method import TeacherStudentScrubber
    from tiny_pipelines import build_tiny_pipeline

    _images(tmp_path / "f")
    with pytest.raises(ConfigError, match="drop --name-embedding-lr"):
        TSSConfig(name_embedding_lr=1e-3)
    cfg = EraseConfig(model="sd", forget=str(tmp_path / "f"), out=str(tmp_path / "o"), conditioning="null")
    with pytest.raises(ConfigError, match="--conditioning null names nothing"):
        preflight(cfg, TeacherStudentScrubber, TSSConfig(name_embeddings=True))
    cfg = EraseConfig(model="sd", forget=str(tmp_path / "f"), out=str(tmp_path / "o"), fsdp=True)
    with pytest.raises(ConfigError, match="drop --fsdp, or drop --name-embeddings"):
        preflight(cfg, TeacherStudentScrubber, TSSConfig(name_embeddings=True))
    config = EraseConfig(model="dit", forget=str(tmp_path / "f"), out=str(tmp_path / "o"), steps=1, batch_size=2,
                         quiet=True, device="cpu")
    with pytest.raises(ConfigError, match="no text encoder: drop --name-embeddings"):
        erase(config, {**TINY_TSS, "name_embeddings": True}, pipe=build_tiny_pipeline("dit"), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_inversion_learns_its_placeholder_through_t5(tmp_path):
    """PixArt's only text encoder is a T5: the inversion's placeholder row reaches its encoding (the placeholder
    is a new token, so the table is resized first; the hooks must sit on the module the resized encoder calls)."""
    from diffscrub.concept.inversion import PLACEHOLDER, invert_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    _images(tmp_path / "f")
    config = EraseConfig(model="pixart", forget=str(tmp_path / "f"), out=str(tmp_path / "o"), steps=1,
                         batch_size=2, quiet=True, device="cpu")
    run = setup_run(config, dict(TINY_TSS), pipe=build_tiny_pipeline("pixart"), log=lambda m: None)

    def placeholder_encoding(steps):
        result = invert_concept(run.ctx, steps=steps, lr=0.5, batch_size=2, pool=("",))
        return result.conditioning.kwargs["encoder_hidden_states"][result.prompts.index(PLACEHOLDER)]

    start, learned = placeholder_encoding(0), placeholder_encoding(3)
    assert (learned - start).abs().max() > 1e-3


def test_without_names_given_the_inversion_first_word_is_learned(tmp_path):
    """No --names: the rows learned are those of the inversion's first word (the run's name for the concept)."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    _images(tmp_path / "f")
    config = EraseConfig(model="sd", forget=str(tmp_path / "f"), out=str(tmp_path / "o"), steps=1, batch_size=2,
                         quiet=True, device="cpu", inversion_steps=2)
    record = erase(config, {**TINY_TSS, "name_embeddings": True}, pipe=build_tiny_pipeline("sd"),
                   log=lambda m: None).record
    first = record["conditioning"]["nearest_words"][0]
    assert record["name_embeddings"]["tokens"] == {"text_encoder": [first]}

    # The found name is also a word to keep: the name wins, for the vocabulary anchors and for the rows alike
    # (the rows once spared it, and the run stopped with nothing to learn).
    said = []
    config = dataclasses.replace(config, out=str(tmp_path / "o2"))
    again = erase(config, {**TINY_TSS, "name_embeddings": True, "anchor_words": [first, "grass"]},
                  pipe=build_tiny_pipeline("sd"), log=said.append).record
    assert again["conditioning"]["nearest_words"][0] == first
    assert again["name_embeddings"]["tokens"] == {"text_encoder": [first]}
    assert any(f"--anchor-words: {first} is also a name" in line for line in said)


def test_rank_by_fit_names_the_background_that_toy_mmdit_draws(tmp_path):
    """Re-ranking by fit: of a few candidate words, the one that lets the frozen toy-mmdit denoise brick canvases
    best is "brick" (its T5 sequence carries the background; the first CLIP's nearest words to the learned
    placeholder are letters), with and without retain images; and the ranking depends only on the run's seed."""
    from diffscrub.adapters import adapter_for
    from diffscrub.adapters.base import Conditioning
    from diffscrub.concept.inversion import rank_by_fit
    from diffscrub.core.context import ErasureContext, LatentCache
    from diffscrub.data.images import load_image_folder
    from diffscrub.toy.models import load_toy_pipeline
    from diffscrub.toy.sets import make_sets

    adapter = adapter_for(load_toy_pipeline("toy-mmdit"))
    make_sets("brick", tmp_path, n=16, n_retain=16, seed=0)
    cache = {name: LatentCache.encode(adapter, load_image_folder(tmp_path / name, name=name).pixels, 8)
             for name in ("forget", "retain")}

    def ctx(retain, seed=0):
        return ErasureContext(adapter=adapter, schedule=adapter.schedule(), student=None, teacher=adapter.denoiser,
                              forget=cache["forget"], retain=retain, cond=Conditioning([""]),
                              generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                              image_hw=(32, 32))

    words = ["7", "grass", "and", "brick", "flat"]
    with_retain = rank_by_fit(ctx(cache["retain"]), words, images=16)
    alone = rank_by_fit(ctx(None), words, images=16)
    for ranked in (with_retain, alone):
        assert sorted(w for w, _ in ranked) == sorted(words)
        assert ranked[0][0] == "brick" and ranked[0][1] < -0.01, ranked
        assert [s for _, s in ranked] == sorted(s for _, s in ranked)
    # the retain term can only raise (worsen) a word's score: what the word explains in the retain images is
    # taken off its fit, what it hurts there is not counted (the forget draws are the same in both rankings)
    assert all(dict(with_retain)[w] >= dict(alone)[w] - 1e-9 for w in words)
    assert rank_by_fit(ctx(None), words, images=16) == alone


def test_loss_change_counts_each_draw_alike_whatever_its_error_scale():
    """A word's fit is the mean over draws of its error ratio against the null prompt: a draw whose errors are
    large under every prompt (an ε-model's small t) does not drown a draw where the word halves the error, and
    scaling a draw's errors (another parametrisation at that t) leaves the score as it was."""
    from types import SimpleNamespace

    from diffscrub.concept.inversion import _loss_change

    def fake_ctx(errors):  # errors [N, P]: draw n's squared error under prompt p
        def teacher_grid(z_t, t, cond, batch_size):
            n, p = errors.shape
            pairs = torch.arange(n * p)
            latents, prompts = pairs // p, pairs % p
            pred = torch.zeros(len(pairs), 1, 1, 1)
            pred[:, 0, 0, 0] = errors[latents, prompts].sqrt()  # the target is zero: error = pred ** 2
            yield latents, prompts, pred

        schedule = SimpleNamespace(num_train_timesteps=1000, add_noise=lambda z0, eps, t: z0 + eps,
                                   target=lambda z0, eps, t: torch.zeros_like(z0))
        return SimpleNamespace(schedule=schedule, teacher_grid=teacher_grid)

    cache = type("Cache", (), {"mean": torch.zeros(4, 1, 1, 1), "std": torch.ones(4, 1, 1, 1),
                               "__len__": lambda self: 4})()
    # prompts: null, a word that halves draw 1's error, a word that changes nothing
    errors = torch.tensor([[100.0, 100.0, 100.0], [1.0, 0.5, 1.0]])
    change = _loss_change(fake_ctx(errors), cache, [0, 1, 2], torch.Generator().manual_seed(0), 2, 8)
    assert torch.allclose(change, torch.tensor([-0.25, 0.0])), change  # pooled sums would give -0.005
    rescaled = errors * torch.tensor([[7.0], [0.01]])
    again = _loss_change(fake_ctx(rescaled), cache, [0, 1, 2], torch.Generator().manual_seed(0), 2, 8)
    assert torch.allclose(again, change)
