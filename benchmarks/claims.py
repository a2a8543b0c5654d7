"""Each paper's claim at CPU scale: the method against its baseline at the same steps, batch and seed, over seeds.

    python benchmarks/claims.py                       # 3 seeds, about 30 minutes on 2 idle cores
    python benchmarks/claims.py --quick               # 1 seed, 1 epoch each: about 3 minutes (a smoke test, no claim)
    python benchmarks/claims.py --table-only          # the table from the runs finished so far

On the demo data (DemoShapes, 6 classes) it pretrains each pair with the script's own demo settings, their
--epochs passed explicitly, and --no-online-probe (the online probe never changes pretraining; beside other jobs
KAMIM ran 17 img/s with it, 30 without):
    KAMIM  `python kamim.py`        vs SimMIM       `--detector none`   (96 px: probed with --img-size 96)
    LUT    `python lut.py`          vs MAE          `--alpha 0`         (64 px)
    SemanticMIM `semanticmim.py`    vs vanilla MIM  `--proxies 0`       (64 px; mask ratio 0.6 vs 0.4, as the paper)
then probes every encoder with the demo probe `abmilp_probe.py` (cached block-4 tokens; kNN on [cls] and avg,
then linear heads on [cls], avg and AbMILP). Every paper claims method > baseline; Beyond [cls] claims
AbMILP > [cls] and AbMILP > avg on every encoder. The table gives each side's mean +- sd over the seeds
(sample sd, n - 1), the paired difference's mean +- sd and whether its sign is the paper's.

Budget, per step on 2 idle cores (2026-12-05), without the online probe: kamim 1.35 s (its demo: 6 epochs, 72
steps, ~1m40s; SimMIM 1.25 s), lut 0.13 s (8 epochs, 768 steps, ~1m40s; MAE 0.09 s), semanticmim 0.36 s (5 epochs,
120 steps, ~45 s; vanilla the same), the probe (30 epochs of each head) 20-30 s: ~10 min per seed, so the defaults
(the demos' own epochs, 3 seeds) take about 30 minutes; a shared machine takes longer (the ETA says how much).
--quick (1 seed, 1 epoch each, 3 probe epochs) took 2m41s: it checks the machinery; its heads are barely trained
and its differences noise.

Every run is an ordinary script run with its own --out under this --out; claims.py marks it finished
(claims_done.json: its command and wall time) when it exits 0. Rerunning resumes: finished runs are skipped, an
interrupted one is rerun and resumes from its checkpoint. Writes --out/claims.json and --out/claims.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (paper, script, probe px, (name, label, extra flags) of the method, then of the baseline)
PAIRS = [("KAMIM", "kamim.py", 96, ("kamim", "KAMIM", []), ("simmim", "SimMIM", ["--detector", "none"])),
         ("LUT", "lut.py", 64, ("lut", "LUT", []), ("mae", "MAE", ["--alpha", "0"])),
         ("SemanticMIM", "semanticmim.py", 64, ("semanticmim", "SemanticMIM", []),
          ("vanilla", "vanilla MIM", ["--proxies", "0"]))]
PROBES = {"knn_cls": "kNN [cls]", "knn_avg": "kNN avg", "cls": "[cls]", "avg": "avg", "abmilp": "AbMILP"}
# idle 2-core seconds per pretraining epoch (no online probe; + 5 s to start) and the probe's (start, per epoch) by
# its px, measured 2026-12-05: only for the ETA
EPOCH_S = dict(kamim=16.4, simmim=15.1, lut=12.3, mae=8.6, semanticmim=8.6, vanilla=9)
PROBE_S = {96: (14, 0.5), 64: (8.5, 0.5)}
DONE = "claims_done.json"


# ---- the runs ----

def plan(args):
    """Every run in the order to run it (seed by seed; each pretraining then its probe): dicts with name, seed,
    kind, out, cmd (the arguments after the interpreter), est (idle seconds, for the ETA)."""
    runs, cap = [], ["--max-steps", str(args.max_steps)] if args.max_steps else []
    for seed in args.seeds:
        for paper, script, px, *sides in PAIRS:
            if paper.lower() not in args.pairs:
                continue
            epochs = getattr(args, f"{script[:-3]}_epochs")
            for name, _, flags in sides:
                out = os.path.join(args.out, f"{name}_s{seed}")
                runs.append(dict(name=name, seed=seed, kind="pretrain", out=out, est=5 + EPOCH_S[name] * epochs,
                                 cmd=[script, "--out", out, "--seed", str(seed), "--epochs", str(epochs),
                                      "--no-online-probe", *flags, *cap]))
                start, per_epoch = PROBE_S[px]
                runs.append(dict(name=name, seed=seed, kind="probe", out=out + "_probe",
                                 est=start + per_epoch * args.probe_epochs,
                                 cmd=["abmilp_probe.py", "--checkpoint", os.path.join(out, "checkpoint.pt"),
                                      "--out", out + "_probe", "--seed", str(seed), "--img-size", str(px),
                                      "--epochs", str(args.probe_epochs), *cap]))
    return runs


def finished(run):
    """The run's wall seconds if claims.py saw it finish with this very command, else None; a different
    command fails: the folder holds another setting's run."""
    path = os.path.join(run["out"], DONE)
    if not os.path.exists(path):
        return None
    done = json.load(open(path))
    if done["cmd"] != run["cmd"]:
        raise SystemExit(f"{run['out']} was finished by `{' '.join(done['cmd'])}`, not `{' '.join(run['cmd'])}`: "
                         "give another --out (or delete that folder)")
    return done["seconds"]


