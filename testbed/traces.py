"""Channel traces: a device's uplink SNR over time, read from a CSV file, and seeded generators.

An experiment gives a device ``link: {trace: FILE, loop: true}`` (``docs/experiments.md``); the
live run's shaper (``live/tracefollow.py``) and the simulator (``sim/lab.py``) then take that
device's SNR from the trace instead of the inventory's fixed ``link.snr_db``.

The file (``load_trace``)::

    # comment lines (the command that made the trace, its parameters) and blank lines anywhere
    t_s,snr_db
    0.0,22.0
    0.1,21.7

- the first line that is neither blank nor a comment is the header ``t_s,snr_db``;
- then one sample a line: the time in seconds (the first 0, strictly increasing) and the SNR
  in dB, within ``SNR_MIN_DB``..``SNR_MAX_DB`` (the range of an experiment's ``snr_db``
  events); finite numbers only; at least 2 samples, at most ``MAX_SAMPLES``.

Any problem raises ``TraceError`` naming the file, the line and the field (``t_s`` or
``snr_db``): one line and exit 2 on the command line, like every bad input.

Meaning (``Trace``): sample and hold. Sample i holds from its time until the next sample's; the
last one holds as long as the one before it did, so a trace lasts ``duration_s = t_last +
(t_last - t_before_last)``: n samples at a fixed step dt last n * dt. With ``loop`` the trace
starts again at ``duration_s``; without, its last sample holds for ever. Times before 0 take
the first sample. ``snr_at(t)``, ``segments(t0, t1)`` (the pieces of constant SNR),
``changes(t0, t1)`` (where the SNR steps), ``mean(t0, t1, f)`` (the time mean of ``f(snr)``)
and ``send_time(bits, t0, rate_of)`` (how long ``bits`` take from ``t0`` when the rate follows
the trace: the fluid upload time) are what the follower, the simulator and the checker use.

Generators (seeded, ``numpy.random.default_rng``), each returning times and SNRs:

- ``walk``: a user walking away from the access point at a constant speed. Log-distance path
  loss: ``snr(d) = ref_snr_db - 10 * exponent * log10(d / ref_m) + X``, with log-normal
  shadowing X (dB, zero mean, ``shadow_sd_db``) correlated over distance as
  ``exp(-|dd| / shadow_corr_m)`` (Gudmundson's model: an AR(1) process in the samples).
- ``rayleigh``: Rayleigh block fading around a mean SNR. The channel gain ``|h|^2`` with ``h``
  complex Gaussian CN(0, 1) (so ``|h|^2`` is exponential with mean 1) is drawn once per block
  and held for the block; the block length is the coherence time ``T_c = 0.423 / f_D``
  (Clarke's model, the time over which the correlation stays above 0.5), with the Doppler
  ``f_D = speed * carrier / c`` or given directly. ``snr = mean_snr_db + 10 * log10(|h|^2)``:
  the mean of the linear SNR is ``mean_snr_db``; the mean in dB is 2.5 dB lower.

Values outside ``SNR_MIN_DB``..``SNR_MAX_DB`` are clipped, and the file's header says how many.
``write_trace`` writes a trace (atomically) with comment lines first.

Command line (the shipped ``experiments/traces/*.csv`` were made with it; each file's first
comment line is the exact command)::

    python -m testbed.traces walk --seed 1 --out walk.csv [--start-m 5 --end-m 50 ...]
    python -m testbed.traces rayleigh --seed 2 --out fading.csv [--doppler-hz 0.5 ...]

Limits: a trace is one SNR per device; it says nothing of delay, loss or jitter (the emulated
lab has no netem). Sample and hold only, no interpolation between samples. The generators are
textbook models with stated parameters, not measurements of a real radio.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.errors import TraceError

HEADER = "t_s,snr_db"
SNR_MIN_DB = -30.0            # the range of an experiment's snr_db events (inputs/experiment.py)
SNR_MAX_DB = 60.0
MAX_SAMPLES = 1_000_000       # 28 hours at 10 samples a second
MAX_BYTES = 64 * 1024 * 1024
MAX_TIME_S = 1e7
SPEED_OF_LIGHT = 299_792_458.0
COHERENCE = 0.423             # T_c = COHERENCE / f_D (correlation 0.5 in Clarke's model)


# -- the trace ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """A channel trace: sample-and-hold SNR over time (see the module docstring)."""

    path: Path
    times: np.ndarray = field(repr=False)     # seconds, times[0] == 0, strictly increasing
    snr_db: np.ndarray = field(repr=False)
    loop: bool = True
    digest: str = ""                          # sha256 of the file's bytes

    def __post_init__(self) -> None:
        if len(self.times) < 2 or len(self.times) != len(self.snr_db) or self.times[0] != 0:
            raise ValueError("a trace needs at least two samples, the first at t = 0")

    @property
    def duration_s(self) -> float:
        """How long one pass lasts: the last sample holds as long as the one before it."""
        return float(2 * self.times[-1] - self.times[-2])

    @property
    def samples(self) -> int:
        return len(self.times)

    def with_loop(self, loop: bool) -> Trace:
        return Trace(self.path, self.times, self.snr_db, loop, self.digest)

    def pieces(self, t0: float) -> Iterator[tuple[float, float, float]]:
        """(start, end, snr_db) pieces of constant SNR from ``t0`` on, in order; the first
        starts at ``t0``; without ``loop`` the last one ends at infinity. Infinite with
        ``loop``: the caller stops."""
        times, snr, n = self.times, self.snr_db, len(self.times)
        t = float(t0)
        if t < 0:
            yield t, 0.0, float(snr[0])
            t = 0.0
        if not self.loop:
            i = int(np.searchsorted(times, t, side="right")) - 1
            while i < n - 1:
                yield t, float(times[i + 1]), float(snr[i])
                t, i = float(times[i + 1]), i + 1
            yield t, math.inf, float(snr[-1])
            return
        period = self.duration_s
        base = math.floor(t / period) * period
        u = t - base
        if u >= period:                       # rounding
            base, u = base + period, u - period
        i = min(int(np.searchsorted(times, u, side="right")) - 1, n - 1)
        while True:
            end = base + (float(times[i + 1]) if i + 1 < n else period)
            if end > t:
                yield t, end, float(snr[i])
                t = end
            i += 1
            if i == n:
                i, base = 0, base + period

    def snr_at(self, t: float) -> float:
        """The SNR in force at ``t`` seconds after the trace started."""
        return next(self.pieces(t))[2]

    def segments(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        """The pieces of constant SNR covering [t0, t1] (clipped to it), in order."""
        out = []
        if t1 <= t0:
            return out
        for a, b, s in self.pieces(t0):
            if a >= t1:
                break
            out.append((a, min(b, t1), s))
            if b >= t1:
                break
        return out

    def changes(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """(t, snr_db) where the SNR steps to another value within (t0, t1]."""
        out: list[tuple[float, float]] = []
        last = None
        for a, b, s in self.pieces(t0):
            if a > t1:
                break
            if last is not None and s != last and a > t0:
                out.append((a, s))
            last = s
            if b > t1:
                break
        return out

    def mean(self, t0: float, t1: float, f: Callable[[float], float]) -> float:
        """The time mean of ``f(snr)`` over [t0, t1] (``f(snr_at(t0))`` when t1 <= t0)."""
        if t1 <= t0:
            return f(self.snr_at(t0))
        return sum(f(s) * (b - a) for a, b, s in self.segments(t0, t1)) / (t1 - t0)

    def send_time(self, bits: float, t0: float, rate_of: Callable[[float], float]) -> float:
        """Seconds that ``bits`` take from ``t0`` when the rate is ``rate_of(snr)`` of the
        trace's SNR at each instant (``rate_of`` must be positive)."""
        left = float(bits)
        if left <= 0:
            return 0.0
        for a, b, s in self.pieces(t0):
            rate = rate_of(s)
            if rate <= 0:
                raise ValueError("rate_of must be positive")
            if rate * (b - a) >= left:
                return a + left / rate - t0
            left -= rate * (b - a)
        raise AssertionError("unreachable: the pieces never end")   # pragma: no cover


