"""``student.*`` and the settings of the student methods: ``kd.*``, ``dkd.*``, ``dist_kd.*``, ``maml.*`` and
``meta_distill.*`` (its sub-sections ``head``, ``guard``, ``temperature``, ``feedback``) and
``meta_distill_pilot.*``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.errors import Strict
from pipelines.config.sources import FromSource, InitSource, check_source
from pipelines.config.training import ModelConfig, TrainConfig


class KDConfig(Strict):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the soft term (scaled by T^2); "
                                                      "meta_distill and meta_distill_pilot use it when theirs is null")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) term")
    soft_loss: Literal["kl", "mse"] = Field("kl", description="the soft term: kl, KL(teacher_T || student_T); mse, "
                                                              "squared error of the tempered probabilities")
    transfer_ratio: float = Field(1.0, ge=0, description="transfer (unlabeled) examples per labelled example in "
                                                         "each step of the teacher-based methods; 0: labels only")
    grid_alpha: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.0],
                                    description="kd_tuned: alphas searched on the validation split")
    grid_temperature: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0],
                                          description="kd_tuned: temperatures searched")
    grid_transfer_ratio: list[float] | None = Field(None, description="kd_tuned: transfer ratios searched "
                                                                      "(default: kd.transfer_ratio only)")
    grid_seed: int = Field(0, description="kd_tuned: the student seed of the search")
    keep_p: float = Field(0.05, gt=0, le=1, description="standard_practice: tuned DKD or DIST replaces tuned KD only "
                                                        "when its grid's best student beats tuned KD's on the held-out "
                                                        "images beyond noise (McNemar's exact one-sided p below this; "
                                                        "1: the best held-out score, however small the margin)")

    @field_validator("grid_alpha", "grid_temperature", "grid_transfer_ratio")
    @classmethod
    def _grid(cls, values: list[float] | None, info) -> list[float] | None:
        if values is None:
            return values
        if not values:
            raise ValueError(f"kd.{info.field_name} must list at least one value")
        low, high = {"grid_alpha": (0.0, 1.0), "grid_temperature": (1e-9, float("inf")),
                     "grid_transfer_ratio": (0.0, float("inf"))}[info.field_name]
        bad = [v for v in values if not low <= v <= high]
        if bad:
            raise ValueError(f"kd.{info.field_name} has out-of-range values {bad}")
        return values

    def transfer_batch(self, batch_size: int) -> int:
        """Transfer examples drawn beside each labelled batch of ``batch_size``."""
        return int(round(self.transfer_ratio * batch_size))


class _GridSection(Strict):
    """A loss's section with a tuned variant's grid (``grid_beta``, ``grid_temperature``):
    every grid lists at least one value, every value positive."""

    section: ClassVar[str]

    @field_validator("grid_beta", "grid_temperature", check_fields=False)
    @classmethod
    def _grid(cls, values: list[float], info) -> list[float]:
        name = f"{cls.section}.{info.field_name}"
        if not values:
            raise ValueError(f"{name} must list at least one value")
        if any(v <= 0 for v in values):
            raise ValueError(f"{name} has values that are not positive: {[v for v in values if v <= 0]}")
        return values


class DKDConfig(_GridSection):
    """``dkd``: decoupled KD (Zhao et al. 2022), cross-entropy on the labels plus
    ``alpha * TCKD + beta * NCKD``; defaults are the authors' CIFAR-100 settings."""

    section: ClassVar[str] = "dkd"

    alpha: float = Field(1.0, ge=0, description="weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target term (NCKD)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of both terms (scaled by T^2)")
    warmup: float = Field(20 / 240, ge=0, lt=1, description="the DKD term ramps up linearly over this fraction of "
                                                            "student.train.steps (the authors': 20 of 240 epochs)")
    grid_beta: list[float] = Field(default_factory=lambda: [0.5, 2.0, 8.0],
                                   description="dkd_tuned: NCKD weights searched (the authors used 0.5 on ImageNet, "
                                               "2 to 8 on CIFAR-100)")
    grid_temperature: list[float] = Field(default_factory=lambda: [1.0, 4.0], description="dkd_tuned: temperatures "
                                                                                          "searched")


