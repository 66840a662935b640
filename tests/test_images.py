"""Images from a folder or a .zip: unsafe paths and archives are refused with a
reason code, oversized images are refused before decoding, and every readable
image opens as RGB."""

import io
import os
import struct
import zipfile
import zlib

import pytest
from PIL import Image

from l2t import images
from l2t.images import ImageError, ImageSource, safe_relative


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


RED_PNG = png_bytes(Image.new("RGB", (6, 4), (255, 0, 0)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def make_zip(path, members: dict, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def error_of(fn, *args) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args)
    return info.value


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "red.png").write_bytes(RED_PNG)
    return root


# ---------------------------------------------------------------- folders


def test_folder_reads_size_and_rgb(folder):
    source = ImageSource(folder)
    assert source.size("sub/red.png") == (6, 4)
    img = source.open("sub/red.png")
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (6, 4), (255, 0, 0))
    # Windows separators and "./" are the same file
    assert source.size("sub\\red.png") == (6, 4)
    assert source.size("./sub/./red.png") == (6, 4)


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "/etc/passwd", "C:\\images\\a.png", "", "   "])
def test_unsafe_paths_are_refused(folder, path):
    (folder.parent / "secret.png").write_bytes(RED_PNG)
    err = error_of(ImageSource(folder).size, path)
    assert err.code == "image_path_unsafe"


def test_safe_relative_cleans_paths():
    assert str(safe_relative("./a//b/./c.png")) == "a/b/c.png"
    assert str(safe_relative("a\\b.png")) == "a/b.png"


def test_symlink_out_of_the_folder_is_refused(folder):
    outside = folder.parent / "outside.png"
    outside.write_bytes(RED_PNG)
    os.symlink(outside, folder / "link.png")
    err = error_of(ImageSource(folder).size, "link.png")
    assert err.code == "image_path_unsafe"
    assert "resolves outside the image folder" in str(err)


def test_missing_file_and_missing_root(folder, tmp_path):
    err = error_of(ImageSource(folder).size, "sub/blue.png")
    assert (err.code, str(err)) == ("image_missing", f"image file 'sub/blue.png' not found under {folder}")
    assert error_of(ImageSource(folder).size, "sub").code == "image_missing"  # a folder is not an image
    err = error_of(ImageSource, tmp_path / "nowhere")
    assert err.code == "image_root_missing"


def test_unreadable_file_is_an_image_error(folder, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(folder), "read_bytes", refuse)
    err = error_of(ImageSource(folder).size, "sub/red.png")
    assert (err.code, str(err)) == ("image_unreadable", "image 'sub/red.png' could not be read (Permission denied)")


# ---------------------------------------------------------------- broken images


def test_zero_byte_image(folder):
    (folder / "empty.png").write_bytes(b"")
    err = error_of(ImageSource(folder).size, "empty.png")
    assert (err.code, str(err)) == ("image_unreadable", "image 'empty.png' is an empty file")


def test_truncated_png(folder):
    noise = Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12)
    data = png_bytes(noise)
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    source = ImageSource(folder)
    assert error_of(source.size, "cut.png").code == "image_unreadable"
    assert error_of(source.open, "cut.png").code == "image_unreadable"


def test_text_file_named_jpg(folder):
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n")
    err = error_of(ImageSource(folder).size, "notes.jpg")
    assert err.code == "image_unreadable"
    assert str(err).startswith("image 'notes.jpg' is not a readable image (UnidentifiedImageError")


# ---------------------------------------------------------------- pixel and byte limits


def test_20000_by_20000_is_refused_from_its_header(folder):
    # The pixel data is 16 zero bytes: decoding it would fail as truncated, so
    # image_too_large shows that only the header was read.
    (folder / "huge.png").write_bytes(png_header_only(20_000, 20_000))
    err = error_of(ImageSource(folder).size, "huge.png")
    assert err.code == "image_too_large"
    assert "400000000 pixels" in str(err)


def test_pixel_limit_is_checked_before_decoding(folder):
    (folder / "big.png").write_bytes(png_header_only(9_000, 6_000))
    source = ImageSource(folder, max_pixels=50_000_000)
    err = error_of(source.size, "big.png")
    assert (err.code, str(err)) == ("image_too_large", "image 'big.png' is 9000x6000 = 54,000,000 pixels, over the limit of 50,000,000")
    assert error_of(source.open, "big.png").code == "image_too_large"


def test_small_pixel_limit(folder):
    source = ImageSource(folder, max_pixels=23)
    err = error_of(source.size, "sub/red.png")
    assert str(err) == "image 'sub/red.png' is 6x4 = 24 pixels, over the limit of 23"
    assert ImageSource(folder, max_pixels=24).size("sub/red.png") == (6, 4)


def test_file_byte_limit(folder, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10)
    err = error_of(ImageSource(folder).size, "sub/red.png")
    assert err.code == "image_too_large"
    assert "MiB file, over the limit" in str(err)


# ---------------------------------------------------------------- colour modes


def opened(folder, name: str, image: Image.Image, fmt: str = "PNG") -> Image.Image:
    image.save(folder / name, fmt)
    return ImageSource(folder).open(name)


