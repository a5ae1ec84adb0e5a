"""Cost of `import backbone_sdk; list_backbones()` over `import torch` alone, in fresh processes.

    python benchmarks/bench_import.py [--runs 7]

Also checks that listing imports neither detectron2, mmseg, transformers model classes nor timm (the timm
bridge, when installed, is loaded but resolves its names only on demand), and builds no model.
Target: median extra cost <= 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

BASE = "import time; t=time.perf_counter(); import torch; t1=time.perf_counter()"
SDK = BASE + """
import backbone_sdk, sys, json
names = backbone_sdk.list_backbones()
t2 = time.perf_counter()
heavy = sorted(m for m in sys.modules if m.startswith(("detectron2", "mmseg", "mmcv", "transformers.models.", "timm")))
plugins = sorted(r.name for r in backbone_sdk.plugin_report() if r.ok and not r.builtin)
print(json.dumps({"torch": t1 - t, "sdk": t2 - t1, "n": len(names), "heavy": heavy, "plugins": plugins}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = [json.loads(subprocess.run([sys.executable, "-c", SDK], capture_output=True, text=True, check=True,
                                      env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout)
            for _ in range(args.runs)]
    torch_s = statistics.median(r["torch"] for r in rows)
    extra = statistics.median(r["sdk"] for r in rows)
    print(f"import torch: {torch_s:.3f} s (median of {args.runs})")
    print(f"import backbone_sdk + list_backbones() ({rows[0]['n']} backbones): +{extra:.3f} s "
          f"(min {min(r['sdk'] for r in rows):.3f}, max {max(r['sdk'] for r in rows):.3f})")
    print(f"third-party plugins loaded: {', '.join(rows[0]['plugins']) or 'none'}")
    print(f"heavy modules imported: {rows[0]['heavy'] or 'none'}")
    ok = extra <= 0.3 and not rows[0]["heavy"]
    print("PASS" if ok else "FAIL", "(target: <= 0.3 s extra, no heavy imports)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
