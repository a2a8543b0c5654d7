"""The first thing a freshly lent GPU runs (issue 26): every script end to end at ViT-B on a
generated JPEG folder, a kill and resume, bf16 against fp32 losses, nvJPEG against the CPU decode,
one compiled pair and the eager benches. Each part runs in its own subprocess under its own
timeout, the whole under a budget (GPU: 465 s): a failure is recorded and the next part runs. Writes
OUTDIR/gpu_check.json (every figure, with the device, torch version and git commit) and
OUTDIR/log.txt (all subprocess output), then prints a summary table.

    bash benchmarks/gpu_check.sh /tmp/gpu_check             # one H100, at most 8 minutes
    bash benchmarks/gpu_check.sh /tmp/gpu_check_cpu --cpu   # rehearsal: CPU, vit_demo, 2-3 steps

Internal entry points (the driver calls itself): --part NAME OUTDIR [--cpu] runs one part;
--wrap SCRIPT RESULT [--fp32] ARGS... runs SCRIPT.main(ARGS) in process and writes the peak GPU
memory to RESULT (--fp32: run.autocast patched to no autocast, TF32 off: the reference).
"""
import collections
import contextlib
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TOL = 0.02  # bf16 vs fp32: relative difference of each of the first logged losses
DECODE_TOL = 1.0  # nvJPEG vs libjpeg: mean absolute difference, in uint8 levels
KEEP = ("lut", "semanticmim")  # runs whose checkpoint a later part loads (the others are deleted)

# GPU: 2005 train images at batch 96 = 20 steps an epoch: 20 steps end an epoch (held-out probe,
# figure) and stop in one checkpoint; img/s etc. are medians over steps 9-20
GPU = dict(model="vit_b", classes=8, train=250, val=50, px=(400, 500), batch=96, steps=20, warm=8,
           workers=10, probe_batch=256, probe_steps=10, resume=(4, 12), fp32_steps=5, budget=465)
CPU = dict(model="vit_demo", classes=4, train=9, val=4, px=(48, 80), batch=16, steps=3, warm=1,
           workers=1, probe_batch=16, probe_steps=3, resume=(2, 6), fp32_steps=3, budget=1800)


def config(out, cpu):
    c = dict(CPU if cpu else GPU, cpu=cpu, out=os.path.abspath(out))
    c["data"] = os.path.join(c["out"], "data")
    return c


# ---- subprocesses ----

