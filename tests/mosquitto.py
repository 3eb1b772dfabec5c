"""A real MQTT broker for the tests: Debian's mosquitto on a free port of
127.0.0.1, with a config file of its own (anonymous, or a password file;
plain or TLS with a throwaway CA), started, killed and started again on the
same port. ``.ci/run`` installs mosquitto; without it these tests skip and
say so, unless HALTLESS_REQUIRE_MOSQUITTO=1 (CI), where that is a failure.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def require_mosquitto() -> None:
    if not Path(MOSQUITTO).exists():
        if os.environ.get("HALTLESS_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"{MOSQUITTO} not found (apt-get install mosquitto)")
        pytest.skip(f"{MOSQUITTO} not found: apt-get install mosquitto to run the MQTT tests")


@dataclass
class TlsFiles:
    ca_pem: str
    ca: Path
    cert: Path
    key: Path
    cert_sha256: str  # of the broker's certificate, DER


def make_tls(d: Path, names=("localhost",), ips=("127.0.0.1",)) -> TlsFiles:
    """A throwaway CA and a broker certificate it signed for ``names`` and ``ips``."""
    import hashlib
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haltless test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    (d / "ca.crt").write_text(ca_pem)
    (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    for f in ("ca.crt", "server.crt", "server.key"):
        (d / f).chmod(0o644)
    sha = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return TlsFiles(ca_pem, d / "ca.crt", d / "server.crt", d / "server.key", sha)


class Mosquitto:
    """``mosquitto -c <dir>/mosquitto.conf`` on 127.0.0.1:``port``."""

    def __init__(self, d: Path, users: dict[str, str] | None = None, tls: TlsFiles | None = None,
                 extra: str = "") -> None:
        require_mosquitto()
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = d / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", f"log_dest file {self.log_path}",
                 "log_type all", "connection_messages true"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, who cannot read d
        if users:
            pw = d / "passwd"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True,
                               capture_output=True)
            pw.chmod(0o644)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        (d / "mosquitto.conf").write_text("\n".join(lines + [extra]) + "\n")

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')}\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: sessions, retained messages and in-flight messages are lost
        (no persistence), as when the broker's host dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the broker's sockets stay open but nothing answers, as
        when the network between us drops without a FIN or RST."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)  # if paused, it could not stop
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            self.proc.stderr.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
