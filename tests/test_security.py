"""What fm refuses to trust, checked on its source and on hostile files: nothing a user supplies is
unpickled (no pickle, torch.load only with weights_only=True, DCP only from the run's own checkpoint
folders, never through a symbolic link); weights and ONNX graphs are loaded only by the loaders that
check their recorded sha256 first; no shell is handed a string; `fm serve` binds loopback unless told
otherwise; and an image is only ever parsed by Pillow's PNG or JPEG plugin.

The source scans read fm/, flows/ and tasks/ with `ast` (what the pipeline runs). Each rule is first run
on a snippet that breaks it, so a scan that stopped seeing anything would fail here too."""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, features
from typer.testing import CliRunner

from fm.cli import app
from fm.config import IngestConfig
from fm.data.ingest import IMAGE_FORMATS, Rejected, ingest, load_image
from fm.paths import Paths
from fm.recipes.pretrain import run as pretrain_run
from fm.train.checkpoint import step_dirs
from tests.conftest import REPO, png_bytes, write_jsonl
from tests.test_trust import cfg_of, losses, workdir

SOURCES = sorted(p for folder in ("fm", "flows", "tasks") for p in (REPO / folder).rglob("*.py"))


# ------------------------------------------------------------------ reading the source


@dataclass
class Call:
    where: str  # "fm/train/checkpoint.py:load_checkpoint"
    line: int
    name: str  # the callee with its imports resolved: "torch.distributed.checkpoint.load"
    node: ast.Call
    function: ast.AST | None  # the enclosing def, if any


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as, from every import in the file (module or function level)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, aliases)}.{node.attr}"
    return "?"


@functools.cache
def parse(source: str) -> ast.Module:
    return ast.parse(source)


