"""The prepare-augmentation stage's body: the learned policy's online search, its cache,
and the training augmentation of every policy (no Prefect, no MLflow here).

The search (``data.augment_policy=learned``) trains a proxy network (the student's
architecture, or the teacher's) on the policy's augmented batches (hard ops); every
``interval`` steps the policy takes one Adam step on its hypergradient
(``meta.augment.policy_hypergrad``: the quiz cross-entropy after ``unroll_steps`` unrolled
SGD steps of the proxy on softly augmented batches).  ``method=population`` instead scores
a few candidate policies by the held-out accuracy of a proxy trained under each.  The
result is cached under the home by data key, search settings and proxy architecture, so
the teacher, the students and torchrun workers share one search.

Its functions take an :class:`AugmentContext`: the sections of the config the stage reads,
taken from the tree once (:meth:`AugmentContext.from_config`), and the keys computed once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from meta.augment import AugmentPolicy, draw_noise, policy_hypergrad
from meta.functional import params_of
from models.registry import build_model
from pipelines.augment.policies import Augmenter, FixedOps, LearnedOps, make_augmenter
from pipelines.common.home import cache_dir, cache_key, made_once, write_json
from pipelines.common.progress import progress_bar
from pipelines.common.rng import global_rng
from pipelines.config.data import AugmentSearchConfig, DataConfig, read_policy_file
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.teacher import ImproveConfig
from pipelines.config.training import ModelConfig, TrainConfig
from pipelines.data.prepared import Normalization, Prepared
from pipelines.engine import distributed
from pipelines.engine.device import rows
from pipelines.engine.loop import LogFn, supervised_loss, train_classifier
from pipelines.engine.metrics import check_finite
from pipelines.evaluate.metrics import evaluate

SEARCH_VERSION = 2  # 2: depth, uniform sampling, teacher proxy (the op space and base are in the key's settings)


@dataclass
class SearchResult:
    spec: dict
    history: dict[str, list] = field(default_factory=dict)  # step, probabilities, magnitudes, quiz_loss
    seconds: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class AugmentContext:
    """What the augmentation stage reads: the data section (the policy, its fixed ops and
    its search), the search's proxy and the prepared data, never the whole tree.  The keys
    (the search's, the policy's fingerprint) are computed once, on first use: the teacher's
    and the students' keys are built on them."""

    data_cfg: DataConfig
    proxy_model: ModelConfig  # the search's proxy network: the student's or the teacher's (augment_search.proxy)
    proxy_train: TrainConfig  # that network's training, shortened for the population's candidates
    data: Prepared

    @classmethod
    def from_config(cls, cfg: PipelineConfig, data: Prepared) -> AugmentContext:
        proxy = cfg.student if cfg.data.augment_search.proxy == "student" else cfg.teacher
        return cls(cfg.data, proxy.model, proxy.train, data)

    @cached_property
    def search_key(self) -> str:
        """The search's cache key: the data, the search's settings and the proxy's architecture."""
        return cache_key(SEARCH_VERSION, data=self.data.key,
                         search=self.data_cfg.augment_search.model_dump(mode="json"),
                         proxy=self.proxy_model.model_dump(mode="json"))

    @cached_property
    def policy_fingerprint(self) -> dict | list:
        """What a cache key (teacher, kd_tuned grid) needs to know of the augmentation: a pure
        function of the config and the data's key.  A searched policy is named by its search's
        key (what the search is a function of), so computing a key never runs the search."""
        d = self.data_cfg
        augment = d.model_dump(mode="json")["augment"]
        if d.augment_policy == "fixed":  # keys of "fixed" (the default) stay as they were
            return augment
        fingerprint = {"policy": d.augment_policy, "fixed": augment}
        if d.augment_policy_base != "none":  # keys without a base stay as they were
            fingerprint["base"] = d.augment_policy_base
        if d.augment_policy == "learned":
            fingerprint.update(self.learned_fingerprint)
        return fingerprint

    @cached_property
    def learned_fingerprint(self) -> dict:
        """The learned policy, for a cache key: the file's policy, or the key of its search."""
        if self.data_cfg.augment_policy_file is not None:
            return {"learned": read_policy_file(self.data_cfg.augment_policy_file.expanduser())}
        return {"learned_search": self.search_key}


