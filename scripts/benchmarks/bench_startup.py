"""Start-up time of the ``tokenformer-vision`` command, side by side with ``python -c 'import timm'``.

Each command runs ``--repeat`` times in a fresh interpreter; the table gives the median wall time (and min-max),
then ``python -X importtime`` names the modules that cost the most for ``import tokenformer_vision`` and for the
command's ``fit --help``. ``--src DIR`` (repeatable) measures other checkouts, e.g. ``git archive HEAD | tar -x -C
DIR`` for a before/after comparison; their runs alternate, so that both see the same machine load. Checkouts without
the ``tokenformer_vision_cli`` entry module run ``tokenformer_vision.cli``.

    python scripts/benchmarks/bench_startup.py [--repeat 5] [--src DIR ...]   # 2-10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def commands(src: Path) -> dict[str, list[str]]:
    entry = "tokenformer_vision_cli" if (src / "tokenformer_vision_cli.py").is_file() else "tokenformer_vision.cli"
    cli = [sys.executable, "-m", entry]
    return {
        "python -c 'import timm'": [sys.executable, "-c", "import timm"],
        "python -c 'import tokenformer_vision'": [sys.executable, "-c", "import tokenformer_vision"],
        "tokenformer-vision --version": [*cli, "--version"],
        "tokenformer-vision --help": [*cli, "--help"],
        "tokenformer-vision export --help": [*cli, "export", "--help"],
        "tokenformer-vision fit --help": [*cli, "fit", "--help"],
        "tokenformer-vision fit --model.nonfinite maybe (argument error)":
            [*cli, "fit", "--data", "DigitsDataModule", "--model.nonfinite", "maybe"],
    }


def environment(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore"}


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, int]:
    """(seconds, exit status, lines printed) of one run."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - start, proc.returncode, len((proc.stdout + proc.stderr).splitlines())


def importtime(cmd: list[str], env: dict[str, str], cwd: Path, top: int) -> list[tuple[float, str]]:
    """The ``top`` imports two levels deep at most (what the command imports, and what those import) with the
    largest cumulative time (seconds)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    rows = [(int(m.group(2)) / 1e6, m.group(3).rstrip()) for m in
            re.finditer(r"import time:\s+(\d+) \|\s+(\d+) \|( *\S+)", proc.stderr)
            if len(m.group(3)) - len(m.group(3).lstrip()) <= 5]  # the name is indented by 1 + 2 per level
    return sorted(rows, key=lambda r: -r[0])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (the median is reported)")
    parser.add_argument("--src", type=Path, action="append", help="checkout to measure (default: this one)")
    parser.add_argument("--top", type=int, default=12, help="imports listed per -X importtime profile")
    args = parser.parse_args()
    sources = [p.resolve() for p in args.src or [REPO]]
    cwd = Path("/tmp") if Path("/tmp").is_dir() else REPO  # no stray runs/ folder in a checkout
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.repeat} runs per command and checkout")
    print("".join(f"\n[{i}] {src}" for i, src in enumerate(sources)) + "\n")
    print("| command | " + " | ".join(f"[{i}] median s (min-max) | exit | lines" for i in range(len(sources))) + " |")
    print("|---|" + "---:|---:|---:|" * len(sources))
    for name in commands(sources[0]):
        runs: list[list[tuple[float, int, int]]] = [[] for _ in sources]
        for src in sources:  # warm the file cache
            timed(commands(src)[name], environment(src), cwd)
        for _ in range(args.repeat):
            for i, src in enumerate(sources):
                runs[i].append(timed(commands(src)[name], environment(src), cwd))
        cells = []
        for r in runs:
            seconds = [t for t, _, _ in r]
            cells.append(f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | {r[-1][1]} | "
                         f"{r[-1][2]}")
        print(f"| `{name}` | " + " | ".join(cells) + " |", flush=True)
    for src in sources:
        for name in ("python -c 'import tokenformer_vision'", "tokenformer-vision fit --help"):
            print(f"\n`python -X importtime` of {name} in {src}: largest cumulative imports (s)")
            for seconds, module in importtime(commands(src)[name], environment(src), cwd, args.top):
                print(f"  {seconds:6.2f}  {module}")


if __name__ == "__main__":
    main()
