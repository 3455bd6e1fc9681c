"""A private, real Asterisk for tests: ``$AST_PREFIX/sbin/asterisk`` with a configuration of its own.

``AST_PREFIX`` is an Asterisk 22.8+ installation prefix (``sbin/asterisk``, ``lib/asterisk/modules``,
``var/lib/asterisk/documentation`` and ``rest-api``), default ``../shared/asterisk`` beside the
checkout. The prefix is only read: everything Asterisk writes (configuration, control socket, logs,
spool) lives in a work directory of the instance. What such a launcher must handle:

* the prefix may be read-only and installed for another root: ``asterisk.conf`` points each
  directory either into the prefix (modules, documentation, ARI Swagger) or into the work directory;
* the binary's RUNPATH names the prefix it was built for, so ``$AST_PREFIX/lib`` goes first in
  ``LD_LIBRARY_PATH``; a missing runtime library is named with its Debian package;
* the control socket path must fit in ``sockaddr_un`` (107 bytes), so the work directory is short;
* ready means ARI answers with our credentials *and* ``core waitfullybooted`` returned;
* stopping is by pid: SIGTERM, then SIGKILL; a crash is SIGKILL at once.

Standard library only: the tests drive it from plain (not reactor) code.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PREFIX = ROOT.parent / "shared" / "asterisk"
#: sockaddr_un.sun_path holds 108 bytes with the terminating NUL
MAX_SOCKET_PATH = 107
#: the Debian 12 packages of the runtime libraries an Asterisk 22 build links (make test installs them)
LIBRARY_PACKAGES = {
    "libjansson.so.4": "libjansson4", "libxml2.so.2": "libxml2", "libxslt.so.1": "libxslt1.1",
    "libsqlite3.so.0": "libsqlite3-0", "libssl.so.3": "libssl3", "libcrypto.so.3": "libssl3",
    "libuuid.so.1": "libuuid1", "libedit.so.2": "libedit2", "libicuuc.so.72": "libicu72",
}


class AsteriskUnavailable(Exception):
    """No usable Asterisk here; the message says how to provide one."""


def prefix() -> Path:
    return Path(os.environ.get("AST_PREFIX") or DEFAULT_PREFIX)


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(root / "lib"), env.get("LD_LIBRARY_PATH")]))
    return env


def check(root: Path | None = None) -> Path:
    """The prefix, if an Asterisk 22.8+ can run from it; else :class:`AsteriskUnavailable` saying why."""
    root = root or prefix()
    how = "set AST_PREFIX to an Asterisk 22.8+ installation prefix (default ../shared/asterisk)"
    binary = root / "sbin" / "asterisk"
    if not binary.exists():
        raise AsteriskUnavailable(f"no Asterisk at {binary}: {how}")
    for needed in (root / "lib" / "asterisk" / "modules",
                   root / "var" / "lib" / "asterisk" / "documentation" / "core-en_US.xml"):
        if not needed.exists():
            raise AsteriskUnavailable(f"incomplete Asterisk prefix {root}: {needed} is missing")
    ldd = shutil.which("ldd")
    if ldd:
        modules = sorted((root / "lib" / "asterisk" / "modules").glob("*.so"))
        out = subprocess.run([ldd, str(binary), *map(str, modules)], env=_environment(root),
                             capture_output=True, text=True).stdout
        missing = sorted(set(re.findall(r"^\s*(\S+) => not found", out, re.M)))
        if missing:
            packages = sorted({LIBRARY_PACKAGES.get(name, f"(the package of {name})") for name in missing})
            raise AsteriskUnavailable(f"Asterisk at {root} cannot run: missing libraries {', '.join(missing)}; "
                                      f"apt-get install {' '.join(packages)} (make test does)")
    return root


def short_workdir() -> Path:
    """A new work directory whose control socket path fits in sockaddr_un."""
    path = Path(tempfile.mkdtemp(prefix="ast-"))
    if len(str(path / "run" / "asterisk.ctl").encode()) > MAX_SOCKET_PATH:
        path.rmdir()
        path = Path(tempfile.mkdtemp(prefix="ast-", dir="/tmp"))
    return path


@dataclass
class Asterisk:
    """One private instance. ``dialplan`` is the text of extensions.conf after ``[general]``."""

    workdir: Path
    http_port: int
    rtp_range: tuple[int, int]
    dialplan: str
    root: Path = field(default_factory=check)
    ari_user: str = "tests"
    ari_password: str = "tests-password"
    process: subprocess.Popen[bytes] | None = None
    version: str = ""

    @property
    def ari_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/ari"

    @property
    def conf(self) -> Path:
        return self.workdir / "etc" / "asterisk.conf"

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    def _write_configuration(self) -> None:
        w, root, etc = self.workdir, self.root, self.workdir / "etc"
        for sub in ("etc", "run", "log", "lib", "cache", "spool/monitor", "spool/recording", "spool/tmp"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        files = {
            "asterisk.conf": f"""[directories]
