"""bench/device_check.sh's report: its parts' logs and JSON files -> one JSON file and printed tables.

    python bench/device_report.py --logdir DIR --out FILE [--mode gpu|smoke] [--command "..."]

DIR holds parts.tsv (one line per part: name, exit code, milliseconds, time limit, skip reason), each
part's log (NAME.log) and its results (kernel_tests.xml, tests.xml, train.json, reference.json,
decode.json). A part's
status: ok; partial (it ran, but some kernel failed or was cut by the budget); failed (non-zero exit,
or tests failed); timeout (killed by its time limit, exit 124 or 137); or 'skipped: <reason>'.
The summary holds the numbers the A3-on-GPU targets are judged by (best kernel's A3 MFU, A3/AR step
ratio, speed-up over the reference code) and whether each is met. Imports no jax or torch.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET

TARGETS = {"a3_mfu": 0.40, "a3_over_ar": 2.1, "speedup_vs_reference": 2.0}
TAIL = 2000  # characters of a failed part's log kept in the JSON
ENV_KEYS = ("XLA_FLAGS", "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS",
            "CUDA_VISIBLE_DEVICES")


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(path: str, n: int = TAIL) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def read_parts(logdir: str) -> dict:
    """parts.tsv -> {name: {status, rc, seconds, timeout_s}} (the last line of a name wins)."""
    parts = {}
    try:
        lines = open(os.path.join(logdir, "parts.tsv")).read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, rc, ms, limit, note = (line.split("\t") + [""] * 5)[:5]
        if note.startswith("skipped"):
            parts[name] = {"status": note}
            continue
        rc = int(rc) if rc else None
        status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
        parts[name] = {"status": status, "rc": rc, "seconds": int(ms) / 1000 if ms else None,
                       "timeout_s": int(limit) if limit else None}
        if note:
            parts[name]["error"] = note
    return parts


def test_results(path: str):
    """Counts and failing test ids from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["seconds"] = sum(float(s.get("time", 0)) for s in suites)
    counts["not_passed"] = [
        f"{c.get('classname', '')}::{c.get('name', '')}: {c[0].tag}"
        for s in suites for c in s.iter("testcase") if len(c) and c[0].tag in ("failure", "error")]
    return counts


def train_summary(train) -> dict:
    """Best kernel by A3 tokens/s; its AR step and the A3/AR ratio."""
    ok = [r for r in (train or {}).get("results", []) if "step_s" in r.get("a3", {})]
    if not ok:
        return {}
    best = max(ok, key=lambda r: r["a3"]["tokens_per_s"])
    ar = best.get("ar", {})
    return {"best_kernel": best["kernel"], "a3_tokens_per_s": best["a3"]["tokens_per_s"], "a3_mfu": best["a3"]["mfu"],
            "ar_tokens_per_s": ar.get("tokens_per_s"), "ar_mfu": ar.get("mfu"), "a3_over_ar": best.get("time_ratio")}


def decode_summary(decode) -> dict:
    out = {}
    for row in (decode or {}).get("rows", []):
        key = "cached_decode_tokens_per_s" if row["method"] == "token-by-token" else f"{row['method']}_tokens_per_s"
        out[key] = row["tokens_per_s"]
        if row["method"] == "speculative":
            out["speculative_k"] = row["k"]
            out["speculative_tokens_per_verify_pass"] = row["tokens_per_verify_pass"]
    return out


def environment() -> dict:
    versions = {}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "torch", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0],
            "versions": versions, "commit": commit,
            "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}


