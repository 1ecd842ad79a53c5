"""The ``metadistill`` Prefect flow: prepare data -> prepare augmentation -> train teacher
-> improve the teacher on the transfer split -> train students -> evaluate -> register.
Thin and sequential: each task opens its child run, takes the stage's sections from the
config once (``AugmentContext``, ``TeacherContext``) and calls the stage's plain functions
(``teacher.fit``, ``teacher.improve``, ``students.fit``, ``evaluate``, ``register``).

No ``from __future__ import annotations`` here: Prefect builds the parameter model from
the real annotations when a deployment loads this flow from its entrypoint."""

import contextlib
import copy
import json
import shutil
import time

import torch
import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from deploy.cost import INT8, CostError, cost_cards
from models.cost import Cost, cost_text, flat
from models.normalize import unwrap
from models.registry import count_parameters
from models.weights import save_weights
from pipelines import data as data_stage
from pipelines import tracking
from pipelines.arch import stage as arch_stage
from pipelines.augment import search as augment_search
from pipelines.augment.search import AugmentContext
from pipelines.common.home import made_once, project_home
from pipelines.common.threads import fit_threads, joined, refit_threads
from pipelines.config.data import DataConfig
from pipelines.config.errors import ConfigError
from pipelines.config.loader import flatten
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.training import ModelConfig
from pipelines.data.prepared import Prepared, model_spec
from pipelines.engine import distributed
from pipelines.evaluate.compare import (
    Choice,
    StudentOutcome,
    choose_student,
    comparison_csv,
    comparison_markdown,
    held_out_warnings,
    paired_vs_kd,
    run_description,
    summarise,
)
from pipelines.evaluate.metrics import evaluate
from pipelines.orchestrate import launch
from pipelines.orchestrate.registration import registration_turn
from pipelines.orchestrate.worker import load_stage_output
from pipelines.register.int8 import Int8Check, check_int8, log_int8
from pipelines.register.student import champion_inputs, champion_mismatch, lineage_tags, register_student
from pipelines.students.fit import finish_student, run_student
from pipelines.teacher import improve, sources
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import TeacherOutcome, cached_teacher, load_teacher, obtain_teacher, save_teacher, teacher_spec
from pipelines.tracking import plots
from pipelines.tracking.runs import RunLogger


def _retry_on_io(task, task_run, state) -> bool:
    """Retry transient I/O failures only; missing or corrupt data fails at once."""
    try:
        state.result()
    except data_stage.DataError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def _tags() -> dict[str, str]:
    return {"prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": str(flow_run.get_name() or "")}


def _log_curve(run: RunLogger, curve: dict, title: str) -> None:
    fig = plots.learning_curve(curve, title)
    run.log_figure(fig, "learning_curve.png")
    plots.close(fig)


