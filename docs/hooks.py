"""MkDocs hook: the configuration reference page, generated from the schema at every build
(``pipelines/config/reference.py``), so it can never fall behind the code."""

from __future__ import annotations

from mkdocs.structure.files import File, Files

PAGE = "reference/configuration.md"


def on_files(files: Files, config) -> Files:
    from pipelines.config.reference import markdown

    files.append(File.generated(config, PAGE, content=markdown()))
    return files
