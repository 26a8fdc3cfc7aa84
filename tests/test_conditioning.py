"""The conditioning pool: names from the images, their prompts, anchors and the prompt-dependent terms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffscrub.config import EraseConfig
from diffscrub.errors import ConfigError
from random_images import write_random_images as _images


def test_nearest_words_only_whole_words():
    from diffscrub.concept.inversion import nearest_words
    from diffscrub.toy.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    vocab = tok.get_vocab()
    matrix = torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(8)
    target[0] = 1.0
    near = target.clone()
    near[1] = 0.2
    # "s" points exactly along the target but is a byte piece, not a word; "seven" is exact, "7" close.
    for word, vec in (("seven</w>", target * 3), ("7</w>", near), ("s", target)):
        matrix[vocab[word]] = vec
    words = nearest_words(matrix, target, tok, k=2, exclude=set(tok.all_special_ids))
    assert words == ["seven", "7"]


def test_name_prompts_put_names_in_contexts_with_neutral_forms():
    from diffscrub.concept.inversion import PLACEHOLDER, name_prompts

    added, neutral = name_prompts(["7", "and", "gravel"], 1, ["{}", "{} on  grass"], [""])
    pool = [""] + added
    assert "7 on grass" in pool and f"{PLACEHOLDER} on grass" in pool and "gravel on grass" in pool
    assert pool.count("") == 1  # the name alone falls back to the run's own null prompt
    by = {p: pool[neutral[i]] for i, p in enumerate(pool)}
    assert by["7"] == "" and by[PLACEHOLDER] == ""
    assert by["7 on grass"] == "on grass" and by[f"{PLACEHOLDER} on grass"] == "on grass"
    # words past the names are clutter or look-alikes: kept as they are, in every template
    assert by["gravel on grass"] == "gravel on grass" and by["and"] == "and" and by["on grass"] == "on grass"


def test_given_names_replace_the_inversion(tmp_path, monkeypatch):
    """--names: the names go in every template with their neutral forms, no inversion runs, no learned token,
    and the vocabulary anchors leave every given name out."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import add_vocab_anchors, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    monkeypatch.setattr(inversion, "invert_concept", lambda *a, **k: pytest.fail("inversion ran despite --names"))
    tok = build_tiny_pipeline("sd").tokenizer
    seven, other = (tok.convert_ids_to_tokens(i).replace("</w>", "") for i in (300, 301))
    cfg = EraseConfig(model="sd", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", names=[seven, f" {other} "],
                      name_contexts=["{}", "{} on grass"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 40},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    record = name_concept(run, log=lambda m: None)
    assert record == {"given_names": [seven, other]}
    cond = run.ctx.cond
    assert inversion.PLACEHOLDER not in " ".join(cond.prompts)
    by = {p: cond.prompts[cond.neutral[i]] for i, p in enumerate(cond.prompts)}
    assert by[seven] == "" and by[f"{other} on grass"] == "on grass" and by["on grass"] == "on grass"
    fresh = run.ctx.encode_prompts([f"{seven} on grass"]).kwargs["encoder_hidden_states"]
    taken = cond.take(torch.tensor([cond.prompts.index(f"{seven} on grass")]))["encoder_hidden_states"]
    assert torch.allclose(taken, fresh, atol=1e-6)
    anchors = add_vocab_anchors(run, log=lambda m: None)
    assert anchors["left_out"] == [seven, other]
    assert not {seven, other} & {w for p in run.ctx.cond.anchor_prompts for w in p.split()}

    # a model without a text encoder (DiT) has nowhere to put names: refused, not ignored
    cfg = EraseConfig(model="dit", forget=str(tmp_path / "f"), out=str(tmp_path / "o2"), steps=1, batch_size=2,
                      quiet=True, device="cpu", names=["7"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    with pytest.raises(ConfigError, match="--names needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)
    cfg = dataclasses.replace(cfg, names=[], inversion_rerank=4)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    with pytest.raises(ConfigError, match="--inversion-rerank needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)
    run.config = dataclasses.replace(cfg, inversion_rerank=0, random_contexts=4)
    with pytest.raises(ConfigError, match="--random-contexts needs a text encoder; the dit model has none"):
        name_concept(run, log=lambda m: None)


def test_inversion_rerank_orders_every_encoders_nearest_words_by_fit(tmp_path, monkeypatch):
    """--inversion-rerank: the candidates are the nearest words in each text encoder's vocabulary (SD3: two CLIPs
    and a T5), scored by rank_by_fit; the names are the best-scored ones, and the record keeps the scores in order."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    seen = {}
    real_nearest = inversion.nearest_words

    def nearest(matrix, vector, tokenizer, k, exclude):
        seen.setdefault(type(tokenizer).__name__, k)
        return real_nearest(matrix, vector, tokenizer, k, exclude)

    def fit(ctx, words, **kw):  # a fixed order that is not the candidates': last candidate best
        seen["candidates"] = list(words)
        return [(w, -0.01 * (i + 1)) for i, w in enumerate(words)][::-1]

    monkeypatch.setattr(inversion, "nearest_words", nearest)
    monkeypatch.setattr(inversion, "rank_by_fit", fit)
    cfg = EraseConfig(model="sd3", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", inversion_steps=2, inversion_rerank=3,
                      inversion_words=2, random_contexts=4, random_context_words=1)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd3"),
                    log=lambda m: None)
    logged = []
    record = name_concept(run, log=logged.append)
    candidates = seen["candidates"]
    assert len(candidates) == len(set(candidates)) > 3  # three words from each of three vocabularies, once each
    assert set(seen) >= {"CLIPTokenizer", "T5Tokenizer", "candidates"} and seen["CLIPTokenizer"] == 3
    assert record["nearest_words"] == candidates[::-1][:2] and run.ctx.names == candidates[-1:]
    assert [w for w, _ in record["word_fit"]] == candidates[::-1]
    assert any(f"{candidates[-1]} (" in line for line in logged)
    # --random-contexts: drawn once the name is known, never holding it; the name goes in each, and each
    # filled template's neutral form is the template without the name
    drawn, name = record["random_contexts"], candidates[-1]
    assert len(drawn) == 4 and run.ctx.contexts == ["{}", *drawn]
    assert all(len(c.split()) == 2 for c in drawn)  # --random-context-words 1: one word beside the name
    assert all(name.lower() not in c.lower().split() for c in drawn) and any(repr(drawn[0]) in line for line in logged)
    cond = run.ctx.cond
    for template in drawn:
        filled = " ".join(template.format(name).split())
        assert cond.prompts[cond.neutral[cond.prompts.index(filled)]] == " ".join(template.format("").split())


@pytest.mark.parametrize("leave_out", [False, True])
def test_leave_out_candidates_keeps_every_weighed_word_out_of_draws(tmp_path, monkeypatch, leave_out):
    """--leave-out-candidates: no drawn template and no vocabulary anchor holds a word the inversion weighed as a
    name (every re-ranked candidate), not only the chosen name; without it those words are drawn like any other
    (the case where a wrongly chosen name let the concept's own word into the anchors)."""
    import diffscrub.concept.inversion as inversion
    from diffscrub.core.naming import add_vocab_anchors, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    monkeypatch.setattr(inversion, "rank_by_fit", lambda ctx, words, **kw: [(w, -0.01) for w in words])
    cfg = EraseConfig(model="sd3", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", inversion_steps=2, inversion_rerank=6,
                      inversion_words=1, random_contexts=20, leave_out_candidates=leave_out)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 30},
                    pipe=build_tiny_pipeline("sd3"), log=lambda m: None)
    record = name_concept(run, log=lambda m: None)
    weighed = {w.lower() for w, _ in record["word_fit"]}
    name = record["nearest_words"][0].lower()
    anchors = add_vocab_anchors(run, log=lambda m: None)
    drawn_words = {w.lower() for c in record["random_contexts"] for w in c.split() if w != "{}"}
    cond = run.ctx.cond
    anchor_words = {w.lower() for p in cond.prompts[cond.pool_size:] for w in p.split()}
    assert len(weighed) > 3 and name not in drawn_words | anchor_words  # the chosen name: always left out
    others = weighed - {name}
    if leave_out:
        assert not others & (drawn_words | anchor_words)
        assert record["left_out_candidates"] == [w for w, _ in record["word_fit"]]
        assert {w.lower() for w in anchors["left_out"]} >= weighed
    else:
        assert others & (drawn_words | anchor_words) and "left_out_candidates" not in record


def test_name_samples_join_the_forget_set(tmp_path, monkeypatch):
    """--name-samples: the model draws the prompts that name the concept (round robin, in chunks of the batch,
    no placeholder); their latents join the forget set and its epochs, and a checkpoint brings them back."""
    from diffscrub.core.checkpoint import restore_forget_extra, save_checkpoint
    from diffscrub.core.naming import add_name_samples, name_concept
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    tok = build_tiny_pipeline("sd").tokenizer
    seven = tok.convert_ids_to_tokens(300).replace("</w>", "")
    forget = _images(tmp_path / "f")
    n_images = len(list(forget.iterdir()))

    def start():
        cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2,
                          quiet=True, device="cpu", names=[seven], name_contexts=["{}", "{} on grass"], name_samples=3)
        run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd"),
                        log=lambda m: None)
        name_concept(run, log=lambda m: None)
        return run

    run = start()
    calls, drawn = [], []

    def generate(prompts, image_hw, *, steps, seed):
        calls.append(list(prompts))
        images = torch.rand(len(prompts), 3, *image_hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        drawn.append(images)
        return images

    monkeypatch.setattr(run.adapter, "generate", generate)
    record = add_name_samples(run, log=lambda m: None)
    assert record["count"] == 3 and record["prompts"] == [seven, f"{seven} on grass"]
    assert calls == [[seven, f"{seven} on grass"], [seven]]
    ctx = run.ctx
    assert len(ctx.forget) == n_images + 3
    expected, _ = run.adapter.encode_moments(torch.cat(drawn))
    assert torch.allclose(ctx.forget.mean[n_images:], expected, atol=1e-5)
    assert sorted(ctx.forget_sampler.next(n_images + 3).tolist()) == list(range(n_images + 3))

    trainable = {n: p for n, p in ctx.student.named_parameters() if p.requires_grad}
    folder = save_checkpoint(tmp_path / "ck", 1, trainable=trainable,
                             optimizer_state=torch.optim.AdamW(run.params).state_dict(),
                             ctx=ctx, method=run.method, history=[], identity="x")
    again = start()
    restore_forget_extra(folder, again.ctx)
    assert len(again.ctx.forget) == n_images + 3
    assert torch.equal(again.ctx.forget.mean, ctx.forget.mean) and torch.equal(again.ctx.forget.std, ctx.forget.std)

    # a run that names nothing has nothing to draw: refused in one line, not skipped
    cfg = EraseConfig(model="dit", forget=str(forget), out=str(tmp_path / "o2"), steps=1, batch_size=2, quiet=True,
                      device="cpu", name_samples=2)
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("dit"),
                    log=lambda m: None)
    assert name_concept(run, log=lambda m: None) is None
    with pytest.raises(ConfigError, match="--name-samples draws prompts that name the concept"):
        add_name_samples(run, log=lambda m: None)
    with pytest.raises(ConfigError, match="drop --name-samples or use --conditioning auto"):
        EraseConfig(model="sd", forget="f", out="o", conditioning="null", name_samples=4)


def test_conditioning_extend_offsets_neutral_forms():
    from diffscrub.adapters.base import Conditioning

    base = Conditioning(["", "a"], {"x": torch.arange(2.0)})
    grown = base.extend(Conditioning(["b", "c"], {"x": torch.arange(2.0, 4.0)}, neutral=[0, 0]))
    assert grown.neutral == [0, 1, 2, 2]
    assert grown.neutral_index(torch.tensor([3, 1, 0])).tolist() == [2, 1, 0]
    assert base.neutral_index(torch.tensor([1, 0])).tolist() == [1, 0]  # no neutral forms: identity
    assert grown.to(dtype=torch.float64).neutral == grown.neutral


def test_vocabulary_anchor_prompts_leave_out_the_names():
    from diffscrub.concept.inversion import PLACEHOLDER
    from diffscrub.concept.vocabulary import anchor_prompts, vocabulary_words, words_to_keep
    from diffscrub.toy.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    words = vocabulary_words(tok)
    assert {"3", "7", "grass", "and"} <= set(words) and len(words) == len(set(words))
    assert not any(w.startswith("<") or "</w>" in w for w in words)  # no specials, no end-of-word marks
    contexts = ["{}", "{} on  grass"]
    pairs = anchor_prompts(words + [PLACEHOLDER], ["7"], contexts, 40, torch.Generator().manual_seed(0))
    prompts = [p for p, _ in pairs]
    assert len(prompts) == 40 == len(set(prompts))
    assert all(p.split()[0] not in ("7", PLACEHOLDER) for p in prompts)
    assert any(p.endswith(" on grass") for p in prompts) and any(" " not in p for p in prompts)
    # each prompt's base is its template without the word
    assert all(base == ("on grass" if p.endswith(" on grass") else "") for p, base in pairs)
    assert pairs == anchor_prompts(words, ["7"], contexts, 40, torch.Generator().manual_seed(0))
    assert pairs != anchor_prompts(words, ["7"], contexts, 40, torch.Generator().manual_seed(1))
    # a vocabulary smaller than asked: every pair once; names compared case-insensitively
    assert sorted(anchor_prompts(["Seven", "3"], ["seven"], contexts, 99, torch.Generator())) == [
        ("3", ""), ("3 on grass", "on grass")]
    # a name of several words leaves out each of its words from the draw, but the user's anchor words lose only
    # whole names
    assert sorted(anchor_prompts(["stop", "Sign", "3"], ["stop sign"], ["{}"], 99, torch.Generator())) == [("3", "")]
    assert words_to_keep(["sign", "Stop Sign", "3"], ["stop sign"]) == ["sign", "3"]


def test_random_contexts_are_distinct_nameless_and_seeded():
    """The --random-contexts draw: distinct templates of 1-3 vocabulary words with one '{}', never a name
    (any case) or the placeholder, the same for the same seed, fewer when the vocabulary cannot give more."""
    from diffscrub.concept.inversion import PLACEHOLDER
    from diffscrub.concept.vocabulary import random_contexts

    words = ["brick", "Brick", "a", "on", "3", "and", "grass", PLACEHOLDER]
    drawn = random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0))
    assert len(drawn) == len(set(drawn)) == 12
    for template in drawn:
        parts = template.split()
        assert parts.count("{}") == 1 and 1 <= len(parts) - 1 <= 3
        assert not {"brick", "Brick", PLACEHOLDER} & set(parts)
    assert drawn == random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0))
    assert drawn != random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(1))
    assert sorted(random_contexts(["x", "brick"], ["brick"], 5, torch.Generator().manual_seed(0))) == ["x {}", "{} x"]
    # max_words: up to that many words beside the name, and longer ones are drawn (lengths 1-5 here)
    longer = random_contexts(words, ["BRICK"], 12, torch.Generator().manual_seed(0), max_words=5)
    lengths = [len(t.split()) - 1 for t in longer]
    assert max(lengths) > 3 and min(lengths) >= 1 and max(lengths) <= 5
    assert sorted(random_contexts(["x", "red", "brick"], ["red brick"], 5, torch.Generator().manual_seed(0))) == [
        "x {}", "{} x"]