class DISTKDConfig(_GridSection):
    """``dist_kd``: DIST (Huang et al. 2022), cross-entropy on the labels plus the teacher's
    inter- and intra-class relations matched by Pearson correlation; defaults are the
    authors' ImageNet settings."""

    section: ClassVar[str] = "dist_kd"

    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation (within each example)")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation (within each class, across the "
                                                "batch)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature (scaled by T^2)")
    grid_beta: list[float] = Field(default_factory=lambda: [1.0, 2.0],
                                   description="dist_kd_tuned: the weights searched, beta = gamma (the authors: 1 on "
                                               "ImageNet, 2 on CIFAR-100)")
    grid_temperature: list[float] = Field(default_factory=lambda: [1.0, 4.0],
                                          description="dist_kd_tuned: temperatures searched (the authors: 1 on "
                                                      "ImageNet, 4 on CIFAR-100)")


class HeadConfig(Strict):
    """``meta_distill.head``: the teacher's head keeps learning while it teaches."""

    lr: float = Field(1e-3, ge=0, description="Adam step size of the teacher's head")
    trust_kl: float = Field(1.0, ge=0, description="weight of KL(starting teacher || teacher), the pull back")
    max_drift: float = Field(0.1, gt=0, description="the head stops learning once that KL passes this")


class GuardConfig(Strict):
    """``meta_distill.guard``: held-out checks that revert what falls behind."""

    every: int = Field(200, ge=0, description="student steps between checks of the held-out accuracy against the "
                                              "last accepted snapshot (0: no guard)")
    z: float = Field(2.0, gt=0, description="falling behind the snapshot by more than this many standard errors "
                                            "reverts student, head and both optimisers to it")
    damping: float = Field(0.5, gt=0, le=1, description="a revert multiplies the head's step size by this")


class TemperatureConfig(Strict):
    """``meta_distill.temperature``: the KD temperature, fixed or learned along the student's trajectory."""

    value: float | None = Field(2.0, gt=0, description="the KD temperature meta_distill teaches at (where a "
                                                        "learned one starts); null: kd.temperature")
    learn: bool = Field(False, description="the temperature learns too, by forward-mode tangents through the "
                                           "student's whole trajectory (RTHO, discounted as MARTHE); SGD students; "
                                           "about 5x a kd step over the whole run (measured)")
    lr: float = Field(0.05, gt=0, description="the step of log T once a window of hypergradients clears its noise")
    box: tuple[float, float] = Field((1.0, 8.0), description="bounds on the learned T")
    discount: float = Field(0.99, ge=0, le=1, description="the tangent's discount per step (1: RTHO's full "
                                                          "horizon; 0: one step)")
    share: float = Field(1.0, gt=0, le=1, description="T learns over this share of the student's steps, then stays "
                                                      "where it ends (measured: 1.9x a kd step overall at 0.2)")
    window: int = Field(5, ge=2, description="hypergradient readings (one per head update) per decision")

    @model_validator(mode="after")
    def _box(self) -> TemperatureConfig:
        low, high = self.box
        if not 0 < low <= high:
            raise ValueError(f"meta_distill.temperature.box={list(self.box)} must be 0 < low <= high")
        return self


class FeedbackConfig(Strict):
    """``meta_distill.feedback``: the student's feedback to the teacher's head (Meta Pseudo Labels' signal)."""

    weight: float = Field(0.0, ge=0, description="weight of h * CE(teacher, its pseudo-labels), h the student's "
                                                 "held-out gain from its last step (normalised by its running RMS). "
                                                 "Off by default: in 10 paired seeds on three presets it changed "
                                                 "nothing (+0.06, +0.10, +0.00 points; docs/distill_ablation.md) "
                                                 "and costs two held-out forwards per update")
    clip: float = Field(2.0, gt=0, description="the normalised h is clipped to +-this")


