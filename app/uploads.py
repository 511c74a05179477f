"""Validation of an audit's upload: archives, images, captions and labels, options.

Everything here works on files already spooled to disk and raises
:class:`app.errors.ServiceError` subclasses with a stable code that names the problem.
Nothing is stored by these functions except temporary files, which :class:`StagedUpload`
removes unless the caller commits them to the blob store.

Archive rules (docs/service.md, "Upload format"):

* A single ``archive`` holds ``published/`` and ``unpublished/`` folders, optionally inside
  one common top folder; two archives ``published`` and ``unpublished`` hold the images of
  one set each, optionally inside one top folder.
* Every other member is an error, except macOS and Windows metadata (``__MACOSX/``,
  ``.DS_Store``, ``._*``, ``Thumbs.db``, ``desktop.ini``), which archivers add unasked.
* Refused: ``..`` components, absolute paths and drive letters, symbolic links, encrypted
  members, duplicate names, nested archives (by name or by content), members that are not
  images, declared compression ratios above the limit, and totals above the limits.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from app import errors as E
from app.errors import BadInput, TooLarge
from app.forms import AuditOptionsForm
from app.settings import Settings
from app.spool import spool_prefix

ROLES = ("published", "unpublished")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp"})
ARCHIVE_SUFFIXES = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz", ".xz", ".txz", ".7z", ".rar", ".zst", ".lz",
     ".lzma", ".jar", ".cab", ".iso", ".z"}
)
#: Leading bytes of archive and compressed formats (tar's magic sits at offset 257).
ARCHIVE_MAGIC = (
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
    b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd", b"MSCF",
)
JUNK_DIRS = frozenset({"__MACOSX"})
JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
#: The image formats accepted, by their leading bytes: (format, ((offset, bytes), ...)), every
#: pair matching. A file with an image's suffix but none of these is not an image (a text file
#: named fake.png, an SVG), whatever Pillow could make of it.
IMAGE_SIGNATURES: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("GIF", ((0, b"GIF87a"),)),
    ("GIF", ((0, b"GIF89a"),)),
    ("WebP", ((0, b"RIFF"), (8, b"WEBP"))),
    ("TIFF", ((0, b"II*\x00"),)),
    ("TIFF", ((0, b"MM\x00*"),)),
    ("BMP", ((0, b"BM"),)),
)


def image_format(head: bytes) -> str | None:
    """The accepted image format whose signature ``head`` (a file's first bytes) carries, if any."""
    for name, pairs in IMAGE_SIGNATURES:
        if all(head[off:off + len(sig)] == sig for off, sig in pairs):
            return name
    return None


def upload_rules() -> dict[str, Any]:
    """What an upload must be, as data: the web page's preview applies exactly these rules
    (``GET /v1/upload-rules``) before anything is sent, so that it refuses what this module
    refuses."""
    from cdi.stats import check_sizes as _check

    def fewest(protocol: str, which: str) -> int:
        for n in range(1, 10_000):
            try:
                _check(n, 10_000, protocol) if which == "published" else _check(10_000, n, protocol)
                return n
            except Exception:
                continue
        raise AssertionError(f"no set size satisfies the {protocol} protocol")

    return {
        "image_suffixes": sorted(IMAGE_SUFFIXES),
        "archive_suffixes": sorted(ARCHIVE_SUFFIXES),
        "junk_dirs": sorted(JUNK_DIRS),
        "junk_files": sorted(JUNK_FILES),
        "junk_prefix": "._",
        "image_signatures": [{"format": name, "bytes": [{"offset": off, "hex": sig.hex()} for off, sig in pairs]}
                             for name, pairs in IMAGE_SIGNATURES],
        "minimum_images": {p: {"published": fewest(p, "published"), "unpublished": fewest(p, "unpublished")}
                           for p in ("directional", "crossfit", "reference")},
    }
#: Members smaller than this are exempt from the ratio check (tiny files compress oddly).
RATIO_EXEMPT_BYTES = 64 * 1024
_CHUNK = 1024 * 1024


# --- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRequestOptions:
    """The validated options (names, ranges and defaults: :class:`app.forms.AuditOptionsForm`)."""

    alpha: float
    protocol: str
    features: str
    seed: int
    sequential: bool
    looks: int
    spending: str
    futility: bool
    precision: str = "fp32"
    #: Images per batch, ``"auto"``, or ``None`` (the deployment's).
    batch_size: int | str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _option_error(exc: ValidationError) -> BadInput:
    err = exc.errors()[0]
    # A field of several types (batch_size: a number or "auto") names the type tried after the field.
    name = str(err["loc"][0]) if err["loc"] else "options"
    if err["type"] == "extra_forbidden":
        return BadInput(f"unknown option {name!r}", E.INVALID_OPTIONS)
    prop = AuditOptionsForm.model_json_schema()["properties"].get(name, {})
    allowed = ""
    if "enum" in prop:
        allowed = f" (one of {', '.join(prop['enum'])})"
    elif name == "alpha":
        allowed = " (0 < alpha < 0.5)"
    elif name == "seed":
        allowed = " (an integer, 0 ≤ seed < 2**32)"
    elif name == "batch_size":
        allowed = " (an integer from 1 to 1024, or auto)"
    elif name == "callback_url":
        allowed = " (an http or https URL)"
    return BadInput(f"{name}{allowed}: {err['msg'].lower()}, got {err.get('input')!r}", E.INVALID_OPTIONS)


def parse_options(fields: Mapping[str, str]) -> tuple[AuditRequestOptions, str | None]:
    """The audit options and callback URL from the form's text fields (absent or blank: the default)."""
    names = AuditOptionsForm.model_fields
    given = {k: v for k, v in fields.items() if k in names and v.strip() != ""}
    try:
        form = AuditOptionsForm.model_validate(given)
    except ValidationError as exc:
        raise _option_error(exc) from None
    if form.sequential and form.protocol != "directional":
        raise BadInput(f"sequential: a sequential audit uses the directional protocol, not {form.protocol}",
                       E.INVALID_OPTIONS)
    options = AuditRequestOptions(alpha=form.alpha, protocol=form.protocol, features=form.features, seed=form.seed,
                                  sequential=form.sequential, looks=form.looks, spending=form.spending,
                                  futility=form.futility, precision=form.precision,
                                  batch_size=form.batch_size if form.batch_size in (None, "auto")
                                  else int(str(form.batch_size)))
    return options, form.callback_url


def check_text_fields(fields: Mapping[str, str]) -> None:
    """Refuse control characters that no field can hold (a NUL cannot even be stored)."""
    for name, value in fields.items():
        if "\x00" in value:
            raise BadInput(f"form field {name!r} contains a NUL byte", E.INVALID_CHARACTERS)


def parse_retention(fields: Mapping[str, str], settings: Settings) -> bool:
    """``retain_images``: keep the uploaded images after the audit ends (default: the deployment's)."""
    raw = fields.get("retain_images")
    if raw is None or not raw.strip():
        return settings.retain_images
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise BadInput(f"retain_images must be true or false, got {raw!r}", E.INVALID_OPTIONS)


# --- archives -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An image member of an archive: its set, its file name and where it is."""

    role: str
    #: The member's file name (no folders): unique within its set.
    name: str
    archive: Path
    info: zipfile.ZipInfo


@dataclass
class StagedImage:
    role: str
    name: str
    path: Path
    sha256: str
    size: int


@dataclass
class StagedUpload:
    """Images decompressed to temporary files, waiting to be committed to the blob store."""

    images: list[StagedImage] = field(default_factory=list)
    captions: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None

    def count(self, role: str) -> int:
        return sum(1 for im in self.images if im.role == role)

    @property
    def total_bytes(self) -> int:
        return sum(im.size for im in self.images)

    def cleanup(self) -> None:
        for im in self.images:
            im.path.unlink(missing_ok=True)


def _is_junk(parts: tuple[str, ...]) -> bool:
    return parts[0] in JUNK_DIRS or parts[-1] in JUNK_FILES or parts[-1].startswith("._")


def _safe_parts(filename: str, archive_label: str) -> tuple[str, ...]:
    """The path components of a member name, refusing every way out of the extraction root."""
    if "\x00" in filename:
        raise BadInput(f"{archive_label}: member {filename!r} has a NUL byte in its name", E.UNSAFE_PATH)
    name = filename.replace("\\", "/")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":"):
        raise BadInput(f"{archive_label}: member {filename!r} has an absolute path", E.UNSAFE_PATH)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise BadInput(f"{archive_label}: member {filename!r} has a '..' component", E.UNSAFE_PATH)
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_ISLNK(mode)