def test_strongest_anchors_are_taken_template_by_template():
    from diffscrub.concept.vocabulary import strongest_per_base

    prompts = [("3 on grass", "on grass"), ("x on grass", "on grass"), ("5 on grass", "on grass"),
               ("3 on gravel", "on gravel"), ("x on gravel", "on gravel")]
    effects = torch.tensor([9.0, 1.0, 8.0, 0.5, 0.1])  # gravel mutes every word
    assert strongest_per_base(prompts, effects, 2) == [0, 3]  # not the two loud grass prompts
    assert strongest_per_base(prompts, effects, 4) == [0, 3, 2, 4]
    assert strongest_per_base(prompts, effects, 9) == [0, 3, 2, 4, 1]


def test_conditioning_anchors_are_never_pool_draws():
    from types import SimpleNamespace

    from diffscrub.adapters.base import Conditioning
    from diffscrub.core.context import ErasureContext

    pool = Conditioning(["", "7"], {"x": torch.arange(2.0)}, neutral=[0, 0])
    grown = pool.with_anchors(Conditioning(["3", "grass"], {"x": torch.arange(2.0, 4.0)}))
    assert grown.pool_len == 2 and grown.anchor_prompts == ["3", "grass"] and grown.neutral == [0, 0, 2, 3]
    assert grown.to(dtype=torch.float64).pool_size == 2
    with pytest.raises(ValueError, match="before adding vocabulary anchors"):
        grown.extend(pool)
    ctx = SimpleNamespace(cond=grown, generator=torch.Generator().manual_seed(0), rank=0, world=1)
    ctx.randint = lambda low, high, batch: ErasureContext.randint(ctx, low, high, batch)
    draws = ErasureContext.prompt_index(ctx, 500)
    anchors = ErasureContext.anchor_index(ctx, 500)
    assert set(draws.tolist()) == {0, 1} and set(anchors.tolist()) == {2, 3}
    ctx.cond = pool
    assert ErasureContext.anchor_index(ctx, 4) is None


