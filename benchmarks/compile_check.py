"""--compile on the CPU (issue 26): graph breaks and recompiles of every script's compiled model.

    python benchmarks/compile_check.py                   # every case, several minutes on 2 cores
    python benchmarks/compile_check.py --only lut mae    # some cases

Each case runs 2 training steps of a script's demo (no --data: DemoShapes) at vit_demo, 32 px, batch
8, no loader workers, with --compile, in its own process (a fresh inductor cache: cold compiles)
under TORCH_LOGS="dynamo,graph_breaks,recompiles"; the table counts the graphs dynamo hands to
inductor, the graph breaks and recompiles it logs, and lists their unique reasons. The last case,
`lut.compile_blocks`, is LUT under torchrun + --compile on CUDA with SyncBatchNorm: each transformer
block compiled in place, the heads eager. Here it runs on the CPU (plain BatchNorm) for 2
forward / backward / SGD steps of a random batch, and its loss must equal the eager model's (same
weights, same seed) within 1e-5 relative.

Exits 1 if a run fails, compiles no graph, or a count differs from the expected one (EXPECT).
Not a test: pytest does not collect benchmarks/ (testpaths = tests).
"""
import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--workers", "0", "--max-steps", "2", "--epochs", "1", "--warmup-epochs", "0",
        "--log-every", "1", "--batch-size", "8", "--img-size", "32", "--compile"]
KAMIM = ["--mask-patch", "8", "--wps", "4"]  # 32 px: 4 x 4 mask cells
PROBE = ["--pool", "abmilp", "--no-cache-features"]  # cached: the encoder runs once, not per step
# name -> the script's command line (each gets TINY and its own --out)
CASES = {
    "kamim": ["kamim.py", *KAMIM],
    "simmim": ["kamim.py", *KAMIM, "--detector", "none"],
    "lut": ["lut.py", "--head-hidden", "64"],
    "mae": ["lut.py", "--alpha", "0"],
    "semanticmim": ["semanticmim.py"],
    "vanilla_mim": ["semanticmim.py", "--proxies", "0"],
    "abmilp_probe": ["abmilp_probe.py", *PROBE],
    "finetune": ["finetune.py"],
    "lut.compile_blocks": [os.path.relpath(__file__, ROOT), "--blocks"],
}
# name -> (graph breaks, recompiles) where not (0, 0). compile_blocks: one code object, vit.Block's
# forward, meets 4 inputs: the student's visible tokens, then the decoder's whole sequence at its
# own width (dynamo makes the sizes dynamic), the no-grad teacher, the probe's 1/16 of the batch
EXPECT = {"lut.compile_blocks": (0, 3)}
LOG = re.compile(r"\[__(graph_breaks|recompiles)\] ?(.*)$")


def short(loc):
    """A file:line inside the repository relative to it, torch's from site-packages on."""
    loc = os.path.relpath(loc, ROOT) if loc.startswith(ROOT) else loc
    return loc.split("site-packages/")[-1]


def reasons(stderr):
    """dynamo's log records in stderr -> (graph break reasons, recompile reasons), one line each."""
    records = []  # (kind, lines): a record starts at 'Graph break ' / 'Recompiling function '
    for line in stderr.splitlines():
        m = LOG.search(line)
        if m and m[2].startswith(("Graph break ", "Recompiling function ")):
            records.append((m[1], [m[2]]))
        elif m and records and records[-1][0] == m[1]:
            records[-1][1].append(m[2])
    breaks, recompiles = [], []
    for kind, lines in records:
        if kind == "graph_breaks":
            loc = re.search(r"in user code at (\S+)", lines[0])
            why = [s.strip() for s in lines[1:] if s.strip()]
            # 'Graph Break Reason: ...', then the break's type and its explanation
            what = why[1] if len(why) > 1 and not why[1].startswith("Explanation") else why[0]
            expl = next((s for s in why if s.startswith("Explanation: ")), "")
            expl = f" ({expl[13:][:100]})" if expl else ""
            breaks.append(f"{short(loc[1]) if loc else '?'}: {what}{expl}")
        else:
            fn = re.match(r"Recompiling function (\S+) in (\S+)", lines[0])
            guard = next((s.strip()[2:] for s in lines[1:] if s.strip().startswith("- ")), "?")
            recompiles.append(f"recompile {fn[1]} ({short(fn[2])}): {guard}")
    return breaks, recompiles


