"""Start-up time of the command lines: `python pretrain.py --help` (and the other stages') against `import torch`.

    python bench/startup.py                 # 7 runs each, the median and the range
    python bench/startup.py --runs 15 --json startup.json

The target: `--help` answers in well under a second, i.e. far below what importing torch alone costs, because
the config and the command line import neither torch nor timm (the stage is imported only after parsing).
Each figure is the wall time of a fresh interpreter, so it includes Python's own start-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import crate_mae.config'": [sys.executable, "-c", "import crate_mae.config"],
    "python pretrain.py --help": [sys.executable, str(ROOT / "pretrain.py"), "--help"],
    "python linprobe.py --help": [sys.executable, str(ROOT / "linprobe.py"), "--help"],
    "python finetune.py --help": [sys.executable, str(ROOT / "finetune.py"), "--help"],
}


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per command")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for name, command in COMMANDS.items():
        wall(command)  # one untimed run: the page cache holds the files afterwards, as on a used machine
        times = [wall(command) for _ in range(args.runs)]
        rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "runs": args.runs})
        print(f"{name:<38} median {rows[-1]['median_s']:.3f} s  (range {min(times):.3f}–{max(times):.3f})")
    torch_s = rows[0]["median_s"]
    for row in rows[2:]:
        print(f"{row['command']:<38} {row['median_s'] / torch_s:.2f} × `import torch`")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
