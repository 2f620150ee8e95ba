"""Config loading at scale: libyaml's parser where PyYAML has it, the pure-Python one's messages for bad files."""
import pytest
import yaml

from pipeline import config
from pipeline.config import ConfigError, load_config, load_yaml


def _cameras_yaml(n: int) -> str:
    return "cameras:\n" + "".join(f"  - id: cam-{i}\n    url: rtsp://10.0.{i // 250}.{i % 250}/s\n" for i in range(n))


@pytest.mark.skipif(not getattr(yaml, "__with_libyaml__", False), reason="this PyYAML has no libyaml")
def test_large_configs_are_parsed_by_libyaml_and_still_refuse_a_key_given_twice(monkeypatch):
    text = _cameras_yaml(2000)
    slow = yaml.load(text, Loader=config._UniqueKeys)  # the pure-Python parser, the one used before
    used = []
    load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda text, Loader: used.append(Loader) or load(text, Loader=Loader))
    assert load_yaml(text) == slow and len(slow["cameras"]) == 2000
    assert used == [config._FastUniqueKeys] and issubclass(config._FastUniqueKeys, yaml.CSafeLoader)
    with pytest.raises(yaml.YAMLError, match=r"key 'id' given twice in one mapping \(first on line 2\)"):
        load("cameras:\n  - id: a\n    id: b\n", Loader=config._FastUniqueKeys)  # noqa: S506


def test_a_tab_is_refused_whether_or_not_pyyaml_has_libyaml(tmp_path):
    """libyaml takes a tab after a key's colon, which the pure-Python parser refuses: a config's validity depended
    on how PyYAML was built. Texts with a tab go to the pure parser, as before."""
    p = tmp_path / "tabbed.yaml"
    p.write_text("cameras:\n  - id:\tlobby\n    url: synthetic://street\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_a_bad_file_is_still_said_with_the_pure_python_parsers_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("cameras:\n  - id: a\n    url: [rtsp://x\n")
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML: .*line \d+, column \d+") as e:
        load_config(p)
    assert "rtsp://x" not in str(e.value)  # no snippet of the file (a password could stand there)
