"""Markdown tables (README's "Benchmarks" results) from a `bench.suite` JSON file.

python -m bench.report bench_results.json > tables.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any


def _ms(record: dict[str, Any]) -> str:
    latency = record["latency"]
    return f"{latency['median_s'] * 1e3:.1f} ({latency['iqr_s'] * 1e3:.1f})"


def _frac(record: dict[str, Any], dtype: str) -> str:
    value = record.get(f"fraction_of_matmul_{dtype}")
    return "-" if value is None else f"{value:.2f}"


def _num(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    aligns = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _ok(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["kind"] == kind and r["status"] == "ok" and not r["case"].get("peer_comparison")
    ]


def _size(record: dict[str, Any]) -> str:
    return "x".join(str(s) for s in record["case"]["size"])


def machine_lines(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    units = [name for name in ("avx512_bf16", "amx_bf16") if m.get(name)]
    loads = [
        r["machine"]["load_average"][0]
        for r in results["records"]
        if r.get("machine") and r["machine"].get("load_average")
    ]
    sticks = [r["matmul"] for r in results["records"] if r.get("matmul")]
    line = (
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, bfloat16 units: "
        f"{', '.join(units) or 'none'}; TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
        f"{results['started']} to {results['finished']}"
    )
    if loads:
        line += f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the cases"
    lines = [line + ".", ""]
    for dtype in ("float32", "bfloat16"):
        rates = [s[dtype]["gflop_per_s"] for s in sticks if dtype in s]
        sizes = sorted({s[dtype]["n"] for s in sticks if dtype in s})
        if rates:
            lines.append(
                f"- {dtype} matmul {'/'.join(map(str, sizes))}^3, measured in each case's process: "
                f"median {statistics.median(rates):.1f} GFLOP/s (range {min(rates):.1f}-"
                f"{max(rates):.1f}, {len(rates)} processes)"
            )
    return lines + ["", f"Command: `{results['command']}`", ""]


def inference_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in _ok(records, "inference"):
        c = r["case"]
        rows.append(
            [
                r["case"]["model"],
                _size(r),
                str(c["batch"]),
                c["mode"],
                c["precision"],
                f"{r['images_per_s']:.2f}",
                _ms(r),
                f"{r['flops_per_image'] / 1e9:.1f}",
                f"{r['gflop_per_s']:.1f}",
                _frac(r, "float32"),
                _frac(r, "bfloat16"),
                f"{r['peak_rss_mb']:.0f}",
                _num(r.get("argmax_agreement"), ".4f"),
            ]
        )
    header = [
        "model",
        "size",
        "batch",
        "path",
        "precision",
        "images/s",
        "ms/call median (IQR)",
        "GFLOP/image",
        "GFLOP/s",
        "of f32 matmul",
        "of bf16 matmul",
        "peak RSS MB",
        "argmax = f32",
    ]
    return ["### Inference", ""] + _table(header, rows) if rows else []


def _batch_norm(record: dict[str, Any]) -> str:
    if not record.get("batch_norm_layers"):
        return "-"
    return f"{record['case'].get('batch_norm', 'fused')} ({record['batch_norm_layers']})"


def training_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in _ok(records, "training"):
        c = r["case"]
        rows.append(
            [
                c["model"],
                _size(r),
                str(c["batch"]),
                c["precision"],
                "xla" if c.get("jit_compile") else "tf.function",
                _batch_norm(r),
                str(r.get("replicas", 1)),
                f"{r['images_per_s']:.2f}",
                _ms(r),
                f"{r['gflop_per_s']:.1f}",
                _frac(r, "float32"),
                _frac(r, "bfloat16"),
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    header = [
        "model",
        "crop",
        "batch",
        "precision",
        "path",
        "batch norm",
        "replicas",
        "images/s",
        "ms/step median (IQR)",
        "GFLOP/s (3x forward)",
        "of f32 matmul",
        "of bf16 matmul",
        "peak RSS MB",
    ]
    return ["### Training step (kfcn's make_train_step)", ""] + _table(header, rows) if rows else []


def pipeline_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    training = _ok(records, "training")
    for r in _ok(records, "pipeline"):
        c = r["case"]
        same = [
            t
            for t in training
            if t["case"]["size"] == c["size"]
            and t["case"]["batch"] == c["batch"]
            and t.get("replicas", 1) == 1
            and t["case"]["precision"] == "float32"
            and not t["case"].get("jit_compile")
            and t["case"].get("batch_norm", "fused") == "fused"
        ]
        ratio = f"{r['images_per_s'] / same[0]['images_per_s']:.1f}x" if same else "-"
        rows.append(
            [
                _size(r),
                str(c["batch"]),
                f"{r['images_per_s']:.1f}",
                f"{same[0]['images_per_s']:.2f}" if same else "-",
                ratio,
            ]
        )
    header = ["crop", "batch", "pipeline images/s", "training images/s", "pipeline / training"]
    title = ["### Input pipeline (CamVid) against training", ""]
    return title + _table(header, rows) if rows else []


def litert_table(records: list[dict[str, Any]]) -> list[str]:
    ok = _ok(records, "litert")
    tf_ms = {
        r["case"]["model"]: r["latency"]["median_s"] for r in ok if r["runtime"] == "tensorflow"
    }
    rows = []
    for r in ok:
        base = tf_ms.get(r["case"]["model"])
        rows.append(
            [
                f"{r['case']['model']} {_size(r)}",
                r["runtime"],
                _ms(r),
                f"{base / r['latency']['median_s']:.2f}x" if base else "-",
                _num(r.get("file_mb"), ".2f"),
                _num(r.get("argmax_agreement"), ".4f"),
                _frac(r, "float32"),
            ]
        )
    header = [
        "model",
        "runtime",
        "ms/image median (IQR)",
        "speed vs TensorFlow",
        "file MB",
        "argmax = TF",
        "of f32 matmul",
    ]
    return ["### LiteRT against TensorFlow (batch 1)", ""] + _table(header, rows) if rows else []


def peer_table(records: list[dict[str, Any]]) -> list[str]:
    rows = []
    ours = [r for r in records if r["case"].get("peer_comparison") and r["status"] == "ok"]
    theirs = [r for r in records if r["kind"].startswith("peer_") and r["status"] == "ok"]
    for kind in ("inference", "training"):
        for r in ours:
            if r["kind"] != kind:
                continue
            match = [
                p
                for p in theirs
                if p["kind"] == f"peer_{kind}"
                and p["case"]["size"] == r["case"]["size"]
                and p["case"]["round"] == r["case"]["round"]
            ]
            if not match:
                continue
            p = match[0]
            rows.append(
                [
                    "forward" if kind == "inference" else "train step",
                    _size(r),
                    str(r["case"]["batch"]),
                    str(r["case"]["round"]),
                    f"{r['latency']['median_s']:.3f}",
                    f"{p['latency']['median_s']:.3f}",
                    f"{p['latency']['median_s'] / r['latency']['median_s']:.2f}x",
                    f"{_frac(r, 'float32')} / {_frac(p, 'float32')}",
                    f"{r['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f}",
                ]
            )
    header = [
        "what",
        "size",
        "batch",
        "round",
        "kfcn s",
        "keras_segmentation s",
        "kfcn speed-up",
        "of f32 matmul (kfcn / peer)",
        "peak RSS MB (kfcn / peer)",
    ]
    title = ["### kfcn FCN-8s VGG16 against keras_segmentation's fcn_8_vgg", ""]
    return title + _table(header, rows) if rows else []


def not_ok(records: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"- {r['name']}: {r['status']} ({r.get('reason', '')})"
        for r in records
        if r["status"] != "ok"
    ]
    return ["Not measured:", ""] + lines + [""] if lines else []


def render(results: dict[str, Any]) -> str:
    """The markdown of every table for one suite run."""
    records = results["records"]
    lines = machine_lines(results)
    for section in (
        inference_table,
        training_table,
        pipeline_table,
        litert_table,
        peer_table,
        not_ok,
    ):
        lines += section(records)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON written by python -m bench.suite")
    args = p.parse_args()
    with open(args.results) as f:
        print(render(json.load(f)))


if __name__ == "__main__":
    main()
