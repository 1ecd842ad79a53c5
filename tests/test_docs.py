"""The documentation stays true to the code: every configuration key is described, the
reference page and ``metadistill config --explain`` come from the schema, and the keys,
commands and result files that the README and the docs site name exist.
(``make docs`` builds the site strictly: broken links and pages left out of nav fail it.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config.loader import MOVED_KEYS
from pipelines.config.reference import GONE_KEYS, explain, keys, markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def test_every_key_has_a_description():
    missing = [d.key for d in keys() if not d.description.strip()]
    assert not missing, f"add a description= to these config fields (pipelines/config/*.py): {missing}"


def test_the_reference_lists_every_key_with_its_facts():
    page = markdown()
    docs = keys()
    assert len(docs) > 200
    for doc in docs:
        if doc.section:
            assert f"{{#{doc.key.replace('[]', '')}}}" in page, doc.key
        else:
            assert f"| `{doc.key}` |" in page, doc.key
    for old, new in MOVED_KEYS.items():
        assert f"| `{old}` | `{new}` |" in page
    temperature = next(d for d in docs if d.key == "kd.temperature")
    assert (temperature.type, temperature.default, temperature.allowed) == ("float", "4.0", "> 0")
    assert next(d for d in docs if d.key == "data.augment[].translate").allowed == "[0, 0.5]"
    assert "one of kl, mse" in next(d for d in docs if d.key == "kd.soft_loss").allowed
    assert next(d for d in docs if d.key == "teacher.train.steps").preset == "4000"  # the digits preset's


def test_the_site_generates_the_reference_page_from_the_schema():
    config = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks.py" in config and "reference/configuration.md" in config
    hooks = (ROOT / "docs" / "hooks.py").read_text()
    assert "pipelines.config.reference import markdown" in hooks and "reference/configuration.md" in hooks
    assert not (ROOT / "docs" / "reference" / "configuration.md").exists()  # generated, never a stale copy


def test_explain_a_key_a_section_and_a_moved_key():
    text = explain("meta_distill.guard")
    for key in ("meta_distill.guard.every", "meta_distill.guard.z", "meta_distill.guard.damping"):
        assert key in text
    assert "meta_distill.head.lr" in explain("meta_distill.head_lr")
    assert "meta_distill_pilot.learn" in explain("meta_distill.learn")
    assert "data.augment[].padding" in explain("data.augment.padding")


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "METADISTILL_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "config", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_config_explain_prints_a_key_and_refuses_an_unknown_one(tmp_path):
    done = _cli(tmp_path, "--explain", "kd.temperature")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("kd.temperature\n") and "default: 4.0" in done.stdout and "> 0" in done.stdout
    assert "softmax temperature" in done.stdout

    section = _cli(tmp_path, "--explain", "meta_distill.temperature", "--preset", "mnist")
    assert section.returncode == 0, section.stderr
    assert "meta_distill.temperature.learn" in section.stdout and "here: false" in section.stdout

    bad = _cli(tmp_path, "--explain", "kd.temprature")
    assert bad.returncode == 2 and not bad.stdout
    lines = [line for line in bad.stderr.splitlines() if line.startswith("metadistill:")]
    assert len(lines) == 1 and "'kd.temprature'" in lines[0] and "'kd.temperature'" in lines[0], bad.stderr


# Keys that the docs name on purpose although they do not exist (an error's example).
WRONG_ON_PURPOSE = {"kd.temp", "kd.temprature"}
SECTIONS = "data|teacher|student|kd|maml|meta_distill_pilot|meta_distill|fewshot|tracking|dist"
KEY = re.compile(rf"(?:`|--set\s+\"?|--row-set\s+\w+:)((?:{SECTIONS})(?:\.[a-z_][a-z0-9_]*)+)")


def _known(key: str, names: set[str]) -> bool:
    return key in names or key in MOVED_KEYS or key in GONE_KEYS or key in WRONG_ON_PURPOSE


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_keys_the_docs_name_exist(path):
    names = {d.key.replace("[]", "") for d in keys()}
    named = set(KEY.findall(path.read_text()))
    unknown = sorted(k for k in named if not _known(k, names))
    assert not unknown, f"{path.name} names keys the schema does not have: {unknown}"


def _commands_named(text: str) -> set[str]:
    """``metadistill COMMAND`` in fenced code blocks and in inline code."""
    fenced = "\n".join(re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, re.M | re.S))
    return set(re.findall(r"(?:^|\s|/bin/|\$ )metadistill ([a-z]\w*)", fenced, re.M)
               + re.findall(r"`(?:\S*/)?metadistill ([a-z]\w*)", text))


def test_the_commands_the_docs_name_exist():
    from pipelines.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for path in [ROOT / "README.md", *PAGES]:
        named = _commands_named(path.read_text())
        assert not named - commands, (path.name, named - commands)
    assert {"run", "ui", "serve", "config", "export", "services"} <= _commands_named((ROOT / "README.md").read_text())
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "docs"):
        assert re.search(rf"^{target}:", makefile, re.M), target


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_result_files_the_docs_name_exist(path):
    named = re.findall(r"docs/benchmarks/[A-Za-z0-9_/.\-]+\.(?:json|log|md)", path.read_text())
    missing = sorted({n for n in named if not (ROOT / n).exists()})
    assert not missing, missing


def test_the_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_closed(path):
    fences = [line for line in path.read_text().splitlines() if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{path.name}: an unclosed ``` block swallows the rest of the page"
