"""`flowrun certs`: a CA with a server certificate, client certificates named by device."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodes._certs import main


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_and_device_write_a_chain_with_private_keys_0600(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path), "--host", "mqtt.example.org", "--host", "127.0.0.1"]) == 0
    assert main(["device", str(tmp_path), "home-01"]) == 0
    for key in ("ca.key", "server.key", "home-01.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600, key
    ca, server, device = (cert(tmp_path / n) for n in ("ca.crt", "server.crt", "home-01.crt"))
    device.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    cn = device.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "home-01"
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # TLS libraries accept them together: a client context with the device's pair
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    ctx.load_cert_chain(str(tmp_path / "home-01.crt"), str(tmp_path / "home-01.key"))


def test_init_again_keeps_the_ca(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path), "--host", "a"]) == 0
    first = (tmp_path / "ca.crt").read_bytes()
    assert main(["init", str(tmp_path), "--host", "b"]) == 0
    assert (tmp_path / "ca.crt").read_bytes() == first  # devices issued before stay valid


def test_refuses_a_device_id_that_is_not_a_topic_level(tmp_path: Path, capsys: object) -> None:
    assert main(["init", str(tmp_path), "--host", "a"]) == 0
    for bad in ("a/b", "home+1", "#", "", "x" * 65):
        assert main(["device", str(tmp_path), bad]) == 2, bad
    assert not list(tmp_path.glob("a*.crt"))


def test_device_without_a_ca_says_to_init(tmp_path: Path, capsys: object) -> None:
    assert main(["device", str(tmp_path / "none"), "home-01"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "flowrun certs init" in err