def open_zip(path: Path, label: str) -> zipfile.ZipFile:
    """Open an archive, telling "not a zip" from "a damaged zip"."""
    with path.open("rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise BadInput(f"{label}: the zip file is corrupt (its central directory cannot be read)",
                           E.CORRUPT_ZIP)
        raise BadInput(f"{label}: not a zip file", E.NOT_A_ZIP)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{label}: the zip file is corrupt ({exc})", E.CORRUPT_ZIP) from None


def list_members(
    zf: zipfile.ZipFile, archive: Path, label: str, role: str | None, settings: Settings
) -> list[Member]:
    """The image members of one archive, after every check that needs no decompression.

    ``role`` is the set the archive holds (two-archive form) or ``None`` (one archive holding
    both folders).
    """
    infos = zf.infolist()
    if len(infos) > settings.max_archive_members:
        raise TooLarge(f"{label}: {len(infos)} members exceed the limit of {settings.max_archive_members}",
                       E.ARCHIVE_TOO_LARGE)
    entries: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
    seen: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _safe_parts(info.filename, label)
        if _is_symlink(info):
            raise BadInput(f"{label}: member {info.filename!r} is a symbolic link", E.SYMLINK_IN_ZIP)
        if not parts or info.is_dir():
            continue
        if _is_junk(parts):
            continue
        if info.flag_bits & 0x1:
            raise BadInput(f"{label}: member {info.filename!r} is encrypted", E.CORRUPT_ZIP)
        if parts in seen:
            raise BadInput(f"{label}: member {info.filename!r} appears twice", E.CORRUPT_ZIP)
        seen.add(parts)
        entries.append((parts, info))

    # One common top folder (what zipping a folder gives) is stripped, unless it is a set's.
    tops = {parts[0] for parts, _ in entries if len(parts) > 1}
    if (
        entries
        and len(tops) == 1
        and all(len(p) > 1 for p, _ in entries)
        and (role is not None or next(iter(tops)) not in ROLES)
    ):
        entries = [(parts[1:], info) for parts, info in entries]
    if role is not None:
        tops = {parts[0] for parts, _ in entries if len(parts) > 1}
        if len(tops) == 1 and next(iter(tops)) == role and all(len(p) > 1 for p, _ in entries):
            entries = [(parts[1:], info) for parts, info in entries]

    members: list[Member] = []
    for parts, info in entries:
        if role is None:
            if len(parts) < 2 or parts[0] not in ROLES:
                raise BadInput(
                    f"{label}: member {info.filename!r} is outside the published/ and unpublished/ folders",
                    E.UNEXPECTED_MEMBER,
                )
            member_role, rel = parts[0], parts[1:]
        else:
            member_role, rel = role, parts
        filename = rel[-1]
        suffix = PurePosixPath(filename).suffix.lower()
        if suffix in ARCHIVE_SUFFIXES:
            raise BadInput(f"{label}: member {info.filename!r} is an archive; nested archives are not "
                           "accepted", E.NESTED_ARCHIVE)
        if suffix not in IMAGE_SUFFIXES:
            raise BadInput(f"{label}: member {info.filename!r} is not an image (accepted: "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))})", E.NOT_AN_IMAGE)
        if info.file_size > settings.max_image_bytes:
            raise TooLarge(f"{label}: member {info.filename!r} is {info.file_size} bytes, above the limit of "
                           f"{settings.max_image_bytes} bytes per image", E.IMAGE_TOO_LARGE)
        if info.file_size > RATIO_EXEMPT_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > settings.max_compression_ratio:
                raise BadInput(
                    f"{label}: member {info.filename!r} expands {ratio:.0f}-fold, above the limit of "
                    f"{settings.max_compression_ratio:.0f} (zip bomb?)", E.ZIP_BOMB)
        members.append(Member(member_role, filename, archive, info))
    return members


