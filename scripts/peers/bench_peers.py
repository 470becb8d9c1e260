#!/usr/bin/env python3
"""coarsen against ONNX Runtime and DeepSparse, in one run, on the same weights.

For each model and batch size: random CIFAR weights (`coarsen synth`), an unstructured per-layer
magnitude mask (`coarsen prune`) and its structured conversions (`coarsen convert`), each exported
to coarsen's format and to ONNX (`coarsen export --onnx --fold-bn`). Every engine runs in its own
worker process (`coarsen bench --serve`, scripts/peers/worker.py) started once on the same input
batch; then, for each run, every worker in turn (rotated order) times its forward passes, in
turns of a few passes at small batches (`--slice`), so the machine's noise hits every engine
alike. Every worker's logits are checked against coarsen's
dense path on the same weights.

Run it through scripts/bench-peers, which prepares the Python environments and the binary.
"""

import argparse
import json
import math
import os
import platform
import re
import select
import shlex
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

np = None  # numpy, imported after the options (--help works without it)

MODELS = {
    # Layers coarsen's training prunes: every conv but the first, every linear but the classifier.
    "resnet18": r"^conv1\.weight$|^fc\.weight$",
    "vgg16": r"^features\.0\.weight$|^classifier\.weight$",
    "resnet20": r"^conv1\.weight$|^fc\.weight$",
    "vgg11": r"^features\.0\.weight$|^classifier\.weight$",
}
VARIANTS = ["dense", "unstructured", "group", "shuffled-block", "group-kernels", "shuffled-block-kernels", "channel", "nm"]
ENGINES = ["coarsen-packed", "coarsen-bf16", "coarsen-dense", "ort", "deepsparse"]
PEERS = ("ort", "deepsparse")
# coarsen's packed path with its block kernels in bfloat16 (`bench --serve --bf16`): the variants
# whose layers run them, on CPUs with AVX-512 BF16.
BF16_VARIANTS = ("group", "shuffled-block")
# Its logits differ from float32 by the rounding: checked against coarsen dense at this
# tolerance (× max(1, max|logit|)) and by the top-1 class agreeing on every image but a few.
BF16_TOLERANCE = 5e-2
BF16_AGREEMENT = 0.95
ENGINE_LABEL = {
    "coarsen-packed": "coarsen packed",
    "coarsen-bf16": "coarsen packed bf16",
    "coarsen-dense": "coarsen dense",
    "ort": "ONNX Runtime",
    "deepsparse": "DeepSparse",
}
VARIANT_LABEL = {
    "dense": "dense",
    "unstructured": "unstructured",
    "group": "group (Regroup)",
    "shuffled-block": "shuffled-block 16",
    "group-kernels": "group of whole kernels",
    "shuffled-block-kernels": "shuffled-block 16 of whole kernels",
    "channel": "channel",
    "nm": "N:M 2:4",
}
HERE = Path(__file__).resolve().parent
QUIET = 0.1  # cores other processes may use during a timed block before the table warns


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def die(msg):
    log(f"bench-peers: error: {msg}")
    sys.exit(1)


def csv_list(allowed, name, aliases=None):
    def parse(text):
        out = []
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            items = (aliases or {}).get(item, [item])
            for it in items:
                if allowed is not None and it not in allowed:
                    raise argparse.ArgumentTypeError(
                        f"unknown {name} `{it}` (choose from {', '.join(allowed)})"
                    )
                if it not in out:
                    out.append(it)
        if not out:
            raise argparse.ArgumentTypeError(f"no {name} given")
        return out

    return parse


