"""The CLI pages in docs/cli are the parser's own help: regenerate them when a flag changes with
    python -c "from pretrain_reuse.cli import help_pages; from pathlib import Path;
    [Path(f'docs/cli/{k}.md').write_text(v) for k, v in help_pages().items()]"
"""

from pathlib import Path

from pretrain_reuse.cli import help_pages

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli"


def test_cli_pages_match_the_parsers_help():
    pages = help_pages()
    assert {"index", "embed", "units", "select", "finetune", "explain", "knowledge", "demo",
            "report"} <= set(pages)
    for name, text in pages.items():
        page = DOCS / f"{name}.md"
        assert page.exists() and page.read_text() == text, f"docs/cli/{name}.md is stale"
