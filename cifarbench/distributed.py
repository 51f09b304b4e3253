"""Dataset-scale analyses in shards, in this process or on a Ray cluster: exact and resumable.

:func:`run_sharded` splits an analysis into shards, runs each through the analysis module's own function (this
module computes nothing itself) and merges the partial results exactly:

==========  ===========================  ========================================================================
kind        shard                        merge
==========  ===========================  ========================================================================
occlusion   a range of images            maps by image index (:func:`analysis.occlusion.occlusion_maps`)
ablation    filters x a range of images  a ``--sweep``: the confusion cells of the unablated net and of each
                                         filter (:func:`analysis.ablation.sweep_confusions`) summed, then
                                         ranked by :func:`analysis.ablation.sweep_result`; a selection zeroed
                                         together (images only): confusion cells summed, flips gathered
mining      a range of images            per filter top-K lists by :func:`analysis.mining.mine`, merged with
                                         its tie rule (a stable sort: the lower image index wins); a filter
                                         is dead when it is dead in every shard
==========  ===========================  ========================================================================

Image ranges are whole batches of the analysis (its ``batch_size``), so every image goes through the runtime in
the same batch as in the unsharded run and the numbers are the same bit for bit where the backend is
deterministic.

Where the model comes from on a Ray worker: its content, never a path that only the driver has. A zoo name
travels as the name; a file (checkpoint, ONNX with its external data files, .pt2, TorchScript, state_dict and an
``--arch`` .py file) travels as its bytes through Ray's object store, written to a temporary folder on the worker
under its own name (so suffixes and relative external-data locations hold) and checked against the driver's
sha256 before it is opened; an in-memory module travels pickled. Each worker process opens the model once and
keeps it for every later shard of the run. Images travel as the shard's uint8 array.

Resume: with ``out``, each finished shard is written atomically as ``out/shards/<kind>-<key>.npz``, the key a
hash of the model's content digest, the analysis settings, the shard's range and filters and the sha256 of the
shard's images and labels; ``resume=True`` reads the shards already there instead of computing them. Only the
driver writes shard files (when a shard's result arrives), so a killed driver or worker loses only the shards in
flight; Ray itself retries a task whose worker died.

Errors are as for ``cifarbench sweep`` (whose Ray helpers this module uses): Ray missing, an unreachable
``--address`` (checked within 5 s), or a cluster where no node can hold one task are each one ``UserError``.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import UserError, warn
from .sweep import RAY_INSTALL, _import_ray, check_address, ray_session

KINDS = ("occlusion", "ablation", "mining")
#: in every shard key: shard files of an older layout (sweep shards held per-class counts before format 2) are
#: recomputed on --resume, never misread
SHARD_FORMAT = 2
EXECUTORS = ("local", "ray")
SHARD_DIR = "shards"
#: images per shard by default: the smallest size at which, on net1 (the cheapest net, so the worst case for
#: overhead), one shard's work is more than 10x the per-shard cost of Ray and of writing the shard file
#: (benchmarks/test_bench_distributed.py); larger nets only lower the ratio
DEFAULT_SHARD = {"occlusion": 64, "ablation": 2000, "mining": 5000}
#: ablation: filters per shard by default (each shard reruns the unablated prefix of the net once per image)
DEFAULT_FILTERS_PER_SHARD = 256
#: images per occlusion engine call, as ``cifarbench occlude --data`` (commands/occlude.DATA_BATCH)
OCCLUSION_BATCH = 8
#: arguments that do not change a shard's result: the filter selection (each shard's key names its own group) and
#: the driver's words for an auto decision (the decision itself, ``modes``, is in the key)
NOT_IN_KEY = ("selection", "auto_why")
#: ``mode="approx"``'s knobs (:mod:`cifarbench.kernels.approx`): occlusion settings, so in every shard key
APPROX_KNOBS = ("tau", "coarse", "approx_precision")
ANALYSIS_BATCH = 250  # as analysis.ablation/mining DEFAULT_BATCH (not imported: they import torch)
#: most shards kept queued in Ray per task slot, so a huge run does not put every shard's images at once
QUEUED_PER_SLOT = 2


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Shard:
    """One unit of work: images ``start:stop`` (and, for ablation, ``filters``), named by ``key``."""

    index: int
    start: int
    stop: int
    filters: tuple = ()
    key: str = ""

    @property
    def images(self) -> int:
        return self.stop - self.start

    def file_name(self, kind: str) -> str:
        return f"{kind}-{self.key}.npz"


@dataclass(frozen=True)
class Progress:
    """What a progress callback gets after the resume scan and after every finished shard. ``images`` counts the
    images of finished shards (an ablation shard counts its images once per shard); rate and ETA are over the
    shards computed in this run (None until the first one finishes)."""

    done: int
    total: int
    skipped: int
    images_done: int
    images_total: int
    images_per_s: float | None
    eta_s: float | None


@dataclass
class ShardedRun:
    """The merged result (what the unsharded analysis returns) and what happened: shards in all, read from
    ``out`` (resume) and computed now, wall seconds, shard files written, and the seconds spent inside the
    analysis functions (``seconds - analysis_s`` is what sharding cost, where shards ran one at a time)."""

    result: Any
    shards: int
    skipped: int
    executed: int
    seconds: float
    files: list[str] = field(default_factory=list)
    analysis_s: float = 0.0  # time inside the analysis functions of the shards computed now, summed


# ------------------------------------------------------------------------------------------------ checks
def check_executor(executor: str, address: str | None = None, cpus_per_task: float = 1.0,
                   gpus_per_task: float = 0.0) -> None:
    """Everything about where shards run that can be wrong, checked before any model or data is opened: the
    executor's name, the per-task resources, Ray being installed and ``address`` answering within 5 s."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: use local or ray")
    if not _number(cpus_per_task) or not _number(gpus_per_task) or not cpus_per_task > 0 or not gpus_per_task >= 0:
        raise UserError(f"--cpus-per-task must be > 0 and --gpus-per-task >= 0 (got {cpus_per_task!r}, "
                        f"{gpus_per_task!r})")
    if executor == "local":
        if address:
            raise UserError("--address needs --executor ray")
        return
    _import_ray()
    if address:
        check_address(address)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_placement(ray, cpus: float, gpus: float) -> None:
    """A task that no single node can hold would wait forever (Ray only logs it); say so instead. Checked per
    node, not against the cluster's total: two 1-GPU nodes cannot run a 2-GPU task."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    most_cpu = max((r.get("CPU", 0) for r in nodes), default=0)
    most_gpu = max((r.get("GPU", 0) for r in nodes), default=0)
    raise UserError(f"no node of the Ray cluster can run one task with --cpus-per-task {cpus:g} and "
                    f"--gpus-per-task {gpus:g} (its largest node has {most_cpu:g} CPU, {most_gpu:g} GPU)")


def _task_slots(ray, cpus: float, gpus: float) -> int:
    have = ray.cluster_resources()
    slots = have.get("CPU", 0) / cpus
    if gpus > 0:
        slots = min(slots, have.get("GPU", 0) / gpus)
    return max(1, int(slots))


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelPackage:
    """A model as content a worker can open: a zoo name, files (relative name, sha256 and their bytes or Ray
    object references to them; the first is the one to open), or an in-memory module. ``digest`` is the
    source's content digest (:func:`cifarbench.source.resolve_source`), the model's part of every shard key.
    ``options``: resolve_source's contract options (arch, arch_kw, mean, std, classes, input_size)."""

    name: str
    digest: str
    zoo: str | None = None
    files: tuple = ()          # ((relative name, sha256), ...)
    blobs: tuple = ()          # bytes or ObjectRefs, parallel to files (empty: open ``local`` in place)
    local: str | None = None   # the driver's own path (local executor: opened in place, nothing copied)
    module: Any = None
    options: tuple = ()        # sorted (key, value) pairs
    arch_file: str | None = None  # the relative name among ``files`` of an ``--arch path.py:factory`` file

    @property
    def ident(self) -> str:
        return hashlib.sha256(json.dumps([self.digest, list(self.files), list(self.options)],
                                         default=str).encode()).hexdigest()


