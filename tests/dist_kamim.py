"""Run by test_kamim.py as `python tests/dist_kamim.py OUT ARGS...` (1 process) and under `torchrun
--nproc_per_node=2`: kamim.main(ARGS) with each rank recording the sample ids it loaded and its loss per forward."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import kamim  # noqa: E402

ids, losses = [], []
get, fwd = data.Seeded.__getitem__, kamim.KAMIM.forward
data.Seeded.__getitem__ = lambda self, i: ids.append(int(i[1] if isinstance(i, tuple) else i)) or get(self, i)
kamim.KAMIM.forward = lambda self, *a, **k: (lambda r: losses.append(r[0].item()) or r)(fwd(self, *a, **k))
out = sys.argv[1]
kamim.main(["--out", out, *sys.argv[2:]])
rank = int(os.environ.get("RANK", 0))
json.dump(dict(ids=ids, losses=losses), open(os.path.join(out, f"rank{rank}.json"), "w"))
