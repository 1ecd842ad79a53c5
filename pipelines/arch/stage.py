"""The architecture stage: the study's trials, the budget, and the choice.

Each trial trains its candidate for the proxy budget (``arch_search.proxy_steps``) from this
run's teacher by kd (``reward=distill``) or from the labels alone (``reward=scratch``), and
scores it on the held-out labelled images (quiz and validation splits, as ``kd_tuned``'s
grid); the reward weighs that accuracy against ``student.budget``.  A point over a hard
limit is refused before it trains.  The hand-picked ``student.model`` trains the same way
as the reference, and stays the student unless a searched point beats its reward beyond the
noise of the held-out images (a sign test on the examples the two disagree on).

The study lives in an Optuna storage (a journal file in the project home, or the team's
PostgreSQL when ``$METADISTILL_STUDY_STORAGE`` names it), so several processes on several
machines can run trials of one study at once: each trains until the study holds
``arch_search.trials`` trained candidates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from torch import nn

from pipelines.arch.searchers import OVER_BUDGET, finished, make_sampler, multi_objective
from pipelines.arch.space import Budget, Candidate, Costs, decode, distributions, model_name, points
from pipelines.common.home import cache_dir, cache_key, made_once, write_json
from pipelines.config.arch import ArchSearchConfig
from pipelines.config.students import BudgetConfig
from pipelines.config.training import ModelConfig
from pipelines.engine.loop import StepHook, supervised_loss
from pipelines.engine.metrics import accuracy, correctness, pack_hits, sign_test, unpack_hits
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher, kd_loss, teacher_fingerprint

ARCH_CACHE_VERSION = 2  # 2: trials keep their held-out hits (the keep rule's sign test)
STORAGE_ENV = "METADISTILL_STUDY_STORAGE"  # the team's study database (`metadistill services` exports it)
TrialLog = Callable[[dict], None]


@dataclass
class ArchContext:
    """The stage's inputs: its section, the budget, the hand-picked student, and a student
    context for the proxy training (this run's data, teacher, kd and augmentation)."""

    search: ArchSearchConfig
    budget: BudgetConfig
    reference: ModelConfig
    proxy: StudentContext
    teacher_params: int | None  # student.must_be_smaller: no point larger than the teacher
    probe: object | None = None  # deploy.cost.LatencyProbe, when latency is measured
    costs: Costs = field(init=False)

    def __post_init__(self):
        self.costs = Costs(self.proxy.data.input_shape, self.proxy.data.num_classes, self.probe, anchor=self.reference)

    @classmethod
    def from_config(cls, cfg, data, teacher: nn.Module, probe=None) -> ArchContext:
        search, student = cfg.arch_search, cfg.student
        steps = search.proxy_steps or student.train.steps
        train = student.train.model_copy(update={"steps": steps, "log_every": steps})
        proxy_student = student.model_copy(update={"train": train, "finetune_steps": 0, "init": "scratch",
                                                   "init_uri": None})
        proxy = dataclasses.replace(StudentContext.from_config(cfg, data, teacher, search.seed), student=proxy_student)
        params = sum(p.numel() for p in teacher.parameters()) if student.must_be_smaller else None
        return cls(search, student.budget, student.model, proxy, params, probe)

    @property
    def needs_latency(self) -> bool:
        return needs_latency(self.search, self.budget)

    def key(self) -> str:
        """The study's key: what makes its trials comparable (data, teacher, proxy training,
        kd, augmentation, the section and the budget)."""
        return cache_key(ARCH_CACHE_VERSION, data=self.proxy.data.key, teacher=teacher_fingerprint(self.proxy.teacher),
                         train=self.proxy.student.train.model_dump(mode="json"),
                         kd=self.proxy.kd.model_dump(mode="json"), augment=self.proxy.augment_key,
                         search=self.search.model_dump(mode="json"), budget=self.budget.model_dump(mode="json"),
                         reference=self.reference.model_dump(mode="json"), smaller=self.teacher_params)


def needs_latency(search: ArchSearchConfig, budget: BudgetConfig) -> bool:
    """Latency is measured when it is a limit, or the default one."""
    no_limit = budget.latency_ms is None and budget.macs is None and budget.params is None
    return budget.latency_ms is not None or (no_limit and search.default_budget == "latency")


@contextlib.contextmanager
def latency_probe(needed: bool):
    """The process that measures candidates' latency (one thread, the server's forward),
    started once for the stage when latency is needed; None otherwise."""
    if not needed:
        yield None
        return
    from deploy.cost import LatencyProbe

    with LatencyProbe() as probe:
        yield probe


@dataclass
class SearchResult:
    chosen: dict  # {"arch", "kwargs"}
    reason: str
    trials: list[dict]  # every trial: candidate, cost, held-out accuracy, reward, state, seconds
    reference: dict  # the hand-picked student's trial
    budget: str
    seconds: float
    measure: str  # the cost measure of the Pareto figure
    limit: float | None  # the budget's limit on that measure
    cached: bool = False
    study: str = ""

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


class Rungs(StepHook):
    """Successive halving's readings: the held-out accuracy at a quarter, half and three
    quarters of the proxy budget, reported to the trial; Optuna's pruner stops the worse."""

    def __init__(self, trial: optuna.Trial, model: nn.Module, held_out, steps: int):
        self.trial, self.model, self.held_out, self.every, self.steps = trial, model, held_out, max(1, steps // 4), steps
        self.last: int | None = None  # the step of the last reading

    def after_step(self, step: int, optimizer) -> None:
        if step % self.every == 0 and step < self.steps:
            self.trial.report(accuracy(self.model, *self.held_out), step)
            self.last = step
            if self.trial.should_prune():
                raise optuna.TrialPruned()


def train_candidate(ctx: ArchContext, model: ModelConfig, trial: optuna.Trial | None = None) -> dict:
    """Train ``model`` for the proxy budget as the reward says; its held-out accuracy (the
    last rung's when successive halving stopped it), seconds and where it stopped."""
    sub = dataclasses.replace(ctx.proxy, student=ctx.proxy.student.model_copy(update={"model": model}),
                              desc=f"arch {model_name(model)}", on_log=None)
    held_out = sub.held_out()
    student, start, stopped = sub.new_student(), time.perf_counter(), None
    rungs = Rungs(trial, student, held_out, sub.student.train.steps) if trial is not None and _halving(ctx) else None
    hooks = [rungs] if rungs else []
    try:
        if ctx.search.reward == "distill":
            sub.teach(student, kd_loss(FrozenTeacher(sub), sub.kd), hooks)
        else:
            sub.fit(student, supervised_loss, hooks=hooks)
    except optuna.TrialPruned:
        stopped = rungs.last
    hits = correctness(student, *held_out)
    return {"held_out_acc": hits.sum().item() / max(1, len(hits)), "hits": pack_hits(hits),
            "seconds": time.perf_counter() - start, "stopped_at": stopped}


def _halving(ctx: ArchContext) -> bool:
    return ctx.search.halving and not multi_objective(ctx.search)


def open_study(ctx: ArchContext, key: str) -> optuna.Study:
    """The study of ``key`` in the team's database or the home's journal, created or joined."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = os.environ.get(STORAGE_ENV)
    if url:
        storage = _database(url)
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(cache_dir("arch") / "studies.journal")))
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3) if _halving(ctx)
              else optuna.pruners.NopPruner())
    kwargs = ({"directions": ["maximize", "minimize"]} if multi_objective(ctx.search) else {"direction": "maximize"})
    return optuna.create_study(study_name=f"arch-{key}", storage=storage, sampler=make_sampler(ctx.search),
                               pruner=pruner, load_if_exists=True, **kwargs)


def _database(url: str, tries: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's storage in the team's database.  Workers that start together race to create
    its tables; the loser's CREATE fails on a duplicate, and it retries on the tables the
    winner made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def search(ctx: ArchContext, on_trial: TrialLog | None = None, say: Callable[[str], None] = print) -> SearchResult:
    """The stage, cached by its key: the result of a finished study is read back; an
    unfinished one (this home's, a crashed run's, or another node's) is joined."""
    key = ctx.key()
    path = cache_dir("arch") / f"{key}.json"
    load = lambda: SearchResult(**{**_read(path), "cached": True}) if path.is_file() else None
    return made_once(f"arch-{key}", load, lambda: _search(ctx, key, path, on_trial or (lambda r: None), say))


def _read(path) -> dict:
    import json

    return json.loads(path.read_text())


def _search(ctx: ArchContext, key: str, path, on_trial: TrialLog, say) -> SearchResult:
    start = time.perf_counter()
    study = open_study(ctx, key)
    reference = _reference(ctx, study, say)
    # Every worker's latency readings in the units of the reference's first reading (its
    # machine, its load): another worker joining the study reads on its own machine.
    ctx.costs.anchor_ms = reference["cost"].get("latency_ms") or ctx.costs.anchor_ms
    budget = Budget.of(ctx.budget, reference["cost"], ctx.search.default_budget)
    say(f"architecture search: {ctx.search.searcher}, {ctx.search.trials} trials of "
        f"{ctx.proxy.student.train.steps} steps, reward {ctx.search.reward}; budget {budget.describe()}")
    feasible = [c for c in points(ctx.search.space) if _over(ctx, budget, c) is None]
    if not feasible:  # the pre-flight check found one on an idle machine: this machine is busy now
        say(f"architecture search: no point of arch_search.space met the budget ({budget.describe()}) when measured "
            f"now; latency readings move with the machine's load: the hand-picked student stays")
    dists, asks = distributions(ctx.search.space), 0
    while _trained(study) < min(ctx.search.trials, len(feasible)) and asks < 50 * ctx.search.trials:
        asks += 1
        trial = study.ask(dists)
        candidate = decode(trial.params, ctx.search.space)
        record = _run_trial(ctx, study, trial, candidate, budget)
        if record is not None:
            on_trial(record)
            say(_line(record, _trained(study), ctx.search.trials))
    trials = [_record(t, ctx.search.space) for t in study.get_trials(deepcopy=False)
              if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "cost" in t.user_attrs]
    chosen, reason = _choose(trials, reference, budget, ctx.search.keep_p) if feasible else (
        {"arch": reference["arch"], "kwargs": reference["kwargs"]},
        f"no point of the space met the budget ({budget.describe()}) when measured: the hand-picked student stays")
    measure = _measure(budget)
    # The held-out hits stay in the study (a later worker compares with them), not in the result.
    trials = [{k: v for k, v in t.items() if k != "hits"} for t in trials]
    reference = {k: v for k, v in reference.items() if k != "hits"}
    result = SearchResult(chosen, reason, trials, reference, budget.describe(), time.perf_counter() - start,
                          measure, budget.limits.get(measure), study=study.study_name)
    write_json(path, result.as_json(), indent=1)
    return result


def _trained(study: optuna.Study) -> int:
    """Distinct candidates trained so far (by any worker): over-budget and repeated points
    cost nothing and do not count."""
    return sum(1 for t, _ in finished(study) if "repeat_of" not in t.user_attrs and not t.user_attrs.get(OVER_BUDGET))


def _over(ctx: ArchContext, budget: Budget, candidate: Candidate) -> str | None:
    cost = ctx.costs.of(candidate.model, latency=budget.needs_latency)
    if ctx.teacher_params is not None and cost["params"] > ctx.teacher_params:
        return f"params {cost['params']:,} > the teacher's {ctx.teacher_params:,} (student.must_be_smaller)"
    return budget.over(cost) if budget.mode == "hard" else None


def _run_trial(ctx: ArchContext, study: optuna.Study, trial: optuna.Trial, candidate: Candidate,
               budget: Budget) -> dict | None:
    """Train the trial's point and tell the study its reward; a point over budget or already
    trained is told at once (0, or the earlier trial's numbers) and not trained."""
    model = candidate.model
    cost = ctx.costs.of(model, latency=budget.needs_latency or _measure(budget) == "latency_ms")
    trial.set_user_attr("cost", cost)
    trial.set_user_attr("arch", model.model_dump(mode="json"))
    why = _over(ctx, budget, candidate)
    trial.set_user_attr("constraint", [0.0 if why is None else 1.0])  # nsga2's feasibility
    if why is not None:
        trial.set_user_attr(OVER_BUDGET, why)
        trial.set_user_attr("reward", 0.0)
        study.tell(trial, _values(ctx, 0.0, cost, budget))
        return None
    earlier = next((t for t, _ in finished(study) if decode(t.params, ctx.search.space) == candidate
                    and t.number != trial.number
                    and "repeat_of" not in t.user_attrs and not t.user_attrs.get(OVER_BUDGET)), None)
    if earlier is not None:
        trial.set_user_attr("repeat_of", earlier.number)
        trial.set_user_attr("reward", earlier.user_attrs.get("reward", 0.0))
        trial.set_user_attr("held_out_acc", earlier.user_attrs.get("held_out_acc", 0.0))
        study.tell(trial, _values(ctx, earlier.user_attrs.get("held_out_acc", 0.0), cost, budget))
        return None
    started = time.time()
    outcome = train_candidate(ctx, model, trial)
    reward = budget.reward(outcome["held_out_acc"], cost)
    # Who trained it and when: several workers (processes, machines) share one study.
    where = {"worker": f"{socket.gethostname()}:{os.getpid()}", "started": started, "finished": time.time()}
    for k, v in {**outcome, "reward": reward, **where}.items():
        trial.set_user_attr(k, v)
    if outcome["stopped_at"] is not None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, _values(ctx, outcome["held_out_acc"], cost, budget, reward))
    return {"number": trial.number, "candidate": candidate.name, **model.model_dump(mode="json"), "cost": cost,
            **outcome, "reward": reward}


def _values(ctx: ArchContext, acc: float, cost: dict, budget: Budget, reward: float | None = None):
    if multi_objective(ctx.search):
        return [acc, cost[_measure(budget)]]
    return reward if reward is not None else budget.reward(acc, cost)


def _measure(budget: Budget) -> str:
    """The cost the Pareto figure (and nsga2's second objective) plots: the budget's first
    limit, else MACs."""
    return next(iter(budget.limits), "macs")


def _reference(ctx: ArchContext, study: optuna.Study, say) -> dict:
    """The hand-picked student.model at the proxy budget: trained once per study (the first
    worker stores it on the study; the others read it)."""
    if "reference" in study.user_attrs:
        return study.user_attrs["reference"]
    cost = ctx.costs.of(ctx.reference, latency=ctx.needs_latency)
    outcome = train_candidate(ctx, ctx.reference)
    record = {"candidate": f"hand-picked {model_name(ctx.reference)}", **ctx.reference.model_dump(mode="json"),
              "cost": cost, **outcome}
    say(f"architecture search: the hand-picked student {model_name(ctx.reference)}: held-out "
        f"{100 * outcome['held_out_acc']:.2f}% at the proxy budget")
    study.set_user_attr("reference", record)
    return record


def _record(t, space: dict) -> dict:
    a = t.user_attrs
    return {"number": t.number, "candidate": decode(t.params, space).name, **a["arch"], "cost": a["cost"],
            "held_out_acc": a.get("held_out_acc", 0.0), "reward": a.get("reward", 0.0),
            "seconds": a.get("seconds", 0.0), "stopped_at": a.get("stopped_at"), "over_budget": a.get(OVER_BUDGET),
            "repeat_of": a.get("repeat_of"), "state": t.state.name.lower(), "hits": a.get("hits", "")}


def _choose(trials: list[dict], reference: dict, budget: Budget, keep_p: float) -> tuple[dict, str]:
    """The trained, fully run point of the highest reward (ties: the cheaper), when it beats
    the hand-picked student beyond noise; else the hand-picked student.

    Beyond noise: on the held-out images the two disagree on, the point is right more often
    than chance allows (``sign_test``, one-sided p < ``keep_p``).  Under a soft budget an
    accuracy difference within noise counts as none, and the reward compares the costs."""
    ran = [t for t in trials if t["state"] == "complete" and not t["over_budget"] and t["repeat_of"] is None]
    ref_reward = budget.reward(reference["held_out_acc"], reference["cost"])
    keep = {"arch": reference["arch"], "kwargs": reference["kwargs"]}
    if not ran:
        return keep, "no searched point finished its proxy training: the hand-picked student stays"
    measure = _measure(budget)
    best = max(ran, key=lambda t: (t["reward"], -t["cost"][measure]))
    if best["reward"] <= ref_reward:
        return keep, (f"no searched point beat the hand-picked student's reward {ref_reward:.4f} at the proxy budget "
                      f"(best: {best['candidate']}, {best['reward']:.4f}): it stays")
    wins, losses, p = sign_test(unpack_hits(best["hits"]), unpack_hits(reference["hits"]))
    test = (f"right on {wins} held-out images the hand-picked student gets wrong, wrong on {losses} it gets right: "
            f"sign test p = {p:.2g}")
    gain = best["held_out_acc"] - reference["held_out_acc"]
    if gain > 0 and p >= keep_p and budget.reward(reference["held_out_acc"], best["cost"]) <= ref_reward:
        return keep, (f"{best['candidate']} had the highest reward ({best['reward']:.4f} against the hand-picked "
                      f"student's {ref_reward:.4f}) but its held-out gain of {100 * gain:+.2f} points is within noise "
                      f"({test} >= arch_search.keep_p {keep_p:g}): the hand-picked student stays")
    return ({"arch": best["arch"], "kwargs": best["kwargs"]},
            f"highest reward {best['reward']:.4f} of {len(ran)} trained points under {budget.describe()} "
            f"(held-out {100 * best['held_out_acc']:.2f}% at the proxy budget; the hand-picked student "
            f"{100 * reference['held_out_acc']:.2f}%, reward {ref_reward:.4f}; {test})")


def _line(record: dict, done: int, total: int) -> str:
    cost = record["cost"]
    latency = f" · {cost['latency_ms'] * 1000:.0f} us" if "latency_ms" in cost else ""
    stopped = f" (stopped at step {record['stopped_at']})" if record["stopped_at"] is not None else ""
    return (f"  trial {done}/{total} {record['candidate']}: held-out {100 * record['held_out_acc']:.2f}%{stopped} · "
            f"{cost['params']:,} params · {cost['macs']:,} MACs{latency} · reward {record['reward']:.4f}")
