"""Which kernel version the ``cuda`` device runs, chosen from times measured on a GPU.

Two knobs of the kernel backend (``minunet/backends/kernels.py``) pick between kernel versions:
``conv3x3`` (``CONV3X3_VERSIONS``: naive, tiled, ...) and ``reduction`` (``REDUCTIONS``: how the
convolutions' weight gradients are summed). Left at ``"auto"``, a rule of thumb picks per launch
from the shapes. A rule that makes the emulator fast can make a GPU slow (the H200 run of
2026-12-04 spent 56% of the paper's training step in the serial weight gradient that the rule
picked), so on ``cuda`` a version measured faster on a GPU wins over the rule:
``python -m minunet.bench --device cuda --tune`` times every version of every knob on every layer
shape of a U-Net (both precisions) and writes the table ``cuda_choices.json`` next to this file:

    {"format": 1, "device": "cuda", "gpu": "NVIDIA H200", "date": "2026-12-04", "source": "...",
     "choices": {"reduction": {"conv3x3 1x64x570x570->64 fp32":
                                   {"ms": {"tree": <ms>, "serial": <ms>}, "chosen": <the fastest>}, ...},
                 "conv3x3": {...}},
     "observed": {...}}          # optional: what a profile saw, one version per layer; never used

``measured_choice(knob, key)`` answers from ``choices`` only, and only for a table measured on
``cuda``: a shape that is not in the table (another network size, another batch) gets ``None``
and the caller keeps its rule. The emulator never reads the table (``choose`` returns ``None`` off
``cuda``): it keeps the rule, which is tuned for its own speed. ``MINUNET_CHOICES`` names another
table (one measured on your GPU), or ``off`` for the rules alone.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("cuda_choices.json")
FORMAT = 1


@dataclass(frozen=True)
class Knob:
    """A choice of kernel versions: the ``KernelBackend`` attribute that forces it, the name of
    the tuple of its versions in ``minunet.backends.kernels`` (read when asked, so versions added
    there appear here), the ops whose launches it picks for, and which of their backend
    functions it changes (those ending in ``function_suffix``; "" for all of them)."""
    attribute: str
    versions_name: str
    ops: tuple[str, ...]
    function_suffix: str = ""
    tf32_only: tuple[str, ...] = ()   # versions that compute in TF32 whatever the precision

    def allowed(self, key: str) -> tuple[str, ...]:
        """The versions a layer ``key`` may run: under strict fp32 not the TF32-only ones (a
        measured table must never make "fp32" silently compute in TF32)."""
        strict = key.endswith(" fp32")
        return tuple(v for v in self.versions() if not (strict and v in self.tf32_only))

    def versions(self) -> tuple[str, ...]:
        """Every version but "auto", in the order of ``minunet.backends.kernels``."""
        from . import kernels

        return tuple(v for v in getattr(kernels, self.versions_name) if v != "auto")

    def functions(self, op) -> tuple[str, ...]:
        """The backend functions of ``op`` (an op module of ``minunet.ops``) that this knob changes."""
        return tuple(f for f in op.IMPLEMENTATIONS if f.endswith(self.function_suffix))


KNOBS = {
    "conv3x3": Knob("conv3x3_version", "CONV3X3_VERSIONS", ("conv3x3",), tf32_only=("wmma", "wmma_big")),
    "reduction": Knob("reduction", "REDUCTIONS", ("conv3x3", "conv_transpose2x2", "conv1x1"), "_backward"),
    "conv_transpose2x2": Knob("conv_transpose2x2_version", "CONV_TRANSPOSE2X2_VERSIONS", ("conv_transpose2x2",)),
}


def op_name(op) -> str:
    """``minunet.ops.conv3x3`` -> "conv3x3" (the name of the op's module and of its .cu file)."""
    return op.__name__.rsplit(".", 1)[-1]


def layer_key(op: str, case, precision: str) -> str:
    """The table's key of one layer: the op, its case ``(N, Ci, H, W, Co)`` (the input's shape
    and the output channels, as in the ops' ``bench_cases``) and the precision, e.g.
    ``"conv3x3 1x64x570x570->64 fp32"``."""
    n, ci, h, w, co = (int(v) for v in case)
    return f"{op} {n}x{ci}x{h}x{w}->{co} {precision}"


# ---- reading the table ---------------------------------------------------------------------------
_CACHE: dict[str, tuple[int, dict]] = {}


def table_path() -> Path | None:
    """The table in use: ``$MINUNET_CHOICES`` (``off``: none), else ``cuda_choices.json`` here."""
    chosen = os.environ.get("MINUNET_CHOICES", "").strip()
    if chosen.lower() == "off":
        return None
    return Path(chosen) if chosen else TABLE_PATH


def load_table(path: str | Path | None = None) -> dict:
    """The table at ``path`` (default: ``table_path()``), read again when the file changes; an
    empty table when there is none. A file that is not such a table raises ValueError."""
    path = table_path() if path is None else Path(path)
    if path is None or not path.exists():
        return {}
    cached = _CACHE.get(str(path))   # read once per process: launches ask per layer, and a
    if cached is not None:           # stat per launch is what the lean launch path removed
        return cached[1]
    mtime = path.stat().st_mtime_ns
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"kernel choice table {path} is not valid JSON ({exc}); "
                         "regenerate it with python -m minunet.bench --device cuda --tune") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("choices"), dict):
        raise ValueError(f"kernel choice table {path} is not a format-{FORMAT} table with a 'choices' "
                         "object; regenerate it with python -m minunet.bench --device cuda --tune")
    _CACHE[str(path)] = (mtime, table)
    return table