def check_totals(members: list[Member], settings: Settings) -> None:
    seen: set[tuple[str, str]] = set()
    for m in members:
        if (m.role, m.name) in seen:
            raise BadInput(f"two {m.role} images are named {m.name!r} (in different folders); image names "
                           "must be unique within a set", E.DUPLICATE_NAME)
        seen.add((m.role, m.name))
    declared = sum(m.info.file_size for m in members)
    if declared > settings.max_uncompressed_bytes:
        raise TooLarge(
            f"the archives expand to {declared} bytes, above the limit of {settings.max_uncompressed_bytes} "
            "bytes (zip bomb?)", E.ZIP_BOMB)
    if len(members) > settings.max_images:
        raise TooLarge(f"{len(members)} images exceed the limit of {settings.max_images} per audit",
                       E.TOO_MANY_IMAGES)
    for role in ROLES:
        if not any(m.role == role for m in members):
            raise BadInput(f"the upload has no {role} images", E.MISSING_SET)


def check_sizes(n_published: int, n_unpublished: int, protocol: str) -> None:
    """The library's sample-size rule (method §7), turned into a stable service error."""
    from cdi.errors import InputError
    from cdi.stats import check_sizes as _check

    try:
        _check(n_published, n_unpublished, protocol)
    except InputError as exc:
        raise BadInput(str(exc), E.TOO_FEW_IMAGES) from None