@task(name="prepare-data", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
def prepare_data(cfg: DataConfig, parent: RunLogger, timings: dict) -> Prepared:
    with tracking.child_run(parent, "data", _tags()) as run:
        start = time.perf_counter()
        prepared = data_stage.prepare(cfg)
        timings["data"] = time.perf_counter() - start
        run.log_params({f"data.{k}": v for k, v in cfg.model_dump(mode="json").items()})
        run.log_metrics({f"n_{k}": v for k, v in prepared.counts.items()}, step=0)
        run.set_tags({"data.key": prepared.key, "data.cached": prepared.cached, "data.storage": prepared.storage})
        labelled = {k: v for k, v in prepared.counts.items() if k not in ("transfer", "skipped_images")}
        for r in (run, parent):
            r.log_dataset(cfg.name, prepared.key, prepared.source, "training", labelled)
            if prepared.counts["transfer"]:  # inputs only: the labels were dropped at preparation
                source = prepared.source + (f" + {cfg.transfer_root}" if cfg.transfer_root else "")
                r.log_dataset(f"{cfg.name}-transfer", prepared.key, source, "transfer",
                              {"transfer": prepared.counts["transfer"]})
    get_run_logger().info("data %s: %s (cached=%s)", cfg.name, prepared.counts, prepared.cached)
    return prepared


@task(name="prepare-augmentation", cache_policy=NO_CACHE)
def prepare_augmentation(cfg: PipelineConfig, prepared: Prepared, parent: RunLogger, timings: dict) -> None:
    """The training augmentation, in its own child run: the learned policy's search (or its
    cached result), the policy JSON and its curves, and a grid of augmented examples."""
    with tracking.child_run(parent, "augmentation", _tags()) as run:
        start = time.perf_counter()
        ctx = AugmentContext.from_config(cfg, prepared)
        policy = cfg.data.augment_policy
        run.log_params({"data.augment_policy": policy, "data.augment": cfg.data.model_dump(mode="json")["augment"]})
        if augment_search.searches(cfg.data, cfg.teacher.improve):
            run.log_params({f"data.augment_search.{k}": v
                            for k, v in cfg.data.augment_search.model_dump(mode="json").items()})
            result = augment_search.learned_policy(ctx, on_log=lambda step, m: run.log_metrics(m, step))
            run.log_text(json.dumps(result.spec, indent=2), "augment_policy.json")
            run.log_metrics({"augment_search_seconds": result.seconds}, step=0)
            run.set_tags({"augment.cached": result.cached})
            if result.history.get("step"):
                fig = augment_search.history_figure(result.history, result.spec)
                run.log_figure(fig, "augment_policy_search.png")
                plots.close(fig)
            get_run_logger().info("learned augmentation policy (cached=%s): %s", result.cached,
                                  ", ".join(f"{op['name']} p={op['probability']:.2f} m={op['magnitude']:.3g}"
                                            for op in result.spec["ops"]))
        fig = augment_search.example_grid(ctx, augment_search.augmenter_for(ctx))
        run.log_figure(fig, "augmented_examples.png")
        plots.close(fig)
        timings["augmentation"] = time.perf_counter() - start


def _teacher_run_name(cfg: PipelineConfig) -> str:
    if not cfg.teacher.brought():
        return "teacher"
    return "teacher-finetune" if cfg.teacher.finetune.mode != "none" else f"teacher-{cfg.teacher.source}"


@task(name="train-teacher", cache_policy=NO_CACHE)
def train_teacher(cfg: PipelineConfig, prepared: Prepared, parent: RunLogger, timings: dict):
    """Train the teacher, or bring it (``teacher.source``) and fine-tune it; its own child run.
    Returns the teacher, its test evaluation and what the summary reports of it."""
    refit_threads()
    with tracking.child_run(parent, _teacher_run_name(cfg), _tags()) as run:
        run.log_params({k: v for k, v in flatten(cfg).items() if k.startswith("teacher.")})
        ctx = TeacherContext.from_config(cfg, prepared)  # resolves a brought teacher's weights
        if ctx.source is not None:
            for target in (run, parent):
                target.set_tags(ctx.source.lineage())
        steps = cfg.teacher.finetune.steps if cfg.teacher.brought() else cfg.teacher.train.steps
        trains = not cfg.teacher.brought() or cfg.teacher.finetune.mode != "none"
        if cfg.dist.uses_torchrun() and trains:
            outcome = made_once(f"teacher-{ctx.teacher_key}", lambda: cached_teacher(ctx.teacher_folder, prepared),
                                lambda: _teacher_under_torchrun(cfg, ctx, run))
        else:
            outcome = obtain_teacher(ctx, on_log=lambda step, m: run.log_metrics(m, step))
        start = time.perf_counter()
        ev = evaluate(outcome.model, prepared.x("test"), prepared.y("test"), prepared.num_classes)
        timings["teacher"] = outcome.seconds + time.perf_counter() - start
        run.log_metrics({**ev.metrics(), "teacher_seconds": outcome.seconds}, step=steps)
        run.set_tags({"teacher.cached": outcome.cached, "teacher.key": outcome.key})
        if outcome.result is not None:
            _log_curve(run, outcome.result.curve, _teacher_run_name(cfg))
        if cfg.tracking.register_teacher:
            _register_teacher(cfg, ctx, run, ev.accuracy, outcome.key)
    get_run_logger().info("teacher %s: test acc %.2f%% (cached=%s)", teacher_spec(ctx)["arch"],
                          100 * ev.accuracy, outcome.cached)
    return outcome.model, ev, {"arch": teacher_spec(ctx)["arch"], "test_acc": ev.accuracy, "cached": outcome.cached,
                               "train_seconds": _train_seconds(outcome)}


def _train_seconds(outcome: TeacherOutcome) -> float | None:
    """What producing the teacher cost: this run's training, or the one that cached it
    (None when that was not recorded)."""
    if outcome.train_seconds is not None:
        return outcome.train_seconds
    return None if outcome.cached else outcome.seconds


def _register_teacher(cfg: PipelineConfig, ctx: TeacherContext, run: RunLogger, accuracy: float, key: str) -> None:
    """This run's teacher as a new version of ``<experiment>-teacher`` (weights + spec, with
    its test accuracy on this split), for ``teacher.source=registry`` in later runs."""
    name, spec = f"{cfg.tracking.experiment}-teacher", teacher_spec(ctx)
    lineage = {k.replace("teacher.", "teacher_"): v for k, v in spec.get("lineage", {}).items()}
    reg = tracking.register_weights(run, ctx.teacher_folder, name,
                                    {"test_acc": f"{accuracy:.6f}", "data_key": ctx.data.key, "teacher_key": key,
                                     "arch": spec["arch"], **lineage},
                                    description="Teachers trained or adapted by metadistill")
    run.set_tags({"registered_teacher": name, "registered_teacher_version": reg.version})
    get_run_logger().info("registered teacher %s v%s (models:/%s/latest)", name, reg.version, name)


@task(name="improve-teacher", cache_policy=NO_CACHE)
def improve_teacher_task(cfg: PipelineConfig, prepared: Prepared, teacher, parent: RunLogger, timings: dict):
    """The teacher's consistency training on the transfer split (``teacher.improve``), in
    its own child run; returns the teacher the students learn from (the labelled one when
    the stage is off, there is no transfer split, or the improved one is not better on the
    held-out images beyond noise) and what the summary reports of it: its test accuracy and
    the verdict, or why the stage was skipped."""
    if not improve.improves(cfg.teacher.improve, prepared):
        info = skipped_improvement(cfg)
        get_run_logger().info("improved teacher: skipped: %s (%s)", info["skipped"], info["why"])
        return teacher, info
    refit_threads()
    with tracking.child_run(parent, "teacher-improve", _tags()) as run:
        run.log_params({k: v for k, v in flatten(cfg).items() if k.startswith("teacher.improve.")})
        start = time.perf_counter()
        ctx = TeacherContext.from_config(cfg, prepared)
        folder = ctx.improved_folder
        if cfg.dist.uses_torchrun():
            outcome = made_once(f"teacher_improved-{folder.name}", lambda: cached_teacher(folder, prepared),
                                lambda: _improve_under_torchrun(cfg, ctx, run, folder))
        else:
            outcome = improve.improve_teacher(ctx, teacher, on_log=lambda step, m: run.log_metrics(m, step))
        ev = evaluate(outcome.model, prepared.x("test"), prepared.y("test"), prepared.num_classes)
        timings["teacher_improve"] = time.perf_counter() - start
        metrics = {**ev.metrics(), "teacher_improve_seconds": outcome.seconds}
        if outcome.mask_rate is not None:
            metrics["teacher_improve_mask_rate"] = outcome.mask_rate
        run.log_metrics(metrics, step=cfg.teacher.improve.steps)
        run.set_tags({"teacher.improve.cached": outcome.cached, "teacher.improve.key": outcome.key})
        if outcome.result is not None:
            _log_curve(run, outcome.result.curve, "teacher-improve")
        verdict = improve.judge_improvement(teacher, outcome.model, prepared, cfg.teacher.improve.keep_p)
        run.log_metrics({"teacher_improve_kept": float(verdict.kept), "teacher_improve_p": verdict.p,
                         "teacher_improve_held_out_gain": verdict.improved_acc - verdict.original_acc},
                        step=cfg.teacher.improve.steps)
    get_run_logger().info("improved teacher: test acc %.2f%% (cached=%s); %s", 100 * ev.accuracy, outcome.cached,
                          verdict.reason)
    parent.log_metrics({"teacher_improved_test_acc": ev.accuracy, "teacher_improve_kept": float(verdict.kept)},
                       step=0)
    return outcome.model if verdict.kept else teacher, {
        "arch": teacher_spec(ctx)["arch"], "test_acc": ev.accuracy, "cached": outcome.cached,
        "train_seconds": _train_seconds(outcome), "mask_rate": outcome.mask_rate, "kept": verdict.kept,
        "verdict": verdict.as_json()}


def skipped_improvement(cfg: PipelineConfig) -> dict:
    """Why ``teacher.improve`` did not run: ``{"skipped", "why"}``."""
    if cfg.teacher.improve.method == "none":
        return {"skipped": "teacher.improve.method=none", "why": "the students learn from the labelled teacher"}
    why = ("data.transfer=false" if not cfg.data.transfer else
           "every labelled image is used for training: set data.label_budget, or data.transfer_root to a "
           "folder of unlabelled images")
    return {"skipped": "no transfer data", "why": why}


def _improve_under_torchrun(cfg: PipelineConfig, ctx: TeacherContext, run: RunLogger, folder) -> TeacherOutcome:
    model, result, _ = _torchrun(cfg, run, ctx.data, ["--stage", "improve", "--teacher", str(ctx.teacher_folder)])
    save_weights(unwrap(model), folder, teacher_spec(ctx))
    outcome = cached_teacher(folder, ctx.data)  # reads what the workers trained
    outcome.result, outcome.cached = result, False
    return outcome


@task(name="search-architecture", cache_policy=NO_CACHE)
def search_architecture(cfg: PipelineConfig, prepared: Prepared, teacher, parent: RunLogger,
                        timings: dict) -> tuple[PipelineConfig, dict | None]:
    """The architecture stage (``arch_search``), in its own child run with one child run per
    trial and the Pareto figure; returns the config whose ``student.model`` is the chosen
    point (every method trains it) and what the summary reports of the search."""
    if not cfg.arch_search.enabled:
        return cfg, None
    refit_threads()
    with tracking.child_run(parent, "architecture", _tags()) as run:
        run.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("arch_search.", "student.budget."))})
        with arch_stage.latency_probe(arch_stage.needs_latency(cfg.arch_search, cfg.student.budget)) as probe:
            ctx = arch_stage.ArchContext.from_config(cfg, prepared, teacher, probe)
            result = arch_stage.search(ctx, say=get_run_logger().info)
        for record in result.trials:
            if not record["over_budget"] and record["repeat_of"] is None:  # the rest cost nothing: JSON only
                _log_trial(run, record)
        fig = plots.pareto_front(result.trials, result.reference, result.chosen, result.measure, result.limit,
                                 f"{cfg.arch_search.searcher} search, reward {cfg.arch_search.reward}: {result.budget}")
        run.log_figure(fig, "pareto_front.png")
        plots.close(fig)
        run.log_text(json.dumps(result.as_json(), indent=1), "arch_search.json")
        run.log_metrics({"arch_search_seconds": result.seconds, "arch_trials": len(result.trials)}, step=0)
        chosen = f"{result.chosen['arch']} {json.dumps(result.chosen['kwargs'])}"
        for target in (run, parent):
            target.set_tags({"arch.chosen": chosen, "arch.cached": result.cached})
        run.set_tags({"arch.reason": result.reason, "arch.study": result.study})
    timings["architecture"] = 0.0 if result.cached else result.seconds
    get_run_logger().info("architecture: %s (%s)", chosen, result.reason)
    searched = cfg.model_copy(deep=True)
    searched.student.model = ModelConfig(**result.chosen)
    return searched, {"chosen": result.chosen, "reason": result.reason, "budget": result.budget,
                      "searcher": cfg.arch_search.searcher, "reward": cfg.arch_search.reward,
                      "trials": len(result.trials), "seconds": result.seconds, "cached": result.cached,
                      "hand_picked": {k: result.reference[k] for k in ("arch", "kwargs", "held_out_acc")}}


