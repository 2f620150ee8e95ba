"""A camera whose process was restarted shows "(restarted Nx)" on its dashboard tile, as `hydravision status` and
the final table say it: its status in Redis counts its whole run and says `restarts` (workers/stream.py), and the
tile dropped the field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.dashboard_data import make_tile

APP_JS = Path(__file__).resolve().parent.parent / "pipeline" / "dashboard_static" / "app.js"


@pytest.mark.parametrize("restarts, shown", [(2, 2), (0, 0), (None, 0), ("2", 0), (True, 0)])
def test_the_tile_carries_the_restarts_its_status_says(restarts, shown):
    status = {"camera": "c", "state": "running", "fps": 5.0, **({} if restarts is None else {"restarts": restarts})}
    assert make_tile(status, None, None, None)["restarts"] == shown


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (Debian's nodejs)")
def test_the_page_says_restarted_nx_beside_the_state():
    source = APP_JS.read_text()
    function = re.search(r"^function stateLabel\(tile\) \{.*?^\}", source, re.S | re.M).group(0)
    tiles = [{"state": "up", "detail": "running", "restarts": 2}, {"state": "up", "detail": "running", "restarts": 0},
             {"state": "down", "detail": "failed", "restarts": 1}]
    script = f"{function}\nconsole.log(JSON.stringify({json.dumps(tiles)}.map(stateLabel)));"
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == ["up (restarted 2x)", "up", "down · failed (restarted 1x)"]
