"""A real Orthanc PACS with its DICOMweb plugin, started on 127.0.0.1 for a test and stopped after it.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``.ci/run`` installs them). Each server gets a
throw-away configuration and storage folder, a free port, basic authentication with one user, no DICOM
(DIMSE) listener and no remote access.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BINARY = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "site-a", "not-a-real-secret-5f2c"


@dataclass(frozen=True)
class Orthanc:
    """A running server: its REST root, DICOMweb root and the user it accepts."""

    url: str
    user: str = USER
    password: str = PASSWORD

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def _request(self, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return bytes(response.read())

    def upload(self, paths: Sequence[Path]) -> list[Path]:
        """POST each file to /instances; return the files Orthanc stored as new instances."""
        stored = []
        for path in paths:
            try:
                answer = json.loads(self._request("/instances", path.read_bytes(), "POST"))
            except urllib.error.HTTPError:
                continue  # not DICOM to Orthanc
            if answer.get("Status") == "Success":
                stored.append(path)
        return stored

    def statistics(self) -> dict[str, object]:
        return dict(json.loads(self._request("/statistics")))


def available() -> None:
    """Skip (or fail under .ci/run) when Orthanc or its DICOMweb plugin is missing."""
    missing = [p for p in (BINARY, PLUGIN) if not os.path.exists(p)]
    if missing:
        message = f"{', '.join(missing)} missing (.ci/run installs orthanc and orthanc-dicomweb)"
        if os.environ.get("ONCOFED_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def orthanc(folder: Path) -> Iterator[Orthanc]:
    """Start Orthanc with a throw-away configuration under ``folder``; stop it on exit."""
    available()
    for _attempt in range(3):  # the port is free when chosen; another process could take it before Orthanc
        port = _free_port()
        config = {
            "Name": "oncofed-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpCompressionEnabled": False, "ExecuteLuaEnabled": False,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([BINARY, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        server = Orthanc(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                server._request("/system")
                up = True
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        if not up:
            proc.kill()
            proc.wait()
            log.close()
            continue
        try:
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        return
    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")
