"""mkdocs hooks: README.md and BENCHMARKS.md as the site's home and
benchmarks pages, their links rewritten to the site's pages.

The repository's markdown links files by their paths in the repository
(`docs/data.md`, `../BENCHMARKS.md`), which is what GitHub shows; the site
has them as pages of one folder.
"""

import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# page in the site: (file in the repository, its folder's prefix in links)
PAGES = {"index.md": "README.md", "benchmarks.md": "BENCHMARKS.md"}
IMAGES = {"learning.png": "bench/results/learning.png"}


def _read(path, mode="r"):
    with open(os.path.join(ROOT, path), mode) as f:
        return f.read()


def on_files(files, config):
    for page, source in PAGES.items():
        files.append(File.generated(config, page, content=_read(source)))
    for image, source in IMAGES.items():
        files.append(File.generated(config, image, content=_read(source, "rb")))
    return files


def on_page_markdown(markdown, page, config, files):
    replacements = [
        ("](../README.md", "](index.md"),
        ("](../BENCHMARKS.md", "](benchmarks.md"),
        ("](BENCHMARKS.md", "](benchmarks.md"),
        ("](bench/results/learning.png", "](learning.png"),
    ]
    if page.file.src_uri in PAGES:
        replacements.append(("](docs/", "]("))
    for old, new in replacements:
        markdown = markdown.replace(old, new)
    return markdown
