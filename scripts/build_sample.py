#!/usr/bin/env python3
"""Rebuild fm's bundled sample corpus (``data/01_raw``) from licensed public sources.

The sample is a small, real, multilingual (English + Chinese) corpus in all four modalities,
laid out per the "raw corpus contract" that ``fm ingest`` reads (see data/README.md):

    text/        python-docs.jsonl, python-docs/*.txt, fortunes.jsonl, tang-poems.jsonl
    code/        cpython-lib.jsonl (CPython standard library, one record per .py file),
                 cpython/Lib/**/*.py (3 small stdlib files kept as files), cpython-include.jsonl (C headers)
    image_text/  openclipart/, fashion-mnist/, noto-emoji/  (manifest.jsonl + PNGs each)
    triples/     wordnet.tsv, countries.jsonl

Every source is read from a locally installed package; this script installs and downloads
nothing. Before running it, install the sources (Debian 12 / bookworm package names):

    apt-get install python3.11-doc fortunes fortunes-min openclipart-png openclipart-svg \\
        dataset-fashion-mnist fonts-noto-color-emoji wordnet-base
    mkdir -p /tmp/chinese-poetry && cd /tmp/chinese-poetry \\
        && npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz   # -> ./package
    .venv/bin/pip install pillow emoji countryinfo babel fonttools

(``fortunes-off`` is deliberately not used.) ``emoji``, ``countryinfo``, ``babel`` and
``fonttools`` are build-time helpers only; fm itself never imports them.

Run from the repository root:

    .venv/bin/python scripts/build_sample.py                   # the committed sample
    .venv/bin/python scripts/build_sample.py --scale 0.1 --out /tmp/tiny_raw
    .venv/bin/python scripts/build_sample.py --only emoji,fashion-mnist

Output is deterministic for a given set of installed package versions and ``--seed``: file
lists are sorted before a fixed-seed ``random.Random`` samples them, and records are written
in source order. The code sample depends on the Python that runs this script (its stdlib is
copied), so rebuild with the same interpreter to reproduce it byte for byte.

Each source replaces only its own outputs under ``--out``. A missing source package is
reported by name with the command that installs it; the script then exits with status 2
unless ``--skip-missing`` is given.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import struct
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
CLIPART_PNG = Path("/usr/share/openclipart/png")
CLIPART_SVG = Path("/usr/share/openclipart/svg")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
WORDNET_DIR = Path("/usr/share/wordnet")
POETRY_CANDIDATES = [
    Path("/tmp/chinese-poetry/package"),
    Path("/tmp/chinese-poetry/node_modules/chinese-poetry"),
]

# Defaults for --scale 1 (the committed sample). Byte budgets count UTF-8 bytes of content.
DEFAULTS = {
    "python_docs_bytes": 1_600_000,
    "python_docs_txt": 5,
    "fortunes": 4500,
    "tang_poems": 8000,
    "code_bytes": 3_000_000,
    "code_max_file_bytes": 150_000,
    "code_files": 3,  # stdlib files kept as .py files; the rest of the code sample is jsonl
    "c_headers": 20,
    "clipart": 400,
    "fashion": 400,
    "emoji": 400,
    "wordnet": 30000,
    "countries": 256,  # all of them
}

JSON_KW = dict(ensure_ascii=False, separators=(", ", ": "))


class SourceMissing(Exception):
    """A source package is not installed; the message says how to install it."""


def require(path: Path, how: str) -> Path:
    if not path.exists():
        raise SourceMissing(f"{path} not found; install it with: {how}")
    return path


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, **JSON_KW) + "\n")
            n += 1
    return n


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def clear(*paths: Path) -> None:
    """Remove a source's previous outputs (only these exact paths)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def save_png(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG", optimize=True)


def on_white(img):
    """Flatten any image (palette, grey+alpha, RGBA) onto a white background, as RGB."""
    from PIL import Image

    rgba = img.convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


# --------------------------------------------------------------------------------- text