def _log_trial(run: RunLogger, record: dict) -> None:
    """One child run per trial: the point, its cost, its held-out accuracy and reward."""
    with tracking.child_run(run, f"trial/{record['number']}", {**_tags(), "state": record["state"]}) as child:
        child.log_params({"arch": record["arch"], "kwargs": json.dumps(record["kwargs"]),
                          "candidate": record["candidate"]})
        child.log_metrics({"held_out_acc": record["held_out_acc"], "reward": record["reward"],
                           "seconds": record["seconds"], **{f"cost.{k}": v for k, v in record["cost"].items()}},
                          step=0)
        if record.get("over_budget"):
            child.set_tags({"over_budget": record["over_budget"]})


def student_teacher_folder(cfg: PipelineConfig, prepared: Prepared):
    """Where the teacher the students learn from is saved (for torchrun workers)."""
    ctx = TeacherContext.from_config(cfg, prepared)
    return ctx.improved_folder if improve.improves(ctx.teacher.improve, prepared) else ctx.teacher_folder


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(cfg: PipelineConfig, prepared: Prepared, teacher, method: str, seed: int,
                  parent: RunLogger, timings: dict) -> StudentOutcome:
    tags = {**_tags(), "method": method, "seed": str(seed)}
    with on_own_stream(prepared.device), tracking.child_run(parent, f"student/{method}/seed{seed}", tags) as run:
        run.log_params({"method": method, "seed": seed, "device": str(prepared.device)})
        init = sources.student_source(cfg.student, prepared.input_shape)
        if init is not None:
            sources.check_init(init, "student.model", cfg.student.model.arch, cfg.student.model.kwargs,
                               prepared.input_shape)
            run.set_tags(init.lineage())
        if cfg.dist.uses_torchrun():
            model, result, learned_teacher = _torchrun(
                cfg, run, prepared, ["--stage", "student", "--method", method, "--seed", str(seed),
                                     "--teacher", str(student_teacher_folder(cfg, prepared)),
                                     *(["--init", str(init.folder)] if init else [])])
            outcome = finish_student(method, seed, model, result, prepared, learned_teacher)
        else:
            outcome = run_student(method, cfg, prepared, teacher, seed,
                                           on_log=lambda step, m: run.log_metrics(m, step), init=init)
        run.log_metrics({**outcome.evaluation.metrics(), "val_acc_final": outcome.val_acc},
                        step=cfg.student.train.steps)
        _log_curve(run, outcome.result.curve, f"{method} (seed {seed})")
        if outcome.learned_teacher is not None:
            _log_learned_teacher(run, outcome.learned_teacher, cfg, prepared)
        outcome.run_id = run.run_id
    get_run_logger().info("student %s seed %d: test acc %.2f%%", method, seed, 100 * outcome.evaluation.accuracy)
    return outcome


