"""The documentation site builds strictly (`mkdocs build --strict`, mkdocs.yml): a broken link, anchor, included
file or API reference fails the build and so the suite; the README, the front page, links every page of the site."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _mkdocs_installed():
  try:
    import material  # noqa: F401
    import mkdocs  # noqa: F401
    import mkdocstrings  # noqa: F401
  except ImportError as e:  # CI installs the docs extra, so this fails there rather than skipping
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(f"the docs extra is not installed ({e}): pip install -e '.[docs]'")
    pytest.skip(f"the docs extra is not installed ({e})")


def _build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
  return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                         "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _nav_pages() -> list[str]:
  """The pages named in mkdocs.yml's navigation."""
  return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)


def test_the_site_builds_strictly(tmp_path):
  site = tmp_path / "site"
  built = _build(ROOT / "mkdocs.yml", site)
  assert built.returncode == 0, built.stderr[-4000:]
  for page in _nav_pages():
    html = site / ("index.html" if page == "index.md" else re.sub(r"(README|index)?\.md$", "", page) + "/index.html")
    assert html.is_file(), f"{page} was not built"
  # the API reference is rendered from the docstrings, the included READMEs are there, the data flow is a diagram
  assert (site / "api/library/index.html").read_text().count("doc-heading") > 50
  assert "Memory plans" in (site / "performance/index.html").read_text()      # benchmarks/README.md
  assert "The variables" in (site / "launchers/index.html").read_text()       # launch/README.md
  assert 'class="mermaid"' in (site / "data/index.html").read_text()


@pytest.mark.parametrize("text,named", [
  ("[a page that is not there](missing.md)", "missing.md"),
  ("[an anchor that is not there](#nowhere)", "#nowhere"),
  ("::: stmem.no_such_module", "stmem.no_such_module"),
  ('--8<-- "no/such/file.md"', "no/such/file.md"),
])
def test_a_broken_link_or_reference_fails_the_build(tmp_path, text, named):
  """A page with one broken link, anchor, API reference or include, built with the site's own settings."""
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "index.md").write_text(f"# A page\n\n{text}\n")
  config = tmp_path / "mkdocs.yml"
  config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {tmp_path / 'docs'}\nnav:\n  - index.md\n"
                    "not_in_nav: ''\n")
  built = _build(config, tmp_path / "site")
  assert built.returncode != 0, f"a page with {text!r} built"
  assert named in built.stderr, built.stderr[-3000:]


def test_the_readme_links_every_page_of_the_site():
  readme = (ROOT / "README.md").read_text()
  links = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
  assert all((ROOT / link).is_file() for link in links), [link for link in links if not (ROOT / link).is_file()]
  missing = [page for page in _nav_pages() if page != "index.md" and f"docs/{page}" not in links]
  assert not missing, f"README.md does not link {missing}"