def _check_image_file(path: Path, name: str, settings: Settings) -> None:
    """Header-level image check: Pillow recognises it, and its pixel count is within limits.

    Full decoding happens in the worker's "validating" stage, where a damaged image fails the
    audit with the image error's code; decoding every image here would put minutes of CPU
    work into the request.
    """
    from PIL import Image, UnidentifiedImageError

    with path.open("rb") as f:
        head = f.read(512)
    if any(head.startswith(m) for m in ARCHIVE_MAGIC) or head[257:262] == b"ustar":
        raise BadInput(f"{name} is an archive; nested archives are not accepted", E.NESTED_ARCHIVE)
    if image_format(head) is None:
        formats = ", ".join(dict.fromkeys(f for f, _ in IMAGE_SIGNATURES))
        raise BadInput(f"{name} is not an image file: its content is none of the accepted formats ({formats})",
                       E.NOT_AN_IMAGE)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "PNG":
                img.verify()  # chunk CRCs: cheap, and catches damaged files early
    except UnidentifiedImageError:
        raise BadInput(f"{name} is not an image file (Pillow cannot identify it)", E.NOT_AN_IMAGE) from None
    except Image.DecompressionBombError:
        raise TooLarge(f"{name} has more pixels than the limit of {settings.max_image_pixels}",
                       "image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"{name} is a damaged image ({exc})", "image_corrupt") from None
    if width * height > settings.max_image_pixels:
        raise TooLarge(f"{name}: {width}×{height} pixels exceed the limit of {settings.max_image_pixels}",
                       "image_too_large")
    if width <= 0 or height <= 0:
        raise BadInput(f"{name} has no pixels", "image_corrupt")


def extract_members(
    members: Iterable[Member], zipfiles: Mapping[Path, zipfile.ZipFile], tmp_dir: Path,
    settings: Settings, staged: StagedUpload,
) -> None:
    """Decompress each member to a temporary file while hashing and counting its bytes.

    The counts are of the bytes actually produced, not of the sizes the archive declares.
    Appends to ``staged`` as it goes, so the caller's cleanup also removes partial work.
    """
    import hashlib

    total = 0
    for m in members:
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=spool_prefix("img"))
        staged.images.append(StagedImage(m.role, m.name, Path(tmp), "", 0))
        try:
            with os.fdopen(fd, "wb") as out, zipfiles[m.archive].open(m.info) as src:
                while chunk := src.read(_CHUNK):
                    size += len(chunk)
                    total += len(chunk)
                    if size > m.info.file_size or total > settings.max_uncompressed_bytes:
                        raise TooLarge(f"{m.name} expands beyond its declared size or the limit "
                                       "(zip bomb?)", E.ZIP_BOMB)
                    if size > settings.max_image_bytes:
                        raise TooLarge(f"{m.name} is larger than the limit of {settings.max_image_bytes} bytes "
                                       "per image", E.IMAGE_TOO_LARGE)
                    h.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
            raise BadInput(f"{m.name}: the zip member is corrupt ({exc})", E.CORRUPT_ZIP) from None
        except OSError as exc:
            if "zlib" in str(exc).lower() or "decompress" in str(exc).lower():
                raise BadInput(f"{m.name}: the zip member is corrupt ({exc})", E.CORRUPT_ZIP) from None
            raise
        _check_image_file(Path(tmp), m.name, settings)
        staged.images[-1].sha256 = h.hexdigest()
        staged.images[-1].size = size