@contextlib.contextmanager
def on_own_stream(device: torch.device):
    """On CUDA, this thread's work goes to a stream of its own on ``device``, so students
    sharing a GPU overlap their kernels; it starts after the work queued so far (the data,
    the teacher) and is finished when the block ends (the flow reads the results)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.default_stream(device))
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()


def student_concurrency(cfg: PipelineConfig, device: torch.device) -> int:
    """``student.concurrency``, or its default: one student per GPU when training on CUDA in
    this process, else one at a time (a torchrun stage already uses all its processes)."""
    if cfg.student.concurrency is not None:
        return cfg.student.concurrency
    if cfg.dist.uses_torchrun() or device.type != "cuda":
        return 1
    return torch.cuda.device_count()


def student_sweep(cfg: PipelineConfig, prepared: Prepared, teacher, parent: RunLogger,
                  timings: dict) -> tuple[list[StudentOutcome], float]:
    """Every (method, seed) student, ``student_concurrency`` at a time through a Prefect
    thread-pool task runner: job i on GPU i mod #GPUs with its own copy of the data and
    teacher, or on the CPU with its share of the cores.  Every draw is seeded per student,
    so the outcomes equal the sequential sweep's, seed for seed.  Returns them and the
    sweep's wall seconds."""
    jobs = [(method, seed) for method in cfg.student.methods for seed in cfg.student.seeds]
    workers = min(student_concurrency(cfg, prepared.device), len(jobs))
    start = time.perf_counter()
    if workers == 1:
        outcomes = []
        for method, seed in jobs:
            refit_threads()  # runs on this home may have come or gone since the last student
            outcomes.append(train_student(cfg, prepared, teacher, method, seed, parent, timings))
    else:
        gpus = torch.cuda.device_count() if prepared.device.type == "cuda" else 0
        devices = [torch.device("cuda", i) for i in range(gpus)] or [prepared.device]
        copies = {d: (prepared, teacher) if d == prepared.device else
                  (data_stage.place(prepared, d), copy.deepcopy(teacher).to(d)) for d in devices[:workers]}
        threads = refit_threads()
        if not gpus:
            torch.set_num_threads(max(1, threads // workers))  # each student its share of the cores
        try:
            with ThreadPoolTaskRunner(max_workers=workers) as runner:
                futures = [runner.submit(train_student, {
                    "cfg": cfg, "prepared": copies[devices[i % len(copies)]][0],
                    "teacher": copies[devices[i % len(copies)]][1], "method": method, "seed": seed,
                    "parent": parent, "timings": timings}) for i, (method, seed) in enumerate(jobs)]
                outcomes = [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)
    timings["students"] = sum(o.result.seconds for o in outcomes)  # compute, as for the other stages
    wall = time.perf_counter() - start
    parent.log_metrics({"student_concurrency": workers, "students_wall_seconds": wall}, step=0)
    return outcomes, wall


def _torchrun(cfg: PipelineConfig, run: RunLogger, prepared: Prepared, stage_args: list[str]):
    """Run a stage as torchrun workers, rank 0 logging into ``run``; returns what rank 0
    left (model, curves, learned teacher).  The work folder is removed on success and
    kept, with its checkpoints, when the stage fails."""
    workdir = project_home() / "cache" / "stages" / run.run_id
    run.set_tags({"dist.world_size": cfg.dist.nnodes * cfg.dist.procs_per_node(), "dist.workdir": str(workdir)})
    launch.run_torchrun(cfg, workdir, [*stage_args, "--run-id", run.run_id], get_run_logger().info)
    output = load_stage_output(workdir, prepared)
    shutil.rmtree(workdir)
    return output


def _teacher_under_torchrun(cfg: PipelineConfig, ctx: TeacherContext, run: RunLogger) -> TeacherOutcome:
    start = time.perf_counter()
    model, result, _ = _torchrun(cfg, run, ctx.data, ["--stage", "teacher",
                                                      *(["--source", str(ctx.source.folder)] if ctx.source else [])])
    save_teacher(model, ctx)
    model = load_teacher(ctx.teacher_folder, ctx.data)
    return TeacherOutcome(model, result, ctx.teacher_key, time.perf_counter() - start)


def cfg_methods(outcomes: list[StudentOutcome]) -> list[str]:
    return list(dict.fromkeys(o.method for o in outcomes))


def _log_learned_teacher(run: RunLogger, teacher, cfg: PipelineConfig, prepared: Prepared) -> None:
    """The teacher after meta-training: its test metrics and its weights (safetensors)."""
    ev = evaluate(teacher, prepared.x("test"), prepared.y("test"), prepared.num_classes)
    run.log_metrics({f"learned_teacher_{k}": v for k, v in ev.metrics().items() if "class" not in k},
                    step=cfg.student.train.steps)
    folder = project_home() / "cache" / "staging" / f"{run.run_id}-teacher"
    save_weights(unwrap(teacher), folder, teacher_spec(TeacherContext.from_config(cfg, prepared)))
    run.log_artifact(folder / "model.safetensors", "learned_teacher")
    run.log_artifact(folder / "spec.json", "learned_teacher")


@task(name="evaluate", cache_policy=NO_CACHE)
def compare(outcomes: list[StudentOutcome], class_names: list[str], parent: RunLogger) -> list[dict]:
    rows = summarise(outcomes)
    vs_kd = paired_vs_kd(outcomes)  # each teacher-based method against plain kd, seed for seed
    for r in rows:
        if r["method"] in vs_kd:
            r["vs_kd"] = vs_kd[r["method"]]
    with tracking.child_run(parent, "evaluate", _tags()) as run:
        for method in cfg_methods(outcomes):
            best = max((o for o in outcomes if o.method == method), key=lambda o: o.val_acc)
            fig = plots.confusion_matrix(best.evaluation.confusion, class_names,
                                         f"{method} (seed {best.seed}, best on validation)")
            run.log_figure(fig, f"confusion_matrix_{method}.png")
            plots.close(fig)
        for target in (run, parent):
            target.log_text(comparison_markdown(rows), "comparison.md")
            target.log_text(comparison_csv(rows), "comparison.csv")
        fig = plots.comparison_bars(rows, "test accuracy by method (mean ± std over seeds)")
        run.log_figure(fig, "comparison.png")
        parent.log_figure(fig, "comparison.png")
        plots.close(fig)
        metrics = {}
        for r in rows:
            metrics.update({f"{r['method']}_test_acc_mean": r["test_acc"], f"{r['method']}_test_acc_std": r["test_acc_std"],
                            f"{r['method']}_test_loss": r["test_loss"]})
        run.log_metrics(metrics, step=0)
        parent.log_metrics(metrics, step=0)
    return rows


@task(name="cost-card", cache_policy=NO_CACHE)
def measure_costs(cfg: PipelineConfig, prepared: Prepared, teacher, student: StudentOutcome, parent: RunLogger,
                  int8: Int8Check | None = None) -> tuple[Cost | None, Cost | None]:
    """The cost cards of the students' architecture (every method shares it: ``student``'s
    weights stand for all) and of the teacher, from saved weights folders, in a process of
    their own on one thread; logged on the parent run as ``student_cost.*`` and
    ``teacher_cost.*``.  A card that cannot be measured is None and a warning: it never
    fails a run whose training is done."""
    folder = project_home() / "cache" / "staging" / f"{parent.run_id}-cost"
    save_weights(unwrap(student.model), folder / "student",
                 model_spec(cfg.student.model.arch, cfg.student.model.kwargs, prepared))
    save_weights(unwrap(teacher), folder / "teacher", teacher_spec(TeacherContext.from_config(cfg, prepared)))
    start = time.perf_counter()
    try:
        kept = int8 is not None and int8.kept
        cards = cost_cards([folder / "student", folder / "teacher", *([f"{INT8}{folder / 'student'}"] if kept else [])])
    except CostError as exc:
        get_run_logger().warning("no cost card: %s", exc)
        return None, None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if len(cards) == 3:
        int8.cost = cards.pop()
        parent.log_metrics({f"student_int8_{key}": value for key, value in flat(int8.cost).items()}, step=0)
    for who, card in zip(("student", "teacher"), cards):
        parent.log_metrics({f"{who}_{key}": value for key, value in flat(card).items()}, step=0)
        get_run_logger().info("%s cost: %s", who, cost_text(card))
    get_run_logger().info("cost cards measured in %.1f s (one thread, a process of their own)",
                          time.perf_counter() - start)
    return cards[0], cards[1]


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: PipelineConfig, prepared: Prepared, choice: Choice, parent: RunLogger,
             cost: Cost | None = None, int8: Int8Check | None = None) -> tuple[dict, dict | None]:
    """The new version (name, version, alias, reason) and its int8 check (None: no int8 step)."""
    model_name = f"{cfg.tracking.experiment}-student"
    with registration_turn(model_name), tracking.child_run(parent, "register", _tags()) as run:
        spec = model_spec(cfg.student.model.arch, cfg.student.model.kwargs, prepared)
        champion = tracking.current_champion(model_name)
        ctx = TeacherContext.from_config(cfg, prepared)
        lineage = lineage_tags(cfg.teacher.source, ctx.teacher_key,
                               [ctx.source, sources.student_source(cfg.student, prepared.input_shape)], champion)
        reg, decision = register_student(run, parent.run_id, model_name, choice, prepared, spec, lineage, champion,
                                         cfg.tracking, cost, cfg.student.budget, int8)
        run.set_tags({"registered_model": model_name, "registered_version": reg.version, "alias": reg.alias})
        log_int8(run, int8)
    get_run_logger().info("registered %s v%s as %s: %s", model_name, reg.version, reg.alias, decision.reason)
    if int8 is not None:
        get_run_logger().info("int8 variant %s: %s", "kept" if int8.kept else "not kept", int8.reason)
    registered = {"name": reg.name, "version": reg.version, "alias": reg.alias, "reason": decision.reason}
    return registered, None if int8 is None else int8.summary()


def check_champion_takes(cfg: PipelineConfig, prepared: Prepared) -> None:
    """The champion takes this data's inputs and classes, checked once the data is read, so a
    scheduled run (which no CLI pre-flight check saw) stops here and not after all the training."""
    model_name = f"{cfg.tracking.experiment}-student"
    if cfg.tracking.register_best and (champion := champion_inputs(model_name)) is not None:
        why = champion_mismatch(champion, model_name, prepared.input_shape, prepared.num_classes, prepared.class_names)
        if why is not None:
            raise ConfigError(why)


def run_summary(cfg: PipelineConfig, prepared: Prepared, rows: list[dict], outcomes: list[StudentOutcome],
                students_wall: float, choice: Choice | None, student_cost: Cost | None) -> dict:
    """What the summary says of the students, the data and the device."""
    student = cfg.student.model.model_dump(mode="json")
    return {
        "methods": {r["method"]: {k: r[k] for k in ("test_acc", "test_acc_std", "test_loss", "train_seconds", "seeds",
                                                    "vs_kd") if k in r}
                    for r in rows},
        "students": [{"method": o.method, "seed": o.seed, "test_acc": o.evaluation.accuracy,
                      "test_loss": o.evaluation.loss, "val_acc": o.val_acc, "train_seconds": o.result.seconds,
                      "val_loss": o.val_loss}
                     for o in outcomes],
        "device": str(prepared.device), "student_concurrency": student_concurrency(cfg, prepared.device),
        "students_wall_seconds": students_wall,
        "chosen": None if choice is None else {"method": choice.outcome.method, "seed": choice.outcome.seed,
                                               "reason": choice.reason},
        "student_arch": student["arch"],
        "student_model": {"arch": student["arch"], "kwargs": student["kwargs"],
                          "parameters": count_parameters(unwrap(outcomes[0].model)), "cost": student_cost},
        "held_out": {k: prepared.counts.get(k, 0) for k in ("train", "quiz", "val", "test", "transfer")},
        "warnings": held_out_warnings(prepared.counts), "data_cached": prepared.cached}


@flow(name="metadistill", log_prints=True)
def metadistill_flow(config: PipelineConfig) -> dict:
    """Prepare data, train the teacher and every student method over seeds, compare them
    on the test split, and register the best student."""
    cfg = config
    if deployment.id and not joined():  # started by a worker, not the CLI: fit the threads as it does
        get_run_logger().info("intra-op threads: %d (%s)", *fit_threads(cfg.dist.threads))
    timings: dict[str, float] = {}
    run_name = f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.pipeline_run(cfg.tracking.experiment, run_name, {**_tags(), "preset": cfg.preset}) as parent:
        parent.log_params(flatten(cfg))
        parent.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        prepared = data_stage.place(prepare_data(cfg.data, parent, timings), distributed.device(cfg.dist.device))
        parent.set_tags({"dist.device": str(prepared.device)})
        check_champion_takes(cfg, prepared)
        prepare_augmentation(cfg, prepared, parent, timings)
        teacher, teacher_eval, teacher_info = train_teacher(cfg, prepared, parent, timings)
        teacher, improved_info = improve_teacher_task(cfg, prepared, teacher, parent, timings)
        cfg, arch_info = search_architecture(cfg, prepared, teacher, parent, timings)
        outcomes, students_wall = student_sweep(cfg, prepared, teacher, parent, timings)
        rows = compare(outcomes, prepared.class_names, parent)
        registered, choice, int8 = None, None, None
        if cfg.tracking.register_best:
            choice = choose_student(outcomes)
            get_run_logger().info("chosen: %s seed %d (%s)", choice.outcome.method, choice.outcome.seed, choice.reason)
        int8_check = None if choice is None else check_int8(choice.outcome, prepared, cfg.tracking.int8_max_drop)
        student_cost, teacher_info["cost"] = (None, None) if not cfg.tracking.cost_card else measure_costs(
            cfg, prepared, teacher, choice.outcome if choice else outcomes[0], parent, int8_check)
        if choice is not None:
            registered, int8 = register(cfg, prepared, choice, parent, student_cost, int8_check)
        headline = {"teacher_test_acc": teacher_eval.accuracy}
        if choice is not None:
            headline.update(chosen_test_acc=choice.outcome.evaluation.accuracy, chosen_val_acc=choice.outcome.val_acc)
        parent.log_metrics(headline, step=0)
        summary = {
            "mlflow_run_id": parent.run_id, "experiment": cfg.tracking.experiment,
            **run_summary(cfg, prepared, rows, outcomes, students_wall, choice, student_cost),
            "registered_model": registered, "int8": int8, "teacher_test_acc": teacher_eval.accuracy,
            "teacher_arch": teacher_info["arch"], "teacher": teacher_info, "teacher_improved": improved_info,
            "architecture": arch_info, "timings": timings}
        parent.set_description(run_description(summary, rows))
    return summary
