"""Run by tests/test_torchrun.py under `torchrun --nproc_per_node=2` (and in one process for the comparison):
`python tests/dist_train.py DATA OUT NAME...` TRAINS each named case of CASES a few steps, one process group
per case (each script's setup makes it, its end destroys it), writing OUT/NAME/log.jsonl."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import abmilp_probe  # noqa: E402
import finetune  # noqa: E402
import kamim  # noqa: E402
import lut  # noqa: E402
import semanticmim  # noqa: E402

TINY = ["--max-steps", "2", "--workers", "0", "--batch-size", "8"]  # global batch 8: 4 per process under 2
LABELLED = ["--model", "vit_demo", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--ref-batch", "8"]
# name -> (script, its flags, whether 2 processes must equal 1 at the same global batch, and why not)
CASES = {
    "kamim": (kamim, ["--img-size", "32", "--no-online-probe"], None),
    "simmim": (kamim, ["--img-size", "32", "--detector", "none"], None),
    "lut": (lut, ["--img-size", "32"], "masks and the context view's augmentation are drawn per process"),
    "mae": (lut, ["--img-size", "32", "--alpha", "0"], "masks are drawn per process"),
    "semanticmim": (semanticmim, ["--img-size", "32"], None),
    "vanilla": (semanticmim, ["--img-size", "32", "--proxies", "0"], None),
    "finetune_demo": (finetune, ["--img-size", "32"], None),
    **{f"probe_{pool}": (abmilp_probe, ["--data", "DATA", *LABELLED, "--pool", pool, "--no-cache-features"],
                         "the head's BatchNorm normalises each process's half batch alone")
       for pool in ("cls", "avg", "abmilp")},
    "probe_cached": (abmilp_probe, ["--data", "DATA", *LABELLED, "--pool", "abmilp", "--cache-features"],
                     "each process shuffles its own cache shard"),
    **{f"finetune_{p}": (finetune, ["--data", "DATA", *LABELLED, "--protocol", p],
                         "MixUp / CutMix and drop path are drawn per process")
       for p in ("mae", "lut", "kamim", "semanticmim")},
}


def train(name, data_dir, out):
    script, flags, _ = CASES[name]
    flags = [data_dir if f == "DATA" else f for f in flags]
    script.main([*flags, *TINY, "--out", os.path.join(out, name)])


if __name__ == "__main__":
    port = int(os.environ.get("MASTER_PORT", 29500))
    for k, name in enumerate(sys.argv[3:]):  # each case its own rendezvous store: no key of the last group is read
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=str(port + 1 + k))
        train(name, sys.argv[1], sys.argv[2])
