"""The README and docs/ say what is true: their examples run, at a tiny size.

Each page's Python blocks run in order in one namespace, in a fresh working
directory, with the sizes named in `TINY` replaced (each replacement must
find its text, so an example that changes fails here instead of running at
full size). Every recipe command of a shell block is parsed by its recipe's
flags: the flags exist, their values parse, the flagfiles exist. The
examples run under the torch backend's suite alone (the library's paths on
each backend are the other modules' tests).
"""

import glob
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys

import pytest
from support import ROOT

PAGES = ["README.md"] + sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def blocks(page, language):
    """The fenced blocks of `language` in `page`, in order."""
    pattern = rf"^```{language}\n(.*?)^```$"
    return re.findall(pattern, read(page), flags=re.M | re.S)


def _subset(call, count):
    """`call` (a `(images, labels)` loader) cut to its first `count`."""
    return f"(a[:{count}] for a in {call})"


# (text, replacement) per page: the tiny size of each page's examples.
TINY = {
    "README.md": [
        (
            'datasets.fashion_mnist("train")',
            'datasets.fashion_mnist("train", limit=64)',
        ),
        ("batch_size=256", "batch_size=16"),
        ("width=16, bn_splits=8", "width=2, bn_splits=2"),
        ("queue_size=4096", "queue_size=64"),
        (
            'datasets.load_fashion_mnist("train")',
            _subset('datasets.load_fashion_mnist("train")', 200),
        ),
        (
            'datasets.load_fashion_mnist("test")',
            _subset('datasets.load_fashion_mnist("test")', 50),
        ),
        ("range(5)", "range(1)"),
    ],
    "docs/architecture.md": [
        (
            "encoders.resnet50(bn_splits=8)",
            "encoders.resnet18(width=2, bn_splits=8)",
        ),
    ],
    "docs/data.md": [
        ('fashion_mnist("train")', 'fashion_mnist("train", limit=64)'),
        ("batch_size=256", "batch_size=16"),
        ("cifar_resnet18(bn_splits=8)", "cifar_resnet18(width=2, bn_splits=2)"),
        ("workers=2", "workers=0"),
    ],
    "docs/mocov3.md": [
        (
            "encoders.resnet50(zero_init_residual=True)",
            "encoders.resnet18(width=2, zero_init_residual=True)",
        ),
        (
            "steps_per_epoch, epochs),",
            "steps_per_epoch, epochs), dim=8, mlp_dim=16,",
        ),
        ('"mocov3_vit", encoder)', '"mocov3_vit", encoder, dim=8, mlp_dim=16)'),
        ("(8, 224, 224, 3)", "(8, 32, 32, 3)"),
        (
            "vits.vit_small(stop_grad_conv1=True)",
            "vits.vit(image_size=32, patch_size=16, embed_dim=16, depth=1, "
            "num_heads=2, stop_grad_conv1=True)",
        ),
    ],
    "docs/monitoring.md": [
        (
            'datasets.load_fashion_mnist("test")',
            _subset('datasets.load_fashion_mnist("test")', 64),
        ),
        ("width=16", "width=2"),
    ],
    "docs/recipes.md": [
        (
            'data={"train_limit": 8192}',
            'data={"train_limit": 64, "batch_size": 32}, '
            'encoder={"width": 2}, model={"queue_size": 64}, '
            'knn={"every": 0}',
        ),
    ],
}


def tiny(page, code):
    for text, replacement in TINY.get(page, []):
        assert text in code, (
            f"{page}: the example no longer holds {text!r}, which the test "
            "replaces to run it at a tiny size; update TINY."
        )
        code = code.replace(text, replacement)
    return code


def test_every_page_with_python_examples_has_its_tiny_sizes():
    with_python = {page for page in PAGES if blocks(page, "python")}
    assert set(TINY) == with_python


@pytest.mark.backends("torch")
@pytest.mark.parametrize(
    "page", [page for page in PAGES if blocks(page, "python")]
)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = tiny(page, "\n".join(blocks(page, "python")))
    namespace = {"__name__": "__example__"}
    exec(compile(code, page, "exec"), namespace)  # noqa: S102


def recipe_commands(page):
    """`(recipe, args)` of every `python -m moco_keras.recipes.NAME` line of
    the page's shell blocks (continuations joined, comments dropped) and of
    its inline code (the README's recipes table)."""
    lines = re.findall(r"`(python -m moco_keras\.recipes\.[^`]+)`", read(page))
    for block in blocks(page, "sh"):
        lines += re.sub(r"\\\n", " ", block).splitlines()
    commands = []
    for line in lines:
        if "-m moco_keras.recipes." not in line:
            continue
        words = shlex.split(line, comments=True)
        start = words.index("-m") + 1
        commands.append((words[start], words[start + 1 :]))
    return commands


