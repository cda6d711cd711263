#!/usr/bin/env python3
"""BMP, GIF, TIFF and Netpbm files (and animated WebP) give PIL's pixels, and class folders are read as torchvision's
ImageFolder reads them.

The trunk here is the identity (pooling flatten): a cache row is the image's pixels / 255, so
each file's decoded pixels are compared, exactly, with PIL's Image.open(path).convert("RGB")
(mean 0, std 1: a feature times 255 is the pixel value).

  * files PIL writes: BMP, GIF, TIFF (none, LZW, Deflate, PackBits, JPEG, CCITT G3 and G4
    compression) and PPM of RGB, grey, 1-bit, palette and alpha images; a CMYK TIFF; animated
    GIF and WebP files (the first frame, as PIL);
  * files written byte by byte, each a case PIL's readers have a rule for: BMP (OS/2 and V5
    headers, top-down rows, 1/4/8-bit palettes short, grey and coloured, 16-bit 5-5-5 and
    5-6-5, 32-bit bit-field layouts, RLE8 with deltas and RLE4); GIF (a first frame smaller than
    the screen, offset, with a transparent index, its own palette, an identity palette, no
    palette, a frame that grows the image, interlaced); TIFF (1/2/4-bit grey both ways round,
    palettes, fill order 2, big-endian, 16-bit RGB, alpha associated and not, planar, tiled,
    several pages, the eight orientations, which PIL applies as it loads); PBM, PGM, PPM plain
    and binary, maxval below 255 and above (rounded half to even, as PIL);
  * 16-bit grey (TIFF, PGM): the high byte of PIL's 16-bit value, where PIL's convert("RGB")
    clips at 255;
  * what neither reads (2-bit BMP, JPEG inside a BMP, an unknown bit-field layout), what canopy
    does not read (floating-point, YCbCr without JPEG, 5-band TIFFs), and cut or damaged files:
    refused, naming the file;
  * a class folder of every kind, with GIF, PBM and HEIC files among them: the cache's rows and
    classes are torchvision ImageFolder's samples, in its order, with its loader's pixels; the
    images ImageFolder leaves out are left out and counted in the log;
  * `canopy check` over that folder: every image reads, one shape; with three damaged files and
    an image of another size added, all four are named at once, exit 1.
"""
import csv
import os
import struct
import subprocess
import sys

import numpy as np

from support import check, finish, start

W, H = 37, 21


def identity_trunk():
    import torch

    class Pixels(torch.nn.Module):
        def forward(self, x):
            return x

    return Pixels()


def config(work, trunk, name, data):
    path = os.path.join(work, name + ".ini")
    with open(path, "w") as f:
        f.write(f"""[data]
{data}

[preprocess]
channels = 3
mean = 0
std = 1

[trunk]
allow_unpinned = true
path = {trunk}
device = cpu
pooling = flatten

[cache]
path = {work}/{name}
batch_size = 8
""")
    return path


def pil_pixels(path):
    """PIL's Image.open(path).convert("RGB") as [3, H, W] ints; 16-bit grey as its high byte."""
    from PIL import Image
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # "I": PIL's 32-bit grey of a PGM above 8 bits, its values scaled to 0-65535
        a = np.asarray(im).astype(np.int64) >> 8
        return np.repeat(a[None], 3, 0)
    return np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Writers of the hand-made files.

def bmp(path, w, h, bits, rows=None, palette=None, comp=0, hsize=40, masks=None, topdown=False, raw=None):
    pad = 3 if hsize == 12 else 4
    pal = b"" if palette is None else b"".join(bytes([b, g, r] + [0] * (pad - 3)) for r, g, b in palette)
    stride = ((w * bits + 31) >> 3) & ~3
    data = raw if raw is not None else b"".join(r.ljust(stride, b"\0") for r in (rows if topdown else rows[::-1]))
    extra = b""
    if hsize == 12:
        hdr = struct.pack("<IHHHH", 12, w, h, 1, bits)
    else:
        hdr = struct.pack("<IiiHHIIiiII", hsize, w, -h if topdown else h, 1, bits, comp, len(data), 2835, 2835,
                          len(palette) if palette else 0, 0)
        if masks is not None and hsize == 40:
            extra = b"".join(struct.pack("<I", m) for m in masks[:3])
        elif hsize > 40:
            hdr += struct.pack("<IIII", *(list(masks or ()) + [0] * 4)[:4]) + b"\0" * (hsize - 56)
    off = 14 + len(hdr) + len(extra) + len(pal)
    with open(path, "wb") as f:
        f.write(b"BM" + struct.pack("<IHHI", off + len(data), 0, 0, off) + hdr + extra + pal + data)