def measured_choice(knob: str, shape_key: str, table: dict | None = None) -> str | None:
    """The version of ``knob`` measured fastest on a GPU for the layer ``shape_key``
    (``layer_key``), or ``None``: no table, a table not measured on ``cuda``, a shape it does not
    hold, or a version this minunet no longer has (the caller then keeps its rule)."""
    if knob not in KNOBS:
        raise ValueError(f"unknown knob {knob!r}; use one of: {', '.join(KNOBS)}")
    table = load_table() if table is None else table
    if table.get("device") != "cuda":
        return None
    entry = table.get("choices", {}).get(knob, {}).get(shape_key, {})
    allowed = KNOBS[knob].allowed(shape_key)
    if entry.get("ms"):   # the fastest of the versions this layer may run, from the times
        return fastest({v: t for v, t in entry["ms"].items() if v in allowed})
    return entry.get("chosen") if entry.get("chosen") in allowed else None


def choose(backend, knob: str, op: str, case) -> str | None:
    """What a launcher of ``backend`` should run for one layer: the measured version when the
    backend is on ``cuda`` and the knob is left at "auto", else ``None`` (a forced version, or
    ``emu``, or a shape not measured: the caller applies its rule)."""
    if case is None or backend.device != "cuda" or getattr(backend, KNOBS[knob].attribute) != "auto":
        return None
    return measured_choice(knob, layer_key(op, case, backend.precision))


# ---- writing it (python -m minunet.bench --tune) -------------------------------------------------
def fastest(ms: dict) -> str | None:
    """The version with the smallest time among those that ran (a time of None: it failed);
    ``None`` when fewer than two ran: one time alone chooses nothing."""
    ran = {v: t for v, t in ms.items() if t is not None}
    return min(ran, key=ran.get) if len(ran) >= 2 else None


def new_table(device: str, gpu: str, source: str, date: str | None = None) -> dict:
    return {"format": FORMAT, "device": device, "gpu": gpu,
            "date": date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "source": source, "choices": {}}


def record(table: dict, knob: str, key: str, ms: dict, errors: dict | None = None) -> dict:
    """Put one layer's times (``{version: ms or None}``) and its fastest version into ``table``."""
    allowed = KNOBS[knob].allowed(key) if knob in KNOBS else tuple(ms)
    entry = {"ms": {v: (None if t is None else round(t, 4)) for v, t in ms.items()},
             "chosen": fastest({v: t for v, t in ms.items() if v in allowed})}
    if errors:
        entry["errors"] = errors
    table.setdefault("choices", {}).setdefault(knob, {})[key] = entry
    return entry


