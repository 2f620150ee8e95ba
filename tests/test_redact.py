"""workers/redact.py: no part of a credential survives, whatever characters it holds (issue 12, defect 6)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from workers.redact import redact_text, redact_url, url_secrets

URLS = [
    # (url as the user typed it, what may be shown)
    ("rtsp://admin:hunter2@cam/stream", "rtsp://***@cam/stream"),
    ("rtsp://admin:p@ss@cam/x", "rtsp://***@cam/x"),  # raw '@': FFmpeg takes the LAST '@'
    ("rtsp://admin:p@s@s@cam:554/x", "rtsp://***@cam:554/x"),
    ("rtsp://admin:pa:ss@cam/x", "rtsp://***@cam/x"),
    ("rtsp://admin:pa/ss@cam/x", "rtsp://***@cam/x"),  # raw '/', '#', '?': FFmpeg refuses them, users type them
    ("rtsp://admin:pa#ss@cam/x", "rtsp://***@cam/x"),
    ("rtsp://admin:pa?ss@cam/x", "rtsp://***@cam/x"),
    ("rtsp://u:a@b/c@cam/x", "rtsp://***@cam/x"),  # '@' then '/' in one password
    ("rtsp://admin:p%40ss%3A%2F%23@cam/x", "rtsp://***@cam/x"),
    ("rtsp://admin:100%@cam/x", "rtsp://***@cam/x"),  # a '%' that encodes nothing
    # '&key=' inside a password reads like '?pwd=p@ss' below: is what follows the '@' a host or the rest of
    # a secret? Both are hidden.
    ("rtsp://admin:p&key=x@cam/x", "rtsp://***"),
    ("rtsp://:onlypass@cam/x", "rtsp://***@cam/x"),  # empty user
    ("https://ghp_Token123@host/repo", "https://***@host/repo"),  # token-only userinfo
    ("rtsp://u:p@[::1]:8554/x", "rtsp://***@[::1]:8554/x"),  # IPv6 host
    ("rtsp://u:p@ss@[fe80::1%25eth0]:554/x", "rtsp://***@[fe80::1%25eth0]:554/x"),
    ("redis://hv:p@ss:w0rd@127.0.0.1:6380/0", "redis://***@127.0.0.1:6380/0"),
    ("rediss://:pw@h:1/0?ssl_ca_certs=/etc/ca.pem", "rediss://***@h:1/0?ssl_ca_certs=/etc/ca.pem"),
    ("http://cam/snap.jpg?user=admin&pwd=s3cret&res=hd", "http://cam/snap.jpg?user=admin&pwd=***&res=hd"),
    ("https://cam/x?api_key=abc&access_token=def", "https://cam/x?api_key=***&access_token=***"),
    ("http://cam/x?password=a#b&c", "http://cam/x?password=***&c"),  # raw '#' in a query secret
    ("http://cam/snap?user=admin&pwd=p@ss", "http://***"),  # '@' in a query secret: never shows a tail
    ("http://u:p@cam/x?token=t@k", "http://***"),
    # no credentials: unchanged
    ("rtsp://cam:554/Streaming/Channels/101", "rtsp://cam:554/Streaming/Channels/101"),
    ("rtsp://[::1]:8554/x", "rtsp://[::1]:8554/x"),
    ("synthetic://street?seed=4&fps=10", "synthetic://street?seed=4&fps=10"),
    ("file:///videos/lobby@2x.mp4", "file:///videos/lobby@2x.mp4"),  # no authority, so no userinfo
    ("/videos/lobby@2x.mp4", "/videos/lobby@2x.mp4"),
    ("rtsp://@cam/x", "rtsp://@cam/x"),  # empty userinfo: nothing to hide
    ("", ""),
    # an '@' in a path cannot be told from a password holding '/': hidden, the safe side
    ("rtsp://cam/stream@main", "rtsp://***@main"),
]


@pytest.mark.parametrize("url, shown", URLS, ids=[u or "empty" for u, _ in URLS])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(shown) == shown  # idempotent: redacting twice changes nothing


def test_redact_url_leaves_non_strings_alone() -> None:
    assert redact_url(None) is None


CAM = "rtsp://admin:p@ss:w/rd%23@10.0.0.7:554/live"  # password 'p@ss:w/rd%23' ('p@ss:w/rd#' decoded)


@pytest.mark.parametrize("message, shown", [
    # FFmpeg / PyAV echo the URL as given
    (f"[Errno 111] Connection refused: '{CAM}'", "[Errno 111] Connection refused: 'rtsp://***@10.0.0.7:554/live'"),
    # ... or the decoded password alone, e.g. from an auth header it built
    ("401 Unauthorized for user admin with password p@ss:w/rd#", "401 Unauthorized for user admin with password ***"),
    # ... or the password %-encoded differently from how the user wrote it
    (f"auth={quote('p@ss:w/rd#', safe='')}", "auth=***"),
    (f"auth={quote('p@ss:w/rd#', safe='').lower()}", "auth=***"),
    # the URL with a port added by the library: the password alone still goes
    ("open rtsp://admin:p@ss:w/rd%23@10.0.0.7/live failed", "open rtsp://***@10.0.0.7/live failed"),
    # a URL not in the list (another camera's, a Redis URL): its userinfo is hidden as a whole
    ("publisher: redis://hv:r3d@s@127.0.0.1:6380/0 refused", "publisher: redis://***@127.0.0.1:6380/0 refused"),
    # nothing secret: unchanged
    ("camera lobby: end of file after 200 frames", "camera lobby: end of file after 200 frames"),
])
def test_redact_text(message: str, shown: str) -> None:
    assert redact_text(message, [CAM]) == shown


@pytest.mark.parametrize("url, secrets", [
    ("rtsp://admin:p%40ss@cam/x", {"p%40ss", "p@ss"}),
    ("rtsp://admin:p@ss@cam/x", {"p@ss", "p%40ss"}),
    ("https://tok3n@host/x", {"tok3n"}),
    ("http://cam/x?token=ab%2Fc", {"ab%2Fc", "ab/c", "ab%2fc"}),
    ("rtsp://admin@cam/x?fps=5", {"admin"}),  # a userinfo without ':' may be a token: hidden
    ("rtsp://admin:@cam/x", set()),  # empty password, and the user name is not a secret
    ("rtsp://cam/x", set()),
])
def test_url_secrets(url: str, secrets: set[str]) -> None:
    assert set(url_secrets(url)) == secrets


def test_every_form_of_a_hard_password_is_hidden() -> None:
    """A password with each awkward character, written raw or encoded, never shows through redact_text."""
    raw = "a@b:c/d%e#f?g&h"
    for written in (raw.replace("%", "%25"), quote(raw, safe="")):
        url = f"rtsp://admin:{written}@cam:554/x?token=zz9"
        text = redact_text(f"{url} | {raw} | {written} | {quote(raw, safe='')} | zz9", [url])
        for piece in ("b:c", "d%e", "c/d", "f?g", written, quote(raw, safe=""), "zz9"):
            assert piece not in text, (written, text)
        assert "cam:554/x" in text  # the host and path stay readable


# ------------------------------------------------------------------------------------------ config errors

CONFIG_PASSWORD = "p@ss:w%40rd/x"  # as it would come from ${CAM_PW}: '@', ':', '/', and a %-encoded '@'


@pytest.mark.parametrize("config", [
    {"cameras": [{"id": "a", "url": "ftp://admin:${CAM_PW}@cam/x"}]},  # the url validator echoes it
    {"cameras": [{"id": "a", "url": ["rtsp://admin:${CAM_PW}@cam/x"]}]},  # a list's repr
    {"cameras": ["rtsp://admin:${CAM_PW}@cam/x"]},
    {"cameras": [{"id": "rtsp://admin:${CAM_PW}@cam/x", "url": "synthetic://street"}]},  # the id validator echoes it
    {"redis": {"url": "http://hv:${CAM_PW}@127.0.0.1:6380/0"}},
], ids=["bad-scheme", "url-as-list", "camera-as-string", "url-as-id", "redis-scheme"])
def test_config_errors_show_no_part_of_the_password(monkeypatch: pytest.MonkeyPatch, config: dict) -> None:
    from pipeline.config import ConfigError, parse_config

    monkeypatch.setenv("CAM_PW", CONFIG_PASSWORD)
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    message = str(err.value)
    for piece in ("ss:w", "40rd", "w@rd", "rd/x"):
        assert piece not in message, message
    assert "***@" in message


def test_yaml_errors_do_not_quote_the_file(tmp_path) -> None:
    """PyYAML's message quotes the offending line, cut short: it can end inside a password."""
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("cameras:\n  - {id: a, url: 'rtsp://admin:p@ss:w0rd@cam/x'\n  oops: [\n")
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*line 3, column 3") as err:
        load_config(path)
    assert "ss:w0rd" not in str(err.value) and "p@ss" not in str(err.value), err.value