def fresh_proxy(ctx: AugmentContext):
    """A new proxy network on the data's device, initialised from the search's seed (the
    same weights for every search and candidate of that seed)."""
    model, data = ctx.proxy_model, ctx.data
    with global_rng(ctx.data_cfg.augment_search.seed):
        return build_model(model.arch, data.input_shape, data.num_classes, **model.kwargs).to(data.device)


def starting_policy(s: AugmentSearchConfig) -> AugmentPolicy:
    """Where the search starts: equal probabilities, ``init_magnitude`` of each range."""
    return AugmentPolicy(s.op_names, s.init_magnitude, s.depth, s.sampling, s.space)


def policy_spec(data_cfg: DataConfig, policy: AugmentPolicy) -> dict:
    """``policy``'s JSON, with the ops it runs on top of (``base``) when the search has one."""
    spec = policy.to_json()
    if data_cfg.augment_search.base == "fixed":
        spec["base"] = [op.model_dump(mode="json") for op in data_cfg.augment]
    return spec


def learned_policy(ctx: AugmentContext, on_log: LogFn | None = None) -> SearchResult:
    """The learned policy: from ``data.augment_policy_file``, the cache, or a new search."""
    if ctx.data_cfg.augment_policy_file is not None:
        return SearchResult(read_policy_file(ctx.data_cfg.augment_policy_file.expanduser()), cached=True)
    path = cache_dir("augment") / f"{ctx.search_key}.json"

    def cached() -> SearchResult | None:
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        return SearchResult(saved["policy"], saved["history"], saved["seconds"], cached=True)

    def make() -> SearchResult:
        result = search(ctx, on_log)
        write_json(path, {"policy": result.spec, "history": result.history, "seconds": result.seconds})
        return result

    return made_once(f"augment-{path.stem}", cached, make)


def search(ctx: AugmentContext, on_log: LogFn | None = None) -> SearchResult:
    data, s = ctx.data, ctx.data_cfg.augment_search
    device = data.device
    if s.method == "population":
        return population_search(ctx, on_log)
    generator = torch.Generator().manual_seed(s.seed)
    proxy, policy = fresh_proxy(ctx), starting_policy(s).to(device)
    model_opt = torch.optim.SGD(proxy.parameters(), lr=s.model_lr, momentum=0.9)
    policy_opt = torch.optim.Adam(policy.parameters(), lr=s.policy_lr)
    stats = Normalization(data.mean, data.std).to(device)
    base = FixedOps(ctx.data_cfg.augment, data.mean, data.std) if s.base == "fixed" else None
    history: dict[str, list] = {"step": [], "probabilities": [], "magnitudes": [], "quiz_loss": []}
    start = time.perf_counter()
    proxy.train()
    with progress_bar("augmentation search", total=s.steps) as advance:
        for step in range(1, s.steps + 1):
            idx = torch.randint(len(data.y("train")), (s.batch_size,), generator=generator)
            pixels, labels = _train_pixels(data, idx, stats, base, generator)
            if step % s.interval == 0:
                grads, quiz_loss = _hypergrad(proxy, policy, pixels, labels, data, generator, stats, s, base)
                check_finite(quiz_loss, "augmentation search", step, "quiz loss")
                policy_opt.zero_grad(set_to_none=True)
                for name, p in policy.named_parameters():
                    p.grad = grads[name]
                policy_opt.step()
                if step % (10 * s.interval) == 0 or step == s.steps:
                    _record(history, step, policy, quiz_loss, on_log)
            with torch.no_grad():
                augmented = policy(pixels, draw_noise(policy, s.batch_size, generator, device), hard=True)
            loss = F.cross_entropy(proxy(stats.from_pixels(augmented)), labels)
            model_opt.zero_grad(set_to_none=True)
            loss.backward()
            model_opt.step()
            advance()
    return SearchResult(policy_spec(ctx.data_cfg, policy), history, time.perf_counter() - start)