def pack_bits(a, bits):
    """Rows of `bits`-bit samples, most significant first, each row whole bytes."""
    out = bytearray()
    for r in a:
        v = n = 0
        for x in r:
            v, n = (v << bits) | int(x), n + bits
            if n == 8:
                out.append(v)
                v = n = 0
        if n:
            out.append(v << (8 - n))
    return bytes(out)


def rle8(rows):
    """RLE8 of rows (file order): runs of equal indices, absolute runs of 3-5 (odd ones padded),
    single indices as runs of 1; an end of row after each row and an end of image."""
    out = b""
    for r in rows:
        r, x = list(r), 0
        while x < len(r):
            n = 1
            while x + n < len(r) and r[x + n] == r[x] and n < 255:
                n += 1
            if n > 1:
                out += bytes([n, r[x]])
            else:
                n = min(len(r) - x, 5)
                if n >= 3:
                    out += bytes([0, n]) + bytes(r[x:x + n]) + (b"\0" if n % 2 else b"")
                else:
                    n = 1
                    out += bytes([1, r[x]])
            x += n
        out += b"\0\0"
    return out + b"\0\1"


def rle4(rows):
    out = b""
    for r in rows:
        r, x = list(r), 0
        while x < len(r):
            if x + 4 <= len(r):
                out += bytes([0, 4, (r[x] << 4) | r[x + 1], (r[x + 2] << 4) | r[x + 3]])
                x += 4
            else:
                out += bytes([1, r[x] << 4])
                x += 1
        out += b"\0\0"
    return out + b"\0\1"


def gif(path, sw, sh, gpal, frames):
    """A GIF89a; frames: (left, top, w, h, local palette or None, transparent index or None,
    indices [h, w], interlaced). LZW as 9-bit codes with a clear code every 250 pixels."""
    b = b"GIF89a" + struct.pack("<HHBBB", sw, sh, 0x87 if gpal is not None else 0, 0, 0)
    if gpal is not None:
        b += bytes(np.array(gpal, np.uint8).ravel()).ljust(768, b"\0")
    for (x, y, w, h, lpal, trans, idx, interlaced) in frames:
        if trans is not None:
            b += b"\x21\xf9\x04\x01\0\0" + bytes([trans]) + b"\0"
        b += b"," + struct.pack("<HHHHB", x, y, w, h, (0x87 if lpal is not None else 0) | (0x40 if interlaced else 0))
        if lpal is not None:
            b += bytes(np.array(lpal, np.uint8).ravel()).ljust(768, b"\0")
        rows = list(range(h))
        if interlaced:
            rows = [r for start, step in ((0, 8), (4, 8), (2, 4), (1, 2)) for r in range(start, h, step)]
        codes = []
        for i, v in enumerate(idx[rows].ravel()):
            if i % 250 == 0:
                codes.append(256)
            codes.append(int(v))
        codes.append(257)
        acc = n = 0
        data = bytearray()
        for c in codes:
            acc, n = acc | (c << n), n + 9
            while n >= 8:
                data.append(acc & 255)
                acc, n = acc >> 8, n - 8
        if n:
            data.append(acc)
        b += b"\x08" + b"".join(bytes([len(data[i:i + 255])]) + bytes(data[i:i + 255])
                               for i in range(0, len(data), 255)) + b"\0"
    with open(path, "wb") as f:
        f.write(b + b";")


