"""Text generation (fm/generation.py, Decoder.generate, OnnxGenerator.generate, `fm generate`), on CPU in seconds:

    .venv/bin/python -m pytest -q tests/test_generate.py

The top-k and nucleus masks by hand on small distributions; a seeded sampler that never leaves the
nucleus, draws in proportion to the renormalized probabilities and reproduces with its seed; stop
ids; streaming with a real byte-level BPE over Chinese and emoji; the torch Decoder against its
ONNX export (the same greedy tokens, and the same sampled tokens for the same seed); and the CLI
on a tiny export folder written as `fm export` writes one, against the torch model, refusing a
changed or missing file by name.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from tokenizers import pre_tokenizers, trainers
from typer.testing import CliRunner

from fm.cli import app
from fm.data.chat import ChatTemplate
from fm.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, new_tokenizer, open_tokenizer
from fm.export.onnx import OnnxGenerator, export_decode, export_prefill, quantize_int8
from fm.generation import REPLACEMENT, TextStreamer, check_sampling, sample_token, top_k_mask, top_p_mask
from fm.io import sha256_file
from fm.models.decoder import Decoder, ModelConfig
from fm.train.checkpoint import export_model
from fm.train.parallel import Dist
from tests.conftest import EN_DOCS, ZH_DOCS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

END, EOT = SPECIAL_IDS["<|end|>"], SPECIAL_IDS["<|endoftext|>"]
# Chinese (3-byte characters, some of them split over two tokens by the BPE) and emoji (4 bytes, never
# seen in training: one byte token each)
STREAM_TEXT = "床前明月光，疑是地上霜。🌙 The fox 🦊 jumps! 举头望明月 👍🏽"
runner = CliRunner()


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()  # (B, V)


# ---------------------------------------------------------------- the sampler by hand


def test_top_k_mask_by_hand():
    logits = logits_of([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]])
    assert top_k_mask(logits, 1).tolist() == [[False, True, False, False], [False, False, True, False]]
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True], [True, True, True, False]]  # a tie with the 2nd stays
    assert top_k_mask(logits, 3).tolist() == [[False, True, True, True], [True, True, True, False]]
    assert top_k_mask(logits, 99).all()  # k beyond the vocabulary: everything


def test_top_p_mask_by_hand():
    """Row 0 sorted: 0.4, 0.3, 0.2, 0.1 (cumulative 0.4, 0.7, 0.9, 1.0): the nucleus is the fewest tokens reaching p."""
    logits = logits_of([[0.1, 0.4, 0.2, 0.3], [0.05, 0.9, 0.03, 0.02]])
    expected = {
        1e-9: [[False, True, False, False], [False, True, False, False]],  # the top token always stays
        0.35: [[False, True, False, False], [False, True, False, False]],
        0.5: [[False, True, False, True], [False, True, False, False]],
        0.75: [[False, True, True, True], [False, True, False, False]],
        0.92: [[True, True, True, True], [True, True, False, False]],
        0.96: [[True, True, True, True], [True, True, True, False]],
        1.0: [[True, True, True, True], [True, True, True, True]],
    }
    for p, mask in expected.items():
        assert top_p_mask(logits, p).tolist() == mask, p
    # exactly at p: four equal tokens (0.25 each, sums exact in binary) reach 0.5 with two, the first two (a stable sort)
    assert top_p_mask(torch.zeros(1, 4), 0.5).tolist() == [[True, True, False, False]]
    assert top_p_mask(torch.zeros(1, 4), 0.25).tolist() == [[True, False, False, False]]
    # on logits, not probabilities: a shift of a row changes nothing
    assert torch.equal(top_p_mask(logits + 7.0, 0.5), top_p_mask(logits, 0.5))


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"temperature": 1.0, "top_k": 0}, "top_k must be at least 1"),
    ({"temperature": 1.0, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(**settings)
    with pytest.raises(ValueError, match=message):
        sample_token(torch.zeros(1, 5), **settings)
    model = tiny_decoder()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, **settings)


def test_temperature_zero_is_argmax_and_draws_nothing():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    greedy = sample_token(logits, temperature=0, top_k=3, top_p=0.5, generator=g)
    assert torch.equal(greedy, logits.argmax(-1, keepdim=True))
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())  # no random number used


def test_seeded_sampler_stays_in_the_nucleus_draws_in_proportion_and_reproduces():
    """8000 draws at temperature 0.7 with top_k=12, top_p=0.8 over 40 tokens: every draw is in the mask the
    filters give (computed on logits / temperature), each kept token is drawn at its renormalized
    probability (within 5 standard errors), and the same seed gives the same draws."""
    V, N, temperature = 40, 8000, 0.7
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2)) * 2
    scaled = logits / temperature
    keep = top_k_mask(scaled, 12) & top_p_mask(scaled.masked_fill(~top_k_mask(scaled, 12), float("-inf")), 0.8)  # (1, V)
    assert 1 < int(keep.sum()) < 12  # the nucleus cuts inside the top 12: both filters matter

    def draws(seed: int) -> torch.Tensor:
        return sample_token(logits.expand(N, V), temperature, top_k=12, top_p=0.8,
                            generator=torch.Generator().manual_seed(seed))[:, 0]  # (N,)

    drawn = draws(3)
    assert keep[0, drawn].all()
    probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)[0]  # (V,)
    counts = torch.bincount(drawn, minlength=V).double()
    stderr = (N * probs.double() * (1 - probs.double())).sqrt()
    assert ((counts - N * probs).abs() <= 5 * stderr + 1e-9).all(), (counts, N * probs)
    assert torch.equal(draws(3), drawn)
    assert not torch.equal(draws(4), drawn)


# ---------------------------------------------------------------- stop ids, on the torch Decoder

# init_std 0.5: at the usual 0.02 the tied embedding dominates and a random model repeats its last token forever
TINY = dict(vocab_size=96, seq_len=48, n_layer=2, n_head=4, d_model=32, init_std=0.5)


def tiny_decoder(seed: int = 1, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**{**TINY, **overrides})).eval()


def test_stop_ids_end_each_row_and_pad_it():
    """Rows that emit a stop id keep it and repeat it after; generation ends when every row has stopped;
    on_token sees every step's tokens as they are chosen."""
    model = tiny_decoder()
    prompt = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(5))
    free = model.generate(prompt, 12, temperature=0)[:, 5:]  # (3, 12) no stops
    stop_a, stop_b = free[0, 2].item(), free[1, 4].item()  # row 0 stops at its 3rd token, row 1 at its 5th at the latest
    steps = []
    out = model.generate(prompt, 12, temperature=0, stop_ids=[stop_a], eos_id=stop_b, on_token=steps.append)
    new = out[:, 5:]
    assert torch.equal(torch.cat(steps, dim=1), new)
    for row, generated in zip(free.tolist(), new.tolist()):
        ends = [i for i, t in enumerate(row) if t in (stop_a, stop_b)]
        if ends:  # the row as without stops up to its stop id, then that id repeated
            cut = ends[0] + 1
            assert generated == row[:cut] + [row[cut - 1]] * (len(generated) - cut)
        else:
            assert generated == row[:len(generated)]
    first_stops = [next((i for i, t in enumerate(row) if t in (stop_a, stop_b)), 11) for row in free.tolist()]
    assert new.shape[1] == max(first_stops) + 1  # until the last row stops (or max_new_tokens)
    # one row: generation ends right after the stop id
    alone = model.generate(prompt[:1], 12, temperature=0, stop_ids=[stop_a])[0, 5:].tolist()
    assert alone == free[0, :free[0].tolist().index(stop_a) + 1].tolist()


