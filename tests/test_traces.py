"""Channel traces (testbed/traces.py): the CSV reader (good files and every kind of bad one:
one line naming file, line and field, exit 2), sample-and-hold lookup, looping, the upload-time
integral, the seeded generators (deterministic; Rayleigh power exponential with the stated
mean; the walk's SNR falling with log-distance), the shipped traces (remade exactly by the
command in their first line) and the experiment's ``devices.NAME.link`` field."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed import traces
from testbed.errors import ExperimentError, TraceError
from testbed.inputs.experiment import load_experiment
from testbed.traces import load_trace

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = ROOT / "inventory/local.yaml"
SHIPPED = sorted((ROOT / "experiments/traces").glob("*.csv"))


def _csv(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """# made by hand
# a second comment

 t_s , snr_db
0,10
0.5,  0

1.0,20
# a comment between samples
1.5,-5
"""


def test_a_good_file_reads_with_comments_blanks_and_spaces(tmp_path):
    tr = load_trace(_csv(tmp_path, GOOD))
    assert list(tr.times) == [0, 0.5, 1.0, 1.5] and list(tr.snr_db) == [10, 0, 20, -5]
    assert tr.duration_s == 2.0 and tr.loop and len(tr.digest) == 64
    # sample and hold; the last sample holds as long as the one before it
    assert [tr.snr_at(t) for t in (-1, 0, 0.49, 0.5, 1.2, 1.5, 1.99)] == [10, 10, 10, 0, 20,
                                                                         -5, -5]
    # looping: 2.0 s later it starts again; once: the last sample holds
    assert tr.snr_at(2.0) == 10 and tr.snr_at(4.7) == 0 and tr.snr_at(1e5 + 1.6) == -5
    once = tr.with_loop(False)
    assert once.snr_at(2.0) == -5 and once.snr_at(1e6) == -5
    assert tr.segments(0.25, 1.25) == [(0.25, 0.5, 10), (0.5, 1.0, 0), (1.0, 1.25, 20)]
    assert tr.changes(0.25, 2.4) == [(0.5, 0), (1.0, 20), (1.5, -5), (2.0, 10)]
    assert tr.changes(0.5, 2.5)[-1] == (2.5, 0)                  # (t0, t1]: the end counts
    assert once.changes(0.25, 5.0) == [(0.5, 0), (1.0, 20), (1.5, -5)]
    assert tr.mean(0.0, 1.0, lambda s: s) == pytest.approx(5.0)


def test_send_time_integrates_the_rate_over_the_upload(tmp_path):
    tr = load_trace(_csv(tmp_path, "t_s,snr_db\n0,10\n1,0\n"))        # 10 dB 1 s, 0 dB 1 s
    rate = {10.0: 1000.0, 0.0: 100.0}.get
    assert tr.send_time(500, 0.0, rate) == pytest.approx(0.5)          # within the first piece
    # 0.8 -> 1.0 at 1000 (200 bits), 1.0 -> 2.0 at 100 (100 bits), then it loops to 10 dB
    assert tr.send_time(500, 0.8, rate) == pytest.approx(1.2 + 200 / 1000)
    assert tr.send_time(1300, 0.8, rate) == pytest.approx(1.2 + 1000 / 1000)
    once = tr.with_loop(False)                                         # 0 dB holds after 2 s
    assert once.send_time(500, 0.8, rate) == pytest.approx(0.2 + 300 / 100)
    assert once.send_time(1300, 0.8, rate) == pytest.approx(0.2 + 1100 / 100)
    assert tr.send_time(0, 0.3, rate) == 0.0


BAD = [
    ("empty", "", ":1: empty"),
    ("comments only", "# nothing\n\n", ":1: empty"),
    ("no header", "0,10\n1,5\n", ':1: expected the header line "t_s,snr_db", got "0,10"'),
    ("header only", "t_s,snr_db\n", ":1: 0 sample(s): a trace needs at least 2"),
    ("one sample", "# c\nt_s,snr_db\n0,3\n", ":2: 1 sample(s)"),
    ("three fields", "t_s,snr_db\n0,1\n1,2,3\n", ":3: expected 2 fields (t_s,snr_db), got 3"),
    ("one field", "t_s,snr_db\n0,1\n1\n", ":3: expected 2 fields"),
    ("text time", "t_s,snr_db\n0,1\nsoon,2\n", ':3: t_s: expected a number, got "soon"'),
    ("text snr", "t_s,snr_db\n0,1\n1,high\n", ':3: snr_db: expected a number, got "high"'),
    ("nan snr", "t_s,snr_db\n0,1\n1,nan\n", ':3: snr_db: expected a finite number, got "nan"'),
    ("inf time", "t_s,snr_db\n0,1\ninf,2\n", ":3: t_s: expected a finite number"),
    ("not at 0", "t_s,snr_db\n0.5,1\n1,2\n", ":2: t_s: the first sample must be at 0 s, got 0.5"),
    ("unsorted", "t_s,snr_db\n0,1\n2,2\n1,3\n",
     ":4: t_s: times must increase: 1 comes after 2 (line 3)"),
    ("repeated", "t_s,snr_db\n0,1\n1,2\n1,3\n", ":4: t_s: times must increase"),
    ("snr too high", "t_s,snr_db\n0,1\n1,75\n", ":3: snr_db: must be within -30..60 dB, got 75"),
    ("snr too low", "t_s,snr_db\n0,-31\n1,0\n", ":2: snr_db: must be within -30..60 dB"),
    ("huge time", "t_s,snr_db\n0,1\n1e300,0\n", ":3: t_s: must be at most"),
]


@pytest.mark.parametrize("name,text,says", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_one_located_error(tmp_path, name, text, says):
    path = _csv(tmp_path, text)
    with pytest.raises(TraceError) as exc:
        load_trace(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)) and says in msg and "\n" not in msg, msg


def test_missing_folder_and_binary_files(tmp_path):
    with pytest.raises(TraceError, match="file not found"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="is a folder"):
        load_trace(tmp_path)
    p = tmp_path / "bin.csv"
    p.write_bytes(b"t_s,snr_db\n0,1\n\xff\xfe,2\n")
    with pytest.raises(TraceError, match=r"bin.csv:3: not UTF-8 text"):
        load_trace(p)


# -- in an experiment ---------------------------------------------------------------------------

def _experiment(tmp_path: Path, devices: str, events: str = "") -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(f"schema: testbed.experiment/1\nname: t\ninventory: {INVENTORY}\n"
                 "profile: auto\nseed: 3\npolicies: [agnostic-fixed]\n"
                 "per_policy: {duration_s: 30}\n"
                 f"workloads:\n  default: {{prompts: {ROOT}/experiments/prompts/qa.yaml}}\n"
                 f"devices:\n{devices}" + events)
    return p


def test_the_experiment_gives_devices_traces(tmp_path):
    _csv(tmp_path, GOOD, "walk.csv")
    exp = load_experiment(_experiment(tmp_path, "  dev-a: {link: {trace: walk.csv}}\n"
                                      "  dev-b: {workload: default, link: {trace: walk.csv, "
                                      "loop: false}}\n"))
    assert set(exp.traces) == {"dev-a", "dev-b"}
    assert exp.traces["dev-a"].loop and not exp.traces["dev-b"].loop
    assert exp.device_workloads["dev-a"] == "default"       # no workload given: the default
    link = exp.to_dict()["devices"]["dev-b"]["link"]
    assert link["trace"] == str(tmp_path / "walk.csv") and link["loop"] is False
    assert link["trace_sha256"] == exp.traces["dev-b"].digest and link["trace_samples"] == 4
    assert "link" not in exp.to_dict()["devices"]["dev-c"]


@pytest.mark.parametrize("devices,events,says", [
    ("  dev-a: {link: {trace: nope.csv}}\n", "",
     "exp.yaml:11: devices.dev-a.link.trace: file not found"),
    ("  dev-a: {link: {trace: walk.csv, loop: sometimes}}\n", "",
     "devices.dev-a.link.loop: expected true or false"),
    ("  dev-a: {link: {trace: walk.csv, snr_db: 3}}\n", "",
     "devices.dev-a.link.snr_db: unknown field"),
    ("  dev-a: {link: {loop: true}}\n", "", "devices.dev-a.link.trace: missing required field"),
    ("  dev-a: {}\n", "", "devices.dev-a.workload: missing required field"),
    ("  dev-a: {link: {trace: walk.csv}}\n", "events:\n  - {at_s: 5, device: dev-a, snr_db: 3}\n",
     "events[0].snr_db: dev-a's link follows a trace"),
])
def test_bad_links_name_the_experiment_file(tmp_path, devices, events, says):
    _csv(tmp_path, GOOD, "walk.csv")
    with pytest.raises(ExperimentError) as exc:
        load_experiment(_experiment(tmp_path, devices, events))
    assert says in str(exc.value), str(exc.value)


def test_a_bad_trace_is_one_line_and_exit_2_naming_the_trace_file(tmp_path):
    bad = _csv(tmp_path, "t_s,snr_db\n0,1\n1,nan\n", "walk.csv")
    exp = _experiment(tmp_path, "  dev-a: {link: {trace: walk.csv}}\n")
    for command in (["experiment", "show", str(exp)], ["simulate", str(exp), "--profile",
                                                      str(ROOT / "profiles/local.json")]):
        proc = subprocess.run([sys.executable, "-m", "testbed.cli", *command],
                              check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"{bad}:3: snr_db: expected a finite number" in err and "Traceback" not in err


def test_the_shipped_experiment_loads_its_traces():
    exp = load_experiment(ROOT / "experiments/trace.yaml")
    assert set(exp.traces) == {"dev-a", "dev-b"} and exp.events == ()
    walk, fading = exp.traces["dev-a"], exp.traces["dev-b"]
    assert not walk.loop and fading.loop
    assert walk.duration_s == pytest.approx(90) and fading.duration_s == pytest.approx(90)
    assert 60 <= exp.duration_s <= 90
    assert exp.channel.bandwidth_hz < exp.inventory.channel.bandwidth_hz     # a narrow band
    assert set(exp.policies) >= {"multispin-heterogeneous", "agnostic-fixed"}


# -- generators -------------------------------------------------------------------------------

def test_generators_are_deterministic_for_a_seed():
    a, b, c = (traces.walk(7), traces.walk(7), traces.walk(8))
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    a, b, c = (traces.rayleigh(7), traces.rayleigh(7), traces.rayleigh(8))
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    t, _, _ = traces.walk(1, rate_hz=20)
    assert np.allclose(np.diff(t), 0.05)                       # 20 samples a second


def test_rayleigh_power_is_exponential_with_the_stated_mean():
    from scipy import stats
    mean_db, fd, rate = 30.0, 1.0, 10.0      # far from the clipping at -30 and 60 dB
    t, snr, clipped = traces.rayleigh(3, mean_snr_db=mean_db, doppler=fd, duration_s=8000,
                                      rate_hz=rate)
    tc = traces.COHERENCE / fd
    block = np.floor(t / tc + 1e-9).astype(int)
    first = np.r_[True, block[1:] != block[:-1]]               # one sample per block
    power = 10 ** ((snr[first] - mean_db) / 10)
    assert clipped == 0 and len(power) > 15000
    assert np.mean(power) == pytest.approx(1.0, rel=0.03)      # E|h|^2 = 1: mean SNR as stated
    assert stats.kstest(power, "expon").pvalue > 0.001          # |h|^2 ~ Exp(1)
    # held for exactly a block: the SNR changes only at block boundaries
    assert np.all(np.diff(snr)[~first[1:]] == 0)
    # the mean in dB is 10 log10(e) * (-Euler's gamma) = -2.51 dB below the linear mean
    assert np.mean(snr[first]) - mean_db == pytest.approx(-2.507, abs=0.1)


def test_the_walk_falls_with_log_distance():
    slopes, drops = [], []
    for seed in range(20):
        t, snr, _ = traces.walk(seed, start_m=5, end_m=50, speed_mps=1.0, exponent=3.0,
                                ref_snr_db=20, ref_m=5, shadow_sd_db=2.0)
        d = 5 + 1.0 * t
        slopes.append(np.polyfit(10 * np.log10(d), snr, 1)[0])
        n = len(snr) // 10
        drops.append(snr[:n].mean() - snr[-n:].mean())
    assert np.mean(slopes) == pytest.approx(-3.0, abs=0.2)     # 10 n log10(d): n = 3
    assert min(drops) > 15                                      # every walk falls, by about
    assert np.mean(drops) == pytest.approx(                     # the path loss between the
        30 * math.log10(47.75 / 7.25), abs=2)                   # first and last tenths' mid
    assert t[-1] + (t[1] - t[0]) == pytest.approx(45.0)          # (50 - 5) m at 1 m/s
    # without shadowing it is exactly the path-loss law, falling all the way
    t, clean, _ = traces.walk(5, start_m=5, end_m=50, speed_mps=1.0, ref_snr_db=20, ref_m=5,
                              shadow_sd_db=0.0)
    assert np.all(np.diff(clean) < 0)
    assert clean[0] == pytest.approx(20.0)
    assert clean[-1] == pytest.approx(20 - 30 * math.log10((5 + t[-1]) / 5))


def test_the_command_line_writes_what_its_header_says(tmp_path):
    out = tmp_path / "f.csv"
    proc = subprocess.run([sys.executable, "-m", "testbed.traces", "rayleigh", "--seed", "4",
                           "--carrier-hz", "2.4e9", "--speed-mps", "0.25", "--duration-s", "20",
                           "--out", str(out)], check=False, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tr = load_trace(out)
    assert tr.samples == 200 and tr.duration_s == pytest.approx(20)
    head = out.read_text().splitlines()
    assert head[0].startswith("# made by: python -m testbed.traces rayleigh --seed 4")
    assert "f_D = 2.001 Hz" in "\n".join(head[:4])              # 0.25 m/s * 2.4 GHz / c
    bad = subprocess.run([sys.executable, "-m", "testbed.traces", "walk", "--seed", "1",
                          "--start-m", "9", "--end-m", "3", "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "start_m < end_m" in bad.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_the_shipped_traces_are_remade_exactly_by_their_command(tmp_path, path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# made by: python -m testbed.traces ")
    argv = shlex.split(lines[0][len("# made by: "):])
    out = tmp_path / path.name
    argv[argv.index("--out") + 1] = str(out)
    proc = subprocess.run([sys.executable, *argv[1:]], check=False, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[1:] == lines[1:]      # all but the --out path
    tr = load_trace(path)
    assert tr.samples / tr.duration_s >= 10 - 1e-9              # 10 samples a second or more


def test_a_replay_compares_the_trace_files(tmp_path):
    from testbed.records.replay import differences, recorded_facts
    _csv(tmp_path, GOOD, "walk.csv")
    exp = load_experiment(_experiment(tmp_path, "  dev-a: {link: {trace: walk.csv}}\n"))
    facts = recorded_facts({"experiment": exp.to_dict()})
    assert facts["digest.trace.dev-a"] == exp.traces["dev-a"].digest
    _csv(tmp_path, GOOD.replace("1.5,-5", "1.5,-6"), "walk.csv")     # the trace changed since
    again = load_experiment(_experiment(tmp_path, "  dev-a: {link: {trace: walk.csv}}\n"))
    now = {"digest.trace.dev-a": again.traces["dev-a"].digest}
    assert [d["item"] for d in differences(facts, now)] == ["digest.trace.dev-a"]


def test_the_report_checks_links_against_their_traces(tmp_path):
    """A simulated run of the shipped trace experiment: `testbed report --json` has the check
    of every upload against its trace (the simulator's fluid model), the table is printed, and
    trace.png is written."""
    import json
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "simulate",
                           str(ROOT / "experiments/trace.yaml"), "--profile",
                           str(ROOT / "profiles/local.json"), "--duration", "30", "--out",
                           str(runs)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = list(runs.iterdir())
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(run), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = json.loads(proc.stdout)["runs"][0]["trace_check"]
    assert check["model"] == "fluid" and check["overall"]["checked"] > 20
    # the simulator times uploads with the profile's measured spread of upload times over
    # the model (a random factor, mean about 1.04): the median ratio is that mean
    assert abs(check["overall"]["median_ratio"] - 1.0) < 0.1, check["overall"]
    assert {d["device"] for d in check["devices"]} == {"dev-a", "dev-b"}
    assert (run / "trace.png").read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", "report", str(run)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "COLUMNS": "100"})
    assert "links against their traces" in proc.stdout
