"""`python -m benchmarks gpu-check`: one prepared run of everything worth knowing on a CUDA GPU, within a budget.

A GPU is lent to this project rarely and briefly, so nothing is improvised when one comes. In priority order,
each step in its own process (a crash or a hang costs that step only) and none past the budget:

1. the machine: GPU, driver, torch, the bf16 and fp32 matmul peaks;
2. the CUDA tests (`tests/test_gpu.py`, run with MOCO_TEST_DEVICE set): AMP in both dtypes and the gradient
   scaler, channels_last and compile, the device's augmentation against the CPU's, a real CUDA out-of-memory
   error, SyncBN, one NCCL process under torchrun, resume on the device;
3. pretraining throughput, ours against the faithful reference (`python -m benchmarks bench`, one process
   each): the small CNN at 28 px, ResNet-18 (small stem) at 32 px, ResNet-50 (MoCo v2) at 224 px and MoCo v3
   with a ViT-S/16 at 224 px, the data in memory so that the model is measured; fp32 with the reference, bf16,
   and bf16 compiled; images/s, peak GPU memory, the share of the matmul peak;
4. the full-resolution data path at 224 px from real JPEGs with the machine's CPU workers
   (`python -m benchmarks data`), and JPEG decoding on the device, against ResNet-50's measured step rate;
5. time to accuracy: the main job's recipe and a ResNet-18 version of it, kNN at the end.

Everything lands in OUT: results.json (every figure, with commit, machine and command), summary.md, log.txt
and tests.xml. `--device cpu` is the dry run at tiny sizes (seconds) that the test suite runs, so the script
can't rot between visits to a GPU. `--publish OUT/results.json` adds a GPU run's entries to docs/benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from moco.config import opt
from moco.errors import ConfigError
from moco.files import write_text

from .bench import matmul_peak, read_results, save_result, write_table
from .provenance import commit, machine_info

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "throughput", "data", "accuracy", "compile")


@dataclass
class GpuCheckSettings:
    """What `python -m benchmarks gpu-check` runs; stored with its results."""

    device: str = opt("cuda", "cuda | cuda:N | cpu (the dry run: tiny sizes, seconds)")
    budget_minutes: float = opt(8.0, "wall-clock budget: steps that would start past it are recorded as not run")
    accuracy_minutes: float = opt(1.5, "time to accuracy: training budget of each of the two recipes")
    skip: list[str] = opt([], f"steps to leave out: {', '.join(STEPS)}")

    def check(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r}: gpu-check runs on cuda, cuda:N, or cpu (the dry run)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("no CUDA GPU here: run gpu-check on a machine with one, or --device cpu for the dry run")
        if unknown := set(self.skip) - set(STEPS):
            raise ConfigError(f"--skip {', '.join(sorted(unknown))}: choose from {', '.join(STEPS)}")

    @property
    def dry(self) -> bool:
        return self.device == "cpu"


# name -> (preset, config fields); the last two run at 224 px on Fashion-MNIST upsampled once into memory.
MODELS: dict[str, tuple[str, dict[str, str]]] = {
    "small CNN, 28 px": ("cpu", {}),
    "ResNet-18 small stem, 32 px": ("cpu", {"arch": "resnet18", "small_stem": "true", "image_size": "32"}),
    "ResNet-50 MoCo v2, 224 px": ("v2", {}),
    "ViT-S/16 MoCo v3, 224 px": ("v3-vit-small", {}),
}
NO_REFERENCE = {"ViT-S/16 MoCo v3, 224 px"}  # the reference implements MoCo v1/v2 (benchmarks/reference.py)
DRY_MODELS = ("small CNN, 28 px", "ViT-S/16 MoCo v3, 224 px")  # the dry run: a CPU preset and a 224-px one


class Run:
    """The log, the deadline and the results of one gpu-check."""

    def __init__(self, s: GpuCheckSettings, out: Path) -> None:
        self.s, self.out = s, out
        self.start = time.monotonic()
        self.log = (out / "log.txt").open("a")
        self.results: dict[str, Any] = {"settings": asdict(s), "steps": {}}
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def echo(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.s.budget_minutes * 60 - (time.monotonic() - self.start)

    def command(self, argv: list[str], limit: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a child process for at most `limit` s (and never past the budget); its output goes to the log."""
        limit = min(limit, self.left())
        if limit < 5:
            return -1, "not run: the budget was spent"
        self.echo(f"$ {' '.join(argv)}")
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.log.write(output)
            return -1, f"stopped after {limit:.0f} s"
        self.log.write(done.stdout + done.stderr)
        self.log.flush()
        return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]

    def record(self, step: str, value: Any) -> None:
        self.results["steps"][step] = value
        self.save()

    def save(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.start, 1)
        write_text(self.out / "results.json", json.dumps(self.results, indent=1) + "\n")