def calls_in(source: str, label: str) -> list[Call]:
    """Every call in `source` with its resolved name and enclosing function (qualified: Class.method)."""
    tree = parse(source)
    aliases = _aliases(tree)
    found = []

    def visit(node: ast.AST, scope: list[str], function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = child if not isinstance(child, ast.ClassDef) else function
                visit(child, scope + [child.name], inner)
                continue
            if isinstance(child, ast.Call):
                found.append(Call(f"{label}:{'.'.join(scope) or '<module>'}", child.lineno,
                                  _dotted(child.func, aliases), child, function))
            visit(child, scope, function)

    visit(tree, [], None)
    return found


def imports_in(source: str) -> set[str]:
    tree = parse(source)
    return ({a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module})


def source(path: Path) -> tuple[str, str]:
    return path.read_text(encoding="utf-8"), str(path.relative_to(REPO))


@functools.cache
def all_calls() -> list[Call]:
    return [c for path in SOURCES for c in calls_in(*source(path))]


def keyword(call: ast.Call, name: str):
    """The value of keyword argument `name`: the literal, or its ast node when it is not one; None when absent."""
    for k in call.keywords:
        if k.arg == name:
            try:
                return ast.literal_eval(k.value)
            except ValueError:
                return k.value
    return None


# ------------------------------------------------------------------ nothing a user supplies is unpickled

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNPICKLING_CALLS = {"pandas.read_pickle", "torch.jit.load", "yaml.unsafe_load", "yaml.full_load", "numpy.lib.format.read_array"}


def unpickling(source: str, label: str) -> list[str]:
    """What in `source` could unpickle a file: a pickling module, torch.load without weights_only=True, np.load
    without allow_pickle=False, yaml.load without a safe loader, or a call that always unpickles."""
    problems = [f"{label} imports {m}" for m in imports_in(source) if m.split(".")[0] in PICKLING_MODULES]
    for c in calls_in(source, label):
        if c.name == "torch.load" and keyword(c.node, "weights_only") is not True:
            problems.append(f"{c.where}:{c.line} torch.load without weights_only=True")
        elif c.name == "numpy.load" and keyword(c.node, "allow_pickle") is not False:
            problems.append(f"{c.where}:{c.line} numpy.load without allow_pickle=False")
        elif c.name == "yaml.load" and not re.search(r"Safe", ast.unparse(c.node)):
            problems.append(f"{c.where}:{c.line} yaml.load without a SafeLoader")
        elif c.name in UNPICKLING_CALLS:
            problems.append(f"{c.where}:{c.line} {c.name}")
    return problems


BREAKS_EVERY_RULE = """
import pickle
import numpy as np
import torch, yaml
from joblib import load
def f(path):
    torch.load(path)
    torch.load(path, weights_only=False)
    np.load(path)
    np.load(path, allow_pickle=True)
    yaml.load(open(path))
    torch.jit.load(path)
    torch.load(path, weights_only=True)       # fine
    np.load(path, allow_pickle=False)         # fine
    yaml.load(open(path), Loader=yaml.SafeLoader)  # fine
"""


def test_nothing_in_fm_can_unpickle_a_file():
    found = unpickling(BREAKS_EVERY_RULE, "snippet")
    assert len(found) == 8, found  # 2 imports, 2 torch.load, 2 np.load, yaml.load, torch.jit.load
    problems = [p for path in SOURCES for p in unpickling(*source(path))]
    assert problems == []


def test_dcp_loads_only_in_load_checkpoint_and_only_the_sessions_own_checkpoints():
    """DCP's .metadata is a pickle: it is read by load_checkpoint alone, which only TrainingSession.start calls,
    with the folder newest_intact_checkpoint found under the run's own checkpoint root."""
    calls = all_calls()
    dcp = {c.where for c in calls if c.name.startswith("torch.distributed.checkpoint.")
           and c.name.rsplit(".", 1)[1] in ("load", "load_state_dict", "FileSystemReader")}
    assert dcp == {"fm/train/checkpoint.py:load_checkpoint"}
    callers = {c.where for c in calls if c.name in ("fm.train.checkpoint.load_checkpoint", "load_checkpoint")
               and c.where != "fm/train/checkpoint.py:load_checkpoint"}
    assert callers == {"fm/train/session.py:TrainingSession.start"}
    start = next(c.function for c in calls if c.where == "fm/train/session.py:TrainingSession.start")
    assert "newest_intact_checkpoint(self.root)" in ast.unparse(start)


@pytest.mark.parametrize("link", ["folder", ".metadata"])
def test_a_checkpoint_linked_in_from_elsewhere_is_never_loaded(sample_shards, tmp_path, capsys, link):
    """The newest step folder (or its pickled .metadata) replaced by a symbolic link to a copy outside the run's
    folder, intact and matching its checksums.json: it is passed over for the run's own step 3, kept aside as
    .corrupt, and the resumed losses equal an uninterrupted run's (so it was not resumed)."""
    paths = workdir(tmp_path, sample_shards, "w")
    pretrain_run(cfg_of(), paths, progress=False)  # checkpoints at steps 3 and 6
    straight = losses(paths)
    root = paths.checkpoints / "pretrain"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "step-00000006", elsewhere)
    foreign = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    if link == "folder":
        shutil.rmtree(root / "step-00000006")
        (root / "step-00000006").symlink_to(elsewhere, target_is_directory=True)
    else:
        (root / "step-00000006" / ".metadata").unlink()
        (root / "step-00000006" / ".metadata").symlink_to(elsewhere / ".metadata")
    capsys.readouterr()

    summary = pretrain_run(cfg_of(), paths, progress=False)
    assert summary["resumed_from_step"] == 3
    warned = [line for line in capsys.readouterr().err.splitlines() if "damaged or incomplete" in line]
    assert len(warned) == 1 and "symbolic link" in warned[0] and "kept as step-00000006.corrupt" in warned[0], warned
    assert losses(paths) == straight
    assert [p.name for p in step_dirs(root)] == ["step-00000003", "step-00000006"]
    assert not (root / "step-00000006").is_symlink() and not (root / "step-00000006" / ".metadata").is_symlink()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == foreign  # the folder linked to is left as it was


# ------------------------------------------------------------------ weights and graphs: checked loaders only

# Reading weights or a graph; each call site must check the file's recorded sha256 first (in the same function).
WEIGHT_READERS = {"safetensors.torch.load_file", "safetensors.torch.load", "safetensors.safe_open",
                  "safetensors.numpy.load_file", "onnxruntime.InferenceSession", "onnx.load", "onnx.load_model",
                  "onnx.load_model_from_string", "onnx.load_from_string", "fm.export.onnx.open_session", "open_session"}
CHECKS = {"fm.models.pretrained.verify_weights", "verify_weights", "fm.io.sha256_file", "sha256_file", "read_checked",
          "fm.export.onnx.read_checked", "load_session", "hashlib.sha256"}
# Call sites that read without a check of their own, and why that is sound.
UNCHECKED = {
    # the one place a session is made; its callers (load_session, OnnxLM, OnnxGenerator) hand it checked bytes
    ("fm/export/onnx.py:open_session", "onnxruntime.InferenceSession"),
    # its input is the graph this export stage has just written (the stage's own output), and then its own temporary
    ("fm/export/onnx.py:quantize_int8", "onnx.load"),
    # with no sha256 given (a library caller's choice, documented); fm itself always gives both: see below
    ("fm/export/onnx.py:OnnxGenerator.__init__", "open_session"),
}


def unchecked_reads(calls: list[Call]) -> list[str]:
    """Reads of weights or graphs with no check call before them (or in their arguments) in their function."""
    check_names = {name.rsplit(".", 1)[-1] for name in CHECKS}
    bad = []
    for c in calls:
        if c.name not in WEIGHT_READERS or (c.where, c.name) in UNCHECKED:
            continue
        checked = c.function is not None and any(
            isinstance(n, ast.Call) and _dotted(n.func, {}).rsplit(".", 1)[-1] in check_names and n.lineno <= c.line
            for n in ast.walk(c.function))
        if not checked:
            bad.append(f"{c.where}:{c.line} {c.name}")
    return bad