def pack_model(model, *, ship: bool, options: dict | None = None) -> ModelPackage:
    """Resolve ``model`` once on the driver (every mistake a UserError before any work) and package it.

    ``ship``: read the files' bytes (for Ray workers); else a file is opened where it is."""
    from .source import ModelSource, resolve_source

    options = {k: v for k, v in (options or {}).items() if v is not None}
    src = model if isinstance(model, ModelSource) else resolve_source(model, **options)
    opts = tuple(sorted((k, _plain(v)) for k, v in options.items()))
    if src.kind == "zoo":
        return ModelPackage(src.name, src.digest, zoo=src.name, options=opts)
    if src.path is None:
        return ModelPackage(src.name, src.digest, module=src.module, options=opts)
    main = Path(src.path)
    paths = [(main.name, main)] + [(rel, main.parent / rel) for rel in _external_data(src)]
    arch_file = None
    arch = options.get("arch")
    if arch and str(arch).partition(":")[0].endswith(".py"):
        file = Path(str(arch).partition(":")[0])
        arch_file = f"arch/{file.name}"
        paths.append((arch_file, file))
    files = tuple((rel, _sha256(p)) for rel, p in paths)
    blobs = tuple(p.read_bytes() for _, p in paths) if ship else ()
    return ModelPackage(src.name, src.digest, files=files, blobs=blobs, local=None if ship else str(main),
                        options=opts, arch_file=arch_file)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _external_data(src) -> list[str]:
    """An ONNX file's external data files as locations relative to its folder (resolve_source has checked they
    stay inside it)."""
    if src.kind != "onnx":
        return []
    import onnx

    from .source import _all_tensors

    proto = onnx.load(str(src.path), load_external_data=False)
    found = []
    for t in _all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if loc and loc not in found:
                found.append(loc)
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize(package: ModelPackage, folder: Path):
    """What to open for ``package`` on this machine: a zoo name, a module, or the path of its main file written
    under ``folder`` (each file's sha256 checked against the driver's), with the contract options applied."""
    if package.zoo is not None:
        spec = package.zoo
    elif package.module is not None:
        spec = package.module if not _is_ref(package.module) else _fetch((package.module,))[0]
    elif package.local is not None:
        spec = package.local
    else:
        blobs = _fetch(package.blobs)
        for (rel, digest), data in zip(package.files, blobs):
            target = (folder / rel).resolve()
            if folder.resolve() not in target.parents:  # a location is relative to the model's folder
                raise RuntimeError(f"model file {rel!r} leaves its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if hashlib.sha256(data).hexdigest() != digest:
                raise RuntimeError(f"{package.name}: {rel} arrived with other bytes than the driver sent")
        spec = str(folder / package.files[0][0])
    options = dict(package.options)
    if package.arch_file and package.local is None:
        options["arch"] = f"{folder / package.arch_file}:{str(options['arch']).partition(':')[2]}"
    if not options:
        return spec
    from .source import resolve_source

    return resolve_source(spec, **options)


def _is_ref(obj) -> bool:
    return type(obj).__name__ == "ObjectRef"  # without importing Ray where it is not used


def _fetch(blobs):
    if blobs and _is_ref(blobs[0]):
        import ray

        return ray.get(list(blobs))
    return blobs


# the opened model of this process: one entry (a worker serves one run at a time), freed when another comes
_OPENED: dict = {}


def _model_folder() -> Path:
    """A fresh folder for a shipped model's files, removed at exit; folders of worker processes that died without
    exiting (Ray kills them on cancel or OOM) are removed by the next one."""
    from .io import sweep_stale

    parent = tempfile.gettempdir()
    sweep_stale(parent, re.compile(r"^cifarbench-model-(\d+)\.[A-Za-z0-9_]{8}$"))
    folder = Path(tempfile.mkdtemp(prefix=f"cifarbench-model-{os.getpid()}.", dir=parent))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _opened(package: ModelPackage, kind: str, args: dict, threads: int | None, cache: dict) -> dict:
    """The model opened once per process (or per local run, ``cache``) for ``kind`` and the runtime settings."""
    # the approximate engine is built once per opened model with its knobs: other knobs need another entry
    key = (package.ident, "occlusion" if kind == "occlusion" else "net", args["backend"], args["device"], threads,
           args.get("calib_data"), tuple(args.get(knob) for knob in APPROX_KNOBS))
    if key in cache:
        return cache[key]
    for old in list(cache.values()):
        shutil.rmtree(old["folder"], ignore_errors=True)
    cache.clear()
    folder = _model_folder()
    spec = materialize(package, folder)
    runtime_options = {"threads": threads} if threads else {}
    if args.get("calib_data"):
        runtime_options["calib_data"] = args["calib_data"]
    entry = {"folder": folder, "spec": spec, "runtime_options": runtime_options}
    if kind != "occlusion":
        from .runtime import open_runtime
        from .source import ModelSource, resolve_source

        # the model source, not its torch module: an ONNX file has none, and the analyses name layers from a
        # source and ask the runtime for its capabilities (a torch module or an ONNX graph)
        # (an in-memory module stays itself: its layer table is the module's own, convN for a zoo net)
        import torch

        entry["net"] = spec if isinstance(spec, (ModelSource, torch.nn.Module)) else resolve_source(spec)
        entry["runtime"] = open_runtime(entry["net"], backend=args["backend"], device=args["device"],
                                        **runtime_options)
    else:
        entry["engines"] = {}  # analysis.occlusion.make_engine's cache: runtimes and engines reused across K
    cache[key] = entry
    return entry


# ------------------------------------------------------------------------------------------------ one shard
def run_shard(kind: str, package: ModelPackage, shard: Shard, images, labels, classes, args: dict,
              threads: int | None = None, cache: dict | None = None) -> dict:
    """One shard's partial result as named numpy arrays (what a shard file holds). ``images``: uint8
    [n, 3, S, S] of the shard; ``labels``: int64 [n]."""
    import numpy as np
    import torch

    cache = _OPENED if cache is None else cache
    opened = _opened(package, kind, args, threads, cache)
    images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True))
    labels = torch.from_numpy(np.array(labels, dtype=np.int64, copy=True))
    out = {"key": np.array(shard.key)}
    start = time.perf_counter()
    if kind == "occlusion":
        out.update(_occlusion_shard(opened, images, shard, args))
    else:
        from .data import Dataset

        data = Dataset(images, labels, tuple(classes), f"shard {shard.start}:{shard.stop}")
        out.update((_mining_shard if kind == "mining" else _ablation_shard)(opened, data, shard, args))
    # the analysis alone (the model open excluded): what the sharding costs is the rest of the wall time
    out["analysis_s"] = np.array(time.perf_counter() - start)
    return out