# --- captions and labels ------------------------------------------------------------------


def parse_conditions(data: bytes, filename: str, kind: str, images: Iterable[StagedImage]) -> dict[str, Any]:
    """Captions or labels keyed by image name, checked against the uploaded images.

    The format is the library's (:mod:`cdi.conditions`: CSV with a ``file,<kind>`` header, or
    JSONL), so a file that works with ``cdi audit`` works here. Beyond the library's checks:
    every name must be an uploaded image's, a name shared by a published and an unpublished
    image is refused (the file could not say which one it means), and labels must cover every
    image.
    """
    from cdi.conditions import parse_conditions as _parse
    from cdi.errors import InputError

    code = E.MALFORMED_CAPTIONS if kind == "caption" else E.MALFORMED_LABELS
    try:
        mapping = _parse(data, kind, f"the {kind}s file")  # type: ignore[arg-type]
    except InputError as exc:
        raise BadInput(str(exc), code) from None
    except (ValueError, TypeError, OverflowError) as exc:  # whatever hostile bytes make the parser raise
        raise BadInput(f"the {kind}s file cannot be read ({type(exc).__name__})", code) from None
    images = list(images)
    roles: dict[str, set[str]] = {}
    for im in images:
        roles.setdefault(im.name, set()).add(im.role)
    unknown = sorted(n for n in mapping if n not in roles)
    if unknown:
        raise BadInput(f"the {kind}s file names {len(unknown)} file(s) that are not among the uploaded images, "
                       f"e.g. {unknown[0]!r}", code)
    shared = sorted(n for n, r in roles.items() if len(r) > 1)
    if shared:
        raise BadInput(f"{shared[0]!r} is the name of a published and of an unpublished image: the {kind}s "
                       "file cannot tell them apart; rename one", code)
    if kind == "label":
        missing = sorted(n for n in roles if n not in mapping)
        if missing:
            raise BadInput(f"no label for {len(missing)} image(s), e.g. {missing[0]!r}", code)
    return dict(mapping)


# --- the whole upload ---------------------------------------------------------------------


def stage_upload(
    archives: Mapping[str, Path],
    settings: Settings,
    *,
    protocol: str,
    captions: tuple[bytes, str] | None = None,
    labels: tuple[bytes, str] | None = None,
) -> StagedUpload:
    """Validate the archives (``{"archive": p}`` or ``{"published": p, "unpublished": q}``).

    Returns the staged images, sorted by name within each set; on any error, removes what it
    staged and raises.
    """
    if set(archives) not in ({"archive"}, {"published", "unpublished"}):
        raise BadInput("send either one zip as 'archive' or two zips as 'published' and 'unpublished'",
                       E.MALFORMED_UPLOAD)
    tmp_dir = settings.upload_tmp_dir
    tmp_dir.mkdir(parents=True, exist_ok=True)
    staged = StagedUpload()
    opened: dict[Path, zipfile.ZipFile] = {}
    try:
        members: list[Member] = []
        for field_name, path in archives.items():
            label = f"'{field_name}'"
            zf = open_zip(path, label)
            opened[path] = zf
            role = None if field_name == "archive" else field_name
            members.extend(list_members(zf, path, label, role, settings))
        check_totals(members, settings)
        n_p = sum(1 for m in members if m.role == "published")
        check_sizes(n_p, len(members) - n_p, protocol)
        members.sort(key=lambda m: (ROLES.index(m.role), m.name))
        extract_members(members, opened, tmp_dir, settings, staged)
        if captions is not None:
            staged.captions = parse_conditions(captions[0], captions[1], "caption", staged.images)
        if labels is not None:
            staged.labels = parse_conditions(labels[0], labels[1], "label", staged.images)
        return staged
    except BaseException:
        staged.cleanup()
        raise
    finally:
        for zf in opened.values():
            zf.close()
