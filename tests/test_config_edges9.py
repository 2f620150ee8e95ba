"""Config edges a first config runs into: YAML 1.1 reading a name as a number or a boolean, a mapping's key
named as a list index, and a ${VAR} written in a key."""

import pytest

from pipeline.config import ConfigError, load_config, parse_camera, parse_config


def cam(**kw):
    return {"id": "c1", "url": "synthetic://street", **kw}


@pytest.mark.parametrize("camera, path, got", [
    ("{id: 010, url: 'synthetic://street'}", r"cameras\[0\]\.id", "got 8"),  # octal
    ("{id: on, url: 'synthetic://street'}", r"cameras\[0\]\.id", "got True"),
    ("{id: 12:30, url: 'synthetic://street'}", r"cameras\[0\]\.id", "got 750"),  # base 60
    ("{id: a, url: 'synthetic://street', heads: [people, off]}", r"cameras\[0\]\.heads\[1\]", "got False"),
    ("{id: a, url: 'synthetic://street', zones: [{name: no, polygon: [[0, 0], [1, 0], [1, 1]]}]}",
     r"cameras\[0\]\.zones\[0\]\.name", "got False"),
])
def test_a_name_yaml_reads_as_a_number_or_boolean_says_to_quote_it(tmp_path, camera, path, got):
    """`id: 010` was "Input should be a valid string (got 8)": a value the user never wrote, and no word of why."""
    p = tmp_path / "c.yaml"
    p.write_text(f"cameras: [{camera}]\n")
    with pytest.raises(ConfigError, match=path + r": Input should be a valid string \(" + got +
                       r"\); quote it: YAML reads unquoted on/off/yes/no as true/false, 010 as the octal 8"):
        load_config(p)


def test_a_camera_sent_as_json_with_a_number_for_its_id_gets_no_yaml_hint():
    """The hint is the YAML file's: a command sent as JSON (the API, the control stream) never wrote YAML."""
    with pytest.raises(ConfigError, match=r"^camera\.id: Input should be a valid string \(got 8\)$"):
        parse_camera({"id": 8, "url": "synthetic://street"})


@pytest.mark.parametrize("text, expected", [
    ("cameras: [{id: a, url: 'synthetic://street', placement: {labels: {on: north}}}]\n",
     r"cameras\[0\]\.placement\.labels: the key True: Input should be a valid string; quote it"),
    ("ray: {wait_for_resources: {5: 1}}\n", r"ray\.wait_for_resources: the key 5: Input should be a valid string"),
    ("redis: {on: 1}\n", r"redis: the key True: Keys should be strings; quote it"),
])
def test_a_bad_key_is_named_by_its_mapping_not_as_a_list_index(tmp_path, text, expected):
    """A key YAML read as a number or a boolean was shown as a list index of its mapping: "labels[1].[key]"."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(p)
    assert "[key]" not in str(err.value) and "[1]" not in str(err.value) and "[5]" not in str(err.value)


@pytest.mark.parametrize("data, expected", [
    # accepted: the camera waited for a node offering a resource literally named "${NODE_RES}", never placed
    ({"cameras": [cam(placement={"resources": {"${NODE_RES}": 1}})]},
     r"^cameras\[0\]\.placement\.resources: the key '\$\{NODE_RES\}' holds a \$\{\.\.\.\}; only values are read"),
    ({"ray": {"wait_for_resources": {"${ACCEL:-GPU}": 1}}}, r"^ray\.wait_for_resources: the key '\$\{ACCEL:-GPU\}'"),
])
def test_a_reference_in_a_key_is_refused_not_left_as_text(monkeypatch, data, expected):
    monkeypatch.setenv("NODE_RES", "door_node")
    monkeypatch.delenv("ACCEL", raising=False)
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)
    # in a value it is read, as before
    cfg = parse_config({"cameras": [cam(placement={"labels": {"site": "${NODE_RES}"}})]})
    assert cfg.cameras[0].placement.labels == {"site": "door_node"}