@pytest.mark.parametrize(
    "name, image, fmt, pixel",
    [
        ("gray.png", Image.new("L", (3, 3), 100), "PNG", (100, 100, 100)),
        ("bw.png", Image.new("1", (3, 3), 1), "PNG", (255, 255, 255)),
        ("cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        ("half.png", Image.new("RGBA", (3, 3), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        ("clear.png", Image.new("RGBA", (3, 3), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        ("gray-alpha.png", Image.new("LA", (3, 3), (0, 255)), "PNG", (0, 0, 0)),
        ("gray16.png", Image.new("I;16", (3, 3), 40_000), "PNG", (156, 156, 156)),  # 40000 / 257
        ("photo.webp", Image.new("RGB", (8, 8), (0, 0, 255)), "WEBP", None),
    ],
)
def test_modes_open_as_rgb(folder, name, image, fmt, pixel):
    img = opened(folder, name, image, fmt)
    assert img.mode == "RGB" and img.size == image.size
    if pixel is not None:
        assert img.getpixel((1, 1)) == pixel


def test_palette_images_open_as_rgb(folder):
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    assert opened(folder, "palette.png", palette).getpixel((0, 0)) == (0, 255, 0)
    palette.info["transparency"] = 1
    assert opened(folder, "palette-clear.png", palette).getpixel((0, 0)) == (255, 255, 255)
    gif = Image.new("P", (3, 3), 1)
    gif.putpalette([0, 0, 0, 0, 0, 255])
    assert opened(folder, "anim.gif", gif, "GIF").getpixel((2, 2)) == (0, 0, 255)


# ---------------------------------------------------------------- zip archives


def test_zip_is_read_in_place(tmp_path):
    archive = make_zip(tmp_path / "images.zip", {"imgs/": b"", "imgs/red.png": RED_PNG, "imgs\\win.png": RED_PNG})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    source = ImageSource(archive)
    assert source.size("imgs/red.png") == (6, 4)
    assert source.open("./imgs/red.png").getpixel((0, 0)) == (255, 0, 0)
    assert source.size("imgs/win.png") == (6, 4)  # a member written on Windows
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted
    err = error_of(source.size, "imgs/blue.png")
    assert (err.code, str(err)) == ("image_missing", "image 'imgs/blue.png' is not in archive images.zip")
    assert error_of(source.size, "../imgs/red.png").code == "image_path_unsafe"


@pytest.mark.parametrize("member", ["../evil.png", "imgs/../../evil.png", "/etc/evil.png"])
def test_zip_slip_and_absolute_members_refuse_the_archive(tmp_path, member):
    archive = make_zip(tmp_path / "bad.zip", {"ok.png": RED_PNG, member: RED_PNG})
    err = error_of(ImageSource, archive)
    assert err.code == "archive_unsafe_member"
    assert str(err) == f"{archive}: member '{member}' has an absolute path or '..'; archive refused"


def test_zip_symlink_member_refuses_the_archive(tmp_path):
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("ok.png", RED_PNG)
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        out.writestr(link, "/etc/passwd")
    err = error_of(ImageSource, archive)
    assert (err.code, str(err)) == ("archive_unsafe_member", f"{archive}: member 'link.png' is a symbolic link; archive refused")


def test_zip_bomb_is_refused_from_the_declared_sizes(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "bomb.zip", {"a.png": b"\0" * 2_000_000, "b.png": b"\0" * 2_000_000})
    assert archive.stat().st_size < 20_000  # highly compressible
    monkeypatch.setattr(images, "MAX_ARCHIVE_BYTES", 3_000_000)
    err = error_of(ImageSource, archive)
    assert err.code == "archive_too_large"
    assert str(err).startswith(f"{archive}: members would unpack to ")


def test_zip_member_over_the_byte_limit_is_not_read(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "big.zip", {"big.png": b"\0" * 1_000_000})
    source = ImageSource(archive)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100_000)
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *a: pytest.fail("the member was read"))
    assert error_of(source.size, "big.png").code == "image_too_large"


def test_zip_with_too_many_members(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "many.zip", {f"{i}.png": RED_PNG for i in range(3)})
    monkeypatch.setattr(images, "MAX_ARCHIVE_MEMBERS", 2)
    assert error_of(ImageSource, archive).code == "archive_too_large"


@pytest.mark.parametrize("content", [b"PK\x03\x04 this is not really a zip", b"", b"hello"])
def test_corrupt_zip(tmp_path, content):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(content)
    err = error_of(ImageSource, archive)
    assert err.code == "archive_corrupt"
    assert str(err).startswith(f"{archive}: not a readable .zip archive")


def test_zip_member_with_corrupt_data(tmp_path):
    archive = make_zip(tmp_path / "crc.zip", {"red.png": RED_PNG}, compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    at = raw.index(RED_PNG[20:40])
    raw[at : at + 20] = bytes(20)  # damage the member's bytes, not the directory
    archive.write_bytes(bytes(raw))
    err = error_of(ImageSource(archive).size, "red.png")
    assert err.code == "image_unreadable"


def test_zero_byte_member(tmp_path):
    archive = make_zip(tmp_path / "empty.zip", {"empty.png": b""})
    err = error_of(ImageSource(archive).size, "empty.png")
    assert (err.code, str(err)) == ("image_unreadable", "image 'empty.png' is an empty file")
