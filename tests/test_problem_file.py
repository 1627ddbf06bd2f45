"""Problem files: a good one loads; every kind of bad one gets one located line."""

from __future__ import annotations

import copy
import json

import pytest

from testbed.control.problem import SCHEMA, load_problem, problem_from_dict, problem_to_dict
from testbed.errors import ProblemError

GOOD = {
    "schema": SCHEMA,
    "bandwidth_hz": 100000, "bits_per_draft_token": 800, "header_bits": 512,
    "max_draft_len": 8, "baseline_draft_len": 4,
    "server": {"verify_base_s": 0.03, "verify_per_token_s": 0.002, "downlink_s": 0.003},
    "devices": [
        {"name": "rpi-1", "draft_base_s": 0.0, "draft_per_token_s": 0.05, "acceptance": 0.6,
         "snr_db": 10.0},
        {"name": "rpi-2", "draft_base_s": 0.001, "draft_per_token_s": 0.04, "acceptance": 0.7,
         "snr_db": 3.0},
    ],
}


def write(tmp_path, data, name="p.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return str(path)


def mutate(fn):
    data = copy.deepcopy(GOOD)
    fn(data)
    return data


def test_good_problem_loads_and_round_trips(tmp_path):
    prob = load_problem(write(tmp_path, GOOD))
    assert prob.names == ("rpi-1", "rpi-2")
    assert prob.devices[1].snr_db == 3.0 and prob.server.downlink_s == 0.003
    assert problem_from_dict(problem_to_dict(prob)) == prob
    # downlink is optional
    assert load_problem(write(tmp_path, mutate(lambda d: d["server"].pop("downlink_s")))) \
        .server.downlink_s == 0.0


BAD = [
    ("negative time", lambda d: d["devices"][1].update(draft_per_token_s=-0.01),
     "devices[1].draft_per_token_s: must be at least 0, got -0.01"),
    ("acceptance over 1", lambda d: d["devices"][1].update(acceptance=1.2),
     "devices[1].acceptance: must be at most 1, got 1.2"),
    ("acceptance under 0", lambda d: d["devices"][0].update(acceptance=-0.1),
     "devices[0].acceptance: must be at least 0"),
    ("no devices", lambda d: d.update(devices=[]), "devices: no devices"),
    ("duplicate name", lambda d: d["devices"][1].update(name="rpi-1"),
     'devices[1].name: duplicate device name "rpi-1" (also devices[0])'),
    ("unknown key", lambda d: d["devices"][0].update(snr=3), "devices[0].snr: unknown field"),
    ("unknown top key", lambda d: d.update(bandwith_hz=1), "bandwith_hz: unknown field"),
    ("wrong schema", lambda d: d.update(schema="testbed.problem/2"),
     'schema: expected "testbed.problem/1", got "testbed.problem/2"'),
    ("not a number", lambda d: d["devices"][0].update(snr_db="high"),
     'devices[0].snr_db: expected a number, got "high"'),
    ("bool is not a number", lambda d: d["server"].update(verify_base_s=True),
     "server.verify_base_s: expected a number, got true"),
    ("missing field", lambda d: d["devices"][1].pop("acceptance"),
     "devices[1].acceptance: missing required field"),
    ("zero band", lambda d: d.update(bandwidth_hz=0), "bandwidth_hz: must be greater than 0"),
    ("zero payload", lambda d: d.update(bits_per_draft_token=0),
     "bits_per_draft_token: must be greater than 0"),
    ("fractional length", lambda d: d.update(max_draft_len=4.5),
     "max_draft_len: expected a whole number, got 4.5"),
    ("draft length over the one limit", lambda d: d.update(max_draft_len=65),
     "max_draft_len: must be at most 64"),
    ("baseline over max", lambda d: d.update(baseline_draft_len=9),
     "baseline_draft_len: must be at most max_draft_len (8), got 9"),
    ("server free", lambda d: d.update(server={"verify_base_s": 0, "verify_per_token_s": 0}),
     "server: verify_base_s, verify_per_token_s and downlink_s are all zero"),
    ("negative server time", lambda d: d["server"].update(downlink_s=-1),
     "server.downlink_s: must be at least 0"),
    ("devices not a list", lambda d: d.update(devices={"a": 1}), "devices: expected a list"),
    ("device not a mapping", lambda d: d["devices"].append(3),
     "devices[2]: expected a mapping, got 3"),
    ("bad name", lambda d: d["devices"][0].update(name="has space"),
     "devices[0].name: \"has space\" is not a valid device name"),
]


@pytest.mark.parametrize("label, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_problem_names_file_line_and_field(tmp_path, label, change, message):
    path = write(tmp_path, mutate(change))
    with pytest.raises(ProblemError) as exc:
        load_problem(path)
    text = str(exc.value)
    assert text.startswith(path + ":"), text
    assert message in text, text
    assert "\n" not in text
    assert exc.value.exit_code == 2


def test_field_errors_carry_the_line_of_the_value(tmp_path):
    path = write(tmp_path, mutate(lambda d: d["devices"][1].update(acceptance=1.2)))
    lines = open(path).read().splitlines()
    with pytest.raises(ProblemError) as exc:
        load_problem(path)
    assert '"acceptance": 1.2' in lines[exc.value.line - 1]


@pytest.mark.parametrize("text, line, what", [
    ('{\n  "schema": "testbed.problem/1",\n  "bandwidth_hz": 1e5,\n  oops\n}', 4, "invalid JSON"),
    ('{\n  "schema": "testbed.problem/1"\n  "bandwidth_hz": 1\n}', 3, "invalid JSON"),
    ('{"a": 1,\n "a": 2}', 2, "duplicate key 'a'"),
    ('{"bandwidth_hz": NaN}', None, "NaN is not a number JSON allows"),
    ("", None, "file is empty"),
    ("[1, 2]", 1, "expected a JSON object"),
])
def test_bad_json_names_the_line(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(ProblemError) as exc:
        load_problem(path)
    assert exc.value.line == line and what in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProblemError, match="file not found"):
        load_problem(str(tmp_path / "nope.json"))


def test_profile_needs_a_channel(tmp_path):
    path = write(tmp_path, {"schema": "testbed.profile/1", "devices": []})
    with pytest.raises(ProblemError, match="needs the channel settings, give --inventory INV "
                                           "or --experiment EXP") as exc:
        load_problem(path)
    assert exc.value.field == "schema" and exc.value.line is not None
    # with a channel the profile is converted (profile_format's job); a broken one is located
    with pytest.raises(ProblemError) as exc:
        load_problem(path, channel=object())
    assert str(exc.value).startswith(path + ": ") and "\n" not in str(exc.value)
    with pytest.raises(ProblemError, match="apply only to profiles"):
        load_problem(write(tmp_path, GOOD, "good.json"), channel=object())
