"""``metadistill`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_CONFIG = 2
VARIANTS = ("float", "int8")  # deploy.registry.VARIANTS, spelled out so that --help imports no torch
VARIANT_HELP = ("float (default), or int8: the nn.Linear layers quantized to int8, convolutions left float; only for "
                "a version whose run kept its int8 variant (tag int8.kept)")


def _prepare_env() -> None:
    """Defaults that must be in place before Prefect is imported."""
    from pipelines.common.home import project_home

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(project_home() / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # A tracking server that stops answering fails the stage within seconds, not MLflow's
    # default of 7 retries (about 4 minutes of back-off).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from pipelines.config.presets import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named preset (default: digits; imagefolder when data.name=imagefolder)")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set student.train.steps=500 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metadistill",
        description="Distil a small student from a teacher, compare student methods side by side, "
                    "track everything in MLflow and register the best student.",
        epilog="Artifacts live under $METADISTILL_HOME (default ./.metadistill); "
               "MLFLOW_TRACKING_URI and PREFECT_API_URL are respected when set.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _pipeline_commands(sub)
    _schedule_commands(sub)
    _registry_commands(sub)
    return parser


def _pipeline_commands(sub) -> None:
    """``run``, ``fewshot`` and ``config``: the commands that take a configuration."""
    run = sub.add_parser("run", help="run the pipeline once and print the method comparison",
                         description="Run the metadistill Prefect flow: prepare data, train the teacher, "
                                     "train every student method over seeds, evaluate, register the best.")
    _add_config_args(run)
    run.add_argument("--summary", metavar="PATH", help="write the run summary as JSON to PATH")

    few = sub.add_parser("fewshot", help="meta-train on Omniglot background characters, report few-shot accuracy",
                         description="Meta-learn a conv4 initialisation (MAML family, fewshot.* settings) on "
                                     "Omniglot background characters; report N-way K-shot accuracy on evaluation "
                                     "characters over fixed tasks (mean ± 95% CI) and the 20 runs of Lake et al.")
    _add_config_args(few)
    few.add_argument("--summary", metavar="PATH", help="write the results as JSON to PATH")

    show = sub.add_parser("config", help="print the resolved configuration (validated), or explain a key, and exit",
                          description="Resolve preset + --config + --set, validate, print as YAML. With --explain "
                                      "KEY: that key's type, default, allowed values and description, or every "
                                      "key of a section (the docs' configuration reference, from the schema).")
    _add_config_args(show)
    show.add_argument("--explain", metavar="KEY", help="explain one key (kd.temperature) or a whole section "
                                                       "(meta_distill.guard); with --preset/--config/--set, "
                                                       "also its value there")



def _schedule_commands(sub) -> None:
    """``schedule``, ``trigger`` and ``server``: Prefect deployments and their server."""
    sch = sub.add_parser("schedule", help="create/update a scheduled deployment of the pipeline and serve it",
                         description="Create or update the Prefect deployment metadistill/NAME with a cron or "
                                     "interval schedule and this configuration, then serve it from this process "
                                     "(or, with --work-pool, deploy it to a process work pool). Needs a Prefect "
                                     "server: see `metadistill server`.")
    _add_config_args(sch)
    when = sch.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *"')
    when.add_argument("--interval", type=float, help="seconds between runs")
    sch.add_argument("--name", default="default", help="deployment name (default: default)")
    sch.add_argument("--work-pool", help="deploy to this process work pool instead of serving here")

    trg = sub.add_parser("trigger", help="run a deployment now (with --set overrides) and wait for it")
    trg.add_argument("--name", default="default")
    trg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    trg.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: until done)")

    psrv = sub.add_parser("server", help="start the local Prefect server (database under the project home)",
                          description="Run `prefect server start` with PREFECT_HOME under the project home "
                                      "(SQLite). Teams point PREFECT_SERVER_DATABASE_CONNECTION_URL at PostgreSQL.")
    psrv.add_argument("--host", default="127.0.0.1")
    psrv.add_argument("--port", type=int, default=4200)

    svc = sub.add_parser("services", help="start a team's servers: PostgreSQL, MLflow and Prefect on it",
                         description="Start PostgreSQL (a cluster under the project home, loopback only), the "
                                     "MLflow tracking server on it with --serve-artifacts, and the Prefect server "
                                     "on it; print the variables a node sets; stop all three on Ctrl-C. "
                                     "README: Team set-up.")
    svc.add_argument("--host", default="127.0.0.1",
                     help="bind address of the MLflow and Prefect servers (default 127.0.0.1: this machine only)")
    svc.add_argument("--pg-port", type=int, default=5433)
    svc.add_argument("--mlflow-port", type=int, default=5000)
    svc.add_argument("--prefect-port", type=int, default=4200)
    svc.add_argument("--pg-user", default="postgres", help="who runs PostgreSQL when this command runs as root")
    svc.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                     help="MLflow's basic-auth app and Prefect's auth string (default: on when --host is not "
                          "loopback; --no-auth is refused there)")
    svc.add_argument("--advertise", help="the address other machines reach the servers by (default: --host, or "
                                         "this machine's name when --host is 0.0.0.0)")



def _registry_commands(sub) -> None:
    """``serve``, ``promote``, ``rollback``, ``export`` and ``ui``: the registered students."""
    srv = sub.add_parser("serve", help="serve a registered student over HTTP",
                         description="Serve NAME@ALIAS (weights only, no unpickling): POST /predict, POST "
                                     "/invocations (MLflow protocol), GET /health, /ready, /metadata. "
                                     "Micro-batches concurrent requests; picks up a new alias holder by "
                                     "polling the registry or on SIGHUP.")
    srv.add_argument("--model", help="registered model name (default: metadistill-digits-student)")
    srv.add_argument("--alias", default="champion")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--workers", type=int, default=1)
    srv.add_argument("--max-batch", type=int, default=64, help="rows per micro-batch")
    srv.add_argument("--max-wait-ms", type=float, default=1.0, help="wait for more requests to batch")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    srv.add_argument("--max-instances", type=int, default=256, help="rows per request")
    srv.add_argument("--poll-seconds", type=float, default=30.0, help="registry polling (0: only on SIGHUP)")
    srv.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where forward passes run (default cpu; cuda: the first GPU)")
    srv.add_argument("--variant", default="float", choices=VARIANTS, help=VARIANT_HELP)
    srv.add_argument("--token-file", help="a file (mode 600) holding the bearer token every route but /health asks "
                                          "for; required to bind beyond 127.0.0.1")

    prom = sub.add_parser("promote", help="make VERSION the champion (old champion becomes challenger)")
    prom.add_argument("version")
    prom.add_argument("--model", help="registered model name (default: metadistill-digits-student)")
    prom.add_argument("--reason", default="", help="why; recorded in the version's tags")
    back = sub.add_parser("rollback", help="move champion back to the previous champion")
    back.add_argument("--model", help="registered model name (default: metadistill-digits-student)")
    back.add_argument("--reason", default="")

    exp = sub.add_parser("export", help="export a registered student as TorchScript or ONNX",
                         description="Write NAME@ALIAS as TorchScript or ONNX (normalisation included: "
                                     "the exported graph takes raw [0, 1] pixels).")
    exp.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    exp.add_argument("--model", help="registered model name (default: metadistill-digits-student)")
    exp.add_argument("--alias", default="champion")
    exp.add_argument("--out", required=True, help="output file")
    exp.add_argument("--variant", default="float", choices=VARIANTS,
                     help=VARIANT_HELP + " (TorchScript only)")

    ui = sub.add_parser("ui", help="start the MLflow UI over the project's store on 127.0.0.1",
                        description="Serve the MLflow UI over the project's tracking store and registry.")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")


def _load(args):
    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config

    try:
        return load_config(args.preset, args.config, args.overrides)
    except ConfigError as exc:
        print(f"metadistill: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _fit_threads(cfg, sample=None) -> int:
    """Intra-op threads of this process (see common.threads.fit_threads), said once."""
    from pipelines.common.threads import fit_threads

    threads, why = fit_threads(cfg.dist.threads, sample)
    print(f"metadistill uses {threads} intra-op thread(s) ({why}; --set dist.threads=N to choose)", file=sys.stderr)
    return threads


def _print_table(summary: dict) -> None:
    """The run's table (teachers, then one row per method), under it the students' network
    (and its search), its cost, the choice, the registration, any warnings and what to do
    next.  Full width when stdout is not a terminal (a log, a pipe): no header is cut."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from pipelines.evaluate.compare import network_lines, vs_kd_text

    methods = summary["methods"]
    delta = any("vs_kd" in m for m in methods.values())
    table = Table(title=f"metadistill · {summary['experiment']} · run {summary['mlflow_run_id']}")
    columns = ("model", "test acc % (mean ± std)", "test loss", "train s", "seeds") + (
        ("Δ vs kd, points (95% CI)",) if delta else ())
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    pad = ("",) * (len(columns) - 5)
    improved = summary.get("teacher_improved")
    if summary.get("teacher_test_acc") is not None:
        teacher = summary.get("teacher") or {}
        table.add_row(f"teacher ({summary.get('teacher_arch', '')})".replace(" ()", ""),
                      f"{100 * summary['teacher_test_acc']:.2f}", "",
                      _train_s(teacher, summary["timings"].get("teacher", 0)), "1", *pad, end_section=not improved)
    if improved and "test_acc" in improved:
        table.add_row(f"teacher improved ({improved.get('arch', '')})".replace(" ()", ""),
                      f"{100 * improved['test_acc']:.2f}", "",
                      _train_s(improved, summary["timings"].get("teacher_improve", 0)), "1", *pad, end_section=True)
    elif improved:
        table.add_row(f"teacher improved (skipped: {improved['skipped']})", "", "", "", "", *pad, end_section=True)
    for name, m in methods.items():
        spread = f" ± {100 * m['test_acc_std']:.2f}" if m["seeds"] > 1 else ""  # no spread from one seed
        cells = (f"{100 * m['test_acc']:.2f}{spread}", f"{m['test_loss']:.4f}", f"{m['train_seconds']:.1f}", str(m["seeds"]))
        table.add_row(name, *cells, *((vs_kd_text(m.get("vs_kd")) or ("baseline" if name == "kd" else ""),) if delta else ()))
    console = Console(width=None if sys.stdout.isatty() else max(200, int(os.environ.get("COLUMNS") or 0)))
    console.print(table)
    if line := improvement_line(improved):
        console.print(escape(line), soft_wrap=True)
    for line in network_lines(summary):  # the cost card: docs/operating.md#the-cost-card
        console.print(escape(line), soft_wrap=True)
    if chosen := summary.get("chosen"):
        console.print(f"chosen: [bold]{chosen['method']}[/] seed {chosen['seed']}: {escape(chosen['reason'])}")
    reg = summary.get("registered_model")
    if reg:
        console.print(f"registered [bold]{reg['name']}[/] v{reg['version']} as [bold]{reg['alias']}[/]: {escape(reg['reason'])}")
    if reg and (int8 := summary.get("int8")):
        console.print(escape(int8_text(int8)))
    for warning in summary.get("warnings") or []:
        console.print(escape(f"warning: {warning}"))
    if reg and reg["alias"] == "challenger":
        console.print(escape(f"this run's v{reg['version']} is the challenger (serve and export use the champion): "
                             f"add --alias challenger to try it, or make it the champion with "
                             f"metadistill promote {reg['version']} --model {reg['name']}"))
    steps = ["metadistill ui  (runs, curves, the parent run's description)"]
    if reg:
        steps += [f"metadistill serve --model {reg['name']}",
                  f"metadistill export --format onnx --model {reg['name']} --out student.onnx"]
    console.print(escape("next: " + "  ·  ".join(steps)), soft_wrap=True)


