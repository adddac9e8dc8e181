"""kfcn's benchmark suite: one command, every figure against the machine's limit.

    python -m bench.suite --out bench_results.json                  # the whole suite
    python -m bench.suite --out quick.json --quick                  # 64x64, proves it runs
    python -m bench.suite --out peer.json --only peer --peer_python .venv-peer/bin/python
    python -m bench.report bench_results.json                       # the README tables

Every case runs in a fresh Python process (`python -m bench.cases '<case json>'`), so
its peak RSS is its own, and measures the float32 matmul rate (and the bfloat16 one
when it runs bfloat16) just before it: each throughput is also given as a fraction of
the limit measured in the same process, from FLOPs counted on the traced graph
(`bench.common.graph_flops`). The output file holds one record per case (and per
runtime of the LiteRT case) with the case, the command, the machine (CPU model, cores,
bfloat16 units, TensorFlow version, date, load average) and the figures.

Groups (`--only`, comma-separated):
- inference: the models of `--models` at `--sizes` x `--batches` through `tf.function`
  and `model.predict`; the `--detail_models` also through XLA and `mixed_bfloat16`.
- training: kfcn's train step (`make_train_step`): FCN-8s VGG16 at 512x512, FCN-8s
  MobileNetV2 at CamVid's 256x256 crops (README's recipe), float32 and mixed_bfloat16,
  and MirroredStrategy over 2 CPU replicas.
- pipeline: `kfcn.data.train_pipeline` on CamVid at the training crop and batch.
- litert: LiteRT float32/float16/int8 beside TensorFlow (FCN-8s MobileNetV2, 360x480).
- peer: keras_segmentation's `fcn_8_vgg` forward and training step against kfcn's
  FCN-8s VGG16, alternating processes (`--peer_rounds`), in the peer's own venv
  (`--peer_python`, made by `bash bench/peer_env.sh` or `--make_peer_env`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # `python bench/suite.py` as well as `python -m bench.suite`
    sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

logger = logging.getLogger("bench.suite")

SCHEMA = "kfcn-bench/1"
GROUPS = ("inference", "training", "pipeline", "litert", "peer")
DEFAULT_MODELS = (
    "fcn32s:vgg16",
    "fcn16s:vgg16",
    "fcn8s:vgg16",
    "fcn8s:mobilenetv2",
    "fcn8s:resnet50",
    "dilated:resnet50_v1c",
    "dilated_d16:resnet50_v1c",
)
DEFAULT_PEER_PYTHON = os.path.join(ROOT, ".venv-peer", "bin", "python")


def _size(text: str) -> tuple[int, int]:
    from kfcn.cli.args import parse_size
    from kfcn.cli.errors import UsageError

    try:
        return parse_size(text, "sizes")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results.json", help="JSON file written")
    p.add_argument("--only", type=_list, default=list(GROUPS), help=f"of {','.join(GROUPS)}")
    p.add_argument(
        "--quick",
        action="store_true",
        help="every size 64x64, batches 1 and 2, "
        "2 repeats, 512^3 matmul: proves the suite runs, measures nothing",
    )
    p.add_argument(
        "--models",
        type=_list,
        default=list(DEFAULT_MODELS),
        help="'<fcn32s|fcn16s|fcn8s|dilated|dilated_d16>:<backbone>' for inference",
    )
    p.add_argument(
        "--detail_models",
        type=_list,
        default=["fcn8s:vgg16", "fcn8s:mobilenetv2"],
        help="also timed with XLA and mixed_bfloat16",
    )
    p.add_argument(
        "--sizes",
        type=lambda t: [_size(s) for s in _list(t)],
        default=None,
        help="inference sizes HxW, comma-separated (default 512x512,360x480; --quick: 64x64)",
    )
    p.add_argument(
        "--batches",
        type=lambda t: [int(b) for b in _list(t)],
        default=None,
        help="inference batches (default 1,8; --quick: 1,2)",
    )
    p.add_argument(
        "--train_cases",
        type=_list,
        default=["fcn8s:vgg16@512x512/1", "fcn8s:mobilenetv2@256x256/8"],
        help="'<model>@<HxW>/<batch>'; the last one is also run on 2 replicas "
        "and is the rate the input pipeline is compared with",
    )
    p.add_argument(
        "--train_xla",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each training case's step compiled with XLA (kfcn train --jit_compile)",
    )
    p.add_argument("--litert_model", default="fcn8s:mobilenetv2")
    p.add_argument("--litert_size", type=_size, default=(360, 480))
    p.add_argument(
        "--peer_sizes", type=lambda t: [_size(s) for s in _list(t)], default=[(512, 512)]
    )
    p.add_argument("--peer_batch", type=int, default=1)
    p.add_argument(
        "--peer_rounds", type=int, default=2, help="kfcn / peer alternations (each a fresh process)"
    )
    p.add_argument("--peer_python", default=DEFAULT_PEER_PYTHON)
    p.add_argument(
        "--make_peer_env",
        action="store_true",
        help="run bench/peer_env.sh first (PyPI must be reachable)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick_size", type=_size, default=(64, 64), help="every size under --quick")
    p.add_argument(
        "--modes",
        type=_list,
        default=["tf.function", "predict"],
        help="inference paths of every model (tf.function, predict, xla)",
    )
    p.add_argument("--matmul_n", type=int, default=4096)
    p.add_argument(
        "--bf16",
        choices=("auto", "always", "never"),
        default="auto",
        help="mixed_bfloat16 cases: 'auto' only where the CPU has bfloat16 units",
    )
    p.add_argument(
        "--in_process",
        action="store_true",
        help="run every case in this process (tests): peak RSS is then the "
        "whole run's and mirrored cases are skipped",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    return p


def _train_case(text: str) -> tuple[str, tuple[int, int], int]:
    try:
        model, rest = text.split("@")
        size, batch = rest.split("/")
        return model, _size(size), int(batch)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(
            f"`--train_cases` entries must be '<model>@<HxW>/<batch>'. Received: {text!r}"
        ) from e


def plan(args: argparse.Namespace, bfloat16_units: bool) -> list[dict[str, Any]]:
    """The cases to run, in order, as plain dicts."""
    quick = args.quick
    sizes = args.sizes or ([args.quick_size] if quick else [(512, 512), (360, 480)])
    batches = args.batches or ([1, 2] if quick else [1, 8])
    bf16 = args.bf16 == "always" or (args.bf16 == "auto" and bfloat16_units)
    common_keys = {
        "repeats": 2 if quick else args.repeats,
        "matmul_n": 512 if quick else args.matmul_n,
        "matmul_repeats": 2 if quick else 5,
    }
    cases: list[dict[str, Any]] = []

    def add(**case: Any) -> None:
        cases.append({**common_keys, **case})

    if "inference" in args.only:
        for model in args.models:
            for size in sizes:
                for batch in batches:
                    modes = [(mode, "float32") for mode in args.modes]
                    if model in args.detail_models:
                        modes += [("xla", "float32")] * ("xla" not in args.modes)
                        if bf16:
                            modes += [("tf.function", "mixed_bfloat16"), ("xla", "mixed_bfloat16")]
                    for mode, precision in modes:
                        add(
                            kind="inference",
                            model=model,
                            size=list(size),
                            batch=batch,
                            mode=mode,
                            precision=precision,
                        )
    train_cases = [_train_case(t) for t in args.train_cases]
    if "training" in args.only:
        for i, (model, size, batch) in enumerate(train_cases):
            size = args.quick_size if quick else size
            batch = min(batch, 2) if quick else batch
            # (precision, replicas, extra): float32, bfloat16, `kfcn train --jit_compile`
            # (XLA over the whole step), Keras's batch norm, the last case on 2 replicas.
            variants = [("float32", 1, {})]
            variants += [("mixed_bfloat16", 1, {})] * bf16
            variants += [("float32", 1, {"jit_compile": True})] * args.train_xla
            # Keras's own BatchNormalization, against the fused one (VGG has none).
            variants += [("float32", 1, {"batch_norm": "keras"})] * ("vgg" not in model)
            variants += [("float32", 2, {})] * (i == len(train_cases) - 1 and batch % 2 == 0)
            for precision, replicas, extra in variants:
                add(
                    kind="training",
                    model=model,
                    size=list(size),
                    batch=batch,
                    precision=precision,
                    replicas=replicas,
                    **extra,
                )
    if "pipeline" in args.only and train_cases:
        _, size, batch = train_cases[-1]
        add(
            kind="pipeline",
            size=list(args.quick_size if quick else size),
            batch=min(batch, 2) if quick else batch,
            repeats=5 if quick else 40,
        )
    if "litert" in args.only:
        add(
            kind="litert",
            model=args.litert_model,
            size=list(args.quick_size if quick else args.litert_size),
            repeats=2 if quick else 20,
            calibration_images=2 if quick else 16,
        )
    if "peer" in args.only:
        for size in [args.quick_size] if quick else args.peer_sizes:
            for round_ in range(args.peer_rounds):
                for kind in ("inference", "training"):
                    for who in ("kfcn", "peer"):
                        case = {
                            "size": list(size),
                            "batch": args.peer_batch,
                            "round": round_,
                            "num_classes": 21,
                        }
                        if kind == "inference":
                            case["mode"] = "tf.function"
                        if who == "kfcn":
                            add(
                                kind=kind,
                                model="fcn8s:vgg16",
                                precision="float32",
                                replicas=1,
                                peer_comparison=True,
                                **case,
                            )
                        else:
                            add(kind=f"peer_{kind}", **case)
    return cases


def case_name(case: dict[str, Any]) -> str:
    """A short readable label of a case."""
    from bench.cases import model_label

    size = "x".join(str(s) for s in case.get("size", ()))
    kind = case["kind"]
    if kind.startswith("peer_"):
        return f"keras_segmentation fcn_8_vgg {kind[5:]} {size} b{case['batch']}"
    if kind == "pipeline":
        return f"train_pipeline camvid {size} b{case['batch']}"
    if kind == "litert":
        return f"litert {model_label(case['model'])} {size}"
    parts = [kind, model_label(case["model"]), size, f"b{case['batch']}"]
    if kind == "inference":
        parts.append(case["mode"])
    if case.get("jit_compile"):
        parts.append("xla")
    if case.get("batch_norm", "fused") != "fused":
        parts.append(f"{case['batch_norm']} batch norm")
    if case.get("precision", "float32") != "float32":
        parts.append(case["precision"])
    if case.get("replicas", 1) > 1:
        parts.append(f"mirrored x{case['replicas']}")
    return " ".join(parts)


def _subprocess(case: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    if case["kind"].startswith("peer_"):
        if not os.path.exists(args.peer_python):
            return [
                {
                    "status": "skipped",
                    "reason": f"no peer venv at {args.peer_python} "
                    "(bash bench/peer_env.sh, or --make_peer_env)",
                }
            ]
        command = [args.peer_python, "-m", "bench.peer_keras_segmentation", json.dumps(case)]
        env["TF_USE_LEGACY_KERAS"] = "1"
    else:
        command = [sys.executable, "-m", "bench.cases", json.dumps(case)]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [{"status": "error", "reason": f"timed out after {args.timeout} s"}]
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(common.RECORDS_MARKER):
            return json.loads(line[len(common.RECORDS_MARKER) :])
    # The last lines that are not TensorFlow's start-up logging.
    noise = ("I0000", "W0000", "E0000", "WARNING: All log messages", "To enable the following")
    lines = (done.stderr or done.stdout).strip().splitlines()
    tail = [line for line in lines if not line.startswith(noise)][-3:]
    killed = " (SIGKILL: the kernel's OOM killer?)" if done.returncode == -9 else ""
    return [{"status": "error", "reason": f"exit {done.returncode}{killed}: " + " | ".join(tail)}]


def _in_process(case: dict[str, Any]) -> list[dict[str, Any]]:
    from bench import cases

    if case["kind"].startswith("peer_"):
        return [{"status": "skipped", "reason": "the peer runs in its own venv only"}]
    if case.get("replicas", 1) > 1:
        return [{"status": "skipped", "reason": "CPU replicas need a fresh process"}]
    try:
        return cases.run_case(case)
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
        logger.exception("case failed: %s", case_name(case))
        return [{"status": "error", "reason": f"{type(e).__name__}: {e}"}]


def make_peer_env(peer_python: str) -> None:
    venv = os.path.dirname(os.path.dirname(peer_python))
    subprocess.run(["bash", os.path.join(HERE, "peer_env.sh"), venv], check=True)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the suite; writes and returns `{"schema", "command", "machine", ..., "records"}`."""
    args = parser().parse_args(argv)
    unknown = set(args.only) - set(GROUPS)
    if unknown:
        raise SystemExit(f"--only must be of {', '.join(GROUPS)}. Received: {sorted(unknown)}")
    if args.make_peer_env and "peer" in args.only:
        make_peer_env(args.peer_python)
    command = "python -m bench.suite " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    flags = common.cpu_flags()
    cases = plan(args, common.has_bfloat16_units(flags))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    for i, case in enumerate(cases, 1):
        name = case_name(case)
        logger.info("[%d/%d] %s", i, len(cases), name)
        start = time.perf_counter()
        results = _in_process(case) if args.in_process else _subprocess(case, args)
        wall = time.perf_counter() - start
        for result in results:
            result.setdefault("status", "ok")
            records.append(
                {
                    "name": name + (f" {result['runtime']}" if "runtime" in result else ""),
                    "kind": case["kind"],
                    "case": case,
                    "command": command,
                    "machine": result.pop("machine", None) or _machine(),
                    "process_wall_s": wall,
                    "in_process": args.in_process,
                    **result,
                }
            )
        status = results[0].get("status")
        logger.info(
            "    %s in %.0f s%s",
            status,
            wall,
            f": {results[0].get('reason')}" if status != "ok" else "",
        )
    output = {
        "schema": SCHEMA,
        "command": command,
        "started": started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "records": records,
    }
    with open(args.out, "w") as f:
        json.dump(output, f, indent=1)
    logger.info("wrote %d records to %s", len(records), args.out)
    return output


def _machine() -> dict[str, Any]:
    # Per record: the date and the load average at the end of each case.
    return common.machine()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run()


if __name__ == "__main__":
    main()