def tiff(path, w, h, bits, spp, photometric, blocks, tiles=None, planar=1, extra=None, cmap=None, be=False,
         fmt=1, fillorder=1, orientation=None, pages=1):
    """An uncompressed TIFF; blocks: its strips (one per plane) or tiles, in order."""
    e = ">" if be else "<"
    tags = {256: (4, [w]), 257: (4, [h]), 258: (3, [bits] * spp), 259: (3, [1]), 262: (3, [photometric]),
            277: (3, [spp]), 284: (3, [planar])}
    if fillorder != 1:
        tags[266] = (3, [fillorder])
    if orientation:
        tags[274] = (3, [orientation])
    if fmt != 1:
        tags[339] = (3, [fmt] * spp)
    if extra is not None:
        tags[338] = (3, extra)
    if cmap is not None:
        tags[320] = (3, cmap)
    offsets_tag = 324 if tiles else 273
    if tiles:
        tags[322], tags[323] = (4, [tiles[0]]), (4, [tiles[1]])
    else:
        tags[278] = (4, [h])
    tags[325 if tiles else 279] = (4, [len(b) for b in blocks])  # TileByteCounts, StripByteCounts
    body = bytearray(b"MM\0*" if be else b"II*\0") + bytearray(4)
    next_pointer = 4
    for _ in range(pages):
        offsets = []
        for blk in blocks:
            offsets.append(len(body))
            body += blk + (b"\0" if len(blk) % 2 else b"")
        tags[offsets_tag] = (4, offsets)
        ifd_at = len(body)
        struct.pack_into(e + "I", body, next_pointer, ifd_at)
        entries = sorted(tags.items())
        ifd, tail = bytearray(struct.pack(e + "H", len(entries))), bytearray()
        tail_at = ifd_at + 2 + 12 * len(entries) + 4
        for t, (typ, vals) in entries:
            raw = b"".join(struct.pack(e + ("H" if typ == 3 else "I"), int(v)) for v in vals)
            if len(raw) <= 4:
                ifd += struct.pack(e + "HHI", t, typ, len(vals)) + raw.ljust(4, b"\0")
            else:
                ifd += struct.pack(e + "HHII", t, typ, len(vals), tail_at + len(tail))
                tail += raw + (b"\0" if len(raw) % 2 else b"")
        next_pointer = ifd_at + len(ifd)
        body += ifd + bytearray(4) + tail
    with open(path, "wb") as f:
        f.write(bytes(body))


def tiles_of(a, size=16):
    out = []
    for y in range(0, a.shape[0], size):
        for x in range(0, a.shape[1], size):
            t = np.zeros((size, size) + a.shape[2:], a.dtype)
            part = a[y:y + size, x:x + size]
            t[:part.shape[0], :part.shape[1]] = part
            out.append(t.tobytes())
    return out


def pnm(path, magic, maxval, data):
    head = f"{magic}\n# written by the test\n{W} {H}\n" + (f"{maxval}\n" if maxval else "")
    with open(path, "wb") as f:
        f.write(head.encode() + data)