# -- reading --------------------------------------------------------------------------------

def _number(text: str, path: Path, line: int, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:39] + "…"
        raise TraceError(f'expected a number, got "{shown}"', source=str(path), line=line,
                         field=name) from None
    if not math.isfinite(value):
        raise TraceError(f'expected a finite number, got "{text}"', source=str(path),
                         line=line, field=name)
    return value


def load_trace(path: str | Path, *, loop: bool = True) -> Trace:
    """Read and check a trace file; ``TraceError`` (file:line: field: what) when it is bad."""
    path = Path(path)
    src = str(path)
    try:
        if path.is_dir():
            raise TraceError("is a folder, not a trace file", source=src)
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise TraceError("file not found", source=src) from None
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror or exc}", source=src) from None
    if len(raw) > MAX_BYTES:
        raise TraceError(f"larger than {MAX_BYTES // (1024 * 1024)} MB: not a trace", source=src)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise TraceError("not UTF-8 text", source=src, line=line) from None
    times: list[float] = []
    snrs: list[float] = []
    lines: list[int] = []
    header_line = None
    for no, line in enumerate(text.splitlines(), start=1):
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        if header_line is None:
            if body.replace(" ", "") != HEADER:
                shown = body if len(body) <= 40 else body[:39] + "…"
                raise TraceError(f'expected the header line "{HEADER}", got "{shown}"',
                                 source=src, line=no)
            header_line = no
            continue
        parts = [p.strip() for p in body.split(",")]
        if len(parts) != 2:
            raise TraceError(f"expected 2 fields (t_s,snr_db), got {len(parts)}", source=src,
                             line=no)
        t = _number(parts[0], path, no, "t_s")
        s = _number(parts[1], path, no, "snr_db")
        if not times and t != 0:
            raise TraceError(f"the first sample must be at 0 s, got {t:g}", source=src, line=no,
                             field="t_s")
        if times and t <= times[-1]:
            raise TraceError(f"times must increase: {t:g} comes after {times[-1]:g} "
                             f"(line {lines[-1]})", source=src, line=no, field="t_s")
        if t > MAX_TIME_S:
            raise TraceError(f"must be at most {MAX_TIME_S:g}, got {t:g}", source=src, line=no,
                             field="t_s")
        if not SNR_MIN_DB <= s <= SNR_MAX_DB:
            raise TraceError(f"must be within {SNR_MIN_DB:g}..{SNR_MAX_DB:g} dB, got {s:g}",
                             source=src, line=no, field="snr_db")
        if len(times) >= MAX_SAMPLES:
            raise TraceError(f"more than {MAX_SAMPLES} samples", source=src, line=no)
        times.append(t)
        snrs.append(s)
        lines.append(no)
    if header_line is None:
        raise TraceError(f'empty: expected the header line "{HEADER}" and samples', source=src,
                         line=1)
    if len(times) < 2:
        raise TraceError(f"{len(times)} sample(s): a trace needs at least 2 (the last one holds "
                         "as long as the one before it)", source=src, line=header_line)
    return Trace(path, np.array(times), np.array(snrs), loop, hashlib.sha256(raw).hexdigest())


