"""Few-shot evaluation on Omniglot: meta-train on background characters (one model per
number of ways), test on evaluation characters over fixed tasks, and score the 20
one-shot runs of Lake et al.  Everything is logged to MLflow."""

from __future__ import annotations

import time

import torch

from meta.tasks import TaskSampler
from models.registry import build_model
from pipelines import tracking
from pipelines.config.errors import ConfigError
from pipelines.config.pipeline import PipelineConfig
from pipelines.data.errors import DataError
from pipelines.data.omniglot import load_characters, load_lake_runs
from pipelines.data.readers import resolve_root
from pipelines.engine import distributed
from pipelines.engine.meta_loop import evaluate_tasks, meta_train
from pipelines.teacher.sources import WeightsSource, check_init, init_source, start_from
from pipelines.tracking import plots


def _root(cfg: PipelineConfig):
    if cfg.data.storage == "stream":
        raise ConfigError("metadistill fewshot reads Omniglot's characters into memory (about 100 MB as float32); "
                          "data.storage=stream applies to `metadistill run`: leave data.storage at auto or memory")
    root = resolve_root(cfg.data)
    if root is None:
        raise DataError("fewshot needs the Omniglot data: pass --set data.root=PATH or set METADISTILL_DATA")
    return root


OMNIGLOT_SHAPE = (1, 28, 28)


def fewshot_init(cfg: PipelineConfig) -> WeightsSource | None:
    """``fewshot.init``'s weights, resolved and checked against ``fewshot.model``."""
    fs = cfg.fewshot
    source = init_source("fewshot.init", fs.init, fs.init_uri, fs.model.arch, OMNIGLOT_SHAPE)
    if source is not None:
        check_init(source, "fewshot.model", fs.model.arch, fs.model.kwargs, OMNIGLOT_SHAPE)
    return source


def run_fewshot(cfg: PipelineConfig, experiment: str | None = None) -> dict:
    fs, root = cfg.fewshot, _root(cfg)
    background, _, _ = load_characters(root, "background")
    evaluation, _, _ = load_characters(root, "evaluation")
    background, evaluation = torch.from_numpy(background), torch.from_numpy(evaluation)
    results: dict[str, dict] = {}
    experiment = experiment or f"{cfg.tracking.experiment}-fewshot"
    init = fewshot_init(cfg)
    with tracking.pipeline_run(experiment, f"fewshot-{fs.meta.algorithm}", {"kind": "fewshot"}) as parent:
        parent.log_params({f"fewshot.{k}": v for k, v in fs.model_dump(mode="json").items()})
        if init is not None:
            parent.set_tags(init.lineage())
        for ways in fs.train_ways:
            results.update(_one_model(cfg, ways, background, evaluation, root, parent, init))
        parent.log_metrics({f"{k}_acc": v["acc"] for k, v in results.items()}, step=0)
        parent.log_text(_table(results), "fewshot.md")
    return {"mlflow_run_id": parent.run_id, "experiment": experiment, "results": results}


def _one_model(cfg: PipelineConfig, ways: int, background, evaluation, root, parent, init: WeightsSource | None) -> dict:
    fs = cfg.fewshot
    meta = fs.meta.model_copy(update={"ways": ways})
    torch.manual_seed(fs.seed)
    if init is not None:  # pretrained first, then meta-trained (a new head for the ways)
        model = start_from(init, ways, fs.seed)[0]
    else:
        model = build_model(fs.model.arch, OMNIGLOT_SHAPE, ways, **fs.model.kwargs)
    model = model.to(distributed.device(cfg.dist.device))
    sampler = TaskSampler(background, ways, meta.shots, meta.queries, rotations=meta.rotations)
    out = {}
    with tracking.child_run(parent, f"meta-train/{ways}-way-{meta.shots}-shot") as run:
        run.log_params({f"meta.{k}": v for k, v in meta.model_dump(mode="json").items()})
        result = meta_train(model, sampler, meta, seed=fs.seed, on_log=lambda s, m: run.log_metrics(m, s),
                            desc=f"{meta.algorithm} {ways}-way")
        run.log_metrics({"meta_seconds": result.seconds, "meta_steps": result.steps,
                         "tasks_per_second": result.tasks / max(result.seconds, 1e-9)}, step=result.steps)
        fig = plots.learning_curve({"train_loss": result.curve["meta_query_loss"],
                                    "train_acc": result.curve["meta_query_acc"]}, f"{ways}-way meta-training")
        run.log_figure(fig, "meta_curve.png")
        plots.close(fig)
        steps = meta.eval_inner_steps if meta.eval_inner_steps is not None else meta.inner_steps
        for shots in fs.eval_shots:
            tasks = TaskSampler(evaluation, ways, shots, fs.eval_queries).fixed(fs.eval_tasks, seed=1000 + shots)
            start = time.perf_counter()
            acc, ci = evaluate_tasks(model, tasks, steps, meta.inner_lr, result.lrs)
            key = f"{ways}way_{shots}shot"
            out[key] = {"acc": acc, "ci95": ci, "tasks": fs.eval_tasks, "meta_seconds": result.seconds,
                        "meta_steps": result.steps, "eval_seconds": time.perf_counter() - start}
            run.log_metrics({f"{key}_acc": acc, f"{key}_ci95": ci}, step=result.steps)
        if ways == 20 and fs.lake_runs:
            runs = load_lake_runs(root)
            tasks = tuple(torch.stack(parts) for parts in zip(*runs))
            acc, ci = evaluate_tasks(model, tasks, steps, meta.inner_lr, result.lrs)
            out["lake_20way_1shot"] = {"acc": acc, "ci95": ci, "tasks": len(runs), "meta_seconds": result.seconds,
                                       "meta_steps": result.steps}
            run.log_metrics({"lake_20way_1shot_acc": acc}, step=result.steps)
    return out


def _table(results: dict) -> str:
    lines = ["| setting | accuracy | ±95% CI | tasks | meta-training s | meta steps |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {100 * v['acc']:.2f}% | {100 * v['ci95']:.2f} | {v['tasks']} | {v['meta_seconds']:.0f} | "
              f"{v['meta_steps']} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"