def write_files(d):
    """Every file the check reads, and those it expects refused: {name: reason}."""
    from PIL import Image
    rng = np.random.default_rng(7)
    os.makedirs(d, exist_ok=True)
    rgb_a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb = Image.fromarray(rgb_a)
    grey = rgb.convert("L")
    for name, im in {"rgb": rgb, "L": grey, "1": grey.convert("1"), "P": rgb.convert("P"), "P16": rgb.quantize(16),
                     "RGBA": rgb.convert("RGBA"), "LA": grey.convert("LA")}.items():
        if name not in ("LA",):
            im.save(f"{d}/pil_{name}.bmp")
        im.save(f"{d}/pil_{name}.gif")
        for comp in ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits"):
            im.save(f"{d}/pil_{name}_{comp}.tif", compression=comp)
        if name in ("rgb", "L", "1"):
            im.save(f"{d}/pil_{name}.ppm")
    rgb.save(f"{d}/pil_jpeg.tif", compression="jpeg")
    grey.save(f"{d}/pil_grey_jpeg.tif", compression="jpeg")
    grey.convert("1").save(f"{d}/pil_g3.tif", compression="group3")
    grey.convert("1").save(f"{d}/pil_g4.tif", compression="group4")
    rgb.convert("CMYK").save(f"{d}/pil_cmyk.tif")
    frames = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert("P") for _ in range(3)]
    frames[0].save(f"{d}/pil_animated.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(f"{d}/pil_interlaced.gif", interlace=True)
    frames[0].save(f"{d}/pil_transparent.gif", transparency=5)
    Image.fromarray(rng.integers(0, 65536, (H, W), dtype=np.uint16)).save(f"{d}/pil_grey16.tif")
    # Animated WebP: the first frame on the canvas (libwebp's animation decoder, as PIL).
    moving = [np.asarray(frames[0].convert("RGB")).copy() for _ in range(4)]
    for k, m in enumerate(moving[1:]):
        m[5:9, 3 + k:12 + k] = rng.integers(0, 256, (4, 9, 3))
    moving = [Image.fromarray(m) for m in moving]
    moving[0].save(f"{d}/pil_animated_lossless.webp", save_all=True, append_images=moving[1:], lossless=True)
    moving[0].save(f"{d}/pil_animated_lossy.webp", save_all=True, append_images=moving[1:], quality=70)
    alpha = [m.convert("RGBA") for m in moving]
    for m in alpha:
        m.putalpha(Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)))
    alpha[0].save(f"{d}/pil_animated_alpha.webp", save_all=True, append_images=alpha[1:], lossless=True)
    moving[0].save(f"{d}/pil_animated_background.webp", save_all=True, append_images=moving[1:], lossless=True,
                   background=(255, 0, 0, 128))

    # BMP
    pal = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(256)]
    idx8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    idx4 = rng.integers(0, 16, (H, W), dtype=np.uint8)
    idx1 = rng.integers(0, 2, (H, W), dtype=np.uint8)
    rows8 = [r.tobytes() for r in idx8]
    bmp(f"{d}/bmp_p8.bmp", W, H, 8, rows8, pal)
    bmp(f"{d}/bmp_p8_top_down.bmp", W, H, 8, rows8, pal, topdown=True)
    bmp(f"{d}/bmp_p8_short_palette.bmp", W, H, 8, rows8, pal[:20])  # indices past it: black
    bmp(f"{d}/bmp_p8_grey.bmp", W, H, 8, rows8, [(i, i, i) for i in range(256)])
    bmp(f"{d}/bmp_p8_grey_short.bmp", W, H, 8, rows8, [(i, i, i) for i in range(100)])  # PIL: the index
    bmp(f"{d}/bmp_os2.bmp", W, H, 8, rows8, pal, hsize=12)
    bmp(f"{d}/bmp_v5.bmp", W, H, 8, rows8, pal, hsize=124)
    bmp(f"{d}/bmp_p4.bmp", W, H, 4, [pack_bits([r], 4) for r in idx4], pal[:16])
    bmp(f"{d}/bmp_p4_grey.bmp", W, H, 4, [pack_bits([r], 4) for r in idx4], [(i * 17,) * 3 for i in range(16)])
    bmp(f"{d}/bmp_p1_black_white.bmp", W, H, 1, [pack_bits([r], 1) for r in idx1], [(0, 0, 0), (255, 255, 255)])
    bmp(f"{d}/bmp_p1_white_black.bmp", W, H, 1, [pack_bits([r], 1) for r in idx1], [(255, 255, 255), (0, 0, 0)])
    bmp(f"{d}/bmp_p1_colour.bmp", W, H, 1, [pack_bits([r], 1) for r in idx1], [(200, 10, 10), (10, 10, 200)])
    px = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rows32 = [r.tobytes() for r in px]
    bmp(f"{d}/bmp_24.bmp", W, H, 24, [r[:, :3].tobytes() for r in px])
    bmp(f"{d}/bmp_32.bmp", W, H, 32, rows32)
    for i, m in enumerate([(0xFF0000, 0xFF00, 0xFF, 0), (0xFF000000, 0xFF0000, 0xFF00, 0),
                           (0xFF, 0xFF00, 0xFF0000, 0xFF000000), (0xFF000000, 0xFF00, 0xFF, 0xFF0000), (0, 0, 0, 0)]):
        bmp(f"{d}/bmp_bitfields32_{i}.bmp", W, H, 32, rows32, comp=3, hsize=108, masks=m)
    bmp(f"{d}/bmp_bitfields32_v3.bmp", W, H, 32, rows32, comp=3, masks=(0xFF0000, 0xFF00, 0xFF))
    v16 = rng.integers(0, 65536, (H, W), dtype="<u2")
    bmp(f"{d}/bmp_16.bmp", W, H, 16, [r.tobytes() for r in v16])
    bmp(f"{d}/bmp_565.bmp", W, H, 16, [r.tobytes() for r in v16], comp=3, masks=(0xF800, 0x7E0, 0x1F))
    bmp(f"{d}/bmp_555_v4.bmp", W, H, 16, [r.tobytes() for r in v16], comp=3, hsize=108, masks=(0x7C00, 0x3E0, 0x1F))
    runs = np.repeat(rng.integers(0, 256, (H, W // 3 + 1), dtype=np.uint8), 3, axis=1)[:, :W]
    bmp(f"{d}/bmp_rle8.bmp", W, H, 8, palette=pal, comp=1, raw=rle8(runs[::-1]))
    # A delta (3 right, 1 up) after a run of 3: the skipped pixels are index 0.
    bmp(f"{d}/bmp_rle8_delta.bmp", W, H, 8, palette=pal, comp=1,
        raw=b"\x03\x05\x00\x02\x03\x01\x02\x07\x00\x00" + rle8(runs[::-1][2:]))
    bmp(f"{d}/bmp_rle4.bmp", W, H, 4, palette=pal[:16], comp=2, raw=rle4(idx4[::-1]))

    # GIF
    gp = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(256)]
    lp = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(256)]
    idx = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    gif(f"{d}/gif_offset.gif", W, H, gp, [(3, 4, 17, 13, None, None, idx, False)])
    gif(f"{d}/gif_offset_transparent.gif", W, H, gp, [(3, 4, 17, 13, None, 2, idx, False)])
    gif(f"{d}/gif_local_palette.gif", W, H, gp, [(3, 4, 17, 13, lp, None, idx, True)])
    # A frame's own palette that is the identity: PIL takes the file's palette instead.
    gif(f"{d}/gif_identity_palette.gif", W, H, gp, [(3, 4, 17, 13, [(i, i, i) for i in range(256)], None, idx, False)])
    gif(f"{d}/gif_identity_palette_alone.gif", W, H, None, [(3, 4, 17, 13, [(i, i, i) for i in range(256)], None, idx, False)])
    gif(f"{d}/gif_no_palette.gif", W, H, None, [(3, 4, 17, 13, None, None, idx, False)])
    gif(f"{d}/gif_grows.gif", 20, 9, gp, [(W - 17, H - 13, 17, 13, None, None, idx, False)])
    gif(f"{d}/gif_two_frames.gif", W, H, gp, [(3, 4, 17, 13, None, None, idx, True), (0, 0, 17, 13, lp, None, idx, False)])

    # TIFF
    g = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    tiff(f"{d}/tif_grey8.tif", W, H, 8, 1, 1, [g.tobytes()])
    tiff(f"{d}/tif_grey8_white_is_zero.tif", W, H, 8, 1, 0, [g.tobytes()])
    tiff(f"{d}/tif_three_pages.tif", W, H, 8, 1, 1, [g.tobytes()], pages=3)
    for bits in (1, 2, 4):
        a = rng.integers(0, 1 << bits, (H, W), dtype=np.uint8)
        tiff(f"{d}/tif_grey{bits}.tif", W, H, bits, 1, 1, [pack_bits(a, bits)])
        tiff(f"{d}/tif_grey{bits}_white_is_zero.tif", W, H, bits, 1, 0, [pack_bits(a, bits)])
        tiff(f"{d}/tif_palette{bits}.tif", W, H, bits, 1, 3, [pack_bits(a, bits)],
             cmap=rng.integers(0, 65536, 3 << bits))
    a = rng.integers(0, 2, (H, W), dtype=np.uint8)
    tiff(f"{d}/tif_fill_order2.tif", W, H, 1, 1, 1, [bytes(int(f"{b:08b}"[::-1], 2) for b in pack_bits(a, 1))],
         fillorder=2)
    tiff(f"{d}/tif_palette8.tif", W, H, 8, 1, 3, [g.tobytes()], cmap=rng.integers(0, 65536, 768))
    tiff(f"{d}/tif_rgb.tif", W, H, 8, 3, 2, [rgb_a.tobytes()])
    tiff(f"{d}/tif_rgb_big_endian.tif", W, H, 8, 3, 2, [rgb_a.tobytes()], be=True)
    tiff(f"{d}/tif_rgba.tif", W, H, 8, 4, 2, [rgba.tobytes()], extra=[2])
    tiff(f"{d}/tif_rgba_premultiplied.tif", W, H, 8, 4, 2, [rgba.tobytes()], extra=[1])
    tiff(f"{d}/tif_rgbx.tif", W, H, 8, 4, 2, [rgba.tobytes()], extra=[0])
    tiff(f"{d}/tif_grey_alpha.tif", W, H, 8, 2, 1, [rgba[..., :2].tobytes()], extra=[2])
    tiff(f"{d}/tif_cmyk.tif", W, H, 8, 4, 5, [rgba.tobytes()])
    r16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    tiff(f"{d}/tif_rgb16.tif", W, H, 16, 3, 2, [r16.astype("<u2").tobytes()])
    tiff(f"{d}/tif_rgb16_big_endian.tif", W, H, 16, 3, 2, [r16.astype(">u2").tobytes()], be=True)
    tiff(f"{d}/tif_grey16.tif", W, H, 16, 1, 1, [r16[..., 0].astype("<u2").tobytes()])
    tiff(f"{d}/tif_planar.tif", W, H, 8, 3, 2, [rgb_a[..., c].tobytes() for c in range(3)], planar=2)
    tiff(f"{d}/tif_planar_rgba.tif", W, H, 8, 4, 2, [rgba[..., c].tobytes() for c in range(4)], planar=2, extra=[2])
    tiff(f"{d}/tif_tiled.tif", W, H, 8, 3, 2, tiles_of(rgb_a), tiles=(16, 16))
    tiff(f"{d}/tif_tiled_grey4.tif", W, H, 4, 1, 1,
         [pack_bits(np.frombuffer(t, np.uint8).reshape(16, 16) >> 4, 4) for t in tiles_of(g)], tiles=(16, 16))
    tiff(f"{d}/tif_tiled_planar.tif", W, H, 8, 3, 2, sum([tiles_of(rgb_a[..., c]) for c in range(3)], []),
         tiles=(16, 16), planar=2)
    for o in range(1, 9):
        tiff(f"{d}/tif_orientation{o}.tif", W, H, 8, 3, 2, [rgb_a.tobytes()], orientation=o)

    # Netpbm
    c3 = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    g8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    g12 = rng.integers(0, 4096, (H, W)).astype(">u2")
    c16 = rng.integers(0, 1000, (H, W, 3)).astype(">u2")
    bits = rng.integers(0, 2, (H, W), dtype=np.uint8)
    pnm(f"{d}/pnm_p6.ppm", "P6", 255, c3.tobytes())
    pnm(f"{d}/pnm_p6_maxval100.ppm", "P6", 100, (c3 % 101).tobytes())
    pnm(f"{d}/pnm_p6_maxval999.ppm", "P6", 999, c16.tobytes())
    pnm(f"{d}/pnm_p5.pgm", "P5", 255, g8.tobytes())
    pnm(f"{d}/pnm_p5_maxval15.pgm", "P5", 15, (g8 % 16).tobytes())
    pnm(f"{d}/pnm_p5_maxval4095.pgm", "P5", 4095, g12.tobytes())
    pnm(f"{d}/pnm_p4.pbm", "P4", None, b"".join(pack_bits([r], 1) for r in bits))
    pnm(f"{d}/pnm_p1.pbm", "P1", None, "\n".join("".join(map(str, r)) for r in bits).encode() + b"\n")
    pnm(f"{d}/pnm_p1_spaced.pbm", "P1", None, "\n".join(" ".join(map(str, r)) + " # c" for r in bits).encode())
    pnm(f"{d}/pnm_p2.pgm", "P2", 200, "\n".join(" ".join(str(v % 201) for v in r) for r in g8).encode() + b"\n")
    pnm(f"{d}/pnm_p2_maxval4095.pgm", "P2", 4095, "\n".join(" ".join(map(str, r)) for r in g12.astype(int)).encode())
    pnm(f"{d}/pnm_p3.ppm", "P3", 255, "\n".join(" ".join(map(str, r.ravel())) for r in c3).encode() + b"\n")
    pnm(f"{d}/pnm_p3_maxval7.ppm", "P3", 7, "\n".join(" ".join(str(v % 8) for v in r.ravel()) for r in c3).encode())

    # Refused: {file: what the message must say}
    refused = {}
    bmp(f"{d}/bad_bits2.bmp", W, H, 2, [b"\0" * 12] * H, pal[:4])
    refused["bad_bits2.bmp"] = "2 bits per pixel"
    bmp(f"{d}/bad_jpeg_inside.bmp", W, H, 24, [r[:, :3].tobytes() for r in px], comp=4)
    refused["bad_jpeg_inside.bmp"] = "compression 4 (JPEG)"
    bmp(f"{d}/bad_masks.bmp", W, H, 32, rows32, comp=3, hsize=108, masks=(0x3FF00000, 0xFFC00, 0x3FF, 0))
    refused["bad_masks.bmp"] = "0x3FF00000"
    bmp(f"{d}/bad_rle_cut.bmp", W, H, 8, palette=pal, comp=1, raw=rle8(runs[::-1])[:40])
    refused["bad_rle_cut.bmp"] = "RLE8 data ends after"
    with open(f"{d}/gif_offset.gif", "rb") as f:
        b = f.read()
    with open(f"{d}/bad_cut.gif", "wb") as f:
        f.write(b[:-60])
    refused["bad_cut.gif"] = "cut short"
    tiff(f"{d}/bad_float.tif", W, H, 32, 1, 1, [np.zeros((H, W), np.float32).tobytes()], fmt=3)
    refused["bad_float.tif"] = "floating-point samples"
    tiff(f"{d}/bad_ycbcr.tif", W, H, 8, 3, 6, [rgb_a.tobytes()])
    refused["bad_ycbcr.tif"] = "YCbCr without JPEG"
    tiff(f"{d}/bad_bands5.tif", W, H, 8, 5, 1, [np.zeros((H, W, 5), np.uint8).tobytes()], extra=[0, 0, 0, 0])
    refused["bad_bands5.tif"] = "multispectral"
    with open(f"{d}/tif_rgb.tif", "rb") as f:
        b = f.read()
    with open(f"{d}/bad_cut.tif", "wb") as f:
        f.write(b[:1000])
    refused["bad_cut.tif"] = "cannot decode TIFF"
    pnm(f"{d}/bad_cut.pgm", "P5", 255, g8.tobytes()[:100])
    refused["bad_cut.pgm"] = "cut short"
    with open(f"{d}/bad_comment_to_the_end.pgm", "wb") as f:  # the header's last token runs into a comment
        f.write(f"P5\n{W} {H}\n255#a comment and no data".encode())
    refused["bad_comment_to_the_end.pgm"] = "cut short"
    pnm(f"{d}/bad_over_maxval.ppm", "P3", 7, b"9 " * (3 * W * H))
    refused["bad_over_maxval.ppm"] = "sample 9 is above maxval 7"
    with open(f"{d}/bad_float.pfm", "wb") as f:
        f.write(f"Pf\n{W} {H}\n-1.0\n".encode() + np.zeros((H, W), np.float32).tobytes())
    refused["bad_float.pfm"] = "'Pf' files"
    return refused


def cache_rows(canopy, work, trunk, name, paths):
    """The cache's rows for image files listed in a manifest, as [N, 3, h, w] pixel values."""
    manifest = os.path.join(work, name + ".csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class"])
        for i, p in enumerate(paths):
            w.writerow([p, i % 2])
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, name, f"source = image-csv\ntrain = {manifest}\n"
                                                             f"test = {manifest}"), "--progress", "quiet"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return r.stderr.strip()[-400:]
    import h5py
    with h5py.File(os.path.join(work, name, "cache.h5"), "r") as h:
        return h["train/features"][...]