def improvement_line(improved: dict | None) -> str | None:
    """Under the table: why the improvement stage was skipped, or whether its teacher
    replaced the original (the held-out verdict)."""
    if improved and improved.get("why") and improved.get("skipped") == "no transfer data":
        return f"teacher improvement skipped: {improved['why']}"
    if improved and "verdict" in improved:
        return f"teacher: {improved['verdict']['reason']}"
    return None


def int8_text(int8: dict) -> str:
    """The registered version's int8 variant in one line: kept or not, and why (accuracies, file sizes)."""
    verdict = "kept (serve or export it with --variant int8)" if int8["kept"] else "not kept"
    from models.cost import cost_text

    card = f"; int8 cost: {cost_text(int8['cost'])}" if int8.get("cost") else ""
    return f"int8 variant {verdict}: {int8['reason']}{card}"


def _train_s(teacher: dict, seconds: float) -> str:
    """A teacher's "train s": what training it cost, marked "(cached)" when this run reused it."""
    if not teacher.get("cached"):
        return f"{seconds:.1f}"
    return "(cached)" if teacher.get("train_seconds") is None else f"{teacher['train_seconds']:.1f} (cached)"


def _use_wait(cfg) -> None:
    """Work that must happen anyway, done while the Prefect API boots on the other core:
    create/upgrade the MLflow store (once, before any writer) and load torch.export,
    which registering the student needs."""
    from pipelines import tracking

    tracking.client()
    if cfg.tracking.register_best:
        import torch.export  # noqa: F401


