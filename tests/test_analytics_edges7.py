"""A seventh look at a camera's analytics area (workers/analytics.py, analytics_settings.py, redact.py,
appearance.py): credentials in URLs a user typed slightly wrong were printed back in the error that refused them."""

from __future__ import annotations

import pytest

from pipeline.camera_commands import REDIS_URL_ENV, redis_url
from pipeline.config import ConfigError, parse_config
from pipeline.errors import UserError
from workers.redact import redact_text, redact_url, url_secrets
from workers.source_base import SourceError
from workers.sources import open_source

PASSWORD = "s3cretpw"


@pytest.mark.parametrize("value", [f'"redis://:{PASSWORD}@redis:6379/0"', f" redis://:{PASSWORD}@redis:6379/0"],
                         ids=["env-file-quotes", "leading-space"])
def test_a_redis_url_still_in_its_quotes_is_refused_without_its_password(monkeypatch, value):
    """`docker run --env-file` keeps the quotes of HYDRAVISION_REDIS_URL="redis://..."; the refusal named the URL
    with its password (redact_url looked for the scheme at the very start only)."""
    monkeypatch.setenv(REDIS_URL_ENV, value)
    with pytest.raises(UserError, match=r"must start with redis://") as err:
        redis_url(None)
    assert PASSWORD not in str(err.value) and "redis://***@redis:6379/0" in str(err.value)


def test_a_camera_url_with_a_slash_missing_is_refused_without_its_password():
    with pytest.raises(ConfigError, match=r"'rtsp:' without '//' is read as a file name") as err:
        parse_config({"cameras": [{"id": "a", "url": f"rtsp:/admin:{PASSWORD}@cam/x"}]})
    assert PASSWORD not in str(err.value) and "rtsp:/***@cam/x" in str(err.value)


def test_a_camera_url_without_its_scheme_fails_to_open_without_its_password():
    """Read as a file name (the config accepts it), it failed to open with the password in the camera's
    last_error, its logs and Redis."""
    url = f"admin:{PASSWORD}@192.168.1.10:554/stream"
    config = parse_config({"cameras": [{"id": "a", "url": url}]})
    with pytest.raises(SourceError) as err:
        open_source(config.cameras[0].url, open_timeout_s=2, read_timeout_s=2).open()
    assert PASSWORD not in str(err.value) and "admin:***@192.168.1.10" in str(err.value)


@pytest.mark.parametrize("url, shown", [
    (f'"rtsp://admin:{PASSWORD}@cam/x"', '"rtsp://***@cam/x"'),
    (f"<rtsp://admin:{PASSWORD}@cam/x>", "<rtsp://***@cam/x>"),
    (f"rtsp:admin:{PASSWORD}@cam/x", "rtsp:***@cam/x"),
    (f"//admin:{PASSWORD}@cam/x", "//admin:***@cam/x"),
    # guards: what has no userinfo stays as it was
    ("file:///videos/lobby@2x.mp4", "file:///videos/lobby@2x.mp4"),
    ("/videos/lobby@2x.mp4", "/videos/lobby@2x.mp4"),
    ("rtsp://cam:554/Streaming/Channels/101", "rtsp://cam:554/Streaming/Channels/101"),
])
def test_a_url_with_decoration_or_a_mangled_scheme_hides_its_password(url, shown):
    assert redact_url(url) == shown
    if PASSWORD in url:
        assert PASSWORD in url_secrets(url)
        assert PASSWORD not in redact_text(f"cannot open {url!r}: 401 for {PASSWORD}", [url])


@pytest.mark.parametrize("path", ["/videos/cam:1@front.mp4", "/srv/12:00@gate.mp4"])
def test_a_file_path_with_a_colon_and_an_at_has_no_secret(path):
    """The scheme is read at the start only: a path's "cam:1@" read as userinfo masked every "1" in its camera's
    errors and logs, and made camera export write part of the path as a secret's placeholder."""
    assert url_secrets(path) == [] and redact_url(path) == path
    assert redact_text(f"could not open {path}: 1 frames", [path]) == f"could not open {path}: 1 frames"