def _occlusion_shard(opened: dict, images, shard: Shard, args: dict) -> dict:
    import numpy as np

    from .analysis.occlusion import add_exact_counts, make_engine, occlusion_maps

    target = args["target"]
    knobs = {key: args[key] for key in APPROX_KNOBS if key in args}
    out = {}
    for k in args["ks"]:
        mode = args.get("modes", {}).get(str(k), args["mode"])  # auto decided on the driver (_decide_auto)
        engine = make_engine(opened["spec"], k, args["stride"], args["backend"], mode, args["device"],
                             cache=opened["engines"], **opened["runtime_options"], **knobs)
        results, counts = [], {}
        for i in range(0, len(images), args["batch"]):
            t = target[shard.start + i:shard.start + i + args["batch"]] if isinstance(target, list) else target
            batch = occlusion_maps(engine, images[i:i + args["batch"]].float().div_(255), k,
                                   stride=args["stride"], baseline=args["baseline"], targets=t)
            add_exact_counts(counts, batch)  # approx: each call's count, summed per shard
            results += batch
        described = {**(results[0].engine if results else {}), **counts}
        out[f"map_k{k}"] = np.stack([r.map for r in results]).astype(np.float32)
        out[f"clean_k{k}"] = np.array([r.clean_prob for r in results], np.float64)
        out[f"target_k{k}"] = np.array([r.target for r in results], np.int64)
        out[f"predicted_k{k}"] = np.array([r.predicted for r in results], np.int64)
        out[f"baseline_k{k}"] = np.array([r.baseline for r in results], np.float64).reshape(len(results), -1)
        out[f"engine_k{k}"] = np.array(json.dumps(described))
    return out


