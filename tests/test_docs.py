"""The pages in docs/ are made from the code, so they cannot drift from it: docs/cli/*.md from the
parser's own help, docs/api.md from the signatures and docstrings of the public Python API.
Regenerate both after changing a flag, a public signature or a docstring's first paragraph with

    python tests/test_docs.py
"""

import argparse
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

from pretrain_reuse.cli import build_parser, help_pages

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: The public Python API, module by module: a module's ``__all__`` (its functions and classes),
#: or the names listed here for modules that also hold helpers of other modules.
API = {
    "pretrain_reuse": None,
    "pretrain_reuse.features": None,
    "pretrain_reuse.units": None,
    "pretrain_reuse.transport": None,
    "pretrain_reuse.selection": None,
    "pretrain_reuse.data": ["open_dataset", "list_datasets", "image_folder", "file_list",
                            "ImageDataset", "ArrayDataset", "FileDataset", "SubsetDataset",
                            "subsample_fraction", "subsample_long_tail", "read_class_names",
                            "write_class_names", "make_world", "World", "WorldConfig", "DataWarning"],
    "pretrain_reuse.data.text": ["TextDataset", "text_file", "is_sentence_file"],
    "pretrain_reuse.models": ["create_backbone", "list_backbones", "save_backbone", "Backbone",
                              "BackboneSpec", "SmallCNN"],
    "pretrain_reuse.embed": ["EmbedConfig", "embed"],
    "pretrain_reuse.finetune": ["FinetuneConfig", "load_config", "run_finetune",
                                "finetune_datasets", "RunResult", "target_splits", "open_split",
                                "evaluate_model"],
    "pretrain_reuse.knowledge": None,
    "pretrain_reuse.knowledge.games": ["Players", "grid_players", "baseline_input", "masked_game",
                                       "learn_baseline", "LearnedBaseline"],
    "pretrain_reuse.knowledge.text": ["TokenPlayers", "token_players", "masked_text_game"],
    "pretrain_reuse.knowledge.explain": ["ExplainConfig", "explain"],
    "pretrain_reuse.knowledge.analysis": ["analyze_knowledge", "KnowledgeWarning"],
    "pretrain_reuse.knowledge.sensitivity": ["knowledge_sensitivity", "ratio_sensitivity",
                                             "KnowledgeSensitivity"],
    "pretrain_reuse.experiments": None,
    "pretrain_reuse.report": ["build_report"],
    "pretrain_reuse.demo": ["run_demo"],
    "pretrain_reuse.runtime": ["keep_freed_memory"],
}


def _summary(obj) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _signature(obj) -> str:
    """``inspect.signature`` with the annotations as written (they are strings under
    ``from __future__ import annotations``, which the default rendering quotes)."""
    sig = inspect.signature(obj)
    P = inspect.Parameter
    parts, starred = [], False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind == P.KEYWORD_ONLY and not starred:
            parts.append("*")
        starred = starred or p.kind in (P.KEYWORD_ONLY, P.VAR_POSITIONAL)
        part = {P.VAR_POSITIONAL: "*", P.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not P.empty:
            written = p.annotation
            part += f": {written if isinstance(written, str) else inspect.formatannotation(written)}"
        if p.default is not P.empty:
            part += f" = {p.default!r}" if p.annotation is not P.empty else f"={p.default!r}"
        parts.append(part)
        later = list(sig.parameters.values())[i + 1:]
        if p.kind == P.POSITIONAL_ONLY and not any(q.kind == P.POSITIONAL_ONLY for q in later):
            parts.append("/")
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not inspect.Signature.empty:
        out += f" -> {sig.return_annotation}"
    return out


def _fields(cls) -> str:
    """A dataclass's fields as its constructor takes them: ``name: type = default``."""
    parts = []
    for f in dataclasses.fields(cls):
        default = (f" = {f.default!r}" if f.default is not dataclasses.MISSING else
                   f" = {f.default_factory()!r}" if f.default_factory is not dataclasses.MISSING
                   else "")
        parts.append(f"{f.name}: {f.type}{default}")
    return ", ".join(parts)


def _entry(name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"### class `{name}`", "", _summary(obj), ""]
        if dataclasses.is_dataclass(obj):
            lines += [f"Fields: `{_fields(obj)}`", ""]
        methods = [(m, f) for m, f in vars(obj).items() if not m.startswith("_")
                   and (inspect.isfunction(f) or isinstance(f, classmethod | property))]
        for m, f in methods:
            call = "" if isinstance(f, property) else "(...)"
            f = f.__func__ if isinstance(f, classmethod) else f.fget if isinstance(f, property) else f
            # its own docstring: one inherited from a base class (nn.Module.forward) says nothing
            own = " ".join((f.__doc__ or "").split("\n\n")[0].split())
            lines.append(f"- `.{m}{call}`: {own}")
        return [*lines, ""] if methods else lines
    return [f"### `{name}{_signature(obj)}`", "", _summary(obj), ""]


def api_page() -> str:
    """docs/api.md: each public module's summary, then its functions and classes."""
    lines = ["# Python API", "",
             "Generated from the code by `python tests/test_docs.py`; `help(obj)` has the whole "
             "docstring. The entry points (configs, loaders, `select`, `embed`, `run_finetune`, "
             "`explain`, `analyze_knowledge`, ...) validate what they are given and raise "
             "`pretrain_reuse.PretrainReuseError` with a one-line message on a user error.", ""]
    for module_name, names in API.items():
        module = importlib.import_module(module_name)
        objects = [(n, getattr(module, n)) for n in (names or module.__all__)]
        objects = [(n, o) for n, o in objects if inspect.isclass(o) or inspect.isfunction(o)]
        lines += [f"## `{module_name}`", "", _summary(module), ""]
        for name, obj in objects:
            lines += _entry(name, obj)
    return "\n".join(lines).rstrip() + "\n"


def test_cli_pages_match_the_parsers_help():
    pages = help_pages()
    assert {"index", "embed", "units", "select", "finetune", "explain", "knowledge", "demo",
            "report"} <= set(pages)
    for name, text in pages.items():
        page = DOCS / "cli" / f"{name}.md"
        assert page.exists() and page.read_text() == text, f"docs/cli/{name}.md is stale"


def test_every_verb_says_what_it_does_under_its_usage():
    # demo --help and report --help showed their usage and flags only
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [name for name, sub in verbs.choices.items() if not sub.description] == []


def test_the_docs_that_readme_and_the_reports_point_to_exist():
    # the knowledge ratios' definitions were cited from a note outside the repository
    root = DOCS.parent
    cited = set()
    for path in [root / "README.md", *sorted((root / "src").rglob("*.py"))]:
        cited |= set(re.findall(r"docs/[\w/.-]+\.md", path.read_text()))
    assert "docs/knowledge.md" in cited
    assert [c for c in sorted(cited) if not (root / c).is_file()] == []
    assert "methods/knowledge.md" not in (root / "README.md").read_text()


def test_api_page_matches_the_code():
    page = DOCS / "api.md"
    assert page.exists() and page.read_text() == api_page(), \
        "docs/api.md is stale: run python tests/test_docs.py"


def test_every_documented_name_has_a_docstring():
    bare = [line for line in api_page().splitlines() if line.startswith("- `") and line.endswith(": ")]
    assert not bare, bare


if __name__ == "__main__":
    for verb, text in help_pages().items():
        (DOCS / "cli" / f"{verb}.md").write_text(text)
    (DOCS / "api.md").write_text(api_page())