def int_list(text):
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}`: expected comma-separated integers")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"`{text}`: expected positive integers")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/bench-peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
engines: coarsen-packed, coarsen-bf16 (`--serve --bf16`: the group and shuffled-block
variants' block kernels in bfloat16, on CPUs with AVX-512 BF16), coarsen-dense
(`coarsen bench --serve`), ort, deepsparse (scripts/peers/worker.py); the dense network runs
on every engine but coarsen-packed and coarsen-bf16.

environment of scripts/bench-peers:
  COARSEN            a coarsen binary to use instead of building one
  CARGO_TARGET_DIR   where to build it [default: ~/.cache/coarsen/target]
  COARSEN_PEERS_DIR  the Python venvs ort/ and deepsparse/ [default: ~/.cache/coarsen/peers]
  PYTHON             the Python that creates them [default: python3]

Exit status 1 when some engine's logits differ from the reference beyond the tolerance.""",
    )
    p.add_argument("--coarsen", required=True, help="the coarsen binary (set by scripts/bench-peers)")
    p.add_argument(
        "--deepsparse-python",
        required=True,
        metavar="PATH|none",
        help="python of the DeepSparse venv, or `none` (set by scripts/bench-peers)",
    )
    p.add_argument(
        "--models",
        type=csv_list(list(MODELS), "model"),
        default=["resnet18", "vgg16"],
        help="comma-separated: resnet18, vgg16 (also resnet20, vgg11) [default: resnet18,vgg16]",
    )
    p.add_argument("--batches", type=int_list, default=[64, 1], help="batch sizes [default: 64,1]")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine [default: 2]")
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="independent runs, each a full interleaved round over all workers [default: 3]",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed passes per worker per run [default: 10 for batch >= 8, 50 below]",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed passes before each timed slice of a worker [default: max(1, reps/10), "
        "1 when slices are shorter than reps]",
    )
    p.add_argument(
        "--slice",
        type=int,
        default=None,
        help="timed passes of a worker's turn: a run's reps go in slices, every worker taking its "
        "turn slice by slice [default: 10 below batch 8, 5 from batch 8]",
    )
    p.add_argument(
        "--pause",
        type=float,
        default=0.2,
        help="seconds of quiet before each worker's turn, for the previous worker's pool to go idle "
        "[default: 0.2]",
    )
    p.add_argument(
        "--engines",
        type=csv_list(ENGINES, "engine", {"coarsen": ["coarsen-packed", "coarsen-dense"]}),
        default=list(ENGINES),
        help="comma-separated subset of: " + ", ".join(ENGINES) + " (`coarsen` = both paths)",
    )
    p.add_argument(
        "--variants",
        type=csv_list(VARIANTS, "variant"),
        default=list(VARIANTS),
        help="comma-separated subset of: " + ", ".join(VARIANTS),
    )
    p.add_argument("--sparsity", type=float, default=0.78, help="unstructured sparsity per pruned layer [default: 0.78]")
    p.add_argument(
        "--channel-sparsity", type=float, default=0.5, help="sparsity of the channel variant [default: 0.5]"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, conversions and input [default: 0]")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("bench-peers-work"),
        help="work directory, reused: weights, masks and exports are made only when missing "
        "[default: bench-peers-work]",
    )
    p.add_argument("--json", type=Path, default=None, help="results file [default: WORK/bench-peers.json]")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=900.0,
        help="seconds a worker may take to load its model and answer `ready` [default: 900]",
    )
    a = p.parse_args(argv)
    if a.threads < 1 or a.runs < 1 or any(v is not None and v < 1 for v in (a.reps, a.slice)):
        p.error("--threads, --runs, --reps and --slice must be positive")
    if a.warmup is not None and a.warmup < 0:
        p.error("--warmup must be non-negative")
    if not 0 <= a.pause <= 10:
        p.error("--pause must be between 0 and 10 seconds")
    for s in (a.sparsity, a.channel_sparsity):
        if not 0 < s < 1:
            p.error("sparsities must be strictly between 0 and 1")
    return a


# --------------------------------------------------------------------------------------------
# Preparation: weights, masks, exports.


def safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def write_ones_mask(like, out):
    """An all-ones U8 mask with the tensor names and shapes of the mask file `like`."""
    h = safetensors_header(like)
    names = sorted(k for k in h if k != "__metadata__")
    header, off = {}, 0
    for k in names:
        size = int(np.prod(h[k]["shape"], dtype=np.int64))
        header[k] = {"dtype": "U8", "shape": h[k]["shape"], "data_offsets": [off, off + size]}
        off += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        chunk = b"\x01" * (1 << 20)
        left = off
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    os.replace(tmp, out)


class Prep:
    def __init__(self, args, logdir):
        self.args = args
        self.bin = args.coarsen
        self.logfile = logdir / "prep.log"
        self.seconds = 0.0
        self.made = []

    def run(self, cmd):
        t0 = time.monotonic()
        with open(self.logfile, "a") as lf:
            lf.write("$ " + shlex.join(map(str, cmd)) + "\n")
            lf.flush()
            r = subprocess.run([str(c) for c in cmd], stdout=lf, stderr=subprocess.STDOUT)
        self.seconds += time.monotonic() - t0
        if r.returncode != 0:
            tail = self.logfile.read_text().splitlines()[-15:]
            die(
                f"`{shlex.join(map(str, cmd))}` failed (exit {r.returncode}); end of {self.logfile}:\n  "
                + "\n  ".join(tail)
            )

    def make(self, target, cmd):
        """Runs cmd unless `target` exists (coarsen writes its outputs atomically)."""
        if not Path(target).exists():
            log(f"  making {target}")
            self.run(cmd)
            self.made.append(str(target))
        return Path(target)

    def model(self, model):
        a = self.args
        d = a.work / f"{model}-seed{a.seed}"
        d.mkdir(parents=True, exist_ok=True)
        c, ex = self.bin, MODELS[model]
        w = self.make(d / "weights.safetensors", [c, "synth", "--model", model, "--seed", a.seed, "--out", d / "weights.safetensors", "-q"])

        def prune(s, granularity="weight"):
            name = f"prune-{s:g}" if granularity == "weight" else f"prune-{granularity}-{s:g}"
            out = d / f"{name}.safetensors"
            return self.make(out, [c, "prune", "--weights", w, "--sparsity", s, "--scope", "layer", "--exclude", ex,
                                   "--granularity", granularity, "--out", out, "-q"])

        def convert(mask, to, name, extra):
            out = d / f"{name}.safetensors"
            return self.make(out, [c, "convert", "--weights", w, "--mask", mask, "--to", to, "--exclude", ex, "--seed", a.seed, "--out", out, "-q", *extra])

        masks = {}
        need = set(a.variants)
        if need & {"unstructured", "group", "shuffled-block", "nm"}:
            unstructured = prune(a.sparsity)
            masks["unstructured"] = unstructured
            if "group" in need:
                masks["group"] = convert(unstructured, "group", f"group-{a.sparsity:g}", ["--parts", "auto"])
            if "shuffled-block" in need:
                masks["shuffled-block"] = convert(unstructured, "shuffled-block", f"shuffled-block-{a.sparsity:g}", ["--block", "16"])
            if "nm" in need:
                ones = d / "ones.safetensors"
                if not ones.exists():
                    write_ones_mask(unstructured, ones)
                masks["nm"] = convert(ones, "nm", "nm-2-4", ["--n", "2", "--m", "4"])
        if need & {"group-kernels", "shuffled-block-kernels"}:
            # Whole kh×kw kernels pruned (sparsity counted over kernels), then blocks of whole
            # kernels: the products run on Winograd over the blocks' input channels.
            kernels = prune(a.sparsity, "kernel")
            if "group-kernels" in need:
                masks["group-kernels"] = convert(kernels, "group", f"group-kernels-{a.sparsity:g}", ["--parts", "auto", "--kernels"])
            if "shuffled-block-kernels" in need:
                masks["shuffled-block-kernels"] = convert(
                    kernels, "shuffled-block", f"shuffled-block-kernels-{a.sparsity:g}", ["--block", "16", "--kernels"])
        if "channel" in need:
            masks["channel"] = convert(prune(a.channel_sparsity), "channel", f"channel-{a.channel_sparsity:g}", [])
        rx = re.compile(ex)  # prune's selection: tensors of rank >= 2 but the excluded ones
        pruned = {
            k for k, v in safetensors_header(w).items()
            if k != "__metadata__" and len(v["shape"]) >= 2 and not rx.search(k)
        }

        exports = {}
        for v in a.variants:
            out = d / "export" / (v if v == "dense" else Path(masks[v]).stem)
            files = [out / "model.onnx", out / "model.json", out / "model.safetensors"]
            if not all(f.exists() for f in files):
                log(f"  exporting {out}")
                cmd = [c, "export", "--model", model, "--weights", w, "--out", out, "--onnx", "--fold-bn", "-q"]
                if v != "dense":
                    cmd += ["--mask", masks[v]]
                self.run(cmd)
                self.made.append(str(out))
            exports[v] = out
        return exports, pruned


def density_of(export, pruned):
    """Kept fraction of the pruned layers' weights, from the export's model.json."""
    m = json.loads((export / "model.json").read_text())
    kept = total = 0.0
    for layer in m["layers"]:
        if layer["name"] in pruned:
            n = float(np.prod(layer["shape"]))
            kept += layer["density"] * n
            total += n
    return kept / total if total else 1.0


# --------------------------------------------------------------------------------------------
# Workers.


class WorkerError(Exception):
    pass


class Worker:
    def __init__(self, model, batch, variant, engine, cmd, logpath, env):
        self.model, self.batch, self.variant, self.engine = model, batch, variant, engine
        self.cmd = [str(c) for c in cmd]
        self.logpath = logpath
        self.logits_path = None
        self.ready = None
        self.error = None
        self.times = []  # one list per run
        self.others = []  # per run: cores other processes used during the timed passes
        self.peak_rss_mb = None
        self.start_s = None
        self._buf = b""
        self._log = open(logpath, "w")
        self._log.write("$ " + shlex.join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env
        )

    @property
    def key(self):
        return (self.model, self.batch, self.variant, self.engine)

    def name(self):
        return f"{self.model} b{self.batch} {self.variant} {self.engine}"

    def _stderr_tail(self, n=5):
        try:
            self._log.flush()
            lines = [l for l in Path(self.logpath).read_text(errors="replace").splitlines()[1:] if l.strip()]
            return " | ".join(lines[-n:])
        except OSError:
            return ""

    def readline(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                rc = self.proc.wait()
                raise WorkerError(f"exited with status {rc}: {self._stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise WorkerError(f"unexpected output line: {line[:200]!r}")

    def wait_ready(self, timeout):
        t0 = time.monotonic()
        try:
            msg = self.readline(timeout)
            if not msg.get("ready"):
                raise WorkerError(f"expected a ready line, got {msg}")
            self.ready = msg
        except WorkerError as e:
            self.fail(f"start failed: {e}")
        self.start_s = time.monotonic() - t0

    def run(self, k, timeout=900.0):
        try:
            self.proc.stdin.write(f"run {k}\n".encode())
            self.proc.stdin.flush()
            msg = self.readline(timeout)
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"pipe closed ({e}): {self._stderr_tail()}")
        times = msg.get("times_ms")
        if not isinstance(times, list) or len(times) != k:
            raise WorkerError(f"expected {k} times, got {msg}")
        return [float(t) for t in times]

    def fail(self, msg):
        self.error = msg
        log(f"  !! {self.name()}: {msg}")
        self.stop()

    def rss(self):
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mb = int(line.split()[1]) / 1024
        except OSError:
            pass

    def stop(self):
        if self.proc.poll() is None:
            self.rss()
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, None) and self.error is None:
            self.error = f"exited with status {self.proc.returncode}: {self._stderr_tail()}"
        self._log.close()


# --------------------------------------------------------------------------------------------
# Machine and versions.


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                f = set(line.split(":", 1)[1].split())
                return [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if x in f]
    except OSError:
        pass
    return []


HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuMeter:
    """CPU time of other processes: the machine's busy time (and time stolen by the hypervisor)
    minus that of this driver and its workers, in cores, between start() and stop()."""

    def __init__(self, pids):
        self.pids = pids

    @staticmethod
    def _machine():
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq = f[:7]
        steal = f[7] if len(f) > 7 else 0
        return user + nice + system + irq + softirq + steal

    def _ours(self):
        t = os.times()
        ticks = (t.user + t.system) * HZ
        for pid in self.pids:
            try:
                rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(rest[11]) + int(rest[12])
            except (OSError, ValueError, IndexError):
                pass
        return ticks

    def start(self):
        self.t0, self.m0, self.o0 = time.monotonic(), self._machine(), self._ours()

    def stop(self):
        dt = time.monotonic() - self.t0
        m1, o1 = self._machine(), self._ours()
        if self.m0 is None or m1 is None or dt <= 0:
            return None
        return max(0.0, ((m1 - self.m0) - (o1 - self.o0)) / HZ / dt)


def versions(args):
    out = {}
    try:
        out["coarsen"] = subprocess.run([args.coarsen, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        out["coarsen"] = f"unknown ({e})"
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = "not installed"
    if args.deepsparse_python == "none":
        out["deepsparse"] = "not installed"
    else:
        r = subprocess.run(
            [args.deepsparse_python, "-c", "import deepsparse; print(deepsparse.__version__)"],
            capture_output=True,
            text=True,
            env={**os.environ, "NM_DISABLE_ANALYTICS": "1"},
        )
        out["deepsparse"] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "not importable"
    out["numpy"] = np.__version__
    out["python"] = platform.python_version()
    return out


def coarsen_serves(binary):
    r = subprocess.run([binary, "bench", "--help"], capture_output=True, text=True)
    return "--serve" in r.stdout


# --------------------------------------------------------------------------------------------
# Measurement.


def worker_cmd(args, engine, export, xpath, logits):
    t = str(args.threads)
    if engine.startswith("coarsen-"):
        path = engine.split("-", 1)[1]
        extra = []
        if path == "bf16":
            path, extra = "packed", ["--bf16"]
        return [args.coarsen, "bench", "--serve", export, "--path", path, "--input", xpath, "--logits-out", logits, "--threads", t, *extra]
    py = sys.executable if engine == "ort" else args.deepsparse_python
    return [py, HERE / "worker.py", "--engine", engine, "--model", export / "model.onnx", "--input", xpath, "--threads", t, "--logits-out", logits]


def measure(args, model, batch, exports, engines, logdir, env):
    """Starts every worker of (model, batch), runs the interleaved rounds, stops them."""
    a = args
    xdir = a.work / "inputs"
    xdir.mkdir(parents=True, exist_ok=True)
    xpath = xdir / f"x-b{batch}-seed{a.seed}.npy"
    if not xpath.exists():
        rng = np.random.default_rng([a.seed, batch])
        x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        np.save(xpath.with_suffix(".tmp.npy"), x)
        os.replace(xpath.with_suffix(".tmp.npy"), xpath)
    ldir = a.work / "logits" / f"{model}-b{batch}"
    ldir.mkdir(parents=True, exist_ok=True)

    workers, skipped = [], []
    reps = a.reps or (10 if batch >= 8 else 50)
    # A run's `reps` passes per worker go in slices, the workers taking turns slice by slice:
    # the machine's slow phases (a second or so, seen by every engine alike) then fall on every
    # engine, not on whichever worker's block they happen to overlap.
    size = min(reps, a.slice or (5 if batch >= 8 else 10))
    slices = [min(size, reps - s) for s in range(0, reps, size)]
    warmup = a.warmup if a.warmup is not None else max(1, size // 10)
    try:
        for v in a.variants:
            for e in engines:
                if v == "dense" and e == "coarsen-packed":
                    continue  # the dense network has no packed formats: its path is coarsen dense
                if e == "coarsen-bf16" and v not in BF16_VARIANTS:
                    continue  # no layer of these runs a block kernel
                if e == "deepsparse" and a.deepsparse_python == "none":
                    skipped.append((model, batch, v, e, "not installed"))
                    continue
                logits = ldir / f"{v}-{e}.npy"
                if logits.exists():
                    logits.unlink()
                cmd = worker_cmd(a, e, exports[v], xpath, logits)
                w = Worker(model, batch, v, e, cmd, logdir / f"{model}-b{batch}-{v}-{e}.log", env)
                w.logits_path = logits
                workers.append(w)
                log(f"  starting {w.name()}")
                # One at a time: a loading worker (DeepSparse compiles its model) gets the machine.
                w.wait_ready(a.start_timeout)
        live = [w for w in workers if w.error is None]
        meter = CpuMeter([w.proc.pid for w in live])
        for r in range(a.runs):
            n = len(live)
            shift = (r * n) // a.runs if n else 0
            order = live[shift:] + live[:shift]
            t0 = time.monotonic()
            times = {id(w): [] for w in order}
            others = {id(w): [] for w in order}
            for k in slices:
                for w in order:
                    if w.error is not None:
                        continue
                    try:
                        # A turn starts on a quiet machine: the previous worker's pool may still
                        # be spinning after its last pass.
                        time.sleep(a.pause)
                        if warmup:
                            w.run(warmup)
                        meter.start()
                        times[id(w)] += w.run(k)
                        o = meter.stop()
                        if o is not None:
                            others[id(w)].append(o)
                    except WorkerError as e:
                        w.fail(f"run {r + 1}: {e}")
            for w in order:
                if w.error is None:
                    w.times.append(times[id(w)])
                    # The busiest slice: the flag reports the worst the passes saw.
                    w.others.append(max(others[id(w)]) if others[id(w)] else None)
            log(f"  {model} batch {batch}: run {r + 1}/{a.runs} done in {time.monotonic() - t0:.1f} s")
    finally:
        for w in workers:
            w.stop()
    return workers, skipped, reps, warmup, size


def turn_medians(times, size):
    """Each run's passes (`times[run]`, turns of `size` passes in order) as the median of each turn."""
    size = max(1, size)
    return [[statistics.median(run[i : i + size]) for i in range(0, len(run), size)] for run in times]


def paired(ref, this):
    """Median over the turns of (reference turn's median / this turn's median), the turns taken
    in the same round of the same run; None unless both have every turn."""
    if not ref or not this or [len(x) for x in ref] != [len(x) for x in this]:
        return None
    ratios = [a / b for ra, rb in zip(ref, this) for a, b in zip(ra, rb) if b > 0]
    return statistics.median(ratios) if ratios else None


def check_logits(workers):
    """max |Δ| of every worker's logits against coarsen dense (else ORT) on the same weights."""
    by = {(w.variant, w.engine): w for w in workers if w.ready and w.logits_path.exists()}
    out = {}
    for w in workers:
        ref = None
        for e in ("coarsen-dense", "ort", "deepsparse", "coarsen-packed", "coarsen-bf16"):
            if (w.variant, e) in by:
                ref = by[(w.variant, e)]
                break
        if w.key not in {x.key for x in by.values()} or ref is None:
            continue
        a = np.load(w.logits_path).astype(np.float64)
        b = np.load(ref.logits_path).astype(np.float64)
        if a.shape != b.shape:
            out[w.key] = {"reference": ref.engine, "error": f"shape {list(a.shape)} vs {list(b.shape)}", "ok": False}
            continue
        d = float(np.max(np.abs(a - b))) if a.size else 0.0
        m = float(np.max(np.abs(b))) if b.size else 0.0
        finite = bool(np.all(np.isfinite(a)))
        # The share of images whose top-1 class is the reference's.
        agree = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1))) if a.ndim == 2 and a.size else 1.0
        if w.engine == "coarsen-bf16":
            ok = finite and d <= BF16_TOLERANCE * max(1.0, m) and agree >= BF16_AGREEMENT
        else:
            ok = finite and d <= 1e-3 * max(1.0, m)
        out[w.key] = {
            "reference": ref.engine,
            "max_abs_diff": d,
            "max_abs_logit": m,
            "top1_agreement": agree,
            "ok": ok,
        }
    return out


# --------------------------------------------------------------------------------------------
# Report.


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_x(x):
    return "-" if x is None else f"{x:.2f}×"


def table(rows, right=()):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [str(c).rjust(widths[i]) if i in right and j else str(c).ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append(
                "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
            )
    return "\n".join(lines)


def roof_ms(macs, peak_gflops):
    """The least milliseconds `macs` multiply-adds (2 FLOPs each) take at `peak_gflops`; None
    without both."""
    if not macs or not peak_gflops or peak_gflops <= 0 or not math.isfinite(peak_gflops):
        return None
    return 2.0 * macs / (peak_gflops * 1e9) * 1e3


def roof_rows(results):
    """The roofs table: one row per coarsen-packed result that has a roof."""
    rows = [["model", "batch", "variant", "GMAC", "FMA peak GFLOP/s", "roof ms", "median ms",
             "of roof", "roof / DeepSparse same weights", "Winograd layers"]]
    for r in results:
        if r["engine"] not in ("coarsen-packed", "coarsen-bf16") or not r.get("roof_ms"):
            continue
        t = r["median_ms"]
        bf16 = " (bf16)" if r["engine"] == "coarsen-bf16" else ""
        rows.append(
            [r["model"], r["batch"], VARIANT_LABEL[r["variant"]] + bf16, f"{r['macs'] / 1e9:.3f}",
             f"{r['fma_peak_gflops']:.1f}", fmt_ms(r["roof_ms"]), fmt_ms(t) if t else "-",
             f"{r['roof_ms'] / t:.0%}" if t else "-",
             f"{r['roof_vs_deepsparse_same_weights']:.2f}" if r.get("roof_vs_deepsparse_same_weights") else "-",
             str(r.get("winograd_layers", "-"))]
        )
    return rows


def main(argv):
    global np
    a = parse_args(argv)
    import numpy

    np = numpy
    t_start = time.monotonic()
    a.work.mkdir(parents=True, exist_ok=True)
    jpath = a.json or a.work / "bench-peers.json"
    logdir = a.work / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    engines = list(a.engines)
    notes = []
    if "coarsen-bf16" in engines and "avx512_bf16" not in cpu_flags():
        engines.remove("coarsen-bf16")
        notes.append("this CPU has no AVX-512 BF16: coarsen-bf16 is left out")
    coarsen_engines = [e for e in engines if e.startswith("coarsen-")]
    if coarsen_engines and not coarsen_serves(a.coarsen):
        engines = [e for e in engines if not e.startswith("coarsen-")]
        notes.append(f"{a.coarsen} has no `bench --serve`: coarsen's engines are left out")
    if not engines:
        die("no engine left to run")
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "OMP_NUM_THREADS": str(a.threads)}

    ver = versions(a)
    if "deepsparse" in engines and a.deepsparse_python != "none" and ver["deepsparse"] == "not importable":
        notes.append(f"{a.deepsparse_python} cannot import deepsparse: DeepSparse is left out")
        a.deepsparse_python = "none"
    for n in notes:
        log(f"bench-peers: note: {n}")

    # Weights, masks and exports, all before any timing.
    prep = Prep(a, logdir)
    log(f"bench-peers: preparing weights, masks and exports in {a.work}")
    exports, densities = {}, {}
    for m in a.models:
        exports[m], pruned = prep.model(m)
        for v, d in exports[m].items():
            densities[(m, v)] = density_of(d, pruned) if v != "dense" else 1.0
    t_prep = time.monotonic() - t_start

    results, skipped_all, reps_used, warmups, slices = [], [], {}, {}, {}
    t_measure = time.monotonic()
    for m in a.models:
        for b in a.batches:
            log(f"bench-peers: {m}, batch {b}")
            workers, skipped, reps, warmup, size = measure(a, m, b, exports[m], engines, logdir, env)
            reps_used[b], warmups[b], slices[b] = reps, warmup, size
            checks = check_logits(workers)
            skipped_all += skipped
            for w in workers:
                flat = [t for run in w.times for t in run]
                complete = w.error is None and len(w.times) == a.runs
                results.append(
                    {
                        "model": m,
                        "batch": b,
                        "variant": w.variant,
                        "engine": w.engine,
                        "density": densities[(m, w.variant)],
                        "ideal": 1.0 / densities[(m, w.variant)],
                        "median_ms": statistics.median(flat) if complete and flat else None,
                        # The fastest pass: what stolen and shared cores could not slow down.
                        "best_ms": min(flat) if complete and flat else None,
                        "run_medians_ms": [statistics.median(t) for t in w.times],
                        "times_ms": w.times,
                        "other_cores": w.others,
                        "error": w.error,
                        "check": checks.get(w.key),
                        "detail": (w.ready or {}).get("detail"),
                        # coarsen's workers: the pass's multiply-adds and the FMA peak they
                        # measured (the roof below).
                        "macs": (w.ready or {}).get("macs"),
                        "fma_peak_gflops": (w.ready or {}).get("fma_peak_gflops"),
                        "winograd_layers": (w.ready or {}).get("winograd_layers"),
                        "engine_name": (w.ready or {}).get("engine"),
                        "start_s": w.start_s,
                        "peak_rss_mb": w.peak_rss_mb,
                        "export": str(exports[m][w.variant]),
                        "log": str(w.logpath),
                    }
                )
            for (mm, bb, v, e, why) in skipped:
                results.append(
                    {"model": mm, "batch": bb, "variant": v, "engine": e, "density": densities[(mm, v)],
                     "ideal": 1.0 / densities[(mm, v)], "median_ms": None, "best_ms": None,
                     "run_medians_ms": [],
                     "times_ms": [], "error": why, "check": None}
                )
    t_measure = time.monotonic() - t_measure

    # Ratios: speed-ups (reference time / this time).
    med = {(r["model"], r["batch"], r["variant"], r["engine"]): r["median_ms"] for r in results}
    turns = {
        (r["model"], r["batch"], r["variant"], r["engine"]): turn_medians(r["times_ms"], slices[r["batch"]])
        for r in results
        if r["median_ms"] is not None
    }
    bst = {(r["model"], r["batch"], r["variant"], r["engine"]): r.get("best_ms") for r in results}
    for r in results:
        k = (r["model"], r["batch"])
        peers = [med.get((*k, "dense", e)) for e in PEERS]
        peers = [p for p in peers if p is not None]
        best = min(peers) if peers else None
        same_ds = med.get((*k, r["variant"], "deepsparse"))
        t = r["median_ms"]
        r["best_dense_peer_ms"] = best
        r["speedup_vs_best_dense_peer"] = best / t if best and t else None
        r["speedup_vs_deepsparse_same_weights"] = same_ds / t if same_ds and t else None
        # Turn by turn: DeepSparse's turn and this engine's of the same round ran seconds
        # apart, so a slow phase of the machine (minutes long) mostly hits both.
        r["paired_speedup_vs_deepsparse_same_weights"] = paired(
            turns.get((*k, r["variant"], "deepsparse")), turns.get((*k, r["variant"], r["engine"]))
        )
        # The same ratio on each engine's fastest pass (robust to a noisy neighbour).
        fastest = [bst.get((*k, "dense", e)) for e in PEERS]
        fastest = [p for p in fastest if p is not None]
        fb, tb = (min(fastest) if fastest else None), r.get("best_ms")
        r["best_dense_peer_best_ms"] = fb
        r["best_speedup_vs_best_dense_peer"] = fb / tb if fb and tb else None
        r["roof_ms"] = roof_ms(r.get("macs"), r.get("fma_peak_gflops"))
        r["roof_vs_deepsparse_same_weights"] = (
            r["roof_ms"] / same_ds if r["roof_ms"] and same_ds else None
        )

    order_m = {m: i for i, m in enumerate(a.models)}
    order_b = {b: i for i, b in enumerate(a.batches)}
    order_v = {v: i for i, v in enumerate(VARIANTS)}
    order_e = {e: i for i, e in enumerate(ENGINES)}
    results.sort(key=lambda r: (order_m[r["model"]], order_b[r["batch"]], order_v[r["variant"]], order_e[r["engine"]]))

    rows = [
        ["model", "batch", "variant", "density", "ideal", "engine", "median ms", "run medians ms",
         "vs best dense peer", "vs DeepSparse same weights", "paired vs DeepSparse same weights",
         "best ms", "best vs best dense peer",
         "max|Δ| / max|logit|", "check", "others"]
    ]
    busy = [x for r in results for x in (r.get("other_cores") or []) if x is not None]
    mismatches = []
    for r in results:
        c = r.get("check")
        if r["error"]:
            check = "not installed" if r["error"] == "not installed" else "FAILED"
            delta = "-"
        elif c is None:
            check, delta = "-", "-"
        elif "error" in c:
            check, delta = "!! MISMATCH !!", c["error"]
        else:
            delta = f"{c['max_abs_diff']:.1e} / {c['max_abs_logit']:.2g}"
            if r["engine"] == "coarsen-bf16":
                delta += f", top-1 {c['top1_agreement']:.0%}"
            check = "ok" if c["ok"] else "!! MISMATCH !!"
            if c["reference"] == r["engine"] and c["ok"]:
                check = "reference"
        if check == "!! MISMATCH !!":
            mismatches.append(r)
        if r["error"] == "not installed":
            median, runs = "not installed", "-"
        elif r["error"]:
            median, runs = "failed", r["error"][:60]
        else:
            median, runs = fmt_ms(r["median_ms"]), " ".join(fmt_ms(x) for x in r["run_medians_ms"])
        oc = [x for x in (r.get("other_cores") or []) if x is not None]
        others = f"{max(oc):.2f}" if oc else "-"
        rows.append(
            [r["model"], r["batch"], VARIANT_LABEL[r["variant"]], f"{r['density']:.3f}", f"{r['ideal']:.2f}×",
             ENGINE_LABEL[r["engine"]], median, runs, fmt_x(r.get("speedup_vs_best_dense_peer")),
             fmt_x(r.get("speedup_vs_deepsparse_same_weights")),
             fmt_x(r.get("paired_speedup_vs_deepsparse_same_weights")),
             fmt_ms(r["best_ms"]) if r.get("best_ms") else "-",
             fmt_x(r.get("best_speedup_vs_best_dense_peer")), delta, check, others]
        )

    wall = time.monotonic() - t_start
    flags = cpu_flags()
    ref_name = "coarsen dense" if "coarsen-dense" in engines else "ONNX Runtime" if "ort" in engines else "DeepSparse"
    reps_text = ", ".join(
        f"{a.runs} × {reps_used[b]} (batch {b}, in turns of {slices[b]}, {warmups[b]} warm-up pass(es) before each turn)"
        for b in a.batches
        if b in reps_used
    )
    header = [
        f"# bench-peers: coarsen against ONNX Runtime and DeepSparse, same weights, same run",
        "",
        f"- machine: {cpu_model()} ({os.cpu_count()} logical CPUs; {', '.join(flags) or 'no AVX2'}), "
        f"{a.threads} thread(s) per engine",
        f"- versions: {ver['coarsen']}, onnxruntime {ver['onnxruntime']}, deepsparse {ver['deepsparse']}, "
        f"numpy {ver['numpy']}, Python {ver['python']}",
        f"- model.onnx: BatchNorm folded into the convolutions (`coarsen export --fold-bn`); coarsen "
        f"folds it itself",
        f"- weights: `coarsen synth --seed {a.seed}`; unstructured = per-layer magnitude pruning to "
        f"{a.sparsity:g} sparsity of every conv but the first and every linear but the classifier; "
        f"group, shuffled-block = its conversions; … of whole kernels = the same conversions "
        f"(`--kernels`) of whole 3×3 kernels pruned to {a.sparsity:g} (`prune --granularity kernel`); "
        f"channel = Refill of a {a.channel_sparsity:g} mask; "
        f"N:M = 2:4 of the dense weights",
        f"- timing: runs × timed passes = {reps_text}; workers interleaved in a rotated order each run; "
        f"median over all passes, then each run's median",
        f"- density = kept fraction of the pruned layers' weights; ideal = 1/density (for channel the "
        f"next layer's removed inputs make the multiply-adds saved larger)",
        f"- vs … = speed-up: reference median / this median (above 1 = faster); best dense peer = "
        f"the faster of ONNX Runtime and DeepSparse on the dense network",
        f"- paired vs DeepSparse same weights = the median, over every turn, of DeepSparse's turn "
        f"median / this engine's in the same round (turns of one round run seconds apart, so a "
        f"slow phase of the machine hits both)",
        f"- best ms = the fastest timed pass; best vs best dense peer = the same ratio on fastest "
        f"passes (time a noisy neighbour stole inflates medians, not the fastest pass)",
        f"- check: logits against {ref_name} on the same weights (reference), flagged above "
        f"1e-3·max(1, max|logit|); coarsen packed bf16 (block kernels in bfloat16: weights and "
        f"inputs rounded to 8 significant bits, products summed in float32) above "
        f"{BF16_TOLERANCE:g}·max(1, max|logit|) or where fewer than {BF16_AGREEMENT:.0%} of the "
        f"images keep their top-1 class",
        f"- others: the most cores other processes used (or the hypervisor stole) during one of the "
        f"row's timed blocks; over the whole timing: mean {statistics.mean(busy) if busy else 0:.2f}, "
        f"max {max(busy) if busy else 0:.2f} of {os.cpu_count()} cores",
    ]
    if busy and max(busy) > QUIET:
        header.append(
            f"- !! NOT A QUIET MACHINE !! other processes used up to {max(busy):.2f} cores while timing: "
            f"rows whose `others` exceeds {QUIET} are unreliable (DeepSparse, which pins its threads "
            f"and spins, slows down up to 20× under contention); rerun on a quiet machine"
        )
    text = "\n".join(header) + "\n\n" + table(rows, right={1, 3, 4, 6, 8, 9, 10, 11, 14}) + "\n"
    roofs = roof_rows(results)
    if len(roofs) > 1:
        text += (
            "\nRoofs of coarsen's packed path: roof ms = the pass's multiply-adds (the weights each "
            "layer's kernel multiplies: the kept ones of a packed layer, all of a layer the tuning runs "
            "dense; × output positions) at the FMA peak its worker measured on its threads, the least "
            "time of any kernel that multiplies every one of those weights; of roof = roof ms / median ms (the share of the "
            "peak the pass ran at); roof / DeepSparse = roof ms / DeepSparse's median on the same "
            "weights, the lowest ratio to DeepSparse such kernels can reach. Winograd layers multiply "
            "less than they count, so a row with them can run below its roof; (bf16) rows multiply "
            "in bfloat16, two products per lane and instruction, and can run at up to twice the "
            "FMA peak.\n\n"
            + table(roofs, right={1, 3, 4, 5, 6, 7, 8, 9})
            + "\n"
        )
    if mismatches:
        text += "\n!! LOGITS MISMATCH !! " + ", ".join(
            f"{r['model']} b{r['batch']} {r['variant']} {r['engine']}" for r in mismatches
        ) + " differ from the reference beyond the tolerance\n"
    failed = [r for r in results if r["error"] and r["error"] != "not installed"]
    for r in failed:
        text += f"\nFAILED: {r['model']} b{r['batch']} {r['variant']} {r['engine']}: {r['error']} (log: {r.get('log')})"
    if failed:
        text += "\n"
    for n in notes:
        text += f"\nnote: {n}"
    text += (
        f"\nwall time {wall:.0f} s (preparation {t_prep:.0f} s, of which coarsen commands {prep.seconds:.0f} s; "
        f"workers and timing {t_measure:.0f} s)\n"
    )
    print(text, flush=True)

    doc = {
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "flags": flags, "platform": platform.platform()},
        "versions": ver,
        "settings": {
            "models": a.models, "batches": a.batches, "threads": a.threads, "runs": a.runs,
            "reps": {str(b): r for b, r in reps_used.items()}, "warmup": {str(b): w for b, w in warmups.items()},
            "slice": {str(b): k for b, k in slices.items()}, "pause_s": a.pause,
            "engines": engines, "variants": a.variants, "sparsity": a.sparsity,
            "channel_sparsity": a.channel_sparsity, "seed": a.seed, "batchnorm": "folded (export --fold-bn)",
            "work": str(a.work), "coarsen": str(a.coarsen), "deepsparse_python": a.deepsparse_python,
        },
        "results": results,
        "mismatches": [[r["model"], r["batch"], r["variant"], r["engine"]] for r in mismatches],
        "notes": notes,
        "made": prep.made,
        "other_cores": {"mean": statistics.mean(busy) if busy else None, "max": max(busy) if busy else None},
        "wall_s": wall,
        "prep_s": t_prep,
        "measure_s": t_measure,
        "table": text,
    }
    jpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = jpath.with_name(jpath.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, jpath)
    log(f"bench-peers: wrote {jpath}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