# -- the steps ------------------------------------------------------------------------------------------


def environment(run: Run) -> dict[str, Any]:
    device = torch.device(run.s.device)
    info = machine_info(device)
    info |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count}
    n = 512 if run.s.dry else 8192
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        info[f"matmul_peak_{name}_tflops"] = round(matmul_peak(device, dtype, n=n, repeats=3 if run.s.dry else 10)
                                                   / 1e12, 3)
    run.echo(f"machine: {info.get('gpu', info['cpu'])}, torch {info['torch']}, CUDA {info['cuda']}; matmul peak "
             f"fp32 {info['matmul_peak_fp32_tflops']} / bf16 {info['matmul_peak_bf16_tflops']} TFLOP/s")
    return info


def tests(run: Run) -> dict[str, Any]:
    xml = run.out / "tests.xml"
    code, last = run.command([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu",
                              "tests/test_gpu.py", f"--junitxml={xml}"], 300, {"MOCO_TEST_DEVICE": run.s.device})
    if not xml.is_file():
        return {"error": last}
    suite = ET.parse(xml).getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = {}
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases[case.get("name")] = outcome
    run.echo(f"tests: {counts}")
    return {"exit_code": code, **counts, "cases": cases}


def bench(run: Run, mode: str, preset: str, fields: dict[str, str], extra: list[str], limit: float,
          reference: bool) -> dict[str, Any]:
    """One `python -m benchmarks bench` run; its results entry, or why there is none."""
    out = run.scratch / f"bench-{len(list(run.scratch.iterdir()))}"
    sizes = (["--train-subset", "256", "--batch-size", "32", "--warmup", "1", "--steps", "2", "--windows", "1",
              "--workers", "1"] if run.s.dry else ["--warmup", "5", "--steps", "10", "--windows", "3"])
    if run.s.dry and preset in ("v2", "v3-vit-small"):  # the 224-px models at a size a CPU passes in seconds
        fields = {"image_size": "32", "hidden_dim": "512", **fields}
    if not run.s.dry and preset in ("v2", "v3-vit-small"):
        sizes += ["--train-subset", "4096"]  # 4,096 images upsampled to 224 px: 600 MiB in memory
    if not run.s.dry and preset == "v3-vit-small":
        sizes += ["--batch-size", "256"]  # one GPU's share of the recipe's 4,096 (all of it needs 134+ GiB)
    argv = [sys.executable, "-m", "benchmarks", "bench", "--mode", mode, "--preset", preset, "--device", run.s.device,
            "--out", str(out), *sizes, *extra, *(arg for k, v in fields.items() for arg in ("--set", f"{k}={v}"))]
    if not reference:
        argv.append("--no-reference")
    code, last = run.command(argv, limit)
    entries = [e for path in sorted(out.glob(f"{mode}-*.json")) for e in read_results(path)]
    if code != 0 or not entries:
        return {"error": last or f"exit {code}"}
    return entries[-1]


def throughput(run: Run, compiled: bool) -> list[dict[str, Any]]:
    rows = []
    variants = [("bf16", True)] if compiled else [("fp32", False), ("bf16", False)]
    models = MODELS
    if run.s.dry:  # one model per kind of preset, fp32; compiling on a CPU takes minutes (the suite tests it)
        models = {name: MODELS[name] for name in DRY_MODELS}
        variants = [] if compiled else [("fp32", False)]
    for name, (preset, fields) in models.items():
        for precision, compile_ in variants:
            reference = precision == "fp32" and name not in NO_REFERENCE
            settings = {**fields, "precision": precision, **({"compile": "true"} if compile_ else {})}
            entry = bench(run, "throughput", preset, settings, [], 240, reference)
            row = {"model": name, "precision": precision, "compile": compile_, "entry": entry}
            if "result" in entry:
                r = entry["result"]
                run.echo(f"throughput {name} {precision}{' compiled' if compile_ else ''}: ours "
                         f"{r['ours']['img_s']:.0f} img/s" + (f", reference {r['reference']['img_s']:.0f} "
                                                             f"({r['speedup']}x)" if "reference" in r else "")
                         + f", {100 * r['fraction_of_peak']:.1f}% of the {r['matmul_peak_dtype']} matmul peak")
            rows.append(row)
            run.record("compile" if compiled else "throughput", rows)
    return rows


