"""The docs run as written: every command block of README.md and docs/*.md that a reader
would copy is run here, and what it prints is checked.

A page marks its blocks with HTML comments, which GitHub does not show:

- A ```console block holds `$ ` commands (a line ending in `\\` goes on), each followed
  by what it prints. A command must exit 0, unless it ends with `# exit N`.
- A ```bash block runs as one script (`set -euo pipefail`) that must exit 0. The comment
  right after it, `<!-- expect:` then lines then `-->`, says what it prints.
- What a command prints matches when every line shown appears among its output lines,
  in that order, with other lines between allowed; `...` stands for any text within a
  line, and runs of spaces count as one.
- `<!-- not run: REASON -->` right before a block: not run, for that reason (a GPU, a
  real cluster, a benchmark of minutes).
- `<!-- slurm -->` right before a block: it submits to the local one-node SLURM cluster
  (slurm/cluster.sh); its page runs in the cluster's xdist group, or skips without one.

A page is one session, as a reader would follow it: its blocks run in order in one copy
of the repository (the files git knows, the digits shards copied, .venv linked), with
.venv/bin first on PATH as after `source .venv/bin/activate`, on the CPU. Nothing is
written into this checkout. `python -m tests.test_docs` lists every block and its fate.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests import harness
from tests.slurm_helpers import ensure_cluster

ROOT = harness.ROOT
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "slurm" / "README.md", ROOT / "data" / "README.md"]
"""Pages whose relative links must resolve."""
COMMANDS = ("bash", "sh", "console")
BLOCK_TIMEOUT_S = 300
STATUS = "@@ddp-docs-exit@@"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str
    expect: tuple[str, ...] | None = None
    markers: tuple[str, ...] = ()
    """The comments right before the block."""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """The reason it is not run, or None."""
        reasons = [
            m.removeprefix("not run:").strip() for m in self.markers if m.startswith("not run:")
        ]
        return reasons[0] if reasons else None

    @property
    def slurm(self) -> bool:
        return "slurm" in self.markers

    @property
    def runs(self) -> bool:
        return self.lang in COMMANDS and self.not_run is None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the comments right before and after each."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    before: list[str] = []  # comments since the last line of text
    after_block = False  # only blank lines and comments since the last block closed
    i = 0
    while i < len(lines):
        if lines[i].startswith("<!--"):
            end = next(j for j in range(i, len(lines)) if "-->" in lines[j])
            body = "\n".join(lines[i : end + 1]).strip()[4:-3].strip()
            if body.startswith("expect:") and after_block:
                expected = tuple(body.removeprefix("expect:").strip().splitlines())
                found[-1] = replace(found[-1], expect=expected)
            else:
                before.append(body)
        elif fence := re.match(r"```(\S*)\s*$", lines[i]):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            text = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(page, i + 1, fence.group(1), text, markers=tuple(before)))
            before, after_block = [], True
        else:
            end = i
            if lines[i].strip():
                before, after_block = [], False
        i = end + 1
    return found


def console_commands(block: Block) -> list[tuple[str, int, list[str]]]:
    """A console block's commands: (command, exit code expected, lines it prints)."""
    commands: list[tuple[str, int, list[str]]] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            command = [lines[i][2:]]
            while command[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append(lines[i])
            code = re.search(r"#\s*exit (\d+)\s*$", command[-1])
            commands.append(("\n".join(command), int(code.group(1)) if code else 0, []))
        elif commands:
            commands[-1][2].append(lines[i])
        else:
            raise AssertionError(f"{block.where}: a console block starts with a `$ ` command")
        i += 1
    return commands


def _squeezed(line: str) -> str:
    return " ".join(line.split())


def first_missing(expected: list[str] | tuple[str, ...], output: str) -> str | None:
    """The first expected line not found in the output (in order), or None."""
    out = [_squeezed(line) for line in output.splitlines()]
    at = 0
    for want in expected:
        want = _squeezed(want)
        if want in ("", "..."):
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("...")))
        while at < len(out) and not pattern.fullmatch(out[at]):
            at += 1
        if at == len(out):
            return want
        at += 1
    return None


def assert_printed(what: str, expected, output: str) -> None:
    missing = first_missing(expected, output)
    assert missing is None, f"{what} did not print\n  {missing}\n--- it printed:\n{output[-4000:]}"


# ---------------------------------------------------------------- a page's session