def sh(cmd, env=None, kill_when=None):
    """Run cmd from the repository root, its output streamed into ours (the log) and kept;
    kill_when(): polled, True sends SIGKILL. -> (exit code, output lines, killed)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace", cwd=ROOT, env={**os.environ, **(env or {})})
    lines = []

    def pump():
        for line in p.stdout:
            sys.stdout.write(line)
            lines.append(line)
    t = threading.Thread(target=pump)
    t.start()
    killed = False
    while p.poll() is None:
        if kill_when and not killed and kill_when():
            p.kill()
            killed = True
        time.sleep(0.05)
    t.join()  # EOF once the loader workers are gone too
    return p.returncode, lines, killed


def check(rc, lines, what):
    if rc:
        last = next((s.strip() for s in reversed(lines) if s.strip()), "")
        raise RuntimeError(f"{what} exited {rc}: {last[:200]}")


def wrap(argv):
    """--wrap SCRIPT RESULT [--fp32] ARGS...: SCRIPT.main(ARGS) in this process, then its peak GPU
    memory, wall time and return value to RESULT."""
    script, result, *argv = argv
    fp32 = argv[:1] == ["--fp32"]
    argv = argv[1:] if fp32 else argv
    sys.path.insert(0, ROOT)
    import resource
    import torch
    import run
    if fp32:  # the reference: the same steps without bf16 autocast and without TF32
        setup = run.setup

        def setup32(seed=0):
            out = setup(seed)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            return out
        run.setup, run.autocast = setup32, lambda device: contextlib.nullcontext()
    t = time.time()
    ret = importlib.import_module(script).main(argv)
    cuda = torch.cuda.is_available()
    res = dict(seconds=time.time() - t, fp32=fp32,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
               rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               returned=ret if isinstance(ret, (dict, tuple, list)) else None)
    with open(result, "w") as f:
        json.dump(res, f, default=str)


# ---- the scripts ----

def flags(c, script, out, *extra):
    """A script's flags here: ViT-B at the paper's size on the GPU, vit_demo at 64 px on the CPU;
    `extra` last (a repeated flag: the last wins)."""
    a = ["--data", c["data"], "--model", c["model"], "--out", out, "--workers", str(c["workers"]),
         "--batch-size", str(c["batch"]), "--max-steps", str(c["steps"]), "--log-every", "1"]
    if c["cpu"]:
        a += ["--img-size", "64"]
        if script == "lut":
            a += ["--decoder-dim", "128", "--decoder-depth", "2", "--decoder-heads", "4",
                  "--head-hidden", "256"]
    return a + [str(e) for e in extra]


def wrapped(script, result, argv, fp32=False, kill_when=None):
    cmd = [PY, os.path.abspath(__file__), "--wrap", script, result] + ["--fp32"] * fp32 + argv
    return sh(cmd, kill_when=kill_when)


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(s) for s in f if s.strip()]


def loss_of(r):
    """The total loss of a log record ("loss", or SemanticMIM's "loss_hog")."""
    return r.get("loss", next((v for k, v in r.items() if k.startswith("loss")), None))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_figures(c, folder, result):
    """A run's figures from its log.jsonl and the wrapper's result: img/s, TFLOP/s and MFU (median
    step after the first `warm`, the loader included), peak GPU memory, the first losses."""
    recs = read_log(folder)
    steps = [r for r in recs if "img_s" in r]
    steady = [r for r in steps if r["step"] > c["warm"]] or steps
    with open(result) as f:
        res = json.load(f)
    losses = [loss_of(r) for r in steps]
    f = dict(steps=steps[-1]["step"] if steps else 0, losses=losses[:5],
             last_loss=losses[-1] if losses else None,
             img_s=med(r["img_s"] for r in steady), tflops=med(r.get("tflops") for r in steady),
             mfu=med(r.get("mfu") for r in steady), **res)
    for k in ("probe_val_top1", "top1", "skipped"):
        v = [r[k] for r in recs if k in r]
        if v:
            f[k] = v[-1]
    f["key"] = (f"{f['img_s'] or 0:.0f} img/s" + (f", MFU {f['mfu']:.1%}" if f["mfu"] else "")
                + (f", peak {f['peak_gib']:.1f} GiB" if f["peak_gib"] else "")
                + (f", loss {losses[0]:.3f}->{losses[-1]:.3f}" if losses else "")
                + (f", top-1 {f['top1']:.1f}" if "top1" in f else "")
                + (f", {f['skipped']} skipped" if "skipped" in f else ""))
    return f


def script_part(c, name, script, *extra, fp32=False):
    out = os.path.join(c["out"], "runs", name)
    check(*wrapped(script, out + ".json", flags(c, script, out, *extra), fp32)[:2], script)
    f, ckpt = run_figures(c, out, out + ".json"), os.path.join(out, "checkpoint.pt")
    f["checkpoint_mib"] = os.path.getsize(ckpt) / 2**20 if os.path.exists(ckpt) else None
    if name not in KEEP and os.path.exists(ckpt):  # ViT-B's are 1-2 GB each
        os.remove(ckpt)
    return f


def checkpoint_of(c, name):
    """A finished run's checkpoint for the probe and fine-tuning (none: random init, said)."""
    path = os.path.join(c["out"], "runs", name, "checkpoint.pt")
    if os.path.exists(path):
        return ["--checkpoint", path]
    print(f"gpu_check: no {path}: random init")
    return []


def probe_part(c):
    """abmilp_probe.py --pool all on the cache: [cls], avg, AbMILP heads and the kNN, one cache."""
    out = os.path.join(c["out"], "runs", "probe")
    argv = flags(c, "abmilp_probe", out, "--pool", "all", "--cache-features", "--batch-size",
                 c["probe_batch"], "--max-steps", c["probe_steps"],
                 *checkpoint_of(c, "semanticmim"))
    check(*wrapped("abmilp_probe", out + ".json", argv)[:2], "abmilp_probe")
    f = run_figures(c, os.path.join(out, "abmilp"), out + ".json")
    top1 = {k: v[0] for k, v in f["returned"].items()}
    f["key"] = (f"AbMILP {f['img_s'] or 0:.0f} img/s on the cache"
                + (f", peak {f['peak_gib']:.1f} GiB" if f["peak_gib"] else "") + "; top-1 "
                + " ".join(f"{k} {v:.1f}" for k, v in top1.items()))
    return f


def part_result(c, name):
    try:
        with open(os.path.join(c["out"], "parts", name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):  # none, or cut short by a timeout
        return {}


def fp32_part(c, name, ref, script, *extra):
    """The first steps again without autocast (fp32, no TF32): each logged loss against the bf16
    run `ref`'s, relative difference < TOL."""
    bf16 = part_result(c, ref).get("losses")
    if not bf16:
        raise RuntimeError(f"no losses from the bf16 run ({ref}) to compare with")
    f = script_part(c, name, script, *extra, "--max-steps", c["fp32_steps"], fp32=True)
    n = min(len(bf16), len(f["losses"]))
    if not n:
        raise RuntimeError("the fp32 run logged no loss")
    rel = [abs(a - b) / max(abs(b), 1e-8) for a, b in zip(bf16[:n], f["losses"][:n])]
    f.update(bf16_losses=bf16[:n], fp32_losses=f["losses"][:n], rel_diff=rel, tol=TOL,
             status="ok" if max(rel) < TOL else "FLAG",
             key=f"max rel diff {max(rel):.2%} over {n} steps (tol {TOL:.0%})")
    return f


def lut_device_part(c):
    """lut.py --decode device (nvJPEG on the GPU) against the worker-decode run `lut`."""
    f = script_part(c, "lut_decode_device", "lut", "--decode", "device")
    ref = part_result(c, "lut").get("img_s")
    f["vs_worker"] = f["img_s"] / ref if ref else None
    f["key"] += f"; x{f['vs_worker']:.2f} vs --decode worker" if ref else "; no worker run"
    return f


def resume_part(c):
    """SimMIM started, SIGKILLed once its first checkpoint exists, the same command again: it must
    log {"resume": the checkpoint's step} and go on from the next step."""
    import torch
    every, steps = c["resume"]
    out = os.path.join(c["out"], "runs", "resume")
    argv = flags(c, "kamim", out, "--detector", "none", "--save-every", every, "--max-steps", steps)
    ckpt = os.path.join(out, "checkpoint.pt")
    rc, lines, killed = wrapped("kamim", out + ".json", argv,
                                kill_when=lambda: os.path.exists(ckpt))
    if not killed:
        raise RuntimeError(f"the run ended (exit {rc}) before a checkpoint was seen: no kill")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
    before = [r["step"] for r in read_log(out) if "img_s" in r]
    print(f"gpu_check: killed at logged step {before[-1] if before else 0}, checkpoint {saved}")
    check(*wrapped("kamim", out + ".json", argv)[:2], "the resumed kamim")
    recs = read_log(out)
    at = next((i for i, r in enumerate(recs) if "resume" in r), None)
    after = [r["step"] for r in recs[at:] if "img_s" in r] if at is not None else []
    ok = (at is not None and recs[at]["resume"] == saved and after[:1] == [saved + 1]
          and after[-1] == saved + steps)
    os.remove(ckpt)
    return dict(status="ok" if ok else "FAIL", checkpoint_step=saved,
                logged_before_kill=before[-1] if before else 0,
                resume_record=recs[at]["resume"] if at is not None else None,
                steps_after=after, key=f"killed at step {before[-1] if before else 0}, checkpoint "
                f"{saved}; resumed at {recs[at]['resume'] if at is not None else None}, steps "
                f"{after[0] if after else '-'}..{after[-1] if after else '-'}")


# ---- data and decode ----

def draw(job):
    """One noisy image of shapes (class k: its own kind of shape), written as a JPEG."""
    import cv2
    import numpy as np
    path, k, seed, (lo, hi) = job
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    img = cv2.resize(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y, r = int(rng.integers(w)), int(rng.integers(h)), int(rng.integers(4, max(5, w // 4)))
        kind = k % 4
        if kind == 0:
            cv2.circle(img, (x, y), r, col, -1)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + r, y + r // 2), col, -1)
        elif kind == 2:
            cv2.line(img, (x, y), (x + r, y + r), col, max(1, r // 8))
        else:
            pts = rng.integers(0, (w, h), (5, 2)).astype(np.int32)
            cv2.polylines(img, [pts], True, col, max(1, r // 10))
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def data_part(c):
    """An ImageNet-layout folder (train/CLASS, val/CLASS) of generated JPEGs, and ImageNet's quirks:
    a grey, a CMYK and an EXIF-rotated JPEG, a PNG named .JPEG, truncated JPEGs (train and val) and
    a stray text file."""
    import multiprocessing
    from PIL import Image
    t, jobs = time.time(), []
    for split, n in (("train", c["train"]), ("val", c["val"])):
        for k in range(c["classes"]):
            os.makedirs(os.path.join(c["data"], split, f"c{k}"), exist_ok=True)
            jobs += [(os.path.join(c["data"], split, f"c{k}", f"{split}_{k}_{i:04d}.JPEG"), k,
                      (split == "val") * 10**6 + k * 10**4 + i, c["px"]) for i in range(n)]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(draw, jobs, chunksize=16)
    d = lambda *p: os.path.join(c["data"], *p)
    rgb = Image.open(jobs[0][0]).convert("RGB")
    rgb.convert("L").save(d("train", "c0", "quirk_gray.JPEG"), quality=90)
    rgb.convert("CMYK").save(d("train", "c0", "quirk_cmyk.JPEG"), quality=90)
    rgb.save(d("train", "c1", "quirk_png.JPEG"), format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the worker transposes it, nvJPEG cannot (Jpeg.read re-encodes)
    rgb.save(d("train", "c1", "quirk_exif_rotated.JPEG"), quality=90, exif=exif)
    raw = open(jobs[0][0], "rb").read()
    for p in (d("train", "c2", "quirk_truncated.JPEG"), d("val", "c1", "quirk_truncated.JPEG")):
        with open(p, "wb") as f:
            f.write(raw[:len(raw) // 2])
    with open(d("train", "c2", "notes.txt"), "w") as f:
        f.write("not an image\n")
    mb = sum(os.path.getsize(j[0]) for j in jobs) / 2**20
    f = dict(images=len(jobs), train=c["train"] * c["classes"], val=c["val"] * c["classes"],
             classes=c["classes"], px=c["px"], mib=mb, quirks=6, seconds=time.time() - t)
    f["key"] = (f"{len(jobs)} JPEGs ({f['train']} train, {f['val']} val, {c['px'][0]}-"
                f"{c['px'][1]} px, {mb:.0f} MiB) + 6 quirks in {f['seconds']:.1f} s")
    return f


def decode_part(c):
    """torchvision.io.decode_jpeg on the device (nvJPEG; the CPU in the rehearsal) against the CPU
    decode (libjpeg) and PIL (the workers' decode): max and mean absolute difference, and img/s."""
    import glob
    import numpy as np
    import torch
    import torchvision
    sys.path.insert(0, ROOT)
    import data
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rgb = torchvision.io.ImageReadMode.RGB
    files = sorted(glob.glob(os.path.join(c["data"], "train", "*", "*.JPEG")))
    files = [p for p in files if "quirk" not in p][:64] + [p for p in files if "quirk" in p]
    jpegs, unreadable = [], []
    for p in files:
        try:
            jpegs.append(data.Jpeg.read(p))
        except Exception as e:
            unreadable.append(f"{os.path.basename(p)}: {e.__class__.__name__}")
    cpu = [torchvision.io.decode_jpeg(j.data, mode=rgb) for j in jpegs]
    refused = []
    try:
        on_dev = torchvision.io.decode_jpeg([j.data for j in jpegs], mode=rgb, device=dev)
    except RuntimeError as e:  # as data.decode_views: then image by image, to name the culprits
        print(f"gpu_check: the batched decode failed ({e}); one by one")
        on_dev = []
        for j in jpegs:
            try:
                on_dev.append(torchvision.io.decode_jpeg(j.data, mode=rgb, device=dev))
            except RuntimeError as e:
                refused.append(f"{os.path.basename(j.path)}: {e}"[:200])
                on_dev.append(None)
    keep = [i for i, x in enumerate(on_dev) if x is not None]
    on_dev, cpu, jpegs = [on_dev[i].cpu() for i in keep], [cpu[i] for i in keep], \
        [jpegs[i] for i in keep]
    pil = [torch.from_numpy(np.array(j.image())).permute(2, 0, 1) for j in jpegs]

    def diff(a, b):
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if x.shape != y.shape]
        d = [(x.int() - y.int()).abs() for x, y in zip(a, b) if x.shape == y.shape]
        return dict(max=max(int(x.max()) for x in d), mean=sum(float(x.float().mean()) for x in d)
                    / len(d), shape_mismatch=len(bad))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = [j.data for j in jpegs[:64]] * 4
    torchvision.io.decode_jpeg(batch, mode=rgb, device=dev)
    sync()
    t = time.time()
    for _ in range(3):
        torchvision.io.decode_jpeg(batch, mode=rgb, device=dev)
    sync()
    dev_ips = 3 * len(batch) / (time.time() - t)
    t = time.time()
    for j in jpegs[:64]:
        torchvision.io.decode_jpeg(j.data, mode=rgb)
    cpu_ips = min(64, len(jpegs)) / (time.time() - t)
    f = dict(device=str(dev), images=len(jpegs), unreadable=unreadable, refused=refused,
             device_vs_cpu=diff(on_dev, cpu), device_vs_pil=diff(on_dev, pil),
             cpu_vs_pil=diff(cpu, pil), device_img_s=dev_ips, cpu_img_s_one_thread=cpu_ips,
             tol_mean=DECODE_TOL)
    dc = f["device_vs_cpu"]
    ok = dc["mean"] <= DECODE_TOL and not dc["shape_mismatch"] and not refused
    f["status"] = "ok" if ok else "FLAG"
    f["key"] = (f"{dev.type} vs CPU decode: max {dc['max']}, mean {dc['mean']:.3f} (tol "
                f"{DECODE_TOL}); vs PIL mean {f['device_vs_pil']['mean']:.3f}; {dev.type} "
                f"{dev_ips:.0f} img/s, CPU {cpu_ips:.0f} (1 thread); {len(unreadable)} unreadable, "
                f"{len(refused)} refused")
    return f


# ---- benches and the environment ----

def bench_part(c, bench, *args, env=None):
    """A benchmarks/ script; its table rows parsed (time x beside FLOPs x, MFU); graph breaks and
    recompiles counted in its TORCH_LOGS output."""
    rc, lines, _ = sh([PY, f"benchmarks/{bench}.py", *[str(a) for a in args]], env)
    check(rc, lines, bench)
    rows, table = {}, False
    for s in lines:
        table = table or s.startswith("case ")
        r = table and not s.startswith("case ") and "[" not in s and table_row(s)
        if r:
            rows[r.pop("case")] = r
    f = dict(first_line=lines[0].strip() if lines else "", rows=rows,
             graph_breaks=sum("Graph break" in s and "in user code" in s for s in lines),
             recompiles=sum("Recompiling function" in s for s in lines))
    if rows:
        f["key"] = "; ".join(f"{k} {r['ms']:.0f} ms, x{r['time_x']:.2f} (FLOPs x{r['flops_x']:.2f})"
                             + (f", MFU {r['mfu']:.0%}" if r["mfu"] else "")
                             for k, r in rows.items())
    else:
        f["output"] = [s.rstrip() for s in lines if "[__" not in s][-12:]
        f["key"] = f["output"][-1][:120] if f["output"] else ""
    if bench == "bench_data":  # per script: ms/img in one process, cores at the 50 %-MFU rate
        at = next((i for i, s in enumerate(lines) if s.startswith("per script")), len(lines))
        f["ms_per_img"] = {" ".join(s.split()[:-2]): float(s.split()[-2]) for s in lines[at + 1:]
                           if len(s.split()) > 2 and s.split()[-2].replace(".", "").isdigit()}
        f["key"] = ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in f["ms_per_img"].items())
        f["key"] = "ms/img: " + f["key"]
    if env and "TORCH_LOGS" in env:
        f["key"] += f"; graph breaks {f['graph_breaks']}, recompiles {f['recompiles']}"
    return f


def table_row(s):
    """A row of timing.py's table -> {case, ms, img_s, ...} (MFU a fraction; '-' None), or None."""
    t = s.split()
    num = lambda v: None if v == "-" else float(v.rstrip("G%")) / (100 if "%" in v else 1)
    try:
        vals = [num(v) for v in t[-8:]]
    except ValueError:
        return None
    keys = ("ms", "img_s", "tflops", "mfu", "peak_gib", "gflops_img", "flops_x", "time_x")
    return dict(case=" ".join(t[:-8]), **dict(zip(keys, vals))) if len(t) >= 9 else None


def env_part(c):
    import platform
    import cv2
    import numpy
    import torch
    import torchvision
    cuda = torch.cuda.is_available()
    f = dict(torch=torch.__version__, cuda=torch.version.cuda, torchvision=torchvision.__version__,
             opencv=cv2.__version__, numpy=numpy.__version__, python=platform.python_version(),
             cpus=os.cpu_count(), gpus=torch.cuda.device_count(),
             device=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        f.update(gpu_mem_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                 cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,power.limit,clocks.max.sm"
        cmd = ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"]
        f["nvidia_smi"] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    if not c["cpu"] and not cuda:
        f["status"] = "FAIL"
    f["key"] = f"{f['device']}, torch {f['torch']}, CUDA {f['cuda']}, {f['cpus']} CPUs"
    return f


def parts(c):
    """[(name, timeout on the GPU in s, function of c)] in the order they run: the scripts, the
    checks, the compiled pair, then the eager benches (the budget cuts from the end). A lambda
    resolves an earlier run's checkpoint when its part runs."""
    S, ft, gpu = script_part, lambda c: checkpoint_of(c, "lut"), not c["cpu"]
    if gpu:  # the settings: ViT-B at each paper's size (run_all.sh gpu), fewer steps
        size = lambda px, n: ["--model", "vit_b", "--img-size", px, "--batch-size", n]
        b, compiled = ["--device", "cuda", "--warmup", 2, "--steps", 3], size(192, 256)
    else:  # the benches' small CPU defaults
        size, b = (lambda px, n: []), ["--warmup", 1, "--steps", 1]
        compiled = ["--img-size", 64, "--batch-size", 8]
    knn = ["--device", "cuda", "--bank", 1281167] if gpu else ["--bank", 16384]
    logs = dict(TORCH_LOGS="graph_breaks,recompiles")  # counted in the output
    return [
        ("env", 60, env_part),
        ("data", 90, data_part),
        ("kamim", 75, lambda c: S(c, "kamim", "kamim")),
        ("simmim", 75, lambda c: S(c, "simmim", "kamim", "--detector", "none")),
        ("lut", 75, lambda c: S(c, "lut", "lut")),
        ("mae", 75, lambda c: S(c, "mae", "lut", "--alpha", 0)),
        ("semanticmim", 75, lambda c: S(c, "semanticmim", "semanticmim")),
        ("vanilla_mim", 75, lambda c: S(c, "vanilla_mim", "semanticmim", "--proxies", 0)),
        ("probe", 90, probe_part),
        ("finetune", 75, lambda c: S(c, "finetune", "finetune", *ft(c))),
        ("kill_resume", 120, resume_part),
        ("kamim_fp32", 60, lambda c: fp32_part(c, "kamim_fp32", "kamim", "kamim")),
        ("lut_fp32", 60, lambda c: fp32_part(c, "lut_fp32", "lut", "lut")),
        ("semanticmim_fp32", 60, lambda c: fp32_part(c, "semanticmim_fp32", "semanticmim",
                                                     "semanticmim")),
        ("finetune_fp32", 60, lambda c: fp32_part(c, "finetune_fp32", "finetune", "finetune",
                                                  *ft(c))),
        ("decode", 60, decode_part),
        ("lut_decode_device", 75, lut_device_part),
        ("compiled_kamim", 200, lambda c: bench_part(c, "bench_kamim", *compiled, *b, "--compile",
                                                     "--cases", 2, "--warmup", 2, env=logs)),
        ("bench_kamim", 60, lambda c: bench_part(c, "bench_kamim", *size(192, 256), *b)),
        ("bench_lut", 60, lambda c: bench_part(c, "bench_lut", *size(224, 256), *b,
                                               *([] if gpu else ["--head-hidden", 256]))),
        ("bench_semanticmim", 60, lambda c: bench_part(c, "bench_semanticmim", *size(224, 256),
                                                       *b)),
        ("bench_abmilp_probe", 60, lambda c: bench_part(c, "bench_abmilp_probe",
                                                        *size(224, 1024), *b)),
        ("bench_finetune", 60, lambda c: bench_part(c, "bench_finetune", *size(224, 256), *b)),
        ("bench_knn", 45, lambda c: bench_part(c, "bench_knn", *knn)),
        ("bench_data", 60, lambda c: bench_part(c, "bench_data", "--data", c["data"], "--scripts",
                                                *b[:2 * gpu])),
    ]


# ---- the driver ----

def part_main(name, c):
    """One part in this process (the driver's child): its figures to OUTDIR/parts/NAME.json."""
    sys.stdout.reconfigure(line_buffering=True)
    fn = dict((n, f) for n, _, f in parts(c))[name]
    try:
        f = fn(c)
        f.setdefault("status", "ok")
    except Exception as e:
        import traceback
        traceback.print_exc()
        f = dict(status="FAIL", error=f"{e.__class__.__name__}: {e}"[:300])
        f["key"] = f["error"]
    with open(os.path.join(c["out"], "parts", name + ".json"), "w") as out:
        json.dump(f, out, default=str)
    sys.exit(0 if f["status"] != "FAIL" else 1)


def git():
    sh_ = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout
    return dict(commit=sh_("rev-parse", "HEAD").strip() or None,
                dirty=bool(sh_("status", "--porcelain", "--untracked-files=no").strip()))


def prepare(out):
    """OUTDIR: a new folder, or one this check wrote before (cleared: old checkpoints would be
    resumed); anything else is refused."""
    ours = ("log.txt", "gpu_check.json", "data", "runs", "parts", "inductor")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out,
                                                                                "gpu_check.json")):
        sys.exit(f"{out} is not empty and holds no gpu_check.json: give a new OUTDIR")
    for k in ours:
        p = os.path.join(out, k)
        shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
    os.makedirs(os.path.join(out, "parts"))
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({}, f)


def summary(meta, results):
    w = max(map(len, results)) + 1
    g = meta["git"]
    lines = [f"GPU check ({meta['mode']}): {meta.get('device', '?')}, torch "
             f"{meta.get('torch', '?')}, git {str(g['commit'])[:10]}{' (dirty)' * g['dirty']}, "
             f"{meta['date']}, {meta['total_s']:.0f} s",
             f"{'part':<{w}} {'status':<7} {'s':>5}  key figures"]
    for name, r in results.items():
        lines.append(f"{name:<{w}} {r['status']:<7} {r.get('seconds_part', 0):>5.0f}  "
                     f"{r.get('key', '')}"[:250])
    n = collections.Counter(r["status"] for r in results.values())
    lines.append("  ".join(f"{k} {v}" for k, v in sorted(n.items())))
    return "\n".join(lines)


def main(out, cpu):
    c = config(out, cpu)
    prepare(c["out"])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(c["out"], "inductor"))  # cold, as on a new GPU
    log = open(os.path.join(c["out"], "log.txt"), "a")
    meta = dict(mode="cpu rehearsal" if cpu else "gpu", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                git=git(), budget_s=c["budget"], tolerance_loss_rel=TOL,
                tolerance_decode_mean=DECODE_TOL, config={k: v for k, v in c.items()})
    results, t0 = {}, time.time()
    for name, timeout, _ in parts(c):
        left = c["budget"] - (time.time() - t0)
        if name != "env" and results.get("env", {}).get("status") == "FAIL":
            results[name] = dict(status="SKIP", key="no CUDA device (env part)")
            continue
        if left < 15:
            results[name] = dict(status="SKIP", key=f"budget: {left:.0f} s left")
            continue
        timeout = timeout * (4 if cpu else 1)
        limit = min(timeout, left)
        log.write(f"\n==== {name} (timeout {limit:.0f} s, at {time.time() - t0:.0f} s) ====\n")
        log.flush()
        t = time.time()
        p = subprocess.Popen([PY, os.path.abspath(__file__), "--part", name, c["out"]]
                             + ["--cpu"] * cpu, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=env, start_new_session=True)
        try:
            rc = p.wait(limit)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # done, timed out or Ctrl-C: the part, its scripts and their loader workers go
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        r = part_result(c, name)
        if rc is None:
            r = dict(r, status="TIMEOUT", key=f"killed after {limit:.0f} s")
        elif not r:
            r = dict(status="FAIL", key=f"exit {rc}, no result (see log.txt)")
        r.update(seconds_part=time.time() - t, timeout=limit)
        results[name] = r
        print(f"{time.time() - t0:6.0f} s  {name:<20} {r['status']:<7} {r['seconds_part']:5.0f} s"
              f"  {r.get('key', '')}"[:160], flush=True)
        if name == "env":
            meta.update({k: r.get(k) for k in ("device", "torch", "cuda", "nvidia_smi")})
        meta["total_s"] = time.time() - t0
        with open(os.path.join(c["out"], "gpu_check.json"), "w") as f:
            json.dump(dict(meta=meta, parts=results), f, indent=1, default=str)
    meta["total_s"] = time.time() - t0
    text = summary(meta, results)
    with open(os.path.join(c["out"], "gpu_check.json"), "w") as f:
        json.dump(dict(meta=meta, parts=results, summary=text.splitlines()), f, indent=1,
                  default=str)
    log.write("\n" + text + "\n")
    print("\n" + text + f"\n\nfigures {c['out']}/gpu_check.json, log {c['out']}/log.txt")
    return 0 if all(r["status"] in ("ok", "FLAG") for r in results.values()) else 1


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[:1] == ["--wrap"]:
        wrap(a[1:])
    elif a[:1] == ["--part"]:
        part_main(a[1], config(a[2], "--cpu" in a[3:]))
    elif len(a) in (1, 2) and not a[0].startswith("-") and a[1:] in ([], ["--cpu"]):
        sys.exit(main(a[0], a[1:] == ["--cpu"]))
    else:
        sys.exit(__doc__)
