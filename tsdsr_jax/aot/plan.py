"""What the GPU compiler plans for a program: its memory, kernel launches, FLOPs and the bytes
its collectives move, read from a deviceless compile for a :class:`~tsdsr_jax.aot.cards.Card`.

    devices = gpu_devices("h200", 1)
    plan = compile_plan(jax.jit(fn), abstract_args)   # ShapeDtypeStructs, nothing allocated
    print(plan.peak_bytes / 2**30, plan.kernels, plan.flops, plan.roofline_s())

The roofline bound sums, over every kernel launch, max(FLOPs / peak, bytes / bandwidth), where
a kernel's bytes are its operands and results as the HLO states them: a floor that no real
kernel reaches (caches and fusions' partial reads aside).

It needs jax's CUDA plugin and cuDNN installed (not a GPU): ``make .venv-gpu/.aot``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence

from tsdsr_jax.aot.cards import CARDS

# The H200's measured ceilings (bf16 dense GEMM, HBM copy), the roofline's defaults.
H200_PEAK_FLOPS, H200_BANDWIDTH = 790e12, 4.2e12


class NoGPUCompiler(RuntimeError):
    """jax's CUDA plugin is not installed, so nothing can be compiled for a GPU here."""


def gpu_devices(card: str, num_gpus: int = 1, hosts: int = 1) -> list:
    """Devices of ``hosts`` x ``num_gpus`` ``card`` GPUs that the compiler can target."""
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{num_gpus}",
            target_config=CARDS[card].target_config())
    except Exception as e:  # the plugin raises plain errors when absent or unusable
        raise NoGPUCompiler(f"cannot compile for a GPU with this jax ({type(e).__name__}: {e}); "
                            "use .venv-gpu/bin/python (`make .venv-gpu/.aot` builds it)") from None
    return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A compiled program's buffers (bytes per device) and what its HLO launches."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int          # outputs that reuse donated arguments
    temp_bytes: int
    kernels: int              # kernel launches per call (loop bodies times their trip count)
    flops: float              # GEMMs, convolutions and fused attention
    collective_bytes: int     # results of all-gathers, reduce-scatters, all-reduces, all-to-alls
    bytes_moved: float        # every launch's operands and results
    compile_s: float
    hlo: str = dataclasses.field(repr=False)
    costs: tuple[tuple[float, float], ...] = dataclasses.field(repr=False, default=())
    # XLA's own cost analysis: its FLOPs, bytes accessed and (TPU) time estimate, if given
    xla_cost: dict[str, float] = dataclasses.field(repr=False, default_factory=dict)

    def roofline_s(self, peak_flops: float = H200_PEAK_FLOPS,
                   bandwidth: float = H200_BANDWIDTH) -> float:
        """The roofline lower bound of one call, seconds (``costs``: per launch, FLOPs and
        bytes)."""
        return sum(max(f / peak_flops, b / bandwidth) for f, b in self.costs)

    @property
    def peak_bytes(self) -> int:
        """What the device holds at once: arguments, new outputs and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


# XLA's TPU compiler refuses a program whose temporaries exceed the chip's memory
_REFUSED = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM")


def compile_plan(jitted: Callable, args: Sequence, kwargs: dict | None = None) -> Plan:
    """Lowers and compiles ``jitted`` for the devices its shardings name; any trace or compile
    error propagates, but the TPU compiler's refusal of a program that does not fit, which
    gives a plan of the temporaries it asked for (nothing else known)."""
    tic = time.perf_counter()
    try:
        compiled = jitted.lower(*args, **(kwargs or {})).compile()
    except Exception as e:  # noqa: BLE001 -- jax's runtime error; only the refusal is caught
        refused = _REFUSED.search(str(e))
        if refused is None:
            raise
        value, unit = refused.groups()
        temp = int(float(value) * 1024 ** " KMGT".index(unit or " "))
        return Plan(0, 0, 0, temp, 0, 0.0, 0, 0.0, time.perf_counter() - tic, "")
    compile_s = time.perf_counter() - tic
    m = compiled.memory_analysis()
    text = compiled.as_text()
    counts = hlo_counts(text)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    xla_cost = {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
                if k in cost}
    return Plan(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                m.temp_size_in_bytes, counts.kernels, counts.flops, counts.collective_bytes,
                sum(b for _, b in counts.costs), compile_s, text, tuple(counts.costs), xla_cost)


# --------------------------------------------------------------------------- HLO text

_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
# Instructions that launch nothing: bookkeeping, and the second half of async pairs.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "copy-done", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "async-done", "send-done", "recv-done", "opt-barrier"}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
def _arrays(text: str) -> list[tuple[str, list[int]]]:
    return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(text)]


def _bytes(dtype: str, dims: list[int]) -> int:
    bits = re.match(r"[a-z]+(\d+)", dtype)  # s32, bf16, f8e4m3fn; pred is a byte
    size = max(int(bits.group(1)) // 8, 1) if bits else 1
    return size * math.prod(dims)


def _tuple_elements(result: str) -> list[str]:
    """The top-level elements of a result's shape text (itself if it is not a tuple), with the
    layouts (``{1,0:T(8,128)}``) and comments (``/*index=5*/``) left out."""
    text = re.sub(r"\{[^{}]*\}|/\*.*?\*/", "", result).strip()
    if not text.startswith("("):
        return [text]
    elements, depth, start = [], 0, 1
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if (char == "," and depth == 1) or (char == ")" and depth == 0):
            elements.append(text[start:i].strip())
            start = i + 1
    return elements


def _collective_bytes(result: str, op: str) -> int:
    """The bytes a collective delivers: all of its results (a combined collective has several).
    The tuple of an async all-gather or collective-permute start is (inputs, outputs, and a
    permute's contexts); only the outputs count."""
    if op in ("all-gather-start", "collective-permute-start"):
        result = _tuple_elements(result)[1]
    return sum(_bytes(dtype, dims) for dtype, dims in _arrays(result))


def _computations(text: str) -> tuple[dict[str, list[tuple]], str]:
    """Each computation's instructions as (name, result text, opcode, rest), and the entry's
    name. An instruction's text may run over several lines (a Pallas kernel's config on TPU);
    only its first line is kept."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        if line.startswith(("%", "ENTRY ")) and line.rstrip().endswith("{"):
            header = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = computations.setdefault(header.lstrip("%"), [])
            if line.startswith("ENTRY"):
                entry = header.lstrip("%")
        elif line.rstrip() == "}":
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append(m.groups())
    return computations, entry


def _window_taps(size: int, out: int, window: int, stride: int, pad: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
    """How many of a window's taps, summed over the outputs along one dimension, meet a real
    input, not padding nor the zeros of a dilated input."""
    last = (size - 1) * lhs_dilate
    return sum(1 for o in range(out) for j in range(window)
               if 0 <= (p := o * stride + j * rhs_dilate - pad) <= last and p % lhs_dilate == 0)


def _convolution_flops(rest: str, out: list[int], lhs: list[int], kernel: list[int]) -> float:
    """Multiply-adds of XLA's convolution, counting only the taps that meet real inputs: a TPU
    writes a batched matmul as a convolution whose batch dimensions are padded or dilated
    window dimensions, mostly zeros."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if not (labels and lhs and kernel and out):
        return 0.0
    lhs_labels, kernel_labels, out_labels = labels.groups()
    spatial = [c for c in kernel_labels if c.isdigit()]
    attributes = re.search(r"window=\{([^}]*)\}", rest)
    window = dict(re.findall(r"(\w+)=([\d_x-]+)", attributes.group(1) if attributes else ""))

    def along(key: str, default: str) -> list[str]:
        return window.get(key, "x".join([default] * len(spatial))).split("x")

    taps = math.prod(
        _window_taps(lhs[lhs_labels.index(d)], out[out_labels.index(d)], int(size), int(stride),
                     int(pad.split("_")[0]), int(lhs_d), int(rhs_d))
        for d, size, stride, pad, lhs_d, rhs_d in zip(
            spatial, along("size", "1"), along("stride", "1"), along("pad", "0_0"),
            along("lhs_dilate", "1"), along("rhs_dilate", "1")))
    return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] \
        * kernel[kernel_labels.index("i")] * taps