def resnet50_rate(run: Run) -> float | None:
    """ResNet-50's measured bf16 images/s, the rate the data path must feed."""
    for row in run.results["steps"].get("throughput", []):
        if row["model"].startswith("ResNet-50") and row["precision"] == "bf16" and "result" in row["entry"]:
            return row["entry"]["result"]["ours"]["img_s"]
    return None


def data(run: Run) -> dict[str, Any]:
    out = run.scratch / "data"
    cores = os.cpu_count() or 1
    sizes = (["--files", "24", "--large", "48", "--images", "16", "--batch-size", "8", "--workers", "1"] if run.s.dry
             else ["--files", "1600", "--large", "1600", "--images", "1200", "--workers", str(cores)])
    rate = resnet50_rate(run)
    argv = [sys.executable, "-m", "benchmarks", "data", "--out", str(out), "--folders", str(run.scratch / "photos"),
            *sizes, *(["--gpu-rate", f"{rate:.0f}"] if rate else [])]
    code, last = run.command(argv, 240)
    entries = [e for path in sorted(out.glob("data-*.json")) for e in read_results(path)]
    result: dict[str, Any] = entries[-1] if code == 0 and entries else {"error": last or f"exit {code}"}
    result["decode_on_device"] = decode_on_device(run, run.scratch / "photos")
    result["model_rate_img_s"] = rate
    return result


def decode_on_device(run: Run, folders: Path) -> dict[str, Any]:
    """JPEG decoding by torchvision on the device (nvJPEG on CUDA), batched, in images/s."""
    from torchvision.io import decode_jpeg, read_file

    files = sorted(folders.rglob("*.jpg"))[: 64 if run.s.dry else 512]
    if not files:
        return {"error": "no JPEGs (the data step did not run)"}
    encoded = [read_file(str(f)) for f in files]
    device = torch.device(run.s.device)
    try:
        decode_jpeg(encoded[:8], device=device)  # warm-up: the decoder's handles and buffers
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        images = decode_jpeg(encoded, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0]}
    rate = len(files) / seconds
    run.echo(f"JPEG decoding on {device}: {rate:.0f} img/s ({len(files)} photos, mean "
             f"{sum(i.shape[1] * i.shape[2] for i in images) / len(images) / 1e6:.2f} Mpx)")
    return {"img_s": round(rate, 1), "images": len(files)}


def accuracy(run: Run) -> list[dict[str, Any]]:
    rows = []
    minutes = 0.05 if run.s.dry else run.s.accuracy_minutes
    extra = ["--minutes", f"{minutes:g}", "--every", f"{minutes * 60:g}"]
    if run.s.dry:
        extra += ["--train-subset", "512", "--batch-size", "64", "--workers", "1"]
    recipes = {"main job (small CNN)": {}, "ResNet-18 version": MODELS["ResNet-18 small stem, 32 px"][1]}
    for name, fields in list(recipes.items())[: 1 if run.s.dry else None]:
        entry = bench(run, "time-to-accuracy", "cpu", fields, extra, minutes * 60 + 300, reference=False)
        rows.append({"recipe": name, "entry": entry})
        if "result" in entry:
            last = entry["result"]["ours"]["curve"][-1]
            run.echo(f"time to accuracy, {name}: {json.dumps(last)}")
        run.record("accuracy", rows)
    return rows


def rows(results: dict[str, Any], step: str) -> list[dict[str, Any]]:
    """The rows a step recorded; none if it did not run (its entry then says why)."""
    value = results["steps"].get(step, [])
    return value if isinstance(value, list) else []