def cmd_run(args) -> int:
    from pipelines.common.threads import CpuSample

    start, sample = time.perf_counter(), CpuSample()  # the machine's load, read over the start-up below
    cfg = _load(args)
    from pipelines.orchestrate.preflight import check_champion, check_inputs, check_servers

    notes = check_inputs(cfg)  # data, batch sizes, brought weights, device: exit 2 before any work
    check_servers()  # and the servers the environment names
    check_champion(cfg)  # and the registered champion the student would be compared with
    for note in notes:  # inputs that work but may mislead, once nothing refused the run
        print(f"metadistill: warning: {note}", file=sys.stderr)
    threads = _fit_threads(cfg, sample)
    _prepare_env()
    api = None
    if not os.environ.get("PREFECT_API_URL"):
        from pipelines.orchestrate.prefect_api import LocalPrefectAPI

        api = LocalPrefectAPI()
    from pipelines.orchestrate.flow import metadistill_flow

    imported = time.perf_counter()
    if api is not None:
        _use_wait(cfg)
        api.wait_ready()
    api_ready = time.perf_counter()
    summary = metadistill_flow(config=cfg)
    summary["import_seconds"] = imported - start
    summary["prefect_api_wait_seconds"] = api_ready - imported
    summary["wall_seconds"] = time.perf_counter() - start
    summary["threads"] = threads
    _print_table(summary)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_fewshot(args) -> int:
    if args.preset is None:
        args.preset = "omniglot"
    cfg = _load(args)
    from pipelines.orchestrate.fewshot import fewshot_init, run_fewshot

    fewshot_init(cfg)  # resolved and checked before any work
    from pipelines.engine.distributed import check_device

    check_device(cfg.dist.device)
    _fit_threads(cfg)

    summary = run_fewshot(cfg)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"few-shot · {cfg.fewshot.meta.algorithm} · run {summary['mlflow_run_id']}")
    for col in ("setting", "accuracy", "± 95% CI", "tasks", "meta-train s"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for key, r in summary["results"].items():
        table.add_row(key, f"{100 * r['acc']:.2f}%", f"{100 * r['ci95']:.2f}", str(r["tasks"]), f"{r['meta_seconds']:.0f}")
    Console().print(table)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


DEFAULT_MODEL = "metadistill-digits-student"


def cmd_schedule(args) -> int:
    cfg = _load(args)
    if not args.work_pool:  # served from here, so its inputs must be here; a pool's worker may be elsewhere
        from pipelines.orchestrate.preflight import check_inputs

        check_inputs(cfg)
    _prepare_env()
    from pipelines.orchestrate.schedule import schedule

    schedule(cfg, args.name, args.cron, args.interval, args.work_pool)
    return 0


def cmd_trigger(args) -> int:
    _prepare_env()
    from pipelines.orchestrate.schedule import trigger

    result = trigger(args.name, args.overrides, args.timeout)
    print(f"flow run {result['flow_run_id']}: {result['state']}")
    print(f"mlflow run {result['mlflow_run_id']}")
    return 0 if result["state"] == "COMPLETED" else 1


def cmd_server(args) -> int:
    from pipelines.common.secrets import AuthRequired, is_loopback
    from pipelines.orchestrate.schedule import server_command

    if not is_loopback(args.host) and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise AuthRequired(f"server --host {args.host} listens beyond this machine: anyone who reaches the port "
                           f"could start flow runs on your workers; set PREFECT_SERVER_API_AUTH_STRING (user:secret; "
                           f"clients set PREFECT_API_AUTH_STRING to the same), use `metadistill services`, or bind "
                           f"127.0.0.1")
    cmd, env = server_command(args.host, args.port)
    print(f"Prefect server on http://{args.host}:{args.port}; set PREFECT_API_URL=http://{args.host}:{args.port}/api",
          file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0


def _interrupted(*_) -> None:
    raise KeyboardInterrupt


def cmd_services(args) -> int:
    import signal

    from pipelines.common.home import project_home
    from pipelines.orchestrate.services import Ports, Services

    services = Services(project_home() / "services", Ports(args.host, args.pg_port, args.mlflow_port,
                                                           args.prefect_port), args.pg_user, args.auth, args.advertise)
    signal.signal(signal.SIGTERM, _interrupted)  # a service manager's stop: the same clean shutdown as Ctrl-C
    print(f"starting PostgreSQL, MLflow and Prefect under {services.root} ...", file=sys.stderr, flush=True)
    services.start()
    try:
        print("servers up; on every node that runs or reads the pipeline:", file=sys.stderr)
        for key, value in services.env().items():
            print(f"  export {key}={value}", file=sys.stderr)
        if services.auth:
            print(f"authentication on: copy {services.admin_password_file.name} and {services.auth_string_file.name} "
                  f"(mode 600) from {services.root} to each node, or give each user their own (README: Team set-up)",
                  file=sys.stderr)
        print("Ctrl-C stops all three", file=sys.stderr, flush=True)
        while all(p.poll() is None for p in services.processes.values()):
            time.sleep(1.0)
        dead = [name for name, p in services.processes.items() if p.poll() is not None]
        print(f"metadistill: the {' and '.join(dead)} server exited; stopping the others (logs in {services.root})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        services.stop()


def cmd_serve(args) -> int:
    from deploy.serve import ServeConfig, check_listening, serve

    check_listening(args.host, args.token_file)  # exit 2 before anything loads: an open door, or a bad token file

    cfg = ServeConfig(model=args.model or DEFAULT_MODEL, alias=args.alias, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                      max_instances=args.max_instances, poll_seconds=args.poll_seconds, device=args.device,
                      variant=args.variant, token_file=args.token_file)
    guarded = " (bearer token)" if cfg.token_file else ""
    print(f"serving {cfg.model}@{cfg.alias} ({cfg.variant}) on http://{args.host}:{args.port}{guarded}", file=sys.stderr)
    serve(cfg, args.host, args.port, args.workers)
    return 0


def cmd_promote(args) -> int:
    from pipelines.orchestrate.registration import hand_move_turn
    from pipelines.register.promotion import promote

    model = args.model or DEFAULT_MODEL
    with hand_move_turn(model):  # never between another node's champion read and its registration
        print(json.dumps(promote(model, args.version, args.reason), indent=2))
    return 0


def cmd_rollback(args) -> int:
    from pipelines.orchestrate.registration import hand_move_turn
    from pipelines.register.promotion import rollback

    model = args.model or DEFAULT_MODEL
    with hand_move_turn(model):
        print(json.dumps(rollback(model, args.reason), indent=2))
    return 0


def cmd_export(args) -> int:
    from deploy.export import EXTRA_FILE, check_format, export, metadata_path
    from deploy.registry import load_registered

    check_format(args.format, args.variant)  # a missing onnx/onnxscript, ONNX of int8: one line, exit 2, before loading
    path = export(load_registered(args.model or DEFAULT_MODEL, args.alias, args.variant), args.format, Path(args.out))
    inside = "its ONNX metadata_props" if args.format == "onnx" else f"its extra file {EXTRA_FILE}"
    print(f"wrote {path} ({args.format}: raw [0, 1] pixels in, logits out; class names, input shape and range "
          f"and the normalisation inside the graph are in {inside})")
    print(f"wrote {metadata_path(path)} (the same, as JSON)")
    return 0


def cmd_config(args) -> int:
    if args.explain is not None:
        from pipelines.config.reference import explain

        cfg = _load(args) if args.preset or args.config or args.overrides else None
        print(explain(args.explain, cfg), end="")  # an unknown key: ConfigError, exit 2
        return 0
    import yaml

    from pipelines.orchestrate.preflight import check_inputs

    cfg = _load(args)
    check_inputs(cfg, sources=False)  # the data folder and what the splits leave, as `run` checks them
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_ui(args) -> int:
    from pipelines import tracking
    from pipelines.tracking.runs import tracking_uri
    from pipelines.tracking.ui import experiment_links, serve_ui

    if tracking.is_server(tracking_uri()):  # the tracking server serves the UI itself
        for name, link in experiment_links(tracking_uri().rstrip("/")).items():
            print(f"  {name}: {link}")
        return 0
    from pipelines.common.secrets import AuthRequired, is_loopback

    if not is_loopback(args.host):
        raise AuthRequired(f"ui --host {args.host} would show and edit the project's runs and registry to anyone "
                           f"who reaches the port, with no login: keep it on 127.0.0.1 (ssh -L {args.port}:127.0.0.1:"
                           f"{args.port} from your machine), or run `metadistill services` (basic-auth) for a team")
    base = f"http://{args.host}:{args.port}"
    print(f"starting the MLflow UI on {base} over {tracking_uri()} ...", file=sys.stderr)

    def ready() -> None:  # links only once they open
        print(f"MLflow UI on {base}", file=sys.stderr)
        for name, link in experiment_links(base).items():  # straight to the training runs
            print(f"  {name}: {link}", file=sys.stderr, flush=True)

    return serve_ui(args.host, args.port, ready)


def _known_errors() -> dict[type, tuple[int, str]]:
    """Errors the pipeline raises on purpose, each with its exit code and a hint: they are
    reported as one line (the traceback only with --debug)."""
    import httpx

    from deploy.export import ExportError
    from deploy.registry import ModelLoadError, VariantUnavailable
    from pipelines.common.secrets import AuthRequired
    from pipelines.config.errors import ConfigError
    from pipelines.data.errors import DataError
    from pipelines.engine.metrics import TrainingDiverged
    from pipelines.evaluate.compare import NoStudentLearned
    from pipelines.orchestrate.launch import StageFailed
    from pipelines.orchestrate.schedule import ScheduleError
    from pipelines.orchestrate.services import ServicesError
    from pipelines.tracking import TrackingError
    from pipelines.tracking.registry import NotAllowed, VersionNotFound

    return {ConfigError: (EXIT_CONFIG, ""),  # its message names the setting and what is allowed
            AuthRequired: (EXIT_CONFIG, ""),  # its message names the flag or the secret file
            DataError: (1, "check the data folder and its layout (README: Data)"),
            TrainingDiverged: (1, "the stage diverged: lower the learning rate or kd.temperature"),
            NoStudentLearned: (1, "no student learned: train longer or check the data"),
            StageFailed: (1, "a torchrun stage failed; its workers' output is above"),
            ScheduleError: (1, "see `metadistill server` and `metadistill schedule --help`"),
            ServicesError: (1, "see README: Team set-up"),
            ExportError: (EXIT_CONFIG, ""),  # its message names the missing package and the pip command
            VariantUnavailable: (EXIT_CONFIG, ""),  # its message says why and what to serve instead
            ModelLoadError: (1, "see `metadistill promote` / `metadistill run`"),
            VersionNotFound: (1, "list versions in the MLflow UI (`metadistill ui`)"),
            NotAllowed: (1, ""),  # its message says who was refused and who may
            TrackingError: (1, f"MLflow at {os.environ.get('MLFLOW_TRACKING_URI') or 'the project home'} failed: "
                                 f"when it answers again, run again (the data, teacher and grid caches are kept)"),
            # Prefect's client speaks httpx (MLflow's, requests): a Prefect server that stopped
            # answering mid-run.  The stages before it finished and cached; the registration
            # turn needs it (whether this run registered, the registry says: it may have died later).
            httpx.TransportError: (1, f"the Prefect server at {os.environ.get('PREFECT_API_URL') or 'the local API'} "
                                      f"stopped answering: when it answers again, run again (the data, teacher and "
                                      f"grid caches are kept; the run is FAILED in MLflow)"),
            ValueError: (1, "")}


class _OneLineErrors:
    """A logging filter for Prefect's run loggers: a known error's traceback is left out of
    their records (the CLI prints the error once, as one line)."""

    def __init__(self, known: tuple[type, ...]):
        self.known = known

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.known):
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "fewshot": cmd_fewshot, "config": cmd_config, "ui": cmd_ui, "serve": cmd_serve,
               "schedule": cmd_schedule, "trigger": cmd_trigger, "server": cmd_server, "services": cmd_services,
               "promote": cmd_promote, "rollback": cmd_rollback, "export": cmd_export}[args.command]
    known = _known_errors()
    _one_line_moved_keys()
    if not args.debug:
        import logging

        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_OneLineErrors(tuple(known)))
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("metadistill: interrupted; the MLflow run is marked FAILED and nothing was registered",
              file=sys.stderr)
        return 130
    except tuple(known) as exc:
        if args.debug:
            raise
        exc = _refused(exc)
        code, hint = next(v for k, v in known.items() if isinstance(exc, k))
        message = " ".join(str(exc).split()) if not isinstance(exc, known_multiline()) else str(exc)
        print(f"metadistill: {message}" + (f"\n  hint: {hint}; --debug shows the traceback" if hint else ""),
              file=sys.stderr)
        return code


def _refused(exc: BaseException) -> BaseException:
    """A tracking server's 401 or 403, wherever it surfaced, as the refusal it is (who was
    refused, who may), not as a server that failed and should be tried again."""
    from pipelines.tracking import TrackingError
    from pipelines.tracking.registry import refusal

    if isinstance(exc, TrackingError) and (refused := refusal(exc, "the MLflow server")) is not None:
        return refused
    return exc


def _one_line_moved_keys() -> None:
    """A moved config key's warning as one line on stderr, not Python's two with a source line."""
    import warnings

    from pipelines.config.errors import MovedKeyWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MovedKeyWarning):
            print(f"metadistill: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def known_multiline() -> tuple[type, ...]:
    """Errors whose message is a list (a config's invalid keys, a stage's last output lines)."""
    from pipelines.config.errors import ConfigError
    from pipelines.orchestrate.launch import StageFailed
    from pipelines.orchestrate.services import ServicesError

    return ConfigError, StageFailed, ServicesError


def entry() -> None:
    """Console-script entry: run, flush, run the atexit handlers (Prefect's server stop,
    log drains), then leave without the interpreter's module teardown, which costs ~3 s
    after torch + MLflow + Prefect are loaded and does no work of ours."""
    code = main()
    import atexit
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
