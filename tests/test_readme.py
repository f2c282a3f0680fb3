"""The README's results table is the one the pipeline wrote: it cannot drift from results/."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_table_is_results_summary():
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- summary:begin -->\n", "<!-- summary:end -->"
    assert begin in readme and end in readme
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    assert block == (REPO / "results" / "summary.md").read_text()


def test_readme_is_for_a_newcomer():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    for page in ("protocol", "likelihood", "sampling", "pipeline", "testing", "README"):
        assert (REPO / "docs" / f"{page}.md").is_file(), page
