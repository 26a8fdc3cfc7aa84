"""Options of the Teacher–Student Scrubber; defaults are the seed design's values."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, check_range, option
from ...errors import ConfigError

MASK_MODES = ("cached", "online")
FORGET_TARGETS = ("clean", "seed")
BLIND_FILLS = ("surround", "contrast", "noise")
FINGERPRINTS = ("prototypes", "knn", "names")
NAME_TARGETS = ("keep", "neutral")
BLIND_PROMPTS = ("null", "keep")
FORGET_PROMPTS = ("all", "named")


@dataclass
class TSSConfig:
    num_prototypes: int = option(5, "K, the number of k-means prototypes of the concept")
    t_low: int = option(300, "low end of the semantic timestep band used for fingerprinting (training units)")
    t_high: int = option(700, "high end (exclusive) of the semantic band")
    vectors_per_image: int = option(2000, "feature vectors kept per image for k-means")
    fit_draws: int = option(2, "noise/timestep draws per forget image when extracting fingerprint features")
    tau: float = option(0.6, "cosine-similarity threshold of the soft mask")
    alpha: float = option(15.0, "slope of the soft mask's sigmoid")
    lambda_f: float = option(1.0, "weight of the forget loss (inside the mask, to the blinded teacher)")
    lambda_b: float = option(1.0, "weight of the background loss (outside the mask, to the original teacher)")
    lambda_r: float = option(0.5, "weight of the retain anchor (needs --retain)")
    forget_target: str = option(
        "clean",
        "clean: inside the mask the student's clean-latent estimate at z_t is pulled to the teacher's clean estimate "
        "of the blinded latent (weighted by clamp(SNR, snr_floor, snr_gamma)); seed: the student's raw prediction at z_t is pulled to the "
        "teacher's raw prediction at z_t_blind, which in eps terms still contains the object (see README)",
    )
    blind_fill: str = option("surround", "what replaces the concept in the clean latent: surround (the mean "
                             "latent outside the mask, per channel), contrast (the same place in a contrast image: "
                             "retain folder, else null-prompt samples; one drawn per forget image and step; for a "
                             "concept that is the background) or noise (the seed's)")
    fill_prior: float = option(0.0, "surround fill: weight of the colour of a contrast image (retain folder, else "
                               "null-prompt samples; one drawn per forget image and step), in image areas of extra "
                               "surround; > 0 for a concept that is the background (a texture, a style), whose own "
                               "surround is the concept")
    snr_gamma: float = option(5.0, "upper clip of the clean-target forget loss's weight clamp(SNR(t), snr_floor, gamma) "
                              "(and of the keep terms' with keep_weight clean)")
    snr_floor: float = option(1.0, "lower clip of that weight: high t, where the content is decided, keeps at least "
                              "this weight (0: the prediction-space scale, which fades there)")
    keep_weight: str = option(
        "prediction",
        "how the terms that keep (background, retain, vocabulary anchors) weigh their error: prediction (the "
        "model's prediction space, as the seed) or clean (the clean-latent error weighted as the clean forget "
        "term, clamp(SNR, snr_floor, snr_gamma); it gives high t, where the content is decided, the same weight "
        "in both)",
    )
    mask_mode: str = option(
        "cached",
        "cached: one mask per forget image, detected in the semantic band and averaged over draws, computed once; "
        "online: detected at each step's own timestep, as in the seed",
    )
    mask_draws: int = option(4, "draws averaged per forget image for cached masks")
    kmeans_backend: str = option("auto", "k-means back end: sklearn, torch (on the run's device), or auto "
                                 "(torch above 200k vectors)")
    contrastive: bool = option(
        True,
        "keep only prototypes that detect forget locations at least contrast_ratio times as often as retain "
        "locations (retain folder, else images the model generates under the null prompt)",
    )
    contrast_ratio: float = option(2.0, "how much more often a kept prototype must fire on forget than on retain")
    contrast_samples: int = option(32, "null-prompt samples generated as retain features when no retain folder is given")
    contrast_sample_steps: int = option(20, "sampler steps for those samples")
    fingerprint: str = option(
        "prototypes",
        "how the cached masks are drawn: prototypes (cosine to the kept k-means centres, the design) or knn (each "
        "location scored by its nearest forget neighbours in other images against its nearest retain neighbours; "
        "for a concept that is one object among similar ones; needs mask_mode cached) or names (each location scored by "
        "how much naming the concept lowers the teacher's denoising error there, against the same prompt without the "
        "name; needs the concept's names, from textual inversion or --names, and mask_mode cached)",
    )
    name_target: str = option(
        "keep",
        "what the student follows outside the mask and on retain latents when its prompt comes from the pool: keep "
        "(the teacher under the same prompt, the design) or neutral (the teacher under the prompt's neutral form, the "
        "concept's name taken out: \"7 on grass\" -> \"on grass\", \"7\" -> the null prompt; so a prompt naming the "
        "concept stops steering towards it anywhere in the image)",
    )
    blind_prompt: str = option(
        "null",
        "the teacher's prompt for the blinded latent (the target inside the mask): null (whatever the student's "
        "prompt, so a prompt naming the concept cannot bring it back) or keep (the prompt --name-target gives the "
        "keep terms: with neutral, the student's prompt with the concept's name taken out, so the region is filled "
        "as that prompt would fill it: '7 on gravel' -> gravel)",
    )
    forget_prompts: str = option(
        "all",
        "the prompts the forget term draws for forget images: all (every prompt of the conditioning pool, the null "
        "prompt and the names' neutral forms included) or named (only the prompts that name the concept; the others "
        "still serve the background and retain terms): for a second pass (--then) whose first pass erased the "
        "concept without a prompt, so that it erases under the names without erasing the unprompted concept further",
    )
    vocab_anchors: int = option(
        0,
        "vocabulary anchors: this many prompts, each one whole word of the tokenizer's vocabulary (never the "
        "concept's names) put in one of the --name-contexts templates ('3 on grass'), under which the student is "
        "held to the teacher on retain latents (forget latents without --retain), so that prompts naming other "
        "things do not drift; 0: none",
    )
    anchor_words: list[str] = option(
        [],
        "words you want kept, always among the anchors, each in every --name-contexts template, in addition to the "
        "--vocab-anchors drawn at random (comma-separated: the things that look most like the concept, '0,1,2,3' "
        "when erasing 7; a name of the concept is refused)",
    )
    vocab_candidates: int = option(
        0,
        "0: the anchors are a plain random draw; N > vocab_anchors: N prompts are drawn and the vocab_anchors whose "
        "word changes the frozen teacher's prediction most, each template in turn, are kept",
    )
    lambda_v: float = option(1.0, "weight of the vocabulary-anchor term (with vocab_anchors > 0)")
    name_embeddings: bool = option(
        False,
        "also learn the text encoders' input embeddings of the concept's names (--names, else the inversion's first "
        "--name-words; tokens that --anchor-words also use are left alone), beside the denoiser: the name then "
        "loses the concept in every context it is written in, not only the --name-contexts templates, and prompts "
        "without it do not change at all; the saved pipeline's text encoders carry the learned rows",
    )
    name_embedding_lr: float = option(0.0, "learning rate of those rows (0: the run's --lr)")
    knn_k: int = option(5, "neighbours averaged on each side of the knn score")
    knn_area: float = option(0.1, "share of forget locations the knn and names masks keep (their threshold is that "
                             "quantile)")
    names_z: float = option(0.0, "names fingerprint: 0 keeps the top knn_area share of forget locations; z > 0 keeps "
                            "those scoring above the median of the same scores on the contrast images (retain "
                            "folder, else null-prompt samples) by z robust standard deviations, so the area follows "
                            "the concept (all of an image it fills)")
    knn_z: float = option(0.0, "knn fingerprint: 0 keeps the top knn_area share of forget locations; z > 0 keeps those "
                          "scoring above the contrast images' locations (retain folder, else null-prompt samples; "
                          "each scored as a forget location would be) by z robust standard deviations, so the area "
                          "follows the concept: nearly all of an image whose background it is")
    names_smooth: float = option(0.3125, "names fingerprint: width of the box filter over the error differences, as a "
                                 "share of the latent's side (5 of 16 latent pixels; 0: no filter)")

    def __post_init__(self):
        check_range("tss.num_prototypes", self.num_prototypes, 1)
        check_range("tss.t_low", self.t_low, 0)
        check_range("tss.t_high", self.t_high, self.t_low + 1)
        check_range("tss.vectors_per_image", self.vectors_per_image, 1)
        check_range("tss.fit_draws", self.fit_draws, 1)
        check_range("tss.tau", self.tau, -1.0, 1.0)
        check_range("tss.alpha", self.alpha, 0, low_open=True)
        for name in ("lambda_f", "lambda_b", "lambda_r"):
            check_range(f"tss.{name}", getattr(self, name), 0)
        check_choice("tss.mask_mode", self.mask_mode, MASK_MODES)
        check_choice("tss.forget_target", self.forget_target, FORGET_TARGETS)
        check_choice("tss.blind_fill", self.blind_fill, BLIND_FILLS)
        check_range("tss.fill_prior", self.fill_prior, 0)
        if self.fill_prior > 0 and self.blind_fill != "surround":
            raise ConfigError(f"tss.fill_prior={self.fill_prior} weights the surround fill's colour: it needs "
                              f"--blind-fill surround (got {self.blind_fill!r}); drop --fill-prior or the other fill")
        check_range("tss.snr_gamma", self.snr_gamma, 0, low_open=True)
        check_range("tss.snr_floor", self.snr_floor, 0, self.snr_gamma)
        check_choice("tss.keep_weight", self.keep_weight, ("prediction", "clean"))
        check_choice("tss.kmeans_backend", self.kmeans_backend, ("auto", "sklearn", "torch"))
        check_range("tss.mask_draws", self.mask_draws, 1)
        check_range("tss.contrast_ratio", self.contrast_ratio, 0)
        check_range("tss.contrast_samples", self.contrast_samples, 1)
        check_range("tss.contrast_sample_steps", self.contrast_sample_steps, 1)
        check_choice("tss.fingerprint", self.fingerprint, FINGERPRINTS)
        check_range("tss.knn_k", self.knn_k, 1)
        check_range("tss.vocab_anchors", self.vocab_anchors, 0)
        check_range("tss.lambda_v", self.lambda_v, 0)
        check_range("tss.name_embedding_lr", self.name_embedding_lr, 0)
        if self.name_embedding_lr > 0 and not self.name_embeddings:
            raise ConfigError(f"tss.name_embedding_lr={self.name_embedding_lr} is the rate of the names' embeddings, "
                              "which this run does not learn: add --name-embeddings, or drop --name-embedding-lr")
        check_range("tss.vocab_candidates", self.vocab_candidates, 0)
        self.anchor_words = [w.strip() for w in self.anchor_words if w.strip()]
        check_choice("tss.name_target", self.name_target, NAME_TARGETS)
        check_choice("tss.blind_prompt", self.blind_prompt, BLIND_PROMPTS)
        check_choice("tss.forget_prompts", self.forget_prompts, FORGET_PROMPTS)
        check_range("tss.knn_area", self.knn_area, 0, 1, low_open=True, high_open=True)
        check_range("tss.names_smooth", self.names_smooth, 0, 1)
        for fingerprint in ("names", "knn"):  # each fingerprint's own threshold
            z = getattr(self, f"{fingerprint}_z")
            check_range(f"tss.{fingerprint}_z", z, 0)
            if z > 0 and self.fingerprint != fingerprint:
                raise ConfigError(f"tss.{fingerprint}_z={z} sets the {fingerprint} fingerprint's threshold and this run "
                                  f"uses fingerprint {self.fingerprint!r}: add --fingerprint {fingerprint}, or drop "
                                  f"--{fingerprint}-z")
        if self.fingerprint in ("knn", "names") and self.mask_mode != "cached":
            raise ConfigError(f"tss.fingerprint={self.fingerprint!r} scores each forget image once: use mask_mode "
                              "'cached'")
        if self.t_high > 1000:
            raise ConfigError(f"tss.t_high={self.t_high} is outside the 1000-step schedule: use at most 1000")