def accepted_flags(module):
    """The flags a recipe's process defines: its own, those of the recipe
    modules it imports, and the shared ones."""
    from absl import flags

    recipe = importlib.import_module(module)
    names = {module, "moco_keras.recipes.common"} | {
        value.__name__
        for value in vars(recipe).values()
        if inspect.ismodule(value)
        and value.__name__.startswith("moco_keras.recipes.")
    }
    by_module = flags.FLAGS.flags_by_module_dict()
    return {flag.name: flag for name in names for flag in by_module[name]}


def parse(module, args):
    """Checks `args` as the recipe's absl flags would take them."""
    from absl import flags

    accepted = accepted_flags(module)
    expanded = flags.FLAGS.read_flags_from_files(args, force_gnu=True)
    assert expanded, args
    for arg in expanded:
        assert arg.startswith("--"), f"{module}: {arg!r} is not a flag"
        name, equals, text = arg[2:].partition("=")
        if not equals and name not in accepted and name.startswith("no"):
            name, text = name[2:], "false"
        assert name in accepted, f"{module} has no flag --{name}"
        flag = accepted[name]
        flag.parser.parse(text if equals or text else "true")


def test_recipe_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    found = {page: recipe_commands(page) for page in PAGES}
    every = [command for commands in found.values() for command in commands]
    recipes = {module for module, _ in every}
    assert recipes == {
        f"moco_keras.recipes.{name}"
        for name in ("pretrain", "lincls", "export", "convert", "quickstart")
    }, recipes
    for page, commands in found.items():
        for module, args in commands:
            try:
                parse(module, args)
            except Exception as error:
                raise AssertionError(f"{page}: {module} {args}") from error


def test_a_misspelt_flag_or_missing_flagfile_fails_the_check(monkeypatch):
    monkeypatch.chdir(ROOT)
    parse("moco_keras.recipes.pretrain", ["--flagfile=recipes/smoke.flags"])
    with pytest.raises(AssertionError, match="no flag --moco_kk"):
        parse("moco_keras.recipes.pretrain", ["--moco_kk=4096"])
    with pytest.raises(AssertionError, match="no flag --source"):
        parse("moco_keras.recipes.pretrain", ["--source=x.pth"])
    with pytest.raises(ValueError):
        parse("moco_keras.recipes.pretrain", ["--moco_k=many"])
    with pytest.raises(Exception, match="nothing.flags"):
        parse("moco_keras.recipes.lincls", ["--flagfile=recipes/nothing.flags"])


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = read("README.md").splitlines()
    assert len(lines) < 250, len(lines)
    first = blocks("README.md", "sh")[0]
    assert first.startswith("make demo") and "\nmake test" in first
    assert read(".ci/run").rstrip().endswith("make test")


# A commit hash (hexadecimal with a digit and a letter, 7 to 40 long) or an
# issue number: the history of the code, which git keeps, not the docs.
HISTORY = re.compile(
    r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"
    r"|\bissues? #?\d+|(?<![\w/])#\d+\b",
    flags=re.I,
)


@pytest.mark.parametrize("page", PAGES + ["BENCHMARKS.md"])
def test_pages_hold_no_commit_hashes_or_issue_numbers(page):
    assert HISTORY.findall(read(page)) == []


def test_history_pattern_catches_hashes_and_issues():
    for text in ("commit bfe138f", "issue 19", "Issue 5's", "see #12"):
        assert HISTORY.search(text), text
    for text in ("1e-4", "0.5", "main_moco.py", "ILSVRC2012", "2026-12-03"):
        assert not HISTORY.search(text), text


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_at_files(page):
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)#:=\s]+)(?:#[^)]*)?\)", read(page)):
        assert os.path.exists(os.path.join(folder, target)), target


@pytest.mark.process
@pytest.mark.backends("torch")
def test_docs_site_builds_without_warnings(tmp_path):
    """`make docs`: mkdocs with warnings as errors (a broken link, a
    docstring the API pages cannot read), the README as the home page."""
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-5000:]
    home = (site / "index.html").read_text()
    assert "Set-up: two commands" in home
    assert 'href="recipes/"' in home  # the README's docs/recipes.md link
    assert "fmnist-moco-v2" in (site / "benchmarks" / "index.html").read_text()
    api = (site / "api" / "index.html").read_text()
    assert "from_preset" in api and "SplitBatchNormalization" in api