# -- writing and generating -----------------------------------------------------------------

def write_trace(path: str | Path, times, snr_db, comments: list[str] = ()) -> Path:
    """Write a trace file (atomically): ``# comment`` lines, the header, one sample a line."""
    from testbed.files import atomic_write_text
    body = [f"# {c}" for c in comments] + [HEADER]
    body += [f"{t:.3f},{s:.3f}" for t, s in zip(times, snr_db)]
    return atomic_write_text(Path(path), "\n".join(body) + "\n")


def _clip(snr: np.ndarray) -> tuple[np.ndarray, int]:
    clipped = int(np.count_nonzero((snr < SNR_MIN_DB) | (snr > SNR_MAX_DB)))
    return np.clip(snr, SNR_MIN_DB, SNR_MAX_DB), clipped


def walk(seed: int, *, start_m: float = 5.0, end_m: float = 50.0, speed_mps: float = 0.5,
         exponent: float = 3.0, ref_snr_db: float = 22.0, ref_m: float = 5.0,
         shadow_sd_db: float = 2.0, shadow_corr_m: float = 5.0,
         rate_hz: float = 10.0) -> tuple[np.ndarray, np.ndarray, int]:
    """A user walking away from the access point (module docstring): (times, snr_db, number
    of samples clipped to the allowed range). Lasts ``(end_m - start_m) / speed_mps``."""
    if not 0 < start_m < end_m:
        raise ValueError("need 0 < start_m < end_m")
    if speed_mps <= 0 or rate_hz <= 0 or ref_m <= 0 or shadow_corr_m <= 0 or shadow_sd_db < 0:
        raise ValueError("speed, rate, reference distance, correlation distance must be > 0, "
                         "shadowing sd >= 0")
    duration = (end_m - start_m) / speed_mps
    n = max(2, round(duration * rate_hz))
    t = np.arange(n) / rate_hz
    d = start_m + speed_mps * t
    mean = ref_snr_db - 10.0 * exponent * np.log10(d / ref_m)
    rng = np.random.default_rng(seed)
    rho = math.exp(-speed_mps / rate_hz / shadow_corr_m)
    eps = rng.normal(0.0, 1.0, n)
    x = np.empty(n)
    x[0] = shadow_sd_db * eps[0]
    innov = shadow_sd_db * math.sqrt(1.0 - rho * rho)
    for k in range(1, n):
        x[k] = rho * x[k - 1] + innov * eps[k]
    snr, clipped = _clip(mean + x)
    return t, snr, clipped


