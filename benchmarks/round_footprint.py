"""The files and functions of the project that one round touches: a reader's map of a round.

Runs `train.run` in this process on `debug=fast rounds=1` (plus any overrides given) under a
profiler hook and lists every function defined in train.py or src/spinlab/ that was called, by
file. Not a speed measurement: the counts say how much code a newcomer follows through a round.

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

    import train

    touched: dict[str, set[str]] = defaultdict(set)

    def profile(frame, event, arg):
        # A class body run while its module is imported is not a call a reader follows.
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_name != "<module>":
            name = ours(frame.f_code.co_filename)
            if name is not None:
                touched[name].add(frame.f_code.co_qualname)

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["debug=fast", "rounds=1", *args.overrides])
        with open_dict(cfg):
            cfg.run_dir, cfg.run_name = str(Path(tmp) / "run"), "footprint"
        sys.setprofile(profile)
        try:
            train.run(cfg)
        finally:
            sys.setprofile(None)

    # Generated code (dataclass __init__, lambdas, comprehensions) is not a function a reader follows.
    functions = {f: sorted(n for n in names if "<" not in n) for f, names in sorted(touched.items())}
    functions = {f: names for f, names in functions.items() if names}
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "src" / "spinlab").glob("*.py"))
    for f, names in functions.items():
        print(f"{f} ({len(names)}): {', '.join(names)}")
    total = sum(len(n) for n in functions.values())
    print(f"\n{len(functions)} files, {total} functions; src/spinlab/*.py: {lines} lines")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": functions, "lines_src": lines}, indent=1))


if __name__ == "__main__":
    main()
