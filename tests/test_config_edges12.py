"""Config edges (audit 12): a huge file given as the config, the token named 'env' given twice, '~' in media roots."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from pipeline.admission import Admission
from pipeline.config import ApiConfig, ConfigError, load_config, load_yaml, parse_camera, parse_config

MAX_CONFIG_BYTES = 64 * 2**20  # pipeline.config's limit


def test_a_file_far_larger_than_any_config_is_refused_without_reading_it_whole(tmp_path):
    """`hydravision run recording.mp4`: the whole file was read, then decoded, 2.2x its size in memory (a 10 GB
    recording: OOM) before the first byte was found not to be text."""
    big = tmp_path / "recording.mp4"
    with open(big, "wb") as f:
        f.truncate(100 * 2**20)  # sparse: no disk, no time
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"recording\.mp4: 100\.0 MiB, larger than 64 MiB: not a config file"):
            load_config(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing of it read


def test_normal_path_guard_a_config_up_to_the_limit_still_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# padding\n" * 100_000 + "cameras: [{id: a, url: 'synthetic://street'}]\n")
    assert [c.id for c in load_config(path).cameras] == ["a"]


def test_the_token_named_env_in_the_config_is_not_replaced_without_a_word():
    """$HYDRAVISION_API_TOKEN adds a token named 'env': it replaced a configured token of that name, which then
    failed every request (401) while the config said it was valid."""
    api = ApiConfig(tokens={"env": "c" * 20, "ops": "o" * 20})
    with pytest.raises(ConfigError, match=r"^api\.tokens\.env: \$HYDRAVISION_API_TOKEN") as e:
        api.all_tokens({"HYDRAVISION_API_TOKEN": "v" * 20})
    assert "c" * 16 not in str(e.value) and "v" * 16 not in str(e.value)  # neither token shown


def test_normal_path_guard_the_env_token_beside_others_or_equal_to_its_namesake():
    env = {"HYDRAVISION_API_TOKEN": "v" * 20}
    assert ApiConfig(tokens={"ops": "o" * 20}).all_tokens(env) == {"ops": "o" * 20, "env": "v" * 20}
    assert ApiConfig(tokens={"env": "v" * 20}).all_tokens(env) == {"env": "v" * 20}
    assert ApiConfig(tokens={"env": "c" * 20}).all_tokens({}) == {"env": "c" * 20}


def test_a_media_root_under_the_home_folder_lets_its_files_be_read(tmp_path, monkeypatch):
    """`media_roots: [~/recordings]`: "~" expands in a camera's file path and in model.checkpoint, but the root
    stayed a folder named "~" under the working directory: every file was refused as outside the media roots."""
    monkeypatch.setenv("HOME", str(tmp_path))
    clip = tmp_path / "recordings" / "gate.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(range(256)))
    api = parse_config(load_yaml("api: {media_roots: [~/recordings]}")).api
    camera = Admission(api, {"people": ["person"]}).check(parse_camera({"id": "gate", "url": str(clip)}))
    assert camera.url == os.path.realpath(clip)
    assert api.media_roots == [str(tmp_path / "recordings")]  # as refusals name them


def test_normal_path_guard_plain_media_roots_and_devices_are_kept_as_written(tmp_path):
    api = ApiConfig(media_roots=[str(tmp_path), "", "recordings"], devices=["/dev/video0"])
    assert api.media_roots == [str(tmp_path), "recordings"] and api.devices == ["/dev/video0"]