# ---------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small byte-level BPE trained the way `fm tokenize` trains one (specials first), on English and Chinese."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(EN_DOCS * 3 + ZH_DOCS * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def stream(tokenizer, ids: list[int]) -> list[str]:
    streamer = TextStreamer(tokenizer)
    return [streamer.put(i) for i in ids] + [streamer.end()]


def test_streaming_chinese_and_emoji_gives_only_whole_characters(tokenizer_path):
    tokenizer = open_tokenizer(tokenizer_path)
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False).ids
    partial = [i for i in ids if REPLACEMENT in tokenizer.decode([i])]
    assert len(partial) >= 8  # the emoji and some Chinese characters end inside tokens: the test has teeth
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == STREAM_TEXT
    assert not any(REPLACEMENT in p for p in pieces)
    assert pieces[-1] == ""  # everything came out as soon as it was complete
    assert sum(p == "" for p in pieces[:-1]) >= 8  # held back while a character was partial


def test_streaming_random_tokens_equals_decode(tokenizer_path):
    """Random ids (byte tokens that never form characters, special tokens): what streams is still decode's text."""
    tokenizer = open_tokenizer(tokenizer_path)
    g = torch.Generator().manual_seed(6)
    for _ in range(30):
        ids = torch.randint(0, tokenizer.get_vocab_size(), (40,), generator=g).tolist()
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