def _flops(op: str, result: str, rest: str, shapes: dict[str, list[int]],
           computations: dict[str, list[tuple]]) -> float:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    dims = lambda i: shapes.get(operands[i], []) if i < len(operands) else []  # noqa: E731
    out = _arrays(result)[0][1] if _arrays(result) else []
    if op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = math.prod(dims(0)[int(i)] for i in contracting.group(1).split(",") if i) \
            if contracting and dims(0) else 1
        return 2.0 * math.prod(out) * k
    if op == "convolution":  # XLA's own (TPU): a GEMM too
        return _convolution_flops(rest, out, dims(0), dims(1))
    if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        return sum(_flops(op, result, rest, shapes, computations)
                   for _, result, op, rest in computations.get(called.group(1), [])
                   ) if called else 0.0
    if op != "custom-call":
        return 0.0
    target = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
    if "$conv" in target:  # the forward convolution's output and filter, whichever is computed
        labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
        forward_out, kernel = {"__cudnn$convBackwardInput": (dims(0), dims(1)),
                               "__cudnn$convBackwardFilter": (dims(1), out)}.get(
                                   target, (out, dims(1)))
        return 2.0 * math.prod(forward_out) * math.prod(kernel) / kernel[labels.index("o")]
    if "fmha" in target:  # (B, T, N, H) query and key: two GEMMs forward, five backward
        constraints = _arrays(rest.split("operand_layout_constraints=", 1)[-1])
        (b, t, n, h), s = constraints[0][1], constraints[1][1][1]
        return 4.0 * b * n * t * s * h * (2.5 if "Backward" in target else 1.0)
    if "gemm" in target or "matmul" in target:
        contracting = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)\]', rest)
        k = math.prod(dims(0)[int(i)] for i in contracting.group(1).replace('"', "").split(",")
                      if i) if contracting and dims(0) else 1
        return 2.0 * math.prod(out) * k
    return 0.0