def build_python_docs(out: Path, n: dict, rng: random.Random) -> dict:
    """reST sources of the Python 3.11 docs: one document per source file."""
    src = require(PYDOC_DIR, "apt-get install python3.11-doc")
    files = sorted(p for p in src.rglob("*.txt") if p.is_file())
    rng.shuffle(files)
    # A handful of small documents go out as plain .txt files (one document per file).
    txt_files, rest = [], []
    for p in files:
        if len(txt_files) < n["python_docs_txt"] and 1_000 <= p.stat().st_size <= 20_000:
            txt_files.append(p)
        else:
            rest.append(p)
    chosen, used = [], 0
    for p in rest:
        size = p.stat().st_size
        if used + size <= n["python_docs_bytes"]:
            chosen.append(p)
            used += size
    jsonl, txt_dir = out / "text" / "python-docs.jsonl", out / "text" / "python-docs"
    clear(jsonl, txt_dir)
    count = write_jsonl(
        jsonl,
        (
            {"text": p.read_text(encoding="utf-8"), "lang": "en", "source": "python-docs",
             "path": str(p.relative_to(src))}
            for p in sorted(chosen)
        ),
    )
    txt_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(txt_files):
        name = str(p.relative_to(src)).replace("/", "__").removesuffix(".txt")
        shutil.copyfile(p, txt_dir / f"{name}.txt")
    return {"text/python-docs.jsonl [en]": count, "text/python-docs/*.txt [en]": len(txt_files)}


def build_fortunes(out: Path, n: dict, rng: random.Random) -> dict:
    """fortune(6) cookies, one record per fortune (the offensive set is not installed/used)."""
    src = require(FORTUNE_DIR, "apt-get install fortunes fortunes-min")
    recs = []
    for p in sorted(src.iterdir()):
        if p.suffix in (".dat", ".u8") or p.is_symlink() or not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for part in text.split("\n%\n"):
            part = part.strip("\n")
            if part.strip() and part.strip() != "%":
                recs.append({"text": part, "lang": "en", "source": "fortunes", "category": p.name})
    keep = sorted(rng.sample(range(len(recs)), min(n["fortunes"], len(recs))))
    path = out / "text" / "fortunes.jsonl"
    clear(path)
    return {"text/fortunes.jsonl [en]": write_jsonl(path, (recs[i] for i in keep))}


def poetry_dir(arg: str | None) -> Path:
    how = ("mkdir -p /tmp/chinese-poetry && cd /tmp/chinese-poetry && npm pack chinese-poetry@2.0.1 "
           "&& tar xzf chinese-poetry-2.0.1.tgz  (or pass --poetry-dir)")
    cands = [Path(arg)] if arg else POETRY_CANDIDATES
    for c in cands:
        if (c / "dist" / "quantangshi").is_dir():
            return c
    raise SourceMissing(f"npm package chinese-poetry not found in {', '.join(map(str, cands))}; {how}")


