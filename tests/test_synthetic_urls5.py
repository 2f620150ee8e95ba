"""synthetic:// and file:// camera URLs are checked where the config is read (and a live add or update), with the
sources' own parsers, not first when the camera starts; an unreadable one is a SourceError, not a crashed decoder."""

from __future__ import annotations

import pytest

from pipeline.admission import CommandRejected, merge_changes, parse_camera
from pipeline.config import ConfigError, load_config
from workers.settings import CameraConfig
from workers.sources import SourceError, open_source

SECRET = "s3cr3t-pw"

# url, the part of the refusal that names what is wrong (the source's own words)
BAD = [
    ("synthetic://stret?sed=1", "unknown synthetic scene 'stret' (known: street)"),
    ("synthetic://street?sed=1", "unknown parameter 'sed'"),
    ("synthetic://street?seed=-1", "parameter 'seed' must be an integer >= 0, got '-1'"),
    ("synthetic://street?fps=0", "parameter 'fps' must be a number in (0, 1000], got '0'"),
    ("synthetic://street?size=640by360", "parameter 'size' must be WIDTHxHEIGHT, each 64..8192, got '640by360'"),
    ("synthetic://street?size=99999x99999", "each 64..8192, got '99999x99999'"),
    ("synthetic://street?frames=ten", "parameter 'frames' must be an integer >= 0, got 'ten'"),
    ("synthetic://street?seed=1&seed=2", "parameter 'seed' given twice"),
    ("synthetic://street#seed=3", "unexpected '#seed=3' (parameters follow '?')"),
    ("synthetic://[street", "unreadable URL"),
    ("file://videos/clip.mp4", "file:// URLs must be local"),  # a relative path after file://: "videos" is a host
    ("file:///videos/cam #2.mp4", "ends its path at '?' or '#'"),
    (f"file://admin:{SECRET}@nas/clip.mp4", "file:// URLs must be local"),
]


@pytest.mark.parametrize("url, problem", BAD)
def test_a_bad_synthetic_or_file_url_is_refused_at_config_load_naming_the_field_and_the_part(tmp_path, url, problem):
    # `hydravision run` loaded it, and the camera failed (or crashed, again and again) once it started
    path = tmp_path / "c.yaml"
    path.write_text(f"cameras:\n  - id: lobby\n    url: {url!r}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    (line,) = [ln for ln in str(err.value).splitlines() if ln.startswith("cameras[0].url: ")]
    assert problem in line and SECRET not in str(err.value)
    assert f"{url}: " not in line  # the cause alone: the error's "(got ...)" shows the URL


@pytest.mark.parametrize("url, problem", BAD)
def test_a_live_add_or_update_with_a_bad_url_is_refused_before_it_is_accepted(url, problem):
    # what LiveControl.add_camera / update_camera run first: it answered "accepted", then the camera failed
    with pytest.raises(CommandRejected) as err:
        parse_camera({"id": "lobby", "url": url})
    assert err.value.reason.startswith("camera.url: ") and problem in err.value.reason
    current = CameraConfig(id="lobby", url="synthetic://street?seed=1")
    with pytest.raises(CommandRejected) as err:
        merge_changes(current, {"url": url})
    assert err.value.reason.startswith("camera.url: ") and problem in err.value.reason
    assert SECRET not in err.value.reason


@pytest.mark.parametrize("url", ["synthetic://street?seed=1&fps=10", "synthetic://?frames=5", "synthetic://street/",
                                 " synthetic://street?seed=2 ".strip(), "SYNTHETIC://street?size=320X192",
                                 "file:///videos/cam%20%232.mp4", "file://localhost/videos/a.mp4", "/videos/a b.mp4"])
def test_normal_path_guard_urls_the_sources_read_still_load(url):
    """Guard (passes before and after the fix): what the sources accept, the config accepts."""
    assert CameraConfig(id="lobby", url=url).url == url
    open_source(url)  # and the source reads it too (nothing is opened)


@pytest.mark.parametrize("url", ["synthetic://[street", "synthetic://street]?seed=1", "file://[nas/clip.mp4"])
def test_an_unreadable_url_is_a_source_error_not_a_crashed_decoder(url):
    # urlsplit's ValueError escaped open_source: the capture thread "crashed" (a traceback logged) and was
    # restarted after each backoff, for ever, instead of failing once with the reason
    with pytest.raises(SourceError) as err:
        open_source(url)
    assert err.value.kind == "unsupported" and "unreadable URL" in str(err.value)