def execute(run, python):
    """Run one script (its output to OUT/claims_stdout.txt) and mark it finished; a failure stops everything."""
    os.makedirs(run["out"], exist_ok=True)
    log, t0 = os.path.join(run["out"], "claims_stdout.txt"), time.time()
    with open(log, "a") as f:
        rc = subprocess.call([python, *run["cmd"]], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(open(log).readlines()[-15:])
        raise SystemExit(f"`{' '.join(run['cmd'])}` failed (exit {rc}); the end of {log}:\n{tail}")
    seconds = time.time() - t0
    json.dump(dict(cmd=run["cmd"], seconds=seconds), open(os.path.join(run["out"], DONE), "w"))
    return seconds


def clock(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_all(runs, python):
    """Each run not finished yet, with a progress line as it starts (elapsed, ETA: the idle estimates of the runs
    left, scaled by how this machine kept to the estimates so far) and as it ends."""
    t0, spent, est_done = time.time(), 0.0, 0.0
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run['kind']:8s} {run['name']:11s} seed {run['seed']}"
        seconds = finished(run)
        if seconds is not None:
            print(f"{head}: finished before ({clock(seconds)}), skipped", flush=True)
            continue
        left = sum(r["est"] for r in runs[i - 1:] if not os.path.exists(os.path.join(r["out"], DONE)))
        print(f"{head}: elapsed {clock(time.time() - t0)}, ETA {clock(left * (spent / est_done if est_done else 1))}"
              f"  python {' '.join(run['cmd'])}", flush=True)
        seconds = execute(run, python)
        spent, est_done = spent + seconds, est_done + run["est"]
        print(f"{head}: done in {clock(seconds)}", flush=True)


# ---- the results ----

def probe_top1(probe_out):
    """{probe: top-1 %} from the last evaluation record of each pooling's log.jsonl (abmilp_probe.py's --pool all
    layout: <out>/<pool>/log.jsonl; the knn pool's records say pool knn_cls / knn_avg)."""
    top1 = {}
    for pool in ("cls", "avg", "abmilp", "knn"):
        for r in map(json.loads, open(os.path.join(probe_out, pool, "log.jsonl"))):
            if "top1" in r:
                top1[r["pool"]] = r["top1"]
    missing = set(PROBES) - set(top1)
    if missing:
        raise SystemExit(f"{probe_out}: no top-1 for {sorted(missing)} although the probe finished")
    return top1


def results(runs):
    """{name: {seed: {probe: top-1}}} over the finished probe runs."""
    res = {}
    for run in runs:
        if run["kind"] == "probe" and finished(run) is not None:
            res.setdefault(run["name"], {})[run["seed"]] = probe_top1(run["out"])
    return res


def compare(a, b):
    """Paired seeds' values of the method (a) and the baseline (b), {seed: value} -> their means, sample sds
    (None for one seed), the mean and sd of the per-seed differences a - b, and whether its sign is the
    paper's (a > b): 'yes' / 'no', with '*' when |mean difference| <= its sd (within the seeds' noise)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
    d = [x - y for x, y in zip(xa, xb)]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else None)
    row = dict(seeds=seeds, a=xa, b=xb, a_mean=statistics.mean(xa), a_sd=sd(xa), b_mean=statistics.mean(xb),
               b_sd=sd(xb), diff=statistics.mean(d), diff_sd=sd(d))
    noise = row["diff_sd"] is not None and abs(row["diff"]) <= row["diff_sd"]
    return dict(row, sign=("yes" if row["diff"] > 0 else "no") + ("*" if noise else ""))


def table(res):
    """The rows: each pair on each probe, then Beyond [cls]'s AbMILP vs [cls] and vs avg on each encoder."""
    rows, get = [], (lambda name, probe: {s: v[probe] for s, v in res.get(name, {}).items()})
    for paper, _, _, (m, ml, _), (b, bl, _) in PAIRS:
        for probe, label in PROBES.items():
            c = compare(get(m, probe), get(b, probe))
            if c:  # None: no seed has both
                rows.append(dict(paper=paper, method=ml, baseline=bl, probe=label, **c))
    for _, _, _, *sides in PAIRS:
        for name, label, _ in sides:
            for other in ("cls", "avg"):
                c = compare(get(name, "abmilp"), get(name, other))
                if c:
                    rows.append(dict(paper="Beyond [cls]", method="AbMILP", baseline=PROBES[other], probe=label, **c))
    return rows


def text(rows):
    pm = (lambda m, s: f"{m:6.2f} +- {s:5.2f}" if s is not None else f"{m:6.2f}         ")
    lines = [f"{'paper':12s}  {'method vs baseline':26s}  {'probe / encoder':15s}  {'method':15s}  {'baseline':15s}  "
             f"{'difference':16s}  n  paper's sign"]
    for r in rows:
        diff = f"{r['diff']:+6.2f}" + (f" +- {r['diff_sd']:5.2f}" if r["diff_sd"] is not None else " " * 9)
        lines.append(f"{r['paper']:12s}  {r['method'] + ' vs ' + r['baseline']:26s}  {r['probe']:15s}  "
                     f"{pm(r['a_mean'], r['a_sd'])}  {pm(r['b_mean'], r['b_sd'])}  {diff:16s}  "
                     f"{len(r['seeds'])}  {r['sign']}")
    return "\n".join(lines + ["top-1 % on the demo's val split (chance 16.7); mean +- sample sd over the seeds; "
                              "difference = method - baseline, paired by seed; * = |difference| <= its sd"])


def plot(rows, path, w=460, h=330, pad=36):
    """One panel per pair: each probe's mean top-1 of method (blue) and baseline (grey), a line from
    mean - sd to mean + sd and a dot per seed."""
    panels = []
    for paper, _, _, (_, ml, _), (_, bl, _) in PAIRS:
        img = np.full((h, w, 3), 255, np.uint8)
        y = (lambda v: int(h - pad - v / 100 * (h - 2 * pad)))  # top-1 0..100 % -> pixel row
        cv2.putText(img, f"{ml} (blue) vs {bl} (grey)", (pad, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        for v in range(0, 101, 25):
            cv2.line(img, (pad, y(v)), (w - 8, y(v)), (225, 225, 225), 1)
            cv2.putText(img, str(v), (4, y(v) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        mine = {r["probe"]: r for r in rows if r["paper"] == paper}
        gw = (w - pad - 8) // len(PROBES)
        for j, label in enumerate(PROBES.values()):
            x0 = pad + j * gw + 6
            cv2.putText(img, label, (x0, h - pad + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
            r = mine.get(label)
            for k, (key, colour) in enumerate((("a", (200, 110, 40)), ("b", (150, 150, 150)))) if r else ():
                x, bw, m, sd = x0 + k * (gw - 12) // 2, (gw - 12) // 2 - 4, r[f"{key}_mean"], r[f"{key}_sd"] or 0
                cv2.rectangle(img, (x, y(m)), (x + bw, y(0)), colour, -1)
                cv2.line(img, (x + bw // 2, y(m - sd)), (x + bw // 2, y(m + sd)), (0, 0, 0), 2)
                for v in r[key]:
                    cv2.circle(img, (x + bw // 2, y(v)), 2, (0, 0, 200), -1)
        cv2.line(img, (pad, y(0)), (w - 8, y(0)), (0, 0, 0), 1)
        cv2.line(img, (pad, y(100 / 6)), (w - 8, y(100 / 6)), (0, 0, 200), 1)  # chance: 6 classes
        panels.append(img)
    cv2.imwrite(path, np.concatenate(panels, 1))


# ---- command line ----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="runs/claims", help="folder of every run (NAME_sSEED, NAME_sSEED_probe), claims.json and "
      "claims.png (default %(default)s)")
    a("--seeds", type=int, nargs="+", help="pretraining and probe seeds (default 0 1 2; --quick 0)")
    a("--pairs", nargs="+", default=["kamim", "lut", "semanticmim"], choices=["kamim", "lut", "semanticmim"],
      help="which papers' pairs to run (default all three; Beyond [cls] is read off every encoder)")
    a("--kamim-epochs", type=int, help="kamim.py --epochs for KAMIM and SimMIM, 12 steps each (default: the "
      "demo's 6; --quick 1)")
    a("--lut-epochs", type=int, help="lut.py --epochs for LUT and MAE, 96 steps each (default: the demo's 8; --quick 1)")
    a("--semanticmim-epochs", type=int, help="semanticmim.py --epochs for SemanticMIM and vanilla MIM, 24 steps each "
      "(default: the demo's 5; --quick 1)")
    a("--probe-epochs", type=int, help="abmilp_probe.py --epochs of each linear head, 6 steps each (default: the "
      "demo's 30; --quick 3)")
    a("--max-steps", type=int, help="pass --max-steps to every script (tests, smoke runs: no claim)")
    a("--quick", action="store_true", help="1 seed, 1 epoch of each, 3 probe epochs: checks the machinery in about "
      "3 minutes; its differences are noise")
    a("--table-only", action="store_true", help="run nothing: the table, JSON and PNG of the runs finished so far")
    a("--python", default=sys.executable, help="interpreter for the scripts (default this one)")
    args = p.parse_args(argv)
    for k, full, quick in (("seeds", [0, 1, 2], [0]), ("kamim_epochs", 6, 1), ("lut_epochs", 8, 1),
                           ("semanticmim_epochs", 5, 1), ("probe_epochs", 30, 3)):
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    if min(args.kamim_epochs, args.lut_epochs, args.semanticmim_epochs) < 1 or args.probe_epochs < 2:
        p.error("epochs must be >= 1 (--probe-epochs >= 2: the probe's demo warms up for 1)")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    args.out = os.path.abspath(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = plan(args)
    if not args.table_only:
        run_all(runs, args.python)
    rows = table(results(runs))
    print(text(rows))
    os.makedirs(args.out, exist_ok=True)
    json.dump(dict(settings=vars(args), rows=rows), open(os.path.join(args.out, "claims.json"), "w"), indent=1)
    plot(rows, os.path.join(args.out, "claims.png"))
    print(f"wrote {args.out}/claims.json and claims.png")
    return rows


if __name__ == "__main__":
    main()