def test_weights_and_graphs_are_read_only_after_their_sha256_is_checked():
    """Every read of safetensors weights or an ONNX graph in fm sits after a check of the file against its recorded
    sha256 (the loaders tests/test_trust.py, test_sft.py, test_clip_recipe.py and test_export_onnx.py tamper with),
    or is one of UNCHECKED; and fm builds every OnnxGenerator with both graphs' sha256."""
    snippet = calls_in("from safetensors.torch import load_file\nimport onnxruntime as ort\n"
                       "def f(p):\n    return load_file(p)\ndef g(p):\n    return ort.InferenceSession(p)\n"
                       "def h(p, want):\n    assert sha256_file(p) == want\n    return load_file(p)\n", "snippet")
    assert unchecked_reads(snippet) == ["snippet:f:4 safetensors.torch.load_file", "snippet:g:6 onnxruntime.InferenceSession"]

    calls = all_calls()
    assert unchecked_reads(calls) == []
    readers = {(c.where, c.name) for c in calls if c.name in WEIGHT_READERS}
    assert UNCHECKED <= readers  # an exemption that no longer matches a call is removed from the list
    generators = [c for c in calls if c.name in ("fm.export.onnx.OnnxGenerator", "OnnxGenerator", "cls")
                  and (c.name != "cls" or c.where == "fm/export/onnx.py:OnnxGenerator.from_export")]
    assert len(generators) >= 2  # the export stage's and from_export's (what `fm generate --onnx` uses)
    for c in generators:
        given = {k.arg for k in c.node.keywords}
        assert {"prefill_sha256", "decode_sha256"} <= given, f"{c.where}:{c.line} builds an OnnxGenerator unchecked"


# ------------------------------------------------------------------ no shell strings

SUBPROCESS = {"subprocess.Popen", "subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output"}
SHELLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "asyncio.create_subprocess_shell",
          "os.execl", "os.execlp", "os.execv", "os.execvp", "os.execve", "os.spawnl", "os.spawnv", "os.posix_spawn"}


def _is_list(arg: ast.AST, function) -> bool:
    """arg is a list display, or a name the enclosing function binds to a list display or declares as list[...]."""
    if isinstance(arg, (ast.List, ast.Tuple)):
        return True
    if not isinstance(arg, ast.Name) or function is None:
        return False
    params = function.args.args + function.args.kwonlyargs
    if any(p.arg == arg.id and p.annotation is not None and ast.unparse(p.annotation).startswith("list[") for p in params):
        return True
    values = [n.value for n in ast.walk(function) if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == arg.id for t in n.targets)]
    return bool(values) and all(isinstance(v, ast.List) for v in values)


def shell_strings(calls: list[Call]) -> list[str]:
    bad = []
    for c in calls:
        if c.name in SHELLS:
            bad.append(f"{c.where}:{c.line} {c.name}")
        elif keyword(c.node, "shell") not in (None, False):
            bad.append(f"{c.where}:{c.line} shell=")
        elif c.name in SUBPROCESS and not (c.node.args and _is_list(c.node.args[0], c.function)):
            bad.append(f"{c.where}:{c.line} {c.name} without an argument list")
    return bad


def test_no_shell_is_handed_a_string():
    """fm starts processes (torchrun, the Prefect server) with argument lists only, so nothing from a corpus or params
    reaches a shell; the only commands a shell runs are dvc.yaml's, and each is `fm <stage>`, with no parameter in it."""
    snippet = calls_in("import os, subprocess\ndef f(name, cmd: str):\n    os.system('ls ' + name)\n"
                       "    subprocess.run(cmd)\n    subprocess.run(['ls', name], shell=True)\n"
                       "    args = ['ls', name]\n    subprocess.run(args)\n", "snippet")
    assert shell_strings(snippet) == ["snippet:f:3 os.system", "snippet:f:4 subprocess.run without an argument list",
                                      "snippet:f:5 shell="]
    calls = all_calls()
    assert shell_strings(calls) == []
    assert {c.where for c in calls if c.name in SUBPROCESS} == {"fm/train/launch.py:run_torchrun", "flows/serve.py:start_server"}

    import yaml

    from fm.dvcstate import render_dvc_yaml
    from fm.stages import STAGES

    stages = yaml.safe_load(render_dvc_yaml())["stages"]
    assert {name: s["cmd"] for name, s in stages.items()} == {name: f"fm {name}" for name in STAGES}
    assert all(re.fullmatch(r"[a-z_]+", name) for name in STAGES)