def check_blocks():
    """lut.compile_blocks on the CPU: 2 steps as lut.py's loop takes them (the online probe on the
    encoder after the backward, the EMA after the optimiser), against the eager model."""
    import torch
    sys.path.insert(0, ROOT)
    import lut
    import online_probe
    import vit
    torch.manual_seed(0)
    model = lut.LUT(vit.vit("vit_demo", img_size=32), head_hidden=64).train()
    eager = copy.deepcopy(model)
    lut.compile_blocks(model)
    # --data's share (1/16 of 8: 2 images); the probe never changes pretraining
    probe = online_probe.OnlineProbe(model.encoder, 6, share=1 / 16)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, model)]
    img, context = torch.randn(2, 8, 3, 32, 32)
    worst, worst_grad = 0.0, 0.0
    for step in range(2):
        losses, grads = [], []
        for m, opt in zip((eager, model), opts):
            torch.manual_seed(step)  # the same masks
            loss, _ = m(img, context)
            loss.backward()
            if m is model:
                probe.step(m.encoder, img, torch.arange(8) % 6)
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
            opt.step()
            opt.zero_grad()
            m.update_teacher(0.99)
        worst = max(worst, abs(losses[1] - losses[0]) / abs(losses[0]))
        worst_grad = max([worst_grad] + [((a - b).norm() / a.norm()).item()
                                         for a, b in zip(*grads)])
        print(f"step {step}: loss eager {losses[0]:.7f}, compiled blocks {losses[1]:.7f}")
    print(f"RESULT loss rel. diff {worst:.1e} (gradients {worst_grad:.0e})")
    sys.exit(0 if worst <= 1e-5 else 1)


def run(name, out):
    """One case in its own process: (seconds, graphs, breaks, recompiles, notes)."""
    cmd = [sys.executable, *CASES[name]]
    cmd += [] if name == "lut.compile_blocks" else TINY + ["--out", os.path.join(out, name)]
    # a fresh inductor cache: every case compiles from cold, whatever ran before
    env = {**os.environ, "TORCH_LOGS": "dynamo,graph_breaks,recompiles",
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(out, name + "_inductor")}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    breaks, recompiles = reasons(p.stderr)
    graphs = p.stderr.count("Step 2: done compiler function")  # dynamo's INFO: one per graph
    note = [s[7:] for s in p.stdout.splitlines() if s.startswith("RESULT ")]
    if p.returncode:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        print(f"{name} failed (exit {p.returncode}):\n  " + "\n  ".join(tail), flush=True)
        note.append(f"FAILED (exit {p.returncode})")
    return time.time() - t0, graphs, breaks, recompiles, note


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(CASES), help="these cases only")
    p.add_argument("--blocks", action="store_true", help=argparse.SUPPRESS)  # the child of its case
    args = p.parse_args()
    if args.blocks:
        return check_blocks()
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; each case: "
          f"{' '.join(TINY)}", flush=True)
    rows, bad, t0 = [], False, time.time()
    with tempfile.TemporaryDirectory() as out:
        for name in args.only or CASES:
            secs, graphs, breaks, recompiles, note = run(name, out)
            counts = (len(breaks), len(recompiles))
            # and something compiled: a model that bypassed torch.compile would show 0 / 0
            ok = (counts == EXPECT.get(name, (0, 0)) and graphs > 0
                  and not any(s.startswith("FAILED") for s in note))
            bad |= not ok
            uniq = [f"{s} (x{n})" if (n := (breaks + recompiles).count(s)) > 1 else s
                    for s in dict.fromkeys(breaks + recompiles)]
            rows.append((name, f"{secs:.0f}", graphs, *counts, "ok" if ok else "NO",
                         "; ".join(note + uniq) or "-"))
            print(f"{name}: {secs:.0f} s, {graphs} graphs, {len(breaks)} graph breaks, "
                  f"{len(recompiles)} recompiles", flush=True)
    print(f"\n{'script':<20}{'s':>5}{'graphs':>8}{'breaks':>8}{'recompiles':>12}  {'ok':<4}reasons")
    for name, secs, ng, nb, nr, ok, why in rows:
        print(f"{name:<20}{secs:>5}{ng:>8}{nb:>8}{nr:>12}  {ok:<4}{why}")
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