def _mining_shard(opened: dict, data, shard: Shard, args: dict) -> dict:
    import numpy as np

    from .analysis.mining import mine, probe_for

    if "probe" not in opened:  # the probe (a hooked copy or a probe graph) is built once per process too
        opened["probe"] = probe_for(opened["runtime"], opened["net"])
    r = mine(opened["runtime"], opened["net"], data, _selection(args), args["top"], args["batch_size"],
             probe=opened["probe"])
    return {"top_index": r.top_index.astype(np.int64) + shard.start, "top_response": r.top_response,
            "top_position": r.top_position, "top_patch": r.top_patch, "labels": r.labels,
            "selection": np.array(json.dumps(list(r.selection))), "dead": np.array(json.dumps(list(r.dead))),
            "receptive_fields": np.array(json.dumps(r.receptive_fields)), "note": np.array(r.note)}


def _ablation_shard(opened: dict, data, shard: Shard, args: dict) -> dict:
    import numpy as np

    from .analysis.ablation import ablate, sweep_confusions

    if not args["sweep"]:  # the selection zeroed together: both confusion matrices, flips among the first N
        head = max(0, min(args["flipped"], shard.stop) - shard.start)
        r = ablate(opened["runtime"], opened["net"], data, _selection(args), args["zero_bias"], head,
                   args["batch_size"])
        flips = [dict(f, index=f["index"] + shard.start) for f in r["flipped"]]
        return {"conf_before": np.array(r["confusion"]["before"], np.int64),
                "conf_after": np.array(r["confusion"]["after"], np.int64), "flipped": np.array(json.dumps(flips))}

    filters = tuple(tuple(f) for f in shard.filters)
    base, confs = sweep_confusions(opened["runtime"], opened["net"], data, filters, args["zero_bias"],
                                   args["batch_size"])
    return {"conf_base": np.asarray(base, np.int64), "confs": np.stack([np.asarray(c, np.int64) for c in confs])}


def _selection(args: dict) -> tuple:
    return tuple((layer, int(j)) for layer, j in args["selection"])


def _ray_shard(kind, package, shard, images, labels, classes, args, cpus):
    """A Ray task: one shard with ``cpus`` threads; a user mistake comes back as ``{"error": line}``."""
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    try:
        return run_shard(kind, package, shard, images, labels, classes, args, threads)
    except UserError as exc:
        return {"error": str(exc)}


