"""PacsConfig for the test Orthanc (STOW-RS, and C-STORE), and an Orthanc filter for a store-only account."""

from __future__ import annotations

from relaypacsd.config import PacsConfig, Secret
from relaypacsd.localorthanc import LocalOrthanc


def pacs_for(orthanc: LocalOrthanc, **kwargs: object) -> PacsConfig:
    """The test Orthanc as a DICOMweb PACS; `kwargs` override any field."""
    user, password = orthanc.auth or ("", "")
    kwargs.setdefault("username", user)
    kwargs.setdefault("password", Secret(password))
    kwargs.setdefault("url", orthanc.url)
    kwargs.setdefault("connect_timeout", 3.0)
    kwargs.setdefault("read_timeout", 30.0)
    return PacsConfig(name=str(kwargs.pop("name", "orthanc")), type=str(kwargs.pop("type", "orthanc")),
                      **kwargs)  # type: ignore[arg-type]


STORE_ONLY_FILTER = """
-- Orthanc calls this for every HTTP request: the account 'storeonly' may POST (STOW-RS) but nothing else.
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == 'storeonly' and method ~= 'POST' then
    return false
  end
  return true
end
"""


def cstore_pacs(orthanc: LocalOrthanc, **kw: object) -> PacsConfig:
    """The test Orthanc with its DICOM port too (C-STORE, C-ECHO); `kw` override any field."""
    base = dict(name="orthanc", type="orthanc", url=orthanc.url, username=orthanc.username or "",
                ae_title=orthanc.aet, dicom_host="127.0.0.1", dicom_port=orthanc.dicom_port,
                connect_timeout=3.0, read_timeout=30.0)  # heavy load may slow an answer
    base["password"] = Secret(orthanc.password or "")
    base.update(kw)
    return PacsConfig(**base)
