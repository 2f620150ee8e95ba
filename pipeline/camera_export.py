"""The running set of cameras as YAML that `hydravision run` loads again, without a credential in it.

A camera from the config file whose URL is unchanged gets its URL back as written there, ``${VAR}``s and
all. Any credential still in a URL (a camera added at run time, or a password written into the file) is
replaced by a ``${HV_<CAMERA>_SECRET}`` placeholder, and the export lists the variables to set: it never
prints a raw password. Fields left at their defaults are left out.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import yaml

from pipeline.config import ConfigError, absolute_path_url, interpolate_env
from workers.redact import _hidden_spans, _userinfo_span  # the one rule of where a URL's secrets are
from workers.settings import CameraConfig, is_device_path


# One ${VAR} (or ${VAR:-}) and nothing else: the default of ${VAR:-default} would be a password in the file.
_VAR = r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-)?\}"
_USER = r"(?:\$\{[^}]*\}|[^:$])*:"  # the user name before a password, ${VAR}s and all


def _placeholders(url: str, camera_id: str, literal: bool = False,
                  taken: set[str] | None = None) -> tuple[str, list[str]]:
    """``url`` with each secret span that is not already a ${VAR} replaced by one; the names it used. A span
    stays as written only when its secret (a userinfo's password, or the whole userinfo without ':', or a
    query value) is exactly one ${VAR}, and only in a URL as the config file wrote it: in a ``literal`` one (a
    camera added or changed at run time, which got no interpolation) "${...}" is text, and loading the export
    must not turn it into the controller's environment, so every secret span gets a placeholder and any other
    "${" is written "%24{". ``taken``: variable names already in use (the ones chosen here are added), so two
    cameras whose ids differ only in punctuation ("cam-1", "cam.1") never share one."""
    taken = set() if taken is None else taken
    stem = "HV_" + re.sub(r"[^A-Za-z0-9]", "_", camera_id).upper() + "_SECRET"
    userinfo = _userinfo_span(url)
    out, pos, names = [], 0, []

    def plain(text: str) -> str:
        return text.replace("${", "%24{") if literal else text

    for start, end in _hidden_spans(url):
        kept = f"(?:{_USER})?{_VAR}" if (start, end) == userinfo else _VAR
        if not literal and re.fullmatch(kept, url[start:end]):
            continue
        n = 1
        while (name := stem if n == 1 else f"{stem}_{n}") in taken:
            n += 1
        taken.add(name)
        names.append(name)
        out += [plain(url[pos:start]), "${" + name + "}"]
        pos = end
    out.append(plain(url[pos:]))
    return "".join(out), names


def export_cameras(cameras: list[CameraConfig], written_urls: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(camera mappings for the YAML's ``cameras:``, the environment variables they need)."""
    urls: list[tuple[str, bool]] = []  # (the URL to export, whether it is literal text)
    for cam in cameras:
        url, literal = cam.url, True
        written = written_urls.get(cam.id)
        if written is not None:
            try:
                # a relative path runs absolute (cluster.actor_camera): still the file's own URL
                if absolute_path_url(interpolate_env(written).strip()) == cam.url:  # stripped, as the URL was
                    url, literal = written, False
            except ConfigError:  # a variable no longer set: it cannot be the same URL
                pass
        urls.append((url, literal))
    # the variables the file's own URLs use: a placeholder must not take one of their names
    taken = {m for url, literal in urls if not literal for m in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", url)}
    out, needed = [], []
    for cam, (url, literal) in zip(cameras, urls):
        if literal and url.startswith("/") and "${" in url and not is_device_path(url):
            # A plain path is opened as written, never percent-decoded: "%24{" would name another file. As a
            # file:// URL, quoted, it loads back as the same path (workers/sources.py unquotes it).
            url = "file://" + quote(url)
        url, names = _placeholders(url, cam.id, literal, taken)
        needed += names
        data = cam.as_json()
        data = {"id": cam.id, "url": url, **{k: v for k, v in data.items() if k not in ("id", "url")}}
        out.append(data)
    return out, needed


def export_yaml(cameras: list[dict], needed: list[str]) -> str:
    head = "# hydravision cameras export: the running set; use it as the cameras: section of a config.\n"
    if needed:
        head += ("# Credentials were replaced by variables; set them before loading: "
                 + ", ".join(needed) + "\n")
    return head + yaml.safe_dump({"cameras": cameras}, sort_keys=False)