def doppler_hz(carrier_hz: float, speed_mps: float) -> float:
    """f_D = v * f_c / c."""
    return speed_mps * carrier_hz / SPEED_OF_LIGHT


def rayleigh(seed: int, *, mean_snr_db: float = 14.0, doppler: float = 0.5,
             duration_s: float = 120.0, rate_hz: float = 10.0
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """Rayleigh block fading (module docstring): (times, snr_db, samples clipped). Blocks of
    the coherence time ``COHERENCE / doppler`` seconds, one gain each."""
    if doppler <= 0 or duration_s <= 0 or rate_hz <= 0:
        raise ValueError("doppler, duration and rate must be > 0")
    n = max(2, round(duration_s * rate_hz))
    t = np.arange(n) / rate_hz
    tc = COHERENCE / doppler
    block = np.floor(t / tc + 1e-9).astype(int)
    nb = int(block[-1]) + 1
    rng = np.random.default_rng(seed)
    h = (rng.normal(0.0, 1.0, nb) + 1j * rng.normal(0.0, 1.0, nb)) / math.sqrt(2.0)
    power = np.abs(h) ** 2
    snr, clipped = _clip(mean_snr_db + 10.0 * np.log10(power[block]))
    return t, snr, clipped


# -- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testbed.traces", description=(
        "Write a seeded channel trace (t_s,snr_db CSV) for an experiment's link.trace."))
    sub = p.add_subparsers(dest="kind", required=True, metavar="walk|rayleigh")
    w = sub.add_parser("walk", help="a user walking away from the access point: log-distance "
                       "path loss with correlated log-normal shadowing")
    r = sub.add_parser("rayleigh", help="Rayleigh block fading, blocks of the coherence time")
    for s in (w, r):
        s.add_argument("--seed", type=int, required=True, help="the generator's seed")
        s.add_argument("--out", required=True, help="the CSV file to write")
        s.add_argument("--rate-hz", type=float, default=10.0, help="samples a second (10)")
    w.add_argument("--start-m", type=float, default=5.0, help="distance at t = 0 (5 m)")
    w.add_argument("--end-m", type=float, default=50.0, help="distance at the end (50 m)")
    w.add_argument("--speed-mps", type=float, default=0.5, help="walking speed (0.5 m/s)")
    w.add_argument("--exponent", type=float, default=3.0,
                   help="path-loss exponent (3.0: indoor, obstructed)")
    w.add_argument("--ref-snr-db", type=float, default=22.0,
                   help="mean SNR at the reference distance (22 dB)")
    w.add_argument("--ref-m", type=float, default=5.0, help="reference distance (5 m)")
    w.add_argument("--shadow-sd-db", type=float, default=2.0,
                   help="log-normal shadowing standard deviation (2 dB; 0: none)")
    w.add_argument("--shadow-corr-m", type=float, default=5.0,
                   help="shadowing decorrelation distance (5 m)")
    r.add_argument("--mean-snr-db", type=float, default=14.0,
                   help="mean SNR, linear mean of the faded SNR (14 dB)")
    r.add_argument("--doppler-hz", type=float, default=None,
                   help="maximum Doppler f_D (default 0.5 Hz, or from --carrier-hz and "
                   "--speed-mps)")
    r.add_argument("--carrier-hz", type=float, default=None, help="carrier frequency")
    r.add_argument("--speed-mps", type=float, default=None, help="speed of the user")
    r.add_argument("--duration-s", type=float, default=120.0, help="length (120 s)")
    return p


