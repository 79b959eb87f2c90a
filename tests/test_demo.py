"""`refloop demo` at toy scale: the consistency table, Pink's bootstrapping section and the report."""

import json

from helpers import run_cli


def test_demo_runs_consistency_bootstrapping_and_svp_and_links_them_in_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--num-boxes", "6", "--no-sctune", "--bootstrap-images", "3", "--svp-images", "2", "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert set(results["domains"]) == {"in-domain", "crowded", "wild"}
    stats = results["bootstrap"]
    assert stats["domain"] == "wild" and stats["boxes_considered"] == stats["kept"] + stats["rejected"] > 0
    assert (out / "bootstrap" / "report.html").exists() and (out / "bootstrap" / "pairs.jsonl").exists()
    page = (out / "report.html").read_text()
    assert "bootstrap/report.html" in page and "Pink Table 5" in stdout
    svp = results["svp"]
    assert svp["domain"] == "wild" and svp["examples"] and {"object_recall", "chair_i"} <= set(svp["base"]) <= set(svp["svp"])
    changed, total = svp["captions_changed"]
    shown_changed = sum(e["base"]["caption"] != e["svp"]["caption"] for e in svp["examples"])
    assert shown_changed == min(changed, len(svp["examples"])) and f"SVP changed {changed} of the {total}" in page
    assert "SVP Table 6" in stdout and "svp/report.html" in page
    # iSVP, the inference-time variant, scored on the same held-out scenes through eval caption's scoring of a captions file
    assert set(svp["isvp"]) == set(svp["base"]) and "iSVP (no tuning, ours)" in stdout and "iSVP (no tuning" in page
    isvp = json.loads((out / "svp" / "eval-isvp" / "caption_metrics.json").read_text())
    assert (
        isvp["predictions_file"].endswith("captions.jsonl")
        and isvp["num"] == json.loads((out / "svp" / "eval-base" / "caption_metrics.json").read_text())["num"]
    )
    # the page shows on another machine: every picture is beside it or drawn into it, none in refloop's cache
    import re

    sources = re.findall(r"<img src=['\"]([^'\"]+)", page)
    assert sources and all(s.startswith("data:image/png;base64,") or (out / s).is_file() for s in sources)


def test_demo_refuses_an_unknown_bootstrap_domain(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--bootstrap-domain", "mars", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "mars" in err
