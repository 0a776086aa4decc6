"""A benchmark's tables with their command, machine and date, into a file of
their own or into their section of BENCHMARKS.md.

Every table in BENCHMARKS.md sits between `<!-- begin NAME -->` and
`<!-- end NAME -->` and is written there by its script
(`--output=BENCHMARKS.md`); any other `--output` gets the section alone.
The section opens with one line: the command as it was run, the machine
(CPU model and cores, the GPU where one was used, the frameworks' versions)
and the UTC date.

Example:

    tables.write(args.output, "shuffle", table)
"""

import datetime
import importlib.metadata
import os
import re
import shlex
import sys

BEGIN = "<!-- begin {} -->"
END = "<!-- end {} -->"
# The first line of every section, as `header` writes it.
HEADER = re.compile(
    r"^Command: `(?P<command>[^`]+)`\. Machine: (?P<machine>.+)\. "
    r"Date: (?P<date>\d{4}-\d\d-\d\d)\.$"
)
PACKAGES = ("keras", "tensorflow-cpu", "tensorflow", "jax", "torch")


def command():
    """This process's command line, the script relative to the repository."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.relpath(os.path.abspath(sys.argv[0]), root)
    backend = os.environ.get("KERAS_BACKEND")
    prefix = f"KERAS_BACKEND={backend} " if backend else ""
    return prefix + shlex.join(["python", script, *sys.argv[1:]])


def cpu_model():
    """The CPU's model name and its widest vector instructions (AVX2,
    AVX-512): float32 results, and the suite's, can differ between them."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if model is None:
        import platform

        model = platform.processor() or platform.machine()
    vector = next(
        (
            name
            for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
            if flag in flags
        ),
        None,
    )
    return f"{model} ({vector})" if vector else model


def machine(gpu=None):
    """CPU model, the cores this process may use, the GPU, the versions."""
    cores = len(os.sched_getaffinity(0))
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    parts = [f"{cpu_model()}, {cores} cores"]
    if gpu:
        parts.append(gpu)
    return "; ".join(parts + [", ".join(versions)])


def header(gpu=None, date=None):
    date = date or datetime.datetime.now(datetime.timezone.utc).date()
    return (
        f"Command: `{command()}`. Machine: {machine(gpu)}. "
        f"Date: {date.isoformat()}."
    )


def section(name, text, gpu=None):
    return "\n".join(
        [BEGIN.format(name), header(gpu), "", text.rstrip(), END.format(name)]
    )


def replace_section(document, name, block):
    """`document` with section `name` replaced by `block` (appended if the
    document has no such section)."""
    begin, end = BEGIN.format(name), END.format(name)
    start = document.find(begin)
    if start < 0:
        return document.rstrip() + "\n\n" + block + "\n"
    stop = document.find(end, start)
    if stop < 0:
        raise ValueError(f"{begin} has no {end} after it.")
    return document[:start] + block + document[stop + len(end) :]


def write(output, name, text, gpu=None):
    """Writes the tables `text` as section `name` into `output`.

    Where `output` holds sections (BENCHMARKS.md), section `name` is
    replaced in place, or appended if it has none; the rest is kept. Any
    other file is written as the section alone. Nothing without an
    `output`.
    """
    if not output:
        return
    block = section(name, text, gpu)
    document = ""
    if os.path.exists(output):
        with open(output) as f:
            document = f.read()
    if "<!-- begin " in document:
        document = replace_section(document, name, block)
    else:
        document = block + "\n"
    with open(output + ".tmp", "w") as f:
        f.write(document)
    os.replace(output + ".tmp", output)


def sections(document):
    """{name: text} of every section of `document`."""
    found = {}
    for match in re.finditer(
        r"<!-- begin (\S+) -->\n(.*?)<!-- end \1 -->", document, flags=re.S
    ):
        found[match.group(1)] = match.group(2)
    return found
