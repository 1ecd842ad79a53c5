"""One worker of an architecture study (tests/test_team.py runs two on one PostgreSQL study):
digits, a tiny teacher, then ``search`` once the test says go (so that the two overlap)."""

import json
import os
import sys
import time
from pathlib import Path

from pipelines import data as data_stage
from pipelines.arch.stage import ArchContext, search
from pipelines.config.loader import load_config
from pipelines.teacher.context import TeacherContext
from pipelines.teacher.fit import obtain_teacher

SETTING = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=60",
           "student.train.steps=400", "arch_search.enabled=true", "arch_search.searcher=random", "arch_search.trials=6",
           "arch_search.halving=false", "arch_search.default_budget=params",
           "arch_search.space={mlp: {depth: [1, 2], width: [8, 16, 24, 32]}}", "student.model.kwargs={hidden: [32]}"]


def main(folder: str) -> None:
    cfg = load_config(overrides=SETTING)
    prepared = data_stage.prepare(cfg.data)
    teacher = obtain_teacher(TeacherContext.from_config(cfg, prepared)).model
    (Path(folder) / f"ready-{os.getpid()}").touch()
    while not (Path(folder) / "go").exists():
        time.sleep(0.05)
    result = search(ArchContext.from_config(cfg, prepared, teacher))
    (Path(folder) / f"result-{os.getpid()}.json").write_text(json.dumps(result.as_json()))


if __name__ == "__main__":
    main(sys.argv[1])