# ---------------------------------------------------------------- torch against ONNX


def write_export(root, tokenizer_path, seed: int = 2) -> Decoder:
    """root/07_export as `fm export` writes it (onnx/ fp32 and int8, hf/tokenizer.json, report.json with every
    file's bytes and sha256) from a tiny random Decoder over the tokenizer's vocabulary; returns the Decoder."""
    model = tiny_decoder(seed=seed, vocab_size=open_tokenizer(tokenizer_path).get_vocab_size(), n_kv_head=2)
    out = root / "07_export"
    (out / "onnx").mkdir(parents=True)
    (out / "hf").mkdir()
    export_prefill(model, out / "onnx" / "prefill.onnx")
    export_decode(model, out / "onnx" / "decode.onnx")
    for name in ("prefill", "decode"):
        quantize_int8(out / "onnx" / f"{name}.onnx", out / "onnx" / f"{name}.int8.onnx")
    shutil.copyfile(tokenizer_path, out / "hf" / "tokenizer.json")
    files = {f"{p.parent.name}/{p.name}": {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(out.glob("*/*"))}
    (out / "report.json").write_text(json.dumps({"stage": "export", "files": files}, indent=2))
    return model


@pytest.fixture(scope="module")
def export_workdir(tmp_path_factory, tokenizer_path):
    workdir = tmp_path_factory.mktemp("workdir")
    return workdir, write_export(workdir, tokenizer_path)


@pytest.fixture(scope="module")
def exported(export_workdir):
    """(model, OnnxGenerator) of the tiny random-init Decoder of export_workdir (exported with export_prefill /
    export_decode; grouped-query attention)."""
    workdir, model = export_workdir
    return model, OnnxGenerator.from_export(workdir / "07_export" / "onnx", intra_op_threads=1)


@pytest.mark.parametrize("settings", [
    {"temperature": 0},
    {"temperature": 1.0},
    {"temperature": 0.8, "top_k": 10},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.7},
])
def test_onnx_generator_writes_the_tokens_of_decoder_generate(exported, settings):
    model, gen = exported
    g = torch.Generator().manual_seed(7)
    for seed in range(4):
        prompt = torch.randint(0, 96, (1, 6), generator=g)
        expected = model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **settings)[0].tolist()
        streamed = []
        got = gen.generate(prompt[0].tolist(), 20, generator=torch.Generator().manual_seed(seed), on_token=streamed.append,
                           **settings)
        assert got == expected and streamed == got[6:]
        stop = expected[6 + 5]  # both end right after its first occurrence
        stopped = gen.generate(prompt[0].tolist(), 20, stop_ids=[stop], generator=torch.Generator().manual_seed(seed),
                               **settings)
        assert stopped == expected[:expected.index(stop, 6) + 1]
        assert stopped == model.generate(prompt, 20, stop_ids=[stop], generator=torch.Generator().manual_seed(seed),
                                         **settings)[0].tolist()
    if settings["temperature"] > 0:  # sampled: another seed, other tokens
        one, two = (gen.generate(prompt[0].tolist(), 20, generator=torch.Generator().manual_seed(s), **settings) for s in (0, 1))
        assert one != two
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.generate(prompt[0].tolist(), 4, temperature=1.0, top_p=0)