@dataclasses.dataclass
class Counts:
    """What a compiled GPU program launches per call."""

    kernels: int = 0
    flops: float = 0.0
    collective_bytes: int = 0
    costs: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # per launch


def _result_bytes(result: str) -> int:
    return sum(_bytes(dtype, dims) for dtype, dims in _arrays(result))


_SLICES = ("slice", "dynamic-slice")


def _operand_reads(body: list[tuple], operands: list[str], sizes: dict[str, int]) -> int:
    """What a fusion reads of its operands: all of each, but only the slices it takes of an
    operand that it uses through slices alone (bitcasts looked through)."""
    users: dict[str, list[tuple[str, str, str]]] = {}
    params = {}
    for name, result, op, rest in body:
        if op == "parameter":
            params[re.match(r"(\d+)\)", rest).group(1)] = name
        for used in re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]):
            users.setdefault(used, []).append((name, result, op))

    def uses(name: str) -> list[tuple[str, str]]:
        return [u for n, result, op in users.get(name, [])
                for u in (uses(n) if op == "bitcast" else [(result, op)])]

    total = 0
    for i, operand in enumerate(operands):
        reads = uses(params[str(i)]) if str(i) in params else []
        full = sizes.get(operand, 0)
        if reads and all(op in _SLICES for _, op in reads):
            total += min(full, sum(_result_bytes(result) for result, _ in reads))
        else:
            total += full
    return total


def _moved_bytes(op: str, result: str, rest: str, sizes: dict[str, int],
                 computations: dict[str, list[tuple]]) -> int:
    """A launch's operands and results; a fusion that only slices reads what it keeps, and any
    fusion only the slices it takes of an operand that it uses through slices alone."""
    out = _result_bytes(result)
    called = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
    body = computations.get(called.group(1), []) if called else []
    if op in _SLICES or (body and body[-1][2] in _SLICES):
        return 2 * out
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    if body:
        return out + _operand_reads(body, operands, sizes)
    return out + sum(sizes.get(o, 0) for o in operands)


