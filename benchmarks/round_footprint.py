"""The files and functions of the project that one round touches: a reader's map of a round.

Runs `spinlab.run.run` (what `python train.py` runs) in this process on `debug=fast rounds=1`
(plus any overrides given) under a profiler hook and lists every function defined in train.py or
src/spinlab/ that was called, by file, with the lines of those functions (nested ones counted once)
and of the files they are in. Not a speed measurement: the counts say how much code a newcomer
follows through a round.

    python benchmarks/round_footprint.py                # the default round on the tiny model
    python benchmarks/round_footprint.py objective=sft  # another method's round
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@functools.cache
def lines_of(code) -> tuple[int, int]:
    """The first and last source line of a function."""
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_firstlineno, max([code.co_firstlineno, *numbers])


def covered(spans) -> int:
    """Lines in the union of (first, last) spans: a function defined inside another counts once."""
    total, end = 0, 0
    for first, last in sorted(spans):
        if last > end:
            total += last - max(first, end + 1) + 1
            end = last
    return total


@functools.cache  # called on every Python call of the run: resolve each file once
def ours(path: str) -> str | None:
    p = Path(path).resolve()
    if p == REPO / "train.py":
        return "train.py"
    src = REPO / "src" / "spinlab"
    return str(p.relative_to(REPO)) if p.is_relative_to(src) else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--json", help="also write the lists here")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from spinlab.run import run

    touched: dict[str, set] = defaultdict(set)

    def profile(frame, event, arg):
        # A class body run while its module is imported is not a call a reader follows.
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_name != "<module>":
            name = ours(frame.f_code.co_filename)
            if name is not None:
                touched[name].add(frame.f_code)

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["debug=fast", "rounds=1", *args.overrides])
        with open_dict(cfg):
            cfg.run_dir, cfg.run_name = str(Path(tmp) / "run"), "footprint"
        sys.setprofile(profile)
        try:
            run(cfg)
        finally:
            sys.setprofile(None)

    # Generated code (dataclass __init__, lambdas, comprehensions) is not a function a reader follows.
    codes = {f: [c for c in found if "<" not in c.co_qualname] for f, found in sorted(touched.items())}
    codes = {f: found for f, found in codes.items() if found}
    functions = {f: sorted({c.co_qualname for c in found}) for f, found in codes.items()}
    lines_run = {f: covered({lines_of(c) for c in found}) for f, found in codes.items()}
    lines_files = sum(len((REPO / f).read_text().splitlines()) for f in functions)
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "src" / "spinlab").rglob("*.py"))
    for f, names in functions.items():
        print(f"{f} ({len(names)} functions, {lines_run[f]} lines): {', '.join(names)}")
    total = sum(len(n) for n in functions.values())
    print(
        f"\n{len(functions)} files, {total} functions, {sum(lines_run.values())} lines in those functions; "
        f"those files: {lines_files} lines; src/spinlab/**/*.py: {lines} lines"
    )
    if args.json:
        record = {
            "files": functions,
            "lines_run": lines_run,
            "lines_files": lines_files,
            "lines_src": lines,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