def test_teacher_grid_scores_every_prompt_at_every_latent(tmp_path):
    """teacher_grid: each (latent, prompt) pair once, in calls of at most batch_size, each prediction the
    teacher's for that latent under that prompt alone."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    cfg = EraseConfig(model="sd", forget=str(_images(tmp_path / "f")), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="null")
    ctx = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16}, pipe=build_tiny_pipeline("sd"),
                    log=lambda m: None).ctx
    cond = ctx.encode_prompts(["", "a", "b c"])
    z_t = torch.randn(2, *ctx.forget.mean.shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    seen = []
    for latents, prompts, pred in ctx.teacher_grid(z_t, t, cond, batch_size=4):
        assert len(latents) <= 4 and pred.shape == (len(latents), *z_t.shape[1:])
        for row, (i, p) in enumerate(zip(latents.tolist(), prompts.tolist())):
            alone, _ = ctx.teacher_predict(z_t[i:i + 1], t[i:i + 1], cond.take(torch.tensor([p])))
            assert torch.allclose(pred[row], alone[0], atol=1e-5)
            seen.append((i, p))
    assert sorted(seen) == [(i, p) for i in range(2) for p in range(3)]


def test_tss_vocab_anchor_term_holds_the_student_to_the_teacher(tmp_path):
    """Anchor prompts are vocabulary words without the found name, outside the record's pool; the anchor
    term is zero while the student is the teacher and grows once the student's text path moves."""
    from diffscrub.core.naming import add_vocab_anchors
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", name_contexts=["{}", "a {}"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "vocab_anchors": 6, "vocab_candidates": 12}, pipe=build_tiny_pipeline("sd"),
                    log=lambda m: None)
    ctx = run.ctx
    name = run.adapter.pipe.tokenizer.convert_ids_to_tokens(300).replace("</w>", "")
    ctx.names = [name]  # as Phase 1's naming leaves it
    figures = add_vocab_anchors(run, log=lambda m: None)
    assert figures["count"] == 6 == len(ctx.cond.anchor_prompts) and figures["left_out"] == [name]
    assert figures["candidates"] == 12 and figures["effect_kept_min"] > 0  # chosen by the teacher's effect
    assert ctx.cond.pool_len == 1 and all(name not in p.split() for p in ctx.cond.anchor_prompts)
    # each anchor's conditioning is its own prompt's (taken from the candidates' encoding by index)
    fresh = ctx.encode_prompts(ctx.cond.anchor_prompts).kwargs["encoder_hidden_states"]
    kept = ctx.cond.take(torch.arange(1, 7))["encoder_hidden_states"]
    assert torch.allclose(kept, fresh, atol=1e-6)
    run.method.prepare(batch_size=2)
    taken, take = [], ctx.cond.take
    ctx.cond.take = lambda index: taken.append(index.tolist()) or take(index)
    _, terms = run.method.loss(0, 2)
    assert float(terms["vocab_anchor"]) < 1e-10
    assert sum(all(i >= 1 for i in index) for index in taken) == 1  # one take: the anchors' conditioning
    with torch.no_grad():
        for key, param in ctx.student.named_parameters():
            if "attn2.to_k" in key:
                param.add_(torch.randn_like(param) * 0.5)
    _, terms = run.method.loss(1, 2)
    assert float(terms["vocab_anchor"]) > 1e-6