# ------------------------------------------------------------------------------------------------ the plan
def analysis_args(kind: str, data, analysis: dict) -> dict:
    """The analysis settings, checked and with defaults, in the canonical form that goes into shard keys."""
    if kind not in KINDS:
        raise UserError(f"unknown sharded analysis {kind!r}; use one of {', '.join(KINDS)}")
    a = dict(analysis)
    args = {"backend": a.pop("backend", "auto") or "auto", "device": _device(a.pop("device", None))}
    if kind == "occlusion":
        from .analysis.occlusion import baseline_values, check_window, resolve_target

        ks = a.pop("ks", None) or a.pop("k", 8)
        ks = sorted(set([ks] if isinstance(ks, int) else ks))
        stride = int(a.pop("stride", 1))
        for k in ks:
            check_window(k, stride)
        baseline = a.pop("baseline", "gray")
        import torch

        baseline_values(baseline, torch.zeros(1, 3, 2, 2))  # its one check, before any shard runs
        target = a.pop("target", None)
        names = getattr(data, "classes", None)  # the data's classes are matched to the model's by name
        if isinstance(target, (list, tuple)):
            if len(target) != len(data):
                raise UserError(f"{len(target)} targets for {len(data)} images")
            target = [resolve_target(t, names) for t in target]
        else:
            target = resolve_target(target, names)
        from .analysis.occlusion import MODES

        mode = a.pop("mode", "auto") or "auto"
        if mode not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        args.update(ks=ks, stride=stride, baseline=baseline if isinstance(baseline, str) else float(baseline),
                    target=target, mode=mode, batch=int(a.pop("batch", OCCLUSION_BATCH)),
                    calib_data=a.pop("calib_data", None))
        args.update(_approx_knobs(mode, {key: a.pop(key, None) for key in APPROX_KNOBS}, args["device"]))
    else:
        selection = [[str(layer), int(j)] for layer, j in a.pop("selection", ())]
        if not selection:
            raise UserError("no filters selected")
        args.update(selection=selection, batch_size=int(a.pop("batch_size", ANALYSIS_BATCH)))
        if kind == "mining":
            args["top"] = int(a.pop("top", a.pop("k", 20)))
            if args["top"] < 1:
                raise UserError(f"--top must be at least 1, got {args['top']}")
        else:
            args["zero_bias"] = bool(a.pop("zero_bias", False))
            args["sweep"] = bool(a.pop("sweep", True))
            if not args["sweep"]:
                args["flipped"] = int(a.pop("flipped", 256))
    if a:
        raise TypeError(f"unknown {kind} settings: {', '.join(sorted(a))}")
    if args.get("batch_size", 1) < 1 or args.get("batch", 1) < 1:
        raise UserError("the batch size must be at least 1")
    return args


def _approx_knobs(mode: str, knobs: dict, device: str | None) -> dict:
    """``--mode approx``'s knobs with their defaults resolved here, on the driver, so that they enter the shard keys
    (a resume with other knobs recomputes) and every worker runs the same ones: the windows' default precision
    depends on the CPU (bf16 where it has AMX), and shards from two kinds of node must not mix precisions."""
    if mode != "approx":
        if any(v is not None for v in knobs.values()):
            raise UserError("--tau and --coarse are knobs of --mode approx")
        return {}
    from .kernels.approx import DEFAULT_COARSE, DEFAULT_TAU, check_knobs, default_precision

    tau = DEFAULT_TAU if knobs["tau"] is None else knobs["tau"]
    coarse = DEFAULT_COARSE if knobs["coarse"] is None else knobs["coarse"]
    precision = knobs["approx_precision"] or default_precision(device)
    try:
        tau, coarse = check_knobs(tau, coarse, precision)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return {"tau": tau, "coarse": coarse, "approx_precision": precision}


def _decide_auto(model, args: dict, model_options: dict | None) -> None:
    """``mode="auto"`` on Ray is decided here, once per K, and the shards get the concrete mode: each Ray worker
    would otherwise time the engines while its siblings load the same cores (and cache that), and could pick
    differently from them. ``args["modes"]`` (in the shard keys) holds the choice, ``args["auto_why"]`` (not in
    them: its words change with the cache) the driver's reason, which the merged results report."""
    from .analysis.occlusion import make_engine

    cache: dict = {}
    options = {**(model_options or {}), **({"calib_data": args["calib_data"]} if args.get("calib_data") else {})}
    modes, why = {}, {}
    for k in args["ks"]:
        engine = make_engine(model, k, args["stride"], args["backend"], "auto", args["device"], cache=cache,
                             **options)
        modes[str(k)], why[str(k)] = engine.mode, engine.describe()["why"]
    args["modes"] = modes
    args["auto_why"] = why