def merge_into(path: str | Path, table: dict) -> dict:
    """``table`` merged into the table already at ``path`` when that one was measured on the same
    device and GPU (so several ``--tune`` runs, one per network size, fill one table); the
    existing table is replaced otherwise. Returns what to write."""
    path = Path(path)
    if not path.exists():
        return table
    try:
        old = load_table(path)
    except ValueError:
        return table
    if (old.get("device"), old.get("gpu")) != (table["device"], table["gpu"]):
        return table
    source = table["source"] if not old.get("choices") else _merge_sources(old.get("source", ""), table["source"])
    merged = dict(old, date=table["date"], source=source)
    merged["choices"] = {k: dict(v) for k, v in old.get("choices", {}).items()}
    for knob, entries in table["choices"].items():
        merged["choices"].setdefault(knob, {}).update(entries)
    return merged


def _merge_sources(old: str, new: str) -> str:
    """The commands behind a merged table, each once."""
    if not old:
        return new
    return old if new in old.split("; ") else f"{old}; {new}"


def save_table(path: str | Path, table: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    _CACHE.pop(str(path), None)


# ---- what a profile of one training step saw (ncu) ----------------------------------------------
def ncu_launches(path: str | Path) -> list[tuple[str, float]]:
    """``(kernel name, microseconds)`` of every launch in an ``ncu --csv`` file with the metric
    ``gpu__time_duration.sum`` (ns), in launch order; lines before the CSV header are skipped."""
    import csv

    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path} holds no ncu CSV table (no line starting with \"ID\")")
    launches = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") == "gpu__time_duration.sum" and row.get("Kernel Name"):
            scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(row["Metric Unit"], 1e-3)
            launches.append((row["Kernel Name"], float(row["Metric Value"].replace(",", "")) * scale))
    return launches


def observed_versions(launches, layers) -> dict:
    """The version each layer ran and its kernel time in one profiled training step.

    ``launches`` from ``ncu_launches``; ``layers`` the network's ``(op, case)`` in forward order
    (``minunet.bench.unet_layers``). The forward runs the layers in order and the backward in
    reverse (the H200 profile shows it), so the k-th ``conv3x3_forward_<version>`` launch is the
    k-th conv3x3 layer and the k-th weight-gradient launch of an op is its k-th layer from the
    end. A tree weight gradient's time includes the ``sum_partials`` launches right after it
    (they add its slices). Returns ``{"conv3x3": {key: {"version", "forward_us",
    "grad_input_us"}}, "reduction": {key: {"version", "grad_weight_us"}}}`` with fp32 keys (the
    knob ``precision`` did not exist before 2026-12-04)."""
    by_op: dict[str, list] = {}
    for op, case in layers:
        by_op.setdefault(op, []).append(case)
    seen: dict[str, list] = {}
    for i, (name, us) in enumerate(launches):
        for op in KNOBS["reduction"].ops:
            for part in ("forward", "grad_input", "grad_weight"):
                prefix = f"{op}_{part}"
                if name == prefix or name.startswith(prefix + "_"):
                    version = name[len(prefix) + 1:] or None
                    if part == "grad_weight":
                        version = version or "tree"
                        for later, later_us in launches[i + 1:]:
                            if later != "sum_partials":
                                break
                            us += later_us
                    seen.setdefault(prefix, []).append((version, us))
    out = {"conv3x3": {}, "reduction": {}}
    for op, cases in by_op.items():
        for part, order in (("forward", cases), ("grad_input", cases[::-1]), ("grad_weight", cases[::-1])):
            found = seen.get(f"{op}_{part}", [])
            if part == "grad_input" and not found:
                continue                    # the network's input layer gets no input gradient
            if part == "grad_input" and len(found) == len(order) - 1:
                order = order[:-1]
            if len(found) != len(order):
                raise ValueError(f"{len(found)} launches of {op}_{part} for {len(order)} {op} layers: "
                                 "not a profile of one training step of this network")
            for case, (version, us) in zip(order, found):
                key = layer_key(op, case, "fp32")
                if part == "grad_weight":
                    out["reduction"][key] = {"version": version, "grad_weight_us": round(us, 3)}
                elif op == "conv3x3" and version is not None:
                    entry = out["conv3x3"].setdefault(key, {"version": version})
                    if entry["version"] != version:
                        entry["version"] = f"{entry['version']}/{version}"
                    entry[f"{part}_us"] = round(us, 3)
    return out