def main():
    from PIL import Image
    canopy, work, trunk = start("canopy-image-formats-", identity_trunk, "pixels.pt")
    d = os.path.join(work, "files")
    refused = write_files(d)
    names = sorted(n for n in os.listdir(d) if n not in refused)
    # Grouped by size (orientations 5-8 are turned: H x W becomes W x H), one cache each.
    groups = {}
    for n in names:
        groups.setdefault(Image.open(os.path.join(d, n)).size, []).append(n)
    kinds, canopy_pixels = {}, {}
    for size, group in sorted(groups.items()):
        got = cache_rows(canopy, work, trunk, f"cache{size[0]}x{size[1]}", [os.path.join(d, n) for n in group])
        if isinstance(got, str):
            check(False, f"canopy cache of the {len(group)} files of {size[0]} x {size[1]}: {got}")
            continue
        got = np.rint(got.reshape(len(group), 3, size[1], size[0]) * 255).astype(np.int64)
        for n, g in zip(group, got):
            want = pil_pixels(os.path.join(d, n))
            canopy_pixels[n] = g
            if np.array_equal(g, want):
                kinds.setdefault(n.split("_")[0], []).append(n)
            else:
                check(False, f"{n}: PIL's pixels ({int((g != want).sum())} values differ, up to "
                             f"{int(np.abs(g - want).max())})")
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items()))
    check(len(names) == sum(len(v) for v in kinds.values()) and len(names) > 120,
          f"{len(names)} files ({counts}) give PIL's convert(\"RGB\") pixels exactly "
          "(16-bit grey: the high byte of PIL's 16-bit value)")
    # 16-bit grey is where canopy differs from PIL's convert("RGB") on purpose: its pixels are
    # not PIL's clipped ones.
    with Image.open(os.path.join(d, "tif_grey16.tif")) as im:
        clipped = np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.int64)
    got16 = canopy_pixels.get("tif_grey16.tif")
    check(got16 is not None and not np.array_equal(got16, clipped) and (clipped == 255).mean() > 0.9,
          "16-bit grey: canopy's pixels are not PIL's convert(\"RGB\"), which is nearly all white "
          f"({(clipped == 255).mean():.0%} of its values 255)")

    for n, said in sorted(refused.items()):
        got = cache_rows(canopy, work, trunk, "refused-" + n.replace(".", "-"), [os.path.join(d, n)])
        check(isinstance(got, str) and os.path.join(d, n) in got and said in got and "unexpected" not in got,
              f"{n} is refused, naming it and saying '{said}' ({got if isinstance(got, str) else 'read'})")

    check_class_folders(canopy, work, trunk, d, names)
    return finish()