class Session:
    """A copy of the repository in which a page's blocks run, one after another."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.repo = tmp / "repo"
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        for name in listed:
            if (ROOT / name).is_file():
                (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.repo / name)
        (self.repo / ".venv").symlink_to(sys.prefix)
        shutil.copytree(ROOT / "data" / "digits", self.repo / "data" / "digits")
        # `make` takes .venv as made from this pyproject.toml (its stamp is newer), so it
        # never reinstalls the project from this copy into the shared environment.
        os.utime(self.repo / "pyproject.toml", (0, 0))
        drop = ("PYTHONPATH", "SLURM_", "SBATCH_", "WANDB_", "DDP_", "PYTEST_", "MAKE", "MFLAGS")
        make_variables = ("ARGS", "NPROC", "JOBS", "TORCH", "VENV", "PYTHON")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env = {k: v for k, v in env.items() if k not in make_variables}
        env.update(
            PATH=f"{self.repo / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            VIRTUAL_ENV=str(self.repo / ".venv"),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            WANDB_MODE="offline",
            CUDA_VISIBLE_DEVICES="",  # the outputs shown are the CPU's
            XDG_CACHE_HOME=str(tmp / "cache"),  # the remote shard cache, among others
        )
        self.env = env
        self.scripts = 0

    def run(self, script: str) -> tuple[int, str]:
        """Run a bash script in the copy; its exit code and output (stderr included)."""
        self.scripts += 1
        path = self.tmp / f"block-{self.scripts}.sh"
        path.write_text(script)
        job = harness.Running(["bash", str(path)], self.env, self.repo, merge_stderr=True)
        out = job.finish(timeout=BLOCK_TIMEOUT_S)
        return out.returncode, out.stdout

    def check(self, block: Block) -> None:
        """Run a block; fail naming it, with its output, where it does not do as shown."""
        if block.lang == "console":
            commands = console_commands(block)
            script = "".join(f'{c}\nprintf "\\n{STATUS} %s\\n" "$?"\n' for c, _, _ in commands)
            _, output = self.run(script)
            parts = re.split(rf"^{STATUS} (\d+)$", output, flags=re.MULTILINE)
            assert len(parts) > 2 * len(commands), f"{block.where}: cut short:\n{output[-4000:]}"
            for n, (command, code, shown) in enumerate(commands):
                printed, got = parts[2 * n], int(parts[2 * n + 1])
                assert got == code, f"{block.where}: `{command}` exited {got}:\n{printed[-4000:]}"
                assert_printed(f"{block.where}: `{command}`", shown, printed)
        else:
            code, output = self.run("set -euo pipefail\n" + block.text)
            assert code == 0, f"{block.where}: exited {code}:\n{output[-4000:]}"
            assert_printed(block.where, block.expect or (), output)

    def cancel_jobs(self) -> None:
        """SLURM jobs submitted from the copy, cancelled whatever happened."""
        listed = harness.run(["squeue", "--noheader", "--format=%i %Z"], timeout=30)
        for line in listed.stdout.splitlines():
            job, _, workdir = line.partition(" ")
            if workdir.startswith(str(self.repo)):
                harness.run(["scancel", job], timeout=30)


def page_params():
    for page in PAGES:
        runs = [b for b in blocks(page) if b.runs]
        if runs:
            marks = [pytest.mark.slurm, pytest.mark.xdist_group("cluster")]
            yield pytest.param(
                page,
                marks=marks if any(b.slurm for b in runs) else [],
                id=str(page.relative_to(ROOT)),
            )


@pytest.mark.slow
@pytest.mark.parametrize("page", list(page_params()))
def test_a_page_runs_as_written(page: Path, tmp_path: Path):
    if not (ROOT / "data" / "digits" / "train" / "manifest.json").exists():
        pytest.skip("data/digits is made by `make test` (ddp-shards prepare digits)")
    runs = [b for b in blocks(page) if b.runs]
    if any(re.search(r"^\$? ?make\b", b.text, re.MULTILINE) for b in runs):
        if not (ROOT / ".venv" / ".ddp-installed").exists():
            pytest.skip(".venv was not made by `make`: a `make` block would reinstall it")
    slurm = any(b.slurm for b in runs)
    if slurm and (reason := ensure_cluster()):
        pytest.skip(reason)
    session = Session(tmp_path)
    try:
        for block in runs:
            session.check(block)
    finally:
        if slurm:
            session.cancel_jobs()


# ---------------------------------------------------------------- the pages' structure


def test_every_command_block_runs_or_says_why_not():
    problems = []
    for page in PAGES:
        for b in blocks(page):
            unknown = [m for m in b.markers if not (m.startswith("not run:") or m == "slurm")]
            if unknown:
                problems.append(f"{b.where}: unknown marker {unknown[0]!r}")
            if b.lang not in COMMANDS:
                if b.not_run is not None or b.slurm or b.expect is not None:
                    problems.append(f"{b.where}: a marker on a ```{b.lang} block: not a command")
                continue
            if b.not_run == "":
                problems.append(f"{b.where}: `not run:` without its reason")
            elif b.lang == "console" and b.expect is not None:
                problems.append(f"{b.where}: a console block shows its own output; no expect")
            elif b.runs and b.lang != "console" and not b.expect:
                problems.append(f"{b.where}: say what it prints (<!-- expect: ... --> after it)")
            elif b.lang == "console":
                try:
                    console_commands(b)
                except AssertionError as e:
                    problems.append(str(e))
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_readmes_table():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not missing, f"pages the README's table does not list: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_blocks(page).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def without_blocks(page: Path) -> str:
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def prose(page: Path) -> str:
    """A page without its fenced blocks and inline code: where its links are."""
    return re.sub(r"`[^`\n]*`", "", without_blocks(page))


def test_every_relative_link_resolves():
    broken = []
    for page in LINKED:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_test_the_pages_name_exists():
    named = {
        m for page in LINKED for m in re.findall(r"(test_\w+\.py)::(test_\w+)", page.read_text())
    }
    missing = [
        f"{module}::{name}"
        for module, name in sorted(named)
        if not re.search(rf"^def {name}\(", (ROOT / "tests" / module).read_text(), re.MULTILINE)
    ]
    assert not missing, f"tests named in the docs that do not exist: {missing}"


def test_matching_takes_lines_in_order_with_dots_for_any_text():
    output = "a plan\nrun directory: /tmp/x/runs/digits (new run)\nepoch 0:  loss 2.1\ndone\n"
    assert first_missing(["run directory: .../runs/digits (new run)", "done"], output) is None
    assert first_missing(["epoch 0: loss ...", "..."], output) is None  # spaces squeezed
    assert first_missing(["done", "run directory: ..."], output) == "run directory: ..."
    assert first_missing(["epoch 1: ..."], output) == "epoch 1: ..."


if __name__ == "__main__":
    for page in PAGES:
        for b in blocks(page):
            if b.lang in COMMANDS:
                fate = f"not run: {b.not_run}" if b.not_run else "slurm" if b.slurm else "runs"
                print(f"{b.where} {b.lang}: {fate}")