def build(logdir: str, mode: str, command: str, kernels: str, batch: str) -> dict:
    parts = read_parts(logdir)
    results = {name: test_results(os.path.join(logdir, f"{name}.xml")) for name in ("kernel_tests", "tests")}
    for name in ("train", "reference", "decode"):
        results[name] = read_json(os.path.join(logdir, f"{name}.json"))
    for name, part in parts.items():
        if name in results:
            part["result"] = results[name]
        if part["status"] in ("failed", "timeout"):
            part["error_tail"] = tail(os.path.join(logdir, f"{name}.log"))
        elif part["status"] == "ok" and name != "preflight" and results.get(name) is None:
            part["status"] = "failed"
            part["error"] = f"exit 0 but no results file in {logdir}"
            part["error_tail"] = tail(os.path.join(logdir, f"{name}.log"))
    train = parts.get("train", {})
    if train.get("status") == "ok":
        bad = [f"{r['kernel']} {o}: {r[o].get('error') or r[o].get('skipped')}"
               for r in train["result"]["results"] for o in ("a3", "ar") if "step_s" not in r.get(o, {})]
        if bad:
            train["status"], train["not_run"] = "partial", bad
    for name in ("kernel_tests", "tests"):
        tests = parts.get(name, {})
        if tests.get("status") == "failed" and tests.get("result"):
            tests["error"] = f"{len(tests['result']['not_passed'])} tests failed or errored"

    summary = train_summary(results["train"])
    summary.update(decode_summary(results["decode"]))
    ref = results["reference"]
    if ref:
        summary["reference_tokens_per_s"] = ref["tokens_per_s"]
        if summary.get("a3_tokens_per_s"):
            summary["speedup_vs_reference"] = summary["a3_tokens_per_s"] / ref["tokens_per_s"]
    if mode == "gpu":
        met = {}
        if summary.get("a3_mfu") is not None:
            met["a3_mfu >= 0.40"] = summary["a3_mfu"] >= TARGETS["a3_mfu"]
        if summary.get("a3_over_ar") is not None:
            met["a3_over_ar <= 2.1"] = summary["a3_over_ar"] <= TARGETS["a3_over_ar"]
        if summary.get("speedup_vs_reference") is not None:
            met["speedup_vs_reference >= 2"] = summary["speedup_vs_reference"] >= TARGETS["speedup_vs_reference"]
        summary["targets_met"] = met
    device = tail(os.path.join(logdir, "device.txt")).strip() or None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
            "command": command, "device": device, "kernels": kernels, "batch": int(batch) if batch else None,
            **environment(), "parts": parts, "summary": summary}


def show(report: dict) -> None:
    print(f"\ndevice check ({report['mode']}): {report['device']}")
    print(f"{'part':<12} {'seconds':>8} {'limit':>6}  status")  # status last: it is never cut
    for name, p in report["parts"].items():
        secs = f"{p['seconds']:.0f}" if p.get("seconds") is not None else "-"
        print(f"{name:<12} {secs:>8} {p.get('timeout_s') or '-':>6}  {p['status']}")
        if p.get("error"):
            print(f"{'':<10} {p['error'][:200]}")
    for name in ("kernel_tests", "tests"):
        tests = report["parts"].get(name, {}).get("result")
        if tests:
            print(f"\n{name}: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped")
            for t in tests["not_passed"][:20]:
                print(f"  {t}")
    train = report["parts"].get("train", {}).get("result")
    if train:
        print(f"\ntrain step ({train['device']}, peak {train['peak_flops_per_device'] / 1e12:.3g} TFLOP/s, "
              f"{train['peak_source']}):")
        print(f"{'model':<12} {'T':>5} {'B':>3} {'kernel':<11} {'A3 tok/s':>10} {'A3 MFU':>7} {'AR tok/s':>10} "
              f"{'AR MFU':>7} {'A3/AR':>6}")
        for r in train["results"]:
            cells = []
            for o in ("a3", "ar"):
                x = r.get(o, {})
                cells += ([f"{x['tokens_per_s']:>10,.0f}", f"{100 * x['mfu']:>6.1f}%"] if "step_s" in x
                          else [f"{'-':>10}", f"{'-':>7}"])
            ratio = f"{r['time_ratio']:>5.2f}x" if r.get("time_ratio") else f"{'-':>6}"
            print(f"{r['size']:<12} {r['seq']:>5} {r['batch']:>3} {r['kernel']:<11} {' '.join(cells)} {ratio}")
            for o in ("a3", "ar"):
                why = r.get(o, {}).get("error") or r.get(o, {}).get("skipped")
                if why:
                    print(f"{'':<12} {o}: {why[:160]}")
    s = report["summary"]
    if s:
        print("\nsummary:")
        for k, v in s.items():
            if k != "targets_met":
                print(f"  {k:<36} {v:,.3f}" if isinstance(v, float) else f"  {k:<36} {v}")
        for k, v in s.get("targets_met", {}).items():
            print(f"  target {k:<29} {'met' if v else 'NOT met'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="gpu", choices=("gpu", "smoke"))
    ap.add_argument("--command", default="")
    ap.add_argument("--kernels", default="")
    ap.add_argument("--batch", default="")
    a = ap.parse_args(argv)
    report = build(a.logdir, a.mode, a.command, a.kernels, a.batch)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    show(report)
    print(f"\nwrote {a.out} (logs in {a.logdir})")
    bad = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "partial")
           and not p["status"].startswith("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