def build_tang_poems(out: Path, n: dict, rng: random.Random, poetry: str | None) -> dict:
    """Tang poems (全唐诗, traditional characters as shipped): title, author, then the lines."""
    src = poetry_dir(poetry) / "dist" / "quantangshi"
    files = sorted(src.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    poems = []
    for p in files:
        poems.extend(json.loads(p.read_text(encoding="utf-8")))
    keep = sorted(rng.sample(range(len(poems)), min(n["tang_poems"], len(poems))))
    path = out / "text" / "tang-poems.jsonl"
    clear(path)

    def rec(poem):
        body = "\n".join(poem.get("paragraphs") or [])
        return {"text": f"{poem.get('title', '')}\n{poem.get('author', '')}\n{body}",
                "lang": "zh", "source": "tang-poems"}

    return {"text/tang-poems.jsonl [zh]": write_jsonl(path, (rec(poems[i]) for i in keep))}


# --------------------------------------------------------------------------------- code


def build_code(out: Path, n: dict, rng: random.Random) -> dict:
    """This interpreter's standard library as code jsonl (a few files kept as files), plus C headers."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    require(stdlib / "os.py", "a CPython installation (run this script with it)")
    files = sorted(
        p for p in stdlib.rglob("*.py")
        if p.is_file() and not p.is_symlink()
        and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(stdlib).parts)
    )
    rng.shuffle(files)
    chosen, used = [], 0
    for p in files:
        size = p.stat().st_size
        # Empty files (bare __init__.py) carry no code; a dozen of them would only pad the sample.
        if 0 < size <= n["code_max_file_bytes"] and used + size <= n["code_bytes"]:
            chosen.append(p)
            used += size
    chosen.sort()
    contents = {p: p.read_bytes() for p in chosen}
    # As .py files in the tree, 200 stdlib modules pass for fm's own code with grep, linters and
    # IDEs, so the sample goes out as jsonl. A file that is not UTF-8 cannot be a JSON string and
    # stays a file; the smallest others make up `code_files`, which exercise ingest's file path.
    not_utf8 = [p for p in chosen if not is_utf8(contents[p])]
    smallest = sorted((p for p in chosen if p not in not_utf8), key=lambda p: (len(contents[p]), p))
    as_files = set(not_utf8 + smallest[: max(0, n["code_files"] - len(not_utf8))])
    dst_root = out / "code" / "cpython"
    lib_jsonl, include_jsonl = out / "code" / "cpython-lib.jsonl", out / "code" / "cpython-include.jsonl"
    clear(dst_root, lib_jsonl, include_jsonl)
    for p in sorted(as_files):
        dst = dst_root / "Lib" / p.relative_to(stdlib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    lib_count = write_jsonl(
        lib_jsonl,
        # Decoded from the bytes, not read_text(), whose universal newlines would turn \r\n into \n.
        ({"content": contents[p].decode("utf-8"), "path": f"Lib/{p.relative_to(stdlib).as_posix()}",
          "language": "python", "source": "cpython"} for p in chosen if p not in as_files),
    )
    headers = sorted(p for p in include.rglob("*.h") if p.is_file()) if include.is_dir() else []
    hsel = sorted(rng.sample(headers, min(n["c_headers"], len(headers))))
    count = write_jsonl(
        include_jsonl,
        ({"content": p.read_text(encoding="utf-8", errors="surrogateescape"),
          "path": f"Include/{p.relative_to(include)}", "language": "c"} for p in hsel),
    )
    return {"code/cpython-lib.jsonl [python]": lib_count, "code/cpython/Lib/**/*.py [python]": len(as_files),
            "code/cpython-include.jsonl [c]": count}


# --------------------------------------------------------------------------- image_text

SVG_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
    "dc": "http://purl.org/dc/elements/1.1/",
}


def clipart_caption(svg: Path) -> str | None:
    """The work's dc:title (plus its dc:description when short), or the SVG <title>."""
    try:
        root = ET.parse(svg).getroot()
    except ET.ParseError:
        return None
    title = desc = creator = None
    for work in root.iter(f"{{{SVG_NS['cc']}}}Work"):
        title = (work.findtext("dc:title", default="", namespaces=SVG_NS) or "").strip()
        desc = (work.findtext("dc:description", default="", namespaces=SVG_NS) or "").strip()
        creator = (work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=SVG_NS) or "").strip()
        break
    if not title:
        title = (root.findtext("{http://www.w3.org/2000/svg}title") or "").strip()
    title = " ".join((title or "").split())
    desc = " ".join((desc or "").split())
    # Metadata that names the artist or an address instead of the picture is no caption.
    if not title or "@" in title or "http" in title.lower() or (creator and title.lower() == creator.lower()):
        return None
    if desc and desc.lower() != title.lower() and len(desc) <= 200 and "http" not in desc.lower():
        return f"{title}. {desc}"
    return title


CLIPART_MAX_PER_CAPTION = 3
CLIPART_MAX_PIXELS = 50_000_000