def summary(results: dict[str, Any]) -> str:
    """A short Markdown page of the figures in `results`."""
    env = results["steps"].get("environment", {})
    lines = ["# gpu-check", "", f"- machine: {env.get('gpu', env.get('cpu'))}, torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}; matmul peak fp32 {env.get('matmul_peak_fp32_tflops')} / bf16 "
             f"{env.get('matmul_peak_bf16_tflops')} TFLOP/s", f"- commit `{results.get('commit')}`, "
             f"{results.get('date')}, {results.get('seconds')} s", f"- command: `{results.get('command')}`", ""]
    t = results["steps"].get("tests", {})
    lines += [f"Tests: {t.get('tests', 0)} run, {t.get('failures', 0)} failed, {t.get('errors', 0)} errors, "
              f"{t.get('skipped', 0)} skipped.", "",
              "| model | precision | compile | ours img/s | reference img/s | ours / ref | share of peak | peak memory |",
              "|---|---|---|---|---|---|---|---|"]
    for row in rows(results, "throughput") + rows(results, "compile"):
        r = row["entry"].get("result")
        if r is None:
            lines.append(f"| {row['model']} | {row['precision']} | {row['compile']} | {row['entry'].get('error')} "
                         "| | | | |")
            continue
        ref = r.get("reference", {})
        memory = (f"{r['ours']['cuda_peak_mib']} MiB on the GPU" if "cuda_peak_mib" in r["ours"]
                  else f"{r['ours']['peak_rss_mib']} MiB RSS")
        lines.append(f"| {row['model']} | {row['precision']} | {row['compile']} | {r['ours']['img_s']:.0f} | "
                     f"{ref.get('img_s', '')} | {r.get('speedup', '')} | {100 * r['fraction_of_peak']:.1f}% "
                     f"| {memory} |")
    d = results["steps"].get("data", {})
    if "result" in d and isinstance(d["result"], dict):
        lines += ["", f"Data path: {json.dumps(d['result'])[:600]}"]
    lines += ["", f"JPEG decoding on the device: {d.get('decode_on_device')}", ""]
    for row in rows(results, "accuracy"):
        r = row["entry"].get("result")
        lines.append(f"- time to accuracy, {row['recipe']}: "
                     + (json.dumps(r["ours"]["curve"][-1]) if r else str(row["entry"].get("error"))))
    return "\n".join(lines) + "\n"


def gpu_check(s: GpuCheckSettings, out: str | Path) -> Path:
    """Run every step within the budget; returns OUT/results.json."""
    s.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(s, out)
    run.results |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                    "command": " ".join(["python -m benchmarks", *sys.argv[1:]])}
    run.echo(f"gpu-check on {s.device}, budget {s.budget_minutes:g} min, results in {out}")
    run.record("environment", environment(run))
    plan = [("tests", lambda: tests(run)), ("throughput", lambda: throughput(run, compiled=False)),
            ("data", lambda: data(run)), ("accuracy", lambda: accuracy(run)),
            ("compile", lambda: throughput(run, compiled=True))]
    for step, action in plan:
        if step in s.skip:
            run.record(step, {"not run": "--skip"})
        elif run.left() < 10:
            run.record(step, {"not run": "the budget was spent"})
        else:
            tic = time.monotonic()
            run.record(step, action())
            run.results.setdefault("step_seconds", {})[step] = round(time.monotonic() - tic, 1)
    run.save()
    shutil.rmtree(run.scratch, ignore_errors=True)  # the photo folders and the benchmarks' own files
    write_text(out / "summary.md", summary(run.results))
    run.echo(f"wrote {out / 'results.json'}, {out / 'summary.md'}, {out / 'log.txt'} in {run.results['seconds']} s")
    return out / "results.json"


def publish(results: str | Path, docs: str | Path = "docs/benchmarks") -> Path:
    """Add a gpu-check's benchmark entries to the results files of `docs` and regenerate its page."""
    steps = json.loads(Path(results).read_text())["steps"]
    results = {"steps": steps}
    done = rows(results, "throughput") + rows(results, "compile") + rows(results, "accuracy")
    entries = [row["entry"] for row in done if "result" in row.get("entry", {})]
    if isinstance(steps.get("data"), dict) and "result" in steps["data"]:
        entries.append({k: v for k, v in steps["data"].items() if k not in ("decode_on_device", "model_rate_img_s")})
    for entry in entries:
        save_result(Path(docs), entry)
    return write_table(Path(docs))