class MetaDistillConfig(Strict):
    """``meta_distill``: KD from a teacher whose head keeps learning while it teaches, guarded by
    held-out checks (``pipelines/students/meta_distill.py``)."""

    alpha: float | None = Field(1.0, ge=0, le=1, description="weight of the soft term; null: kd.alpha")
    interval: int = Field(10, ge=1, description="student steps between updates of the teacher's head")
    quiz_batch_size: int = Field(256, gt=0, description="held-out images per head update, rotating through the "
                                                        "quiz and validation splits")
    head: HeadConfig = Field(default_factory=HeadConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    temperature: TemperatureConfig = Field(default_factory=TemperatureConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    reference: Literal["standard_practice", "kd", "none"] = Field(
        "standard_practice", description="the method whose student (trained from the same seed: the same "
                                         "initialisation and batches) is returned unless the learned student beats "
                                         "it on the judging images beyond noise (keep_p, judge_fraction). The guard compares the "
                                         "student with its own snapshots and misses a teacher that harms it slowly; "
                                         "this bounds learned teaching by the reference. standard_practice: the best "
                                         "of tuned kd, dkd and dist_kd (its grids cost about 20 trainings, once per "
                                         "home); kd: one kd training more; none: the learned student as it ends")
    keep_p: float = Field(0.05, gt=0, le=1, description="the learned student replaces the reference only when it "
                                                        "beats it on the judging images (judge_fraction) with "
                                                        "McNemar's exact one-sided p below this (1: whenever it is "
                                                        "right on more)")
    judge_fraction: float = Field(0.5, gt=0, lt=1, description="share of the held-out images (drawn at random per "
                                                               "seed) kept from the learned teaching (its head, "
                                                               "temperature and guard never see them) to judge its "
                                                               "student against the reference: judged on the images "
                                                               "its guard chose on, it looked better than it was")


Learnable = Literal["teacher", "calibration", "kd_params", "weights"]


class MetaDistillPilotConfig(Strict):
    """``meta_distill_pilot``: MetaDistil's pilot update (``pipelines/students/meta_distill_pilot.py``):
    what is learned takes a meta-gradient step on the quiz loss of a copy of the student after
    ``pilot_steps`` SGD steps on the teaching."""

    learn: list[Learnable] = Field(
        default_factory=lambda: ["teacher"],
        description="teacher: all the teacher's weights (MetaDistil); calibration: a per-class temperature and bias "
                    "on its logits; kd_params: the KD temperature and alpha; weights: a per-example soft/hard "
                    "weight from a tiny net. Knobs sit on a frozen teacher unless 'teacher' is listed too")
    temperature: float | None = Field(2.0, gt=0, description="the KD temperature it teaches at (the start of a "
                                                              "learned one); null: kd.temperature")
    alpha: float | None = Field(1.0, ge=0, le=1, description="weight of the soft term; null: kd.alpha")
    knob_lr: float = Field(0.03, ge=0, description="Adam/SGD step size of the teaching knobs")
    order: Literal["second", "first"] = Field("second", description="second: MetaDistil; first: Meta Pseudo "
                                                                    "Labels' first-order estimator (learn=[teacher])")
    pilot_steps: int = Field(1, ge=1, description="K pilot SGD steps of the student copy")
    pilot_lr: float | None = Field(None, gt=0, description="pilot step size; null: student.train.optimizer.lr")
    teacher_lr: float = Field(1e-4, ge=0, description="step size of the teacher's weights (learn=[teacher])")
    teacher_optimizer: Literal["adam", "sgd"] = Field("adam", description="optimiser of the teacher's weights and "
                                                                          "the knobs")
    interval: int = Field(10, ge=1, description="a meta-update every n student steps")
    start_step: int = Field(0, ge=0, description="no meta-update before this student step")
    stop_step: int | None = Field(None, ge=1, description="no meta-update after this student step (MetaDistil "
                                                          "freezes its teacher for the rest)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the teacher's and knobs' learning rates over the update window")
    quiz_batch_size: int = Field(256, gt=0, description="quiz images per meta-update, drawn from the quiz split")
    teacher_ce_weight: float = Field(0.0, ge=0, description="adds the teacher's own CE on the batch, against "
                                                            "forgetting")

    @model_validator(mode="after")
    def _what_is_learned(self) -> MetaDistillPilotConfig:
        if not self.learn or len(set(self.learn)) != len(self.learn):
            raise ValueError(f"meta_distill_pilot.learn must list distinct items, got {self.learn}")
        if self.order == "first" and self.learn != ["teacher"]:
            raise ValueError("meta_distill_pilot.order=first (MPL's estimator) only learns the teacher's weights: "
                             "set meta_distill_pilot.learn=[teacher]")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ValueError(f"meta_distill_pilot.stop_step={self.stop_step} must exceed "
                             f"meta_distill_pilot.start_step={self.start_step}")
        return self


class MamlConfig(Strict):
    """Meta-learning of an initialisation over episodic tasks (MAML family)."""

    algorithm: Literal["maml", "fomaml", "metasgd", "reptile"] = Field(
        "maml", description="maml (second order), fomaml (first order), metasgd (learned per-parameter inner step "
                            "sizes) or reptile")
    ways: int | None = Field(None, gt=1, description="classes per task; default: every class of the data set")
    shots: int = Field(5, gt=0, description="support examples per class in each task")
    queries: int = Field(5, gt=0, description="query examples per class")
    inner_steps: int = Field(3, ge=0, description="SGD steps adapting to a task's support set")
    inner_lr: float = Field(0.3, gt=0, description="step size of those inner steps (metasgd: their starting value)")
    outer_lr: float = Field(1e-3, gt=0, description="Adam; for reptile: the outer step size epsilon (SGD)")
    meta_batch: int = Field(8, gt=0, description="tasks per meta-step")
    meta_steps: int | None = Field(None, ge=0, description="outer steps of meta-training (time_budget_s may stop it "
                                                           "earlier); null: min(300, student.train.steps // 5), so "
                                                           "the student's budget bounds it")
    time_budget_s: float | None = Field(None, gt=0, description="stop meta-training after this many seconds")
    vectorize: bool = Field(True, description="batch tasks with torch.func.vmap (else a per-task loop)")
    vmap_query: bool = Field(True, description="with vectorize, vmap the query pass too (else a loop over "
                                                "tasks' query sets: faster for large query sets on CPU)")
    chunk_size: int | None = Field(None, gt=0, description="vmap chunk size, bounds memory")
    workers: int | None = Field(None, gt=0, description="task-parallel threads; default: one per CPU core")
    rotations: bool = Field(False, description="add 90/180/270-degree rotations as extra classes")
    eval_inner_steps: int | None = Field(None, ge=0, description="inner steps at evaluation (default: inner_steps)")
    log_every: int = Field(10, gt=0, description="meta-steps between logged meta-training metrics")


class BudgetConfig(Strict):
    """``student.budget``: what the student may cost to run, from its cost card (one thread, a
    process of its own).  A candidate over a limit that is set is never promoted, whatever
    the mode; ``mode`` and ``exponent`` shape the reward the architecture search ranks by
    (``pipelines.arch.space.Budget``)."""

    latency_ms: float | None = Field(None, gt=0, description="batch-1 CPU latency limit in milliseconds (the "
                                                              "card's median; null: no limit)")
    macs: int | None = Field(None, gt=0, description="limit on multiply-accumulates of one forward at batch 1")
    params: int | None = Field(None, gt=0, description="limit on the student's parameters")
    mode: Literal["hard", "soft"] = Field("hard", description="the architecture search's reward: hard, the accuracy "
                                                              "under every limit, and a point over one is never "
                                                              "trained; soft, MnasNet's accuracy * prod (cost / limit) "
                                                              "** exponent over the set limits. The promotion gate "
                                                              "treats every set limit as hard")
    exponent: float = Field(-0.07, le=0, description="soft mode's w in MnasNet's reward (-0.07: twice the latency "
                                                     "costs about 5% of the reward)")
    latency_slack: float = Field(0.05, ge=0, description="the fraction a latency reading may exceed latency_ms and "
                                                         "still pass: latency moves with the machine's load")

    def limits(self) -> dict[str, float]:
        """The limits that are set: ``{"latency_ms": 0.5, ...}``."""
        return {k: v for k, v in (("latency_ms", self.latency_ms), ("macs", self.macs), ("params", self.params))
                if v is not None}


def over_limits(limits: dict[str, float], measured: dict[str, float | None],
                latency_slack: float) -> list[tuple[str, float | None, float]]:
    """Each of ``limits`` (``BudgetConfig.limits``' measures) that ``measured`` breaks, as
    (measure, measured value, limit): latency may exceed its limit by ``latency_slack``
    (it moves with the machine's load); a value not measured breaks its limit.  The one
    check behind the architecture search's refusals and the promotion gate's."""
    broken = []
    for measure, limit in limits.items():
        value = measured.get(measure)
        allowed = limit * (1 + latency_slack) if measure == "latency_ms" else limit
        if value is None or value > allowed:
            broken.append((measure, value, limit))
    return broken


# Student methods (pipelines/students/methods.py maps each name to its function; a test keeps
# the two lists equal).  Teacher-based methods see the transfer split; the others do not.
TEACHER_METHODS = ("kd", "kd_tuned", "dkd", "dkd_tuned", "dist_kd", "dist_kd_tuned", "standard_practice",
                   "meta_distill", "meta_distill+maml_init", "meta_distill_pilot")


METHOD_NAMES = ("scratch", "maml_init", *TEACHER_METHODS)


class StudentConfig(FromSource):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", kwargs={"hidden": [16]}),
                               description="the student's network, the same for every method")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the student's training run, the same "
                                                                       "budget for every method")
    methods: list[str] = Field(default_factory=lambda: ["scratch", "kd", "maml_init", "meta_distill"],
                               description="the student methods trained and compared, each over every seed")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="student seeds; a seed fixes data order "
                                                                           "and initialisation, so methods pair "
                                                                           "seed by seed")
    finetune_steps: int = Field(0, ge=0, description="teacher-based methods end with this many cross-entropy "
                                                     "steps on the labels (as Meta Pseudo Labels does)")
    finetune_lr: float = Field(0.005, gt=0, description="constant step size of the label fine-tune")
    must_be_smaller: bool = Field(True, description="refuse a student with more parameters than the teacher")
    concurrency: int | None = Field(None, ge=1, description="students of the sweep (methods x seeds) trained at "
                                                            "once; default: one per GPU on CUDA, else 1")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="what the student may cost to run "
                                                                           "(its cost card); a candidate over it "
                                                                           "stays challenger")
    init: InitSource = Field("scratch", description="where the student's starting weights come from (a new head "
                                                    "where the classes differ); maml_init meta-trains from them")
    init_uri: str | None = Field(None, description="file: safetensors + spec.json; registry: models:/...; "
                                                   "torchvision/timm: a weights file or named weights")

    @model_validator(mode="after")
    def _init(self) -> StudentConfig:
        check_source("student.init", self.init, self.init_uri, "student.init_uri", self.model.arch)
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise ValueError(f"unknown student method(s) {unknown}; allowed: {', '.join(METHOD_NAMES)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"student.methods lists a method twice: {methods}")
        return methods

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("student.seeds must be a non-empty list of distinct integers")
        return seeds
