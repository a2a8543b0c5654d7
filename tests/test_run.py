"""run.py: schedules, the batch split, atomic checkpoints and resume, the non-finite stop, the shared flags, two ranks."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import kamim
import run


def test_nan_weights_are_never_saved(tmp_path):
    # a finite loss whose update made the weights NaN: stop, name the step of the last good checkpoint
    net, out = torch.nn.Linear(3, 2), str(tmp_path)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    with pytest.raises(SystemExit, match="non-finite .* step 3: stopping without saving; no checkpoint was written"):
        with torch.no_grad():
            net.weight[0, 0] = float("nan")
        run.check_finite(1.0, 3, out, net, opt)
    with torch.no_grad():
        net.weight[0, 0] = 0.0
    run.check_finite(1.0, 4, out, net, opt)  # finite: passes
    run.save_run(out, net, opt, 4, argparse.Namespace())
    opt.state[net.weight]["exp_avg"][0, 0] = float("inf")  # the optimiser state counts too
    with pytest.raises(SystemExit, match=r"weights or optimiser state at step 5: .*\(step 4\) is the last good"):
        run.check_finite(1.0, 5, out, net, opt)


def test_a_run_that_steps_into_nan_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, one_thread):
    out = str(tmp_path)
    flags = ["--img-size", "32", "--batch-size", "8", "--workers", "0", "--save-every", "1", "--no-online-probe",
             "--out", out]
    kamim.main([*flags, "--max-steps", "1"])
    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):  # the second update writes a NaN into the weights; the loss it logs is finite
        step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(SystemExit, match=r"weights or optimiser state at step 2: .*\(step 1\) is the last good"):
        kamim.main([*flags, "--max-steps", "1"])
    ck = run.load_checkpoint(out)
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, message", [(["--epoch", "3"], "unrecognized arguments: --epoch"),
                                            (["--log-every", "0"], "--log-every: 0 must be > 0"),
                                            (["--workers", "-1"], "--workers: -1 must be >= 0"),
                                            (["--std", "0.2", "0", "0.2"], "--std: 0 must be > 0"),
                                            (["--online-probe-share", "1.5"], "1.5 must be > 0 and <= 1")])
def test_shared_flags_refuse_abbreviations_and_bad_numbers(flags, message, capsys):
    with pytest.raises(SystemExit):
        kamim.parse_args(flags)
    assert message in capsys.readouterr().err


def test_loss_curve_keeps_the_resumed_record(tmp_path):
    # a run killed after step 40 (last checkpoint at 30) logs 40 again after its resume: the later one counts
    import benchmarks.loss_curve as lc
    log = tmp_path / "log.jsonl"
    recs = [dict(step=20, loss=3.0), dict(step=40, loss=2.0), dict(resume=30), dict(step=40, loss=2.5),
            dict(step=40, top1=50.0), dict(step=60, loss=1.0)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, curves = lc.read_log(str(log))
    assert steps == [20, 40, 60] and curves["loss"] == [3.0, 2.5, 1.0]


def test_resume_notices_a_changed_folder_but_not_a_trailing_slash(tmp_path, one_thread):
    import data
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        data.DemoShapes("train", 8)[i][0].resize((40, 40)).save(imgs / f"{i}.png")
    flags = ["--data", str(imgs), "--model", "vit_demo", "--img-size", "32", "--mask-patch", "16", "--wps", "4",
             "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", "--workers", "0", "--no-online-probe",
             "--out", str(tmp_path / "out"), "--max-steps", "1"]
    kamim.main(flags)
    kamim.main([*flags[:1], str(imgs) + "/", *flags[2:]])  # the same folder: resumes, no changed flag
    assert run.load_checkpoint(str(tmp_path / "out"))["step"] == 2
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["resume"] for r in log if "resume" in r] == [1] and "args" in log[0]  # the resume is marked
    data.DemoShapes("train", 9)[8][0].resize((40, 40)).save(imgs / "8.png")  # an image added since
    with pytest.raises(SystemExit, match=r"(?s)train file list: \d+ -> \d+\n  train images: 8 -> 9\n.*--resume-anyway"):
        kamim.main(flags)
    kamim.main([*flags, "--resume-anyway"])


def test_a_replaced_checkpoint_file_is_another_input(tmp_path):
    ck = tmp_path / "enc.pt"
    ck.write_bytes(b"a" * 3000)
    before = run.inputs(None, argparse.Namespace(checkpoint=str(ck)))
    ck.write_bytes(b"a" * 2999 + b"b")  # same size, other bytes: a file replaced behind the same path
    assert before != run.inputs(None, argparse.Namespace(checkpoint=str(ck)))
    assert run.inputs(None, argparse.Namespace(checkpoint=None)) == {}


@pytest.mark.parametrize("value", ["1e41", "nan", "inf"])
def test_float_flags_are_bounded(value, capsys):
    with pytest.raises(SystemExit):
        kamim.parse_args(["--lr", value])
    assert f"--lr {float(value)} is out of range" in capsys.readouterr().err


def test_probe_and_finetune_take_the_encoder_flags_from_the_checkpoint(tmp_path, capsys):
    # issue 24: a demo or ViT-L checkpoint on one's own data, with no --model / --in-chans / --mean
    import abmilp_probe
    import finetune
    (tmp_path / "d" / "train").mkdir(parents=True), (tmp_path / "d" / "val").mkdir()
    ck = str(tmp_path / "c.pt")
    torch.save({"encoder": {}, "args": dict(model="vit_l", in_chans=1, mean=[0.5], std=[0.25])}, ck)
    common = ["--checkpoint", ck, "--data", str(tmp_path / "d")]
    for parse in (abmilp_probe.parse_args, finetune.parse_args):
        a = parse(common)
        assert (a.model, a.in_chans, list(a.mean), list(a.std)) == ("vit_l", 1, [0.5], [0.25])
        assert "in_chans=1" in capsys.readouterr().out
        a = parse(common + ["--model", "vit_b", "--in-chans", "3"])  # the command wins; RGB stats
        assert (a.model, a.in_chans) == ("vit_b", 3) and list(a.mean) == list(data.IMAGENET_MEAN)
    assert abmilp_probe.parse_args(common).epochs == 50  # before the presets: MAE's ViT-L recipe
    torch.save({"model": {}, "args": argparse.Namespace(model="mae_vit_base_patch16")}, ck)
    assert abmilp_probe.parse_args(common).model == "vit_b"  # MAE's names are not ours


def test_schedule_and_batch_split():
    assert run.cosine(0, 100, 10, 1.0, start=0.1) == 0.1
    assert run.cosine(5, 100, 10, 1.0) == 0.5 and run.cosine(10, 100, 10, 1.0) == 1.0
    assert math.isclose(run.cosine(55, 100, 10, 1.0, final=0.2), 0.6) and run.cosine(100, 100, 10, 1.0, 0.2) == 0.2
    assert run.batch_split(2048, 8, 256) == (256, 1)
    assert run.batch_split(2048, 1, 256) == (256, 8)
    assert run.batch_split(96, 1, 40) == (32, 3)
    assert run.batch_split(98, 1, 30) == (14, 7)  # ceil(98 / 30) = 4 does not divide 98: the next that does
    for g, w, m in [(98, 1, 30), (4096, 8, 96), (1000, 8, 48), (510, 2, 100), (7, 1, 2)]:  # the global batch exactly
        micro, accum = run.batch_split(g, w, m)
        assert micro * accum * w == g and micro <= m, (g, w, m)
    with pytest.raises(ValueError, match="not divisible"):
        run.batch_split(10, 4, 8)


def test_atomic_checkpoint(tmp_path):
    assert run.load_checkpoint(str(tmp_path)) is None
    run.save_checkpoint({"step": 3, "w": torch.ones(2), "rng": run.rng_state()}, str(tmp_path))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    ck = run.load_checkpoint(str(tmp_path))
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.ones(2))
    run.set_rng_state(ck["rng"])


def test_save_run_resume_check_finite(tmp_path):
    class Net(torch.nn.Module):  # a pretraining wrapper: the encoder plus a head
        def __init__(self):
            super().__init__()
            self.encoder, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    net, out = Net(), str(tmp_path)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.head(net.encoder(torch.randn(5, 3))).sum().backward()
    opt.step()
    assert run.resume(out, Net(), opt) == 0  # nothing to resume: step 0, nothing touched
    run.save_run(out, net, opt, 7, argparse.Namespace(lr=1e-3), encoder=net.encoder.state_dict(), probe=None)
    ck = run.load_checkpoint(out)
    assert set(ck) == {"model", "encoder", "optimizer", "step", "rng", "args", "probe", "method", "skips", "inputs"} and ck["args"] == {"lr": 1e-3}
    assert set(ck["encoder"]) == {"weight", "bias"} and ck["step"] == 7
    expected = torch.rand(3)  # what the RNG gives right after the save
    net2 = Net()
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    assert run.resume(out, net2, opt2) == 7
    assert torch.equal(torch.rand(3), expected)  # RNG restored
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    run.check_finite(1.5, 3, out), run.check_finite(torch.tensor(2.0), 3, out)
    for bad in (float("nan"), float("inf"), torch.tensor(float("-inf")), torch.tensor(float("nan"), dtype=torch.bfloat16)):
        with pytest.raises(SystemExit, match=r"non-finite loss .* step 3: .*checkpoint\.pt \(step 7\) is the last good state"):
            run.check_finite(bad, 3, out)


def test_torchrun_two_ranks_see_disjoint_data(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(root, "tests", "dist_ranks.py"), str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=root, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["ids"]) == len(r1["ids"]) == 20 and not set(r0["ids"]) & set(r1["ids"])
    assert r0["batches"] == 5
    assert r0["draw"] == r0["expected"] and r1["draw"] != r0["draw"]  # rank 0 resumes exactly; rank 1 its own stream
    assert r0["stopped"] and r1["stopped"]  # a nan on rank 1 alone stops both (it is in both ranks' weights)


def test_resumed_ranks_draw_distinct_streams(monkeypatch):
    # set_rng_state: rank 0 restores its saved stream; every other rank seeds from (step, rank), so no two share one
    state, draws = run.rng_state(), {}
    monkeypatch.setattr(run.dist, "is_initialized", lambda: True)
    for rank in range(4):
        monkeypatch.setattr(run.dist, "get_rank", lambda r=rank: r)
        for step in (5, 6):
            run.set_rng_state(state, step)
            draws[rank, step] = torch.rand(3)
    assert torch.equal(draws[0, 5], draws[0, 6])  # rank 0: its saved stream, whatever the step
    rest = [v for k, v in draws.items() if k[0]] + [draws[0, 5]]
    assert all(not torch.equal(a, b) for i, a in enumerate(rest) for b in rest[i + 1:])
    torch.set_rng_state(state["cpu"])