astetcdir => {etc}
astmoddir => {root}/lib/asterisk/modules
astdatadir => {root}/var/lib/asterisk
astsbindir => {root}/sbin
astvarlibdir => {w}/lib
astdbdir => {w}/lib
astkeydir => {w}/lib
astagidir => {w}/lib
astspooldir => {w}/spool
astrundir => {w}/run
astlogdir => {w}/log
astcachedir => {w}/cache

[options]
nocolor = yes
documentation_language = en_US
cache_record_files = no
record_cache_dir = {w}/spool/tmp

[files]
astctl = asterisk.ctl
astctlpermissions = 0600
""",
            # every module that loads without configuration; nothing of a user's own build listens
            # where the tests do not say (no SIP or manager configuration is written)
            "modules.conf": "[modules]\nautoload = yes\nnoload => res_pjsip.so\nnoload => chan_pjsip.so\n",
            "logger.conf": "[general]\ndateformat = %F %T.%3q\n[logfiles]\n"
                           "messages => notice,warning,error\nfull => notice,warning,error,verbose(3)\n",
            "http.conf": f"[general]\nenabled = yes\nbindaddr = 127.0.0.1\nbindport = {self.http_port}\n",
            "ari.conf": f"[general]\nenabled = yes\n[{self.ari_user}]\ntype = user\nread_only = no\n"
                        f"password = {self.ari_password}\npassword_format = plain\n",
            "rtp.conf": f"[general]\nrtpstart = {self.rtp_range[0]}\nrtpend = {self.rtp_range[1]}\n",
            "extensions.conf": f"[general]\nstatic = yes\nwriteprotect = yes\n\n{self.dialplan}",
            "indications.conf": "[general]\ncountry = us\n[us]\ndescription = United States\n"
                                "ring = 440+480/2000,0/4000\nbusy = 480+620/500,0/500\n",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
        (etc / "ari.conf").chmod(0o600)

    def start(self, timeout: float = 30.0) -> Asterisk:
        self._write_configuration()
        (self.workdir / "run" / "asterisk.ctl").unlink(missing_ok=True)
        with open(self.workdir / "console.log", "ab") as console:
            self.process = subprocess.Popen(
                [str(self.root / "sbin" / "asterisk"), "-C", str(self.conf), "-f", "-n"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, cwd=self.workdir,
                env=_environment(self.root), start_new_session=True)
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.process.poll() is not None:
                raise AsteriskUnavailable(f"Asterisk exited with {self.process.returncode} while starting:\n"
                                          f"{self.log_tail('console.log')}{self.log_tail('log/full')}")
            try:
                self.version = self.ari("GET", "/asterisk/info")["system"]["version"]
                break
            except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                self.stop()
                raise AsteriskUnavailable(f"ARI at {self.ari_url} did not answer in {timeout:g}s ({last})")
            time.sleep(0.1)
        self.cli("core waitfullybooted", timeout=max(1.0, deadline - time.monotonic()))
        return self

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "".join((self.workdir / name).read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def crash(self) -> None:
        """SIGKILL: what the engine sees when Asterisk dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def cli(self, command: str, timeout: float = 10.0) -> str:
        return subprocess.run([str(self.root / "sbin" / "asterisk"), "-C", str(self.conf), "-rx", command],
                              env=_environment(self.root), capture_output=True, text=True,
                              timeout=timeout).stdout

    def ari(self, method: str, path: str, body: dict[str, Any] | None = None,
            timeout: float = 5.0, **params: Any) -> Any:
        """One ARI request; the decoded JSON answer (None for 204). HTTP errors raise."""
        query = urllib.parse.urlencode(params)
        url = f"{self.ari_url}{path}" + (f"?{query}" if query else "")
        token = base64.b64encode(f"{self.ari_user}:{self.ari_password}".encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Basic {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