def population_search(ctx: AugmentContext, on_log: LogFn | None = None) -> SearchResult:
    """``method=population``: each candidate (a magnitude share and a depth, equal
    probabilities) trains a fresh proxy, the same initialisation for all, for
    ``population_steps`` steps under it; the candidate whose proxy scores best on the
    held-out quiz split (accuracy, then the lower loss) is the policy.  A zero-order outer
    loop on the held-out score after a longer horizon than the hypergradient's few steps."""
    s = ctx.data_cfg.augment_search
    if distributed.world().size > 1:
        # its proxies train through the shared loop, which would wrap them for DDP while the
        # other ranks wait on the search's lock: the flow searches before torchrun starts
        raise RuntimeError("data.augment_search.method=population runs in the augmentation stage, not under "
                           "torchrun: run the flow (metadistill run), which searches first, or set "
                           "data.augment_policy_file")
    candidates = [policy_spec(ctx.data_cfg, AugmentPolicy(s.op_names, m, d, s.sampling, s.space))
                  for d in s.population_depths for m in s.population_magnitudes]
    history: dict[str, list] = {"candidates": candidates, "quiz_accuracy": [], "quiz_loss": []}
    start = time.perf_counter()
    for k, spec in enumerate(candidates):
        scored = _candidate_score(ctx, spec, f"augment candidate {k + 1}/{len(candidates)}")
        check_finite(scored.loss, "augmentation population", k, "quiz loss")
        history["quiz_accuracy"].append(scored.accuracy)
        history["quiz_loss"].append(scored.loss)
        if on_log is not None:
            on_log(k, {"augment_population_quiz_acc": scored.accuracy, "augment_population_quiz_loss": scored.loss,
                       "augment_population_depth": spec["depth"]})
    best = max(range(len(candidates)), key=lambda k: (history["quiz_accuracy"][k], -history["quiz_loss"][k]))
    history["chosen"] = best
    return SearchResult(candidates[best], history, time.perf_counter() - start)


def _candidate_score(ctx: AugmentContext, spec: dict, desc: str):
    """The quiz evaluation of a proxy trained under the policy ``spec``."""
    data, s = ctx.data, ctx.data_cfg.augment_search
    train = ctx.proxy_train.model_copy(update={"steps": s.population_steps})
    proxy = fresh_proxy(ctx)
    train_classifier(proxy, data.x("train"), data.y("train"), train, supervised_loss, seed=s.seed,
                     augment=LearnedOps(spec, data.mean, data.std), desc=desc, device=data.device)
    return evaluate(proxy, data.x("quiz"), data.y("quiz"), data.num_classes)


def _train_pixels(data, idx: torch.Tensor, stats, base: FixedOps | None, generator: torch.Generator):
    """Training rows ``idx`` as [0, 1] pixels (what the policy augments; under the base's ops
    when there is one), and their labels."""
    x = rows(data.x("train"), idx, data.device)
    if base is not None:
        x = base(x, torch.randint(0, 2**31 - 1, (len(idx),), generator=generator))
    return stats.to_pixels(x), rows(data.y("train"), idx, data.device)


def _hypergrad(proxy, policy: AugmentPolicy, pixels, labels, data, generator: torch.Generator, stats, s,
               base: FixedOps | None):
    """The policy's hypergradient: unrolled steps on this step's batch and ``s.unroll_steps - 1``
    fresh ones, scored on a quiz batch (with one step, the random stream of search version 2)."""
    if s.unroll_steps > 1:
        idx = torch.randint(len(data.y("train")), (s.batch_size * (s.unroll_steps - 1),), generator=generator)
        more, more_labels = _train_pixels(data, idx, stats, base, generator)
        pixels, labels = torch.cat([pixels, more]), torch.cat([labels, more_labels])
    q = torch.randint(len(data.y("quiz")), (s.batch_size,), generator=generator)
    noise = draw_noise(policy, len(labels), generator, data.device)
    quiz = (rows(data.x("quiz"), q, data.device), rows(data.y("quiz"), q, data.device))
    return policy_hypergrad(proxy, params_of(proxy), policy, pixels, labels, quiz, noise, s.model_lr,
                            stats.from_pixels, s.tau, s.unroll_steps)


