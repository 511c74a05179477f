"""Upload validation (app.uploads): every bad-input case of the issue, without services."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app import errors as E
from app.errors import BadInput, ServiceError, TooLarge
from app.settings import Settings
from app.uploads import parse_options, stage_upload


def png(seed: int, size: int = 16) -> bytes:
    img = Image.new("L", (size, size), color=seed % 256)
    img.putpixel((seed % size, (seed // size) % size), 255 - seed % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def good_members(n_p: int = 6, n_u: int = 6, prefix: str = "") -> dict[str, bytes]:
    out = {f"{prefix}published/p{i:03d}.png": png(i) for i in range(n_p)}
    out.update({f"{prefix}unpublished/u{i:03d}.png": png(100 + i) for i in range(n_u)})
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_uncompressed_bytes=10 * 1024**2, max_images=100,
                    max_compression_ratio=50)


@pytest.fixture(autouse=True)
def _lenient_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library's sample-size rule is tested on its own (test_too_few_images); here any
    # non-empty sets pass, so each test exercises exactly the check it names.
    monkeypatch.setattr("app.uploads.check_sizes", lambda n_p, n_u, protocol: None)


def stage(settings: Settings, archives: dict[str, Path], **kw: object) -> object:
    return stage_upload(archives, settings, protocol="crossfit", **kw)  # type: ignore[arg-type]


def expect(code: str, settings: Settings, archives: dict[str, Path], exc: type[ServiceError] = BadInput,
           **kw: object) -> ServiceError:
    with pytest.raises(exc) as info:
        stage(settings, archives, **kw)
    assert info.value.code == code, info.value
    # Nothing left behind: the staging folder is empty after a refusal.
    tmp = settings.upload_tmp_dir
    assert not tmp.exists() or not any(tmp.iterdir())
    return info.value


# --- the good cases -------------------------------------------------------------------------


def test_one_archive_is_staged_in_name_order(tmp_path: Path, settings: Settings) -> None:
    staged = stage(settings, {"archive": write_zip(tmp_path / "a.zip", good_members())})
    names = [(im.role, im.name) for im in staged.images]  # type: ignore[attr-defined]
    assert names[0] == ("published", "p000.png") and names[-1] == ("unpublished", "u005.png")
    assert staged.count("published") == 6 and staged.count("unpublished") == 6  # type: ignore[attr-defined]
    for im in staged.images:  # type: ignore[attr-defined]
        import hashlib

        assert hashlib.sha256(im.path.read_bytes()).hexdigest() == im.sha256
    staged.cleanup()  # type: ignore[attr-defined]
    assert not any(settings.upload_tmp_dir.iterdir())


def test_a_common_top_folder_and_os_junk_are_accepted(tmp_path: Path, settings: Settings) -> None:
    members = good_members(prefix="demo/")
    members["demo/.DS_Store"] = b"junk"
    members["__MACOSX/demo/published/._p000.png"] = b"junk"
    staged = stage(settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert len(staged.images) == 12  # type: ignore[attr-defined]


def test_two_archives(tmp_path: Path, settings: Settings) -> None:
    pub = write_zip(tmp_path / "p.zip", {f"published/{i}.png": png(i) for i in range(5)})
    unpub = write_zip(tmp_path / "u.zip", {f"{i}.png": png(50 + i) for i in range(7)})
    staged = stage(settings, {"published": pub, "unpublished": unpub})
    assert staged.count("published") == 5 and staged.count("unpublished") == 7  # type: ignore[attr-defined]


# --- bad input: one test each ---------------------------------------------------------------


def test_not_a_zip(tmp_path: Path, settings: Settings) -> None:
    p = tmp_path / "x.zip"
    p.write_bytes(png(1))
    err = expect(E.NOT_A_ZIP, settings, {"archive": p})
    assert "not a zip" in err.message


def test_corrupt_zip_central_directory(tmp_path: Path, settings: Settings) -> None:
    data = write_zip(tmp_path / "a.zip", good_members()).read_bytes()
    p = tmp_path / "cut.zip"
    p.write_bytes(data[: len(data) // 2])
    expect(E.CORRUPT_ZIP, settings, {"archive": p})


def test_corrupt_zip_member_data(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    path = write_zip(tmp_path / "a.zip", members, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    # Flip bytes inside the first member's data: its CRC no longer matches.
    start = data.index(members["published/p000.png"][:16])
    data[start + 20 : start + 40] = bytes(20)
    path.write_bytes(bytes(data))
    expect(E.CORRUPT_ZIP, settings, {"archive": path})


def test_zip_bomb_ratio(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/bomb.png"] = b"\x00" * (5 * 1024**2)  # deflates ~1000-fold
    err = expect(E.ZIP_BOMB, settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert "bomb.png" in err.message


def test_zip_bomb_total_size(tmp_path: Path, settings: Settings) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    members = good_members()
    for i in range(3):  # incompressible: ~12 KB each, no ratio alarm
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        members[f"published/noise{i}.png"] = buf.getvalue()
    small = Settings(data_dir=settings.data_dir, max_uncompressed_bytes=20_000)
    err = expect(E.ZIP_BOMB, small, {"archive": write_zip(tmp_path / "a.zip", members)}, exc=TooLarge)
    assert "20000" in err.message


def test_dotdot_path(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/../../etc/evil.png"] = png(7)
    err = expect(E.UNSAFE_PATH, settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert ".." in err.message


@pytest.mark.parametrize("name", ["/published/abs.png", "C:/published/abs.png", "\\\\server\\x.png"])
def test_absolute_path(tmp_path: Path, settings: Settings, name: str) -> None:
    members = good_members()
    members[name] = png(7)
    expect(E.UNSAFE_PATH, settings, {"archive": write_zip(tmp_path / "a.zip", members)})


def test_symlink(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in good_members().items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("published/link.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    err = expect(E.SYMLINK_IN_ZIP, settings, {"archive": path})
    assert "link.png" in err.message


def test_nested_archive_by_name(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/more.zip"] = write_zip(tmp_path / "inner.zip", {"x.png": png(3)}).read_bytes()
    expect(E.NESTED_ARCHIVE, settings, {"archive": write_zip(tmp_path / "a.zip", members)})


def test_nested_archive_disguised_as_an_image(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/more.png"] = write_zip(tmp_path / "inner.zip", {"x.png": png(3)}).read_bytes()
    err = expect(E.NESTED_ARCHIVE, settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert "more.png" in err.message


def test_non_image_member_by_name(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/notes.txt"] = b"hello"
    err = expect(E.NOT_AN_IMAGE, settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert "notes.txt" in err.message


def test_non_image_member_by_content(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["unpublished/fake.jpg"] = b"this is not a jpeg at all" * 10
    err = expect(E.NOT_AN_IMAGE, settings, {"archive": write_zip(tmp_path / "a.zip", members)})
    assert "fake.jpg" in err.message


def test_member_outside_the_two_folders(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["extra/x.png"] = png(9)
    expect(E.UNEXPECTED_MEMBER, settings, {"archive": write_zip(tmp_path / "a.zip", members)})


def test_missing_set(tmp_path: Path, settings: Settings) -> None:
    members = {k: v for k, v in good_members().items() if k.startswith("published/")}
    expect(E.MISSING_SET, settings, {"archive": write_zip(tmp_path / "a.zip", members)})


def test_duplicate_names_within_a_set(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["published/sub/p000.png"] = png(77)
    expect(E.DUPLICATE_NAME, settings, {"archive": write_zip(tmp_path / "a.zip", members)})


def test_too_many_images(tmp_path: Path, settings: Settings) -> None:
    few = Settings(data_dir=settings.data_dir, max_images=10)
    expect(E.TOO_MANY_IMAGES, few, {"archive": write_zip(tmp_path / "a.zip", good_members())}, exc=TooLarge)


def test_too_few_images(tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import uploads

    monkeypatch.undo()  # the library's real rule
    path = write_zip(tmp_path / "a.zip", good_members(2, 2))
    with pytest.raises(BadInput) as info:
        uploads.stage_upload({"archive": path}, settings, protocol="crossfit")
    assert info.value.code == E.TOO_FEW_IMAGES


def test_oversized_image_dimensions(tmp_path: Path, settings: Settings) -> None:
    small = Settings(data_dir=settings.data_dir, max_image_pixels=100)
    err = expect("image_too_large", small, {"archive": write_zip(tmp_path / "a.zip", good_members())},
                 exc=TooLarge)
    assert "p000.png" in err.message


def test_wrong_field_combination(tmp_path: Path, settings: Settings) -> None:
    a = write_zip(tmp_path / "a.zip", good_members())
    expect(E.MALFORMED_UPLOAD, settings, {"archive": a, "published": a})
    expect(E.MALFORMED_UPLOAD, settings, {"published": a})


# --- captions and labels --------------------------------------------------------------------


def test_captions_csv_and_jsonl(tmp_path: Path, settings: Settings) -> None:
    a = write_zip(tmp_path / "a.zip", good_members())
    staged = stage(settings, {"archive": a}, captions=(b"file,caption\np000.png,a digit\n", "c.csv"))
    assert staged.captions == {"p000.png": "a digit"}  # type: ignore[attr-defined]
    staged.cleanup()  # type: ignore[attr-defined]
    jsonl = b'{"file": "u001.png", "caption": "another"}\n'
    staged = stage(settings, {"archive": a}, captions=(jsonl, "c.jsonl"))
    assert staged.captions == {"u001.png": "another"}  # type: ignore[attr-defined]
    staged.cleanup()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\x00not utf8",
        b"name,text\np000.png,x\n",  # wrong header
        b"file,caption\np000.png,x,extra\n",
        b'{"file": "p000.png"\n',  # broken JSON
        b"file,caption\nnot-uploaded.png,x\n",  # names no uploaded image
        b"file,caption\np000.png,x\np000.png,y\n",  # twice
    ],
)
def test_malformed_captions(tmp_path: Path, settings: Settings, data: bytes) -> None:
    a = write_zip(tmp_path / "a.zip", good_members())
    expect(E.MALFORMED_CAPTIONS, settings, {"archive": a}, captions=(data, "c.csv"))


def test_captions_cannot_name_a_file_in_both_sets(tmp_path: Path, settings: Settings) -> None:
    members = good_members()
    members["unpublished/p000.png"] = png(200)
    a = write_zip(tmp_path / "a.zip", members)
    expect(E.MALFORMED_CAPTIONS, settings, {"archive": a}, captions=(b"file,caption\np001.png,x\n", "c.csv"))


def test_labels_must_be_integers_and_cover_every_image(tmp_path: Path, settings: Settings) -> None:
    members = good_members(2, 2)
    a = write_zip(tmp_path / "a.zip", members)
    rows = "".join(f"{n.split('/')[-1]},{i}\n" for i, n in enumerate(members))
    staged = stage(settings, {"archive": a}, labels=(("file,label\n" + rows).encode(), "l.csv"))
    assert sorted(staged.labels.values()) == [0, 1, 2, 3]  # type: ignore[attr-defined]
    staged.cleanup()  # type: ignore[attr-defined]
    expect(E.MALFORMED_LABELS, settings, {"archive": a}, labels=(b"file,label\np000.png,zero\n", "l.csv"))
    expect(E.MALFORMED_LABELS, settings, {"archive": a}, labels=(b"file,label\np000.png,1\n", "l.csv"))


# --- options --------------------------------------------------------------------------------


def test_options_defaults_and_values() -> None:
    opts, cb = parse_options({})
    assert opts.to_dict() == {"alpha": 0.01, "protocol": "directional", "features": "verdict", "seed": 0,
                              "sequential": False, "looks": 4, "spending": "obrien-fleming", "futility": False,
                              "precision": "fp32", "batch_size": None}
    assert cb is None
    opts, cb = parse_options({"alpha": "0.05", "protocol": "reference", "features": "gradient-free",
                              "seed": "7", "callback_url": "https://example.org/hook", "precision": "bf16",
                              "batch_size": "64"})
    assert (opts.alpha, opts.protocol, opts.features, opts.seed) == (0.05, "reference", "gradient-free", 7)
    assert (opts.precision, opts.batch_size) == ("bf16", 64)
    assert parse_options({"batch_size": "auto", "features": "all"})[0].batch_size == "auto"
    assert cb == "https://example.org/hook"


@pytest.mark.parametrize(
    "fields",
    [{"alpha": "x"}, {"alpha": "0"}, {"alpha": "0.5"}, {"alpha": "1.5"}, {"alpha": "nan"}, {"protocol": "magic"},
     {"features": "some"}, {"seed": "1.5"}, {"seed": "-1"}, {"callback_url": "ftp://x"},
     {"callback_url": "not a url"}, {"sequential": "maybe"}, {"looks": "0"}, {"looks": "11"},
     {"spending": "haybittle"}, {"futility": "2"}, {"sequential": "true", "protocol": "crossfit"}],
)
def test_malformed_options(fields: dict[str, str]) -> None:
    with pytest.raises(BadInput) as info:
        parse_options(fields)
    assert info.value.code == E.INVALID_OPTIONS
