"""An N-times larger raw corpus made from the sample's own records, for the data stages at scale (issue 13).

    .venv/bin/python scripts/scale_corpus.py --raw data/01_raw --out /tmp/raw10 --factor 10

Copy 0 is the corpus itself, byte for byte. Copies 1..N-1 are variations of it that the pipeline takes as
new, distinct documents (neither exact nor near duplicates at curate's Jaccard 0.8), with every record
still real text of the sample:
    text, code   each document is spliced: its own first half and the second half of another document of the
                 same file or folder (copy c: the c-th next in a seeded shuffle, so no two copies repeat a
                 pair), cut at the whitespace or newline nearest the middle (Chinese poems: at a line break). Word 5-gram Jaccard with either parent is near
                 0.5, so curate keeps them; they read as real text cut and joined.
    images       the same caption with the image mirrored and/or shifted and a 4 x 4 corner shaded (all
                 copy-specific), so the (image, caption) pair is new and the image still shows the object.
    triples      the subject gets a copy tag ("dwarf #3"): a distinct fact the knowledge probes never ask about.
                 This is synthetic: use the scaled corpus for throughput and memory, never for the model's
                 knowledge.
Copies keep each file's source name: a copy of text/fortunes.jsonl is text/fortunes/copy03.jsonl, of
text/python-docs/x.txt is text/python-docs/copy03/x.txt (the first folder under the modality names the source).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import shutil
from pathlib import Path

from PIL import Image, ImageChops, ImageOps

TEXT_FIELDS = {"text": "text", "code": "content"}
_SPACE = re.compile(r"\s")


def splice(head: str, tail: str) -> str:
    """head's first half and tail's second half, each cut at the whitespace nearest its middle."""
    return head[:_cut(head)] + tail[_cut(tail):]


def _cut(text: str) -> int:
    mid = len(text) // 2
    if "\n" in text.strip() and not _SPACE.search(text.replace("\n", "")):  # unspaced lines (poems): a line break
        breaks = [m.start() for m in re.finditer("\n", text)]
    else:
        breaks = [m.start() for m in _SPACE.finditer(text)]
    return min(breaks, key=lambda b: abs(b - mid)) if breaks else mid


def _partners(n: int, copy: int, seed: int) -> list[int]:
    """For each document i, the document whose second half copy `copy` joins to it: `copy` places after i in one
    seeded shuffle of the group, so copies 1..n-1 each join i to a different document. A group of n documents
    gives n - 1 distinct copies; a copy whose rotation comes round to i itself repeats the document (curate drops
    it as a duplicate)."""
    order = list(range(n))
    random.Random(f"{seed}").shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + copy) % n]
    return partner


def copy_jsonl(src: Path, dst: Path, field: str, copy: int, seed: int) -> None:
    lines = src.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) if line.strip() else None for line in lines]
    texts = [r.get(field) if isinstance(r, dict) and isinstance(r.get(field), str) else None for r in records]
    usable = [i for i, t in enumerate(texts) if t]
    partner = dict(zip(usable, (usable[j] for j in _partners(len(usable), copy, seed))))
    out = []
    for i, (line, record) in enumerate(zip(lines, records)):
        if i in partner:
            record = {**record, field: splice(texts[i], texts[partner[i]])}
            out.append(json.dumps(record, ensure_ascii=False))
        else:
            out.append(line)  # a blank or unusable line stays as it was (the pipeline quarantines it again)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")


def copy_files(files: list[Path], src_root: Path, dst_root: Path, copy: int, seed: int) -> None:
    """One-record files (a .txt document, a source file): spliced with another file of the same suffix."""
    by_suffix: dict[str, list[Path]] = {}
    for f in files:
        by_suffix.setdefault(f.suffix, []).append(f)
    for group in by_suffix.values():
        texts = []
        for f in group:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                texts.append(None)
        partner = _partners(len(group), copy, seed)
        for i, f in enumerate(group):
            dst = dst_root / f.relative_to(src_root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            other = texts[partner[i]]
            if texts[i] is None or other is None:
                shutil.copyfile(f, dst)  # undecodable: as it was (the pipeline quarantines it again)
            else:
                dst.write_text(splice(texts[i], other), encoding="utf-8")


def vary_image(data: bytes, copy: int) -> bytes:
    """Mirror and/or shift the image (wrapping round) by a copy-specific amount and shade a corner, as PNG."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if copy % 2:
            im = ImageOps.mirror(im)
        shift = (copy // 2) % max(1, min(im.size) // 4)
        if shift:
            im = ImageChops.offset(im, shift, shift)
        # and a copy-specific shade in a 4 x 4 corner, so a symmetric or flat image changes too
        im = im.convert("RGBA" if im.mode in ("P", "LA", "RGBA") else "RGB")
        shade = (copy * 37) % 256
        im.paste((shade, 255 - shade, shade) + ((255,) if im.mode == "RGBA" else ()), (0, 0, 4, 4))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def copy_image_folder(folder: Path, dst: Path, copy: int) -> None:
    """A manifest folder (manifest.jsonl + images): the same captions, each image varied."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in folder.rglob("*"):
        if f.is_dir():
            continue
        out = dst / f.relative_to(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
            try:
                out.with_suffix(f.suffix).write_bytes(vary_image(f.read_bytes(), copy))
            except OSError:
                shutil.copyfile(f, out)  # a broken image stays broken
        else:
            shutil.copyfile(f, out)


def copy_triples(src: Path, dst: Path, copy: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if src.suffix == ".tsv":
            cols = line.split("\t")
            if len(cols) >= 3 and cols[0]:
                cols[0] = f"{cols[0]} #{copy}"
            out.append("\t".join(cols))
        else:
            try:
                record = json.loads(line)
            except ValueError:
                out.append(line)
                continue
            if isinstance(record, dict) and isinstance(record.get("subject"), str):
                record["subject"] = f"{record['subject']} #{copy}"
            out.append(json.dumps(record, ensure_ascii=False))
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")


def scale(raw: Path, out: Path, factor: int, seed: int = 0) -> dict:
    """Write the factor-times corpus into out (which must not exist); returns {modality: bytes written}."""
    if factor < 1:
        raise ValueError(f"--factor must be at least 1, got {factor}")
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder")
    shutil.copytree(raw, out)  # copy 0
    for copy in range(1, factor):
        tag = f"copy{copy:03d}"
        for modality in ("text", "code"):
            folder = raw / modality
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if entry.is_file() and entry.suffix == ".jsonl":
                    copy_jsonl(entry, out / modality / entry.stem / f"{tag}.jsonl", TEXT_FIELDS[modality], copy, seed)
                elif entry.is_dir():
                    files = sorted(p for p in entry.rglob("*") if p.is_file())
                    jsonl = [p for p in files if p.suffix == ".jsonl"]
                    for p in jsonl:
                        copy_jsonl(p, out / modality / entry.name / tag / p.relative_to(entry), TEXT_FIELDS[modality],
                                   copy, seed)
                    copy_files([p for p in files if p.suffix != ".jsonl"], entry, out / modality / entry.name / tag,
                               copy, seed)
                elif entry.is_file():
                    copy_files([entry], folder, out / modality / entry.stem / tag, copy, seed)
        folder = raw / "image_text"
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.is_dir():
                copy_image_folder(entry, out / "image_text" / entry.name / tag, copy)
        folder = raw / "triples"
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.is_file() and entry.suffix in (".tsv", ".jsonl"):
                copy_triples(entry, out / "triples" / entry.stem / f"{tag}{entry.suffix}", copy)
    return {m: sum(p.stat().st_size for p in (out / m).rglob("*") if p.is_file())
            for m in ("text", "code", "image_text", "triples") if (out / m).is_dir()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", type=Path, default=Path("data/01_raw"), help="the corpus to scale (default data/01_raw)")
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the scaled corpus")
    ap.add_argument("--factor", type=int, default=10, help="how many times the corpus (copy 0 is the original)")
    ap.add_argument("--seed", type=int, default=0, help="which documents are spliced together")
    args = ap.parse_args()
    sizes = scale(args.raw, args.out, args.factor, args.seed)
    print(json.dumps({"out": str(args.out), "factor": args.factor, "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 1)}))


if __name__ == "__main__":
    main()