def _record(history: dict, step: int, policy: AugmentPolicy, quiz_loss: float, on_log: LogFn | None) -> None:
    probs, mags = policy.probabilities().tolist(), policy.magnitudes().tolist()
    history["step"].append(step)
    history["probabilities"].append(probs)
    history["magnitudes"].append(mags)
    history["quiz_loss"].append(quiz_loss)
    if on_log is not None:
        on_log(step, {"augment_quiz_loss": quiz_loss, **{f"augment_p_{op}": p for op, p in zip(policy.ops, probs)},
                      **{f"augment_m_{op}": m for op, m in zip(policy.ops, mags)}})


def augmenter_for(ctx: AugmentContext) -> Augmenter | None:
    """The training augmentation for the context's data (a learned policy read from its
    cache, or searched first when nothing ran the stage)."""
    learned = learned_policy(ctx).spec if ctx.data_cfg.augment_policy == "learned" else None
    return make_augmenter(ctx.data_cfg, ctx.data, learned)


def searches(data_cfg: DataConfig, improve: ImproveConfig) -> bool:
    """Whether a stage uses the learned policy: the training augmentation, or the strong
    view of the teacher's improvement."""
    return data_cfg.augment_policy == "learned" or (improve.method != "none" and improve.strong == "learned")


def example_grid(ctx: AugmentContext, augmenter: Augmenter | None, draws: int = 7):
    """A figure: one row per class (at most 10), its first training image, then ``draws``
    augmentations of it (seeds 0..draws-1): what the policy does, for a person to see."""
    from matplotlib.figure import Figure

    data = ctx.data
    y = data.y("train").cpu()
    classes = sorted(set(y.tolist()))[:10]
    fig = Figure(figsize=(1.1 * (draws + 1), 1.1 * len(classes)))
    axes = fig.subplots(len(classes), draws + 1, squeeze=False)
    normalization = Normalization(data.mean, data.std)
    for row, c in enumerate(classes):
        image = data.x("train")[int((y == c).nonzero()[0])].cpu()
        batch = image.expand(draws, *image.shape).clone()
        augmented = augmenter(batch, torch.arange(draws)).cpu() if augmenter is not None else batch
        for col, img in enumerate([image, *augmented]):
            pixels = normalization.to_pixels(img).permute(1, 2, 0).squeeze(-1).numpy()
            axes[row][col].imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
            axes[row][col].axis("off")
        axes[row][0].set_title(str(data.class_names[c]), fontsize=6)
    fig.suptitle(f"augment_policy={ctx.data_cfg.augment_policy}: original, then {draws} draws", fontsize=8)
    fig.tight_layout()
    return fig


def history_figure(history: dict, spec: dict):
    """Op probabilities and magnitudes (as a share of each op's range) over the search of
    the policy ``spec``."""
    from matplotlib.figure import Figure

    from meta.augment import SPACES

    ops, ranges = [op["name"] for op in spec["ops"]], SPACES[spec.get("space", "narrow")]

    fig = Figure(figsize=(10, 3.4))
    ax_p, ax_m = fig.subplots(1, 2)
    for k, op in enumerate(ops):
        ax_p.plot(history["step"], [p[k] for p in history["probabilities"]], label=op)
        ax_m.plot(history["step"], [m[k] / ranges[op] for m in history["magnitudes"]], label=op)
    ax_p.set_title("op probability")
    ax_m.set_title("magnitude / its range")
    for ax in (ax_p, ax_m):
        ax.set_xlabel("search step")
    ax_m.legend(fontsize=6)
    fig.tight_layout()
    return fig