def test_keep_weight_clean_reweighs_every_keep_term(tmp_path):
    """--keep-weight clean: the background, retain and anchor terms are zero while the student is the teacher;
    once it moves, each is the clean-latent error weighted as the forget term, not the prediction-space one
    (same batch, same draws)."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    terms = {}
    for weight in ("prediction", "clean"):
        cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / weight), steps=1,
                          batch_size=2, quiet=True, device="cpu", conditioning="null", seed=3)
        run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                              "keep_weight": weight}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
        run.method.prepare(batch_size=2)
        _, still = run.method.loss(0, 2)
        assert float(still["retain"]) < 1e-10 and float(still["background"]) < 1e-10
        with torch.no_grad():
            for param in run.ctx.student.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        run.ctx.generator.manual_seed(7)
        terms[weight] = {k: float(v) for k, v in run.method.loss(1, 2)[1].items()}
    for key in ("retain", "background"):
        assert terms["clean"][key] > 0 and abs(terms["clean"][key] / terms["prediction"][key] - 1) > 0.05, key
    assert terms["clean"]["forget"] == pytest.approx(terms["prediction"]["forget"], rel=1e-5)  # only the keep terms


def test_anchor_words_are_kept_in_every_template(tmp_path):
    """--anchor-words: each word in every name template comes first among the anchors, encoded as its own
    prompt; the random draw adds --vocab-anchors more without them; a word that is also a found name is
    dropped (with a notice), and one that is also a given name is refused before anything loads."""
    from diffscrub.core.naming import add_vocab_anchors
    from diffscrub.core.trainer import preflight, setup_run
    from diffscrub.methods.tss import TSSConfig, TeacherStudentScrubber
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", name_contexts=["{}", "a {}"])
    pipe = build_tiny_pipeline("sd")
    vocab = [pipe.tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in (300, 301)]
    name, keep = vocab
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "vocab_anchors": 5,
                          "anchor_words": [keep, " red thing ", name]}, pipe=pipe, log=lambda m: None)
    notices = []
    run.ctx.names = [name]  # as Phase 1's naming leaves it
    figures = add_vocab_anchors(run, log=notices.append)
    prompts = run.ctx.cond.anchor_prompts
    assert prompts[:4] == [keep, f"a {keep}", "red thing", "a red thing"]
    assert len(prompts) == 9 and figures["count"] == 9 and figures["kept_words"] == [keep, "red thing"]
    assert not {keep, name} & {w for p in prompts[4:] for w in p.split()}  # the draw leaves both out
    assert any(name in n and "not kept" in n for n in notices)
    fresh = run.ctx.encode_prompts(prompts).kwargs["encoder_hidden_states"]
    kept = run.ctx.cond.take(torch.arange(1, 10))["encoder_hidden_states"]
    assert torch.allclose(kept, fresh, atol=1e-6)

    named = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o2"), names=[name.upper()])
    with pytest.raises(ConfigError, match="--anchor-words"):
        preflight(named, TeacherStudentScrubber, TSSConfig(anchor_words=[name]))


@pytest.mark.parametrize("name_target", ["keep", "neutral"])
def test_tss_name_target_sets_the_keep_teacher(name_target, tmp_path):
    """With an empty mask the student (a copy of the teacher) matches its keep target exactly under
    "keep"; under "neutral" a prompt naming the concept is pulled to the teacher under the null prompt,
    so the background term is positive, and it is zero again when every draw is the null prompt."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget, retain = _images(tmp_path / "f"), _images(tmp_path / "r")
    cfg = EraseConfig(model="sd", forget=str(forget), retain=str(retain), out=str(tmp_path / "o"), steps=1,
                      batch_size=2, quiet=True, device="cpu", conditioning="prompts", prompts=["red thing"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "name_target": name_target}, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 0]  # "red thing" names the concept; its neutral form is the null prompt
    run.method.prepare(batch_size=2)
    run.method.masks.zero_()
    ctx.prompt_index = lambda b: torch.ones(b, dtype=torch.long)
    _, terms = run.method.loss(0, 2)
    if name_target == "keep":
        assert float(terms["background"]) < 1e-10 and float(terms["retain"]) < 1e-10
    else:
        assert float(terms["background"]) > 1e-6 and float(terms["retain"]) > 1e-6
        ctx.prompt_index = lambda b: torch.zeros(b, dtype=torch.long)
        _, terms = run.method.loss(1, 2)
        assert float(terms["background"]) < 1e-10


