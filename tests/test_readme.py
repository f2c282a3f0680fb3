"""The README's results tables are the ones the pipelines wrote: they cannot drift from results/."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("marker, summary", [("summary", "results/summary.md"),
                                             ("reference", "reference/results/summary.md"),
                                             ("fashion", "fashion_mnist/results/summary.md")])
def test_readme_results_tables_are_the_pipelines_summaries(marker, summary):
    readme = (REPO / "README.md").read_text()
    begin, end = f"<!-- {marker}:begin -->\n", f"<!-- {marker}:end -->"
    assert begin in readme and end in readme
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    assert block == (REPO / summary).read_text()


def test_readme_is_for_a_newcomer():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    for page in ("protocol", "likelihood", "sampling", "pipeline", "testing", "README"):
        assert (REPO / "docs" / f"{page}.md").is_file(), page