def _fmt(v: float) -> str:
    return f"{v:g}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "walk":
            t, snr, clipped = walk(args.seed, start_m=args.start_m, end_m=args.end_m,
                                   speed_mps=args.speed_mps, exponent=args.exponent,
                                   ref_snr_db=args.ref_snr_db, ref_m=args.ref_m,
                                   shadow_sd_db=args.shadow_sd_db,
                                   shadow_corr_m=args.shadow_corr_m, rate_hz=args.rate_hz)
            params = ["--start-m", _fmt(args.start_m), "--end-m", _fmt(args.end_m),
                      "--speed-mps", _fmt(args.speed_mps), "--exponent", _fmt(args.exponent),
                      "--ref-snr-db", _fmt(args.ref_snr_db), "--ref-m", _fmt(args.ref_m),
                      "--shadow-sd-db", _fmt(args.shadow_sd_db),
                      "--shadow-corr-m", _fmt(args.shadow_corr_m)]
            model = [(f"model: log-distance path loss, snr = {_fmt(args.ref_snr_db)} dB - "
                      f"10 * {_fmt(args.exponent)} * log10(d / {_fmt(args.ref_m)} m) + X; "
                      f"d from {_fmt(args.start_m)} m to {_fmt(args.end_m)} m at "
                      f"{_fmt(args.speed_mps)} m/s"),
                     (f"X: log-normal shadowing, sd {_fmt(args.shadow_sd_db)} dB, correlation "
                      f"exp(-dd / {_fmt(args.shadow_corr_m)} m)")]
        else:
            if args.doppler_hz is not None:
                fd = args.doppler_hz
                params = ["--doppler-hz", _fmt(fd)]
            elif args.carrier_hz is not None and args.speed_mps is not None:
                fd = doppler_hz(args.carrier_hz, args.speed_mps)
                params = ["--carrier-hz", _fmt(args.carrier_hz), "--speed-mps",
                          _fmt(args.speed_mps)]
            elif args.carrier_hz is None and args.speed_mps is None:
                fd = 0.5
                params = ["--doppler-hz", _fmt(fd)]
            else:
                raise ValueError("give --doppler-hz, or both --carrier-hz and --speed-mps")
            t, snr, clipped = rayleigh(args.seed, mean_snr_db=args.mean_snr_db, doppler=fd,
                                       duration_s=args.duration_s, rate_hz=args.rate_hz)
            params = ["--mean-snr-db", _fmt(args.mean_snr_db), *params,
                      "--duration-s", _fmt(args.duration_s)]
            model = [(f"model: Rayleigh block fading, snr = {_fmt(args.mean_snr_db)} dB + "
                      "10 * log10(|h|^2), h ~ CN(0, 1) drawn once per block"),
                     (f"Doppler f_D = {fd:.4g} Hz, block = coherence time {COHERENCE} / f_D = "
                      f"{COHERENCE / fd:.4g} s")]
    except ValueError as exc:
        print(f"error: python -m testbed.traces {args.kind}: {exc}", file=sys.stderr)
        return 2
    command = ["python", "-m", "testbed.traces", args.kind, "--seed", str(args.seed), *params,
               "--rate-hz", _fmt(args.rate_hz), "--out", args.out]
    comments = [f"made by: {shlex.join(command)}", *model,
                (f"{len(t)} samples at {_fmt(args.rate_hz)} per second, "
                 f"{t[-1] + 1 / args.rate_hz:g} s; {clipped} clipped to "
                 f"{SNR_MIN_DB:g}..{SNR_MAX_DB:g} dB")]
    try:
        write_trace(args.out, t, snr, comments)
    except OSError as exc:
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(t)} samples, snr {snr.min():.1f}..{snr.max():.1f} dB "
          f"(mean {snr.mean():.1f} dB), {clipped} clipped")
    return 0


if __name__ == "__main__":    # pragma: no cover
    sys.exit(main())