def build_clipart(out: Path, n: dict, rng: random.Random) -> dict:
    """Open Clip Art PNGs, downscaled to <=128 px, flattened on white; captions from the SVG."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the size is checked below, before decoding
    require(CLIPART_PNG, "apt-get install openclipart-png")
    require(CLIPART_SVG, "apt-get install openclipart-svg")
    pngs = sorted(CLIPART_PNG.rglob("*.png"))
    rng.shuffle(pngs)
    dst = out / "image_text" / "openclipart"
    clear(dst)
    recs, per_caption = [], {}
    for png in pngs:
        if len(recs) >= n["clipart"]:
            break
        rel = png.relative_to(CLIPART_PNG)
        svg = CLIPART_SVG / rel.with_suffix(".svg")
        caption = clipart_caption(svg) if svg.is_file() else None
        # Whole icon sets share one title ("Lemon SVG theme"): take a few of each, not dozens.
        if not caption or per_caption.get(caption, 0) >= CLIPART_MAX_PER_CAPTION:
            continue
        per_caption[caption] = per_caption.get(caption, 0) + 1
        with Image.open(png) as im:
            if im.width * im.height > CLIPART_MAX_PIXELS:
                continue  # a few PNGs are rendered huge; decoding one takes gigabytes
            im.load()
            img = on_white(im)
        img.thumbnail((128, 128), Image.LANCZOS)
        img = img.quantize(256)  # clip art has few colours; a palette PNG is half the size
        out_rel = Path("images") / rel
        save_png(img, dst / out_rel)
        recs.append({"image": out_rel.as_posix(), "caption": caption, "lang": "en",
                     "source": "openclipart"})
    recs.sort(key=lambda r: r["image"])
    return {"image_text/openclipart [en]": write_jsonl(dst / "manifest.jsonl", recs)}


FASHION_CLASSES = [  # (English, Chinese) per Fashion-MNIST label 0..9
    ("a photo of a T-shirt or top", "一张T恤/上衣的照片"),
    ("a photo of trousers", "一张裤子的照片"),
    ("a photo of a pullover", "一张套头衫的照片"),
    ("a photo of a dress", "一张连衣裙的照片"),
    ("a photo of a coat", "一张外套的照片"),
    ("a photo of a sandal", "一张凉鞋的照片"),
    ("a photo of a shirt", "一张衬衫的照片"),
    ("a photo of a sneaker", "一张运动鞋的照片"),
    ("a photo of a bag", "一张包的照片"),
    ("a photo of an ankle boot", "一张短靴的照片"),
]


def read_idx(path: Path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def build_fashion(out: Path, n: dict, rng: random.Random) -> dict:
    """Fashion-MNIST test-set images as 28x28 greyscale PNGs; one en and one zh caption each."""
    from PIL import Image

    img_path = require(FASHION_DIR / "t10k-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist")
    lab_path = require(FASHION_DIR / "t10k-labels-idx1-ubyte.gz", "apt-get install dataset-fashion-mnist")
    (count, rows, cols), pixels = read_idx(img_path)
    (_,), labels = read_idx(lab_path)
    keep = sorted(rng.sample(range(count), min(n["fashion"], count)))
    dst = out / "image_text" / "fashion-mnist"
    clear(dst)
    recs = []
    for i in keep:
        im = Image.frombytes("L", (cols, rows), pixels[i * rows * cols : (i + 1) * rows * cols])
        rel = f"images/t10k-{i:05d}.png"
        save_png(im, dst / rel)
        en, zh = FASHION_CLASSES[labels[i]]
        for caption, lang in ((en, "en"), (zh, "zh")):
            recs.append({"image": rel, "caption": caption, "lang": lang, "source": "fashion-mnist",
                         "label": int(labels[i])})
    write_jsonl(dst / "manifest.jsonl", recs)
    return {"image_text/fashion-mnist [en]": len(keep), "image_text/fashion-mnist [zh]": len(keep)}


def emoji_name(name: str) -> str:
    return name.strip(":").replace("_", " ").strip()


def build_emoji(out: Path, n: dict, rng: random.Random) -> dict:
    """Noto Color Emoji glyphs as 64x64 palette PNGs on white; en/zh names from the emoji package."""
    try:
        import emoji
        from fontTools.ttLib import TTFont
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:
        raise SourceMissing(f"{e.name} not importable; pip install emoji fonttools pillow") from e
    font_path = require(EMOJI_FONT, "apt-get install fonts-noto-color-emoji")
    emoji.config.load_language("zh")
    cmap = TTFont(font_path, lazy=True).getBestCmap()
    font = ImageFont.truetype(str(font_path), 109)  # the font's only bitmap strike
    joiners = {0xFE0F, 0x200D}  # variation selector and zero-width joiner need no glyph
    fq = emoji.STATUS["fully_qualified"]
    cands = sorted(
        e for e, d in emoji.EMOJI_DATA.items()
        if d.get("status") == fq and d.get("E", 99) <= 15
        and all(ord(c) in cmap for c in e if ord(c) not in joiners)
    )
    rng.shuffle(cands)
    dst = out / "image_text" / "noto-emoji"
    clear(dst)
    chosen = []
    for e in cands:
        if len(chosen) >= n["emoji"]:
            break
        canvas = Image.new("RGBA", (400, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((10, 10), e, font=font, embedded_color=True)
        box = canvas.getbbox()
        # An unsupported sequence falls apart into several glyphs side by side: skip it.
        if not box or box[2] - box[0] > 160:
            continue
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        img = on_white(square.resize((64, 64), Image.LANCZOS)).quantize(256)
        chosen.append((e, img))
    recs, counts = [], {"en": 0, "zh": 0}
    for e, img in sorted(chosen, key=lambda t: [ord(c) for c in t[0]]):
        rel = "images/" + "-".join(f"{ord(c):x}" for c in e) + ".png"
        save_png(img, dst / rel)
        data = emoji.EMOJI_DATA[e]
        for lang in ("en", "zh"):
            if data.get(lang):
                recs.append({"image": rel, "caption": emoji_name(data[lang]), "lang": lang,
                             "source": "noto-emoji", "emoji": e})
                counts[lang] += 1
    write_jsonl(dst / "manifest.jsonl", recs)
    return {f"image_text/noto-emoji [{k}]": v for k, v in counts.items()}


# ------------------------------------------------------------------------------ triples

# Forward WordNet pointers only (the inverse ones, e.g. hyponym or holonym, restate these).
WORDNET_RELATIONS = {
    "@": "hypernym", "@i": "instance-hypernym", "%m": "member-meronym", "%s": "substance-meronym",
    "%p": "part-meronym", "!": "antonym", "+": "derived", "=": "attribute", "&": "similar-to",
    "*": "entailment", ">": "cause", "^": "also-see", "$": "verb-group", "\\": "pertainym",
    "<": "participle", ";c": "domain-topic", ";r": "domain-region", ";u": "domain-usage",
}


def wn_lemma(word: str) -> str:
    return re.sub(r"\((a|p|ip)\)$", "", word).replace("_", " ")


def build_wordnet(out: Path, n: dict, rng: random.Random) -> dict:
    """WordNet 3.0 relations between synsets (first lemma) or words (lexical pointers)."""
    src = require(WORDNET_DIR / "data.noun", "apt-get install wordnet-base").parent
    synsets = {}  # (pos, offset) -> (words, pointers)
    for pos, fname in (("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")):
        with open(src / fname, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # license header
                fields = line.split(" | ", 1)[0].split()
                offset, w_cnt = fields[0], int(fields[3], 16)
                words = [wn_lemma(fields[4 + 2 * i]) for i in range(w_cnt)]
                k = 4 + 2 * w_cnt
                p_cnt = int(fields[k])
                ptrs = [tuple(fields[k + 1 + 4 * j : k + 5 + 4 * j]) for j in range(p_cnt)]
                synsets[(pos, offset)] = (words, ptrs)
    triples = []
    for (pos, offset), (words, ptrs) in synsets.items():
        for sym, t_off, t_pos, st in ptrs:
            rel = WORDNET_RELATIONS.get(sym)
            target = synsets.get(("a" if t_pos == "s" else t_pos, t_off))
            if rel is None or target is None:
                continue
            s_i, t_i = int(st[:2], 16), int(st[2:], 16)
            subj = words[s_i - 1] if s_i else words[0]
            obj = target[0][t_i - 1] if t_i else target[0][0]
            triples.append((subj, rel, obj))
    keep = sorted(rng.sample(range(len(triples)), min(n["wordnet"], len(triples))))
    path = out / "triples" / "wordnet.tsv"
    clear(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in keep:
            f.write("\t".join(triples[i]) + "\ten\n")
    return {"triples/wordnet.tsv [en]": len(keep)}


# UN M.49 codes for countryinfo's region names; babel (CLDR) names them in each language.
M49 = {
    "Africa": "002", "Americas": "019", "Asia": "142", "Europe": "150", "Oceania": "009",
    "Latin America and the Caribbean": "419", "Sub-Saharan Africa": "202", "Northern Africa": "015",
    "Western Asia": "145", "Central Asia": "143", "Southern Asia": "034", "Eastern Asia": "030",
    "South-eastern Asia": "035", "South-Eastern Asia": "035", "Northern Europe": "154",
    "Southern Europe": "039", "Eastern Europe": "151", "Western Europe": "155",
    "Northern America": "021", "Australia and New Zealand": "053", "Melanesia": "054",
    "Micronesia": "057", "Polynesia": "061", "Caribbean": "029", "Central America": "013",
    "South America": "005", "Eastern Africa": "014", "Western Africa": "011", "Middle Africa": "017",
    "Southern Africa": "018", "Channel Islands": "830",
}
ZH_RELATIONS = {  # relation labels of the Chinese records
    "region": "所属区域", "subregion": "所属次区域", "intermediate region": "所属中间区域",
    "population": "人口", "area": "面积", "language": "官方语言", "currency": "货币",
    "borders": "接壤", "calling code": "国际电话区号", "top-level domain": "顶级域名",
}


def build_countries(out: Path, n: dict, rng: random.Random) -> dict:
    """Country facts from countryinfo, in English and (names via babel/CLDR) Chinese."""
    try:
        import babel
        from countryinfo import all_countries
    except ImportError as e:
        raise SourceMissing(f"{e.name} not importable; install with: pip install countryinfo babel") from e
    en_loc, zh_loc = babel.Locale("en"), babel.Locale("zh")
    infos = sorted((c.info() for c in all_countries()), key=lambda i: i.get("name") or "")
    alpha3 = {i["ISO"]["alpha3"]: i for i in infos if (i.get("ISO") or {}).get("alpha3")}
    if n["countries"] < len(infos):
        infos = [infos[i] for i in sorted(rng.sample(range(len(infos)), n["countries"]))]
    recs, counts = [], {"en": 0, "zh": 0}

    def add(subj, rel, obj, lang):
        if subj and obj not in (None, ""):
            relation = rel if lang == "en" else ZH_RELATIONS[rel]
            recs.append({"subject": subj, "relation": relation, "object": str(obj), "lang": lang})
            counts[lang] += 1

    for info in infos:
        name = info.get("name")
        code2 = (info.get("ISO") or {}).get("alpha2") or ""
        zh_name = zh_loc.territories.get(code2)
        facts = []  # (relation, en object, zh object or None)
        if info.get("capital"):
            facts.append(("capital", info["capital"], None))  # no Chinese source for capitals
        for rel, key in (("region", "region"), ("subregion", "subregion"),
                         ("intermediate region", "intermediateregion")):
            if info.get(key):
                facts.append((rel, info[key], zh_loc.territories.get(M49.get(info[key], ""))))
        if info.get("population"):
            facts.append(("population", info["population"], info["population"]))
        if info.get("area"):
            facts.append(("area", f"{info['area']} km²", f"{info['area']} km²"))
        for lang in info.get("languages") or []:
            facts.append(("language", en_loc.languages.get(lang, lang), zh_loc.languages.get(lang)))
        for cur in info.get("currencies") or []:
            facts.append(("currency", en_loc.currencies.get(cur, cur), zh_loc.currencies.get(cur)))
        for b in info.get("borders") or []:
            other = alpha3.get(b)
            if other:
                o2 = (other.get("ISO") or {}).get("alpha2") or ""
                facts.append(("borders", other.get("name"), zh_loc.territories.get(o2)))
        for cc in info.get("callingCodes") or []:
            if cc:
                facts.append(("calling code", f"+{cc}", f"+{cc}"))
        for tld in info.get("tld") or []:
            facts.append(("top-level domain", tld, tld))
        if info.get("demonym"):
            facts.append(("demonym", info["demonym"], None))
        for prov in info.get("provinces") or []:
            facts.append(("province", prov, None))
        for rel, en_obj, zh_obj in facts:
            add(name, rel, en_obj, "en")
            if zh_name and zh_obj:
                add(zh_name, rel, zh_obj, "zh")
    path = out / "triples" / "countries.jsonl"
    clear(path)
    write_jsonl(path, recs)
    return {f"triples/countries.jsonl [{k}]": v for k, v in counts.items()}


# --------------------------------------------------------------------------------- main

SOURCES = ["python-docs", "fortunes", "tang-poems", "code", "openclipart", "fashion-mnist",
           "emoji", "wordnet", "countries"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Rebuild fm's bundled sample corpus (data/01_raw) from locally installed, "
        "licensed sources. See the module docstring for the packages it needs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=REPO / "data" / "01_raw", help="raw corpus folder to write")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every per-source count/byte budget not given explicitly")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed-seed sampling")
    ap.add_argument("--only", default=",".join(SOURCES), help="comma-separated subset of the sources")
    ap.add_argument("--poetry-dir", default=None,
                    help="unpacked npm package chinese-poetry; default: the first of "
                    + ", ".join(map(str, POETRY_CANDIDATES)) + " that exists")
    ap.add_argument("--skip-missing", action="store_true", help="skip a missing source instead of failing")
    for key, val in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                        help=f"per-source size (default {val} x --scale)")
    args = ap.parse_args(argv)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SOURCES)
    if unknown:
        ap.error(f"unknown source(s) in --only: {', '.join(sorted(unknown))}")
    n = {k: getattr(args, k) if getattr(args, k) is not None else max(1, round(v * args.scale))
         for k, v in DEFAULTS.items()}
    n["code_max_file_bytes"] = args.code_max_file_bytes or DEFAULTS["code_max_file_bytes"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    builders = {
        "python-docs": lambda r: build_python_docs(out, n, r),
        "fortunes": lambda r: build_fortunes(out, n, r),
        "tang-poems": lambda r: build_tang_poems(out, n, r, args.poetry_dir),
        "code": lambda r: build_code(out, n, r),
        "openclipart": lambda r: build_clipart(out, n, r),
        "fashion-mnist": lambda r: build_fashion(out, n, r),
        "emoji": lambda r: build_emoji(out, n, r),
        "wordnet": lambda r: build_wordnet(out, n, r),
        "countries": lambda r: build_countries(out, n, r),
    }
    missing = []
    for name in SOURCES:
        if name not in only:
            continue
        rng = random.Random(f"{args.seed}:{name}")  # one stream per source: subsets rebuild alike
        try:
            counts = builders[name](rng)
        except SourceMissing as e:
            missing.append(name)
            print(f"MISSING {name}: {e}", file=sys.stderr)
            continue
        for key, val in counts.items():
            print(f"{key:45s} {val:7d}")
    if missing:
        print(f"missing source(s), not rebuilt: {', '.join(missing)}", file=sys.stderr)
        return 0 if args.skip_missing else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