# ------------------------------------------------------------------ fm serve binds loopback


def test_fm_serve_binds_loopback_unless_given_a_host(monkeypatch):
    """The server fm serve starts listens on 127.0.0.1 by default; --host changes it (tests/test_serve.py checks that
    start_server's server listens on the address it is given, and on no other)."""
    import inspect

    import flows.serve

    runner = CliRunner()
    help_text = runner.invoke(app, ["serve", "--help"], terminal_width=200).output
    assert "--host" in help_text and "127.0.0.1" in help_text and "loopback" in help_text
    assert inspect.signature(flows.serve.serve_deployments).parameters["host"].default == "127.0.0.1"

    hosts = []
    monkeypatch.setattr(flows.serve, "serve_deployments", lambda ctx, schedule, host, port, say: hosts.append(host))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for args in ([], ["--host", "0.0.0.0"]):
        result = runner.invoke(app, ["serve", "--params", str(REPO / "params.yaml"), *args])
        assert result.exit_code == 0, result.output
    assert hosts == ["127.0.0.1", "0.0.0.0"]


# ------------------------------------------------------------------ images: PNG and JPEG only


def other_formats() -> dict[str, tuple[bytes, str]]:
    """File name -> (the same small picture in a format Pillow also reads, that format); and a TIFF named .png."""
    im = Image.new("RGB", (32, 24), (200, 30, 30))
    out = {}
    for fmt in ("GIF", "BMP", "TIFF") + (("WEBP",) if features.check("webp") else ()):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out[f"picture.{fmt.lower()}"] = (buf.getvalue(), fmt)
    out["really-a-tiff.png"] = out["picture.tiff"]
    return out


@pytest.fixture
def plugins_opened(monkeypatch) -> list[str]:
    """Which Pillow plugins other than PNG's and JPEG's were asked to parse a file (each refuses, loudly)."""
    Image.init()
    opened = []
    for fmt in set(Image.ID) - set(IMAGE_FORMATS):
        factory = Image.OPEN[fmt][0]
        if isinstance(factory, type) and "_open" in vars(factory):
            def refuse(self, fmt=fmt):
                opened.append(fmt)
                raise SyntaxError(f"the {fmt} plugin parsed a file")
            monkeypatch.setattr(factory, "_open", refuse)
    return opened


def test_images_are_parsed_only_as_png_or_jpeg(tmp_path, plugins_opened):
    """A GIF, BMP, TIFF or WebP in the corpus (or a TIFF named .png) is quarantined naming its format, and no Pillow
    plugin but PNG's and JPEG's ever parses it; `fm generate --image` reads through the same load_image."""
    raw = tmp_path / "raw"
    folder = raw / "image_text" / "pictures"
    folder.mkdir(parents=True)
    files = other_formats()
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "fine.png").write_bytes(png_bytes())
    names = [*files, "fine.png"]
    write_jsonl(folder / "manifest.jsonl", [{"image": name, "caption": f"a picture, {name}"} for name in names])

    summary = ingest(IngestConfig(image_size=16), Paths(raw, tmp_path / "work"))
    assert summary["counts"]["image_text"]["kept"] == 1
    rows = pq.read_table(tmp_path / "work" / "02_ingested" / "quarantine.parquet").to_pylist()
    # position: the manifest line (a .gif or .bmp file is also one record of its own: an unknown file type)
    reasons = {names[r["position"] - 1]: r["reason"] for r in rows if r["source_file"].endswith("manifest.jsonl")}
    assert reasons == {name: f"unsupported image format {fmt} (PNG or JPEG expected)" for name, (_, fmt) in files.items()}
    for name, (_, fmt) in files.items():  # what `fm generate --image` calls
        with pytest.raises(Rejected, match=re.escape(f"unsupported image format {fmt} ")):
            load_image(folder / name, IngestConfig())
    assert plugins_opened == []

    # the guard does see a plugin that parses: opened without formats=, a GIF reaches the GIF plugin, and every
    # plugin that has no signature check of its own (TGA, SPIDER, ...) parses whatever it is given
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(files["picture.gif"][0]))
    assert {"GIF", "TGA"} <= set(plugins_opened)


def test_every_image_open_in_fm_names_png_and_jpeg_only():
    opens = [c for c in all_calls() if c.name == "PIL.Image.open"]
    assert len(opens) >= 3  # ingest's load_image, and the shard images' decode and size
    for c in opens:
        formats = keyword(c.node, "formats")
        if isinstance(formats, ast.Name) and formats.id == "IMAGE_FORMATS":
            formats = IMAGE_FORMATS
        assert formats is not None and set(formats) == {"PNG", "JPEG"}, f"{c.where}:{c.line} opens any format"
    generate = [c for c in all_calls() if c.where == "fm/cli.py:generate"]
    assert "fm.data.ingest.load_image" in {c.name for c in generate}