def _check_device(device: str | None, executor: str, gpus_per_task: float) -> None:
    """A device the shards cannot have fails here, not as a torch error inside every task."""
    if device is None or not device.startswith("cuda"):
        return
    if executor == "local":
        from .runtime import parse_device

        parse_device(device)  # a UserError where this machine has no such GPU
    elif not gpus_per_task > 0:
        raise UserError(f"--device {device} on Ray needs --gpus-per-task > 0 (a task sees only the GPUs it asks "
                        f"for)")


def _device(device) -> str | None:
    if device is None:
        return None
    from .runtime import parse_device

    return str(parse_device(device, require_present=False))


def plan_shards(kind: str, data, args: dict, model_digest: str, shard_size: int | None = None,
                filters_per_shard: int | None = None) -> list[Shard]:
    """Shards of whole batches of images (and, for ablation, groups of filters), each with its content key."""
    import numpy as np

    batch = args["batch"] if kind == "occlusion" else args["batch_size"]
    size = DEFAULT_SHARD[kind] if shard_size is None else int(shard_size)
    if size < 1:
        raise UserError(f"the shard size must be at least 1 image, got {size}")
    size = -(-size // batch) * batch if size >= batch else size  # whole batches: the unsharded run's batches
    if size < batch and batch % size:
        size = batch  # a shard smaller than a batch must split batches evenly, else batches differ
    n = len(data)
    groups = [()]
    if kind == "ablation" and args["sweep"]:
        per = DEFAULT_FILTERS_PER_SHARD if filters_per_shard is None else int(filters_per_shard)
        if per < 1:
            raise UserError(f"filters per shard must be at least 1, got {per}")
        sel = [tuple(f) for f in args["selection"]]
        groups = [tuple(sel[i:i + per]) for i in range(0, len(sel), per)]
    images = data.images.numpy() if hasattr(data.images, "numpy") else np.asarray(data.images)
    labels = data.labels.numpy() if hasattr(data.labels, "numpy") else np.asarray(data.labels)
    settings = json.dumps({"kind": kind, "format": SHARD_FORMAT, "model": model_digest, "classes": list(data.classes),
                           **{k: v for k, v in args.items() if k not in NOT_IN_KEY}}, sort_keys=True, default=str)
    shards = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        h = hashlib.sha256(np.ascontiguousarray(images[start:stop]).data)
        h.update(np.ascontiguousarray(labels[start:stop].astype(np.int64)).data)
        content = h.hexdigest()
        for g in groups:
            key = hashlib.sha256(json.dumps([settings, start, stop, [list(f) for f in g], content]).encode())
            shards.append(Shard(len(shards), start, stop, g, key.hexdigest()[:40]))
    return shards


# ------------------------------------------------------------------------------------------------ the run
def run_sharded(kind: str, model, data, *, executor: str = "local", address: str | None = None,
                cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, ray_cpus: int | None = None,
                out: str | Path | None = None, resume: bool = False,
                progress: Callable[[Progress], None] | None = None, shard_size: int | None = None,
                filters_per_shard: int | None = None, model_options: dict | None = None,
                names: list | None = None, **analysis) -> ShardedRun:
    """Run analysis ``kind`` of ``model`` over ``data`` (a :class:`cifarbench.data.Dataset`) in shards; the result
    is what the unsharded analysis returns:

    - ``occlusion``: per image, its :class:`OcclusionResult` for each K in ``ks`` (``k=``/``ks=``, ``stride``,
      ``baseline``, ``target`` (one class or one per image), ``mode``, ``batch``, ``calib_data``; with
      ``mode="approx"`` its knobs ``tau``, ``coarse``, ``approx_precision``, defaults resolved on the driver, and
      each result's engine counts the positions its shard computed exactly); ``names`` label the results as
      ``occlusion_maps(names=...)`` does;
    - ``ablation``: the ranked sweep of :func:`analysis.ablation.sweep` (``selection``, ``zero_bias``,
      ``batch_size``), or with ``sweep=False`` the selection zeroed together, as :func:`analysis.ablation.ablate`
      returns it (``flipped``: look for flips among the first N images);
    - ``mining``: the :class:`analysis.mining.MiningResult` of :func:`analysis.mining.mine` (``selection``,
      ``top``, ``batch_size``);

    each with ``backend`` and ``device``. ``executor``: ``local`` (shards one after another here) or ``ray``
    (``address``, or a local Ray with ``ray_cpus``; each task ``cpus_per_task`` CPUs and ``gpus_per_task``
    GPUs). ``out``: where shard files go (``out/shards``); ``resume``: reuse those already there.
    ``progress(Progress)`` after the resume scan and every finished shard."""
    check_executor(executor, address, cpus_per_task, gpus_per_task)
    if resume and out is None:
        raise UserError("--resume needs --out (the folder that holds the finished shards)")
    args = analysis_args(kind, data, analysis)
    _check_device(args["device"], executor, gpus_per_task)
    if kind == "occlusion" and args["mode"] == "auto" and executor == "ray":
        _decide_auto(model, args, model_options)
    if names is not None and len(names) != len(data):
        raise UserError(f"{len(names)} names for {len(data)} images")
    if len(data) == 0:
        raise UserError("no images to analyse")
    package = pack_model(model, ship=executor == "ray", options=model_options)
    shards = plan_shards(kind, data, args, package.digest, shard_size, filters_per_shard)
    folder = Path(out) / SHARD_DIR if out is not None else None
    started = time.perf_counter()
    parts: dict[int, dict] = {}
    if resume:
        for s in shards:
            found = _read_shard(folder / s.file_name(kind), s.key)
            if found is not None:
                parts[s.index] = found
    skipped = len(parts)
    tracker = _Tracker(shards, parts, progress)
    tracker.report()
    todo = [s for s in shards if s.index not in parts]
    files = []

    def finished(shard: Shard, arrays: dict) -> None:
        if "error" in arrays:
            raise UserError(str(arrays["error"]))
        if folder is not None:  # saved before anything else can stop the driver: a finished shard is kept
            files.append(_write_shard(folder / shard.file_name(kind), arrays))
        parts[shard.index] = arrays
        tracker.finished(shard)

    if executor == "local":
        cache: dict = {}
        try:
            for s in todo:
                finished(s, run_shard(kind, package, s, _slice(data.images, s), _slice(data.labels, s),
                                      data.classes, args, cache=cache))
        finally:
            for entry in cache.values():
                shutil.rmtree(entry["folder"], ignore_errors=True)
    elif todo:
        _run_ray(kind, package, todo, data, args, address, ray_cpus, cpus_per_task, gpus_per_task, finished)
    result = merge(kind, shards, parts, args, data, names)
    analysis_s = sum(float(parts[s.index]["analysis_s"]) for s in todo)
    return ShardedRun(result, len(shards), skipped, len(todo), time.perf_counter() - started, files, analysis_s)


def _slice(tensor, shard: Shard):
    t = tensor[shard.start:shard.stop]
    return t.numpy() if hasattr(t, "numpy") else t


def _run_ray(kind, package, todo, data, args, address, ray_cpus, cpus, gpus, finished) -> None:
    # cpus/gpus 0 here: ray_session's own check names sweep's --cpus-per-trial; check_placement names ours
    with ray_session(address, ray_cpus, 0, 0) as ray:
        check_placement(ray, cpus, gpus)
        # into the object store once, shared by every task (an argument would be serialized per task)
        shipped = replace(package, blobs=tuple(ray.put(b) for b in package.blobs),
                          module=None if package.module is None else ray.put(package.module))
        task = ray.remote(_ray_shard).options(num_cpus=cpus, num_gpus=gpus, max_retries=3)
        window = QUEUED_PER_SLOT * _task_slots(ray, cpus, gpus)
        queue = list(reversed(todo))
        pending: dict = {}
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    s = queue.pop()
                    ref = task.remote(kind, shipped, s, _slice(data.images, s), _slice(data.labels, s),
                                      tuple(data.classes), args, cpus)
                    pending[ref] = s
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    finished(pending.pop(ref), ray.get(ref))
        finally:
            for ref in pending:  # an interrupted or failed run stops its shards in flight (they are lost, no more)
                ray.cancel(ref, force=True)


class _Tracker:
    def __init__(self, shards: list[Shard], parts: dict, callback):
        self.total, self.callback = len(shards), callback
        self.images_total = sum(s.images for s in shards)
        self.done = self.skipped = len(parts)
        self.images_done = sum(s.images for s in shards if s.index in parts)
        self.run_images = 0
        self.start = time.perf_counter()

    def finished(self, shard: Shard) -> None:
        self.done += 1
        self.images_done += shard.images
        self.run_images += shard.images
        self.report()

    def report(self) -> None:
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.run_images / elapsed if self.run_images and elapsed > 0 else None
        left = self.images_total - self.images_done
        self.callback(Progress(self.done, self.total, self.skipped, self.images_done, self.images_total, rate,
                               left / rate if rate else (0.0 if left == 0 else None)))


def _write_shard(path: Path, arrays: dict) -> str:
    import numpy as np

    from .io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary's name
            np.savez(f, **arrays)
    return str(path)


def _read_shard(path: Path, key: str) -> dict | None:
    """A finished shard's arrays, or None when there is none; a file that is not this shard's is recomputed."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as exc:
        warn(f"{path}: unreadable shard ({exc}); computing it again")
        return None
    if str(arrays.get("key", "")) != key:
        warn(f"{path}: not the shard its name says; computing it again")
        return None
    return arrays


# ------------------------------------------------------------------------------------------------ merging
def merge(kind: str, shards: list[Shard], parts: dict[int, dict], args: dict, data, names=None):
    """The unsharded result from every shard's partial result (see the module docstring)."""
    ordered = [(s, parts[s.index]) for s in shards]
    if kind == "occlusion":
        return _merge_occlusion(ordered, args, len(data), names)
    if kind == "mining":
        return _merge_mining(ordered, args, data)
    return _merge_ablation(ordered, args, data)


def _merge_occlusion(ordered, args: dict, n: int, names) -> list[list]:
    import numpy as np

    from .analysis.occlusion import OcclusionResult

    per_image: list[list] = [[] for _ in range(n)]
    for s, p in ordered:
        for k in args["ks"]:
            engine = json.loads(str(p[f"engine_k{k}"]))
            if "exact_positions" in engine:  # approx: the count is the shard's, so say which shard
                engine["shard"] = [s.start, s.stop]
            if str(k) in args.get("auto_why", {}):
                engine["why"] = f"{args['auto_why'][str(k)]}; decided once on the driver for every shard"
            for j in range(s.images):
                i = s.start + j
                per_image[i].append(OcclusionResult(
                    np.array(p[f"map_k{k}"][j], np.float32), float(p[f"clean_k{k}"][j]), int(p[f"target_k{k}"][j]),
                    int(p[f"predicted_k{k}"][j]), int(k), args["stride"], [float(v) for v in p[f"baseline_k{k}"][j]],
                    names[i] if names is not None else None, engine))
    return per_image


def _merge_mining(ordered, args: dict, data):
    import numpy as np
    import torch

    from .analysis.mining import MiningResult

    first = ordered[0][1]
    selection = tuple(tuple(f) for f in json.loads(str(first["selection"])))
    cat = {name: np.concatenate([p[name] for _, p in ordered], axis=1)
           for name in ("top_index", "top_response", "top_position", "top_patch", "labels")}
    # shards in image order, each best-first with ties to the lower index: a stable sort of their concatenation
    # keeps ties in index order, as analysis.mining.StreamingTopK does
    order = torch.sort(torch.from_numpy(cat["top_response"]), dim=1, descending=True,
                       stable=True).indices[:, :args["top"]].numpy()
    picked = {name: np.take_along_axis(v, order.reshape(*order.shape, *([1] * (v.ndim - 2))), axis=1)
              for name, v in cat.items()}
    dead_sets = [{tuple(f) for f in json.loads(str(p["dead"]))} for _, p in ordered]
    dead = tuple(tuple(f) for f in json.loads(str(first["dead"])) if all(tuple(f) in d for d in dead_sets))
    return MiningResult(selection, picked["top_index"], picked["top_response"], picked["top_position"],
                        picked["top_patch"], picked["labels"], tuple(data.classes),
                        json.loads(str(first["receptive_fields"])), dead,
                        str(first["note"]) if "note" in first else "")  # (shards saved before notes: none)


def _merge_ablation(ordered, args: dict, data) -> dict:
    import numpy as np

    from .analysis.ablation import selection_json, sweep_result

    if not args["sweep"]:  # confusion cells summed; the summaries are recomputed from the sums by metrics'
        from .analysis.metrics import difference, summary

        conf_b = sum(p["conf_before"] for _, p in ordered)
        conf_a = sum(p["conf_after"] for _, p in ordered)
        sb, sa = summary(conf_b, data.classes), summary(conf_a, data.classes)
        return {"filters": selection_json(_selection(args)), "before": sb, "after": sa,
                "difference": difference(sb, sa), "confusion": {"before": conf_b.tolist(), "after": conf_a.tolist()},
                "flipped": [f for _, p in ordered for f in json.loads(str(p["flipped"]))]}

    nc = len(data.classes)
    base = np.zeros((nc, nc), np.int64)
    cells: dict[tuple, np.ndarray] = {}
    first_group = ordered[0][0].filters
    for s, p in ordered:
        if s.filters == first_group:  # the unablated net's cells: once per image range
            base += p["conf_base"]
        for f, conf in zip(s.filters, p["confs"]):
            cells[tuple(f)] = cells.get(tuple(f), np.zeros((nc, nc), np.int64)) + conf
    selection = _selection(args)
    return sweep_result(selection, base, [cells[f] for f in selection], data.classes)


__all__ = ["KINDS", "DEFAULT_SHARD", "RAY_INSTALL", "Shard", "Progress", "ShardedRun", "ModelPackage",
           "check_executor", "check_placement", "pack_model", "materialize", "plan_shards", "analysis_args",
           "run_shard", "run_sharded", "merge"]