# ---------------------------------------------------------------- fm generate


def torch_text(model, tokenizer, ids: list[int], max_new_tokens: int, seed: int | None = None, **settings) -> str:
    """What `fm generate` should print for prompt ids: Decoder.generate's new tokens up to the default stop ids, decoded."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(torch.tensor([ids]), max_new_tokens, stop_ids=[END, EOT], generator=generator, **settings)
    new = [t for t in out[0, len(ids):].tolist() if t not in (END, EOT)]
    assert new  # something was written: the comparison means something
    return tokenizer.decode(new)


def invoke(*args: str):
    return runner.invoke(app, ["generate", *args])


def test_fm_generate_onnx_writes_the_torch_models_text(export_workdir, tokenizer_path):
    workdir, model = export_workdir
    tokenizer = open_tokenizer(tokenizer_path)
    prompt = "What is the capital of France? 床前明月光"
    chat_ids = ChatTemplate(tokenizer).encode_prompt(prompt)

    result = invoke("--onnx", "--workdir", str(workdir), "--max-new-tokens", "16", prompt)
    assert result.exit_code == 0, result.output
    assert result.stdout == torch_text(model, tokenizer, chat_ids, 16, temperature=0) + "\n"

    sampled = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "11"]
    result = invoke("--onnx", "--workdir", str(workdir), "--max-new-tokens", "16", *sampled, prompt)
    assert result.exit_code == 0, result.output
    assert result.stdout == torch_text(model, tokenizer, chat_ids, 16, seed=11, temperature=0.9, top_k=50, top_p=0.95) + "\n"
    again = invoke("--onnx-dir", str(workdir / "07_export" / "onnx"), "--max-new-tokens", "16", *sampled, prompt)
    assert again.exit_code == 0 and again.stdout == result.stdout

    raw_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    result = invoke("--onnx", "--plain", "--workdir", str(workdir), "--max-new-tokens", "16", prompt)
    assert result.exit_code == 0, result.output
    assert result.stdout == torch_text(model, tokenizer, raw_ids, 16, temperature=0) + "\n"

    int8 = OnnxGenerator.from_export(workdir / "07_export" / "onnx", int8=True)
    expected = int8.generate(chat_ids, 16, stop_ids=[END, EOT])[len(chat_ids):]
    result = invoke("--int8", "--workdir", str(workdir), "--max-new-tokens", "16", prompt)
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode([t for t in expected if t not in (END, EOT)]) + "\n"


def test_fm_generate_stop_option(export_workdir, tokenizer_path):
    """--stop ends the text at a token (a vocabulary entry, or text that is one token) and refuses anything longer."""
    workdir, model = export_workdir
    tokenizer = open_tokenizer(tokenizer_path)
    ids = tokenizer.encode("The fox", add_special_tokens=False).ids
    free = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    stop = next(t for t in free[2:] if t not in (END, EOT) and tokenizer.id_to_token(t) is not None)
    result = invoke("--onnx", "--plain", "--workdir", str(workdir), "--max-new-tokens", "12", "--stop", tokenizer.id_to_token(stop),
                    "The fox")
    assert result.exit_code == 0, result.output
    assert result.stdout == tokenizer.decode(free[:free.index(stop)]) + "\n"
    result = invoke("--onnx", "--workdir", str(workdir), "--stop", "no such single token", "hi")
    assert result.exit_code == 1 and "--stop 'no such single token' is" in result.output


def test_fm_generate_refuses_a_changed_or_missing_file_by_name(export_workdir, tmp_path):
    workdir, _ = export_workdir
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy)
    onnx_dir = copy / "07_export" / "onnx"
    data = bytearray((onnx_dir / "decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    (onnx_dir / "decode.onnx").write_bytes(bytes(data))
    result = invoke("--onnx", "--workdir", str(copy), "hello")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{onnx_dir / 'decode.onnx'} has sha256" in result.output and result.stdout == ""

    (onnx_dir / "prefill.int8.onnx").unlink()
    result = invoke("--int8", "--workdir", str(copy), "hello")
    assert result.exit_code == 1 and str(onnx_dir / "prefill.int8.onnx") in result.output

    tokenizer = copy / "07_export" / "hf" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<|end|>", "<|END|>"))
    shutil.copyfile(workdir / "07_export" / "onnx" / "decode.onnx", onnx_dir / "decode.onnx")  # the graphs intact again
    result = invoke("--onnx", "--workdir", str(copy), "hello")
    assert result.exit_code == 1 and f"{tokenizer} is not the tokenizer" in result.output

    result = invoke("--onnx", "--workdir", str(tmp_path / "nowhere"), "hello")
    assert result.exit_code == 1 and "report.json not found" in result.output


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "1", "--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--temperature", "1", "--top-k", "0"], "top_k must be at least 1"),
    (["--top-k", "5"], "give --temperature > 0 too"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--model", "somewhere"], "--model is a torch model folder"),
])
def test_fm_generate_refuses_bad_options_in_one_line(export_workdir, args, message):
    workdir, _ = export_workdir
    result = invoke("--onnx", "--workdir", str(workdir), *args, "hello")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "error (generate)" in result.output
    assert re.search(message, result.output), result.output


@pytest.mark.parametrize("tuned", [False, True])
def test_fm_generate_torch_model_folder_chat_or_raw_from_its_config(tmp_path, tokenizer_path, tuned):
    """--model: a tuned folder (sft in config.json) gets the chat template, a pretrained one continues plain text."""
    tokenizer = open_tokenizer(tokenizer_path)
    model = tiny_decoder(seed=3, vocab_size=tokenizer.get_vocab_size())
    meta = {"tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(tokenizer_path)}}
    export_model(model, model.cfg, tmp_path / "model", Dist(), {**meta, **({"sft": {"method": "full"}} if tuned else {})})
    shutil.copyfile(tokenizer_path, tmp_path / "model" / "tokenizer.json")
    prompt = "Name a fruit."
    ids = ChatTemplate(tokenizer).encode_prompt(prompt) if tuned else tokenizer.encode(prompt, add_special_tokens=False).ids
    result = invoke("--model", str(tmp_path / "model"), "--max-new-tokens", "10", "--temperature", "1.1", "--seed", "5", prompt)
    assert result.exit_code == 0, result.output
    assert result.stdout == torch_text(model, tokenizer, ids, 10, seed=5, temperature=1.1) + "\n"
    result = invoke("--model", str(tmp_path / "model"), "--max-new-tokens", "10", "--temperature", "1.1", prompt)
    assert result.exit_code == 0 and "seed " in result.stderr  # a fresh seed, shown so the text can be written again
    seed = int(result.stderr.split("seed ")[1].split()[0])
    assert result.stdout == torch_text(model, tokenizer, ids, 10, seed=seed, temperature=1.1) + "\n"


def test_fm_generate_help_explains_the_options():
    result = runner.invoke(app, ["generate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--onnx", "--onnx-dir", "--int8", "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--plain",
                   "--model", "--max-new-tokens"):
        assert option in result.output, option
