"""The documentation a newcomer reads: every Python block of the README runs (on a CPU unless it says it
needs CUDA), every `fastdrn` command in the docs parses, links point at files of this repository, and
no file in the repository points outside it."""
import os
import re
import shlex
import subprocess

import pytest
import torch

from fastdrn import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                        if f.endswith(".md")]
NEEDS_CUDA = "# needs a CUDA GPU"
# Training in the walkthrough is shortened here: the commands run as written apart from these.
SHORTER = {"--steps": "4", "--val-every": "2"}


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _blocks(text):
    """(language, code, heading above it) of every fenced block, in order."""
    heading, out = "", []
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w+)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1)
        else:
            out.append((m.group(2), m.group(3), heading))
    return out


def _commands(code):
    """The `fastdrn ...` command lines of a shell block, continuation lines joined."""
    return [line for line in code.replace("\\\n", " ").splitlines() if line.strip().startswith("fastdrn ")]


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_python_blocks_and_commands_run_in_order(doc, tmp_path, monkeypatch, capsys):
    if not torch.cuda.is_available():
        monkeypatch.setenv("FASTDRN_BACKEND", "torch")   # what a CPU runs by default (no interpreter)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for lang, code, heading in _blocks(_read(doc)):
        if lang == "python":
            # Blocks that need a GPU say so on their first line; every other block runs here, so one
            # that needs CUDA without saying so fails on a CPU.
            if code.startswith(NEEDS_CUDA) and not torch.cuda.is_available():
                continue
            exec(compile(code, f"{doc} ({heading})", "exec"), {})
            ran += 1
        elif lang == "bash":
            for line in _commands(code):
                argv = shlex.split(line)[1:]
                argv = [SHORTER.get(prev, arg) for prev, arg in zip([""] + argv, argv)]
                assert cli.main(argv) == 0, f"{doc} ({heading}): {line}"
                ran += 1
    assert ran >= 3
    out = capsys.readouterr().out
    assert "(1, 3, 96, 128)" in out or doc != "README.md"          # the first example's output
    assert (tmp_path / "chelsea_x2.png").exists() and (tmp_path / "runs" / "x2" / "best.pt").exists()


def test_every_documented_command_parses_and_help_names_them(capsys):
    parser = cli.build_parser()
    for doc in DOCS:
        for lang, code, heading in _blocks(_read(doc)):
            if lang == "bash":
                for line in _commands(code):
                    parser.parse_args(shlex.split(line)[1:])       # exits on an unknown option
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "upscale", "export"):
        assert command in text and f"fastdrn {command}" in _read("README.md") + _read("docs/cli.md")
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
    assert "--version" in text


def _slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def test_links_point_at_files_and_headings_of_this_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(doc)):
            assert "://" not in target or target.startswith("https://"), (doc, target)
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
            assert full.startswith(ROOT + os.sep) and os.path.exists(full), f"{doc}: broken link {target}"
            if anchor:
                headings = re.findall(r"^#+ .*$", open(full, encoding="utf-8").read(), re.M)
                assert anchor in [_slug(h) for h in headings], f"{doc}: no heading #{anchor} in {path or doc}"


def _repository_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True,
                               timeout=60).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        names = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
                 for f in files if not any(p in d for p in (".git", "__pycache__", "build", ".egg-info"))]
    return [n for n in names if n and os.path.isfile(os.path.join(ROOT, n))]


def test_no_file_in_the_repository_points_outside_it():
    # Spelled in pieces so that this file does not match itself.
    outside = ["../" + "shared", "SPEC" + ".md", "KERNELS" + ".md"]
    found = []
    for name in _repository_files():
        with open(os.path.join(ROOT, name), "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:
            continue                                               # binary
        text = data.decode("utf-8", "replace")
        for i, line in enumerate(text.splitlines(), 1):
            if any(o in line for o in outside):
                found.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)