def check_class_folders(canopy, work, trunk, d, names):
    """A class folder of every kind, as torchvision's ImageFolder reads it."""
    import shutil

    import h5py
    from PIL import Image
    from torchvision.datasets import ImageFolder
    root = os.path.join(work, "folders")
    same_size = [n for n in names if not any(f"orientation{o}" in n for o in range(5, 9))]
    for i, n in enumerate(same_size):
        cls = ("bee", "cat", "dog")[i % 3]
        sub = os.path.join(root, cls, "sub" if i % 4 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        shutil.copy(os.path.join(d, n), os.path.join(sub, n.upper() if i % 5 == 0 else n))
    # Images ImageFolder leaves out (GIF, PBM, PNM, HEIC): left out here too, and said.
    left_out = [n for _, _, files in os.walk(root) for n in files if n.lower().endswith((".gif", ".pbm"))]
    with open(os.path.join(root, "cat", "phone.heic"), "wb") as f:
        f.write(b"\0\0\0\x18ftypheic")
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "folders-cache", f"source = image-folders\n"
                                                             f"train = {root}\ntest = {root}")],
                       capture_output=True, text=True)
    check(r.returncode == 0, "canopy cache of class folders of every kind" + ("" if r.returncode == 0 else r.stderr[-400:]))
    if r.returncode != 0:
        return
    folder = ImageFolder(root)
    with h5py.File(os.path.join(work, "folders-cache", "cache.h5"), "r") as h:
        feats = h["train/features"][...]
        classes = h["train/labels/class"][...]
    pixels = np.rint(feats.reshape(len(feats), 3, H, W) * 255).astype(np.int64)
    want = [np.asarray(folder.loader(p)).transpose(2, 0, 1).astype(np.int64) for p, _ in folder.samples]
    # ImageFolder's loader is convert("RGB"): 16-bit grey files are where canopy takes the high byte.
    same = [np.array_equal(g, w) or "16" in os.path.basename(p) or "4095" in os.path.basename(p)
            for g, w, (p, _) in zip(pixels, want, folder.samples)]
    check(len(feats) == len(folder.samples) and list(classes) == [c for _, c in folder.samples] and all(same),
          f"class folders: {len(feats)} rows are ImageFolder's {len(folder.samples)} samples, its classes, its "
          f"loader's pixels (rows differing: {[i for i, ok in enumerate(same) if not ok][:5]})")
    n_gif = sum(p.lower().endswith(".gif") for p in left_out)
    n_pbm = sum(p.lower().endswith(".pbm") for p in left_out)
    said = f"left out images torchvision's ImageFolder leaves out too ({n_gif} .gif, 1 .heic, {n_pbm} .pbm; the first: "
    check(said in r.stderr, f"the images ImageFolder leaves out are counted in the log ({said}...)"
          + ("" if said in r.stderr else f": {r.stderr.strip()[-400:]}"))

    # canopy check decodes them all ahead of a trunk pass: none fails; then every damaged file
    # and an image of another size are named at once, not one per failed cache job.
    ini = os.path.join(work, "folders-cache.ini")
    r = subprocess.run([canopy, "check", "--config", ini, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and f"train: {len(folder.samples)} images (" in r.stdout
          and f"the trunk gets [3, {H}, {W}] from each" in r.stdout and "check: every image reads" in r.stdout,
          f"canopy check: every image of the class folders reads, one shape ({r.stdout.strip()[-300:]})")
    broken = []
    for n in ("pil_rgb.bmp", "tif_rgb.tif", "pnm_p6.ppm"):
        with open(os.path.join(d, n), "rb") as f:
            data = f.read()
        path = os.path.join(root, "dog", "broken_" + n)
        with open(path, "wb") as f:
            f.write(data[:len(data) // 3])
        broken.append(path)
    Image.new("RGB", (W + 1, H)).save(os.path.join(root, "bee", "wider.png"))
    r = subprocess.run([canopy, "check", "--config", ini, "--progress", "quiet", "--list", "0"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and all(f"'{p}'" in r.stdout for p in broken) and "PROBLEM: 3 cannot be read" in r.stdout
          and f"from 1 (the first: {os.path.join(root, 'bee', 'wider.png')})" in r.stdout
          and "check: FAILED" in r.stdout,
          f"canopy check names the 3 damaged files and the image of another size at once, exit 1 ({r.stdout[-500:]})")


if __name__ == "__main__":
    sys.exit(main())
