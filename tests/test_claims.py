"""benchmarks/claims.py's table logic (not the science): the statistics on a hand-made example, the table from
fabricated probe logs over 2 seeds (the layout abmilp_probe.py's --pool all writes), and one tiny pair run for
real, then resumed."""
import json
import os
import sys

import cv2
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import claims  # noqa: E402


BASE = dict(kamim=40, simmim=42, lut=50, mae=45, semanticmim=60, vanilla=60)
OFFSET = dict(knn_cls=0, knn_avg=1, cls=2, avg=3, abmilp=10)


def test_compare_hand_made():
    r = claims.compare({0: 70.0, 1: 72.0, 2: 74.0}, {0: 71.0, 1: 70.0, 2: 69.0})
    # method mean 72 sd 2, baseline mean 70 sd 1; differences -1, 2, 5: mean 2, sd 3 >= 2: the sign, within noise
    assert (r["a_mean"], r["b_mean"], r["diff"]) == (72, 70, 2)
    assert (r["a_sd"], r["b_sd"], r["diff_sd"]) == pytest.approx((2, 1, 3))
    assert r["sign"] == "yes*"
    r = claims.compare({0: 60.0, 1: 61.0, 5: 99.0}, {0: 65.0, 1: 67.0})  # seed 5 has no baseline: not paired
    assert r["seeds"] == [0, 1] and r["a"] == [60, 61] and r["diff"] == -5.5
    assert r["diff_sd"] == pytest.approx(0.5 ** 0.5) and r["sign"] == "no"  # differences -5, -6: clearly wrong
    r = claims.compare({3: 50.0}, {3: 40.0})
    assert (r["diff"], r["a_sd"], r["diff_sd"], r["sign"]) == (10, None, None, "yes")  # one seed: no spread
    assert claims.compare({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})["sign"] == "no*"  # |0| <= sd 0: no sign, no evidence
    assert claims.compare({}, {0: 1.0}) is None
    rows = claims.table({"kamim": {0: dict(OFFSET)}})  # no SimMIM yet: KAMIM's pair has no row, Beyond [cls] has
    assert [(r["paper"], r["probe"], r["baseline"], r["diff"]) for r in rows] == [
        ("Beyond [cls]", "KAMIM", "[cls]", 8), ("Beyond [cls]", "KAMIM", "avg", 7)]


def fabricate(run, finished=True):
    """A probe run's logs as abmilp_probe.py writes them: a run-info record, an earlier evaluation, the last one;
    top-1 = BASE + OFFSET + 4 x seed for kamim (its seeds differ), the same for every seed otherwise."""
    top1 = {p: BASE[run["name"]] + o + 4 * run["seed"] * (run["name"] == "kamim") for p, o in OFFSET.items()}
    for pool in ("cls", "avg", "abmilp", "knn"):
        os.makedirs(os.path.join(run["out"], pool))
        recs = [dict(args={}, torch="x")]
        recs += [dict(pool=p, top1=v) for p, v in top1.items() if p.startswith("knn")] if pool == "knn" else \
            [dict(epoch=0, step=6, pool=pool, top1=0.0), dict(epoch=1, step=12, pool=pool, top1=top1[pool])]
        open(os.path.join(run["out"], pool, "log.jsonl"), "w").write("".join(json.dumps(r) + "\n" for r in recs))
    if finished:
        json.dump(dict(cmd=run["cmd"], seconds=1.0), open(os.path.join(run["out"], claims.DONE), "w"))


def test_table_from_fabricated_logs(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "--table-only"]
    for run in claims.plan(claims.parse_args(argv)):
        if run["kind"] == "probe":  # vanilla seed 1 was interrupted: logs but no mark, so it does not count
            fabricate(run, finished=(run["name"], run["seed"]) != ("vanilla", 1))
    rows = {(r["paper"], r["probe"], r["baseline"]): r for r in claims.main(argv)}
    assert len(rows) == 3 * 5 + 6 * 2
    r = rows["KAMIM", "kNN [cls]", "SimMIM"]  # KAMIM 40, 44 vs SimMIM 42, 42: differences -2, +2
    assert (r["a_mean"], r["b_mean"], r["diff"], r["diff_sd"], r["sign"]) == (42, 42, 0, pytest.approx(8 ** 0.5), "no*")
    r = rows["LUT", "[cls]", "MAE"]  # 52 vs 47 on both seeds: +5, no spread
    assert (r["a_mean"], r["a_sd"], r["diff"], r["diff_sd"], r["sign"]) == (52, 0, 5, 0, "yes")
    r = rows["SemanticMIM", "AbMILP", "vanilla MIM"]
    assert r["seeds"] == [0] and r["diff"] == 0 and r["diff_sd"] is None and r["sign"] == "no"
    r = rows["Beyond [cls]", "MAE", "avg"]  # AbMILP 55 vs avg 48 on the MAE encoder
    assert (r["method"], r["diff"], r["sign"]) == ("AbMILP", 7, "yes")
    out = capsys.readouterr().out
    assert "LUT vs MAE" in out and " 52.00 +-  0.00" in out and "+5.00 +-  0.00" in out
    saved = json.load(open(tmp_path / "claims.json"))
    assert saved["rows"][0]["a"] == [40, 44] and saved["settings"]["seeds"] == [0, 1]
    assert cv2.imread(str(tmp_path / "claims.png")).shape == (330, 3 * 460, 3)
    done = tmp_path / "lut_s0_probe" / claims.DONE  # a folder finished with another command is not silently reused
    json.dump(dict(cmd=["abmilp_probe.py", "--epochs", "99"], seconds=1.0), open(done, "w"))
    with pytest.raises(SystemExit, match="give another --out"):
        claims.main(argv)


def test_tiny_pair_runs_and_resumes(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--pairs", "semanticmim", "--seeds", "0", "--max-steps", "1", "--probe-epochs", "2"]
    rows = claims.main(argv)
    out = capsys.readouterr().out
    assert out.count("python semanticmim.py") == 2 and out.count("python abmilp_probe.py") == 2 and "ETA" in out
    assert len(rows) == 5 + 2 * 2 and all(0 <= r["a_mean"] <= 100 and r["seeds"] == [0] for r in rows)
    assert json.load(open(tmp_path / "vanilla_s0" / claims.DONE))["cmd"][-4:] == ["--proxies", "0", "--max-steps", "1"]
    assert claims.main(argv) == rows  # resumed: every run finished, nothing rerun, the same table
    out = capsys.readouterr().out
    assert out.count("finished before") == 4 and "python " not in out