def _delivered(result: str, op: str, rest: str, computations: dict[str, list[tuple]]) -> int:
    """The bytes the collectives of one launch deliver: a collective's own, or those of the
    collectives inside the computations it calls (GPU's async wrappers; TPU's collective
    fusions)."""
    if op.removesuffix("-start") in _COLLECTIVES:
        return _collective_bytes(result, op)
    return sum(_delivered(inner_result, inner_op, inner_rest, computations)
               for called in re.findall(r"calls=%?([\w.\-]+)", rest)
               for _, inner_result, inner_op, inner_rest in computations.get(called, []))


def _scalar(name: str, instructions: list[tuple]) -> int | None:
    """The integer value of ``name`` in one computation: a constant, through copies."""
    for own, _, op, rest in instructions:
        if own == name:
            if op == "constant":
                value = re.match(r"(-?\d+)\)", rest)
                return int(value.group(1)) if value else None
            if op in ("copy", "bitcast"):
                return _scalar(re.match(r"%?([\w.\-]+)", rest).group(1), instructions)
            return None
    return None


def _trip_count(rest: str, caller: list[tuple], computations: dict[str, list[tuple]]) -> int:
    """A while loop's trip count: XLA's ``known_trip_count`` (GPU and CPU programs give it);
    else, as a TPU program leaves it, from a condition ``counter < N`` on a constant N and the
    counter's constant start in the loop's initial tuple; else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known:
        return int(known.group(1))
    condition = computations.get(re.search(r"condition=%?([\w.\-]+)", rest).group(1), [])
    initial = re.match(r"%?([\w.\-]+)\)", rest)
    tuple_ = next((r for own, _, o, r in caller if initial and own == initial.group(1)
                   and o == "tuple"), None)
    for _, _, op, args in condition:
        if op != "compare" or "direction=LT" not in args:
            continue
        counter, bound = re.findall(r"%([\w.\-]+)", args.split(")")[0])[:2]
        index = next((re.search(r"index=(\d+)", r) for own, _, o, r in condition
                      if own == counter and o == "get-tuple-element"), None)
        last = _scalar(bound, condition)
        if index is None or tuple_ is None or last is None:
            return 1
        start = re.findall(r"%([\w.\-]+)", tuple_.split(")")[0])[int(index.group(1))]
        first = _scalar(start, caller)
        return 1 if first is None else max(last - first, 0)
    return 1


def hlo_counts(text: str) -> Counts:
    """Kernel launches, FLOPs, collective result bytes and each launch's (FLOPs, bytes) of a
    compiled program (launches and bytes as a GPU runs them; FLOPs and collectives on TPU
    too); loop bodies count their trip count times."""
    computations, entry = _computations(text)
    shapes = {name: (_arrays(result)[0][1] if _arrays(result) else [])
              for instructions in computations.values() for name, result, _, _ in instructions}
    sizes = {name: _result_bytes(result)
             for instructions in computations.values() for name, result, _, _ in instructions}
    counts = Counts()

    def visit(name: str, times: int) -> None:
        for _, result, op, rest in computations.get(name, []):
            if op == "while":
                visit(re.search(r"body=%?([\w.\-]+)", rest).group(1),
                      times * _trip_count(rest, computations[name], computations))
            elif op in ("call", "conditional"):
                for called in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                                         rest):
                    visit(called, times)
            elif op not in _FREE:
                flops = _flops(op, result, rest, shapes, computations)
                moved = _moved_bytes(op, result, rest, sizes, computations)
                counts.kernels += times
                counts.flops += times * flops
                counts.costs.extend([(flops, moved)] * times)
                counts.collective_bytes += times * _delivered(result, op, rest, computations)

    visit(entry, 1)
    return counts