@pytest.mark.parametrize("blind_prompt", ["null", "keep"])
def test_tss_blind_prompt_sets_the_teacher_inside_the_mask(blind_prompt, tmp_path):
    """The teacher reads the blinded latent under the null prompt ("null", the default), or under the
    keep target's prompt ("keep": with name_target "neutral", the student's prompt with the name taken
    out), never under the student's own prompt that names the concept."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="prompts", prompts=["red thing", "on grass"])
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "contrastive": False, "name_target": "neutral", "blind_prompt": blind_prompt},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 2, 2]  # pool: "", "red thing" (names the concept), "on grass"; "red thing" -> "on grass"
    run.method.prepare(batch_size=2)
    ctx.prompt_index = lambda b: torch.ones(b, dtype=torch.long)  # the student sees "red thing"
    seen, predict = [], ctx.teacher_predict
    ctx.teacher_predict = lambda z, t, kwargs, **kw: seen.append(kwargs["encoder_hidden_states"]) or predict(
        z, t, kwargs, **kw)
    run.method.loss(0, 2)
    # one teacher call: [original (keep target) x2, blinded x2]; the blinded pair's conditioning is checked
    blinded = seen[0][2:4]
    expected = ctx.cond.take(torch.full((2,), 0 if blind_prompt == "null" else 2))["encoder_hidden_states"]
    assert torch.equal(blinded, expected)
    assert not torch.equal(blinded, ctx.cond.take(torch.ones(2, dtype=torch.long))["encoder_hidden_states"])


@pytest.mark.parametrize("forget_prompts", ["all", "named"])
def test_tss_forget_prompts_named_draws_only_prompts_naming_the_concept(forget_prompts, tmp_path):
    """"named" gives the forget term only prompts that name the concept (what a second pass on the names
    needs: its null prompt and neutral forms erase nothing more); "all" draws the whole pool. A pool
    without names is refused with the option's name, before training."""
    from diffscrub.core.trainer import preflight, setup_run
    from diffscrub.methods.tss import TeacherStudentScrubber, TSSConfig
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="prompts", prompts=["red thing", "on grass"])
    options = {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1, "contrastive": False,
               "forget_prompts": forget_prompts}
    run = setup_run(cfg, options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    ctx = run.ctx
    ctx.cond.neutral = [0, 2, 2]  # pool: "", "red thing" (names the concept), "on grass"
    run.method.prepare(batch_size=2)
    drawn = torch.cat([run.method._forget_prompt_index(8) for _ in range(16)])
    assert set(drawn.tolist()) == ({1} if forget_prompts == "named" else {0, 1, 2})
    # the loss's student call: the forget rows are conditioned on the drawn (named) prompts
    seen, predict = [], ctx.student_predict
    ctx.student_predict = lambda z, t, kwargs: seen.append(kwargs["encoder_hidden_states"]) or predict(z, t, kwargs)
    for step in range(4):
        run.method.loss(step, 2)
    named = ctx.cond.take(torch.ones(2, dtype=torch.long))["encoder_hidden_states"]
    forget_rows = [s[:2] for s in seen]
    assert all(torch.equal(rows, named) for rows in forget_rows) == (forget_prompts == "named")

    if forget_prompts == "named":
        ctx.cond.neutral = None  # nothing in the pool names the concept
        with pytest.raises(ConfigError, match="forget_prompts='named'.*drop --forget-prompts"):
            run.method.prepare(batch_size=2)
        plain = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o2"), conditioning="null")
        with pytest.raises(ConfigError, match="--conditioning null"):
            preflight(plain, TeacherStudentScrubber, TSSConfig(forget_prompts="named"))


def test_conditioning_null_keeps_seed_pool(tmp_path):
    """--conditioning null distils at the null prompt only (the seed's behaviour), and an explicit
    --conditioning inversion on a model without a text encoder is refused."""
    from diffscrub.core.trainer import erase
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    options = {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1, "contrast_samples": 2,
               "contrast_sample_steps": 2}
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="null")
    result = erase(cfg, options, pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    assert result.record["conditioning"]["pool"] == [""]
    cfg = EraseConfig(model="dit", forget=str(forget), out=str(tmp_path / "o2"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="inversion")
    with pytest.raises(ConfigError, match="--conditioning null"):
        erase(cfg, options, pipe=build_tiny_pipeline("dit"), log=lambda m: None)


def test_contrast_samples_are_generated_and_encoded_in_batches(tmp_path):
    """Without a retain folder the contrastive fingerprint samples the model itself: in chunks of the
    run's batch, never all samples in one pipeline call or one VAE encode (that ran SDXL out of memory
    at 1024 px), and the chunks are different draws."""
    from diffscrub.core.trainer import setup_run
    from tiny_pipelines import build_tiny_pipeline

    forget = _images(tmp_path / "f")
    cfg = EraseConfig(model="sd", forget=str(forget), out=str(tmp_path / "o"), steps=1, batch_size=2, quiet=True,
                      device="cpu", conditioning="null")
    run = setup_run(cfg, {"num_prototypes": 2, "vectors_per_image": 16, "fit_draws": 1, "mask_draws": 1,
                          "contrast_samples": 5, "contrast_sample_steps": 2},
                    pipe=build_tiny_pipeline("sd"), log=lambda m: None)
    adapter, generated, encoded = run.adapter, [], []
    generate, encode = adapter.generate, adapter.encode_moments
    adapter.generate = lambda prompts, *a, **k: generated.append(generate(prompts, *a, **k)) or generated[-1]
    adapter.encode_moments = lambda images: encoded.append(images.shape[0]) or encode(images)
    run.method._batch = 2
    cache = run.method._contrast_cache()
    assert [g.shape[0] for g in generated] == [2, 2, 1] and encoded == [2, 2, 1]
    assert len(cache) == 5 and cache.mean.shape[1:] == run.ctx.forget.mean.shape[1:]
    assert not torch.allclose(generated[0], generated[1])  # each chunk its own seed
