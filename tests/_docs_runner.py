"""Runs the code blocks of one documentation page, each on its own (run by tests/test_docs_pages.py).

    python tests/_docs_runner.py BLOCKS.json WORKDIR

BLOCKS.json is a list of ``{"page", "line", "kind", "code"}``. Every block gets a fresh namespace, a
fresh working directory holding ``photos/`` (the bundled sample images), ``cat.jpg`` and a link to
the repository's ``examples/`` (pages name example files from the repository root), and seed 0,
so a block that leans on an earlier one fails. ``kind`` is ``python`` (executed) or ``shell`` (``backbone-sdk ...``
commands, one per line, run in order through the installed console script). Stops at the first failure
with the page and line of the block.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _workdir(root: Path, i: int) -> Path:
    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    samples = repo / "backbone_sdk" / "assets" / "samples"
    work = root / f"block{i:02d}"
    (work / "photos").mkdir(parents=True)
    (work / "examples").symlink_to(repo / "examples")  # pages name example files from the repository root
    for image in sorted(samples.glob("*.png")):
        shutil.copy(image, work / "photos" / image.name)
    Image.open(samples / "house.png").convert("RGB").save(work / "cat.jpg")
    return work


def main(blocks_file: str, root: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    blocks = json.loads(Path(blocks_file).read_text())
    script = Path(sys.executable).with_name("backbone-sdk")
    for i, block in enumerate(blocks):
        where = f"{block['page']}:{block['line']}"
        work = _workdir(Path(root), i)
        os.chdir(work)
        torch.manual_seed(0)
        start = time.perf_counter()
        print(f"--- {where} ({block['kind']})", flush=True)
        if block["kind"] == "shell":  # the block's commands in order, in one working directory
            for command in block["code"].splitlines():
                argv = shlex.split(command)
                run = subprocess.run([str(script), *argv[1:]], capture_output=True, text=True)
                print(f"$ {command}", run.stdout[-2000:], run.stderr[-2000:], sep="\n", flush=True)
                if run.returncode != 0:
                    print(f"FAILED {where}: `{command}` exited {run.returncode}", flush=True)
                    return 1
        else:
            try:
                exec(compile(block["code"], where, "exec"), {"__name__": "__main__"})
            except BaseException:
                traceback.print_exc()
                print(f"FAILED {where}", flush=True)
                return 1
        print(f"--- ok in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
